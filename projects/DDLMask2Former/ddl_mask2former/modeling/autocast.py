"""The dtype autocast gives matmuls on a device, for code that runs its operations itself."""
import torch

__all__ = ["autocast_dtype"]


def autocast_dtype(device_type):
    """Autocast's low-precision dtype on ``device_type`` ("cuda", "cpu"), or None when autocast
    is off there."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
