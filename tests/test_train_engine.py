"""Engine pieces that need no dataset or real model: optimizer groups, gradient clipping, the
poly schedule, the non-finite-loss stop and DDP over gloo on CPU."""
import math

import pytest
import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from torch import nn

from model_helpers import ddl_cfg
from ddl_mask2former.engine import (
    NonFiniteLossError,
    NonFiniteLossHook,
    build_ddp_model,
    build_lr_scheduler,
    build_optimizer,
    build_param_groups,
    launch,
    leave_process_group,
    with_gradient_clipping,
)


class _WindowAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))
        self.qkv = nn.Linear(4, 12)


class _ToyBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, 4, 2, 2))
        self.attn = _WindowAttention()
        self.norm = nn.LayerNorm(4)


class _ToyMetaArch(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = _ToyBackbone()
        self.query_feat = nn.Embedding(5, 4)
        self.level_embed = nn.Parameter(torch.zeros(3, 4))
        self.mask_embed = nn.Linear(4, 4)
        self.class_head = nn.Linear(4, 1)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def _group_of(groups, param):
    matches = [g for g in groups if any(p is param for p in g["params"])]
    assert len(matches) == 1
    return matches[0]


def test_param_groups_backbone_multiplier_and_no_decay_rules():
    model = _ToyMetaArch()
    groups = build_param_groups(
        model, base_lr=1e-3, weight_decay=0.05, weight_decay_norm=0.0,
        weight_decay_embed=0.0, backbone_multiplier=0.1,
    )
    expectations = {
        # (parameter, lr, weight_decay)
        "backbone.conv.weight": (model.backbone.conv.weight, 1e-4, 0.05),
        "backbone.bn.weight": (model.backbone.bn.weight, 1e-4, 0.0),
        "backbone.bn.bias": (model.backbone.bn.bias, 1e-4, 0.0),
        "backbone.absolute_pos_embed": (model.backbone.absolute_pos_embed, 1e-4, 0.0),
        "backbone.attn.relative_position_bias_table": (
            model.backbone.attn.relative_position_bias_table, 1e-4, 0.0),
        "backbone.attn.qkv.weight": (model.backbone.attn.qkv.weight, 1e-4, 0.05),
        "backbone.norm.weight": (model.backbone.norm.weight, 1e-4, 0.0),
        "query_feat.weight": (model.query_feat.weight, 1e-3, 0.0),
        "level_embed": (model.level_embed, 1e-3, 0.0),
        # mask_embed is a head module, not an embedding table: it keeps weight decay.
        "mask_embed.weight": (model.mask_embed.weight, 1e-3, 0.05),
        "class_head.bias": (model.class_head.bias, 1e-3, 0.05),
    }
    for name, (param, lr, decay) in expectations.items():
        group = _group_of(groups, param)
        assert math.isclose(group["lr"], lr), name
        assert group["weight_decay"] == decay, name
        assert name in group["param_names"]
    grouped = {id(p) for g in groups for p in g["params"]}
    assert id(model.frozen.weight) not in grouped
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(trainable)


def test_build_optimizer_adamw_with_full_model_clipping():
    cfg = ddl_cfg(**{
        "SOLVER.BASE_LR": 1e-3, "SOLVER.WEIGHT_DECAY": 0.05, "SOLVER.BACKBONE_MULTIPLIER": 0.1,
        "SOLVER.CLIP_GRADIENTS.ENABLED": True, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "full_model",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 0.01,
    })
    optimizer = build_optimizer(cfg, _ToyMetaArch())
    assert isinstance(optimizer, torch.optim.AdamW)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([1e-4, 1e-3])
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_optimizer(ddl_cfg(**{"SOLVER.OPTIMIZER": "LION"}), _ToyMetaArch())


def test_fused_adamw_makes_the_same_clipped_update_as_the_default():
    cfg = ddl_cfg(**{
        "SOLVER.BASE_LR": 1e-3, "SOLVER.WEIGHT_DECAY": 0.05, "SOLVER.BACKBONE_MULTIPLIER": 0.1,
        "SOLVER.CLIP_GRADIENTS.ENABLED": True, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "full_model",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 0.01,
    })
    torch.manual_seed(0)
    models = [_ToyMetaArch() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    plain, fused = build_optimizer(cfg, models[0], fused=False), build_optimizer(cfg, models[1])
    assert not plain.defaults["fused"] and fused.defaults["fused"]  # auto: torch has CPU kernels
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=generator) for p in models[0].parameters()]
        for model, optimizer in zip(models, (plain, fused)):
            for param, grad in zip(model.parameters(), grads):
                param.grad = grad.clone()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_full_model_clipping_caps_the_global_norm():
    weights = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))]
    clipped_sgd = with_gradient_clipping(torch.optim.SGD, "full_model", clip_value=0.5)
    optimizer = clipped_sgd(weights, lr=1.0)
    weights[0].grad = torch.full((3,), 10.0)
    weights[1].grad = torch.full((4,), -10.0)
    optimizer.step()
    # With lr 1 and no momentum the update is minus the clipped gradient.
    update_norm = torch.cat([w.detach() for w in weights]).norm().item()
    assert update_norm == pytest.approx(0.5, rel=1e-4)
    # The direction is kept: every element moved by the same amount.
    assert torch.allclose(weights[0].abs(), weights[1].abs()[:3])
    with pytest.raises(ValueError, match="CLIP_TYPE"):
        with_gradient_clipping(torch.optim.SGD, "global", clip_value=1.0)


def test_warmup_poly_schedule_and_group_ratios():
    max_iter, warmup = 100, 10
    cfg = ddl_cfg(**{
        "SOLVER.BASE_LR": 1e-3, "SOLVER.LR_SCHEDULER_NAME": "WarmupPolyLR",
        "SOLVER.MAX_ITER": max_iter, "SOLVER.WARMUP_ITERS": warmup,
        "SOLVER.WARMUP_FACTOR": 0.01, "SOLVER.POLY_LR_POWER": 0.9,
        "SOLVER.BACKBONE_MULTIPLIER": 0.1,
    })
    optimizer = build_optimizer(cfg, _ToyMetaArch())
    scheduler = build_lr_scheduler(cfg, optimizer)
    head_lrs, backbone_lrs = [], []
    for _ in range(max_iter):
        lrs = sorted({g["lr"] for g in optimizer.param_groups})
        backbone_lrs.append(lrs[0])
        head_lrs.append(lrs[-1])
        optimizer.step()
        scheduler.step()
    assert head_lrs[0] == pytest.approx(1e-3 * 0.01)
    # Warm-up climbs linearly to the poly value at its end.
    assert all(a < b for a, b in zip(head_lrs[:warmup], head_lrs[1:warmup + 1]))
    assert head_lrs[warmup] == pytest.approx(1e-3 * (1 - warmup / max_iter) ** 0.9, rel=1e-6)
    assert head_lrs[50] == pytest.approx(1e-3 * 0.5 ** 0.9, rel=1e-6)
    assert all(a >= b for a, b in zip(head_lrs[warmup:], head_lrs[warmup + 1:]))
    for head_lr, backbone_lr in zip(head_lrs, backbone_lrs):
        assert backbone_lr == pytest.approx(0.1 * head_lr, rel=1e-6)


def test_poly_constant_ending_floors_the_rate():
    cfg = ddl_cfg(**{
        "SOLVER.BASE_LR": 1.0, "SOLVER.LR_SCHEDULER_NAME": "WarmupPolyLR", "SOLVER.MAX_ITER": 10,
        "SOLVER.WARMUP_ITERS": 0, "SOLVER.POLY_LR_CONSTANT_ENDING": 0.2,
        "SOLVER.BACKBONE_MULTIPLIER": 1.0,
    })
    optimizer = build_optimizer(cfg, nn.Linear(2, 2))
    scheduler = build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.2)
    assert min(lrs) == pytest.approx(0.2)


class _LossModel(nn.Module):
    """Returns a loss dict; one term turns NaN at ``nan_at_call``."""

    def __init__(self, nan_at_call):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))
        self.calls = 0
        self.nan_at_call = nan_at_call

    def forward(self, batch):
        self.calls += 1
        loss_mask = (self.weight * batch).sum()
        loss_det = self.weight.sum() * 0.1
        if self.calls - 1 == self.nan_at_call:
            loss_det = loss_det * float("nan")
        return {"loss_mask": loss_mask, "loss_det": loss_det}


def _endless_batches():
    while True:
        yield torch.ones(2)


def test_non_finite_loss_stops_before_the_step_and_names_terms():
    model = _LossModel(nan_at_call=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = SimpleTrainer(model, _endless_batches(), optimizer)
    trainer.register_hooks([NonFiniteLossHook(model)])
    with pytest.raises(NonFiniteLossError) as excinfo:
        trainer.train(0, 10)
    message = str(excinfo.value)
    assert "iteration 3" in message
    assert "loss_det=nan <-- non-finite" in message
    assert "loss_mask=" in message
    # Three healthy SGD steps happened, the NaN one did not reach the weights.
    assert torch.isfinite(model.weight).all()
    assert model.weight.detach().tolist() == pytest.approx([1 - 3 * 0.11] * 2)


def _ddp_worker(result_file):
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    ddp = build_ddp_model(model)
    assert isinstance(ddp, nn.parallel.DistributedDataParallel)
    rank = comm.get_rank()
    # Each rank sees a different input; DDP must average their gradients.
    inputs = torch.full((1, 3), float(rank + 1))
    ddp(inputs).sum().backward()
    grads = comm.all_gather(model.weight.grad.clone())
    if comm.is_main_process():
        torch.save(grads, result_file)


@pytest.mark.slow
def test_ddp_without_device_ids_on_cpu_averages_gradients(tmp_path):
    result_file = str(tmp_path / "grads.pt")
    launch(_ddp_worker, 2, dist_url="auto", args=(result_file,))
    grads = torch.load(result_file)
    assert len(grads) == 2
    # Inputs were 1 and 2 on the two ranks: the averaged gradient is 1.5 everywhere.
    for grad in grads:
        assert torch.allclose(grad, torch.full((1, 3), 1.5))


def test_leave_process_group_destroys_the_group_and_is_a_no_op_without_one(tmp_path):
    import torch.distributed as dist

    leave_process_group()  # no group yet: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}",
                            rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        from detectron2.utils import comm

        comm.create_local_process_group(1)  # what detectron2's launch makes in each worker
        assert comm.get_local_size() == 1
        leave_process_group()
        # A gloo group left alive at exit can abort the process (engine/launch.py): torch's
        # and detectron2's references are gone, and a later group gets its local group again.
        assert not dist.is_initialized() and comm._LOCAL_PROCESS_GROUP is None
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous2'}",
                                rank=0, world_size=1)
        comm.create_local_process_group(1)
        assert comm.get_local_size() == 1
        leave_process_group()
        assert not dist.is_initialized() and comm._LOCAL_PROCESS_GROUP is None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_atomic_checkpointer_writes_tag_and_removes_stale_partial_files(tmp_path):
    from ddl_mask2former.engine import AtomicDetectionCheckpointer

    stale = tmp_path / "model_0000009.pth.tmp.99999999"
    stale.write_bytes(b"half a checkpoint")
    model = nn.Linear(2, 2)
    checkpointer = AtomicDetectionCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000019", iteration=19)
    assert not stale.exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000019.pth"
    assert not [p.name for p in tmp_path.iterdir() if ".tmp." in p.name]
    restored = nn.Linear(2, 2)
    extra = AtomicDetectionCheckpointer(restored, str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 19
    assert torch.equal(restored.weight, model.weight)


def test_evaluation_leaves_the_training_random_state_alone(monkeypatch):
    """Evaluating in the middle of training (TEST.EVAL_PERIOD) must not shift training's random draws."""
    from detectron2.engine import DefaultTrainer

    from ddl_mask2former.engine.trainer import Trainer

    def drawing_test(cls, cfg, model, evaluators=None):
        torch.rand(5)  # as a DataLoader does when it draws its base seed
        return {"ddl": {"AUC": 50.0}}

    monkeypatch.setattr(DefaultTrainer, "test", classmethod(drawing_test))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert Trainer.test(ddl_cfg(), None) == {"ddl": {"AUC": 50.0}}
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("tiled", [False, True])
def test_evaluation_loader_keeps_native_pixels_when_tiling(tmp_path, tiled):
    """Evaluation and export must see what ForgeryPredictor sees: with TEST.TILE.ENABLED the
    model tiles native pixels, so the loader must not shrink large images to INPUT.BASE_SCALE."""
    from detectron2.data import DatasetCatalog

    from data_helpers import make_labeled_split
    from ddl_mask2former.data import register_ddl_split
    from ddl_mask2former.engine.trainer import Trainer

    make_labeled_split(str(tmp_path / "val"), num_real=1, num_fake=1, sizes=((90, 120),))
    name = f"ddl_test_native_{int(tiled)}"
    register_ddl_split(name, str(tmp_path / "val"), cache_dir=None)
    try:
        cfg = ddl_cfg(**{"INPUT.BASE_SCALE": (64, 48), "TEST.TILE.ENABLED": tiled,
                         "TEST.TILE.SIZE": 64, "TEST.TILE.OVERLAP": 16, "DATALOADER.NUM_WORKERS": 0})
        batches = list(Trainer.build_test_loader(cfg, name))
    finally:
        DatasetCatalog.remove(name)
    shapes = {tuple(batch[0]["image"].shape[-2:]) for batch in batches}
    assert {(batch[0]["height"], batch[0]["width"]) for batch in batches} == {(90, 120)}
    assert shapes == ({(90, 120)} if tiled else {(48, 64)})
