"""DDLMask2Former: joint deepfake detection and forgery localization (paper section 3).

A shared backbone feeds two independent branches, selected by ``MODEL.DDL.TASKS``:

* detection: ``DetectionHead`` (pooled backbone features -> linear) gives the image logit;
  L_det is BCE against the image label.
* localization: pixel decoder -> masked-attention transformer decoder -> per-query masks and
  foreground confidences; L_loc from ``LocalizationCriterion``.

Training returns ``{"loss_det": det_weight * L_det, "loss_cls": ..., "loss_mask": ...,
"loss_dice": ..., "loss_cls_0": ... (deep supervision)}``, already weighted so that their sum
is ``det_weight * L_det + loc_weight * L_loc`` (paper eq. 5).

Localization targets, chosen by ``MODEL.DDL.TARGET_CLASSES``:
* ``["forged"]``: ONE target per image, the union of all forged pixels (none when the crop
  holds no forged pixel). The annotations are a single binary map per image with nothing that
  groups pixels into manipulations; connected components would split one manipulation into
  arbitrary pieces and merge touching faces, and pixel F1/IoU only see the union anyway.
* ``["authentic", "forged"]``: also one "authentic" target, the crop's valid pixels that are
  not forged. This is MMSegmentation's Mask2Former set up for a binary task (one target per
  class present), as the paper trained it: every crop, real ones included, gets dense mask
  supervision, instead of only the crops that keep forged pixels.
Queries carry one confidence logit per class; matching and losses use the target's class.

Inference, per image, at the input dict's ``height`` x ``width`` (the original size):
* the head's probability sigmoid(detection logit), a 0-dim tensor;
* ``mask_prob``: for each class k, s_k(x) = max over queries q of sigmoid(confidence_qk) *
  sigmoid(mask_q(x)) (the most confident query covering x); ``mask_prob = s_forged`` for
  ``["forged"]``, and ``s_forged / (s_forged + s_authentic)`` for two classes (computed as
  sigmoid(log s_forged - log s_authentic), exact however small both are). Max rather than a sum
  or noisy-OR keeps each s_k in [0, 1] without many low-confidence queries adding up to a false
  positive. It is computed at 1/4 of the (base-scale) network input, then this single map is
  upsampled bilinearly (to the padded input, cropped to the image, then to the original size),
  so a 4096-px image costs one H x W float map, never Q of them;
* ``mask`` = ``mask_prob > 0.5`` (for two classes: the forged score beats the authentic one).
Then, on the whole image (after tiling and flip), the ``Verdict`` (``verdict.py``,
``MODEL.DDL.VERDICT``) makes the final ``fake_prob`` from the head's probability and/or the map
by the configured rule and calibration, adds ``is_fake`` and applies the mask policy (by
default an image called real gets an empty map). Keys of a disabled task are absent.

Test-time options (``predict``): with ``TEST.TILE.ENABLED`` each image is predicted tile by tile
at its native resolution (``tiled_inference.py``); with ``TEST.AUG.ENABLED`` (flip) every
forward pass also runs the inputs mirrored left-right, and the outputs are averaged with the
mirrored outputs flipped back (``fake_prob`` and ``mask_prob``, then ``mask`` again). Flip
composes with tiling: each batch of tiles is flipped. With ``TEST.CUDA_GRAPH`` the network's
forward on CUDA replays a captured CUDA graph per input shape (``cuda_graph.py``).
"""
import logging

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList

from .criterion import LocalizationCriterion
from .cuda_graph import CudaGraphRunner
from .detection_head import DetectionHead
from .host_to_device import to_device_async
from .noise_residuals import NoiseResiduals
from .pixel_decoder import build_pixel_decoder
from .precision import float32_region
from .targets import LocalizationTargets
from .tiled_inference import TiledInference
from .transformer_decoder import build_transformer_decoder
from .verdict import Verdict

TASKS = ("detection", "localization")
# The two supported MODEL.DDL.TARGET_CLASSES, see the module docstring.
TARGET_CLASS_CHOICES = (("forged",), ("authentic", "forged"))
IGNORE_VALUE = 255


@META_ARCH_REGISTRY.register()
class DDLMask2Former(nn.Module):
    @configurable
    def __init__(
        self,
        *,
        backbone,
        tasks,
        pixel_decoder=None,
        transformer_decoder=None,
        criterion=None,
        detection_head=None,
        det_weight=0.1,
        pixel_mean=(123.675, 116.28, 103.53),
        pixel_std=(58.395, 57.12, 57.375),
        size_divisibility=32,
        noise_residuals=None,
        target_classes=("forged",),
        tiling=None,
        flip=False,
        cuda_graph=False,
        verdict=None,
    ):
        """``tiling``: a ``TiledInference`` (None: the whole input at once); ``flip``: horizontal
        flip test-time augmentation; ``cuda_graph``: inference forwards on CUDA through
        ``CudaGraphRunner``; ``verdict``: the ``Verdict`` that makes the final ``fake_prob`` and
        applies the mask policy (None: the head's probability and the map as they come).
        Other arguments: see ``from_config``."""
        super().__init__()
        tasks = tuple(tasks)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"MODEL.DDL.TASKS must be a non-empty subset of {TASKS}, got {list(tasks)}")
        self.tasks = tasks
        target_classes = tuple(target_classes)
        if target_classes not in TARGET_CLASS_CHOICES:
            raise ValueError(f"MODEL.DDL.TARGET_CLASSES must be one of {[list(c) for c in TARGET_CLASS_CHOICES]}, "
                             f"got {list(target_classes)}")
        self.target_classes = target_classes
        self.backbone = backbone
        if self.localization and (pixel_decoder is None or transformer_decoder is None or criterion is None):
            raise ValueError("localization task needs pixel_decoder, transformer_decoder and criterion")
        if self.detection and detection_head is None:
            raise ValueError("detection task needs detection_head")
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.criterion = criterion
        self.detection_head = detection_head
        self.det_weight = det_weight
        # Optional fixed high-pass channels appended to the normalized RGB (NoiseResiduals).
        self.noise_residuals = noise_residuals
        self.size_divisibility = max(size_divisibility, getattr(backbone, "size_divisibility", 0))
        if tiling is not None and tiling.tile_size % self.size_divisibility:
            raise ValueError(f"TEST.TILE.SIZE must be a multiple of {self.size_divisibility} (the model's "
                             f"input size divisibility), got {tiling.tile_size}")
        self.tiling = tiling
        self.flip = flip
        self.cuda_graph = CudaGraphRunner(self._network, self) if cuda_graph else None
        self.verdict = verdict
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        ddl = cfg.MODEL.DDL
        noise_residuals = NoiseResiduals(len(cfg.MODEL.PIXEL_MEAN)) if ddl.NOISE_RESIDUALS else None
        in_channels = len(cfg.MODEL.PIXEL_MEAN) + (noise_residuals.out_channels if noise_residuals else 0)
        backbone = build_backbone(cfg, ShapeSpec(channels=in_channels))
        args = {
            "backbone": backbone,
            "noise_residuals": noise_residuals,
            "tasks": tuple(ddl.TASKS),
            "det_weight": ddl.LOSS.DET_WEIGHT,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": ddl.SIZE_DIVISIBILITY,
            "target_classes": tuple(ddl.TARGET_CLASSES),
            "tiling": TiledInference.from_config(cfg),
            "flip": _flip_from_config(cfg),
            "cuda_graph": _cuda_graph_from_config(cfg),
            "verdict": Verdict.from_config(cfg),
        }
        shapes = backbone.output_shape()
        if "localization" in ddl.TASKS:
            pixel_decoder = build_pixel_decoder(cfg, shapes)
            args["pixel_decoder"] = pixel_decoder
            args["transformer_decoder"] = build_transformer_decoder(cfg, pixel_decoder.conv_dim, pixel_decoder.mask_dim)
            args["criterion"] = LocalizationCriterion(cfg)
        if "detection" in ddl.TASKS:
            args["detection_head"] = DetectionHead(
                {k: v.channels for k, v in shapes.items()}, tuple(ddl.DET_HEAD.IN_FEATURES), ddl.DET_HEAD.DROPOUT,
                ddl.DET_HEAD.POOLING,
            )
        return args

    @property
    def detection(self):
        return "detection" in self.tasks

    @property
    def localization(self):
        return "localization" in self.tasks

    @property
    def device(self):
        return self.pixel_mean.device

    def _preprocess(self, batched_inputs):
        images = []
        for index, record in enumerate(batched_inputs):
            image = record.get("image")
            if image is None or image.dim() != 3 or image.shape[0] != self.pixel_mean.shape[0]:
                shape = None if image is None else tuple(image.shape)
                raise ValueError(
                    f"input {index} ({record.get('file_name', 'no file_name')}): 'image' must be a "
                    f"({self.pixel_mean.shape[0]}, H, W) tensor, got {shape}"
                )
            images.append(image)
        if len({tuple(image.shape) for image in images}) == 1:
            # Same-size batch (training crops): one host->device copy and batched normalization.
            pixels = torch.stack(images).to(self.device, non_blocking=True).float()
            normalized = (pixels - self.pixel_mean) / self.pixel_std
            if self.noise_residuals is not None:
                normalized = torch.cat([normalized, self.noise_residuals(pixels)], dim=1)
            # ImageList.from_tensors would copy the batch in image by image; pad it in one go.
            height, width = normalized.shape[-2:]
            step = max(self.size_divisibility, 1)
            pad_bottom, pad_right = -height % step, -width % step
            if pad_bottom or pad_right:
                normalized = F.pad(normalized, (0, pad_right, 0, pad_bottom), value=0.0)
            return ImageList(normalized.contiguous(), [(height, width)] * len(images))
        normalized_images = []
        for image in images:
            pixels = image.to(self.device, non_blocking=True).float()
            normalized = (pixels - self.pixel_mean) / self.pixel_std
            if self.noise_residuals is not None:
                normalized = torch.cat([normalized, self.noise_residuals(pixels[None])[0]])
            normalized_images.append(normalized)
        return ImageList.from_tensors(normalized_images, self.size_divisibility)

    def _localization_targets(self, batched_inputs, padded_shape):
        """``LocalizationTargets`` of the batch on the device, in one host->device copy: slot k of
        every image is the mask of ``target_classes[k]``, present when the class has a pixel there.

        Fixed shapes, and nothing read back from the device: the masks move as one padded
        (B, H, W) tensor and everything else is computed from it on the device.
        """
        forgery_masks = []
        for record in batched_inputs:
            forgery_mask = record.get("forgery_mask")
            name = record.get("file_name", "training input")
            if forgery_mask is None:
                raise ValueError(f"{name}: localization training needs 'forgery_mask'")
            if tuple(forgery_mask.shape) != tuple(record["image"].shape[-2:]):
                raise ValueError(
                    f"{name}: forgery_mask shape {tuple(forgery_mask.shape)} differs from the image's "
                    f"{tuple(record['image'].shape[-2:])}"
                )
            forgery_masks.append(forgery_mask)
        height, width = padded_shape
        if all(tuple(m.shape) == (height, width) and m.device == forgery_masks[0].device for m in forgery_masks):
            padded = torch.stack(forgery_masks)  # training crops: already the padded size
        else:
            padded = torch.full((len(forgery_masks), height, width), IGNORE_VALUE, dtype=forgery_masks[0].dtype,
                                device=forgery_masks[0].device)
            for index, forgery_mask in enumerate(forgery_masks):
                padded[index, : forgery_mask.shape[0], : forgery_mask.shape[1]] = forgery_mask.to(padded.device)
        padded = padded.to(self.device, non_blocking=True)
        class_values = [1 if cls == "forged" else 0 for cls in self.target_classes]
        # (B, K, H, W): each image's mask of each target class. Padding is IGNORE_VALUE, so a
        # class is present after padding exactly when it was in the original mask.
        masks = torch.stack([padded == value for value in class_values], 1)
        present = masks.flatten(2).any(2)
        labels = torch.arange(len(class_values), device=self.device).expand(len(forgery_masks), -1)
        return LocalizationTargets(masks, labels, present, padded != IGNORE_VALUE)

    def _labels(self, batched_inputs):
        labels = []
        for record in batched_inputs:
            if "label" not in record:
                raise ValueError(f"{record.get('file_name', 'training input')}: detection training needs 'label'")
            labels.append(float(record["label"]))
        return to_device_async(labels, self.device, torch.float32)

    def _run_network(self, batched_inputs):
        images = self._preprocess(batched_inputs)
        if self.cuda_graph is not None:
            det_logits, decoded = self.cuda_graph(images.tensor)
        elif len(set(images.image_sizes)) > 1:
            # Images of several sizes, padded to the largest: the head skips padding-only cells.
            det_logits, decoded = self._network(images.tensor, images.image_sizes)
        else:
            det_logits, decoded = self._network(images.tensor)
        return images, det_logits, decoded

    def _network(self, tensor, image_sizes=None):
        """Normalized, padded batch -> (detection logits or None, decoder outputs or None);
        ``image_sizes`` when the batch mixes sizes (see ``DetectionHead``)."""
        features = self.backbone(tensor)
        det_logits = None
        if self.detection:
            det_logits = self.detection_head(features, image_sizes, tuple(tensor.shape[-2:]))
        decoded = None
        if self.localization:
            mask_features, multi_scale = self.pixel_decoder(features)
            # Earlier layers' full-resolution masks are only needed for deep supervision.
            all_masks = self.training and self.criterion.deep_supervision
            decoded = self.transformer_decoder(multi_scale, mask_features, all_masks=all_masks)
        return det_logits, decoded

    def forward(self, batched_inputs):
        if not self.training:
            return self.predict(batched_inputs)
        images, det_logits, decoded = self._run_network(batched_inputs)
        losses = {}
        if self.detection:
            with float32_region(self.device.type):
                bce = F.binary_cross_entropy_with_logits(det_logits.float(), self._labels(batched_inputs))
            losses["loss_det"] = self.det_weight * bce
        if self.localization:
            targets = self._localization_targets(batched_inputs, images.tensor.shape[-2:])
            losses.update(self.criterion(decoded, targets))
        return losses

    def predict(self, batched_inputs):
        """Inference outputs, one dict per input: tiled (``self.tiling``) or whole inputs, then
        the verdict (calibrated ``fake_prob``, ``is_fake``, mask policy) on each whole image."""
        return predict_whole_images(batched_inputs, self.predict_views, self.tiling, self.verdict)

    def predict_views(self, batched_inputs):
        """Outputs for the inputs as given, averaged with their mirror images' when ``self.flip``."""
        if not self.flip:
            return self.inference(batched_inputs, *self._run_network(batched_inputs))
        mirrored = [dict(record, image=record["image"].flip(-1)) for record in batched_inputs]
        both = list(batched_inputs) + mirrored
        outputs = self.inference(both, *self._run_network(both))
        count = len(batched_inputs)
        return [_average_with_mirrored(output, mirrored_output)
                for output, mirrored_output in zip(outputs[:count], outputs[count:])]

    def inference(self, batched_inputs, images, det_logits, decoded):
        padded_shape = images.tensor.shape[-2:]
        output_sizes = []
        for index, record in enumerate(batched_inputs):
            image_size = images.image_sizes[index]
            output_sizes.append((int(record.get("height", image_size[0])), int(record.get("width", image_size[1]))))
        fake_probs = det_logits.float().sigmoid() if self.detection else None
        mask_probs = [None] * len(batched_inputs)
        if self.localization:
            combined = self.combine_query_masks(decoded["pred_logits"], decoded["pred_masks"], self.target_classes)
            sizes = {(tuple(images.image_sizes[i]), output_sizes[i]) for i in range(len(batched_inputs))}
            if len(sizes) == 1:
                # Same image and output size for the whole batch: one resize for all of it.
                ((image_size, output_size),) = sizes
                mask_probs = list(self.resize_probability(combined, padded_shape, image_size, output_size).unbind(0))
            else:
                mask_probs = [self.resize_probability(combined[i], padded_shape, images.image_sizes[i], output_sizes[i])
                              for i in range(len(batched_inputs))]
        results = []
        for index in range(len(batched_inputs)):
            result = {}
            if self.detection:
                result["fake_prob"] = fake_probs[index]
            if self.localization:
                result["mask_prob"] = mask_probs[index]
                result["mask"] = mask_probs[index] > 0.5
            results.append(result)
        return results

    @staticmethod
    def combine_query_masks(query_logits, mask_logits, target_classes=("forged",)):
        """([B,] Q, K) confidence logits and ([B,] Q, h, w) mask logits -> ([B,] h, w) forgery probability.

        Per class, the max over queries of confidence x mask probability; with an authentic
        class, the forged share of the two (see the module docstring).
        """
        # In log space: log(sigmoid(c) * sigmoid(m)) = logsigmoid(c) + logsigmoid(m), and the max
        # over queries commutes with the log. The two-class share is then sigmoid(log forged -
        # log authentic), which is > 0.5 exactly when forged beats authentic, however small both
        # scores are (a ratio of the products needs a floor on its denominator and loses that).
        log_confidence = F.logsigmoid(query_logits.float())
        log_masks = F.logsigmoid(mask_logits.float())
        # (..., K, h, w): one query-max map per class, without materializing (Q, K, h, w).
        log_scores = torch.stack([(log_confidence[..., k, None, None] + log_masks).amax(dim=-3)
                                  for k in range(log_confidence.shape[-1])], dim=-3)
        log_forged = log_scores[..., target_classes.index("forged"), :, :]
        if "authentic" not in target_classes:
            return log_forged.exp()
        log_authentic = log_scores[..., target_classes.index("authentic"), :, :]
        return torch.sigmoid(log_forged - log_authentic)

    @staticmethod
    def resize_probability(mask_prob, padded_shape, image_size, output_size):
        """([B,] h, w) stride-4 map -> padded input size -> crop the image's region -> bilinear to
        the original size."""
        batched = mask_prob.dim() == 3
        maps = mask_prob[:, None] if batched else mask_prob[None, None]
        padded = F.interpolate(maps, size=tuple(padded_shape), mode="bilinear", align_corners=False)
        cropped = padded[:, :, : image_size[0], : image_size[1]]
        if tuple(cropped.shape[-2:]) != tuple(output_size):
            cropped = F.interpolate(cropped, size=output_size, mode="bilinear", align_corners=False)
        cropped = cropped[:, 0].clamp(0.0, 1.0)
        return cropped if batched else cropped[0]


def _flip_from_config(cfg):
    """TEST.AUG.ENABLED turns on the flip, the only test-time augmentation there is."""
    if cfg.TEST.AUG.ENABLED and not cfg.TEST.AUG.FLIP:
        raise ValueError("TEST.AUG.ENABLED is on but TEST.AUG.FLIP is off: horizontal flip is the only "
                         "test-time augmentation; turn TEST.AUG.ENABLED off instead")
    return bool(cfg.TEST.AUG.ENABLED)


def _cuda_graph_from_config(cfg):
    """TEST.CUDA_GRAPH, with a warning when the model will not run on CUDA (then it does nothing)."""
    if cfg.TEST.CUDA_GRAPH and not str(cfg.MODEL.DEVICE).startswith("cuda"):
        logging.getLogger(__name__).warning(
            "TEST.CUDA_GRAPH is on but MODEL.DEVICE is %s: CUDA graphs apply to CUDA inputs only, "
            "inference runs eagerly", cfg.MODEL.DEVICE)
    return bool(cfg.TEST.CUDA_GRAPH)


def predict_whole_images(batched_inputs, predict_views, tiling=None, verdict=None):
    """One output per input image: ``predict_views`` on the inputs as given (or ``tiling`` of
    each image over it), then ``verdict`` on each whole image's output. ``DDLMask2Former`` and
    the exported model's runtime (``deploy/runtime.py``) predict through this one path."""
    if tiling is None:
        outputs = predict_views(batched_inputs)
    else:
        outputs = [tiling(record, predict_views) for record in batched_inputs]
    if verdict is None:
        return outputs
    return [verdict(output) for output in outputs]


def _average_with_mirrored(output, mirrored_output):
    """Mean of an output and the output of the mirrored input, flipped back."""
    averaged = {}
    if "fake_prob" in output:
        averaged["fake_prob"] = 0.5 * (output["fake_prob"] + mirrored_output["fake_prob"])
    if "mask_prob" in output:
        mask_prob = 0.5 * (output["mask_prob"] + mirrored_output["mask_prob"].flip(-1))
        averaged["mask_prob"] = mask_prob
        averaged["mask"] = mask_prob > 0.5
    return averaged
