"""Output shapes and keys of DDLMask2Former for each backbone and each task selection."""
import pytest
import torch

from model_helpers import build, eval_inputs, tiny_cfg, training_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOC_LOSSES = {"loss_cls", "loss_mask", "loss_dice"}


@pytest.mark.parametrize("backbone", ["swin", "r18", "r50"])
def test_backbone_features_and_outputs(backbone):
    model = build(tiny_cfg(backbone))
    shapes = model.backbone.output_shape()
    assert [shapes[f].stride for f in ("res2", "res3", "res4", "res5")] == [4, 8, 16, 32]
    features = model.backbone(torch.zeros(1, 3, 64, 96))
    for name, spec in shapes.items():
        assert features[name].shape == (1, spec.channels, 64 // spec.stride, 96 // spec.stride)

    batch = training_batch(64, 96)
    model.train()
    losses = model(batch)
    deep = {f"{name}_{i}" for name in LOC_LOSSES for i in range(3)}  # initial queries + 2 earlier layers
    assert set(losses) == {"loss_det"} | LOC_LOSSES | deep
    assert all(value.dim() == 0 and torch.isfinite(value) for value in losses.values())

    model.eval()
    with torch.no_grad():
        outputs = model(eval_inputs(batch, height=75, width=110))
    for output in outputs:
        assert set(output) == {"fake_prob", "is_fake", "mask_prob", "mask"}
        assert output["fake_prob"].dim() == 0 and 0 <= output["fake_prob"].item() <= 1
        assert output["mask_prob"].shape == (75, 110) and output["mask_prob"].dtype == torch.float32
        assert output["mask_prob"].min() >= 0 and output["mask_prob"].max() <= 1
        assert torch.equal(output["mask"], output["mask_prob"] > 0.5)


def test_sizes_not_multiple_of_32_are_padded():
    model = build(tiny_cfg()).eval()
    image = torch.randint(0, 255, (3, 50, 70), dtype=torch.uint8)
    with torch.no_grad():
        (output,) = model([{"image": image, "height": 50, "width": 70}])
    assert output["mask_prob"].shape == (50, 70)


def test_detection_only_builds_and_runs_no_localization_branch():
    model = build(tiny_cfg(tasks=("detection",)))
    assert model.pixel_decoder is None and model.transformer_decoder is None
    batch = training_batch()
    model.train()
    assert set(model(batch)) == {"loss_det"}
    model.eval()
    with torch.no_grad():
        outputs = model(eval_inputs(batch))
    assert all(set(o) == {"fake_prob", "is_fake"} for o in outputs)


def test_localization_only_builds_and_runs_no_detection_branch():
    model = build(tiny_cfg(tasks=("localization",)))
    assert model.detection_head is None
    batch = training_batch()
    for record in batch:
        del record["label"]  # localization training does not need image labels
    model.train()
    assert "loss_det" not in model(batch)
    model.eval()
    with torch.no_grad():
        outputs = model(eval_inputs(batch))
    assert all(set(o) == {"mask_prob", "mask"} for o in outputs)


def test_joint_outputs_equal_single_task_outputs():
    """The branches are independent: each single-task model reproduces the joint model's output."""
    joint = build(tiny_cfg()).eval()
    detection = build(tiny_cfg(tasks=("detection",))).eval()
    localization = build(tiny_cfg(tasks=("localization",))).eval()
    detection.load_state_dict(joint.state_dict(), strict=False)
    localization.load_state_dict(joint.state_dict(), strict=False)
    inputs = eval_inputs(training_batch())
    with torch.no_grad():
        both, det, loc = joint(inputs), detection(inputs), localization(inputs)
    for b, d, l in zip(both, det, loc):
        assert torch.equal(b["fake_prob"], d["fake_prob"])
        assert torch.equal(b["mask_prob"], l["mask_prob"])


def test_bad_inputs_raise_clear_errors():
    model = build(tiny_cfg())
    with pytest.raises(ValueError, match="TASKS"):
        build(tiny_cfg(tasks=("segmentation",)))
    model.train()
    batch = training_batch()
    del batch[1]["forgery_mask"]
    with pytest.raises(ValueError, match="fake.png.*forgery_mask"):
        model(batch)
    batch = training_batch()
    batch[1]["forgery_mask"] = batch[1]["forgery_mask"][:-2]
    with pytest.raises(ValueError, match="fake.png.*forgery_mask shape"):
        model(batch)
    model.eval()
    with pytest.raises(ValueError, match="bad.png.*'image'"):
        model([{"image": torch.zeros(64, 64), "file_name": "bad.png"}])


def test_without_deep_supervision_only_final_losses():
    cfg = tiny_cfg()
    cfg.MODEL.DDL.LOSS.DEEP_SUPERVISION = False
    model = build(cfg).train()
    losses = model(training_batch())
    assert set(losses) == {"loss_det"} | LOC_LOSSES
    sum(losses.values()).backward()


def test_large_original_size_is_one_upsampled_map():
    """A 4096-px original: the base-scale input is decoded, then one probability map is upsampled."""
    model = build(tiny_cfg()).eval()
    image = torch.randint(0, 255, (3, 64, 256), dtype=torch.uint8)
    with torch.no_grad():
        (output,) = model([{"image": image, "height": 1024, "width": 4096}])
    assert output["mask_prob"].shape == (1024, 4096) and output["mask"].shape == (1024, 4096)
    assert 0 <= output["mask_prob"].min() and output["mask_prob"].max() <= 1


def test_max_pooled_head_skips_cells_that_hold_only_padding():
    """In a batch padded to its largest image, a cell of padding alone cannot set a smaller
    image's score; a cell partly inside the image still counts."""
    from ddl_mask2former.modeling.detection_head import DetectionHead

    head = DetectionHead({"res5": 2}, ("res5",), pooling="max")
    with torch.no_grad():
        head.classifier.weight.copy_(torch.tensor([[1.0, 0.0]]))
        head.classifier.bias.zero_()
    features = torch.zeros(2, 2, 4, 4)  # stride 32 over a 128x128 padded batch
    features[0, 0, 3, :] = 100.0  # image 0 is 90 px high: row 3 (input rows 96-127) is padding
    features[0, 0, 2, 1] = 7.0  # row 2 (rows 64-95) is partly inside the image
    features[1, 0, 1, 1] = 3.0
    logits = head({"res5": features}, image_sizes=[(90, 128), (128, 128)], padded_size=(128, 128))
    assert logits.tolist() == [7.0, 3.0]
    assert head({"res5": features}).tolist() == [100.0, 3.0]  # without sizes: every cell


def test_mixed_size_batch_runs_with_the_max_pooled_head():
    cfg = tiny_cfg()
    cfg.MODEL.DDL.DET_HEAD.POOLING = "max"
    model = build(cfg).eval()
    generator = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator),
               "height": h, "width": w} for h, w in ((64, 64), (40, 100))]
    with torch.no_grad():
        outputs = model(inputs)
    assert [tuple(o["mask_prob"].shape) for o in outputs] == [(64, 64), (40, 100)]
    assert all(0.0 <= float(o["fake_prob"]) <= 1.0 for o in outputs)
