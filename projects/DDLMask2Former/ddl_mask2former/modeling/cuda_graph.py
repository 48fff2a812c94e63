"""``CudaGraphRunner``: inference forwards replayed from CUDA graphs (``TEST.CUDA_GRAPH``).

In eager mode the host dispatches every operator of a forward, about 3,300 for the paper model,
and on the H100 we measured that host at ~20 us per operator: ~65 ms a forward, whatever the
batch, which is more than the GPU needs for the kernels of a batch of 16. A CUDA graph records
the kernels of one forward for one input shape; a replay launches all of them at once.

What runs through a graph: the network from the normalized, padded batch to the detection
logits and the decoder's outputs (``DDLMask2Former._network``). Preprocessing and the
post-processing (combining the queries, resizing to each image's size) stay eager: their
shapes follow each image.

Rules:
* only inference: the model in eval mode, autograd off (``torch.no_grad``), a CUDA input;
  anything else runs eagerly;
* a shape is captured the second time it comes (shapes seen once, as in an evaluation whose
  images keep their aspect ratios, run eagerly and cost nothing extra); capturing runs the
  network twice on a side stream first (lazy initializations and the size caches);
* autocast's cache of cast weights is off inside the graph: the graph casts the weights itself
  (a cached cast would be freed when the caller's autocast region ends);
* at most ``max_graphs`` shapes are kept, least recently used dropped; each keeps the memory of
  one forward at its shape;
* outputs are copied out of the graph's buffers, so results stay valid after the next call;
* the graph keeps alive every tensor the size caches (``ShapeCache``) hold when it is captured;
* when the model's parameters or buffers are replaced by new tensors (``model.to``,
  ``.half()``) every graph is dropped and captured again; in-place updates
  (``load_state_dict``) are seen by the graphs as they are.
"""
from __future__ import annotations

import collections
import itertools
import logging
from typing import NamedTuple

import torch
from torch.utils import _pytree as pytree

from .precision import autocast_dtype, autocast_region
from .shape_cache import ShapeCache

__all__ = ["CudaGraphRunner"]

logger = logging.getLogger(__name__)


class _Graph(NamedTuple):
    graph: "torch.cuda.CUDAGraph"
    static_input: torch.Tensor
    static_outputs: list
    spec: pytree.TreeSpec
    keep_alive: list  # held only so the tensors the graph reads stay allocated


class CudaGraphRunner:
    """Runs ``function(images)`` for ``module`` through CUDA graphs where the rules above allow.

    Args:
        function: tensor -> pytree of tensors (None leaves allowed), e.g. ``model._network``.
        module: the module whose parameters and buffers ``function`` reads.
        max_graphs: shapes kept at once.
        warmup_runs: eager runs on a side stream before a capture.
    """

    def __init__(self, function, module, max_graphs: int = 4, warmup_runs: int = 2):
        if max_graphs < 1 or warmup_runs < 1:
            raise ValueError(f"CudaGraphRunner needs max_graphs >= 1 and warmup_runs >= 1, got "
                             f"{max_graphs} and {warmup_runs}")
        self.function = function
        self.module = module
        self.max_graphs = max_graphs
        self.warmup_runs = warmup_runs
        self.captures = 0
        self.replays = 0
        self._graphs: "collections.OrderedDict[tuple, _Graph]" = collections.OrderedDict()
        self._seen = collections.Counter()
        self._weights = None

    # A copied or pickled model starts without graphs (they cannot be copied).
    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_graphs=collections.OrderedDict(), _seen=collections.Counter(), _weights=None)
        return state

    def applies(self, images: torch.Tensor) -> bool:
        return images.is_cuda and not torch.is_grad_enabled() and not self.module.training

    def __call__(self, images: torch.Tensor):
        if not self.applies(images):
            return self.function(images)
        weights = tuple(t.data_ptr() for t in itertools.chain(self.module.parameters(), self.module.buffers()))
        if weights != self._weights:
            self.clear()
            self._weights = weights
        amp_dtype = autocast_dtype("cuda")
        key = (tuple(images.shape), images.dtype, images.device, amp_dtype)
        entry = self._graphs.get(key)
        if entry is None:
            self._seen[key] += 1
            if self._seen[key] < 2:
                if len(self._seen) > 64:  # bounded, like the shapes themselves
                    self._seen = collections.Counter({key: 1})
                return self.function(images)
            entry = self._capture(images, amp_dtype)
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            self._graphs[key] = entry
        else:
            self._graphs.move_to_end(key)
        entry.static_input.copy_(images)
        entry.graph.replay()
        self.replays += 1
        return pytree.tree_unflatten([t.clone() for t in entry.static_outputs], entry.spec)

    def clear(self):
        """Drop every graph (and the memory each keeps)."""
        self._graphs.clear()
        self._seen.clear()

    def _autocast(self, amp_dtype):
        return autocast_region("cuda", amp_dtype, cache_enabled=False)

    def _capture(self, images, amp_dtype):
        static_input = images.clone()
        side = torch.cuda.Stream(device=images.device)
        side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(side), self._autocast(amp_dtype):
            for _ in range(self.warmup_runs):
                self.function(static_input)
        torch.cuda.current_stream(images.device).wait_stream(side)
        keep_alive = ShapeCache.held_values()  # constants the graph reads; see the module docstring
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph), self._autocast(amp_dtype):
                outputs = self.function(static_input)
        except RuntimeError as error:
            from ..ops.ms_deform_attn_func import compiled_op_available, force_pytorch_requested

            hint = ""
            if not compiled_op_available() or force_pytorch_requested():
                hint = (" The deformable attention runs its PyTorch path, which reads the level sizes "
                        "back from the GPU: build the compiled op (see the README) for CUDA graphs.")
            raise RuntimeError(
                f"TEST.CUDA_GRAPH: capturing the forward for input {tuple(images.shape)} failed ({error}); "
                "an operation synchronized with the host or is not allowed in a CUDA graph." + hint +
                " Set TEST.CUDA_GRAPH False to run eagerly."
            ) from error
        leaves, spec = pytree.tree_flatten(outputs)
        self.captures += 1
        logger.info("TEST.CUDA_GRAPH: captured the forward for input %s (%s)", tuple(images.shape),
                    amp_dtype or "float32")
        return _Graph(graph, static_input, leaves, spec, keep_alive)
