"""DDL-I indexing and registration on generated trees (both folder spellings, flat test)."""
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from data_helpers import make_flat_split, make_labeled_split, random_rgb, write_image
from ddl_mask2former.data import (
    DDLDataError, load_ddl_split, read_image, read_image_size, register_ddl_split)
from ddl_mask2former.data import ddl_dataset


@pytest.mark.parametrize("mask_folder", ["masks", "mask"])
def test_labeled_split_index(tmp_path, mask_folder):
    expected = make_labeled_split(str(tmp_path / "train"), num_real=3, num_fake=4,
                                  mask_folder=mask_folder)
    dicts = load_ddl_split(str(tmp_path / "train"))
    assert {d["image_id"] for d in dicts} == set(expected)
    for d in dicts:
        label, (height, width) = expected[d["image_id"]]
        assert d["label"] == label
        assert (d["height"], d["width"]) == (height, width)
        assert read_image(d["file_name"]).shape == (height, width, 3)
        if label == 1:
            assert d["mask_file"] == os.path.join(str(tmp_path / "train"), mask_folder,
                                                  os.path.basename(d["file_name"]))
            assert os.path.isfile(d["mask_file"])
        else:
            assert "mask_file" not in d


def test_flat_unlabeled_split(tmp_path):
    names = make_flat_split(str(tmp_path / "test"), num_images=3)
    dicts = load_ddl_split(str(tmp_path / "test"))
    assert [d["image_id"] for d in dicts] == names
    assert all("label" not in d and "mask_file" not in d for d in dicts)
    assert [d["height"] for d in dicts] == [16, 17, 18]


def test_mask_matched_by_stem_when_extension_differs(tmp_path):
    split = tmp_path / "train"
    rng = np.random.default_rng(0)
    write_image(str(split / "fake" / "a.jpg"), random_rgb(rng, 12, 14), quality=95)
    write_image(str(split / "masks" / "a.png"), np.zeros((12, 14), np.uint8))
    (entry,) = load_ddl_split(str(split))
    assert entry["mask_file"] == str(split / "masks" / "a.png")


def test_hidden_files_are_ignored(tmp_path):
    make_labeled_split(str(tmp_path / "train"), num_real=1, num_fake=1)
    (tmp_path / "train" / "real" / ".DS_Store").write_bytes(b"\x00\x01")
    assert len(load_ddl_split(str(tmp_path / "train"))) == 2


@pytest.mark.parametrize("val_folder", ["val", "valid"])
def test_register_split_with_alternative_folders(tmp_path, val_folder):
    make_labeled_split(str(tmp_path / val_folder), num_real=2, num_fake=2)
    name = f"test_ddl_alt_{val_folder}"
    register_ddl_split(name, (str(tmp_path / "val"), str(tmp_path / "valid")), cache_dir=None)
    try:
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == 4
        assert all(d["file_name"].startswith(str(tmp_path / val_folder)) for d in dicts)
        assert MetadataCatalog.get(name).evaluator_type == "ddl"
        assert MetadataCatalog.get(name).ignore_label == 255
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_both_val_spellings_is_an_error(tmp_path):
    make_labeled_split(str(tmp_path / "val"), 1, 1)
    make_labeled_split(str(tmp_path / "valid"), 1, 1)
    with pytest.raises(DDLDataError, match="several folders"):
        ddl_dataset.resolve_split_dir(str(tmp_path), ["val", "valid"])


def test_builtin_splits_rooted_at_detectron2_datasets(tmp_path, monkeypatch):
    root = tmp_path / "data_root"
    make_labeled_split(str(root / "DDL-I" / "train"), 2, 1)
    make_labeled_split(str(root / "DDL-I" / "valid"), 1, 1, mask_folder="mask")
    make_flat_split(str(root / "DDL-I" / "test"), 2)
    names = list(ddl_dataset.BUILTIN_SPLITS)
    assert all(name in DatasetCatalog.list() for name in names)  # registered on import
    saved = {name: (DatasetCatalog[name], MetadataCatalog.get(name).as_dict()) for name in names}
    try:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
        monkeypatch.setenv("DDL_INDEX_CACHE", "off")
        ddl_dataset.register_all_ddl_i()
        assert len(DatasetCatalog.get("ddl_i_train")) == 3
        assert len(DatasetCatalog.get("ddl_i_val")) == 2
        assert len(DatasetCatalog.get("ddl_i_test")) == 2
        assert MetadataCatalog.get("ddl_i_val").split_dir == str(root / "DDL-I" / "valid")
    finally:
        for name, (loader, metadata) in saved.items():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
            DatasetCatalog.register(name, loader)
            metadata.pop("name", None)
            MetadataCatalog.get(name).set(**metadata)


def test_index_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    monkeypatch.setattr(ddl_dataset, "_CACHE_MIN_IMAGES", 0)
    split = str(tmp_path / "train")
    make_labeled_split(split, 2, 2)
    cache = tmp_path / "cache"
    first = load_ddl_split(split, cache_dir=str(cache))
    (cache_file,) = list(cache.iterdir())
    # Reading from the cache must not touch the images: make one unreadable and reload.
    calls = []
    monkeypatch.setattr(ddl_dataset, "read_folder_sizes", lambda *a: calls.append(a))
    assert load_ddl_split(split, cache_dir=str(cache)) == first
    assert calls == []
    monkeypatch.undo()
    monkeypatch.setattr(ddl_dataset, "_CACHE_MIN_IMAGES", 0)
    # Adding a file changes the folder's modification time, so the index is rebuilt.
    write_image(os.path.join(split, "real", "zz_new.png"), np.zeros((5, 6, 3), np.uint8))
    os.utime(os.path.join(split, "real"), ns=(1, 1))
    third = load_ddl_split(split, cache_dir=str(cache))
    assert len(third) == len(first) + 1
    assert len(list(cache.iterdir())) == 2 and cache_file.exists()


@pytest.mark.parametrize("orientation,expected", [(1, (10, 30)), (3, (10, 30)), (6, (30, 10)),
                                                  (8, (30, 10))])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_header_size_matches_decoded_size_with_exif(tmp_path, fmt, orientation, expected):
    path = str(tmp_path / f"img.{fmt.lower()}")
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.zeros((10, 30, 3), np.uint8)).save(path, fmt, exif=exif)
    assert read_image_size(path) == expected
    assert read_image(path).shape[:2] == expected


def test_header_size_of_bmp(tmp_path):
    path = str(tmp_path / "img.bmp")
    Image.fromarray(np.zeros((7, 9, 3), np.uint8)).save(path)
    assert read_image_size(path) == (7, 9)
