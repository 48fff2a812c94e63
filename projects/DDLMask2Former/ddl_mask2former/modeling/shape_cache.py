"""``ShapeCache``: constants that depend only on an input's size, built once per size.

The position encodings, Swin's shifted-window masks and the pixel decoder's reference points
are functions of the feature sizes (and device, dtype) alone. Rebuilding them every forward
costs dozens of small operators each, which a GPU host pays for at every step. Each of those
modules keeps one ``ShapeCache``; it is bounded (test-time inputs can come in many sizes).

Every cache registers itself, so ``ShapeCache.held_values()`` lists the tensors all caches
hold: a CUDA graph (``cuda_graph.py``) reads them at replay and keeps that list alive, so a
later eviction cannot free memory a captured graph still uses.

Under ``torch.compile`` the cache is bypassed: the value is built inside the traced graph (the
compiler folds or fuses it), so the graph does not depend on, and guard on, the cache's state
(with it, every fresh model compiled twice: once empty, once filled).
"""
from __future__ import annotations

import weakref

import torch

__all__ = ["ShapeCache"]


class ShapeCache:
    """Values by key (sizes, device, dtype), built on first use by a callable; at most
    ``max_entries`` kept (all dropped when full: sizes rarely come back in order)."""

    _instances: "weakref.WeakSet[ShapeCache]" = weakref.WeakSet()

    def __init__(self, max_entries: int = 32):
        if max_entries < 1:
            raise ValueError(f"ShapeCache needs max_entries >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries = {}
        ShapeCache._instances.add(self)

    def get(self, key, build):
        """The value for ``key``, calling ``build()`` the first time (every time while compiling
        or tracing)."""
        # Compiling, or tracing for the ONNX export: built inside the graph, where the sizes are
        # symbolic (a cached tensor would freeze the traced input's size into the graph).
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return build()
        try:
            return self._entries[key]
        except KeyError:
            pass
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        value = self._entries[key] = build()
        return value

    def __len__(self):
        return len(self._entries)

    # A copied or unpickled module gets an empty cache of the same bound, registered like any other.
    def __getstate__(self):
        return {"max_entries": self.max_entries}

    def __setstate__(self, state):
        self.__init__(state["max_entries"])

    @classmethod
    def held_values(cls) -> list:
        """Every value every live cache holds now."""
        return [value for cache in list(cls._instances) for value in cache._entries.values()]
