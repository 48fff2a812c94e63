"""Tiled inference at native resolution and flip test-time augmentation (TEST.TILE, TEST.AUG)."""
import os
import re

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from ddl_mask2former.evaluation import DDLEvaluator
from ddl_mask2former.modeling.tiled_inference import TiledInference, tile_starts, tile_weights
from ddl_mask2former.data import DDLDatasetMapper
from ddl_mask2former.data.augmentations import BaseScaleResize
from ddl_mask2former.predictor import ForgeryPredictor

from model_helpers import build, ddl_cfg, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image(height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def _record(image, **extra):
    return dict({"image": image, "height": image.shape[-2], "width": image.shape[-1],
                 "file_name": "test.png", "image_id": "test"}, **extra)


def _tiny_model(tile_size=None, overlap=32, flip=False, rule="tile_max", seed=0):
    cfg = tiny_cfg()
    cfg.TEST.AUG.ENABLED = flip
    if tile_size:
        cfg.TEST.TILE.ENABLED = True
        cfg.TEST.TILE.SIZE = tile_size
        cfg.TEST.TILE.OVERLAP = overlap
        cfg.TEST.TILE.BATCH_SIZE = 3
        cfg.TEST.TILE.FAKE_PROB = rule
    return build(cfg, seed).eval()


def _predict(model, image):
    with torch.no_grad():
        return model([_record(image)])[0]


# --- tile placement and weights ------------------------------------------------------------

@pytest.mark.parametrize("length", [1, 100, 128, 129, 200, 317, 1000])
def test_tiles_cover_the_axis_and_overlap_enough(length):
    tile, overlap = 128, 32
    starts = tile_starts(length, tile, overlap)
    tile_length = min(tile, length)
    assert starts[0] == 0 and starts[-1] + tile_length == length
    assert all(0 <= start <= length - tile_length for start in starts)
    for previous, start in zip(starts, starts[1:]):
        assert 0 < start - previous <= tile - overlap


def test_ramps_of_neighbours_at_exact_overlap_sum_to_one():
    # 128 + 96: two tiles overlapping by exactly 32 pixels.
    first, second = tile_weights(224, 0, 128, 32), tile_weights(224, 96, 128, 32)
    assert torch.all(first[:96] == 1) and torch.all(second[32:] == 1)
    torch.testing.assert_close(first[96:] + second[:32], torch.ones(32), atol=1e-6, rtol=0)
    assert 0 < float(first[-1]) < 1e-3


# --- blending, with stand-in predictors ----------------------------------------------------

def _tiling(tile_size=64, overlap=16, rule="tile_max"):
    return TiledInference(tile_size=tile_size, overlap=overlap, batch_size=4, fake_prob_rule=rule)


def _pixel_readout(records):
    """mask_prob = the first channel / 255: any consistent map must come back unchanged."""
    return [{"fake_prob": record["image"].float().mean() / 255,
             "mask_prob": record["image"][0].float() / 255} for record in records]


@pytest.mark.parametrize("size", [(150, 233), (64, 200), (301, 77)])
def test_blending_reproduces_a_map_every_tile_agrees_on(size):
    """Sizes not divisible by the stride: tiles are placed where they were cut from."""
    image = _image(*size)
    output = _tiling()(_record(image), _pixel_readout)
    assert output["mask_prob"].shape == size
    torch.testing.assert_close(output["mask_prob"], image[0].float() / 255, atol=1e-6, rtol=0)
    torch.testing.assert_close(output["mask"], image[0].float() / 255 > 0.5)


def test_constant_prediction_gives_a_seamless_constant_map():
    def constant(records):
        return [{"fake_prob": torch.tensor(0.3), "mask_prob": torch.full(r["image"].shape[-2:], 0.3)}
                for r in records]

    output = _tiling(tile_size=64, overlap=24)(_record(_image(190, 250)), constant)
    assert float((output["mask_prob"] - 0.3).abs().max()) < 1e-6
    assert float(output["fake_prob"]) == pytest.approx(0.3)


def test_fake_prob_rules():
    image = _image(100, 100)
    tiling = _tiling(tile_size=64, overlap=16)
    prediction = tiling.predict_tiles(_record(image), _pixel_readout, global_view=True)
    tiles = prediction.tile_fake_probs
    assert tiles.shape == (4,)  # 2 x 2 tiles
    expected = [image[:, y:y + 64, x:x + 64].float().mean() / 255 for y in (0, 36) for x in (0, 36)]
    torch.testing.assert_close(tiles, torch.stack(expected))
    # The global view of a 100 px image within the default base scale is the image, enlarged.
    assert prediction.global_fake_prob is not None
    for rule, value in [("tile_max", tiles.max()), ("tile_mean", tiles.mean()),
                        ("global", prediction.global_fake_prob),
                        ("global_tile_max", 0.5 * (tiles.max() + prediction.global_fake_prob))]:
        tiling.fake_prob_rule = rule
        torch.testing.assert_close(tiling.image_output(prediction)["fake_prob"], value)


def _size_readout(calls):
    """fake_prob = the input's pixel count / 1e6, so it tells which view it came from; each
    input's (H, W) is appended to ``calls``."""
    def predict_views(records):
        calls.extend(tuple(r["image"].shape[-2:]) for r in records)
        return [{"fake_prob": torch.tensor(r["image"].shape[-2] * r["image"].shape[-1] / 1e6),
                 "mask_prob": torch.zeros(r["image"].shape[-2:])} for r in records]
    return predict_views


@pytest.mark.parametrize("base_scale, global_size", [((64, 64), (64, 58)), ((256, 256), (256, 230))])
def test_one_tile_image_gets_the_global_views_fake_prob(base_scale, global_size):
    # 100 x 90 fits in a 128 px tile; the global view shrinks or enlarges it to the base scale.
    tiling = TiledInference(tile_size=128, overlap=16, fake_prob_rule="global", base_scale=base_scale)
    calls = []
    output = tiling(_record(_image(100, 90)), _size_readout(calls))
    assert calls == [(100, 90), global_size]
    assert float(output["fake_prob"]) == pytest.approx(global_size[0] * global_size[1] / 1e6)
    assert output["mask_prob"].shape == (100, 90)


def test_one_tile_image_global_tile_max_is_the_mean_of_both_views():
    tiling = TiledInference(tile_size=128, overlap=16, fake_prob_rule="global_tile_max",
                            base_scale=(64, 64))
    output = tiling(_record(_image(100, 90)), _size_readout([]))
    assert float(output["fake_prob"]) == pytest.approx(0.5 * (100 * 90 + 64 * 58) / 1e6)


@pytest.mark.parametrize("rule", ["tile_max", "tile_mean"])
def test_one_tile_image_without_the_global_rules_runs_once_at_native_size(rule):
    tiling = TiledInference(tile_size=128, overlap=16, fake_prob_rule=rule, base_scale=(64, 64))
    calls = []
    output = tiling(_record(_image(100, 90)), _size_readout(calls))
    assert calls == [(100, 90)]
    assert float(output["fake_prob"]) == pytest.approx(100 * 90 / 1e6)


# --- the model with tiling and flip ---------------------------------------------------------

def test_image_smaller_than_a_tile_equals_the_plain_path():
    image = _image(70, 90)
    plain = _predict(_tiny_model(), image)
    tiled = _predict(_tiny_model(tile_size=128), image)
    assert plain.keys() == tiled.keys() == {"fake_prob", "is_fake", "mask_prob", "mask"}
    for key in plain:
        assert torch.equal(plain[key], tiled[key]), key


def test_image_smaller_than_a_tile_with_the_global_rule_scores_the_base_scale_view():
    image = _image(70, 90)
    plain, tiled = _tiny_model(), _tiny_model(tile_size=128, rule="global")
    tiled.tiling.base_scale = (64, 64)
    pixels = image.permute(1, 2, 0).numpy()
    resized = BaseScaleResize((64, 64)).get_transform(pixels).apply_image(pixels)
    global_view = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
    assert tuple(global_view.shape[-2:]) == (50, 64)
    # The tiling's own output, before anything the model does to whole images afterwards.
    with torch.no_grad():
        output = tiled.tiling(_record(image), tiled.predict_views)
        native = plain.predict_views([_record(image)])[0]
        expected = plain.predict_views([{"image": global_view}])[0]["fake_prob"]
    torch.testing.assert_close(output["fake_prob"], expected)
    assert not torch.equal(output["fake_prob"], native["fake_prob"])
    # The map is still the plain path's at native size.
    assert torch.equal(output["mask_prob"], native["mask_prob"])
    assert torch.equal(output["mask"], native["mask"])


def test_tiled_model_output_at_sizes_not_divisible_by_the_stride():
    model = _tiny_model(tile_size=64, overlap=16)
    image = _image(150, 233)
    output = _predict(model, image)
    assert output["mask_prob"].shape == (150, 233) and output["mask"].dtype == torch.bool
    assert 0 <= float(output["mask_prob"].min()) and float(output["mask_prob"].max()) <= 1
    # tile_max: the largest fake_prob of the tiles, each predicted alone by the plain path.
    with torch.no_grad():
        tile_probs = [model.predict_views([{"image": image[:, y:y + 64, x:x + 64]}])[0]["fake_prob"]
                      for y in tile_starts(150, 64, 16) for x in tile_starts(233, 64, 16)]
    # (the verdict returns the float64 value it compares with its threshold)
    torch.testing.assert_close(output["fake_prob"], torch.stack(tile_probs).max().double())


def test_resized_input_is_tiled_and_brought_to_the_original_size():
    # An input that a resizing mapper shrank: tiles see it as it is, the output has the original size.
    def constant(records):
        return [{"fake_prob": torch.tensor(0.6), "mask_prob": torch.full(r["image"].shape[-2:], 0.7)}
                for r in records]

    output = _tiling()(_record(_image(100, 150), height=200, width=300), constant)
    assert output["mask_prob"].shape == (200, 300)
    assert float((output["mask_prob"] - 0.7).abs().max()) < 1e-6


def test_constant_probability_model_is_seamless_across_tiles():
    model = _tiny_model(tile_size=64, overlap=16)
    with torch.no_grad():
        # Mask embeddings 0 -> every mask logit 0; confidences sigmoid(0.4); detection sigmoid(-1).
        model.transformer_decoder.mask_embed.layers[-1].weight.zero_()
        model.transformer_decoder.mask_embed.layers[-1].bias.zero_()
        model.transformer_decoder.class_embed.weight.zero_()
        model.transformer_decoder.class_embed.bias.fill_(0.4)
        model.detection_head.classifier.weight.zero_()
        model.detection_head.classifier.bias.fill_(-1.0)
    output = _predict(model, _image(150, 233))
    expected = float(torch.sigmoid(torch.tensor(0.4))) * 0.5
    assert float((output["mask_prob"] - expected).abs().max()) < 1e-6
    assert float(output["fake_prob"]) == pytest.approx(float(torch.sigmoid(torch.tensor(-1.0))))


def test_flip_of_a_symmetric_input():
    half = _image(64, 48)
    image = torch.cat([half, half.flip(-1)], dim=-1)  # 64 x 96, mirror-symmetric
    plain = _predict(_tiny_model(), image)
    flipped = _predict(_tiny_model(flip=True), image)
    # Its mirror image is itself: same fake_prob; the map is the plain one averaged with its mirror.
    torch.testing.assert_close(flipped["fake_prob"], plain["fake_prob"])
    expected = 0.5 * (plain["mask_prob"] + plain["mask_prob"].flip(-1))
    torch.testing.assert_close(flipped["mask_prob"], expected, atol=1e-6, rtol=0)
    assert torch.equal(flipped["mask_prob"], flipped["mask_prob"].flip(-1))


def test_flip_averages_the_mirrored_prediction():
    image = _image(64, 96)
    plain, mirrored = _predict(_tiny_model(), image), _predict(_tiny_model(), image.flip(-1))
    flipped = _predict(_tiny_model(flip=True), image)
    torch.testing.assert_close(flipped["fake_prob"], 0.5 * (plain["fake_prob"] + mirrored["fake_prob"]))
    torch.testing.assert_close(flipped["mask_prob"],
                               0.5 * (plain["mask_prob"] + mirrored["mask_prob"].flip(-1)),
                               atol=1e-6, rtol=0)


def test_flip_composes_with_tiling():
    # Width 64 + 2 * 48: a tile grid that is its own mirror image, so flipping each tile equals
    # averaging the tiled maps of the image and of its mirror image.
    image = _image(100, 160)
    tiled, both = _tiny_model(tile_size=64, overlap=16), _tiny_model(tile_size=64, overlap=16, flip=True)
    expected = 0.5 * (_predict(tiled, image)["mask_prob"] + _predict(tiled, image.flip(-1))["mask_prob"].flip(-1))
    torch.testing.assert_close(_predict(both, image)["mask_prob"], expected, atol=1e-5, rtol=0)


# --- predictor, mapper, export -------------------------------------------------------------

def test_inference_mapper_keeps_native_size_only_when_tiling(tmp_path):
    path = str(tmp_path / "big.png")
    cv2.imwrite(path, np.zeros((300, 700, 3), np.uint8))
    record = {"file_name": path, "image_id": "big", "height": 300, "width": 700}
    resized = DDLDatasetMapper(ddl_cfg(**{"INPUT.BASE_SCALE": (256, 128)}), is_train=False)(record)
    native = DDLDatasetMapper(ddl_cfg(**{"INPUT.BASE_SCALE": (256, 128),
                                               "TEST.TILE.ENABLED": True}), is_train=False)(record)
    assert tuple(resized["image"].shape) == (3, 110, 256)
    assert tuple(native["image"].shape) == (3, 300, 700)
    assert (native["height"], native["width"]) == (300, 700)


def test_predictor_tiles_at_native_resolution():
    cfg = tiny_cfg()
    cfg.INPUT.BASE_SCALE = (64, 64)
    cfg.TEST.TILE.ENABLED, cfg.TEST.TILE.SIZE, cfg.TEST.TILE.OVERLAP = True, 64, 16
    torch.manual_seed(0)
    predictor = ForgeryPredictor(cfg)
    rgb = np.random.default_rng(0).integers(0, 256, (90, 150, 3), dtype=np.uint8)
    output = predictor(rgb)
    assert output["mask_prob"].shape == (90, 150)
    direct = _predict(predictor.model, torch.from_numpy(rgb.transpose(2, 0, 1).copy()))
    np.testing.assert_array_equal(output["mask_prob"], direct["mask_prob"].numpy())
    assert output["fake_prob"] == pytest.approx(float(direct["fake_prob"]))


def _export(tmp_path, name, model, images):
    export_dir = str(tmp_path / name)
    evaluator = DDLEvaluator("tiled_export_test", export_dir=export_dir, distributed=False)
    evaluator.reset()
    for index, image in enumerate(images):
        record = _record(image, file_name=f"img_{index}.png", image_id=f"img_{index}")
        with torch.no_grad():
            evaluator.process([record], model([record]))
    evaluator.evaluate()
    return export_dir


def test_export_of_tiled_predictions_has_todays_format(tmp_path):
    images = [_image(150, 233, seed=1), _image(40, 50, seed=2)]
    plain = _export(tmp_path, "plain", _tiny_model(), images)
    tiled = _export(tmp_path, "tiled", _tiny_model(tile_size=64, overlap=16, flip=True), images)
    for root in (plain, tiled):
        with open(os.path.join(root, "prediction.txt")) as handle:
            lines = handle.read().splitlines()
        assert [line.split(",")[0] for line in lines] == ["img_0.png", "img_1.png"]
        assert all(re.fullmatch(r"img_\d\.png,[0-9.e-]+", line) for line in lines)
    for folder in ("mask", "prob"):
        assert sorted(os.listdir(os.path.join(plain, folder))) == sorted(os.listdir(os.path.join(tiled, folder)))
        for file_name in os.listdir(os.path.join(plain, folder)):
            ours = cv2.imread(os.path.join(tiled, folder, file_name), cv2.IMREAD_UNCHANGED)
            theirs = cv2.imread(os.path.join(plain, folder, file_name), cv2.IMREAD_UNCHANGED)
            assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.uint8
    for file_name in os.listdir(os.path.join(tiled, "mask")):
        mask = cv2.imread(os.path.join(tiled, "mask", file_name), cv2.IMREAD_UNCHANGED)
        prob = cv2.imread(os.path.join(tiled, "prob", file_name), cv2.IMREAD_UNCHANGED)
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask == 255, prob >= 128)


# --- bad settings ---------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    ({"TEST.TILE.OVERLAP": 128}, "TEST.TILE.OVERLAP"),
    ({"TEST.TILE.OVERLAP": -1}, "TEST.TILE.OVERLAP"),
    ({"TEST.TILE.SIZE": 100}, "TEST.TILE.SIZE"),
    ({"TEST.TILE.SIZE": 0}, "TEST.TILE.SIZE"),
    ({"TEST.TILE.BATCH_SIZE": 0}, "TEST.TILE.BATCH_SIZE"),
    ({"TEST.TILE.FAKE_PROB": "median"}, "TEST.TILE.FAKE_PROB"),
])
def test_bad_tile_settings_name_the_key(overrides, key):
    cfg = tiny_cfg()
    cfg.TEST.TILE.ENABLED, cfg.TEST.TILE.SIZE = True, 128
    for name, value in overrides.items():
        cfg.TEST.TILE[name.split(".")[-1]] = value
    with pytest.raises(ValueError, match=re.escape(key)):
        build_model(cfg)


def test_flip_switched_off_inside_enabled_aug_is_an_error():
    cfg = tiny_cfg()
    cfg.TEST.AUG.ENABLED, cfg.TEST.AUG.FLIP = True, False
    with pytest.raises(ValueError, match="TEST.AUG.FLIP"):
        build_model(cfg)
