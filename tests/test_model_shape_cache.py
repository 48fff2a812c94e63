"""``ShapeCache`` (modeling/shape_cache.py): constants that depend on input sizes only (position
codes, window masks, reference points), bounded, kept alive for CUDA graphs, bypassed while
compiling."""
import copy

import pytest
import torch

from ddl_mask2former.modeling.shape_cache import ShapeCache


def test_shape_cache_builds_once_per_key_and_stays_bounded():
    cache = ShapeCache(max_entries=2)
    built = []

    def build_value(key):
        built.append(key)
        return torch.full((2,), float(key))

    first = cache.get(1, lambda: build_value(1))
    assert cache.get(1, lambda: build_value(1)) is first and built == [1]
    cache.get(2, lambda: build_value(2))
    assert any(value is first for value in ShapeCache.held_values())
    cache.get(3, lambda: build_value(3))  # full: the old entries go
    assert len(cache) == 1 and built == [1, 2, 3]
    copied = copy.deepcopy(cache)
    assert len(copied) == 0 and copied.max_entries == 2
    copied.get(4, lambda: build_value(4))
    assert any(isinstance(value, torch.Tensor) and torch.equal(value, torch.full((2,), 4.0))
               for value in ShapeCache.held_values())
    with pytest.raises(ValueError, match="max_entries"):
        ShapeCache(max_entries=0)


def test_shape_cache_is_bypassed_while_compiling():
    """Under torch.compile the value is built in the graph: the cache stays empty, so a second
    call finds the same state and does not compile again."""
    from torch._dynamo.testing import CompileCounter

    cache = ShapeCache()
    counter = CompileCounter()

    def add_code(x):
        return x + cache.get((x.shape[0],), lambda: torch.arange(x.shape[0], dtype=x.dtype))
    compiled = torch.compile(add_code, backend=counter)
    first, second = compiled(torch.zeros(3)), compiled(torch.ones(3))
    assert torch.equal(first, torch.arange(3.0)) and torch.equal(second, torch.arange(3.0) + 1)
    assert len(cache) == 0 and counter.frame_count == 1
    assert torch.equal(add_code(torch.zeros(3)), torch.arange(3.0)) and len(cache) == 1  # eager: cached
