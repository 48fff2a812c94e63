"""Masked attention (eq. 1-2): mask semantics, fully masked rows, decoder structure."""
import pytest
import torch
import torch.nn.functional as F

from ddl_mask2former.modeling.transformer_decoder.masked_attention import (
    Attention, MaskedAttentionDecoder, downsample_bilinear)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _decoder(layers=9, queries=5):
    torch.manual_seed(0)
    return MaskedAttentionDecoder(
        in_channels=16, mask_dim=8, hidden_dim=16, num_queries=queries, num_heads=2, ffn_dim=32,
        num_layers=layers, num_feature_levels=3,
    ).eval()


def _features(batch=1, mask_scale=1.0):
    torch.manual_seed(1)
    multi_scale = [torch.randn(batch, 16, s, s) for s in (2, 4, 8)]
    mask_features = torch.randn(batch, 8, 16, 16) * mask_scale
    return multi_scale, mask_features


def test_decoder_has_exactly_configured_layers_and_deep_supervision():
    decoder = _decoder(layers=9, queries=100)
    assert len(decoder.layers) == 9
    multi_scale, mask_features = _features(batch=2)
    out = decoder(multi_scale, mask_features, all_masks=True)
    assert out["pred_logits"].shape == (2, 100, 1)
    assert out["pred_masks"].shape == (2, 100, 16, 16)
    assert len(out["aux_outputs"]) == 9  # initial queries + layers 1..8; layer 9 is the output
    assert all(aux["pred_masks"].shape == (2, 100, 16, 16) for aux in out["aux_outputs"])
    inference = decoder(multi_scale, mask_features, all_masks=False)
    assert inference["aux_outputs"] == []
    torch.testing.assert_close(inference["pred_masks"], out["pred_masks"])


def test_attention_mask_follows_eq2_and_unmasks_full_rows():
    decoder = _decoder()
    queries = torch.randn(1, 5, 16)
    level_features = torch.randn(1, 8, 4, 4)
    _, _, keep = decoder._predict(queries, level_features, level_features, full_mask=False)
    logits = torch.einsum("bqc,bchw->bqhw", decoder.mask_embed(decoder.decoder_norm(queries)), level_features)
    expected = (logits.sigmoid() > 0.5).flatten(2)
    expected[~expected.any(-1)] = True
    assert torch.equal(keep[:, 0], expected)

    # All-negative masks: every row would be fully masked, so every row attends everywhere.
    _, _, keep = decoder._predict(queries, level_features, torch.zeros(1, 8, 4, 4), full_mask=False)
    assert keep.all()


def test_fully_masked_rows_give_no_nan_and_equal_unmasked_attention():
    attention = Attention(16, 2).eval()
    query, memory = torch.randn(1, 3, 16), torch.randn(1, 10, 16)
    keep = torch.zeros(1, 1, 3, 10, dtype=torch.bool)
    keep[0, 0, 0, :4] = True  # row 0 partly masked; rows 1 and 2 fully masked, then unmasked
    keep |= ~keep.any(dim=-1, keepdim=True)
    out = attention(query, memory, memory, keep)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 1:], attention(query, memory, memory, None)[:, 1:])


def test_decoder_with_all_masks_empty_is_finite():
    decoder = _decoder()
    multi_scale, _ = _features()
    out = decoder(multi_scale, torch.zeros(1, 8, 16, 16), all_masks=True)
    assert torch.isfinite(out["pred_logits"]).all() and torch.isfinite(out["pred_masks"]).all()


def test_resizing_features_equals_resizing_masks():
    """The decoder resizes P once per level instead of resizing every mask: same attention mask."""
    decoder = _decoder()
    _, mask_features = _features()
    queries = torch.randn(1, 5, 16)
    for size in ((2, 2), (4, 4), (8, 8)):
        level_features = F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False)
        _, masks, keep = decoder._predict(queries, mask_features, level_features, full_mask=True)
        # The slow way: full-resolution masks, each resized to the level.
        resized_masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False).flatten(2)
        expected = resized_masks > 0
        expected[~expected.any(-1)] = True
        # A logit within rounding of 0 may fall either side of the threshold.
        clear = resized_masks.abs() > 1e-4
        assert clear.float().mean() > 0.9
        assert torch.equal(keep[:, 0][clear], expected[clear])


@pytest.mark.parametrize("size,out", [
    ((128, 128), (64, 64)), ((128, 128), (16, 16)), ((64, 96), (16, 12)), ((32, 32), (8, 16)),
    ((30, 30), (15, 15)), ((30, 30), (10, 10)), ((20, 24), (7, 9)), ((16, 16), (16, 16)), ((8, 8), (16, 16))])
def test_downsample_bilinear_equals_interpolate(size, out):
    """Even factors take the strided 2x2 average; odd factors, other sizes and upsampling interpolate."""
    torch.manual_seed(0)
    features = torch.randn(2, 3, *size, dtype=torch.float64)
    expected = F.interpolate(features, size=out, mode="bilinear", align_corners=False)
    got = downsample_bilinear(features, out)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_decoder_level_features_use_the_strided_average(monkeypatch):
    """At the usual sizes (mask features 2x, 4x, 8x the levels) no bilinear kernel runs."""
    calls = []
    original = F.interpolate
    monkeypatch.setattr(F, "interpolate",
                        lambda *args, **kwargs: calls.append(args[0].shape) or original(*args, **kwargs))
    decoder = _decoder()
    multi_scale, mask_features = _features()
    with torch.no_grad():
        decoder(multi_scale, mask_features)
    assert calls == []
