"""TEST.CUDA_GRAPH (modeling/cuda_graph.py); the size caches it relies on are tested in
test_model_shape_cache.py.

The graph cases need CUDA and the compiled deformable-attention op (its PyTorch path reads level
sizes back from the device, which a capture does not allow); they run in benchmarks/gpu_check.sh.
"""
import logging

import pytest
import torch

from ddl_mask2former.ops.ms_deform_attn_func import compiled_op_available
from model_helpers import build, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

needs_cuda_graphs = pytest.mark.skipif(
    not torch.cuda.is_available() or not compiled_op_available(),
    reason="needs CUDA and the compiled deformable-attention op")


def _inputs(batch, size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator),
             "height": size, "width": size} for _ in range(batch)]


def _graphed_and_eager(device):
    cfg = tiny_cfg()
    cfg.MODEL.DEVICE = device
    eager = build(cfg).eval()
    cfg.TEST.CUDA_GRAPH = True
    graphed = build(cfg).eval()
    graphed.load_state_dict(eager.state_dict())
    return graphed, eager


def _assert_same_outputs(actual, expected, atol):
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a["fake_prob"], b["fake_prob"], rtol=0, atol=atol)
        torch.testing.assert_close(a["mask_prob"], b["mask_prob"], rtol=0, atol=atol)


def test_cuda_graph_option_on_cpu_runs_eagerly_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        graphed, eager = _graphed_and_eager("cpu")
    assert "TEST.CUDA_GRAPH is on but MODEL.DEVICE is cpu" in caplog.text
    with torch.no_grad():
        for seed in range(2):
            _assert_same_outputs(graphed(_inputs(2, seed=seed)), eager(_inputs(2, seed=seed)), atol=0)
    assert graphed.cuda_graph.captures == 0 and graphed.cuda_graph.replays == 0


@needs_cuda_graphs
@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_cuda_graph_inference_equals_eager(amp_dtype):
    """Captured on the second call of a shape, then replayed: same fake_prob and mask_prob as the
    eager model (within 1e-3 under bf16 autocast), for new inputs every call."""
    graphed, eager = _graphed_and_eager("cuda")
    runner = graphed.cuda_graph
    with torch.no_grad(), torch.autocast("cuda", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        for seed in range(4):
            inputs = _inputs(2, seed=seed)
            _assert_same_outputs(graphed(inputs), eager(inputs), atol=1e-3 if amp_dtype else 1e-5)
    assert runner.captures == 1 and runner.replays == 3


@needs_cuda_graphs
def test_cuda_graph_keys_by_shape_and_drops_the_least_recent():
    graphed, eager = _graphed_and_eager("cuda")
    runner = graphed.cuda_graph
    runner.max_graphs = 2
    with torch.no_grad():
        for size in (64, 64, 96, 96, 64, 128, 128, 64):
            inputs = _inputs(1, size=size, seed=size)
            _assert_same_outputs(graphed(inputs), eager(inputs), atol=1e-5)
    # 64 and 96 captured on their second call; 64 used again, so capturing 128 drops 96.
    assert runner.captures == 3 and runner.replays == 5
    assert [key[0][-1] for key in runner._graphs] == [128, 64]


@needs_cuda_graphs
def test_cuda_graph_not_used_for_training_or_with_autograd_and_recaptured_for_new_weights():
    graphed, eager = _graphed_and_eager("cuda")
    runner = graphed.cuda_graph
    inputs = _inputs(2)
    for _ in range(3):
        graphed(inputs)  # eval mode, autograd on: eager
    graphed.train()
    with torch.no_grad():
        graphed.predict(inputs), graphed.predict(inputs)  # training mode: eager
    graphed.eval()
    assert runner.captures == 0
    with torch.no_grad():
        graphed(inputs), graphed(inputs)
        assert runner.captures == 1
        for parameter in graphed.parameters():  # new tensors: the graph would read stale memory
            parameter.data = parameter.data.clone()
        graphed(inputs), graphed(inputs)
        assert runner.captures == 2
        _assert_same_outputs(graphed(inputs), eager(inputs), atol=1e-5)
