"""The robustness benchmark: each perturbation's definition (data/perturbations.py) on small
arrays, and tools/robustness.py on a tiny random-weight model and generated data (CPU)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import ddl_mask2former  # noqa: F401  (registers the model)
from ddl_mask2former.config import load_config
from ddl_mask2former.data.ddl_dataset import load_ddl_split
from ddl_mask2former.data.synthetic import generate_ddl_dataset
from ddl_mask2former.engine import Trainer
from ddl_mask2former.data.perturbations import (
    SWEEPS, gaussian_blur, jpeg_compress, level_key, output_size, parse_level, perturb, perturb_mask,
    resize_image, resize_mask, resized_size)
from tool_helpers import load_tool

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "tests" / "configs" / "tiny.yaml"
ROBUSTNESS = REPO / "tools" / "robustness.py"
METRIC_KEYS = {"auc", "f1", "iou", "score", "real_false_alarm", "num_real", "num_fake"}
ONE_LEVEL_EACH = ["jpeg:90", "blur:3", "noise:3", "resize:0.5", "chain:resize0.5+jpeg75"]


def _gradient(height=64, width=80):
    """A smooth RGB image (JPEG's easy case)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    return np.stack([40 + 2 * xs, 60 + 2 * ys, 128 + 40 * np.sin(xs / 9) * np.cos(ys / 7)],
                    axis=2).clip(0, 255).astype(np.uint8)


def _textured(seed=0, height=48, width=56):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ---- definitions ---------------------------------------------------------------------------------

def test_sweeps_are_the_benchmark_levels():
    assert {kind: sorted(levels) for kind, levels in SWEEPS.items() if kind != "chain"} == {
        "jpeg": [50, 60, 70, 80, 90, 100], "blur": [3, 7, 11, 15, 19, 23],
        "noise": [3, 7, 11, 15, 19, 23], "resize": [0.25, 0.5, 0.78]}
    assert SWEEPS["chain"] == ("resize0.5+jpeg75",)
    assert [level_key(level) for level in SWEEPS["resize"]] == ["0.78", "0.5", "0.25"]


def test_jpeg_100_is_nearly_lossless_and_quality_orders_the_loss():
    image = _gradient()
    errors = {}
    for quality in (100, 90, 50):
        out = jpeg_compress(image, quality)
        assert out.dtype == np.uint8 and out.shape == image.shape
        errors[quality] = np.abs(out.astype(int) - image).mean()
    assert errors[100] < 1.0
    assert errors[100] < errors[90] < errors[50]
    # The definition: OpenCV encode (BGR) at that quality, decode.
    ok, encoded = cv2.imencode(".jpg", image[:, :, ::-1].copy(), [cv2.IMWRITE_JPEG_QUALITY, 70])
    assert ok
    assert np.array_equal(perturb(image, "jpeg", 70), cv2.imdecode(encoded, cv2.IMREAD_COLOR)[:, :, ::-1])


def test_blur_is_opencv_gaussian_blur_with_its_default_sigma():
    image = _textured()
    for k in SWEEPS["blur"]:
        assert np.array_equal(perturb(image, "blur", k), cv2.GaussianBlur(image, (k, k), 0))
    # k = 3: OpenCV's fixed kernel (1, 2, 1) / 4 in each direction.
    impulse = np.zeros((9, 9, 3), np.uint8)
    impulse[4, 4] = 160
    response = gaussian_blur(impulse, 3)[3:6, 3:6, 0]
    assert np.array_equal(response, [[10, 20, 10], [20, 40, 20], [10, 20, 10]])
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(image, 4)


def test_noise_variance_is_the_level_in_8bit_units():
    gray = np.full((256, 256, 3), 128, np.uint8)
    for variance in (3, 23):
        out = perturb(gray, "noise", variance, np.random.default_rng(0))
        difference = out.astype(np.float64) - 128  # no clipping this far from 0 and 255
        # rounding to integers adds about 1/12 to the variance
        assert difference.var() == pytest.approx(variance + 1 / 12, rel=0.03)
        assert abs(difference.mean()) < 0.05
        assert np.array_equal(difference, np.rint(difference))
    bright = perturb(np.full((64, 64), 250, np.uint8), "noise", 23, np.random.default_rng(0))
    assert bright.dtype == np.uint8 and bright.max() == 255  # clipped, not wrapped
    with pytest.raises(ValueError, match="rng"):
        perturb(gray, "noise", 3, None)


def test_fixed_seed_gives_the_same_output():
    image = _textured()
    first = perturb(image, "noise", 11, np.random.default_rng(7))
    assert np.array_equal(first, perturb(image, "noise", 11, np.random.default_rng(7)))
    assert not np.array_equal(first, perturb(image, "noise", 11, np.random.default_rng(8)))
    for kind in ("jpeg", "blur", "resize", "chain"):
        level = SWEEPS[kind][0]
        assert np.array_equal(perturb(image, kind, level), perturb(image, kind, level))
    # The tool's generator depends on the seed and the image only (not on the order or process).
    robustness = load_tool("robustness")
    draw = lambda seed, image_id: robustness.noise_rng(seed, "noise", image_id).standard_normal(4)  # noqa: E731
    assert np.array_equal(draw(0, "fake/a.png"), draw(0, "fake/a.png"))
    assert not np.array_equal(draw(0, "fake/a.png"), draw(0, "fake/b.png"))
    assert not np.array_equal(draw(0, "fake/a.png"), draw(1, "fake/a.png"))


def test_resize_uses_inter_area_and_rounds_half_up():
    image = _textured(height=96, width=80)
    assert resized_size(96, 80, 0.78) == (75, 62)  # 74.88, 62.4
    assert resized_size(95, 3, 0.5) == (48, 2)  # 47.5 and 1.5 round up
    assert resized_size(3, 3, 0.25) == (1, 1)
    for factor in SWEEPS["resize"]:
        height, width = resized_size(96, 80, factor)
        out = perturb(image, "resize", factor)
        assert out.shape == (height, width, 3) and output_size("resize", factor, 96, 80) == (height, width)
        assert np.array_equal(out, cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA))


def _sampled_pixels(old, new):
    """The input pixel that each of ``new`` output pixels takes, with a checked rule: the one under
    the output pixel's centre, floor((i + 0.5) * old / new); a centre on a pixel boundary may
    take either neighbour (OpenCV and Pillow round their fixed-point scale either way)."""
    ramp = np.arange(old, dtype=np.uint16)[:, None].repeat(2, axis=1)
    taken = resize_mask(ramp, new, 2)[:, 0].astype(int)
    numerator = (2 * np.arange(new) + 1) * old
    centre = np.minimum(numerator // (2 * new), old - 1)
    on_boundary = numerator % (2 * new) == 0
    assert np.array_equal(taken[~on_boundary], centre[~on_boundary])
    assert np.isin(taken[on_boundary] - centre[on_boundary], (-1, 0)).all()
    return taken


def test_resized_mask_is_nearest_neighbour_at_pixel_centres_and_binary():
    rng = np.random.default_rng(0)
    mask = np.zeros((96, 80), bool)
    mask[10:50, 20:61] = True
    mask |= rng.random(mask.shape) < 0.05
    for kind, level in (("resize", 0.78), ("resize", 0.25), ("chain", "resize0.5+jpeg75")):
        size = output_size(kind, level, 96, 80)
        resized = perturb_mask(mask, kind, level, size)
        assert resized.dtype == bool and resized.shape == size
        rows, cols = _sampled_pixels(96, size[0]), _sampled_pixels(80, size[1])
        assert np.array_equal(resized, mask[rows][:, cols])
        gray = perturb_mask(mask.astype(np.uint8) * 255, kind, level)
        assert gray.dtype == np.uint8 and set(np.unique(gray)) <= {0, 255}
    for kind in ("jpeg", "blur", "noise"):
        same = perturb_mask(mask, kind, SWEEPS[kind][0], mask.shape)
        assert np.array_equal(same, mask) and same is not mask


def _small_regions(rng, size=256, count=6):
    mask = np.zeros((size, size), bool)
    for _ in range(count):
        h, w = rng.integers(8, 41, 2)
        y, x = rng.integers(0, size - 40, 2)
        mask[y:y + h, x:x + w] = True
    return mask


def test_resized_mask_stays_on_its_resized_image():
    # A perfect predictor marks the output pixels that the region covers for the most part (the
    # INTER_AREA-resized indicator above one half); the resized mask must score it near 1.
    # INTER_NEAREST's top-left sampling shifted the mask by 3/8 of an output pixel: mean IoU
    # 0.78 here, against 0.93 at pixel centres.
    rng = np.random.default_rng(3)
    ious = []
    for _ in range(40):
        mask = _small_regions(rng)
        resized = perturb_mask(mask, "resize", 0.25)
        perfect = perturb(mask.astype(np.uint8) * 255, "resize", 0.25) > 127
        ious.append((resized & perfect).sum() / (resized | perfect).sum())
    assert np.mean(ious) > 0.9


def test_one_mask_resizing_rule_in_training_and_benchmark():
    # The training rescale, detectron2's Pillow-NEAREST resize (the base-scale resize) and the
    # benchmark's perturb_mask sample the same pixels.
    from PIL import Image
    from ddl_mask2former.data.augmentations import RescaleTransform

    rng = np.random.default_rng(1)
    for _ in range(20):
        h, w = (int(v) for v in rng.integers(5, 120, 2))
        new_h, new_w = (int(v) for v in rng.integers(1, 240, 2))
        mask = (rng.random((h, w)) < 0.4).astype(np.uint8)
        ours = resize_mask(mask, new_h, new_w)
        assert np.array_equal(RescaleTransform(h, w, new_h, new_w).apply_segmentation(mask), ours)
        assert np.array_equal(np.asarray(Image.fromarray(mask).resize((new_w, new_h), Image.NEAREST)), ours)


def test_imdl_benco_convention_reproduces_its_jpeg_and_noise():
    image = _gradient(64, 80)
    # JPEG: quality q - 1 or q, drawn from the generator; the RGB array goes to the BGR encoder as it is.
    qualities = set()
    for seed in range(12):
        out = perturb(image, "jpeg", 90, np.random.default_rng(seed), convention="imdl-benco")
        quality = int(np.random.default_rng(seed).integers(89, 91))
        qualities.add(quality)
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert np.array_equal(out, cv2.imdecode(encoded, cv2.IMREAD_COLOR))
    assert qualities == {89, 90}
    assert not np.array_equal(perturb(image, "jpeg", 90, np.random.default_rng(0), convention="imdl-benco"),
                              perturb(image, "jpeg", 90))
    # Noise: truncated, not rounded: about half a grey level darker on a flat image.
    flat = np.full((200, 200, 3), 128, np.uint8)
    ours = perturb(flat, "noise", 11, np.random.default_rng(1)).astype(float).mean()
    benco = perturb(flat, "noise", 11, np.random.default_rng(1), convention="imdl-benco").astype(float).mean()
    assert abs(ours - 128) < 0.05 and 0.4 < ours - benco < 0.6
    # Blur and resize are the same definitions.
    for kind, level in (("blur", 7), ("resize", 0.5)):
        assert np.array_equal(perturb(image, kind, level, convention="imdl-benco"), perturb(image, kind, level))
    with pytest.raises(ValueError, match="unknown perturbation convention"):
        perturb(image, "blur", 3, convention="albumentations")


def test_chain_is_resize_half_then_jpeg_75():
    image = _gradient(63, 81)
    expected = jpeg_compress(resize_image(image, 0.5), 75)
    out = perturb(image, "chain", "resize0.5+jpeg75")
    assert out.shape == (32, 41, 3) and np.array_equal(out, expected)


def test_parse_level_names_the_known_levels():
    assert parse_level("jpeg", "90") == 90 and parse_level("jpeg", "90.0") == 90
    assert parse_level("resize", "0.5") == 0.5
    assert parse_level("chain", "resize0.5+jpeg75") == "resize0.5+jpeg75"
    with pytest.raises(ValueError, match=r"unknown level '55' for jpeg \(levels: 100, 90, 80"):
        parse_level("jpeg", "55")
    with pytest.raises(ValueError, match="unknown perturbation 'sharpen'"):
        parse_level("sharpen", "1")


# ---- the tool ------------------------------------------------------------------------------------

def test_command_line_lists_end_at_config_overrides():
    robustness = load_tool("robustness")
    args = robustness.parse_args(["--config-file", "c.yaml", "--split", "s", "--output", "o",
                                  "--perturbations", "jpeg", "--levels", "jpeg:90,70",
                                  "MODEL.WEIGHTS", "w.pth", "OUTPUT_DIR", "x"])
    assert args.perturbations == ["jpeg"] and args.levels == ["jpeg:90,70"]
    assert args.opts == ["MODEL.WEIGHTS", "w.pth", "OUTPUT_DIR", "x"]
    plan = robustness.build_plan(None, ["resize:0.5", "jpeg:70,90"])
    assert plan == {"jpeg": [90, 70], "resize": [0.5]}
    assert robustness.build_plan(["noise", "jpeg"], None) == {"jpeg": list(SWEEPS["jpeg"]),
                                                              "noise": list(SWEEPS["noise"])}
    assert list(robustness.build_plan(None, None)) == list(SWEEPS)


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    """A generated DDL-I val split of 4 images (2 real, 2 fake, 64-96 px)."""
    root = tmp_path_factory.mktemp("robustness_data")
    generate_ddl_dataset(str(root / "DDL-I"), 4, 4, seed=0, min_size=64, max_size=96, workers=1)
    return root / "DDL-I" / "val"


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A randomly initialized tiny model saved as a checkpoint."""
    torch.manual_seed(0)
    model = Trainer.build_model(load_config(str(TINY_CONFIG)))
    path = tmp_path_factory.mktemp("robustness_weights") / "random.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.mark.parametrize("extra, message", [
    (["--levels", "jpeg:55"], "unknown level '55' for jpeg (levels: 100, 90, 80, 70, 60, 50)"),
    (["--perturbations", "sharpen"], "unknown perturbation 'sharpen' in --perturbations"),
    (["--perturbations", "blur", "--levels", "jpeg:90"], "jpeg is not among --perturbations"),
    (["--levels", "jpeg"], "expected KIND:LEVEL"),
    (["MODEL.WEIGHTS", "missing.pth"], "MODEL.WEIGHTS file not found: missing.pth"),
    (["MODEL.WEIGHTS", ""], "no weights"),
    (["MODEL.NOT_A_KEY", "1"], "bad config override"),
])
def test_bad_input_fails_clearly_before_writing(tiny_split, random_weights, tmp_path, monkeypatch, extra,
                                                message):
    robustness = load_tool("robustness")
    monkeypatch.chdir(tmp_path)
    argv = ["--config-file", str(TINY_CONFIG), "--split", str(tiny_split), "--output", "out"]
    if not any(arg.startswith("MODEL.") for arg in extra):
        extra = extra + ["MODEL.WEIGHTS", str(random_weights)]
    with pytest.raises(SystemExit) as raised:
        robustness.main(argv + extra)
    assert message in str(raised.value.code)
    assert not (tmp_path / "out").exists()


def test_missing_or_unlabeled_split_fails_clearly(random_weights, tmp_path, monkeypatch):
    robustness = load_tool("robustness")
    monkeypatch.setenv("DDL_INDEX_CACHE", "off")
    common = ["--config-file", str(TINY_CONFIG), "--output", str(tmp_path / "out"),
              "MODEL.WEIGHTS", str(random_weights)]
    with pytest.raises(SystemExit, match="--split folder not found: .*nowhere"):
        robustness.main(["--split", str(tmp_path / "nowhere")] + common)
    flat = tmp_path / "flat"
    flat.mkdir()
    cv2.imwrite(str(flat / "a.png"), _gradient())
    with pytest.raises(SystemExit, match="flat, unlabeled"):
        robustness.main(["--split", str(flat)] + common)
    (tmp_path / "no_masks" / "fake").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "no_masks" / "fake" / "a.png"), _gradient())
    with pytest.raises(SystemExit, match="fake image has no mask"):
        robustness.main(["--split", str(tmp_path / "no_masks")] + common)
    assert not (tmp_path / "out").exists()


def test_perturbed_copy_is_a_valid_split_with_masks_that_follow(tiny_split, tmp_path):
    robustness = load_tool("robustness")
    dicts = load_ddl_split(str(tiny_split))
    copy = tmp_path / "resize"
    robustness.write_perturbed_split(dicts, str(copy), "resize", 0.5, seed=0, mask_threshold=127)
    perturbed = {d["image_id"]: d for d in load_ddl_split(str(copy))}  # sizes of masks checked here
    assert sorted(perturbed) == sorted(d["image_id"] for d in dicts)
    for original in dicts:
        new = perturbed[original["image_id"]]
        assert (new["height"], new["width"]) == resized_size(original["height"], original["width"], 0.5)
        if original["label"] == 1:
            mask = cv2.imread(new["mask_file"], cv2.IMREAD_UNCHANGED)
            assert set(np.unique(mask)) <= {0, 255}
    # Photometric kinds copy the masks unchanged; the same seed writes the same pixels.
    for name in ("noise_a", "noise_b"):
        robustness.write_perturbed_split(dicts, str(tmp_path / name), "noise", 23, seed=0, mask_threshold=127)
    fake = next(d for d in dicts if d["label"] == 1)
    mask_name = os.path.basename(fake["mask_file"])
    assert (tmp_path / "noise_a" / "masks" / mask_name).read_bytes() == Path(fake["mask_file"]).read_bytes()
    image_name = os.path.basename(fake["image_id"])
    assert (tmp_path / "noise_a" / "fake" / image_name).read_bytes() == \
        (tmp_path / "noise_b" / "fake" / image_name).read_bytes()


@pytest.mark.slow
def test_end_to_end_on_a_tiny_model(tiny_split, random_weights, tmp_path):
    env = dict(os.environ, DDL_INDEX_CACHE="off", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(ROBUSTNESS), "--config-file", str(TINY_CONFIG), "--split", str(tiny_split),
         "--output", "out", "--levels", *ONE_LEVEL_EACH, "MODEL.WEIGHTS", str(random_weights)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"STDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-4000:]}"
    out = tmp_path / "out"
    results = json.loads((out / "robustness.json").read_text())
    assert list(results) == ["clean", "jpeg", "blur", "noise", "resize", "chain"]
    assert {kind: list(levels) for kind, levels in results.items() if kind != "clean"} == {
        "jpeg": ["90"], "blur": ["3"], "noise": ["3"], "resize": ["0.5"], "chain": ["resize0.5+jpeg75"]}
    every = [results["clean"]] + [m for kind, levels in results.items() if kind != "clean"
                                  for m in levels.values()]
    for metrics in every:
        assert set(metrics) == METRIC_KEYS
        assert (metrics["num_real"], metrics["num_fake"]) == (2, 2)
        for key in METRIC_KEYS - {"num_real", "num_fake"}:
            assert 0.0 <= metrics[key] <= 1.0, (key, metrics)
    picture = cv2.imread(str(out / "robustness.png"))
    assert picture is not None and picture.shape[1] > picture.shape[0]
    progress = [line for line in result.stdout.splitlines() if re.match(r"\[\d+/6\] .*; ETA ", line)]
    assert len(progress) == 6 and progress[0].startswith("[1/6] clean") and progress[-1].startswith("[6/6] chain")
    assert f"wrote {out / 'robustness.json'} and {out / 'robustness.png'}" in result.stdout
    assert not (out / "images").exists()  # scratch copies deleted once scored
    assert (out / "inference" / "robustness_resize_0.5" / "ddl_metrics.json").exists()
    assert not list(out.glob("*.tmp*"))
    # the terminal shows progress, not detectron2's log, which goes to the file in full
    assert "Environment info" not in result.stdout and len(result.stdout.splitlines()) < 20
    assert "Environment info" in (out / "log.txt").read_text()
