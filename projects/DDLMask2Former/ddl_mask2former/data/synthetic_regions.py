"""Shapes of the synthetic generator's forged regions, as soft blend weights with exact masks.

``REGION_SHAPES`` (each drawn in a box of the requested size, then feathered):

* ``ellipse``: a tilted ellipse, taller than wide (face-like); the classic generator's only shape;
* ``polygon``: a star-shaped polygon of 3-12 vertices (an object cut out with a lasso tool);
* ``blob``: a smooth random blob (threshold of a low-frequency random field);
* ``superpixels``: a connected union of superpixels of the image itself, so the edge follows
  the image's own edges (an object selection, a segmentation-guided edit);
* ``stroke``: a thick random brush stroke (retouching, object removal along a line);
* ``silhouette``: an object-like union of rounded parts (head, body, limbs).

``draw_region(rng, image, shape, rel_size, feather)`` returns ``(alpha, box)``: ``alpha`` float32
in [0, 1] over ``box = (y0, y1, x0, x1)``; the forgery mask is ``alpha > 0.5``.
"""
import cv2
import numpy as np

__all__ = ["REGION_SHAPES", "draw_region"]

REGION_SHAPES = ("ellipse", "polygon", "blob", "superpixels", "stroke", "silhouette")


def _ellipse(rng, h, w):
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, ((w / 2, h / 2), (w * 0.95, h * 0.95), float(rng.uniform(-25, 25))), 1, -1)
    return mask


def _polygon(rng, h, w):
    count = int(rng.integers(3, 13))
    angles = np.sort(rng.uniform(0, 2 * np.pi, count))
    radii = rng.uniform(0.45, 1.0, count)
    points = np.stack([w / 2 + radii * np.cos(angles) * w / 2, h / 2 + radii * np.sin(angles) * h / 2], 1)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    return mask


def _largest_component(mask):
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return mask.astype(np.uint8)
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return (labels == best).astype(np.uint8)


def _blob(rng, h, w):
    field = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), max(1.0, min(h, w) / 6))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # A centred bump keeps the blob inside its box and in one piece.
    bump = 1.0 - ((yy - h / 2) / (h / 2)) ** 2 - ((xx - w / 2) / (w / 2)) ** 2
    field = field / (field.std() + 1e-6) * 0.5 + bump
    return _largest_component(field > 0.35)


def _superpixels(rng, h, w, patch):
    from skimage.segmentation import slic  # imported lazily: only this shape needs it

    segments = slic(patch, n_segments=int(rng.integers(8, 30)), compactness=float(rng.uniform(5, 30)),
                    start_label=0, channel_axis=-1)
    # Grow a connected union from the centre segment through neighbouring ones.
    chosen = {int(segments[h // 2, w // 2])}
    target = rng.uniform(0.25, 0.6) * h * w
    kernel = np.ones((3, 3), np.uint8)
    mask = np.isin(segments, list(chosen)).astype(np.uint8)
    while mask.sum() < target:
        ring = cv2.dilate(mask, kernel).astype(bool) & ~mask.astype(bool)
        neighbours = np.unique(segments[ring])
        if neighbours.size == 0:
            break
        chosen.add(int(neighbours[int(rng.integers(neighbours.size))]))
        mask = np.isin(segments, list(chosen)).astype(np.uint8)
    return mask


def _stroke(rng, h, w):
    mask = np.zeros((h, w), np.uint8)
    count = int(rng.integers(3, 7))
    points = np.stack([rng.uniform(0.1, 0.9, count) * w, rng.uniform(0.1, 0.9, count) * h], 1)
    thickness = int(max(2, rng.uniform(0.06, 0.2) * min(h, w)))
    cv2.polylines(mask, [np.round(points).astype(np.int32)], False, 1, thickness=thickness,
                  lineType=cv2.LINE_8)
    return mask


def _silhouette(rng, h, w):
    mask = np.zeros((h, w), np.uint8)
    # A head over a body, plus two or three limbs: rounded parts of a figure or an object.
    head_r = int(max(1, rng.uniform(0.12, 0.2) * min(h, w)))
    cv2.circle(mask, (w // 2, head_r + 1), head_r, 1, -1)
    cv2.ellipse(mask, ((w / 2, h * 0.58), (w * rng.uniform(0.35, 0.6), h * 0.75), 0.0), 1, -1)
    for _ in range(int(rng.integers(2, 4))):
        start = (int(w / 2), int(h * rng.uniform(0.35, 0.7)))
        end = (int(rng.uniform(0.05, 0.95) * w), int(rng.uniform(0.5, 0.98) * h))
        cv2.line(mask, start, end, 1, thickness=int(max(2, 0.08 * min(h, w))))
    return mask


def draw_region(rng, image, shape, rel_size, feather, min_size=6):
    """A feathered region of ``shape`` at a random place in ``image`` (HxWx3 uint8).

    ``rel_size`` = (low, high): the region's half-width as a fraction of the image's short side.
    ``feather``: the blend's Gaussian sigma as a fraction of the region's smaller half-side.
    Returns (alpha float32 over the box, box (y0, y1, x0, x1)).
    """
    if shape not in REGION_SHAPES:
        raise ValueError(f"unknown region shape {shape!r}; expected one of {REGION_SHAPES}")
    height, width = image.shape[:2]
    short = min(height, width)
    half_w = max(min_size / 2, rng.uniform(*rel_size) * short)
    half_h = max(min_size / 2, half_w * rng.uniform(0.8, 1.4))
    box_w, box_h = int(min(width, 2 * half_w)), int(min(height, 2 * half_h))
    y_top = int(rng.integers(0, height - box_h + 1))
    x_left = int(rng.integers(0, width - box_w + 1))
    if shape == "superpixels":
        hard = _superpixels(rng, box_h, box_w, image[y_top:y_top + box_h, x_left:x_left + box_w])
    else:
        hard = {"ellipse": _ellipse, "polygon": _polygon, "blob": _blob, "stroke": _stroke,
                "silhouette": _silhouette}[shape](rng, box_h, box_w)
    if not hard.any():  # degenerate draws on tiny boxes: fall back to the ellipse
        hard = _ellipse(rng, box_h, box_w)
    sigma = max(0.8, feather * min(box_h, box_w) / 2)
    # The blur reaches about 3 sigma past the shape: pad the box by that, inside the image.
    pad = int(np.ceil(3 * sigma)) + 1
    y0, y1 = max(0, y_top - pad), min(height, y_top + box_h + pad)
    x0, x1 = max(0, x_left - pad), min(width, x_left + box_w + pad)
    canvas = np.zeros((y1 - y0, x1 - x0), np.float32)
    canvas[y_top - y0:y_top - y0 + box_h, x_left - x0:x_left - x0 + box_w] = hard
    alpha = cv2.GaussianBlur(canvas, (0, 0), sigma)
    return alpha, (y0, y1, x0, x1)
