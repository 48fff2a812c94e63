"""DDL-I dataset index and detectron2 registration.

Layout (see datasets/README.md)::

    <split>/real/*.png      label 0
    <split>/fake/*.png      label 1
    <split>/masks/*.png     one per fake, same file name (or same stem, .png); "mask/" also accepted
    <test>/*.png            flat and unlabeled

``load_ddl_split(split_dir)`` builds the list of dataset dicts without decoding any image:
sizes come from file headers (``image_header.read_image_size``). Each dict has
``file_name``, ``image_id`` (path relative to the split folder), ``height``, ``width``, and
for labeled splits ``label`` (0 real, 1 fake) and, for fakes, ``mask_file``.

Any inconsistency stops indexing with a DDLDataError that names the file: a fake without a
mask, a mask without a fake, a mask whose size differs from its image, an unexpected subfolder,
an empty split, or an ambiguous layout (both ``mask`` and ``masks``). Unreadable files (empty,
not an image, truncated) are all read first and named at once (``DDLUnreadableFilesError``);
inside ``bad_file_policy(skip=True, report_dir)`` (training with DATALOADER.SKIP_BAD_SAMPLES)
they are left out instead, with a warning giving the count, and listed in
``report_dir/BAD_FILES_NAME``. Files whose names start with "." (OS metadata such as .DS_Store) are ignored.

Indexing 1.2M files takes tens of seconds, and detectron2 builds the index in every
training process, so the result can be cached (see ``default_cache_dir``).
"""
import hashlib
import logging
import multiprocessing
import os
import pickle
import tempfile

import numpy as np

from .image_header import read_folder_sizes
from .image_io import DDLDataError

__all__ = [
    "load_ddl_split",
    "register_ddl_split",
    "register_all_ddl_i",
    "register_calibration_holdout",
    "in_calibration_part",
    "CALIBRATION_FRACTION",
    "calibration_key",
    "BAD_FILES_NAME",
    "DDLUnreadableFilesError",
    "bad_file_policy",
    "record_bad_files",
    "read_bad_files",
    "resolve_split_dir",
    "default_cache_dir",
    "BUILTIN_SPLITS",
]

logger = logging.getLogger(__name__)

LABEL_REAL = 0
LABEL_FAKE = 1
IMAGE_FOLDERS = {"real": LABEL_REAL, "fake": LABEL_FAKE}
MASK_FOLDER_NAMES = ("masks", "mask")
# Builtin split name -> accepted folder names under $DETECTRON2_DATASETS/DDL-I.
BUILTIN_SPLITS = {
    "ddl_i_train": ("train",),
    "ddl_i_val": ("val", "valid"),
    "ddl_i_test": ("test",),
}
# Share of a training split held out for calibrating the verdict (register_calibration_holdout).
CALIBRATION_FRACTION = 0.1
# Bump when the cached index format or its contents change (2: unreadable files kept in "bad_files").
_CACHE_VERSION = 2
# Where bad_file_policy's report_dir gets the list of unreadable files that training left out.
BAD_FILES_NAME = "bad_files.txt"
# skip: leave unreadable files out of an index (else one error names them all); report_dir:
# where their list goes. Set by bad_file_policy (the train loader, DATALOADER.SKIP_BAD_SAMPLES).
_bad_file_policy = {"skip": False, "report_dir": None}
# Smaller splits index in about a second; caching them would only litter the cache folder.
_CACHE_MIN_IMAGES = 10000
# Folders with fewer files are read in-process (starting workers costs more than it saves).
_PARALLEL_MIN_FILES = 20000


def default_cache_dir():
    """Index cache folder: $DDL_INDEX_CACHE, or ~/.cache/ddl_mask2former/index.

    Set DDL_INDEX_CACHE=off to disable caching. A cache entry is reused only while the
    modification times of the split folder and its subfolders are unchanged (adding,
    removing or renaming a file changes them; rewriting a file in place does not).
    """
    configured = os.environ.get("DDL_INDEX_CACHE")
    if configured is not None:
        return None if configured.strip().lower() in ("", "0", "off", "none") else configured
    return os.path.join(os.path.expanduser("~"), ".cache", "ddl_mask2former", "index")


def _list_images(folder):
    """Sorted file names in ``folder``; an unexpected subfolder is an error."""
    names = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                raise DDLDataError(entry.path, "unexpected subfolder inside an image folder")
            names.append(entry.name)
    names.sort()
    return names


def _index_workers():
    """Processes for header reading: $DDL_INDEX_WORKERS, else up to 4 of the machine's cores."""
    configured = os.environ.get("DDL_INDEX_WORKERS")
    if configured:
        try:
            return max(1, int(configured))
        except ValueError:
            raise ValueError(f"DDL_INDEX_WORKERS must be an integer, got {configured!r}") from None
    return max(1, min(4, os.cpu_count() or 1))


def _read_sizes(folder, names, check_end, bad_files):
    """Header sizes of ``names`` in ``folder``, split over forked processes for big folders; an
    unreadable file gets (-1, -1) and (path, problem) appended to ``bad_files``."""
    workers = _index_workers()
    can_fork = "fork" in multiprocessing.get_all_start_methods()
    # Daemonic processes (e.g. data-loader workers) may not start children.
    if (workers == 1 or len(names) < _PARALLEL_MIN_FILES or not can_fork
            or multiprocessing.current_process().daemon):
        parts = [read_folder_sizes(folder, names, check_end, True)]
    else:
        bounds = np.linspace(0, len(names), workers * 4 + 1).astype(int)
        chunks = [(folder, names[a:b], check_end, True) for a, b in zip(bounds[:-1], bounds[1:])]
        # fork: workers start at once, without re-importing torch and detectron2 as spawn would.
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.starmap(read_folder_sizes, chunks)
    for _, errors in parts:
        bad_files.extend((os.path.join(folder, name), problem) for name, problem in errors)
    return np.concatenate([sizes for sizes, _ in parts]) if parts else np.empty((0, 2), np.int32)


def _find_layout(split_dir):
    """Return ("labeled", {subfolder: path}) or ("flat", {}) after checking the folder."""
    if not os.path.isdir(split_dir):
        raise DDLDataError(split_dir, "split folder does not exist")
    subfolders, loose_files = {}, []
    with os.scandir(split_dir) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                subfolders[entry.name] = entry.path
            else:
                loose_files.append(entry.name)
    known = set(IMAGE_FOLDERS) | set(MASK_FOLDER_NAMES)
    if "real" in subfolders or "fake" in subfolders:
        if loose_files:
            raise DDLDataError(os.path.join(split_dir, sorted(loose_files)[0]),
                               "file next to real/ and fake/ folders; a labeled split holds "
                               "images only inside real/ and fake/")
        unknown = sorted(set(subfolders) - known)
        if unknown:
            raise DDLDataError(os.path.join(split_dir, unknown[0]),
                               "unexpected folder in a labeled split (expected real/, fake/, "
                               "masks/ or mask/)")
        if all(name in subfolders for name in MASK_FOLDER_NAMES):
            raise DDLDataError(split_dir, "has both masks/ and mask/ folders; keep one")
        return "labeled", subfolders
    if subfolders:
        raise DDLDataError(os.path.join(split_dir, sorted(subfolders)[0]),
                           "unexpected folder: a split holds real/ and fake/ (labeled) or only "
                           "image files (flat, unlabeled)")
    if not loose_files:
        raise DDLDataError(split_dir, "empty split folder: no images and no real/ or fake/ folders")
    return "flat", {}


def _cache_key(split_dir, subfolders, check_end):
    stamps = []
    for path in [split_dir] + sorted(subfolders.values()):
        info = os.stat(path)
        stamps.append((path, info.st_mtime_ns, info.st_ino))
    text = repr((_CACHE_VERSION, os.path.abspath(split_dir), stamps, check_end))
    return hashlib.sha1(text.encode()).hexdigest()


def _index_split(split_dir, check_end):
    """The compact index: per folder kind, (names, sizes); masks matched to fakes; the
    unreadable files as "bad_files", [(path, problem)] (their sizes are -1)."""
    layout, subfolders = _find_layout(split_dir)
    bad_files = []
    if layout == "flat":
        names = _list_images(split_dir)
        return {"layout": "flat", "bad_files": bad_files,
                "groups": [("", None, names, _read_sizes(split_dir, names, check_end, bad_files))]}
    groups = []
    for folder_name, label in IMAGE_FOLDERS.items():
        if folder_name in subfolders:
            names = _list_images(subfolders[folder_name])
            groups.append((folder_name, label, names,
                           _read_sizes(subfolders[folder_name], names, check_end, bad_files)))
    if sum(len(names) for _, _, names, _ in groups) == 0:
        raise DDLDataError(split_dir, "empty split folder: real/ and fake/ hold no images")
    mask_folder = next((n for n in MASK_FOLDER_NAMES if n in subfolders), None)
    fake_names = next((names for folder, _, names, _ in groups if folder == "fake"), [])
    fake_sizes = next((sizes for folder, _, _, sizes in groups if folder == "fake"), None)
    mask_names = _match_masks(split_dir, subfolders, mask_folder, fake_names, groups)
    if mask_names:
        mask_dir = subfolders[mask_folder]
        mask_sizes = _read_sizes(mask_dir, mask_names, check_end, bad_files)
        # A size of an unreadable file is unknown, not different.
        readable = np.all(mask_sizes >= 0, axis=1) & np.all(fake_sizes >= 0, axis=1)
        mismatch = np.nonzero(np.any(mask_sizes != fake_sizes, axis=1) & readable)[0]
        if mismatch.size:
            i = int(mismatch[0])
            raise DDLDataError(
                os.path.join(mask_dir, mask_names[i]),
                f"mask is {mask_sizes[i][1]}x{mask_sizes[i][0]} (WxH) but its image "
                f"{os.path.join(subfolders['fake'], fake_names[i])} is "
                f"{fake_sizes[i][1]}x{fake_sizes[i][0]}; {mismatch.size} mask(s) differ in size")
    return {"layout": "labeled", "groups": groups, "mask_folder": mask_folder,
            "mask_names": mask_names, "bad_files": bad_files}


class DDLUnreadableFilesError(DDLDataError):
    """Files of a split that cannot be read, all of them: ``bad_files`` is [(path, problem)]."""

    def __init__(self, split_dir, bad_files):
        self.bad_files = [tuple(entry) for entry in bad_files]
        listing = "\n".join(f"  {path}: {problem}" for path, problem in self.bad_files)
        super().__init__(split_dir, f"{len(self.bad_files)} unreadable file(s); fix or remove them, or "
                                    f"train with DATALOADER.SKIP_BAD_SAMPLES True to leave them out:\n{listing}")

    def __reduce__(self):
        return type(self), (self.path, self.bad_files)


class bad_file_policy:
    """``with bad_file_policy(skip, report_dir):`` indexes made inside leave unreadable files
    out (``skip``) and list them in ``report_dir/BAD_FILES_NAME``, instead of stopping."""

    def __init__(self, skip, report_dir=None):
        self.policy = {"skip": bool(skip), "report_dir": report_dir}

    def __enter__(self):
        self.previous = dict(_bad_file_policy)
        _bad_file_policy.update(self.policy)
        return self

    def __exit__(self, *exc_info):
        _bad_file_policy.update(self.previous)


def record_bad_files(report_dir, bad_files, phase):
    """Append "path<TAB>phase<TAB>problem" lines to ``report_dir/BAD_FILES_NAME`` (``phase``:
    "index" or "training"; one write, so processes appending at once do not interleave lines);
    returns its path."""
    path = os.path.join(report_dir, BAD_FILES_NAME)
    os.makedirs(report_dir, exist_ok=True)
    text = "".join(f"{file_path}\t{phase}\t{problem}\n" for file_path, problem in bad_files)
    with open(path, "a") as handle:
        handle.write(text)
    return path


def read_bad_files(report_dir):
    """{phase: sorted unique paths} of ``report_dir/BAD_FILES_NAME`` (empty when there is none)."""
    found = {}
    path = os.path.join(report_dir, BAD_FILES_NAME)
    if os.path.isfile(path):
        with open(path) as handle:
            for line in handle:
                parts = line.rstrip("\n").split("\t", 2)
                if len(parts) == 3:
                    found.setdefault(parts[1], set()).add(parts[0])
    return {phase: sorted(paths) for phase, paths in found.items()}


def _leave_out_bad_files(split_dir, index, dataset_dicts):
    """Apply the bad-file policy to a split's dicts: raise naming every unreadable file, or
    drop the samples that use one (a fake with an unreadable mask too), warn and report."""
    bad_files = index.get("bad_files") or []
    if not bad_files:
        return dataset_dicts
    if not _bad_file_policy["skip"]:
        raise DDLUnreadableFilesError(split_dir, bad_files)
    bad_paths = {path for path, _ in bad_files}
    kept = [d for d in dataset_dicts if d["file_name"] not in bad_paths and d.get("mask_file") not in bad_paths]
    where = ""
    report_dir = _bad_file_policy["report_dir"]
    if report_dir:
        from detectron2.utils import comm

        if comm.is_main_process():
            where = f"; listed in {record_bad_files(report_dir, bad_files, 'index')}"
        else:
            where = f"; listed in {os.path.join(report_dir, BAD_FILES_NAME)}"
    logger.warning("DDL split %s: %d unreadable file(s) left out (DATALOADER.SKIP_BAD_SAMPLES), %d "
                   "sample(s) dropped%s", split_dir, len(bad_files), len(dataset_dicts) - len(kept), where)
    return kept


def _masks_by_stem(mask_dir, mask_names):
    by_stem = {}
    for name in mask_names:
        stem = os.path.splitext(name)[0]
        if stem in by_stem:
            raise DDLDataError(os.path.join(mask_dir, name),
                               f"two masks share the stem {stem!r} ({by_stem[stem]} and {name})")
        by_stem[stem] = name
    return by_stem


def _match_masks(split_dir, subfolders, mask_folder, fake_names, groups):
    """Mask file name for each fake (same name, else same stem + .png); check both ways."""
    if mask_folder is None:
        if fake_names:
            raise DDLDataError(os.path.join(subfolders["fake"], fake_names[0]),
                               f"fake image has no mask: {split_dir} has no masks/ (or mask/) "
                               f"folder ({len(fake_names)} fake images)")
        return []
    mask_dir = subfolders[mask_folder]
    available = _list_images(mask_dir)
    available_set = set(available)
    matched, missing = [], []
    by_stem = None
    for name in fake_names:
        if name in available_set:
            matched.append(name)
            continue
        if by_stem is None:
            # Only needed when names differ (e.g. fake .jpg with a .png mask).
            by_stem = _masks_by_stem(mask_dir, available)
        alternative = by_stem.get(os.path.splitext(name)[0])
        if alternative is None:
            missing.append(name)
        matched.append(alternative)
    if missing:
        raise DDLDataError(os.path.join(subfolders["fake"], missing[0]),
                           f"fake image has no mask (expected {os.path.join(mask_dir, missing[0])}); "
                           f"{len(missing)} fake image(s) lack masks")
    # Exact-name matches are unique by construction; stem matches may collide.
    if by_stem is not None and len(set(matched)) != len(matched):
        seen = set()
        duplicate = next(m for m in matched if m in seen or seen.add(m))
        raise DDLDataError(os.path.join(mask_dir, duplicate),
                           "mask matches more than one fake image (same stem)")
    if len(available) > len(matched):
        # matched is a duplicate-free subset of available, so some masks have no image.
        orphans = sorted(available_set - set(matched))
        real_names = set(next((names for folder, _, names, _ in groups if folder == "real"), []))
        hint = (" (a real image has this name: mislabeled?)"
                if orphans[0] in real_names else "")
        raise DDLDataError(os.path.join(mask_dir, orphans[0]),
                           f"mask without a fake image{hint}; {len(orphans)} mask(s) have no "
                           f"image in {subfolders.get('fake', os.path.join(split_dir, 'fake'))}")
    return matched


def _load_index(split_dir, cache_dir, check_end):
    if cache_dir is None:
        return _index_split(split_dir, check_end)
    _layout, subfolders = _find_layout(split_dir)
    cache_file = os.path.join(cache_dir, _cache_key(split_dir, subfolders, check_end) + ".pkl")
    if os.path.isfile(cache_file):
        try:
            with open(cache_file, "rb") as handle:
                index = pickle.load(handle)
            logger.info("DDL index of %s read from cache %s", split_dir, cache_file)
            return index
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            logger.warning("ignoring unreadable index cache %s (%s)", cache_file, exc)
    index = _index_split(split_dir, check_end)
    if sum(len(group[2]) for group in index["groups"]) < _CACHE_MIN_IMAGES:
        return index
    try:
        os.makedirs(cache_dir, exist_ok=True)
        # Write then rename, so concurrent training processes never read half a file.
        fd, tmp_path = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            pickle.dump(index, handle, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp_path, cache_file)
        logger.info("DDL index of %s cached in %s", split_dir, cache_file)
    except OSError as exc:
        logger.warning("could not write index cache in %s (%s); continuing without", cache_dir, exc)
    return index


def load_ddl_split(split_dir, cache_dir=None, check_end=True):
    """Index a split folder in DDL layout and return detectron2 dataset dicts.

    ``cache_dir``: folder for a reusable index (None: no cache). ``check_end``: verify that
    PNG/JPEG files end with their end marker (catches truncated files without decoding).
    """
    split_dir = os.path.abspath(split_dir)
    index = _load_index(split_dir, cache_dir, check_end)
    dataset_dicts = []
    append = dataset_dicts.append
    # Many images share a size: reuse one int object per value to save memory at 1M+ entries.
    shared_ints = {}
    num_fake = 0
    for folder, label, names, sizes in index["groups"]:
        prefix = folder + "/" if folder else ""
        folder_prefix = split_dir + os.sep + (folder + os.sep if folder else "")
        heights = [shared_ints.setdefault(v, v) for v in sizes[:, 0].tolist()]
        widths = [shared_ints.setdefault(v, v) for v in sizes[:, 1].tolist()]
        if label is None:
            for name, height, width in zip(names, heights, widths):
                append({"file_name": folder_prefix + name, "image_id": name,
                        "height": height, "width": width})
        elif label == LABEL_FAKE:
            num_fake += len(names)
            mask_prefix = split_dir + os.sep + index["mask_folder"] + os.sep
            for name, mask_name, height, width in zip(names, index["mask_names"], heights, widths):
                append({"file_name": folder_prefix + name, "image_id": prefix + name,
                        "height": height, "width": width, "label": LABEL_FAKE,
                        "mask_file": mask_prefix + mask_name})
        else:
            for name, height, width in zip(names, heights, widths):
                append({"file_name": folder_prefix + name, "image_id": prefix + name,
                        "height": height, "width": width, "label": LABEL_REAL})
    logger.info("DDL split %s: %d images (%d fake)", split_dir, len(dataset_dicts), num_fake)
    return _leave_out_bad_files(split_dir, index, dataset_dicts)


def resolve_split_dir(root, folder_names):
    """The one existing folder among ``root/<folder_names>``; error if none or several."""
    existing = [os.path.join(root, n) for n in folder_names if os.path.isdir(os.path.join(root, n))]
    if len(existing) > 1:
        raise DDLDataError(root, f"has several folders for one split ({', '.join(existing)}); keep one")
    if not existing:
        raise DDLDataError(os.path.join(root, folder_names[0]),
                           f"split folder does not exist (looked for {' or '.join(folder_names)} "
                           f"under {root})")
    return existing[0]


def register_ddl_split(name, split_dir, cache_dir="default", check_end=True):
    """Register the folder ``split_dir`` (DDL layout) as detectron2 dataset ``name``.

    Nothing is read until the dataset is first requested. ``split_dir`` may also be a tuple
    of alternative folders (e.g. (".../val", ".../valid")); exactly one must exist then.
    ``cache_dir="default"`` uses ``default_cache_dir()``; None disables the cache.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    candidates = (split_dir,) if isinstance(split_dir, (str, os.PathLike)) else tuple(split_dir)

    def load():
        if len(candidates) == 1:
            folder = os.fspath(candidates[0])
        else:
            root = os.path.dirname(os.fspath(candidates[0]))
            folder = resolve_split_dir(root, [os.path.basename(os.fspath(c)) for c in candidates])
        chosen_cache = default_cache_dir() if cache_dir == "default" else cache_dir
        return load_ddl_split(folder, cache_dir=chosen_cache, check_end=check_end)

    DatasetCatalog.register(name, load)
    shown_dir = next((os.fspath(c) for c in candidates if os.path.isdir(os.fspath(c))),
                     os.fspath(candidates[0]))
    MetadataCatalog.get(name).set(
        split_dir=shown_dir,
        evaluator_type="ddl",
        # Pixel classes of "forgery_mask"; 255 marks padding.
        stuff_classes=["real", "forged"],
        ignore_label=255,
    )
    return name


def calibration_key(record):
    """What decides an image's side of the calibration split: its ``source_id`` where the data
    has one, else the stem of its ``image_id`` without the folder ("fake/0001.png" -> "0001"),
    so that a fake and the real image it came from, released under the same stem, stay on one
    side (split by each file name, near-duplicates landed on opposite sides)."""
    if record.get("source_id") is not None:
        return str(record["source_id"])
    return os.path.splitext(os.path.basename(str(record["image_id"])))[0]


def in_calibration_part(key, fraction=CALIBRATION_FRACTION):
    """Whether an image belongs to the calibration part: a hash of its ``calibration_key``, so
    the split is the same in every process, on every machine and whatever other files the
    folder holds."""
    digest = hashlib.sha1(str(key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2 ** 64


def register_calibration_holdout(base_name, fraction=CALIBRATION_FRACTION):
    """Register ``<base_name>_fit`` and ``<base_name>_calib``: the registered dataset
    ``base_name`` split by ``in_calibration_part`` of each image's ``calibration_key`` (its
    stem, or its ``source_id``) into a training part (1 - ``fraction``) and a calibration part
    (``fraction``) that training never sees, nor any image under the same stem. Returns both names."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    names = (f"{base_name}_fit", f"{base_name}_calib")
    for name, calibration in zip(names, (False, True)):
        def load(calibration=calibration):
            return [d for d in DatasetCatalog.get(base_name)
                    if in_calibration_part(calibration_key(d), fraction) == calibration]

        if name in DatasetCatalog.list():  # registering again (another root) replaces it
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(**{k: v for k, v in MetadataCatalog.get(base_name).as_dict().items()
                                         if k != "name"})
    return names


def register_all_ddl_i(root=None):
    """Register ddl_i_train/val/test under ``root`` (default $DETECTRON2_DATASETS or "datasets"),
    and ddl_i_train_fit / ddl_i_train_calib (``register_calibration_holdout``)."""
    root = root if root is not None else os.getenv("DETECTRON2_DATASETS", "datasets")
    ddl_root = os.path.join(root, "DDL-I")
    for name, folders in BUILTIN_SPLITS.items():
        register_ddl_split(name, tuple(os.path.join(ddl_root, f) for f in folders))
    register_calibration_holdout("ddl_i_train")
