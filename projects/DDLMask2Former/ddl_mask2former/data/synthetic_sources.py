"""Where the synthetic generator's pristine content comes from: photographs and procedural scenes.

Two pools, both offline:

* **Photographs** (``load_photo_pool``): the ten scikit-image photographs the classic generator
  used (``BUNDLED_PHOTOS``), two from scikit-learn's wheel, one from matplotlib's, and the
  photographs of Debian's ``lomiri-wallpapers-16.04`` and ``lomiri-wallpapers-20.04`` packages
  (``REGISTRY_PHOTOS``; ``tools/setup_env.sh`` unpacks them into ``<venv>/share/ddl-photos``,
  ``$DDL_PHOTO_DIR`` overrides). Large wallpapers are shrunk once on load (area averaging), which
  also erases their own JPEG block grid. Debian's ``mate-backgrounds`` is never used: it is a
  held-out evaluation set.
* **Procedural scenes** (``procedural_scene``): a dead-leaves image (occluding shapes whose sizes
  follow a power law, each with its own colour, shading and texture: the statistics of natural
  images without copying any photograph), seen through a simulated camera: optical blur, a Bayer
  mosaic, signal-dependent sensor noise, demosaicing, white balance, gamma and an in-camera JPEG.
  Every scene is new, so a model cannot learn a fixed set of backgrounds.
"""
import glob
import os
import sys

import cv2
import numpy as np

__all__ = [
    "BUNDLED_PHOTOS",
    "REGISTRY_PHOTOS",
    "PROCEDURAL",
    "photo_dir",
    "load_photo_pool",
    "missing_registry_photos",
    "procedural_scene",
    "simulate_camera",
]

# Photographs bundled inside the scikit-image wheel (no download); camera is grayscale.
BUNDLED_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
    "immunohistochemistry", "retina", "motorcycle_left", "motorcycle_right", "camera",
)
# Other wheels the install already has: (name, package, path inside it).
_WHEEL_PHOTOS = (
    ("sklearn_china", "sklearn", "datasets/images/china.jpg"),
    ("sklearn_flower", "sklearn", "datasets/images/flower.jpg"),
    ("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)
# The photographs (not the illustrations) of the two lomiri wallpaper packages, by file name.
REGISTRY_PHOTOS = (
    "Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg", "Picture_0B_by_freespace.jpg",
    "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg", "aitzgorri_by_Aitzol_Berasategi.jpg",
    "analogpattern_by_Peter_Nerlich.jpg", "free_by_Peter_Nerlich.jpg",
    "friends_by_Aitzol_Berasategi.jpg", "greentock_by_Peter_Nerlich.jpg",
    "life_by_Aitzol_Berasategi.jpg", "picosdeeuropa_by_Aitzol_Berasategi.jpg",
    "seeding_by_Clements_Engelhardt.jpg", "sunset_by_Aitzol_Berasategi.jpg",
    "Infinite-Sea_by_Aury88.jpg", "Kleiber_by_Lukas_Baubkus.jpg",
)
# The name under which procedural scenes appear among the sources.
PROCEDURAL = "procedural"
# Longest side a photograph keeps after loading (the generator's images are at most 1024 px).
_MAX_PHOTO_SIDE = 1536

_POOL_CACHE = {}


def photo_dir():
    """Folder of the registry photographs: ``$DDL_PHOTO_DIR``, else ``<prefix>/share/ddl-photos``."""
    return os.environ.get("DDL_PHOTO_DIR") or os.path.join(sys.prefix, "share", "ddl-photos")


def _as_rgb(photo):
    if photo.ndim == 2:
        photo = np.repeat(photo[:, :, None], 3, axis=2)
    return np.ascontiguousarray(photo[:, :, :3].astype(np.uint8))


def _shrink(photo):
    long_side = max(photo.shape[:2])
    if long_side <= _MAX_PHOTO_SIDE:
        return photo
    scale = _MAX_PHOTO_SIDE / long_side
    size = (max(1, round(photo.shape[1] * scale)), max(1, round(photo.shape[0] * scale)))
    return cv2.resize(photo, size, interpolation=cv2.INTER_AREA)


def _bundled():
    import skimage.data  # imported lazily: only the generator needs scikit-image

    photos = {}
    left, right, _disparity = skimage.data.stereo_motorcycle()
    for name in BUNDLED_PHOTOS:
        if name == "motorcycle_left":
            photo = left
        elif name == "motorcycle_right":
            photo = right
        else:
            photo = getattr(skimage.data, name)()
        photos[name] = _as_rgb(photo)
    return photos


def _read_rgb(path):
    data = cv2.imread(path, cv2.IMREAD_COLOR)
    if data is None:
        raise OSError(f"{path}: not a readable image (a source photograph of the synthetic generator)")
    return np.ascontiguousarray(data[:, :, ::-1])


def _wheel_photos():
    import importlib.util

    photos = {}
    for name, package, relative in _WHEEL_PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = os.path.join(list(spec.submodule_search_locations)[0], relative)
        if os.path.exists(path):
            photos[name] = _shrink(_read_rgb(path))
    return photos


def _registry_photos(folder):
    """The registry photographs found under ``folder``, shrunk. Decoding a 24-megapixel JPEG
    takes most of a second, so the shrunk pixels are kept as PNGs in ``folder/.shrunk`` (where
    the folder is writable) and read from there afterwards: the same pixels, in milliseconds."""
    paths = {os.path.basename(p): p for p in glob.glob(os.path.join(folder, "**", "*.jpg"), recursive=True)
             if os.sep + ".shrunk" + os.sep not in p}
    cache = os.path.join(folder, ".shrunk")
    photos = {}
    for name in REGISTRY_PHOTOS:
        if name not in paths:
            continue
        stem = os.path.splitext(name)[0]
        cached = os.path.join(cache, f"{stem}-{_MAX_PHOTO_SIDE}.png")
        if os.path.isfile(cached) and os.path.getmtime(cached) >= os.path.getmtime(paths[name]):
            photos[stem] = _read_rgb(cached)
            continue
        photos[stem] = _shrink(_read_rgb(paths[name]))
        try:
            os.makedirs(cache, exist_ok=True)
            tmp = f"{cached}.{os.getpid()}.png"
            if cv2.imwrite(tmp, np.ascontiguousarray(photos[stem][:, :, ::-1])):
                os.replace(tmp, cached)
        except OSError:
            pass  # a read-only install: decode each time
    return photos


def load_photo_pool(pool="varied"):
    """{name: RGB uint8 photograph} of a pool, loaded once per process.

    ``"classic"``: the ten scikit-image photographs of the original generator. ``"varied"``: those,
    the wheels' photographs and the registry photographs found in ``photo_dir()`` (whichever of
    them are installed: ``missing_registry_photos`` tells which are not).
    """
    if pool not in ("classic", "varied"):
        raise ValueError(f"unknown photo pool {pool!r}; expected 'classic' or 'varied'")
    key = (pool, photo_dir() if pool == "varied" else None)
    if key not in _POOL_CACHE:
        photos = _bundled()
        if pool == "varied":
            photos.update(_wheel_photos())
            photos.update(_registry_photos(photo_dir()))
        _POOL_CACHE[key] = photos
    return _POOL_CACHE[key]


def missing_registry_photos():
    """File names of REGISTRY_PHOTOS that ``photo_dir()`` does not hold."""
    found = {os.path.basename(p) for p in glob.glob(os.path.join(photo_dir(), "**", "*.jpg"), recursive=True)}
    return [name for name in REGISTRY_PHOTOS if name not in found]


# ---------------------------------------------------------------------------------------------
# Procedural scenes


def _leaf_texture(rng, height, width, photos):
    """A zero-mean luminance texture for one leaf: smooth shading, a grating, 1/f noise or a
    photograph's detail, each at a random contrast."""
    kind = int(rng.integers(4))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == 0:  # shading: a linear gradient
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / max(height, width, 1)
        texture = ramp - ramp.mean()
    elif kind == 1:  # a grating, as on fabric or bricks
        period = rng.uniform(3.0, 24.0)
        angle = rng.uniform(0, np.pi)
        texture = np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period)
    elif kind == 2:  # 1/f-like noise: white noise summed over a few blur scales
        texture = np.zeros((height, width), np.float32)
        for sigma in (0.7, 2.0, 6.0):
            layer = cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), sigma)
            texture += layer / (layer.std() + 1e-6) * sigma ** 0.5
        texture /= texture.std() + 1e-6
    else:  # the detail (high-pass) of a random patch of a photograph
        names = sorted(photos)
        photo = photos[names[int(rng.integers(len(names)))]]
        ph, pw = photo.shape[:2]
        y0 = int(rng.integers(0, max(1, ph - height) + 1))
        x0 = int(rng.integers(0, max(1, pw - width) + 1))
        patch = cv2.cvtColor(photo[y0:y0 + height, x0:x0 + width], cv2.COLOR_RGB2GRAY).astype(np.float32)
        patch = cv2.resize(patch, (width, height), interpolation=cv2.INTER_LINEAR)
        texture = patch - cv2.GaussianBlur(patch, (0, 0), 4.0)
        texture /= texture.std() + 1e-6
    return texture.astype(np.float32) * np.float32(rng.uniform(0.0, 0.25))


def _leaf_shape(rng, height, width, radius):
    """A filled shape of about ``radius`` at a random centre (disc, ellipse, square or polygon),
    as (box, local bool mask) clipped to the canvas; None when it falls outside."""
    cy, cx = rng.uniform(-radius, height + radius), rng.uniform(-radius, width + radius)
    reach = 1.25 * radius + 2
    y0, y1 = max(0, int(cy - reach)), min(height, int(np.ceil(cy + reach)))
    x0, x1 = max(0, int(cx - reach)), min(width, int(np.ceil(cx + reach)))
    if y1 <= y0 or x1 <= x0:
        return None
    shape = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cy, cx = cy - y0, cx - x0
    kind = int(rng.integers(4))
    if kind == 0:
        cv2.circle(shape, (int(cx), int(cy)), int(max(1, radius)), 1, -1)
    elif kind == 1:
        axes = (int(max(1, radius)), int(max(1, radius * rng.uniform(0.3, 1.0))))
        cv2.ellipse(shape, (int(cx), int(cy)), axes, rng.uniform(0, 180), 0, 360, 1, -1)
    else:
        count = 4 if kind == 2 else int(rng.integers(3, 9))
        angles = np.sort(rng.uniform(0, 2 * np.pi, count)) if kind == 3 else (
            rng.uniform(0, np.pi / 2) + np.arange(4) * np.pi / 2)
        radii = radius * (rng.uniform(0.5, 1.2, count) if kind == 3 else np.ones(4))
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
        cv2.fillPoly(shape, [np.round(points).astype(np.int32)], 1)
    return (y0, y1, x0, x1), shape.astype(bool)


def _dead_leaves(rng, height, width, photos):
    """Linear-light RGB in [0, 1]: leaves painted one over another (the last is in front) on a
    background leaf, sizes from the dead-leaves model's power law."""
    names = sorted(photos)
    # Colours drawn from a photograph keep natural colour statistics (correlated channels).
    palette = photos[names[int(rng.integers(len(names)))]].reshape(-1, 3)

    def colour():
        return (palette[int(rng.integers(len(palette)))].astype(np.float32) / 255.0) ** 2.2

    canvas = np.empty((height, width, 3), np.float32)
    canvas[:] = colour()[None, None, :] * (1.0 + _leaf_texture(rng, height, width, photos)[:, :, None])
    r_min, r_max = max(2.0, 0.006 * max(height, width)), 0.35 * max(height, width)
    for _ in range(int(rng.integers(200, 500))):
        # Radius density ~ r^-2 by inverse-transform sampling: a few leaves fill the frame and
        # many small ones give detail at every scale (r^-3, the scale-invariant law, needs far
        # more leaves to cover the canvas).
        radius = 1.0 / (1.0 / r_min - rng.random() * (1.0 / r_min - 1.0 / r_max))
        drawn = _leaf_shape(rng, height, width, radius)
        if drawn is None:
            continue
        (y0, y1, x0, x1), shape = drawn
        if not shape.any():
            continue
        texture = _leaf_texture(rng, y1 - y0, x1 - x0, photos)
        canvas[y0:y1, x0:x1][shape] = colour()[None, :] * (1.0 + texture[shape][:, None])
    return np.clip(canvas, 0, 1)


def simulate_camera(rng, linear_rgb, jpeg_quality=None):
    """A camera's view of a linear-light scene in [0, 1]: lens blur, Bayer mosaic, shot and read
    noise, demosaicing, white balance, gamma 1/2.2, 8 bits, and an in-camera JPEG at
    ``jpeg_quality`` (drawn in 80-98 when None; 0 skips it). Returns HxWx3 uint8 RGB."""
    height, width = linear_rgb.shape[:2]
    scene = cv2.GaussianBlur(linear_rgb.astype(np.float32), (0, 0), rng.uniform(0.4, 1.2))
    # Exposure and white balance as the sensor sees them (the camera corrects the balance later).
    gains = rng.uniform(0.7, 1.3, 3).astype(np.float32)
    exposure = np.float32(rng.uniform(0.6, 1.2))
    raw_rgb = np.clip(scene * exposure / gains, 0, 1)
    # RGGB mosaic: each photosite keeps one channel.
    mosaic = np.empty((height, width), np.float32)
    mosaic[0::2, 0::2] = raw_rgb[0::2, 0::2, 0]
    mosaic[0::2, 1::2] = raw_rgb[0::2, 1::2, 1]
    mosaic[1::2, 0::2] = raw_rgb[1::2, 0::2, 1]
    mosaic[1::2, 1::2] = raw_rgb[1::2, 1::2, 2]
    # Poisson-Gaussian sensor noise: variance a*x + b (shot noise and read noise).
    shot, read = rng.uniform(1e-4, 2e-3), rng.uniform(1e-6, 4e-5)
    mosaic = mosaic + rng.standard_normal(mosaic.shape).astype(np.float32) * np.sqrt(shot * mosaic + read)
    raw = np.clip(np.rint(mosaic * 1023.0), 0, 1023).astype(np.uint16)
    # OpenCV names Bayer patterns by the second row's first two pixels: RGGB is its "BG".
    demosaic = cv2.COLOR_BayerBG2RGB_EA if rng.random() < 0.5 else cv2.COLOR_BayerBG2RGB
    rgb = cv2.cvtColor(raw, demosaic).astype(np.float32) / 1023.0
    rgb = np.clip(rgb * gains, 0, 1) ** (1.0 / 2.2)
    if rng.random() < 0.5:  # in-camera sharpening
        blurred = cv2.GaussianBlur(rgb, (0, 0), 1.0)
        rgb = np.clip(rgb + rng.uniform(0.2, 0.8) * (rgb - blurred), 0, 1)
    image = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    quality = int(rng.integers(80, 99)) if jpeg_quality is None else int(jpeg_quality)
    if quality > 0:
        from .perturbations import jpeg_compress

        image = jpeg_compress(image, quality)
    return image


def procedural_scene(rng, height, width, photos):
    """A new dead-leaves scene of ``height`` x ``width`` through ``simulate_camera`` (uint8 RGB).

    ``photos`` lends colours and some leaves' texture detail, never whole images."""
    if height < 2 or width < 2:
        raise ValueError(f"a procedural scene needs at least 2x2 pixels, got {height}x{width}")
    return simulate_camera(rng, _dead_leaves(rng, height, width, photos))
