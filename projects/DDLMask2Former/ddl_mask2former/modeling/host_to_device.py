"""Small host data (indices, labels) onto the device without draining it.

``torch.tensor(values, device="cuda")`` and ``cpu_tensor.to("cuda")`` copy from pageable memory
and then wait for the stream: every kernel queued so far must finish first, and the GPU idles
while the host launches the next ones. Copying from pinned memory with ``non_blocking=True``
queues the copy behind those kernels instead (PyTorch keeps the pinned block alive until the
copy has run).
"""
import torch

__all__ = ["to_device_async"]


def to_device_async(values, device, dtype=None):
    """``values`` (a list, a number or a CPU tensor) as a tensor on ``device``, copied without a
    host synchronization when ``device`` is a GPU."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
