"""A trained checkpoint must fit the model the config builds (engine.TrainedModelCheckpointer): the
quickstart Swin checkpoint loaded into the quickstart R18 model stops with a message naming the
file, instead of evaluating a randomly initialized backbone; older checkpoints without the
verdict's later buffers still load."""
import re
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model

from ddl_mask2former.config import load_config
from ddl_mask2former.engine import CheckpointMismatchError, TrainedModelCheckpointer

from tool_helpers import load_tool

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart"
R18_CONFIG = QUICKSTART / "ddl_mask2former_quickstart_R18.yaml"
SWIN_CONFIG = QUICKSTART / "ddl_mask2former_quickstart_swin.yaml"
# The verdict rule these tests calibrate by hand (the quickstart configs use fusion).
MAP_MAX = ("MODEL.DDL.VERDICT.RULE", "map_max")


def _model(config_file, seed=0, opts=()):
    torch.manual_seed(seed)
    return build_model(load_config(str(config_file), ["MODEL.DEVICE", "cpu", *opts]))


def _save(state_dict, path):
    """A checkpoint file as detectron2 writes one."""
    torch.save({"model": state_dict, "iteration": 1999}, path)
    return str(path)


@pytest.fixture(scope="module")
def swin_checkpoint(tmp_path_factory):
    return _save(_model(SWIN_CONFIG, seed=1).state_dict(), tmp_path_factory.mktemp("swin") / "model_final.pth")


def _load(model, path):
    return TrainedModelCheckpointer(model, backbone_name="build_resnet_backbone").load(path)


def test_a_checkpoint_of_another_backbone_is_refused_naming_the_file(swin_checkpoint):
    with pytest.raises(CheckpointMismatchError) as error:
        _load(_model(R18_CONFIG), swin_checkpoint)
    message = str(error.value)
    assert message.startswith(f"{swin_checkpoint} does not fit the model the config builds "
                              f"(MODEL.BACKBONE.NAME build_resnet_backbone)")
    assert error.value.missing and error.value.unused
    # The first keys of each kind: the R18 stem missing, Swin's patch embedding unused.
    assert error.value.missing[0] in message and "backbone.stem" in error.value.missing[0]
    assert error.value.unused[0] in message and "patch_embed" in error.value.unused[0]
    assert f"{len(error.value.missing)} model parameters/buffers are missing" in message
    assert "the config it was trained with" in message and "config.yaml" in message
    assert isinstance(error.value, ValueError)


def test_the_same_architecture_loads_exactly(swin_checkpoint):
    model = _model(SWIN_CONFIG, seed=2)
    extra = TrainedModelCheckpointer(model).load(swin_checkpoint)
    assert extra["iteration"] == 1999
    saved = torch.load(swin_checkpoint, weights_only=False)["model"]
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())


def test_a_checkpoint_without_the_verdict_buffers_loads_as_before(tmp_path):
    trained = _model(R18_CONFIG, seed=1, opts=MAP_MAX)
    trained.verdict.set_calibration("map_max", {"map_max": 2.0}, -1.0, 0.7, 0.1)
    state = trained.state_dict()
    verdict_keys = [key for key in state if key.startswith("verdict.")]
    assert "verdict.calibration_iteration" in verdict_keys
    # A checkpoint from before calibration_iteration existed, and one from before the verdict.
    older = _save({k: v for k, v in state.items() if k != "verdict.calibration_iteration"}, tmp_path / "old.pth")
    oldest = _save({k: v for k, v in state.items() if k not in verdict_keys}, tmp_path / "oldest.pth")
    model = _model(R18_CONFIG, opts=MAP_MAX)
    _load(model, older)
    assert model.verdict.calibrated and model.verdict.fitted_at_iteration is None
    model = _model(R18_CONFIG, opts=MAP_MAX)
    _load(model, oldest)
    assert not model.verdict.calibrated
    assert torch.equal(model.backbone.stem.conv1.weight, trained.backbone.stem.conv1.weight)


def test_an_unknown_key_or_another_shape_is_refused(tmp_path):
    state = _model(R18_CONFIG).state_dict()
    extra = _save(dict(state, **{"sem_seg_head.unknown.weight": torch.zeros(3)}), tmp_path / "extra.pth")
    with pytest.raises(CheckpointMismatchError, match=r"1 of its keys are not used by the model "
                                                      r"\(sem_seg_head\.unknown\.weight\)"):
        _load(_model(R18_CONFIG), extra)
    key = "backbone.stem.conv1.weight"
    reshaped = _save(dict(state, **{key: state[key][:1]}), tmp_path / "reshaped.pth")
    with pytest.raises(CheckpointMismatchError, match=r"1 have another shape there .*stem\.conv1\.weight") as error:
        _load(_model(R18_CONFIG), reshaped)
    # The key of another shape is not counted again as missing.
    assert not error.value.missing and not error.value.unused
    # Beside a training's config.yaml, the message names it.
    (tmp_path / "config.yaml").write_text("_BASE_: ...\n")
    with pytest.raises(CheckpointMismatchError, match=re.escape(f"--config-file {tmp_path / 'config.yaml'}") + "$"):
        _load(_model(R18_CONFIG), extra)


def test_a_tool_stops_with_one_line_naming_the_checkpoint(swin_checkpoint, tmp_path):
    calibrate = load_tool("calibrate")
    output = tmp_path / "calibrated.pth"
    with pytest.raises(SystemExit) as error:
        calibrate.main(["--config-file", str(R18_CONFIG), "--output", str(output), "MODEL.WEIGHTS", swin_checkpoint])
    message = str(error.value.code)
    assert message.startswith(f"calibrate.py: {swin_checkpoint} does not fit the model the config builds")
    assert "\n" not in message and not output.exists()
