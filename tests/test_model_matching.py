"""Hungarian matcher against brute force, pairwise costs against a direct computation, and the criterion."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from ddl_mask2former.modeling.criterion import LocalizationCriterion
from ddl_mask2former.modeling.matcher import HungarianMatcher
from loss_helpers import cost_matrix, match_per_image, pairwise_mask_costs, targets_from_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_case(seed, queries, targets, size=8):
    generator = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(1, queries, 1, generator=generator),
        "pred_masks": torch.randn(1, queries, size, size, generator=generator) * 3,
    }
    masks = torch.rand(targets, 2 * size, 2 * size, generator=generator) > 0.5
    valid = torch.ones(2 * size, 2 * size, dtype=torch.bool)
    valid[:, -3:] = False
    labels = torch.zeros(targets, dtype=torch.int64)
    return outputs, [{"masks": masks, "labels": labels, "valid": valid}]


@pytest.mark.parametrize("seed,queries,targets", [(0, 3, 1), (1, 4, 2), (2, 5, 3), (3, 3, 3), (4, 6, 2)])
def test_matcher_equals_brute_force(seed, queries, targets):
    matcher = HungarianMatcher(num_points=200)
    outputs, target_list = _random_case(seed, queries, targets)
    torch.manual_seed(seed)
    ((rows, cols),) = match_per_image(matcher, outputs, target_list)
    torch.manual_seed(seed)  # same sampled points as inside the matcher
    cost = cost_matrix(matcher, outputs["pred_logits"][0], outputs["pred_masks"][0],
                       target_list[0]["masks"], target_list[0]["labels"], target_list[0]["valid"])
    best = min(
        sum(cost[q, t].item() for t, q in enumerate(assignment))
        for assignment in itertools.permutations(range(queries), targets)
    )
    assert len(rows) == targets and sorted(cols.tolist()) == list(range(targets))
    assert len(set(rows.tolist())) == targets
    assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-5)


def test_pairwise_costs_equal_direct_per_pair_losses():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=generator) * 2
    targets = (torch.rand(3, 50, generator=generator) > 0.4).float()
    weights = (torch.rand(50, generator=generator) > 0.2).float()
    bce, dice = pairwise_mask_costs(logits, targets, weights)
    for q in range(4):
        for t in range(3):
            keep = weights.bool()
            direct_bce = F.binary_cross_entropy_with_logits(logits[q, keep], targets[t, keep])
            probs = logits[q, keep].sigmoid()
            direct_dice = 1 - (2 * (probs * targets[t, keep]).sum() + 1) / (probs.sum() + targets[t, keep].sum() + 1)
            assert bce[q, t].item() == pytest.approx(direct_bce.item(), abs=1e-5)
            assert dice[q, t].item() == pytest.approx(direct_dice.item(), abs=1e-5)


def test_matcher_real_image_has_no_match():
    outputs, _ = _random_case(0, 4, 1)
    empty = [{"masks": torch.zeros(0, 16, 16, dtype=torch.bool), "labels": torch.zeros(0, dtype=torch.int64),
              "valid": torch.ones(16, 16, dtype=torch.bool)}]
    ((rows, cols),) = match_per_image(HungarianMatcher(num_points=64), outputs, empty)
    assert rows.numel() == 0 and cols.numel() == 0


def test_criterion_real_image_only_confidence_loss():
    """A real image: every query is no-object, mask losses are zero but stay in the graph."""
    outputs, _ = _random_case(0, 4, 1)
    outputs["pred_masks"].requires_grad_(True)
    outputs["aux_outputs"] = []
    empty = [{"masks": torch.zeros(0, 16, 16, dtype=torch.bool), "labels": torch.zeros(0, dtype=torch.int64),
              "valid": torch.ones(16, 16, dtype=torch.bool)}]
    criterion = LocalizationCriterion(HungarianMatcher(num_points=64), num_points=64)
    losses = criterion(outputs, targets_from_images(empty))
    expected = F.binary_cross_entropy_with_logits(outputs["pred_logits"], torch.zeros(1, 4, 1))
    assert losses["loss_cls"].item() == pytest.approx(2.0 * expected.item(), rel=1e-5)
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    sum(losses.values()).backward()
    assert outputs["pred_masks"].grad is not None


def test_criterion_ignores_padding_pixels():
    """Predictions inside ignore (255) pixels do not change the mask losses."""
    masks = torch.zeros(1, 16, 16, dtype=torch.bool)
    masks[0, 2:8, 2:8] = True
    valid = torch.ones(16, 16, dtype=torch.bool)
    valid[:, 8:] = False
    base = torch.full((1, 2, 16, 16), -4.0)
    base[0, 0, 2:8, 2:8] = 4.0
    altered = base.clone()
    altered[0, 0, :, 8:] = 9.0  # confidently wrong predictions, but only where pixels are ignored
    criterion = LocalizationCriterion(HungarianMatcher(num_points=400), class_weight=1.0, mask_weight=1.0,
                                      dice_weight=1.0, num_points=400)
    logits = torch.tensor([[[3.0], [-3.0]]])

    def mask_loss(pred, valid_map):
        torch.manual_seed(0)
        losses = criterion({"pred_logits": logits, "pred_masks": pred, "aux_outputs": []},
                           targets_from_images([{"masks": masks, "labels": torch.zeros(1, dtype=torch.int64),
                                                 "valid": valid_map}]))
        return losses["loss_mask"].item() + losses["loss_dice"].item()

    # Importance sampling picks different points for the two predictions: compare magnitudes.
    assert abs(mask_loss(altered, valid) - mask_loss(base, valid)) < 0.05
    assert mask_loss(altered, torch.ones_like(valid)) > 1.0  # the same pixels counted would cost a lot


def test_matcher_class_cost_uses_the_targets_class():
    """Two classes: a query confident in 'forged' is matched to the forged target, and vice versa."""
    size = 8
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    masks[0, :, :4] = True  # authentic (label 0)
    masks[1, :, 4:] = True  # forged (label 1)
    # Identical mask predictions: only the class cost can tell the queries apart.
    outputs = {"pred_logits": torch.tensor([[[-4.0, 4.0], [4.0, -4.0]]]),
               "pred_masks": torch.zeros(1, 2, size, size)}
    targets = [{"masks": masks, "labels": torch.tensor([0, 1]), "valid": torch.ones(size, size, dtype=torch.bool)}]
    ((rows, cols),) = match_per_image(HungarianMatcher(num_points=64), outputs, targets)
    assignment = dict(zip(cols.tolist(), rows.tolist()))
    assert assignment == {0: 1, 1: 0}


def test_criterion_class_loss_is_one_hot_of_the_matched_class():
    size = 8
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    masks[0, :, :4] = True
    masks[1, :, 4:] = True
    logits = torch.tensor([[[-1.0, 2.0], [0.5, -0.5], [0.3, 0.2]]])
    pred = torch.zeros(1, 3, size, size)
    pred[0, 0, :, 4:] = 5.0  # query 0 draws the forged half, query 1 the authentic half
    pred[0, 0, :, :4] = -5.0
    pred[0, 1, :, :4] = 5.0
    pred[0, 1, :, 4:] = -5.0
    pred[0, 2] = -5.0
    criterion = LocalizationCriterion(HungarianMatcher(num_points=256), class_weight=1.0, no_object_weight=0.1,
                                      num_points=256)
    targets = [{"masks": masks, "labels": torch.tensor([0, 1]), "valid": torch.ones(size, size, dtype=torch.bool)}]
    losses = criterion({"pred_logits": logits, "pred_masks": pred, "aux_outputs": []},
                       targets_from_images(targets))
    expected_target = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]])
    weight = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [0.1, 0.1]]])
    bce = F.binary_cross_entropy_with_logits(logits, expected_target, reduction="none")
    assert losses["loss_cls"].item() == pytest.approx(((bce * weight).sum() / weight.sum()).item(), rel=1e-5)


def test_criterion_and_matcher_read_every_weight_from_the_config_once():
    from model_helpers import tiny_cfg

    cfg = tiny_cfg()
    loss = cfg.MODEL.DDL.LOSS
    loss.CLASS_WEIGHT, loss.MASK_WEIGHT, loss.DICE_WEIGHT, loss.NUM_POINTS = 1.5, 4.0, 3.0, 99
    loss.NO_OBJECT_WEIGHT, loss.DEEP_SUPERVISION = 0.2, False
    criterion = LocalizationCriterion(cfg)
    matcher = criterion.matcher
    assert (matcher.class_weight, matcher.mask_weight, matcher.dice_weight, matcher.num_points) == (1.5, 4.0, 3.0, 99)
    assert (criterion.class_weight, criterion.mask_weight, criterion.dice_weight) == (1.5, 4.0, 3.0)
    assert criterion.no_object_weight == 0.2 and criterion.deep_supervision is False
