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
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from PIL import Image

from ddl_mask2former_serve.images import ImageReadError
from ddl_mask2former_serve.images import load_image as serving_load_image

from .data import DDLDataError, DDLDatasetMapper
from .engine.checkpoint import TrainedModelCheckpointer

__all__ = ["ForgeryPredictor", "ImageInput", "load_image"]

logger = logging.getLogger(__name__)

# What one image may be: a file path, a uint8 array (HxWx3, or grayscale HxW / HxWx1) or a PIL image.
ImageInput = Union[str, os.PathLike, np.ndarray, Image.Image]


def _describe(source: ImageInput, index: int, batched: bool) -> str:
    """How errors name an input: its path, else its position in the list."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return f"input {index}" if batched else "input image"


def load_image(source: ImageInput, format: str = "RGB", name: str = "input image") -> np.ndarray:
    """Any accepted input -> uint8 HxWx3 RGB array at its original size
    (``ddl_mask2former_serve.images.load_image``).

    Args:
        source: a file path (decoded with EXIF orientation applied, like the dataset loader),
            a uint8 numpy array (HxWx3 in ``format`` channel order, or grayscale HxW / HxWx1 as
            ``cv2.imread(path, 0)`` gives, replicated to three channels), or a PIL image (any
            mode; converted to RGB as it is, without EXIF rotation).
        format: channel order of a 3-channel array, "RGB" (Pillow, matplotlib) or "BGR"
            (``cv2.imread``); ignored for paths, grayscale arrays and PIL images.
        name: how error messages name an array or PIL input.

    Raises:
        DDLDataError naming the path for a missing, non-image or corrupt file; ValueError or
        TypeError naming ``name`` for an array of the wrong shape or type or another object.
    """
    try:
        return serving_load_image(source, format=format, name=name)
    except DDLDataError:
        raise
    except ImageReadError as exc:
        raise DDLDataError(exc.path, exc.problem) from exc.__cause__


class ForgeryPredictor:
    """A DDL-Mask2Former model built from ``cfg`` with weights from ``cfg.MODEL.WEIGHTS``
    (``engine.CheckpointMismatchError`` when they do not fit the model of ``cfg``).

    ``predictor(image)`` returns one dict; ``predictor([image, ...])`` a list of them, in order.
    An image is a file path, a uint8 HxWx3 numpy array (RGB unless ``format="BGR"``, e.g. for
    ``cv2.imread`` output), a grayscale HxW or HxWx1 uint8 array, or a PIL image. Each dict holds, at the image's original size:

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
            checkpointer = TrainedModelCheckpointer(self.model, backbone_name=self.cfg.MODEL.BACKBONE.NAME)
            checkpointer.load(self.cfg.MODEL.WEIGHTS)
        else:
            logger.warning("MODEL.WEIGHTS is empty: predicting with random weights")
        # The evaluation mapper's resize and channel order, so predictions match evaluation.
        mapper = DDLDatasetMapper(self.cfg, is_train=False)
        self.augmentations = mapper.augmentations
        self.input_format = mapper.image_format
        self._warn_if_uncalibrated(self.cfg.MODEL.WEIGHTS or "the model")

    @staticmethod
    def from_exported(path, providers=None, num_threads=None):
        """A predictor for an exported file (``tools/export_model.py``), called exactly like this
        one: ``model.onnx`` through ONNX Runtime, or ``model.pt2`` (``torch.export``), with the
        test resize, tiling, flip and verdict stored in the JSON beside it. Returns a
        ``ddl_mask2former.deploy.ExportedPredictor`` (the torch-free runtime of
        ``ddl_mask2former_serve``); no config, model build or checkpoint is involved.

        ``providers``, ``num_threads``: ONNX Runtime's execution providers (default CPU) and
        intra-op threads.
        """
        from .deploy import load_exported

        predictor = load_exported(path, providers=providers, num_threads=num_threads)
        if predictor.model.verdict is not None and not predictor.calibrated:
            logger.warning("%s holds no verdict calibration: fake_prob is the uncalibrated '%s' score and "
                           "the verdict threshold is 0.5", os.fspath(path), predictor.model.verdict["rule"])
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
