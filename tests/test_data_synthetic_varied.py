"""The varied synthetic generator: sources, region shapes, forgery families, post-processing chains."""
import json
import os

import cv2
import numpy as np
import pytest

from ddl_mask2former.data import synthetic_sources, synthetic_varied
from ddl_mask2former.data.synthetic import FORGERY_TYPES, generate_ddl_dataset, trace_profile
from ddl_mask2former.data.synthetic_regions import REGION_SHAPES, draw_region
from ddl_mask2former.data.synthetic_sources import (
    BUNDLED_PHOTOS, REGISTRY_PHOTOS, load_photo_pool, missing_registry_photos, procedural_scene,
    simulate_camera)
from ddl_mask2former.data.synthetic_varied import (
    FORGERY_FAMILIES, POST_CHAINS, Variety, apply_post_chain, make_varied_fake, make_varied_real)
from test_data_synthetic import REPO, _digest
from tool_helpers import load_script

SIZE = {"min_size": 48, "max_size": 80}


@pytest.fixture(autouse=True)
def no_registry_photos(monkeypatch):
    """Tests run on the bundled and wheel photographs: decoding the wallpapers takes seconds."""
    monkeypatch.setenv("DDL_PHOTO_DIR", os.path.join(os.sep, "nonexistent", "ddl-photos"))


@pytest.fixture
def photos():
    return load_photo_pool("varied")


def test_photo_pools(tmp_path, monkeypatch):
    assert sorted(load_photo_pool("classic")) == sorted(BUNDLED_PHOTOS)
    varied = load_photo_pool("varied")
    assert set(BUNDLED_PHOTOS) < set(varied)
    assert {"sklearn_china", "sklearn_flower", "grace_hopper"} <= set(varied)
    assert missing_registry_photos() == list(REGISTRY_PHOTOS)
    # A registry photograph found in the folder joins the pool, shrunk to at most 1536 px.
    folder = tmp_path / "photos" / "usr" / "share" / "backgrounds"
    folder.mkdir(parents=True)
    big = np.random.default_rng(0).integers(0, 255, (1800, 2400, 3), dtype=np.uint8)
    cv2.imwrite(str(folder / REGISTRY_PHOTOS[0]), big)
    monkeypatch.setenv("DDL_PHOTO_DIR", str(tmp_path / "photos"))
    pool = load_photo_pool("varied")
    name = os.path.splitext(REGISTRY_PHOTOS[0])[0]
    assert pool[name].shape == (1152, 1536, 3)
    assert REGISTRY_PHOTOS[0] not in missing_registry_photos()
    # The shrunk pixels are kept beside the photographs and read back identical.
    assert list((tmp_path / "photos" / ".shrunk").glob("*.png"))
    synthetic_sources._POOL_CACHE.clear()
    assert np.array_equal(load_photo_pool("varied")[name], pool[name])
    with pytest.raises(ValueError, match="unknown photo pool 'mate'"):
        load_photo_pool("mate")


def test_procedural_scene_is_new_textured_and_deterministic(photos):
    a = procedural_scene(np.random.default_rng(1), 96, 128, photos)
    b = procedural_scene(np.random.default_rng(1), 96, 128, photos)
    c = procedural_scene(np.random.default_rng(2), 96, 128, photos)
    assert a.shape == (96, 128, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # Not flat: edges and texture at several scales, and the camera's noise.
    assert a.std() > 10
    assert np.abs(np.diff(a.astype(np.float32), axis=1)).mean() > 1.0
    with pytest.raises(ValueError, match="at least 2x2"):
        procedural_scene(np.random.default_rng(0), 1, 10, photos)


def test_simulated_camera_adds_signal_dependent_noise():
    flat = np.full((64, 64, 3), 0.2, np.float32)
    image = simulate_camera(np.random.default_rng(0), flat, jpeg_quality=0)
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    assert 0.3 < image.std() < 12  # noisy, not destroyed
    brighter = simulate_camera(np.random.default_rng(0), np.full_like(flat, 0.6), jpeg_quality=0)
    assert brighter.mean() > image.mean()


@pytest.mark.parametrize("shape", REGION_SHAPES)
def test_each_region_shape_is_a_soft_local_region(shape, photos):
    image = procedural_scene(np.random.default_rng(3), 128, 160, photos)
    for index in range(3):
        alpha, (y0, y1, x0, x1) = draw_region(np.random.default_rng([4, index]), image, shape,
                                              (0.15, 0.3), feather=0.04)
        assert alpha.shape == (y1 - y0, x1 - x0) and 0 <= y0 < y1 <= 128 and 0 <= x0 < x1 <= 160
        assert alpha.min() >= 0 and alpha.max() <= 1.0 + 1e-6
        inside = alpha > 0.5
        assert 0 < inside.mean() < 1 and inside.sum() < 0.5 * 128 * 160
    with pytest.raises(ValueError, match="unknown region shape 'star'"):
        draw_region(np.random.default_rng(0), image, "star", (0.1, 0.2), 0.04)


@pytest.mark.parametrize("family", FORGERY_FAMILIES)
def test_each_family_changes_the_masked_region_only(family, photos, monkeypatch):
    # A fixed content and no camera or chain: every change is the forgery's.
    content = procedural_scene(np.random.default_rng(5), 96, 128, photos)
    monkeypatch.setattr(synthetic_varied, "_content", lambda rng, photos, h, w, exclude=None: (
        content[:h, :w].copy(), "fixed"))
    monkeypatch.setattr(synthetic_varied, "_camera", lambda rng, image, profile: image)
    variety = Variety(families=[family], chains=["none"])
    inside, outside = [], []
    for index in range(4):
        fake, mask, meta = make_varied_fake(np.random.default_rng([6, index]), photos, variety,
                                            trace_profile("medium"), 96, 96)
        assert mask.any() and meta["families"] == [family] and meta["post"] == {"chain": "none"}
        difference = np.abs(fake.astype(np.float32) - content[:96, :96].astype(np.float32)).mean(axis=2)
        near = cv2.dilate(mask.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
        inside.append(difference[mask].mean())
        outside.append(difference[~near].mean() if (~near).any() else 0.0)
    assert np.mean(outside) < 0.5
    assert np.mean(inside) > 2.0


@pytest.mark.parametrize("chain", POST_CHAINS)
def test_post_chain_keeps_the_mask_on_the_image(chain):
    rng = np.random.default_rng(7)
    image = rng.integers(0, 255, (120, 100, 3), dtype=np.uint8)
    mask = np.zeros((120, 100), bool)
    mask[30:70, 20:60] = True
    out, out_mask, params = apply_post_chain(np.random.default_rng(8), image, mask, chain)
    assert params["chain"] == chain
    assert out.shape[:2] == out_mask.shape and out_mask.dtype == bool and out_mask.any()
    if chain == "double_jpeg":
        dy, dx = params["shift"]
        assert out.shape[:2] == (120 - dy, 100 - dx) and np.array_equal(out_mask, mask[dy:, dx:])
    elif chain == "resize_jpeg":
        assert 0.5 <= params["factor"] <= 1.5 and 60 <= params["quality"] <= 100
        # The mask's box scales with the image.
        ys, xs = np.nonzero(out_mask)
        assert abs(ys.min() - 30 * params["factor"]) <= 1.5 and abs(xs.max() + 1 - 60 * params["factor"]) <= 1.5
    else:
        assert out.shape == image.shape and np.array_equal(out_mask, mask)
    real, none_mask, _ = apply_post_chain(np.random.default_rng(8), image, None, chain)
    assert none_mask is None and np.array_equal(real, out)  # real and fake get the same processing
    with pytest.raises(ValueError, match="unknown post-processing chain 'gif'"):
        apply_post_chain(rng, image, mask, "gif")


def test_variety_checks_its_names():
    assert Variety().as_dict() == {"families": list(FORGERY_FAMILIES), "shapes": list(REGION_SHAPES),
                                   "chains": list(POST_CHAINS)}
    with pytest.raises(ValueError, match="forgery families must be a non-empty subset"):
        Variety(families=["deepfake"])
    with pytest.raises(ValueError, match="post-processing chains must be a non-empty subset"):
        Variety(chains=[])


def test_varied_dataset_is_deterministic_and_records_what_it_drew(tmp_path):
    variety = {"families": ["splice", "copy_move"], "chains": ["jpeg", "double_jpeg"]}
    generate_ddl_dataset(str(tmp_path / "a"), 8, 0, seed=3, workers=1, variety=variety, **SIZE)
    generate_ddl_dataset(str(tmp_path / "b"), 8, 0, seed=3, workers=2, variety=variety, **SIZE)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    records = [json.loads(line) for line in open(tmp_path / "a" / "manifest_train.jsonl")]
    fakes = [r for r in records if r["label"] == 1]
    reals = [r for r in records if r["label"] == 0]
    assert fakes and reals
    for record in records:
        assert record["post"]["chain"] in ("jpeg", "double_jpeg")
    for record in fakes:
        assert set(record["families"]) <= {"splice", "copy_move"} and record["forged_fraction"] > 0
        mask = cv2.imread(str(tmp_path / "a" / "train" / "masks" / record["file"]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (record["height"], record["width"]) and set(np.unique(mask)) == {0, 255}
    with pytest.raises(ValueError, match="forgery families must be"):
        generate_ddl_dataset(str(tmp_path / "c"), 2, 0, variety={"families": ["gan"]}, **SIZE)


def test_real_images_come_from_photographs_and_procedural_scenes(photos):
    sources = [make_varied_real(np.random.default_rng([9, i]), photos, Variety(), trace_profile("easy"),
                                **SIZE)[1]["source"] for i in range(30)]
    assert synthetic_sources.PROCEDURAL in sources
    assert len(set(sources) - {synthetic_sources.PROCEDURAL}) >= 5


def _manifest(root, split="train"):
    return [json.loads(line) for line in open(root / f"manifest_{split}.jsonl")]


def test_mixed_dataset_draws_each_image_from_either_generator(tmp_path):
    variety = {"families": ["splice", "inpaint"], "chains": ["jpeg"]}
    for out, workers in (("a", 1), ("b", 2)):
        generate_ddl_dataset(str(tmp_path / out), 40, 0, seed=4, workers=workers, variety=variety,
                             varied_share=0.25, **SIZE)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    records = _manifest(tmp_path / "a")
    varied = [r for r in records if r["generator"] == "varied"]
    classic = [r for r in records if r["generator"] == "classic"]
    assert len(varied) + len(classic) == 40
    assert 4 <= len(varied) <= 16  # binomial(40, 0.25): 10 +- 2.7
    # Real and fake images alike come from either generator.
    assert {r["label"] for r in varied} == {r["label"] for r in classic} == {0, 1}
    for record in varied:  # the variety restricts the varied images only
        assert record["post"]["chain"] == "jpeg"
        assert set(record.get("families", [])) <= {"splice", "inpaint"}
    for record in classic:
        assert "post" not in record and record.get("forgery_type", "face_swap") in FORGERY_TYPES


@pytest.mark.parametrize("share,generator,variety", [(0.0, "classic", None), (1.0, "varied", {})])
def test_mixed_dataset_at_share_0_or_1_is_one_generator(tmp_path, share, generator, variety):
    generate_ddl_dataset(str(tmp_path / "mixed"), 6, 0, seed=2, varied_share=share, **SIZE)
    generate_ddl_dataset(str(tmp_path / "single"), 6, 0, seed=2, variety=variety, **SIZE)
    assert {r["generator"] for r in _manifest(tmp_path / "mixed")} == {generator}
    # Image i of a mixed split is image i of its generator's own split.
    assert _digest(tmp_path / "mixed" / "train") == _digest(tmp_path / "single" / "train")
    with pytest.raises(ValueError, match=r"varied_share must be in \[0, 1\], got 1.5"):
        generate_ddl_dataset(str(tmp_path / "bad"), 2, 0, varied_share=1.5, **SIZE)


def test_cli_mixed_generator_options(capsys):
    cli = load_script(os.path.join(REPO, "datasets", "make_synthetic_ddl.py"))
    args = cli.parse_args(["--out", "o", "--generator", "mixed", "--chains", "jpeg"])
    assert args.varied_share == 0.5 and args.chains == ["jpeg"]
    assert cli.parse_args(["--out", "o", "--generator", "mixed", "--varied-share", "0"]).varied_share == 0.0
    assert cli.parse_args(["--out", "o"]).varied_share is None
    for argv, message in ((["--generator", "mixed", "--varied-share", "1.5"], "--varied-share must be in [0, 1]"),
                          (["--generator", "mixed", "--varied-share", "-0.1"], "--varied-share must be in [0, 1]"),
                          (["--varied-share", "0.5"], "--varied-share belongs to the mixed generator"),
                          (["--generator", "classic", "--chains", "jpeg"], "belong to the varied and mixed")):
        with pytest.raises(SystemExit):
            cli.parse_args(["--out", "o", *argv])
        assert message in capsys.readouterr().err
