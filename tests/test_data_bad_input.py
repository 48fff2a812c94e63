"""Every bad-input case of the DDL data pipeline gives a DDLDataError naming the file."""
import logging
import os

import numpy as np
import pytest
from PIL import Image

from data_helpers import make_labeled_split, random_rgb, write_image
from ddl_mask2former.data import (
    BaseScaleResize, DDLDataError, DDLDatasetMapper, load_ddl_split, read_forgery_mask,
    read_image, read_image_size)


def _error(callable_, *args):
    with pytest.raises(DDLDataError) as info:
        callable_(*args)
    return info.value


def _truncate(path, keep_fraction=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[: int(len(data) * keep_fraction)])


@pytest.fixture
def split(tmp_path):
    root = str(tmp_path / "train")
    make_labeled_split(root, num_real=2, num_fake=2)
    return root


def test_truncated_png_is_caught_by_the_index_and_by_decoding(split):
    path = os.path.join(split, "real", "img_000.png")
    _truncate(path)
    error = _error(load_ddl_split, split)
    assert error.bad_files == [(path, error.bad_files[0][1])] and "truncated" in str(error)
    assert f"{path}: " in str(error)
    assert path in str(_error(read_image, path))


def test_truncated_jpeg(tmp_path):
    path = write_image(str(tmp_path / "a.jpg"), random_rgb(np.random.default_rng(0), 64, 64))
    _truncate(path, 0.6)
    assert "truncated" in str(_error(read_image_size, path))
    assert path in str(_error(read_image, path))


def test_corrupt_pixel_data_is_named_when_decoded(tmp_path):
    # The header and end marker are intact, so only decoding can tell.
    path = write_image(str(tmp_path / "a.png"), random_rgb(np.random.default_rng(0), 32, 32))
    data = bytearray(open(path, "rb").read())
    start = data.index(b"IDAT") + 8
    data[start:start + 200] = b"\x00" * 200
    open(path, "wb").write(bytes(data))
    assert read_image_size(path) == (32, 32)
    error = _error(read_image, path)
    assert error.path == path and "cannot decode" in str(error)


@pytest.mark.parametrize("content", [b"just some notes\n", b"", b"\x89PNG\r\n\x1a\n\x00"])
def test_non_image_empty_or_cut_header_file_in_split(split, content):
    path = os.path.join(split, "fake", "notes.txt")
    open(path, "wb").write(content)
    error = _error(load_ddl_split, split)
    assert error.path == path


def test_fake_without_mask(split):
    os.remove(os.path.join(split, "masks", "img_003.png"))
    error = _error(load_ddl_split, split)
    assert error.path == os.path.join(split, "fake", "img_003.png")
    assert "no mask" in str(error)


def test_fakes_without_any_mask_folder(split):
    for name in os.listdir(os.path.join(split, "masks")):
        os.remove(os.path.join(split, "masks", name))
    os.rmdir(os.path.join(split, "masks"))
    assert "no mask" in str(_error(load_ddl_split, split))


def test_mask_without_image(split):
    orphan = write_image(os.path.join(split, "masks", "img_999.png"), np.zeros((4, 4), np.uint8))
    error = _error(load_ddl_split, split)
    assert error.path == orphan and "without a fake image" in str(error)


def test_mask_of_a_real_image_hints_at_mislabeling(split):
    mask = write_image(os.path.join(split, "masks", "img_000.png"), np.zeros((20, 30), np.uint8))
    error = _error(load_ddl_split, split)
    assert error.path == mask and "mislabeled" in str(error)


def test_mask_size_differs_from_image(split):
    mask = write_image(os.path.join(split, "masks", "img_003.png"), np.zeros((5, 5), np.uint8))
    error = _error(load_ddl_split, split)
    assert error.path == mask
    assert "5x5" in str(error) and "img_003.png" in str(error)


def test_mask_size_checked_again_when_reading(tmp_path):
    image = write_image(str(tmp_path / "fake.png"), random_rgb(np.random.default_rng(0), 10, 12))
    mask = write_image(str(tmp_path / "mask.png"), np.zeros((10, 10), np.uint8))
    mapper = DDLDatasetMapper(True, augmentations=[])
    error = _error(mapper, {"file_name": image, "label": 1, "mask_file": mask})
    assert error.path == mask


def test_both_mask_folders_is_an_error(split):
    write_image(os.path.join(split, "mask", "img_003.png"), np.zeros((20, 30), np.uint8))
    assert "both masks/ and mask/" in str(_error(load_ddl_split, split))


@pytest.mark.parametrize("layout", ["no_folder", "empty_folder", "empty_real_fake"])
def test_missing_or_empty_split(tmp_path, layout):
    root = tmp_path / "val"
    if layout != "no_folder":
        root.mkdir()
    if layout == "empty_real_fake":
        (root / "real").mkdir()
        (root / "fake").mkdir()
    error = _error(load_ddl_split, str(root))
    assert error.path == str(root)
    assert ("does not exist" if layout == "no_folder" else "empty split") in str(error)


def test_unexpected_folders_and_loose_files(split):
    os.makedirs(os.path.join(split, "real", "nested"))
    error = _error(load_ddl_split, split)
    assert error.path == os.path.join(split, "real", "nested")
    os.rmdir(os.path.join(split, "real", "nested"))
    loose = write_image(os.path.join(split, "stray.png"), np.zeros((4, 4, 3), np.uint8))
    assert _error(load_ddl_split, split).path == loose
    os.remove(loose)
    os.makedirs(os.path.join(split, "extra"))
    assert _error(load_ddl_split, split).path == os.path.join(split, "extra")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "1", "I;16", "CMYK"])
def test_image_modes_convert_to_rgb(tmp_path, mode):
    rgb = random_rgb(np.random.default_rng(1), 9, 11)
    if mode == "I;16":
        gray = rgb[:, :, 0]
        image = Image.fromarray(gray.astype(np.uint16) * 257)
        expected = np.repeat(gray[:, :, None], 3, axis=2)
    else:
        image = Image.fromarray(rgb).convert(mode)
        expected = np.asarray(image.convert("RGB"))
    path = str(tmp_path / ("img.jpg" if mode == "CMYK" else "img.png"))
    image.save(path)
    decoded = read_image(path)
    assert decoded.dtype == np.uint8 and decoded.shape == (9, 11, 3)
    if mode == "CMYK":
        assert np.abs(decoded.astype(int) - expected.astype(int)).mean() < 8  # lossy JPEG
    else:
        np.testing.assert_array_equal(decoded, expected)
    if mode == "RGBA":
        np.testing.assert_array_equal(decoded, rgb)  # alpha dropped, colour kept


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[0, 0] = (255, 0, 0)  # red top-left marker
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = str(tmp_path / "img.png")
    Image.fromarray(pixels).save(path, exif=exif)
    decoded = read_image(path)
    assert decoded.shape == (6, 4, 3)
    assert tuple(decoded[0, -1]) == (255, 0, 0)  # top-left moved to top-right
    assert tuple(read_image(path, format="BGR")[0, -1]) == (0, 0, 255)


def test_mask_threshold_and_zero_one_mask_warning(tmp_path, caplog):
    values = np.array([[0, 127, 128, 255]], np.uint8)
    path = write_image(str(tmp_path / "m.png"), values)
    np.testing.assert_array_equal(read_forgery_mask(path), [[False, False, True, True]])
    np.testing.assert_array_equal(read_forgery_mask(path, threshold=0), [[False, True, True, True]])
    zero_one = write_image(str(tmp_path / "m01.png"), np.array([[0, 1, 1]], np.uint8))
    with caplog.at_level(logging.WARNING):
        assert not read_forgery_mask(zero_one).any()
    assert zero_one in caplog.text


def test_missing_file_is_named(tmp_path):
    path = str(tmp_path / "nope.png")
    assert _error(read_image, path).path == path
    assert _error(read_image_size, path).path == path


def test_decoded_size_differs_from_index(tmp_path):
    path = write_image(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    mapper = DDLDatasetMapper(False, augmentations=[BaseScaleResize((16, 16))])
    error = _error(mapper, {"file_name": path, "height": 9, "width": 8, "image_id": "a"})
    assert error.path == path and "indexed size" in str(error)


def test_training_needs_labels(tmp_path):
    path = write_image(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    mapper = DDLDatasetMapper(True, augmentations=[])
    assert "no 'label'" in str(_error(mapper, {"file_name": path}))


def test_skip_bad_samples_logs_and_counts(tmp_path, caplog):
    good = write_image(str(tmp_path / "good.png"), np.zeros((8, 8, 3), np.uint8))
    bad = str(tmp_path / "bad.png")
    open(bad, "wb").write(b"not a png")
    mapper = DDLDatasetMapper(True, augmentations=[], skip_bad_samples=True)
    with caplog.at_level(logging.WARNING):
        assert mapper({"file_name": bad, "label": 0}) is None
        assert mapper({"file_name": good, "label": 0})["forgery_mask"].sum() == 0
        assert mapper({"file_name": bad, "label": 1, "mask_file": bad}) is None
    assert mapper.num_skipped == 2
    assert caplog.text.count(bad) >= 2 and "2 skipped" in caplog.text
    # Without the option (and always at inference) the error propagates.
    strict = DDLDatasetMapper(False, augmentations=[], skip_bad_samples=True)
    assert _error(strict, {"file_name": bad}).path == bad


def test_rgb_mask_reads_as_luminance(tmp_path):
    # A colour mask reads as luminance; white regions stay forged.
    rgb_mask = np.zeros((6, 6, 3), np.uint8)
    rgb_mask[:3] = 255
    path = write_image(str(tmp_path / "rgb_mask.png"), rgb_mask)
    np.testing.assert_array_equal(read_forgery_mask(path), rgb_mask[:, :, 0] > 127)


def _two_broken_files(split):
    """An empty PNG (a real image) and a truncated one (a fake's mask): both unreadable."""
    empty = os.path.join(split, "real", "img_000.png")
    open(empty, "wb").close()
    truncated = os.path.join(split, "masks", "img_003.png")
    _truncate(truncated)
    return empty, truncated


def test_index_names_every_unreadable_file_at_once(split):
    empty, truncated = _two_broken_files(split)
    error = _error(load_ddl_split, split)
    assert [path for path, _ in error.bad_files] == [empty, truncated]
    message = str(error)
    assert "2 unreadable file(s)" in message and empty in message and truncated in message
    assert "empty file" in message and "truncated" in message
    assert "DATALOADER.SKIP_BAD_SAMPLES True" in message


def test_skip_bad_samples_leaves_unreadable_files_out_of_the_index_and_lists_them(split, tmp_path, caplog):
    from ddl_mask2former.data.ddl_dataset import BAD_FILES_NAME, bad_file_policy, read_bad_files
    from ddl_mask2former.engine.trainer import BadFilesReport

    empty, truncated = _two_broken_files(split)
    report_dir = str(tmp_path / "output")
    with caplog.at_level(logging.WARNING), bad_file_policy(skip=True, report_dir=report_dir):
        dicts = load_ddl_split(split)
    # The real image and the fake whose mask is unreadable are out; the other two stay.
    assert sorted(d["image_id"] for d in dicts) == ["fake/img_002.png", "real/img_001.png"]
    assert "2 unreadable file(s) left out" in caplog.text and "2 sample(s) dropped" in caplog.text
    assert read_bad_files(report_dir) == {"index": sorted([empty, truncated])}
    # Outside the policy the same split stops again.
    assert _error(load_ddl_split, split).bad_files
    # A file that decodes badly later, in training, is counted in the same list and reported at the end.
    corrupt = write_image(str(tmp_path / "corrupt.png"), random_rgb(np.random.default_rng(0), 32, 32))
    data = bytearray(open(corrupt, "rb").read())
    start = data.index(b"IDAT") + 8
    data[start:start + 200] = b"\x00" * 200
    open(corrupt, "wb").write(bytes(data))
    mapper = DDLDatasetMapper(True, augmentations=[], skip_bad_samples=True, bad_files_dir=report_dir)
    assert mapper({"file_name": corrupt, "label": 0, "height": 32, "width": 32}) is None
    assert read_bad_files(report_dir)["training"] == [corrupt]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        BadFilesReport(report_dir).after_train()
    assert "2 file(s) when indexing, 1 sample(s) during training" in caplog.text
    assert os.path.join(report_dir, BAD_FILES_NAME) in caplog.text
