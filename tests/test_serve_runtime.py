"""The torch-free runtime of exported models (issue 32) against ``DDLMask2Former.predict``.

The runtime runs in a fresh subprocess that must end with neither torch nor detectron2 in
``sys.modules`` (importing ``ddl_mask2former_serve``, loading the ONNX file, predicting, and the
``predict`` command). Its outputs are compared with the PyTorch predictor's on tiled inputs with
flip, at sizes that are not multiples of the tile or of 32, an image narrower than a tile and one
that is a single tile: ``mask_prob`` within 1e-4, ``fake_prob`` within 1e-5, ``is_fake`` and the
gate (an image called real has an all-zero map) equal. Two exports: tile_max with the gate, and
global_tile_max (the base-scale global view) with the independent mask policy.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serve_helpers import FAKE_PROB_TOLERANCE, MASK_TOLERANCE, exported_model, photos

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e .[serve])")

SIZES = [(100, 150), (75, 110), (130, 97), (50, 80), (60, 60)]
PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "projects" / "DDLMask2Former"

CHILD = r"""
import json, sys
import numpy as np
from ddl_mask2former_serve import ExportedPredictor
from ddl_mask2former_serve.cli import main

model_path, inputs_path, outputs_path, image_path = sys.argv[1:5]
images = dict(np.load(inputs_path))
predictor = ExportedPredictor(model_path, num_threads=1)
results = {}
for name, image in images.items():
    out = predictor(image)
    results[name + "/mask_prob"] = out["mask_prob"]
    results[name + "/fake_prob"] = np.float64(out["fake_prob"])
    results[name + "/is_fake"] = np.bool_(out["is_fake"])
np.savez(outputs_path, **results)
code = main(["predict", image_path, "--model", model_path, "--threads", "1", "--output", outputs_path + ".jsonl"])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "detectron2", "torchvision"))
print(json.dumps({"heavy_modules": heavy, "predict_exit": code}))
"""


def _inputs():
    rng = np.random.default_rng(5)
    images = {f"noise_{h}x{w}": rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES}
    images.update({f"photo_{name}": rgb for name, rgb in photos().items()})
    return images


@pytest.fixture(scope="module", params=[(), ("TEST.TILE.FAKE_PROB", "global_tile_max",
                                             "MODEL.DDL.VERDICT.MASK_POLICY", "independent")],
                ids=["tile_max-gate", "global_tile_max-independent"])
def export(request, tmp_path_factory):
    return exported_model(tmp_path_factory.mktemp("serve"), *request.param)


@pytest.mark.slow
def test_runtime_without_torch_matches_pytorch(export, tmp_path):
    import cv2

    onnx_path, predictor = export
    images = _inputs()
    np.savez(tmp_path / "inputs.npz", **images)
    image_path = tmp_path / "photo.png"
    cv2.imwrite(str(image_path), images["photo_fake"][:, :, ::-1])
    env = {"PYTHONPATH": str(PACKAGE_ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", CHILD, str(onnx_path), str(tmp_path / "inputs.npz"),
                            str(tmp_path / "outputs.npz"), str(image_path)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report == {"heavy_modules": [], "predict_exit": 0}, report
    actual = np.load(tmp_path / "outputs.npz")
    gate = predictor.model.verdict.mask_policy == "gate"
    verdicts = []
    for name, image in images.items():
        expected = predictor(image)
        mask_prob = actual[f"{name}/mask_prob"]
        assert mask_prob.shape == image.shape[:2], name
        assert np.abs(mask_prob - expected["mask_prob"]).max() <= MASK_TOLERANCE, name
        assert abs(float(actual[f"{name}/fake_prob"]) - expected["fake_prob"]) <= FAKE_PROB_TOLERANCE, name
        assert bool(actual[f"{name}/is_fake"]) == expected["is_fake"], name
        if gate and not expected["is_fake"]:
            assert not mask_prob.any(), f"{name}: called real, yet its map is not empty"
        verdicts.append(expected["is_fake"])
    assert set(verdicts) == {True, False}, "the images should fall on both sides of the threshold"
    (line,) = (tmp_path / "outputs.npz.jsonl").read_text().splitlines()
    record = json.loads(line)
    expected = predictor(str(image_path))
    assert abs(record["fake_prob"] - expected["fake_prob"]) <= 1e-6 and record["is_fake"] == expected["is_fake"]
    assert record["verdict"] == ("FAKE" if expected["is_fake"] else "REAL")


def test_grayscale_and_channel_orders(export):
    from ddl_mask2former_serve import ExportedPredictor

    onnx_path, predictor = export
    exported = ExportedPredictor(onnx_path, num_threads=1)
    gray = photos()["fake"][:, :, 1]
    expected = predictor(np.repeat(gray[:, :, None], 3, axis=2))
    for image in (gray, gray[:, :, None]):
        out = exported(image)
        assert np.abs(out["mask_prob"] - expected["mask_prob"]).max() <= MASK_TOLERANCE
        assert abs(out["fake_prob"] - expected["fake_prob"]) <= FAKE_PROB_TOLERANCE
    rgb = photos()["real"]
    bgr_out, rgb_out = exported(rgb[:, :, ::-1].copy(), format="BGR"), exported(rgb)
    assert bgr_out["fake_prob"] == rgb_out["fake_prob"]
    with pytest.raises(ValueError, match=r"input image: expected a uint8 HxWx3 \(color\), HxW or HxWx1"):
        exported(np.zeros((20, 20, 2), np.uint8))


def test_progress_counts_every_network_call(export):
    from ddl_mask2former_serve import ExportedModel

    onnx_path, _ = export
    model = ExportedModel(onnx_path, num_threads=1)
    calls = []
    model.predict(np.zeros((100, 150, 3), np.uint8), progress=lambda done, total: calls.append((done, total)))
    total = model.work_units(100, 150)
    # 64 px tiles overlapping by 16: 2 rows x 3 columns, plus the global view under global_tile_max.
    assert total == 6 + (model.tiling["fake_prob_rule"] == "global_tile_max")
    assert calls[-1] == (total, total) and [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_settings_are_the_single_source(export, tmp_path):
    """The runtime reads every rule from the JSON: change it there and the output follows."""
    import shutil

    from ddl_mask2former_serve import ExportedModel, ExportedModelError
    from ddl_mask2former_serve.runtime import read_settings, settings_path

    onnx_path, _ = export
    copy = tmp_path / "copy.onnx"
    shutil.copy(onnx_path, copy)
    settings = read_settings(onnx_path)
    assert {"top_fraction", "area_floor", "prob_floor", "prob_ceiling", "threshold", "target_fpr"} <= set(
        settings["verdict"]) and "eps" not in settings["verdict"]
    settings["verdict"]["threshold"] = 2.0  # no image can be called fake
    Path(settings_path(copy)).write_text(json.dumps(settings))
    out = ExportedModel(copy, num_threads=1).predict(photos()["fake"])
    assert not out["is_fake"]
    settings["verdict"]["rule"] = "magic"
    Path(settings_path(copy)).write_text(json.dumps(settings))
    with pytest.raises(ExportedModelError, match=r"copy\.onnx\.json: unknown verdict rule 'magic'"):
        ExportedModel(copy)
    Path(settings_path(copy)).write_text("{not json")
    with pytest.raises(ExportedModelError, match=r"copy\.onnx\.json: not valid JSON"):
        ExportedModel(copy)


def test_older_settings_keep_their_clamp_and_newer_ones_are_refused(export, tmp_path):
    """Version 1 and 2 files were fitted on log odds clamped to [eps, 1 - eps] (version 1: eps
    1e-6, not written): they load with those bounds; a version this runtime does not know fails."""
    import shutil

    from ddl_mask2former_serve import ExportedModelError
    from ddl_mask2former_serve.runtime import SETTINGS_VERSION, read_settings, settings_path

    onnx_path, _ = export
    copy = tmp_path / "old.onnx"
    shutil.copy(onnx_path, copy)
    current = json.loads(Path(settings_path(onnx_path)).read_text())
    assert current["metadata_version"] == SETTINGS_VERSION == 3
    old = json.loads(json.dumps(current))
    for key in ("prob_floor", "prob_ceiling"):
        del old["verdict"][key]
    for version, verdict_extra, eps in [(2, {"eps": 1e-5}, 1e-5), (1, {}, 1e-6)]:
        old["metadata_version"] = version
        if version == 1:
            for key in ("top_fraction", "area_floor", "eps"):
                old["verdict"].pop(key, None)
        old["verdict"].update(verdict_extra)
        Path(settings_path(copy)).write_text(json.dumps(old))
        verdict = read_settings(copy)["verdict"]
        assert (verdict["prob_floor"], verdict["prob_ceiling"]) == (eps, 1.0 - eps) and "eps" not in verdict
    old["metadata_version"] = SETTINGS_VERSION + 1
    Path(settings_path(copy)).write_text(json.dumps(old))
    with pytest.raises(ExportedModelError, match=r"old\.onnx\.json: metadata_version 4 is newer"):
        read_settings(copy)


def test_map_resize_is_pytorchs_bilinear():
    import torch
    import torch.nn.functional as F

    from ddl_mask2former_serve.images import resize_bilinear

    rng = np.random.default_rng(0)
    for (height, width), size in [((128, 128), (300, 1100)), ((75, 110), (1000, 37)), ((64, 64), (64, 200)),
                                  ((512, 512), (333, 333))]:
        values = rng.random((height, width), dtype=np.float32)
        expected = F.interpolate(torch.from_numpy(values)[None, None], size=size, mode="bilinear",
                                 align_corners=False)[0, 0].numpy()
        assert np.abs(resize_bilinear(values, *size) - expected).max() < 2e-5
