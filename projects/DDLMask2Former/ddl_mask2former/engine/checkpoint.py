"""Loading trained weights for evaluation, calibration, prediction and export: the checkpoint must
fit the model the config builds, or the run stops (``TrainedModelCheckpointer``).

detectron2's ``DetectionCheckpointer`` loads whatever matches and only warns about the rest, which
is right for an initialization (a converted ImageNet backbone, ``Trainer.resume_or_load``) and
wrong for a trained model: a checkpoint of another architecture leaves a randomly initialized
network that evaluates to chance-level metrics. Training keeps detectron2's checkpointer.
"""
import os
from typing import List, Optional, Sequence, Tuple

from detectron2.checkpoint import DetectionCheckpointer

from ..modeling.verdict import Verdict

__all__ = ["CheckpointMismatchError", "TrainedModelCheckpointer"]

# Keys of each kind an error message names.
_KEYS_SHOWN = 3


class CheckpointMismatchError(ValueError):
    """A trained checkpoint whose parameters do not fit the model the config builds.

    ``path``: the checkpoint file; ``missing``: model keys the checkpoint lacks;
    ``wrong_shapes``: (key, shape in the checkpoint, shape in the model); ``unused``: checkpoint
    keys the model has no place for."""

    def __init__(self, message: str, path: str, missing: Sequence[str],
                 wrong_shapes: Sequence[Tuple[str, tuple, tuple]], unused: Sequence[str]):
        super().__init__(message)
        self.path = path
        self.missing = list(missing)
        self.wrong_shapes = list(wrong_shapes)
        self.unused = list(unused)


class TrainedModelCheckpointer(DetectionCheckpointer):
    """A DetectionCheckpointer for trained models: ``load`` raises ``CheckpointMismatchError``
    when a model parameter or buffer is missing from the checkpoint, has another shape there, or
    the checkpoint holds a key the model does not use.

    Missing verdict buffers are the exception: a checkpoint from before a buffer was added loads
    with its default (``modeling/verdict.py``: an unknown ``calibration_iteration``; no
    calibration at all is handled by ``prepare_verdict``). ``backbone_name``: the config's
    MODEL.BACKBONE.NAME, named in the error."""

    def __init__(self, model, save_dir: str = "", *, backbone_name: Optional[str] = None, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.backbone_name = backbone_name
        self._loading_path = None

    def load(self, path, checkpointables=None):
        # _load_model does not see the path, and the error names it.
        self._loading_path = path
        try:
            return super().load(path, checkpointables)
        finally:
            self._loading_path = None

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        wrong_shapes = list(incompatible.incorrect_shapes)
        # A key of another shape is dropped before loading, so it is also reported missing.
        wrong_shape_keys = {key for key, _, _ in wrong_shapes}
        verdict_prefixes = tuple(f"{name}." for name, module in self.model.named_modules()
                                 if isinstance(module, Verdict))
        missing = [key for key in incompatible.missing_keys
                   if key not in wrong_shape_keys and not key.startswith(verdict_prefixes)]
        unused = list(incompatible.unexpected_keys)
        if missing or wrong_shapes or unused:
            path = self._loading_path or "the checkpoint"
            raise CheckpointMismatchError(self._message(path, missing, wrong_shapes, unused),
                                          path, missing, wrong_shapes, unused)
        return incompatible

    def _message(self, path: str, missing: List[str], wrong_shapes: List[Tuple[str, tuple, tuple]],
                 unused: List[str]) -> str:
        model = "the model the config builds"
        if self.backbone_name:
            model += f" (MODEL.BACKBONE.NAME {self.backbone_name})"
        problems = []
        if missing:
            problems.append(f"{len(missing)} model parameters/buffers are missing from it ({_first(missing)})")
        if wrong_shapes:
            shown = [f"{key} {tuple(theirs)} vs {tuple(ours)}" for key, theirs, ours in wrong_shapes]
            problems.append(f"{len(wrong_shapes)} have another shape there (checkpoint vs model: {_first(shown)})")
        if unused:
            problems.append(f"{len(unused)} of its keys are not used by the model ({_first(unused)})")
        saved_config = os.path.join(os.path.dirname(path), "config.yaml")
        if os.path.isfile(saved_config):
            advice = f"Pass the config it was trained with: --config-file {saved_config}"
        else:
            advice = ("Pass the config it was trained with (--config-file; a training output folder "
                      "holds it as config.yaml)")
        return f"{path} does not fit {model}: {'; '.join(problems)}. {advice}"


def _first(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_KEYS_SHOWN])
    return shown + (", ..." if len(items) > _KEYS_SHOWN else "")
