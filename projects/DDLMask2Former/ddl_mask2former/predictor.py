"""``ForgeryPredictor``: a trained DDL-Mask2Former applied to images, shaped like detectron2's
``DefaultPredictor`` (config and weights in, image in, outputs out)::

    from detectron2.config import get_cfg
    from ddl_mask2former import add_ddl_mask2former_config, ForgeryPredictor

    cfg = get_cfg()
    add_ddl_mask2former_config(cfg)
    cfg.merge_from_file("configs/ddl-i/ddl_mask2former_swin_tiny.yaml")
    cfg.MODEL.WEIGHTS = "output/model_final.pth"
    predictor = ForgeryPredictor(cfg)
    out = predictor("photo.jpg")            # {"fake_prob", "mask_prob", "mask"}
    outs = predictor(["a.png", "b.png"])    # one dict per image, in order

    # the same predictions from an exported file (tools/export_model.py), no model build:
    predictor = ForgeryPredictor.from_exported("model.onnx")

Each image is resized to the config's test scale (``INPUT.BASE_SCALE``) for the network, or kept
at its native size and predicted tile by tile with ``TEST.TILE.ENABLED``; the outputs come back
at the image's original size.
"""
import logging
import os
from collections import defaultdict
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from PIL import Image

from .data import DDLDatasetMapper, read_image
from .data.augmentations import BaseScaleResize
from .data.image_io import to_uint8_gray_or_rgb

__all__ = ["ForgeryPredictor", "ImageInput", "load_image"]

logger = logging.getLogger(__name__)

# What one image may be: a file path, a uint8 HxWx3 array or a PIL image.
ImageInput = Union[str, os.PathLike, np.ndarray, Image.Image]

_CHANNEL_ORDERS = ("RGB", "BGR")


def _describe(source: ImageInput, index: int, batched: bool) -> str:
    """How errors name an input: its path, else its position in the list."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return f"input {index}" if batched else "input image"


def load_image(source: ImageInput, format: str = "RGB", name: str = "input image") -> np.ndarray:
    """Any accepted input -> uint8 HxWx3 RGB array at its original size.

    Args:
        source: a file path (decoded with EXIF orientation applied, like the dataset loader),
            a uint8 HxWx3 numpy array in ``format`` channel order, or a PIL image (any mode;
            converted to RGB as it is, without EXIF rotation).
        format: channel order of an array input, "RGB" (Pillow, matplotlib) or "BGR"
            (``cv2.imread``); ignored for paths and PIL images.
        name: how error messages name an array or PIL input.

    Raises:
        DDLDataError naming the path for a missing, non-image or corrupt file; ValueError or
        TypeError naming ``name`` for an array of the wrong shape or type or another object.
    """
    if format not in _CHANNEL_ORDERS:
        raise ValueError(f"format must be 'RGB' or 'BGR', got {format!r}")
    if isinstance(source, (str, os.PathLike)):
        return read_image(os.fspath(source), format="RGB")
    if isinstance(source, Image.Image):
        return np.ascontiguousarray(to_uint8_gray_or_rgb(source, gray=False))
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise ValueError(f"{name}: expected a uint8 HxWx3 array, got {source.dtype} "
                             f"{source.shape}")
        if min(source.shape[:2]) == 0:
            raise ValueError(f"{name}: empty image of shape {source.shape}")
        return np.ascontiguousarray(source[:, :, ::-1] if format == "BGR" else source)
    raise TypeError(f"{name}: expected a file path, a uint8 HxWx3 numpy array or a PIL image, "
                    f"got {type(source).__name__}")


class ForgeryPredictor:
    """A DDL-Mask2Former model built from ``cfg`` with weights from ``cfg.MODEL.WEIGHTS``.

    ``predictor(image)`` returns one dict; ``predictor([image, ...])`` a list of them, in order.
    An image is a file path, a uint8 HxWx3 numpy array (RGB unless ``format="BGR"``, e.g. for
    ``cv2.imread`` output) or a PIL image. Each dict holds, at the image's original size:

    * ``fake_prob``: float, calibrated probability that the image is forged, by the verdict
      rule ``MODEL.DDL.VERDICT.RULE`` (``modeling/verdict.py``);
    * ``is_fake``: bool, the verdict: ``fake_prob > self.threshold`` (the threshold calibrated at
      ``MODEL.DDL.VERDICT.TARGET_FPR`` and stored with the weights);
    * ``mask_prob``: float32 HxW numpy array in [0, 1], per-pixel forgery probability (all zero
      for an image called real under the default mask policy "gate");
    * ``mask``: bool HxW numpy array, ``mask_prob > 0.5``.

    Keys of a branch that ``MODEL.DDL.TASKS`` turns off are absent. The network sees the image
    in ``cfg.INPUT.FORMAT`` channel order at the test scale (native size, in tiles, with
    ``TEST.TILE.ENABLED``), exactly as in evaluation (``DDLDatasetMapper(cfg, is_train=False)``).

    A list is run ``batch_size`` images at a time; within that, only images that the test
    resize brings to the same size share a forward pass, so padding never mixes images and each
    result matches predicting that image alone. Inputs that cannot be read raise an error
    naming the file (or the list position of an array or PIL image).
    """

    def __init__(self, cfg, batch_size: int = 4):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.cfg = cfg.clone()
        self.batch_size = batch_size
        self.model = build_model(self.cfg)
        self.model.eval()
        if self.cfg.MODEL.WEIGHTS:
            DetectionCheckpointer(self.model).load(self.cfg.MODEL.WEIGHTS)
        else:
            logger.warning("MODEL.WEIGHTS is empty: predicting with random weights")
        # The evaluation mapper's resize and channel order, so predictions match evaluation.
        mapper = DDLDatasetMapper(self.cfg, is_train=False)
        self.augmentations = mapper.augmentations
        self.input_format = mapper.image_format
        self._warn_if_uncalibrated(self.cfg.MODEL.WEIGHTS or "the model")

    @classmethod
    def from_exported(cls, path, batch_size: int = 4, providers=None, num_threads=None) -> "ForgeryPredictor":
        """A predictor that runs an exported file (``tools/export_model.py``): ``model.onnx``
        through ONNX Runtime or ``model.pt2`` (``torch.export``), with the test resize, tiling,
        flip and verdict stored in the JSON beside it. Called exactly like the PyTorch one.

        ``providers``, ``num_threads``: ONNX Runtime's execution providers (default CPU) and
        intra-op threads. No config, model build or checkpoint is involved.
        """
        from .deploy import ExportedModel

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        predictor = cls.__new__(cls)
        predictor.cfg = None
        predictor.batch_size = batch_size
        predictor.model = ExportedModel(path, providers=providers, num_threads=num_threads)
        resize = predictor.model.test_resize
        predictor.augmentations = T.AugmentationList(
            [] if resize is None else [BaseScaleResize(tuple(resize["base_scale"]), enlarge=resize["enlarge"])])
        predictor.input_format = predictor.model.input_format
        predictor._warn_if_uncalibrated(os.fspath(path))
        return predictor

    def _warn_if_uncalibrated(self, name):
        verdict = getattr(self.model, "verdict", None)
        if verdict is not None and verdict.enabled and not verdict.calibrated:
            logger.warning("%s holds no verdict calibration: fake_prob is the uncalibrated '%s' score and "
                           "the verdict threshold is 0.5 (train with DATASETS.CALIBRATION to calibrate)",
                           name, verdict.rule)

    @property
    def threshold(self) -> float:
        """``fake_prob`` above which an image is called fake."""
        verdict = getattr(self.model, "verdict", None)
        return verdict.threshold if verdict is not None and verdict.enabled else 0.5

    def __call__(self, images: Union[ImageInput, Sequence[ImageInput]],
                 format: str = "RGB") -> Union[Dict, List[Dict]]:
        """Predict one image (returns a dict) or a list or tuple of images (a list of dicts).

        ``format`` is the channel order of numpy array inputs: "RGB" or "BGR".
        """
        batched = isinstance(images, (list, tuple))
        sources = list(images) if batched else [images]
        results = []
        for start in range(0, len(sources), self.batch_size):
            records = [
                self._model_input(source, start + offset, batched, format)
                for offset, source in enumerate(sources[start:start + self.batch_size])
            ]
            results.extend(self._run(records))
        return results if batched else results[0]

    def _model_input(self, source: ImageInput, index: int, batched: bool, format: str) -> Dict:
        name = _describe(source, index, batched)
        rgb = load_image(source, format=format, name=name)
        height, width = rgb.shape[:2]
        aug_input = T.AugInput(rgb)
        self.augmentations(aug_input)
        network_image = aug_input.image
        if self.input_format == "BGR":
            network_image = network_image[:, :, ::-1]
        tensor = torch.from_numpy(np.ascontiguousarray(network_image.transpose(2, 0, 1)))
        return {"image": tensor, "height": height, "width": width, "file_name": name,
                "image_id": name}

    def _run(self, records: List[Dict]) -> List[Dict]:
        # Same-size inputs only in one forward pass: padding would change the others' results.
        by_size: Dict[Tuple[int, ...], List[int]] = defaultdict(list)
        for index, record in enumerate(records):
            by_size[tuple(record["image"].shape)].append(index)
        results: List[Dict] = [{} for _ in records]
        with torch.no_grad():
            for indices in by_size.values():
                outputs = self.model([records[i] for i in indices])
                for i, output in zip(indices, outputs):
                    results[i] = _to_numpy(output)
        return results


def _to_numpy(output: Dict) -> Dict:
    prediction = {}
    if "fake_prob" in output:
        prediction["fake_prob"] = float(output["fake_prob"])
    if "is_fake" in output:
        prediction["is_fake"] = bool(output["is_fake"])
    if "mask_prob" in output:
        prediction["mask_prob"] = output["mask_prob"].float().cpu().numpy()
        prediction["mask"] = output["mask"].cpu().numpy().astype(bool)
    return prediction
