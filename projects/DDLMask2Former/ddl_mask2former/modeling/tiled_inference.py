"""Tiled inference at native resolution (``TEST.TILE``).

Forgery traces live in single pixels, and the test-time resize to ``INPUT.BASE_SCALE`` throws
most of a large photo's pixels away. With ``TEST.TILE.ENABLED`` the test input keeps its
native size and the model runs on square tiles of ``TEST.TILE.SIZE`` pixels that overlap their
neighbours by at least ``TEST.TILE.OVERLAP``:

* Placement: tiles start every ``SIZE - OVERLAP`` pixels along each axis and the last one is
  moved back to end at the image border, so every tile has the same size (batchable) and
  lies inside the image. Along an axis shorter than a tile, one tile spans it.
* ``mask_prob``: each tile's map (at the tile's size) is weighted per axis by a ramp
  sin^2(pi/2 * (i + 0.5) / OVERLAP) over its first and last OVERLAP pixels on every side that
  has a neighbour (1 elsewhere) and added up; the sum is divided by the sum of the weights.
  Where two tiles overlap by exactly OVERLAP, their ramps add up to 1; a tile's weight at its
  own edge is ~(pi / (4 * OVERLAP))^2, so no seam shows. The weights of a grid of tiles are
  separable, so the normalizer is an outer product of two 1-D sums and never an H x W buffer:
  memory is one H x W float map (the output) plus one batch of tiles, whatever the image size.
* ``fake_prob``: ``TEST.TILE.FAKE_PROB`` picks how the tiles' scores (and optionally the
  base-scale "global" view of the whole image) make the image's; see ``FAKE_PROB_RULES``.
* An image that fits in one tile is its own one tile, run whole as the plain path runs it, so
  its ``mask_prob`` (and, with ``"tile_max"`` or ``"tile_mean"``, its ``fake_prob``) is exactly
  the plain path's. The rules that use the global view still combine that tile's fake_prob with
  the global view's, so every image of a data set gets its score the same way, whatever its size.

The model's own per-input prediction (``predict_views``: one batch of inputs, optionally with
flip test-time augmentation) is passed in, so this module knows nothing of the network.
"""
import logging
from typing import Callable, Dict, List, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.utils.logger import log_first_n

# The placement, the ramp and the fake_prob rules are defined once, with the serving runtime's
# numpy rules (which runs exported files by the same definitions).
from ddl_mask2former_serve import rules as _rules
from ddl_mask2former_serve.rules import FAKE_PROB_RULES, RULES_WITH_GLOBAL_VIEW, tile_starts

__all__ = ["FAKE_PROB_RULES", "TiledInference", "TiledPrediction", "tile_starts", "tile_weights"]

PredictViews = Callable[[List[Dict]], List[Dict]]


class TiledPrediction(NamedTuple):
    """What tiling one image gives, before the fake_prob rule: ``mask_prob`` at the output size
    (None without localization), the tiles' ``fake_prob``s in row-major tile order and the
    global view's (None without detection, or when the global view was not run)."""

    mask_prob: Optional[torch.Tensor]
    tile_fake_probs: Optional[torch.Tensor]
    global_fake_prob: Optional[torch.Tensor]


def tile_weights(length: int, start: int, tile_length: int, overlap: int) -> torch.Tensor:
    """1-D blending weights of the tile ``[start, start + tile_length)`` on an axis of ``length``
    (``ddl_mask2former_serve.rules.tile_weights``), as a float32 tensor."""
    return torch.from_numpy(_rules.tile_weights(length, start, tile_length, overlap))


class TiledInference:
    """Predict one image tile by tile; built from ``TEST.TILE`` and ``INPUT.BASE_SCALE``."""

    def __init__(self, *, tile_size: int, overlap: int = 64, batch_size: int = 1,
                 fake_prob_rule: str = "tile_max", base_scale=(2048, 512),
                 base_scale_enlarge: bool = True):
        """
        Args:
            tile_size: tile side in pixels (TEST.TILE.SIZE).
            overlap: pixels shared by neighbouring tiles, 0 <= overlap < tile_size.
            batch_size: tiles per call of the model.
            fake_prob_rule: a key of ``FAKE_PROB_RULES``.
            base_scale, base_scale_enlarge: the test resize of the global view
                (INPUT.BASE_SCALE, INPUT.BASE_SCALE_ENLARGE), used by rules that need it.
        """
        if tile_size < 1:
            raise ValueError(f"TEST.TILE.SIZE must be a positive number of pixels, got {tile_size}")
        if not 0 <= overlap < tile_size:
            raise ValueError(f"TEST.TILE.OVERLAP must be in [0, TEST.TILE.SIZE) = [0, {tile_size}), "
                             f"got {overlap}")
        if batch_size < 1:
            raise ValueError(f"TEST.TILE.BATCH_SIZE must be at least 1, got {batch_size}")
        if fake_prob_rule not in FAKE_PROB_RULES:
            raise ValueError(f"TEST.TILE.FAKE_PROB must be one of {sorted(FAKE_PROB_RULES)}, "
                             f"got {fake_prob_rule!r}")
        self.tile_size = tile_size
        self.overlap = overlap
        self.batch_size = batch_size
        self.fake_prob_rule = fake_prob_rule
        self.base_scale = tuple(base_scale)
        self.base_scale_enlarge = base_scale_enlarge

    @classmethod
    def from_config(cls, cfg) -> Optional["TiledInference"]:
        """None when ``TEST.TILE.ENABLED`` is off."""
        tile = cfg.TEST.TILE
        if not tile.ENABLED:
            return None
        return cls(tile_size=tile.SIZE, overlap=tile.OVERLAP, batch_size=tile.BATCH_SIZE,
                   fake_prob_rule=tile.FAKE_PROB, base_scale=tuple(cfg.INPUT.BASE_SCALE),
                   base_scale_enlarge=cfg.INPUT.BASE_SCALE_ENLARGE)

    @property
    def uses_global_view(self) -> bool:
        return self.fake_prob_rule in RULES_WITH_GLOBAL_VIEW

    def __call__(self, record: Dict, predict_views: PredictViews) -> Dict:
        """One input dict -> the model's output dict (``fake_prob``, ``mask_prob``, ``mask``)."""
        return self.image_output(self.predict(record, predict_views))

    def predict(self, record: Dict, predict_views: PredictViews) -> TiledPrediction:
        """The ``TiledPrediction`` of any image, from which ``__call__`` makes its output: the
        tiles, plus the global view when the rule uses it. An image that fits in one tile is
        that tile, run whole as the plain path runs it (output at the record's size)."""
        image = record["image"]
        if image.shape[-2] > self.tile_size or image.shape[-1] > self.tile_size:
            return self.predict_tiles(record, predict_views, self.uses_global_view)
        output = predict_views([record])[0]
        tile_fake_probs = global_fake_prob = None
        if "fake_prob" in output:
            tile_fake_probs = output["fake_prob"].float()[None]
            if self.uses_global_view:
                global_fake_prob = self._global_fake_prob(record, predict_views)
        return TiledPrediction(output.get("mask_prob"), tile_fake_probs, global_fake_prob)

    def image_output(self, prediction: TiledPrediction) -> Dict:
        """The output dict of a ``TiledPrediction``, with fake_prob by ``fake_prob_rule``."""
        output = {}
        if prediction.tile_fake_probs is not None:
            rule = FAKE_PROB_RULES[self.fake_prob_rule]
            output["fake_prob"] = rule(prediction.tile_fake_probs, prediction.global_fake_prob)
        if prediction.mask_prob is not None:
            output["mask_prob"] = prediction.mask_prob
            output["mask"] = prediction.mask_prob > 0.5
        return output

    def predict_tiles(self, record: Dict, predict_views: PredictViews,
                      global_view: bool = False) -> TiledPrediction:
        """Run every tile of ``record["image"]`` (C, H, W) and blend them; with ``global_view``
        also the base-scale view of the whole image, for its fake_prob."""
        image = record["image"]
        height, width = image.shape[-2:]
        output_size = (int(record.get("height", height)), int(record.get("width", width)))
        if output_size != (height, width):
            log_first_n(logging.WARNING,
                        f"TEST.TILE.ENABLED, but {record.get('file_name', 'an input')} arrived "
                        f"resized to {height}x{width} from {output_size[0]}x{output_size[1]}: "
                        "tiles see the resized image; build the test loader with "
                        "DDLDatasetMapper(cfg, is_train=False) from a config with TEST.TILE.ENABLED "
                        "for native resolution", n=1)
        ys = tile_starts(height, self.tile_size, self.overlap)
        xs = tile_starts(width, self.tile_size, self.overlap)
        tile_h, tile_w = min(self.tile_size, height), min(self.tile_size, width)
        weights_y = [tile_weights(height, y, tile_h, self.overlap) for y in ys]
        weights_x = [tile_weights(width, x, tile_w, self.overlap) for x in xs]
        positions = [(iy, ix) for iy in range(len(ys)) for ix in range(len(xs))]
        name = record.get("file_name", "input")

        blended, tile_fake_probs = None, []
        for first in range(0, len(positions), self.batch_size):
            batch = positions[first:first + self.batch_size]
            tiles = [{"image": image[:, ys[iy]:ys[iy] + tile_h, xs[ix]:xs[ix] + tile_w],
                      "file_name": f"{name} tile at y={ys[iy]}, x={xs[ix]}"} for iy, ix in batch]
            for (iy, ix), output in zip(batch, predict_views(tiles)):
                if "fake_prob" in output:
                    tile_fake_probs.append(output["fake_prob"].float())
                if "mask_prob" in output:
                    tile_prob = output["mask_prob"]
                    if blended is None:
                        blended = tile_prob.new_zeros((height, width), dtype=torch.float32)
                    weight = (weights_y[iy].to(tile_prob.device)[:, None]
                              * weights_x[ix].to(tile_prob.device)[None, :])
                    blended[ys[iy]:ys[iy] + tile_h, xs[ix]:xs[ix] + tile_w] += tile_prob.float() * weight
        if blended is not None:
            blended = self._normalize(blended, ys, xs, weights_y, weights_x, output_size)
        global_fake_prob = None
        if global_view and tile_fake_probs:
            global_fake_prob = self._global_fake_prob(record, predict_views)
        fake_probs = torch.stack(tile_fake_probs) if tile_fake_probs else None
        return TiledPrediction(blended, fake_probs, global_fake_prob)

    @staticmethod
    def _normalize(blended, ys, xs, weights_y, weights_x, output_size):
        """Divide the weighted sum by the summed weights (separable: two in-place 1-D divisions)."""
        height, width = blended.shape
        norm_y = torch.zeros(height, dtype=torch.float64)
        for y, weights in zip(ys, weights_y):
            norm_y[y:y + len(weights)] += weights.double()
        norm_x = torch.zeros(width, dtype=torch.float64)
        for x, weights in zip(xs, weights_x):
            norm_x[x:x + len(weights)] += weights.double()
        blended /= norm_y.to(blended.device, torch.float32)[:, None]
        blended /= norm_x.to(blended.device, torch.float32)[None, :]
        if tuple(output_size) != (height, width):
            blended = F.interpolate(blended[None, None], size=tuple(output_size), mode="bilinear",
                                    align_corners=False)[0, 0]
        return blended.clamp_(0.0, 1.0)

    def _global_fake_prob(self, record: Dict, predict_views: PredictViews) -> torch.Tensor:
        return predict_views([self._global_view(record)])[0]["fake_prob"].float()

    def _global_view(self, record: Dict) -> Dict:
        """The whole image resized as the plain test path resizes it (only its fake_prob is used)."""
        # The mapper's own resize, so the "global" rule reproduces the plain path's fake_prob.
        from ..data.augmentations import BaseScaleResize

        image = record["image"]
        pixels = image.permute(1, 2, 0).cpu().numpy()
        resized = BaseScaleResize(self.base_scale, enlarge=self.base_scale_enlarge) \
            .get_transform(pixels).apply_image(pixels)
        tensor = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return {"image": tensor, "file_name": f"{record.get('file_name', 'input')} (global view)"}

