"""``ExportableNetwork``: the part of ``DDLMask2Former.predict`` that goes into an exported file.

One normalized image batch in (B, C, H, W) float32, any H and W (the same for the batch), in the
network's channel order; out ``fake_logit`` (B,) (the detection head's logit) and ``mask_prob``
(B, H, W), the forgery map at the input size, exactly as ``DDLMask2Former.inference`` computes
it before its last resize to the original image size. Inside: the noise residuals (from the
pixels the normalized input came from), the padding to the model's size divisibility, the
network, the query combination and the upsampling to the padded input, then the crop back to
H x W. Outside (``runtime.py``): resizing to the test scale, tiling, flip and the verdict,
which are the same whatever runs the network.
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ExportableNetwork"]


class ExportableNetwork(nn.Module):
    """Wraps an eval-mode ``DDLMask2Former`` (shares its modules; holds no weights of its own)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.divisibility = max(int(model.size_divisibility), 1)

    @property
    def output_names(self):
        names = []
        if self.model.detection:
            names.append("fake_logit")
        if self.model.localization:
            names.append("mask_prob")
        return names

    def forward(self, normalized):
        model = self.model
        height, width = normalized.shape[-2], normalized.shape[-1]
        network_input = normalized
        if model.noise_residuals is not None:
            # The residuals are computed on the 0-255 pixels, before padding (as _preprocess does).
            pixels = normalized * model.pixel_std + model.pixel_mean
            network_input = torch.cat([normalized, model.noise_residuals(pixels)], dim=1)
        # Padded size as a multiple of the divisibility: (h + d - 1) // d * d, which the exporters'
        # shape reasoning can prove divisible (a modulo of a symbolic size it cannot always).
        padded_height = (height + self.divisibility - 1) // self.divisibility * self.divisibility
        padded_width = (width + self.divisibility - 1) // self.divisibility * self.divisibility
        network_input = F.pad(network_input, (0, padded_width - width, 0, padded_height - height))
        det_logits, decoded = model._network(network_input)
        outputs = []
        if model.detection:
            outputs.append(det_logits.float())
        if model.localization:
            combined = model.combine_query_masks(decoded["pred_logits"], decoded["pred_masks"],
                                                 model.target_classes)
            upsampled = F.interpolate(combined[:, None], size=(padded_height, padded_width),
                                      mode="bilinear", align_corners=False)
            outputs.append(upsampled[:, 0, :height, :width])
        return tuple(outputs)
