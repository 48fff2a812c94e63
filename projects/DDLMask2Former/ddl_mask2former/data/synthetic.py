"""Synthetic DDL-format data: real photographs and subtle local forgeries with exact masks.

This is the stand-in for DDL-I on machines without the release. Real images are random crops
of the photographs bundled in scikit-image's wheel (``skimage.data``), rescaled and flipped,
with sizes between ``min_size`` and ``max_size`` pixels per side. Fake images start from such a
crop and receive forgeries that imitate DDL-I's types:

* ``face_swap``: a large face-like ellipse replaced by content from another photograph,
  colour-matched and feather-blended (face swapping / full-face synthesis);
* ``reenact``: a large ellipse warped in place by a smooth displacement field (reenactment);
* ``edit_warp``, ``edit_inpaint``, ``edit_resynth``: a small region warped, inpainted, or
  re-synthesised at another scale (attribute / component editing);
* ``multi``: two to four forged regions in one image (multi-face scenes).

Every forgery leaves only physical traces: resampling, blur, feathered blending, imperfect
colour matching, a different noise level or a different JPEG quality inside the region. Real
and fake images then share the same final "camera" processing (noise, optional JPEG round
trip), so the global statistics do not give the label away. Masks are 0/255 PNGs marking
pixels whose blend weight is above one half.

How strong the traces are is a ``difficulty`` level (``TRACE_PROFILES``): "hard" (the
default, and this generator's original output, byte for byte) hides them under a feathered
blend, close colour matching and a camera pipeline of comparable noise and JPEG; "medium" and
"easy" make the same traces stronger (more region noise, lower region JPEG quality, more
resampling blur, harder blend edges, looser colour matching, larger regions) and the shared
camera processing lighter. "easy" also gives every photograph sensor noise at capture, before
the forgery, as a real camera does: an edit that blurs, resamples or inpaints then removes it,
and a swapped-in donor brings its own level. No level marks forgeries in any other way.

Everything is deterministic for a seed: image ``i`` of a split draws from its own generator
seeded with (seed, split, i), so the result does not depend on worker count or order. A mixed
split (``varied_share``) draws each image's generator from a stream of its own, so its image
``i`` is, byte for byte, image ``i`` of the classic or the varied split of the same seed.
"""
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

from .synthetic_sources import BUNDLED_PHOTOS, load_photo_pool

__all__ = [
    "SOURCE_PHOTOS",
    "FORGERY_TYPES",
    "DIFFICULTIES",
    "TRACE_PROFILES",
    "TraceProfile",
    "trace_profile",
    "load_source_photos",
    "make_real_image",
    "make_fake_image",
    "generate_split",
    "generate_ddl_dataset",
]


# Photographs bundled inside the scikit-image wheel (no download); camera is grayscale.
SOURCE_PHOTOS = BUNDLED_PHOTOS
FORGERY_TYPES = ("face_swap", "reenact", "edit_warp", "edit_inpaint", "edit_resynth", "multi")
# Share of fake images per forgery type (in FORGERY_TYPES order).
_FORGERY_TYPE_PROBS = (0.30, 0.10, 0.10, 0.10, 0.10, 0.30)
_SPLIT_IDS = {"train": 1, "val": 2, "test": 3}
# Streams of the per-split draws, apart from every image's own (seed, split, index) stream.
_LABEL_STREAM, _GENERATOR_STREAM = 2**31, 2**31 + 1
_INTERPOLATIONS = (cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_AREA, cv2.INTER_LANCZOS4)

@dataclass(frozen=True)
class TraceProfile:
    """The physics of one difficulty level: every range is (low, high) for a uniform draw."""

    # Gaussian noise sigma added inside a region (8-bit levels).
    region_noise: tuple
    # JPEG quality of a region's separate compression.
    region_jpeg_quality: tuple
    # Gaussian blur sigma applied inside warped regions after resampling (None: no extra blur).
    warp_blur: Optional[tuple]
    # Down-sampling factor of re-synthesised regions (smaller: blurrier).
    resynth_factor: tuple
    # Grain sigma of inpainted regions (smaller: flatter than the camera noise around them).
    inpaint_grain: tuple
    # Blend feather: Gaussian sigma as a fraction of the ellipse's short axis.
    feather: float
    # Weight of colour matching of a swapped face to its surroundings (1: fully matched).
    colour_match: tuple
    # Region half-axes as fractions of the image's short side: face-sized, small, multi-face.
    large_region: tuple
    small_region: tuple
    multi_face_region: tuple
    # Camera pipeline shared by real and fake images: noise sigma, JPEG probability and quality.
    camera_noise: tuple
    camera_jpeg_prob: float
    camera_jpeg_quality: tuple
    # Sensor noise sigma of every captured photograph (the base view and each face-swap donor,
    # drawn per photograph) added before any forgery; None: no sensor stage. Edits that
    # resample, blur or inpaint remove it, and a donor brings its own level, so the edit leaves
    # a noise inconsistency. The camera noise above comes after the forgery and covers it.
    sensor_noise: Optional[tuple] = None


TRACE_PROFILES = {
    "hard": TraceProfile(
        region_noise=(1.5, 3.5), region_jpeg_quality=(55, 85), warp_blur=None,
        resynth_factor=(0.35, 0.7), inpaint_grain=(0.5, 1.5), feather=0.12,
        colour_match=(0.6, 0.95), large_region=(0.15, 0.32), small_region=(0.05, 0.12),
        multi_face_region=(0.10, 0.20), camera_noise=(0.3, 1.5), camera_jpeg_prob=0.6,
        camera_jpeg_quality=(85, 99)),
    "medium": TraceProfile(
        region_noise=(3.0, 6.0), region_jpeg_quality=(35, 65), warp_blur=(0.5, 1.0),
        resynth_factor=(0.3, 0.55), inpaint_grain=(0.2, 0.8), feather=0.08,
        colour_match=(0.3, 0.8), large_region=(0.18, 0.34), small_region=(0.08, 0.15),
        multi_face_region=(0.12, 0.22), camera_noise=(0.3, 1.0), camera_jpeg_prob=0.4,
        camera_jpeg_quality=(90, 99)),
    "easy": TraceProfile(
        region_noise=(5.0, 9.0), region_jpeg_quality=(15, 40), warp_blur=(0.8, 1.6),
        resynth_factor=(0.2, 0.4), inpaint_grain=(0.0, 0.3), feather=0.04,
        colour_match=(0.0, 0.5), large_region=(0.2, 0.36), small_region=(0.1, 0.18),
        multi_face_region=(0.14, 0.24), camera_noise=(0.2, 0.6), camera_jpeg_prob=0.3,
        camera_jpeg_quality=(93, 99), sensor_noise=(2.0, 4.0)),
}
DIFFICULTIES = tuple(TRACE_PROFILES)


def trace_profile(difficulty):
    """The TraceProfile of a difficulty name, with a clear error for unknown names."""
    if difficulty not in TRACE_PROFILES:
        raise ValueError(f"unknown difficulty {difficulty!r}; expected one of {DIFFICULTIES}")
    return TRACE_PROFILES[difficulty]


def load_source_photos():
    """Return {name: RGB uint8 array} for SOURCE_PHOTOS, loaded once per process."""
    return load_photo_pool("classic")


def _random_view(rng, photo, height, width):
    """A random ``height`` x ``width`` crop of ``photo`` at a random scale, maybe flipped."""
    src_h, src_w = photo.shape[:2]
    # The smallest scale at which the crop fits, times a random zoom (>1 means upsampling).
    min_scale = max(height / src_h, width / src_w)
    scale = min_scale * rng.uniform(1.0, 2.0)
    crop_h = min(src_h, max(2, int(np.ceil(height / scale))))
    crop_w = min(src_w, max(2, int(np.ceil(width / scale))))
    y0 = int(rng.integers(0, src_h - crop_h + 1))
    x0 = int(rng.integers(0, src_w - crop_w + 1))
    crop = photo[y0:y0 + crop_h, x0:x0 + crop_w]
    interp = _INTERPOLATIONS[int(rng.integers(len(_INTERPOLATIONS)))]
    view = cv2.resize(crop, (width, height), interpolation=interp)
    if rng.random() < 0.5:
        view = view[:, ::-1]
    return np.ascontiguousarray(view)


def _jpeg_round_trip(image, quality):
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("OpenCV failed to JPEG-encode a synthetic image")
    return cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED).reshape(image.shape)


def _gaussian_noise(rng, shape, sigma):
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)


def _add_noise(rng, image, sigma):
    noisy = image.astype(np.float32) + _gaussian_noise(rng, image.shape, sigma)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _capture(rng, view, profile):
    """A photograph as its sensor recorded it: the view plus the profile's sensor noise."""
    if profile.sensor_noise is None:
        return view
    sigma = rng.uniform(*profile.sensor_noise)
    if np.array_equal(view[..., 0], view[..., 1]) and np.array_equal(view[..., 1], view[..., 2]):
        # A monochrome sensor: one noise field for all channels keeps the photograph gray.
        noisy = view.astype(np.float32) + _gaussian_noise(rng, view.shape[:2] + (1,), sigma)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return _add_noise(rng, view, sigma)


def _camera_pipeline(rng, image, profile):
    """Processing shared by real and fake images so global statistics carry no label."""
    image = _add_noise(rng, image, rng.uniform(*profile.camera_noise))
    if rng.random() < profile.camera_jpeg_prob:
        image = _jpeg_round_trip(image, rng.integers(*profile.camera_jpeg_quality))
    return image


def _image_size(rng, min_size, max_size):
    return int(rng.integers(min_size, max_size + 1)), int(rng.integers(min_size, max_size + 1))


def make_real_image(rng, photos, min_size=256, max_size=768, difficulty="hard"):
    """A real image: a random view of one photograph through the camera pipeline."""
    profile = trace_profile(difficulty)
    names = sorted(photos)
    height, width = _image_size(rng, min_size, max_size)
    base = names[int(rng.integers(len(names)))]
    image = _capture(rng, _random_view(rng, photos[base], height, width), profile)
    return _camera_pipeline(rng, image, profile), {"source": base}


def _feathered_ellipse(rng, height, width, rel_axis_range, feather, min_axis=3):
    """A soft ellipse at a random place: (alpha, box), alpha float32 in [0,1] over the image
    box (y0, y1, x0, x1) that holds all of it."""
    short = min(height, width)
    axis_x = max(min_axis, rng.uniform(*rel_axis_range) * short)
    # Faces are taller than wide; the same shape serves small components.
    axis_y = max(min_axis, axis_x * rng.uniform(1.0, 1.4))
    center_x = rng.uniform(axis_x * 0.6, max(axis_x * 0.6, width - axis_x * 0.6))
    center_y = rng.uniform(axis_y * 0.6, max(axis_y * 0.6, height - axis_y * 0.6))
    angle = rng.uniform(-25.0, 25.0)
    sigma = max(0.8, feather * min(axis_x, axis_y))
    # Work in a box around the ellipse: the blur's reach is about 4 sigma.
    reach = max(axis_x, axis_y) + 4 * sigma + 2
    y0, y1 = max(0, int(center_y - reach)), min(height, int(np.ceil(center_y + reach)) + 1)
    x0, x1 = max(0, int(center_x - reach)), min(width, int(np.ceil(center_x + reach)) + 1)
    hard = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.ellipse(hard, ((float(center_x - x0), float(center_y - y0)),
                       (float(2 * axis_x), float(2 * axis_y)), float(angle)), 255, thickness=-1)
    alpha = cv2.GaussianBlur(hard.astype(np.float32) / 255.0, (0, 0), sigma)
    return alpha, (y0, y1, x0, x1)


def _match_colour(donor, target, region, weight):
    """Move donor's per-channel mean/std inside ``region`` towards target's, as face-swap
    pipelines do; the same affine change applies to the whole donor patch."""
    donor_f = donor.astype(np.float32)
    donor_px = donor_f[region] if region.any() else donor_f.reshape(-1, 3)
    target_px = target[region].astype(np.float32) if region.any() else target.reshape(-1, 3).astype(np.float32)
    d_mean, d_std = donor_px.mean(axis=0), donor_px.std(axis=0) + 1e-3
    t_mean, t_std = target_px.mean(axis=0), target_px.std(axis=0) + 1e-3
    # A bounded gain: a donor with a dark border or flat area must not blow up into false colours.
    gain = np.clip(t_std / d_std, 0.5, 2.0)
    matched = (donor_f - d_mean) * gain + t_mean
    return weight * matched + (1.0 - weight) * donor_f


def _smooth_displacement(rng, height, width, amplitude):
    grid = rng.uniform(-1.0, 1.0, (2, 4, 4)).astype(np.float32)
    return [cv2.resize(g, (width, height), interpolation=cv2.INTER_CUBIC) * amplitude for g in grid]


def _region_trace(rng, region, profile):
    """A local inconsistency: a different JPEG quality or noise level inside the region."""
    if rng.random() < 0.5:
        return _jpeg_round_trip(np.clip(np.rint(region), 0, 255).astype(np.uint8),
                                rng.integers(*profile.region_jpeg_quality)).astype(np.float32)
    return region + _gaussian_noise(rng, region.shape, rng.uniform(*profile.region_noise))


def _forge_region(rng, image, photos, base_name, kind, rel_axis_range, profile):
    """Apply one forgery of ``kind`` to ``image`` in place; return (forged pixels, box)."""
    height, width = image.shape[:2]
    alpha, (y0, y1, x0, x1) = _feathered_ellipse(rng, height, width, rel_axis_range, profile.feather)
    patch = image[y0:y1, x0:x1]
    patch_h, patch_w = patch.shape[:2]
    inside = alpha > 0.5
    if kind == "face_swap":
        donors = [n for n in sorted(photos) if n != base_name] or sorted(photos)
        donor_photo = photos[donors[int(rng.integers(len(donors)))]]
        donor = _capture(rng, _random_view(rng, donor_photo, patch_h, patch_w), profile)
        if np.array_equal(patch[..., 0], patch[..., 1]) and np.array_equal(patch[..., 1], patch[..., 2]):
            # A grayscale photo gets a grayscale donor, as a colour face would be a giveaway.
            donor = np.repeat(cv2.cvtColor(donor, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2)
        edited = _match_colour(donor, patch, inside, rng.uniform(*profile.colour_match))
        edited = _region_trace(rng, edited, profile)
    elif kind in ("reenact", "edit_warp"):
        amplitude = rng.uniform(0.04, 0.10) * min(patch_h, patch_w) + 1.0
        disp_x, disp_y = _smooth_displacement(rng, patch_h, patch_w, amplitude)
        grid_y, grid_x = np.mgrid[0:patch_h, 0:patch_w].astype(np.float32)
        map_x = grid_x + disp_x * alpha
        map_y = grid_y + disp_y * alpha
        edited = cv2.remap(patch, map_x, map_y, cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT).astype(np.float32)
        if profile.warp_blur is not None:
            edited = cv2.GaussianBlur(edited, (0, 0), rng.uniform(*profile.warp_blur))
        if kind == "reenact":
            edited = _region_trace(rng, edited, profile)
    elif kind == "edit_inpaint":
        hole = inside.astype(np.uint8) * 255
        # A small neighbourhood keeps Telea's cost low; the fill still follows the surroundings.
        edited = cv2.inpaint(np.ascontiguousarray(patch), hole, 3, cv2.INPAINT_TELEA)
        # Inpainting is smooth; add a weaker grain than the camera's so the area is not flat.
        edited = edited.astype(np.float32) + _gaussian_noise(rng, edited.shape,
                                                             rng.uniform(*profile.inpaint_grain))
    elif kind == "edit_resynth":
        factor = rng.uniform(*profile.resynth_factor)
        small = cv2.resize(patch, (max(1, int(patch_w * factor)), max(1, int(patch_h * factor))),
                           interpolation=cv2.INTER_AREA)
        edited = cv2.resize(small, (patch_w, patch_h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        if rng.random() < 0.5:
            # Some editors sharpen their output: unsharp mask.
            blurred = cv2.GaussianBlur(edited, (0, 0), 1.0)
            edited = edited + rng.uniform(0.3, 0.8) * (edited - blurred)
    else:
        raise ValueError(f"unknown forgery kind {kind!r}")
    blend = alpha[:, :, None]
    mixed = blend * edited + (1.0 - blend) * patch.astype(np.float32)
    image[y0:y1, x0:x1] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return inside, (y0, y1, x0, x1)


def make_fake_image(rng, photos, min_size=256, max_size=768, forgery_type=None, difficulty="hard"):
    """A fake image, its bool forgery mask and a metadata dict (type, regions)."""
    profile = trace_profile(difficulty)
    names = sorted(photos)
    height, width = _image_size(rng, min_size, max_size)
    base = names[int(rng.integers(len(names)))]
    image = _capture(rng, _random_view(rng, photos[base], height, width), profile)
    if forgery_type is None:
        forgery_type = FORGERY_TYPES[int(rng.choice(len(FORGERY_TYPES), p=_FORGERY_TYPE_PROBS))]
    large, small = profile.large_region, profile.small_region
    if forgery_type == "multi":
        kinds = [str(k) for k in rng.choice(["face_swap", "face_swap", "reenact", "edit_warp",
                                             "edit_inpaint", "edit_resynth"],
                                            size=int(rng.integers(2, 5)))]
        ranges = [profile.multi_face_region if k in ("face_swap", "reenact") else small for k in kinds]
    elif forgery_type in ("face_swap", "reenact"):
        kinds, ranges = [forgery_type], [large]
    elif forgery_type in FORGERY_TYPES:
        kinds, ranges = [forgery_type], [small]
    else:
        raise ValueError(f"unknown forgery type {forgery_type!r}; expected one of {FORGERY_TYPES}")
    mask = np.zeros((height, width), bool)
    for kind, rel_range in zip(kinds, ranges):
        forged, (y0, y1, x0, x1) = _forge_region(rng, image, photos, base, kind, rel_range, profile)
        mask[y0:y1, x0:x1] |= forged
    if not mask.any():
        # Degenerate tiny images: one larger region so that a fake always has forged pixels.
        forged, (y0, y1, x0, x1) = _forge_region(rng, image, photos, base, "edit_resynth", (0.3, 0.4),
                                                 profile)
        mask[y0:y1, x0:x1] |= forged
    image = _camera_pipeline(rng, image, profile)
    return image, mask, {"source": base, "forgery_type": forgery_type, "regions": kinds}


def _write_png(path, rgb_or_gray):
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1]
    if rgb_or_gray.ndim == 3:
        data = rgb_or_gray[:, :, ::-1]
        # Photographs with grain: Huffman-only coding is faster and smaller than deflate here.
        params += [cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]
    else:
        data = rgb_or_gray
    if not cv2.imwrite(path, np.ascontiguousarray(data), params):
        raise OSError(f"{path}: OpenCV could not write the PNG")


def _generate_one(job):
    """Worker: make and write one image (and mask); return its manifest record."""
    (seed, split_id, index, is_fake, image_path, mask_path, min_size, max_size, difficulty,
     variety) = job
    cv2.setNumThreads(1)
    rng = np.random.default_rng([seed, split_id, index])
    if variety is None:
        photos = load_source_photos()
        if is_fake:
            image, mask, meta = make_fake_image(rng, photos, min_size, max_size, difficulty=difficulty)
        else:
            image, meta = make_real_image(rng, photos, min_size, max_size, difficulty=difficulty)
    else:
        from .synthetic_sources import load_photo_pool
        from .synthetic_varied import Variety, make_varied_fake, make_varied_real

        photos, profile, variety = load_photo_pool("varied"), trace_profile(difficulty), Variety(**variety)
        if is_fake:
            image, mask, meta = make_varied_fake(rng, photos, variety, profile, min_size, max_size)
        else:
            image, meta = make_varied_real(rng, photos, variety, profile, min_size, max_size)
    if is_fake:
        if mask_path is not None:
            _write_png(mask_path, mask.astype(np.uint8) * 255)
        meta["forged_fraction"] = round(float(mask.mean()), 4)
    _write_png(image_path, image)
    meta.update(file=os.path.basename(image_path), label=int(is_fake),
                height=int(image.shape[0]), width=int(image.shape[1]))
    return meta


def generate_split(out_dir, split, num_images, seed=0, fake_fraction=0.5, min_size=256,
                   max_size=768, workers=1, folder_name=None, mask_folder="masks", flat=False,
                   answers_dir=None, difficulty="hard", variety=None, varied_share=None):
    """Write one split in DDL layout and return a summary dict.

    Labeled splits go to ``out_dir/<folder_name>/{real,fake,<mask_folder>}``. With
    ``flat=True`` (the unlabeled test split) all images go to ``out_dir/<folder_name>/`` and,
    if ``answers_dir`` is given, labels and masks are written there instead (for scoring).
    File names never reveal the label. ``difficulty`` names a TRACE_PROFILES level.
    ``variety``: None for the classic generator (ten photographs, ellipses, FORGERY_TYPES), or
    a dict of ``synthetic_varied.Variety`` keywords (families, shapes, chains; None = all) for
    the varied one. ``varied_share`` (None: one generator) mixes the two: each image comes from
    the varied generator (with ``variety``, None = all) with that probability, else from the
    classic one, and its manifest record names which (``"generator"``).
    """
    trace_profile(difficulty)  # fail early on an unknown level
    if varied_share is not None and not 0.0 <= varied_share <= 1.0:
        raise ValueError(f"varied_share must be in [0, 1], got {varied_share}")
    if variety is not None or varied_share is not None:
        from .synthetic_varied import Variety

        variety = Variety(**(variety or {})).as_dict()  # fail early on unknown names
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
    if not 0.0 <= fake_fraction <= 1.0:
        raise ValueError(f"fake_fraction must be in [0, 1], got {fake_fraction}")
    if not 8 <= min_size <= max_size:
        raise ValueError(f"need 8 <= min_size <= max_size, got {min_size}, {max_size}")
    split_dir = os.path.join(out_dir, folder_name or split)
    num_fake = int(round(num_images * fake_fraction))
    labels = np.array([1] * num_fake + [0] * (num_images - num_fake), bool)
    # Label order comes from its own stream so it does not shift any image's content.
    np.random.default_rng([seed, _SPLIT_IDS[split], _LABEL_STREAM]).shuffle(labels)
    if varied_share is None:
        image_varieties = [variety] * num_images
    else:
        draws = np.random.default_rng([seed, _SPLIT_IDS[split], _GENERATOR_STREAM]).random(num_images)
        image_varieties = [variety if draw < varied_share else None for draw in draws]
    if flat:
        image_dirs = {0: split_dir, 1: split_dir}
        mask_dir = os.path.join(answers_dir, mask_folder) if answers_dir else None
    else:
        image_dirs = {0: os.path.join(split_dir, "real"), 1: os.path.join(split_dir, "fake")}
        mask_dir = os.path.join(split_dir, mask_folder)
    for folder in set(image_dirs.values()) | ({mask_dir} if mask_dir else set()):
        os.makedirs(folder, exist_ok=True)
    jobs = []
    for index, (is_fake, image_variety) in enumerate(zip(labels, image_varieties)):
        name = f"{split}_{index:06d}.png"
        mask_path = os.path.join(mask_dir, name) if (is_fake and mask_dir) else None
        jobs.append((seed, _SPLIT_IDS[split], index, bool(is_fake),
                     os.path.join(image_dirs[int(is_fake)], name), mask_path, min_size, max_size,
                     difficulty, image_variety))
    records = _run_jobs(jobs, workers)
    if varied_share is not None:
        for record, image_variety in zip(records, image_varieties):
            record["generator"] = "classic" if image_variety is None else "varied"
    manifest_dir = answers_dir if (flat and answers_dir) else out_dir
    manifest = os.path.join(manifest_dir, f"manifest_{folder_name or split}.jsonl")
    with open(manifest, "w") as handle:
        for record in records:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
    return {"split": split, "dir": split_dir, "num_images": num_images, "num_fake": num_fake,
            "num_real": num_images - num_fake, "manifest": manifest, "difficulty": difficulty,
            "variety": variety, "varied_share": varied_share}


def _run_jobs(jobs, workers):
    if workers <= 1 or len(jobs) < 8:
        return [_generate_one(job) for job in jobs]
    chunk = max(1, len(jobs) // (workers * 8))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_generate_one, jobs, chunksize=chunk))


def generate_ddl_dataset(out_dir, num_train, num_val, num_test=0, seed=0, fake_fraction=0.5,
                         min_size=256, max_size=768, workers=1, val_folder="val",
                         mask_folder="masks", difficulty="hard", variety=None, varied_share=None):
    """Write train/, val/ (or ``val_folder``) and optionally a flat test/ under ``out_dir``.

    The test split's labels and masks go to ``out_dir/test_answers/`` so submissions can be
    scored; ``test/`` itself holds only images, like the DDL-I release. ``variety`` and
    ``varied_share`` choose the generator (``generate_split``).
    """
    summaries = []
    for split, count, folder in (("train", num_train, "train"), ("val", num_val, val_folder)):
        if count > 0:
            summaries.append(generate_split(out_dir, split, count, seed, fake_fraction, min_size,
                                            max_size, workers, folder, mask_folder,
                                            difficulty=difficulty, variety=variety,
                                            varied_share=varied_share))
    if num_test > 0:
        answers = os.path.join(out_dir, "test_answers")
        summaries.append(generate_split(out_dir, "test", num_test, seed, fake_fraction, min_size,
                                        max_size, workers, "test", mask_folder, flat=True,
                                        answers_dir=answers, difficulty=difficulty,
                                        variety=variety, varied_share=varied_share))
    return summaries
