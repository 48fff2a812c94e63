"""tools/trace_survival.py: the model-free noise-trace measurement, on hand-made images."""
import json

import cv2
import numpy as np
import pytest

from tool_helpers import load_tool

trace_survival = load_tool("trace_survival")


def _write_split(root, count=2):
    """Fakes whose forged square lacks the grain of the rest: the noise trace of an inpainting."""
    for folder in ("real", "fake", "masks"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        image = np.full((64, 64, 3), 120.0) + rng.normal(0, 6, (64, 64, 3))
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 16:48] = 255
        image[16:48, 16:48] = 120  # smooth: no grain inside the region
        cv2.imwrite(str(root / "fake" / f"f{index}.png"), image.clip(0, 255).astype(np.uint8))
        cv2.imwrite(str(root / "masks" / f"f{index}.png"), mask)
        cv2.imwrite(str(root / "real" / f"r{index}.png"), np.full((64, 64, 3), 120, np.uint8))
    return root


def test_separability_is_one_for_apart_classes_and_half_for_equal_ones():
    rng = np.random.default_rng(0)
    forged = np.zeros((10, 10), bool)
    forged[:, :5] = True
    energy = np.where(forged, 1.0, 0.0)
    assert trace_survival.separability(energy, forged, rng) == 1.0
    assert trace_survival.separability(-energy, forged, rng) == 1.0  # smoother counts as well
    assert trace_survival.separability(np.zeros((10, 10)), forged, rng) == 0.5
    assert trace_survival.separability(energy, np.zeros((10, 10), bool), rng) is None


def test_summary_keeps_the_margin_over_chance():
    summary = trace_survival.summarize({"clean": [0.9, 0.7], "jpeg 70": [0.7, 0.6]})
    assert summary["clean"]["separability"] == pytest.approx(0.8)
    # (0.65 - 0.5) / (0.8 - 0.5)
    assert summary["jpeg 70"]["margin_kept"] == pytest.approx(0.5)


def test_smooth_region_stands_apart_until_blurred(tmp_path, capsys):
    split = _write_split(tmp_path / "split")
    out = tmp_path / "trace.json"
    assert trace_survival.main(["--split", str(split), "--levels", "blur:7", "resize:0.5",
                                "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert list(results) == ["clean", "blur 7", "resize 0.5"]
    assert results["clean"]["separability"] > 0.95 and results["clean"]["images"] == 2
    # a 7x7 blur removes most of the grain around the region too
    assert results["blur 7"]["separability"] < results["clean"]["separability"]
    assert "| clean |" in capsys.readouterr().out


def test_bad_input_is_named(tmp_path):
    split = _write_split(tmp_path / "split")
    with pytest.raises(SystemExit):
        trace_survival.main(["--split", str(split), "--levels", "sharpen:3"])
    with pytest.raises(SystemExit):
        trace_survival.main(["--split", str(split), "--levels", "jpeg:55"])
    with pytest.raises(SystemExit, match="not a folder"):
        trace_survival.main(["--split", str(tmp_path / "missing")])
    only_real = tmp_path / "only_real"
    (only_real / "real").mkdir(parents=True)
    cv2.imwrite(str(only_real / "real" / "r.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(SystemExit, match="no labeled fake images|unlabeled|fake"):
        trace_survival.main(["--split", str(only_real)])
