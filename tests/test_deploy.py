"""Exported model (issue 25): ONNX and torch.export against ``DDLMask2Former.predict``.

The quickstart Swin model with random weights, its verdict calibrated by hand so that the test
images fall on both sides of the threshold (the mask policy "gate" then empties some maps).
Parity: ONNX Runtime at three image sizes (one not a multiple of 32) on the plain path, and
both backends on the tiled path with flip, within 1e-4 on ``mask_prob`` and 1e-5 on
``fake_prob`` of the PyTorch predictor. ONNX tests skip where onnx/onnxruntime are absent.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

from ddl_mask2former.config import load_config
from ddl_mask2former.deploy import ExportedModel, export_model, metadata_path
from ddl_mask2former.deploy.runtime import ExportedModelError
from ddl_mask2former.predictor import ForgeryPredictor

from tool_helpers import load_tool

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart" /
                 "ddl_mask2former_quickstart_swin.yaml")
# The quickstart model with the map_max verdict these tests calibrate by hand (the config's rule
# is fusion).
MAP_MAX = ["MODEL.DDL.VERDICT.RULE", "map_max"]
# (height, width): one square, one wide multiple of 32, one that is not a multiple of 32.
SIZES = [(64, 64), (96, 128), (75, 110)]
TILED_SIZE = (100, 150)
TILE_OPTS = ["TEST.TILE.ENABLED", "True", "TEST.TILE.SIZE", "64", "TEST.TILE.OVERLAP", "16",
             "TEST.TILE.BATCH_SIZE", "4", "TEST.AUG.ENABLED", "True"]
MASK_TOLERANCE = 1e-4
FAKE_PROB_TOLERANCE = 1e-5


def _needs_onnx():
    pytest.importorskip("onnx", reason="onnx is not installed (pip install -e .[deploy])")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e .[deploy])")


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Random quickstart weights with a map_max verdict whose threshold splits the test images."""
    folder = tmp_path_factory.mktemp("deploy")
    cfg = load_config(QUICKSTART, [*MAP_MAX, "MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    weights = folder / "model.pth"
    torch.save({"model": model.state_dict()}, weights)
    scores = sorted(p["fake_prob"] for p in ForgeryPredictor(
        load_config(QUICKSTART, [*MAP_MAX, "MODEL.WEIGHTS", str(weights)]))(_images()))
    # Halfway between the lowest and the next score: one image called real, the others fake.
    threshold = 0.5 * (scores[0] + scores[1])
    assert scores[1] - scores[0] > 1e-3, f"test images too close to split: {scores}"
    model.verdict.set_calibration("map_max", {"map_max": 1.0}, 0.0, threshold, 0.1)
    torch.save({"model": model.state_dict()}, weights)
    return folder, weights


def _predictor(weights, *opts):
    return ForgeryPredictor(load_config(QUICKSTART, [*MAP_MAX, "MODEL.WEIGHTS", str(weights), *opts]))


def _assert_same(expected, actual):
    assert expected.keys() == actual.keys()
    assert abs(expected["fake_prob"] - actual["fake_prob"]) <= FAKE_PROB_TOLERANCE
    assert expected["is_fake"] == actual["is_fake"]
    assert expected["mask_prob"].shape == actual["mask_prob"].shape
    assert np.abs(expected["mask_prob"] - actual["mask_prob"]).max() <= MASK_TOLERANCE
    # The masks agree wherever the map is not within the tolerance of 0.5.
    clear = np.abs(expected["mask_prob"] - 0.5) > MASK_TOLERANCE
    assert np.array_equal(expected["mask"][clear], actual["mask"][clear])


@pytest.fixture(scope="module")
def onnx_file(checkpoint):
    _needs_onnx()
    folder, weights = checkpoint
    output = folder / "model.onnx"
    tool = load_tool("export_model")
    # The plain path (no tiling): whole images at the test scale, three sizes through one graph.
    assert tool.main(["--config-file", QUICKSTART, "--format", "onnx", "--output", str(output),
                      "MODEL.WEIGHTS", str(weights), "TEST.TILE.ENABLED", "False", *MAP_MAX]) == 0
    return output


def test_onnx_file_and_settings(onnx_file, checkpoint):
    import onnx

    onnx.checker.check_model(str(onnx_file))
    model = onnx.load(str(onnx_file))
    assert [o.name for o in model.graph.output] == ["fake_logit", "mask_prob"]
    assert "GridSample" in {node.op_type for node in model.graph.node}
    settings = json.loads(Path(metadata_path(onnx_file)).read_text())
    assert settings["format"] == "onnx" and settings["input"]["size"] is None
    assert settings["input"]["channel_order"] == "RGB"
    assert settings["tiling"] is None and settings["flip"] is False
    assert settings["test_resize"] == {"base_scale": [1024, 1024], "enlarge": False}
    verdict = settings["verdict"]
    assert (verdict["rule"], verdict["target_fpr"], verdict["calibrated"], verdict["mask_policy"]) == \
        ("map_max", 0.1, True, "gate")


def test_onnx_matches_pytorch_at_three_sizes(onnx_file, checkpoint):
    _, weights = checkpoint
    reference = _predictor(weights, "TEST.TILE.ENABLED", "False")
    expected = reference(_images())
    predictor = ForgeryPredictor.from_exported(onnx_file)
    actual = predictor(_images())
    assert sorted(p["is_fake"] for p in expected) == [False, True, True]
    for exp, act in zip(expected, actual):
        _assert_same(exp, act)
    real = [p for p in actual if not p["is_fake"]][0]
    assert not real["mask_prob"].any()  # the gate, applied by the exported predictor
    # A PIL image and a path take the same route; an image over the test scale (1024) is
    # resized for the network and its map brought back to 300x1100.
    _assert_same(expected[1], predictor(Image.fromarray(_images()[1])))
    wide = np.random.default_rng(3).integers(0, 256, (300, 1100, 3), dtype=np.uint8)
    exp_wide, act_wide = reference(wide), predictor(wide)
    assert act_wide["mask_prob"].shape == (300, 1100)
    _assert_same(exp_wide, act_wide)


def test_tiled_path_same_in_pytorch_and_onnx_runtime(onnx_file, checkpoint, tmp_path):
    _, weights = checkpoint
    cfg = load_config(QUICKSTART, [*MAP_MAX, "MODEL.WEIGHTS", str(weights), *TILE_OPTS])
    reference = ForgeryPredictor(cfg)
    output = tmp_path / "tiled.onnx"
    export_model(reference.model, cfg, "onnx", output)
    image = np.random.default_rng(1).integers(0, 256, TILED_SIZE + (3,), dtype=np.uint8)
    exported = ForgeryPredictor.from_exported(output)
    assert exported.model.tiling["tile_size"] == 64 and exported.model.flip
    _assert_same(reference(image), exported(image))


def test_torch_export_tiled_path_and_fixed_size(checkpoint, tmp_path):
    _, weights = checkpoint
    cfg = load_config(QUICKSTART, [*MAP_MAX, "MODEL.WEIGHTS", str(weights), *TILE_OPTS])
    reference = ForgeryPredictor(cfg)
    output = tmp_path / "tiled.pt2"
    result = export_model(reference.model, cfg, "torch-export", output)
    assert result["input"]["size"] == [64, 64] and result["file_bytes"] > 0
    exported = ForgeryPredictor.from_exported(output)
    images = [np.random.default_rng(2).integers(0, 256, size + (3,), dtype=np.uint8)
              for size in [TILED_SIZE, (64, 64), (130, 97)]]
    for exp, act in zip(reference(images), exported(images)):
        _assert_same(exp, act)
    # An image shorter than a tile has 50x64 tiles, a size this program was not exported for.
    with pytest.raises(ExportedModelError, match=r"tiled\.pt2 was exported .* for 64x64 inputs only and got 50x64"):
        exported(np.zeros((50, 80, 3), dtype=np.uint8))


def test_bad_inputs_name_the_problem(checkpoint, tmp_path, capsys):
    _, weights = checkpoint
    tool = load_tool("export_model")
    with pytest.raises(SystemExit, match="unknown --format 'tflite'"):
        tool.main(["--config-file", QUICKSTART, "--format", "tflite", "--output", str(tmp_path / "m")])
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(SystemExit, match=f"MODEL.WEIGHTS file not found: {missing}"):
        tool.main(["--config-file", QUICKSTART, "--format", "onnx", "--output", str(tmp_path / "m.onnx"),
                   "MODEL.WEIGHTS", str(missing)])
    cfg = load_config(QUICKSTART, MAP_MAX)
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_model(build_model(cfg), cfg, "tflite", tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="exported model not found: .*absent.onnx"):
        ForgeryPredictor.from_exported(tmp_path / "absent.onnx")
    orphan = tmp_path / "orphan.onnx"
    orphan.write_bytes(b"not a model")
    with pytest.raises(FileNotFoundError, match=r"orphan\.onnx\.json is missing"):
        ForgeryPredictor.from_exported(orphan)
    metadata = tmp_path / "orphan.onnx.json"
    metadata.write_text(json.dumps({"format": "tflite"}))
    with pytest.raises(ExportedModelError, match="missing key"):
        ForgeryPredictor.from_exported(orphan)


def test_exported_network_rejects_a_wrong_array(onnx_file):
    exported = ExportedModel(onnx_file)
    with pytest.raises(ExportedModelError, match=r"model\.onnx takes a \(batch, 3, height, width\) array, "
                                                 r"got \(1, 4, 64, 64\)"):
        exported.network(np.zeros((1, 4, 64, 64), dtype=np.float32))
    with pytest.raises(ExportedModelError, match=r"predict takes a uint8 HxWx3 RGB array, got float32"):
        exported.predict(np.zeros((64, 64, 3), dtype=np.float32))


def test_demo_runs_an_exported_file(onnx_file, checkpoint, tmp_path, capsys, caplog):
    import cv2

    _, weights = checkpoint
    image = tmp_path / "photo.png"
    cv2.imwrite(str(image), _images()[2][:, :, ::-1])
    demo = load_tool("demo")
    assert demo.main(["--exported", str(onnx_file), "--input", str(image), "--output", str(tmp_path / "out")]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    expected = _predictor(weights)(str(image))
    assert abs(record["fake_prob"] - expected["fake_prob"]) <= FAKE_PROB_TOLERANCE
    assert record["is_fake"] == expected["is_fake"]
    assert cv2.imread(record["output"]).shape == (75, 110, 3)
    assert demo.main(["--exported", str(tmp_path / "absent.onnx"), "--input", str(image),
                      "--output", str(tmp_path / "out")]) == 1
    assert f"exported model not found: {tmp_path / 'absent.onnx'}" in caplog.text
