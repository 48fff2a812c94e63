"""``criterion.py``, ``matcher.py``, ``targets.py`` in a training step: the batched matcher and
criterion against the per-image, per-layer implementation they replaced (kept below as the
reference), the batch's targets, the host round trips of a training step, and batched inference
against one image at a time."""
import collections
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)

from ddl_mask2former.modeling import criterion as criterion_module
from ddl_mask2former.modeling import matcher as matcher_module
from ddl_mask2former.modeling.criterion import LocalizationCriterion
from ddl_mask2former.modeling.matcher import HungarianMatcher
from ddl_mask2former.modeling.targets import LocalizationTargets

from loss_helpers import pairwise_mask_costs, targets_from_images, targets_per_image
from model_helpers import build, tiny_cfg, training_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------- the replaced implementation

def _reference_cost(matcher, logits, mask_logits, target_masks, target_labels, valid):
    coords = torch.rand(1, matcher.num_points, 2, device=mask_logits.device)
    pred = point_sample(mask_logits[:, None].float(), coords.expand(mask_logits.shape[0], -1, -1),
                        align_corners=False).squeeze(1)
    tgt = point_sample(target_masks[:, None].float(), coords.expand(target_masks.shape[0], -1, -1),
                       align_corners=False, mode="nearest").squeeze(1)
    weights = point_sample(valid[None, None].float(), coords, align_corners=False, mode="nearest").view(-1)
    bce, dice = pairwise_mask_costs(pred, tgt, weights)
    cost_class = -logits.float().sigmoid()[:, target_labels]
    return matcher.class_weight * cost_class + matcher.mask_weight * bce + matcher.dice_weight * dice


@torch.no_grad()
def _reference_match(matcher, outputs, targets):
    indices = []
    device = outputs["pred_logits"].device
    for b, target in enumerate(targets):
        if target["masks"].shape[0] == 0:
            empty = torch.empty(0, dtype=torch.int64, device=device)
            indices.append((empty, empty))
            continue
        cost = _reference_cost(matcher, outputs["pred_logits"][b], outputs["pred_masks"][b], target["masks"],
                               target["labels"], target["valid"])
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        indices.append((torch.as_tensor(rows.astype(np.int64), device=device),
                        torch.as_tensor(cols.astype(np.int64), device=device)))
    return indices


def _reference_losses(crit, outputs, targets):
    """LocalizationCriterion as it was before issue 10: per layer, per image."""
    def single(layer, num_masks, suffix):
        indices = _reference_match(crit.matcher, layer, targets)
        logits = layer["pred_logits"]
        target = torch.zeros_like(logits)
        weight = torch.full_like(logits, crit.no_object_weight)
        for b, (query_idx, target_idx) in enumerate(indices):
            target[b, query_idx, targets[b]["labels"][target_idx]] = 1.0
            weight[b, query_idx] = 1.0
        loss_cls = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum() / weight.sum()
        src, tgt, valid = [], [], []
        for b, (query_idx, target_idx) in enumerate(indices):
            if query_idx.numel():
                src.append(layer["pred_masks"][b, query_idx])
                tgt.append(targets[b]["masks"][target_idx].float())
                valid.append(targets[b]["valid"].float().expand(len(target_idx), -1, -1))
        if src:
            src, tgt, valid = torch.cat(src)[:, None], torch.cat(tgt)[:, None], torch.cat(valid)[:, None]
            with torch.no_grad():
                coords = get_uncertain_point_coords_with_randomness(
                    src, lambda x: -x.abs(), crit.num_points, crit.oversample_ratio, crit.importance_sample_ratio)
                labels = point_sample(tgt, coords, align_corners=False, mode="nearest").squeeze(1)
                weights = point_sample(valid, coords, align_corners=False, mode="nearest").squeeze(1)
            point_logits = point_sample(src, coords, align_corners=False).squeeze(1)
            bce = F.binary_cross_entropy_with_logits(point_logits, labels, reduction="none")
            loss_mask = ((bce * weights).sum(1) / weights.sum(1).clamp(min=1.0)).sum() / num_masks
            probs = point_logits.sigmoid() * weights
            dice = 1 - (2 * (probs * labels).sum(1) + 1) / (probs.sum(1) + (labels * weights).sum(1) + 1)
            loss_dice = dice.sum() / num_masks
        else:
            loss_mask = loss_dice = layer["pred_masks"].sum() * 0.0
        scale = crit.loc_weight
        return {f"loss_cls{suffix}": scale * crit.class_weight * loss_cls,
                f"loss_mask{suffix}": scale * crit.mask_weight * loss_mask,
                f"loss_dice{suffix}": scale * crit.dice_weight * loss_dice}

    as_float = {k: v.float() for k, v in outputs.items() if k != "aux_outputs"}
    num_masks = max(float(sum(t["masks"].shape[0] for t in targets)), 1.0)
    losses = single(as_float, num_masks, "")
    for index, aux in enumerate(outputs["aux_outputs"]):
        losses.update(single({k: v.float() for k, v in aux.items()}, num_masks, f"_{index}"))
    return losses


# ---------------------------------------------------------------- shared random points

_real_rand = torch.rand


def _rows_alike_rand(*size, device=None, dtype=None, **kwargs):
    """torch.rand whose value depends only on the last two sizes (the same points on every
    row), so two implementations that batch their draws differently see the same points."""
    if len(size) == 1 and not isinstance(size[0], int):
        size = tuple(size[0])
    pattern = _real_rand(size[-2], size[-1], generator=torch.Generator().manual_seed(1000 + size[-2]))
    return pattern.expand(size).contiguous().to(device=device, dtype=dtype or torch.float32)


def _case(seed, classes, batch=4, layers=4, queries=6, num_classes=1, size=16, device="cpu"):
    generator = torch.Generator().manual_seed(seed)

    def prediction():
        return {"pred_logits": torch.randn(batch, queries, num_classes, generator=generator).to(device),
                "pred_masks": (3 * torch.randn(batch, queries, size // 4, size // 4, generator=generator)).to(device)}
    outputs = prediction()
    outputs["aux_outputs"] = [prediction() for _ in range(layers - 1)]
    for leaf in _leaves(outputs):
        leaf.requires_grad_(True)
    targets = []
    for b in range(batch):
        forged = torch.zeros(size, size, dtype=torch.bool)
        if b % 2:  # odd images are fake
            top, left = (int(v) for v in torch.randint(0, size // 2, (2,), generator=generator))
            forged[top: top + size // 2, left: left + size // 2] = True
        valid = torch.ones(size, size, dtype=torch.bool)
        valid[:, size - 1 - b:] = False  # padding of varying width
        masks, labels = [], []
        for label, name in enumerate(classes):
            mask = (forged if name == "forged" else ~forged) & valid
            if mask.any():
                masks.append(mask)
                labels.append(label)
        targets.append({"masks": (torch.stack(masks) if masks else torch.zeros(0, size, size, dtype=torch.bool)).to(device),
                        "labels": torch.tensor(labels, dtype=torch.int64, device=device),
                        "valid": valid.to(device)})
    return outputs, targets


def _leaves(outputs):
    return [layer[k] for layer in [outputs] + outputs["aux_outputs"] for k in ("pred_logits", "pred_masks")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("classes", [("forged",), ("authentic", "forged")])
@pytest.mark.parametrize("seed", [0, 1])
def test_batched_criterion_equals_the_per_image_reference(monkeypatch, seed, classes, device):
    monkeypatch.setattr(torch, "rand", _rows_alike_rand)
    crit = LocalizationCriterion(HungarianMatcher(num_points=64), num_points=48)
    outputs, targets = _case(seed, classes, num_classes=len(classes), device=device)
    new = crit(outputs, targets_from_images(targets))
    new_grads = torch.autograd.grad(sum(new.values()), _leaves(outputs))
    reference = _reference_losses(crit, outputs, targets)
    ref_grads = torch.autograd.grad(sum(reference.values()), _leaves(outputs))
    assert list(new) == list(reference)  # same terms, same order (metrics, logs)
    for key in reference:
        assert new[key].item() == pytest.approx(reference[key].item(), rel=1e-5, abs=1e-6), key
    for got, want in zip(new_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("classes", [("forged",), ("authentic", "forged")])
def test_matching_of_all_layers_equals_per_image_matching(monkeypatch, classes):
    monkeypatch.setattr(torch, "rand", _rows_alike_rand)
    matcher = HungarianMatcher(num_points=64)
    outputs, targets = _case(3, classes, num_classes=len(classes))
    layers = [outputs] + outputs["aux_outputs"]
    for layer, matched in zip(layers, matcher.match_layers(layers, targets_from_images(targets))):
        reference = _reference_match(matcher, layer, targets)
        got = sorted((b, matched[b, t].item(), t) for b, target in enumerate(targets)
                     for t in range(target["masks"].shape[0]))
        want = sorted((b, q, t) for b, (qs, ts) in enumerate(reference) for q, t in zip(qs.tolist(), ts.tolist()))
        assert got == want


def test_no_targets_anywhere_gives_zero_mask_losses_with_gradients():
    crit = LocalizationCriterion(HungarianMatcher(num_points=16), num_points=16)
    outputs, targets = _case(0, ("forged",))
    for target in targets:
        target["masks"], target["labels"] = target["masks"][:0], target["labels"][:0]
    losses = crit(outputs, targets_from_images(targets))
    assert all(losses[k].item() == 0.0 for k in losses if "mask" in k or "dice" in k)
    sum(losses.values()).backward()
    assert outputs["pred_masks"].grad is not None


# ---------------------------------------------------------------- host round trips

def _count_host_calls(function):
    """Python-level calls that are host syncs when the tensor is on a GPU, and scipy matches."""
    counts = collections.Counter()
    names = ("item", "cpu", "tolist", "numpy", "nonzero", "__bool__")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def wrap(name, original):
        def counted(*args, **kwargs):
            # Not counted: the deformable-attention PyTorch path reads the level shapes on the
            # host (GPUs run the compiled op, which does not), and the targets are built from
            # the loader's masks while they are still on the CPU (no device involved).
            caller = sys._getframe(1).f_code
            if not (caller.co_filename.endswith("ms_deform_attn_func.py") or caller.co_name == "_localization_targets"):
                counts[name] += 1
            return original(*args, **kwargs)
        return counted
    lsa = matcher_module.linear_sum_assignment
    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(name, original))
        matcher_module.linear_sum_assignment = wrap("linear_sum_assignment", lsa)
        function()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        matcher_module.linear_sum_assignment = lsa
    return counts


@pytest.mark.parametrize("classes,max_host_calls", [(("forged",), 0), (("authentic", "forged"), 2)])
def test_training_step_host_round_trips(classes, max_host_calls):
    """With one target per image the model's training forward makes no sync-forcing call at all;
    with two classes, one cost-matrix copy (cpu + numpy) for all layers and images together."""
    cfg = tiny_cfg()
    cfg.MODEL.DDL.TARGET_CLASSES = list(classes)
    model = build(cfg).train()
    batch = training_batch() * 2  # 4 images, 4 supervised layers
    counts = _count_host_calls(lambda: model(batch))
    model_calls = {k: v for k, v in counts.items() if k != "linear_sum_assignment"}
    assert sum(model_calls.values()) <= max_host_calls, counts
    expected_lsa = 0 if classes == ("forged",) else 4 * 4  # every (layer, image) with targets
    assert counts["linear_sum_assignment"] == expected_lsa


def _reference_targets(model, batched_inputs, padded_shape):
    """The per-image target building that _localization_targets replaced."""
    values = {"forged": 1, "authentic": 0}
    targets = []
    for record in batched_inputs:
        mask = record["forgery_mask"]
        padded = torch.full(padded_shape, 255, dtype=mask.dtype)
        padded[: mask.shape[0], : mask.shape[1]] = mask
        labels = [label for label, cls in enumerate(model.target_classes) if bool((mask == values[cls]).any())]
        masks = (torch.stack([padded == values[model.target_classes[label]] for label in labels]) if labels
                 else torch.zeros((0,) + tuple(padded_shape), dtype=torch.bool))
        targets.append({"masks": masks, "labels": torch.tensor(labels, dtype=torch.int64), "valid": padded != 255})
    return targets


@pytest.mark.parametrize("classes", [("forged",), ("authentic", "forged")])
@pytest.mark.parametrize("same_size", [True, False])
def test_batched_targets_equal_the_per_image_reference(classes, same_size):
    cfg = tiny_cfg()
    cfg.MODEL.DDL.TARGET_CLASSES = list(classes)
    model = build(cfg).train()
    batch = training_batch() + training_batch(seed=1)
    all_forged = dict(batch[1], forgery_mask=torch.ones(64, 64, dtype=torch.uint8))
    padded_crop = dict(batch[1], forgery_mask=batch[1]["forgery_mask"].clone())
    padded_crop["forgery_mask"][:, 48:] = 255  # PadToSize's ignore value
    batch += [all_forged, padded_crop]
    if not same_size:
        batch[0] = dict(batch[0], image=batch[0]["image"][:, :40, :56], forgery_mask=batch[0]["forgery_mask"][:40, :56])
    got = targets_per_image(model._localization_targets(batch, (64, 64)))
    expected = _reference_targets(model, batch, (64, 64))
    for index, (a, b) in enumerate(zip(got, expected)):
        for key in ("masks", "labels", "valid"):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (index, key)


@pytest.mark.parametrize("size", [(64, 64), (40, 56)])
def test_same_size_batch_is_padded_as_image_list_from_tensors(size):
    from detectron2.structures import ImageList

    model = build(tiny_cfg()).train()
    batch = [dict(r, image=r["image"][:, : size[0], : size[1]]) for r in training_batch() * 2]
    got = model._preprocess(batch)
    assert model.noise_residuals is None
    normalized = [(r["image"].float() - model.pixel_mean) / model.pixel_std for r in batch]
    expected = ImageList.from_tensors(normalized, model.size_divisibility)
    assert got.image_sizes == expected.image_sizes == [size] * 4
    torch.testing.assert_close(got.tensor, expected.tensor, rtol=0, atol=1e-6)


def _compiled_op_available():
    from ddl_mask2former import ops

    return ops.compiled_op_available()


@pytest.mark.skipif(not torch.cuda.is_available() or not _compiled_op_available(),
                    reason="needs CUDA and the compiled deformable-attention op (the PyTorch path reads level shapes)")
@pytest.mark.parametrize("classes", [("forged",), ("authentic", "forged")])
def test_training_step_never_waits_for_the_gpu(classes):
    """No stream synchronization in the forward and backward of a training step, apart from the
    one cost-matrix copy that two target classes need (torch.cuda.set_sync_debug_mode raises)."""
    cfg = tiny_cfg()
    cfg.MODEL.DEVICE = "cuda"
    cfg.MODEL.DDL.TARGET_CLASSES = list(classes)
    model = build(cfg).train()
    batch = training_batch() * 2
    sum(model(batch).values()).backward()  # warm-up: caches, library handles
    torch.cuda.synchronize()
    if classes == ("authentic", "forged"):
        real_match = matcher_module.HungarianMatcher.match_layers

        def match_allowing_the_copy(self, *args):
            torch.cuda.set_sync_debug_mode(0)
            try:
                return real_match(self, *args)
            finally:
                torch.cuda.set_sync_debug_mode("error")
        matcher_module.HungarianMatcher.match_layers = match_allowing_the_copy
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = model(batch)
        sum(losses.values()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        if classes == ("authentic", "forged"):
            matcher_module.HungarianMatcher.match_layers = real_match
    assert all(torch.isfinite(v).item() for v in losses.values())


def test_target_count_stays_a_device_tensor_in_one_process():
    none = torch.zeros(3, 2, dtype=torch.bool)
    five = torch.tensor([[True, True], [True, False], [True, True]])
    assert criterion_module._distributed_mean_count(none).item() == 1.0  # at least 1
    assert criterion_module._distributed_mean_count(five).item() == 5.0
    assert isinstance(criterion_module._distributed_mean_count(five), torch.Tensor)


def test_batched_inference_equals_one_image_at_a_time():
    model = build(tiny_cfg()).eval()
    batch = [{"image": r["image"], "height": 80, "width": 72} for r in training_batch(seed=4)]
    with torch.no_grad():
        together = model(batch)
        alone = [model([record])[0] for record in batch]
    for joint, single in zip(together, alone):
        assert joint["mask_prob"].shape == (80, 72)
        torch.testing.assert_close(joint["mask_prob"], single["mask_prob"], rtol=0, atol=1e-5)
        torch.testing.assert_close(joint["fake_prob"], single["fake_prob"], rtol=0, atol=1e-6)
        assert torch.equal(joint["mask"], joint["mask_prob"] > 0.5)


def test_criterion_compiles_once_for_any_mix_of_real_and_fake_images():
    """Fixed-shape targets: batches of the same size but different real/fake arrangements reuse
    one compiled graph (with per-image target lists dynamo compiled again for each arrangement),
    and the compiled losses and gradients equal the eager ones."""
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    crit = LocalizationCriterion(HungarianMatcher(num_points=64), num_points=48)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(crit, backend=counter)
    dynamo.reset()
    for seed, fake_images in enumerate([(1, 3), (0, 1, 2), (), (0, 1, 2, 3)]):
        outputs, targets = _case(seed, ("forged",))
        targets = [t if b in fake_images else dict(t, masks=t["masks"][:0], labels=t["labels"][:0])
                   for b, t in enumerate(targets)]
        batch_targets = targets_from_images(targets)
        if not fake_images:  # no slot at all: give the batch its one (empty) forged slot
            batch_targets = LocalizationTargets(
                torch.zeros(4, 1, 16, 16, dtype=torch.bool), torch.zeros(4, 1, dtype=torch.int64),
                torch.zeros(4, 1, dtype=torch.bool), batch_targets.valid)
        results = []
        for function in (crit, compiled):
            torch.manual_seed(seed)
            losses = function(outputs, batch_targets)
            grads = torch.autograd.grad(sum(losses.values()), _leaves(outputs))
            results.append((losses, grads))
        (eager, eager_grads), (got, got_grads) = results
        for key in eager:
            torch.testing.assert_close(got[key], eager[key], rtol=1e-6, atol=1e-7, msg=key)
        for grad, expected in zip(got_grads, eager_grads):
            torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    dynamo.reset()
    assert counter.frame_count == 1


def test_criterion_keeps_only_the_matched_masks_for_the_backward():
    """Autograd must not keep every query's mask of every layer alive until the backward (as
    ``gather`` would: its backward saves its whole input); the matched ones are all it needs."""
    generator = torch.Generator().manual_seed(0)

    def prediction():
        return {"pred_logits": torch.randn(4, 50, 1, generator=generator, requires_grad=True),
                "pred_masks": torch.randn(4, 50, 32, 32, generator=generator, requires_grad=True)}
    outputs = prediction()
    outputs["aux_outputs"] = [prediction() for _ in range(3)]
    _, targets = _case(0, ("forged",), size=128)
    crit = LocalizationCriterion(HungarianMatcher(num_points=64), num_points=48)
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        crit(outputs, targets_from_images(targets))
    all_masks = sum(layer["pred_masks"].numel() * 4 for layer in [outputs] + outputs["aux_outputs"])
    assert sum(storages.values()) < all_masks / 8
