"""The varied synthetic generator: many sources, region shapes, forgery families and
post-processing chains, so that a model has to learn forgery traces rather than one generator.

What varies (each a documented, named axis that ``tools/cross_generator.py`` can hold out):

* **Sources** (``synthetic_sources.py``): ~29 photographs from the wheels and Debian packages the
  install fetches, and new procedural dead-leaves scenes through a simulated camera
  (``PROCEDURAL_SHARE`` of all images).
* **Region shapes** (``synthetic_regions.REGION_SHAPES``): ellipse, polygon, blob, superpixels,
  stroke, silhouette.
* **Forgery families** (``FORGERY_FAMILIES``):
  - ``splice``: content from another source pasted with a near-hard edge, no colour matching;
  - ``blend``: content from another source, colour-matched and feather-blended (face swap);
  - ``copy_move``: content from elsewhere in the same image, maybe rotated and rescaled;
  - ``inpaint``: the region filled from its surroundings (Telea or Navier-Stokes) plus grain;
  - ``warp``: the region resampled by a smooth displacement or a local zoom (reenactment, liquify);
  - ``resynth``: the region regenerated at a lower resolution and upsampled, maybe sharpened.
  Splice, blend, copy-move and re-synthesis also get, half of the time, a local noise or JPEG
  inconsistency (``TraceProfile.region_noise`` / ``region_jpeg_quality``), as generated content
  carries its own processing history.
* **Post-processing chains** (``POST_CHAINS``), applied to the whole image after forging, to real
  and fake images alike (the mask follows any change of size):
  - ``none``; ``jpeg``: quality 60-100; ``resize_jpeg``: factor 0.5-1.5, then JPEG 60-100;
  - ``blur_noise``: a 3x3 or 5x5 Gaussian blur, or Gaussian noise of variance 1-9;
  - ``double_jpeg``: JPEG 60-95, a crop of 1-7 pixels that shifts the 8x8 grid, JPEG 60-100.

The trace strengths (region noise, region JPEG, feather, colour matching, region sizes, capture
noise) come from the same ``TraceProfile`` levels as the classic generator.
"""
import cv2
import numpy as np

from .perturbations import gaussian_blur, gaussian_noise, jpeg_compress, perturb, perturb_mask
from .synthetic_regions import REGION_SHAPES, draw_region
from .synthetic_sources import PROCEDURAL, procedural_scene

__all__ = [
    "FORGERY_FAMILIES",
    "POST_CHAINS",
    "PROCEDURAL_SHARE",
    "Variety",
    "make_varied_real",
    "make_varied_fake",
    "apply_post_chain",
    "generator_choice_error",
]

FORGERY_FAMILIES = ("splice", "blend", "copy_move", "inpaint", "warp", "resynth")
POST_CHAINS = ("none", "jpeg", "resize_jpeg", "blur_noise", "double_jpeg")
# Share of images (real and fake) whose content is a procedural scene rather than a photograph.
PROCEDURAL_SHARE = 0.3
_MULTI_REGION_PROB = 0.35
_INTERPOLATIONS = (cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_AREA, cv2.INTER_LANCZOS4)


def generator_choice_error(generator, varied_share, restricted_by=()):
    """What is wrong with a command line's choice of synthetic generator, or None: ``generator``
    (classic, varied or mixed), its ``--varied-share`` (mixed only, in [0, 1]) and the options
    given that restrict the varied images (``restricted_by``, e.g. ["--chains"]; not classic)."""
    if generator == "classic" and restricted_by:
        return f"{' and '.join(restricted_by)} belong to the varied and mixed generators"
    if generator != "mixed" and varied_share is not None:
        return "--varied-share belongs to the mixed generator"
    if generator == "mixed" and varied_share is not None and not 0.0 <= varied_share <= 1.0:
        return f"--varied-share must be in [0, 1], got {varied_share}"
    return None


class Variety:
    """Which families, shapes and chains a split draws from (all by default), checked once."""

    def __init__(self, families=None, shapes=None, chains=None):
        self.families = self._check("forgery families", families, FORGERY_FAMILIES)
        self.shapes = self._check("region shapes", shapes, REGION_SHAPES)
        self.chains = self._check("post-processing chains", chains, POST_CHAINS)

    @staticmethod
    def _check(what, chosen, known):
        chosen = tuple(known if chosen is None else chosen)
        unknown = [c for c in chosen if c not in known]
        if unknown or not chosen:
            raise ValueError(f"{what} must be a non-empty subset of {known}, got {list(chosen)}")
        return chosen

    def as_dict(self):
        return {"families": list(self.families), "shapes": list(self.shapes), "chains": list(self.chains)}


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _random_view(rng, photo, height, width):
    """A random crop of ``photo`` at a random scale and aspect, maybe flipped or rotated by 90
    degrees, brightness and contrast jittered, resampled to ``height`` x ``width``."""
    if rng.random() < 0.25:
        photo = np.rot90(photo, int(rng.integers(1, 4)))
    src_h, src_w = photo.shape[:2]
    min_scale = max(height / src_h, width / src_w)
    scale = min_scale * rng.uniform(1.0, 3.0)
    aspect = rng.uniform(0.85, 1.18)
    crop_h = min(src_h, max(2, int(np.ceil(height / scale * aspect))))
    crop_w = min(src_w, max(2, int(np.ceil(width / scale / aspect))))
    y0 = int(rng.integers(0, src_h - crop_h + 1))
    x0 = int(rng.integers(0, src_w - crop_w + 1))
    view = cv2.resize(np.ascontiguousarray(photo[y0:y0 + crop_h, x0:x0 + crop_w]), (width, height),
                      interpolation=_pick(rng, _INTERPOLATIONS))
    if rng.random() < 0.5:
        view = view[:, ::-1]
    gain, offset = rng.uniform(0.8, 1.2), rng.uniform(-20, 20)
    return np.clip(np.rint(view.astype(np.float32) * gain + offset), 0, 255).astype(np.uint8)


def _content(rng, photos, height, width, exclude=None):
    """(uint8 RGB content, source name): a procedural scene or a view of a photograph."""
    if rng.random() < PROCEDURAL_SHARE:
        return procedural_scene(rng, height, width, photos), PROCEDURAL
    names = [n for n in sorted(photos) if n != exclude] or sorted(photos)
    name = _pick(rng, names)
    return _random_view(rng, photos[name], height, width), name


def _noise(rng, shape, sigma):
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)


def _capture(rng, image, profile):
    if profile.sensor_noise is None:
        return image
    noisy = image.astype(np.float32) + _noise(rng, image.shape, rng.uniform(*profile.sensor_noise))
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _camera(rng, image, profile):
    """Processing shared by real and fake images before any post-processing chain."""
    noisy = image.astype(np.float32) + _noise(rng, image.shape, rng.uniform(*profile.camera_noise))
    image = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    if rng.random() < profile.camera_jpeg_prob:
        image = jpeg_compress(image, int(rng.integers(*profile.camera_jpeg_quality)))
    return image


def _local_trace(rng, region, profile):
    """Half of the time, a different noise level or JPEG quality inside the region."""
    draw = rng.random()
    if draw < 0.25:
        quality = int(rng.integers(*profile.region_jpeg_quality))
        return jpeg_compress(np.clip(np.rint(region), 0, 255).astype(np.uint8), quality).astype(np.float32)
    if draw < 0.5:
        return region + _noise(rng, region.shape, rng.uniform(*profile.region_noise))
    return region


def _match_colour(donor, target, inside, weight):
    """Move the donor's per-channel mean and std inside the region towards the target's."""
    donor_px = donor[inside] if inside.any() else donor.reshape(-1, 3)
    target_px = target[inside] if inside.any() else target.reshape(-1, 3)
    d_mean, d_std = donor_px.mean(0), donor_px.std(0) + 1e-3
    t_mean, t_std = target_px.mean(0), target_px.std(0) + 1e-3
    gain = np.clip(t_std / d_std, 0.5, 2.0)
    return weight * ((donor - d_mean) * gain + t_mean) + (1.0 - weight) * donor


def _copy_from_elsewhere(rng, image, box):
    """A patch of ``image`` of the box's size from another place, maybe rotated and rescaled."""
    y0, y1, x0, x1 = box
    ph, pw = y1 - y0, x1 - x0
    height, width = image.shape[:2]
    angle, scale = rng.uniform(-15, 15), rng.uniform(0.8, 1.25)
    # Source centre anywhere the patch fits, preferably not overlapping the target box.
    for _ in range(8):
        sy = rng.uniform(ph / 2, max(ph / 2, height - ph / 2))
        sx = rng.uniform(pw / 2, max(pw / 2, width - pw / 2))
        if abs(sy - (y0 + y1) / 2) > ph / 2 or abs(sx - (x0 + x1) / 2) > pw / 2:
            break
    matrix = cv2.getRotationMatrix2D((float(sx), float(sy)), float(angle), float(scale))
    # Map the source centre to the patch centre.
    matrix[:, 2] += np.array([pw / 2 - sx, ph / 2 - sy])
    return cv2.warpAffine(image, matrix, (pw, ph), flags=_pick(rng, (cv2.INTER_LINEAR, cv2.INTER_CUBIC)),
                          borderMode=cv2.BORDER_REFLECT)


def _forge(rng, image, photos, base_name, family, alpha, box, profile):
    """The edited content of ``box`` (float32) for one forgery of ``family``."""
    y0, y1, x0, x1 = box
    patch = image[y0:y1, x0:x1]
    ph, pw = patch.shape[:2]
    inside = alpha > 0.5
    patch_f = patch.astype(np.float32)
    if family in ("splice", "blend"):
        donor, _ = _content(rng, photos, ph, pw, exclude=base_name)
        donor = _capture(rng, donor, profile).astype(np.float32)
        if family == "blend":
            donor = _match_colour(donor, patch_f, inside, rng.uniform(*profile.colour_match))
        return _local_trace(rng, donor, profile)
    if family == "copy_move":
        return _local_trace(rng, _copy_from_elsewhere(rng, image, box).astype(np.float32), profile)
    if family == "inpaint":
        method = cv2.INPAINT_TELEA if rng.random() < 0.5 else cv2.INPAINT_NS
        filled = cv2.inpaint(np.ascontiguousarray(patch), inside.astype(np.uint8) * 255, 3, method)
        return filled.astype(np.float32) + _noise(rng, filled.shape, rng.uniform(*profile.inpaint_grain))
    if family == "warp":
        grid_y, grid_x = np.mgrid[0:ph, 0:pw].astype(np.float32)
        if rng.random() < 0.5:  # a smooth displacement field (reenactment, liquify)
            amplitude = rng.uniform(0.04, 0.10) * min(ph, pw) + 1.0
            field = rng.uniform(-1, 1, (2, 4, 4)).astype(np.float32)
            disp = [cv2.resize(f, (pw, ph), interpolation=cv2.INTER_CUBIC) * amplitude for f in field]
            map_x, map_y = grid_x + disp[0] * alpha, grid_y + disp[1] * alpha
        else:  # a local zoom about the region's centre (resampling)
            zoom = rng.uniform(0.75, 1.35)
            cy, cx = ph / 2, pw / 2
            map_x, map_y = cx + (grid_x - cx) / zoom, cy + (grid_y - cy) / zoom
        edited = cv2.remap(patch, map_x.astype(np.float32), map_y.astype(np.float32),
                           _pick(rng, (cv2.INTER_LINEAR, cv2.INTER_CUBIC)),
                           borderMode=cv2.BORDER_REFLECT).astype(np.float32)
        if profile.warp_blur is not None:
            edited = cv2.GaussianBlur(edited, (0, 0), rng.uniform(*profile.warp_blur))
        return edited
    if family == "resynth":
        factor = rng.uniform(*profile.resynth_factor)
        small = cv2.resize(patch, (max(1, int(pw * factor)), max(1, int(ph * factor))),
                           interpolation=cv2.INTER_AREA)
        edited = cv2.resize(small, (pw, ph), interpolation=_pick(rng, (cv2.INTER_CUBIC, cv2.INTER_LINEAR,
                                                                       cv2.INTER_LANCZOS4))).astype(np.float32)
        if rng.random() < 0.5:  # editors often sharpen their output: unsharp mask
            edited = edited + rng.uniform(0.3, 0.8) * (edited - cv2.GaussianBlur(edited, (0, 0), 1.0))
        return _local_trace(rng, edited, profile)
    raise ValueError(f"unknown forgery family {family!r}; expected one of {FORGERY_FAMILIES}")


def apply_post_chain(rng, image, mask, chain):
    """``(image, mask, params)`` after post-processing ``chain`` (``POST_CHAINS``); ``mask`` may
    be None (a real image). The mask is resized or cropped along with the image."""
    params = {"chain": chain}
    if chain == "none":
        pass
    elif chain == "jpeg":
        params["quality"] = int(rng.integers(60, 101))
        image = jpeg_compress(image, params["quality"])
    elif chain == "resize_jpeg":
        factor = float(rng.uniform(0.5, 1.5))
        # Never below 16 px a side: the model needs some context.
        factor = max(factor, 16.0 / min(image.shape[:2]))
        params.update(factor=round(factor, 4), quality=int(rng.integers(60, 101)))
        resized = perturb(image, "resize", factor)
        if mask is not None:
            mask = perturb_mask(mask, "resize", factor, size=resized.shape[:2])
        image = jpeg_compress(resized, params["quality"])
    elif chain == "blur_noise":
        if rng.random() < 0.5:
            params["blur"] = int(_pick(rng, (3, 5)))
            image = gaussian_blur(image, params["blur"])
        else:
            params["noise_variance"] = round(float(rng.uniform(1.0, 9.0)), 3)
            image = gaussian_noise(image, params["noise_variance"], rng)
    elif chain == "double_jpeg":
        first, second = int(rng.integers(60, 96)), int(rng.integers(60, 101))
        dy, dx = int(rng.integers(1, 8)), int(rng.integers(1, 8))
        params.update(first_quality=first, second_quality=second, shift=[dy, dx])
        image = jpeg_compress(jpeg_compress(image, first)[dy:, dx:], second)
        if mask is not None:
            mask = mask[dy:, dx:]
    else:
        raise ValueError(f"unknown post-processing chain {chain!r}; expected one of {POST_CHAINS}")
    return image, mask, params


def _size(rng, min_size, max_size):
    return int(rng.integers(min_size, max_size + 1)), int(rng.integers(min_size, max_size + 1))


def make_varied_real(rng, photos, variety, profile, min_size=256, max_size=768):
    """A real image (uint8 RGB) and its manifest record."""
    height, width = _size(rng, min_size, max_size)
    content, source = _content(rng, photos, height, width)
    image = _camera(rng, _capture(rng, content, profile), profile)
    image, _, chain = apply_post_chain(rng, image, None, _pick(rng, variety.chains))
    return image, {"source": source, "post": chain}


def make_varied_fake(rng, photos, variety, profile, min_size=256, max_size=768):
    """A fake image (uint8 RGB), its bool forgery mask and its manifest record."""
    height, width = _size(rng, min_size, max_size)
    content, source = _content(rng, photos, height, width)
    image = _capture(rng, content, profile)
    count = int(rng.integers(2, 5)) if rng.random() < _MULTI_REGION_PROB else 1
    mask = np.zeros((height, width), bool)
    regions = []
    for index in range(count):
        family, shape = _pick(rng, variety.families), _pick(rng, variety.shapes)
        size = profile.large_region if (count == 1 and rng.random() < 0.5) else (
            profile.multi_face_region if count > 1 else profile.small_region)
        feather = profile.feather * (0.4 if family == "splice" else 1.0)
        alpha, box = draw_region(rng, image, shape, size, feather)
        edited = _forge(rng, image, photos, source, family, alpha, box, profile)
        y0, y1, x0, x1 = box
        blend = alpha[:, :, None]
        mixed = blend * edited + (1.0 - blend) * image[y0:y1, x0:x1].astype(np.float32)
        image[y0:y1, x0:x1] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
        mask[y0:y1, x0:x1] |= alpha > 0.5
        regions.append({"family": family, "shape": shape})
    if not mask.any():  # a region feathered away entirely: one more, large, of the first family
        alpha, box = draw_region(rng, image, "ellipse", (0.3, 0.4), profile.feather)
        edited = _forge(rng, image, photos, source, regions[0]["family"], alpha, box, profile)
        y0, y1, x0, x1 = box
        blend = alpha[:, :, None]
        image[y0:y1, x0:x1] = np.clip(np.rint(blend * edited + (1 - blend) * image[y0:y1, x0:x1]), 0, 255)
        mask[y0:y1, x0:x1] |= alpha > 0.5
        regions.append({"family": regions[0]["family"], "shape": "ellipse"})
    image = _camera(rng, image, profile)
    chain_name = _pick(rng, variety.chains)
    processed, processed_mask, chain = apply_post_chain(rng, image, mask, chain_name)
    if processed_mask.any():
        image, mask = processed, processed_mask
    else:  # a shrink that loses a thin region entirely would leave a fake with nothing forged
        chain = {"chain": "none", "skipped": chain_name}
    families = sorted({r["family"] for r in regions})
    return image, mask, {"source": source, "regions": regions, "families": families, "post": chain}
