"""Synthetic DDL-format data: determinism, valid layout, subtle non-empty forgeries."""
import hashlib
import importlib.util
import json
import os

import cv2
import numpy as np
import pytest

from ddl_mask2former.data import load_ddl_split, read_forgery_mask, read_image
from ddl_mask2former.data.synthetic import (
    FORGERY_TYPES, generate_ddl_dataset, load_source_photos, make_fake_image, make_real_image)

SIZE = {"min_size": 32, "max_size": 64}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digest(root):
    """Hash of every file's relative path and bytes under ``root``."""
    digest = hashlib.sha256()
    for folder, _dirs, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode())
            digest.update(open(path, "rb").read())
    return digest.hexdigest()


def test_same_seed_same_bytes_regardless_of_workers(tmp_path):
    generate_ddl_dataset(str(tmp_path / "a"), 10, 4, num_test=4, seed=5, workers=1, **SIZE)
    generate_ddl_dataset(str(tmp_path / "b"), 10, 4, num_test=4, seed=5, workers=2, **SIZE)
    generate_ddl_dataset(str(tmp_path / "c"), 10, 4, num_test=4, seed=6, workers=1, **SIZE)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


@pytest.mark.parametrize("val_folder,mask_folder", [("val", "masks"), ("valid", "mask")])
def test_layout_is_a_valid_ddl_tree(tmp_path, val_folder, mask_folder):
    out = str(tmp_path / "syn")
    generate_ddl_dataset(out, 12, 6, num_test=5, seed=1, val_folder=val_folder,
                         mask_folder=mask_folder, **SIZE)
    train = load_ddl_split(os.path.join(out, "train"))
    val = load_ddl_split(os.path.join(out, val_folder))
    assert len(train) == 12 and sum(d["label"] for d in train) == 6
    assert len(val) == 6 and sum(d["label"] for d in val) == 3
    for d in train + val:
        assert 32 <= d["height"] <= 64 and 32 <= d["width"] <= 64
        if d["label"] == 1:
            assert os.path.dirname(d["mask_file"]).endswith(mask_folder)
            raw = read_image(d["mask_file"])
            assert set(np.unique(raw)) <= {0, 255}
            assert read_forgery_mask(d["mask_file"]).any()
    # The test split is flat and unlabeled; its answers live outside it.
    test_dir = os.path.join(out, "test")
    assert all(name.endswith(".png") for name in os.listdir(test_dir))
    test = load_ddl_split(test_dir)
    assert len(test) == 5 and all("label" not in d for d in test)
    answers = [json.loads(line) for line in
               open(os.path.join(out, "test_answers", "manifest_test.jsonl"))]
    fake_names = sorted(a["file"] for a in answers if a["label"] == 1)
    assert sorted(os.listdir(os.path.join(out, "test_answers", mask_folder))) == fake_names
    # File names do not reveal labels.
    assert not any(w in d["image_id"].split("/")[-1] for d in train for w in ("real", "fake"))


@pytest.mark.parametrize("forgery_type", FORGERY_TYPES)
def test_each_forgery_type_is_local_and_textured(forgery_type):
    photos = load_source_photos()
    for index in range(3):
        rng = np.random.default_rng([7, index])
        image, mask, meta = make_fake_image(rng, photos, 96, 160, forgery_type=forgery_type)
        assert meta["forgery_type"] == forgery_type
        assert image.dtype == np.uint8 and image.shape[:2] == mask.shape
        assert 0 < mask.mean() < 0.9
        # Never a flat colour: the forged pixels keep texture.
        forged = image[mask].astype(np.float32)
        assert forged.std(axis=0).min() > 2.0


def test_real_images_vary_in_size_and_source():
    photos = load_source_photos()
    shapes, sources = set(), set()
    for index in range(12):
        image, meta = make_real_image(np.random.default_rng([3, index]), photos, 256, 768)
        assert 256 <= min(image.shape[:2]) and max(image.shape[:2]) <= 768
        shapes.add(image.shape)
        sources.add(meta["source"])
    assert len(shapes) == 12 and len(sources) >= 4


def test_cli_prints_where_and_counts(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "make_synthetic_ddl", os.path.join(REPO, "datasets", "make_synthetic_ddl.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = str(tmp_path / "cli")
    cli.main(["--out", out, "--num-train", "4", "--num-val", "2", "--num-test", "2",
              "--min-size", "32", "--max-size", "40", "--workers", "1"])
    printed = capsys.readouterr().out
    assert f"wrote {os.path.join(out, 'train')}: 4 labeled images (2 real, 2 fake)" in printed
    assert f"wrote {os.path.join(out, 'test')}: 2 unlabeled images" in printed
    assert f"8 images under {out}" in printed
    with pytest.raises(SystemExit):
        cli.main(["--out", out, "--num-train", "-1"])


@pytest.mark.parametrize("forgery_type", FORGERY_TYPES)
def test_forgery_changes_the_masked_region_only(forgery_type):
    # With the same seed a fake starts from the same view a real image would show.
    photos = load_source_photos()
    inside, outside = [], []
    for index in range(4):
        real, _ = make_real_image(np.random.default_rng([11, index]), photos, 96, 160)
        fake, mask, _ = make_fake_image(np.random.default_rng([11, index]), photos, 96, 160,
                                        forgery_type=forgery_type)
        assert real.shape == fake.shape
        difference = np.abs(fake.astype(np.float32) - real.astype(np.float32)).mean(axis=2)
        # Feathered blending reaches a few pixels past the mask's edge.
        near = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        inside.append(difference[mask].mean())
        outside.append(difference[~near].mean())
    # Away from the mask only the camera step (noise, JPEG quality) differs.
    assert np.mean(outside) < 6.0
    assert np.mean(inside) > 2.0 * np.mean(outside)
