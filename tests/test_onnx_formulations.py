"""The ONNX-only formulations (what ``torch.onnx.export`` traces instead of the eager code, for
ONNX Runtime's speed) compute what the eager PyTorch code computes: the deformable attention's
sampling locations and per-level weighted sums, and the decoder's masked attention. Run eagerly
with ``torch.onnx.is_in_onnx_export`` reporting True (CPU, float32, fixed seeds)."""
import torch

from ddl_mask2former.modeling.transformer_decoder.masked_attention import Attention
from ddl_mask2former.ops import MSDeformAttn
from ops_helpers import level_layout

LEVELS = ((6, 8), (3, 4), (2, 2))


def _as_if_exporting(monkeypatch):
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)


def test_deformable_attention_export_formulation_matches_eager(monkeypatch):
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=3).eval()
    with torch.no_grad():  # offsets that reach past the borders, non-uniform weights
        module.sampling_offsets.weight.normal_(0.0, 2.0)
        module.attention_weights.weight.normal_(0.0, 1.0)
    generator = torch.Generator().manual_seed(1)
    shapes, starts, total_len = level_layout(LEVELS)
    query = torch.randn(2, 9, 32, generator=generator)
    reference_points = torch.rand(2, 9, 3, 2, generator=generator)
    input_flatten = torch.randn(2, total_len, 32, generator=generator)
    with torch.no_grad():
        eager = module(query, reference_points, input_flatten, shapes, starts, level_shapes=list(LEVELS))
        _as_if_exporting(monkeypatch)
        exported = module(query, reference_points, input_flatten, shapes, starts, level_shapes=list(LEVELS))
    assert exported.shape == eager.shape
    torch.testing.assert_close(exported, eager, rtol=0, atol=1e-6)


def test_masked_attention_export_formulation_matches_sdpa(monkeypatch):
    torch.manual_seed(0)
    attention = Attention(32, 4).eval()
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(2, 5, 32, generator=generator)
    memory = torch.randn(2, 40, 32, generator=generator)
    keep = torch.rand(2, 1, 5, 40, generator=generator) > 0.7
    keep[0, 0, 1] = False
    keep[0, 0, 1, 17] = True  # a row that keeps one position
    keep[1, 0, 2] = True  # a row that keeps all
    with torch.no_grad():
        eager = attention(query, memory, memory, keep)
        _as_if_exporting(monkeypatch)
        exported = attention(query, memory, memory, keep)
    torch.testing.assert_close(exported, eager, rtol=0, atol=1e-6)
    # The keys that the first query masks, made loud: logits far above its kept ones still get no weight.
    loud = memory.clone()
    loud[0, ~keep[0, 0, 0]] *= 50.0
    with torch.no_grad():
        exported = attention(query, loud, memory, keep)
        monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: False)
        eager = attention(query, loud, memory, keep)
        logits = attention.q_proj(query[:1, :1]) @ attention.k_proj(loud[:1]).transpose(1, 2)
    assert logits[0, 0][~keep[0, 0, 0]].max() > logits[0, 0][keep[0, 0, 0]].max() + 100
    torch.testing.assert_close(exported[0, 0], eager[0, 0], rtol=0, atol=1e-5)
