"""The detectron2 Trainer for DDL-Mask2Former, usable on GPUs and on CPUs (one or many processes)."""
import logging
import os
import weakref

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, TrainerBase, hooks
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from .hooks import NonFiniteLossHook
from .lr_scheduler import build_lr_scheduler
from .optimizer import build_optimizer
from .compilation import apply_memory_format, compile_submodules
from .train_loop import DDLTrainLoop, amp_dtype_from_cfg

__all__ = ["AtomicDetectionCheckpointer", "CalibrationHook", "Trainer", "build_ddp_model"]

logger = logging.getLogger(__name__)


def build_ddp_model(model, find_unused_parameters=False):
    """Wrap ``model`` in DistributedDataParallel when more than one process runs.

    detectron2's ``create_ddp_model`` always passes ``device_ids``, which DDP rejects for a
    CPU module; here ``device_ids`` is set only for a CUDA module, from its own device.
    """
    if comm.get_world_size() == 1:
        return model
    device = next(model.parameters()).device
    kwargs = {"broadcast_buffers": False, "find_unused_parameters": find_unused_parameters}
    if device.type == "cuda":
        kwargs["device_ids"] = [device.index if device.index is not None else comm.get_local_rank()]
    return DistributedDataParallel(model, **kwargs)


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """A DetectionCheckpointer whose files are never half written.

    A checkpoint is written to a temporary file and renamed into place, then
    ``last_checkpoint`` is updated the same way, so a process killed at any moment
    (``kill -9``) leaves the previous checkpoint intact and ``--resume`` works.
    """

    _TMP_MARK = ".tmp."

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        self._remove_stale_temporary_files()
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        self._write_atomically(save_file, lambda f: torch.save(data, f), mode="wb")
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        self._write_atomically(save_file, lambda f: f.write(last_filename_basename), mode="w")

    def _remove_stale_temporary_files(self):
        """Delete half-written files left by a killed process (they can be large)."""
        if not os.path.isdir(self.save_dir):
            return
        own_suffix = f"{self._TMP_MARK}{os.getpid()}"
        for entry in os.scandir(self.save_dir):
            if self._TMP_MARK in entry.name and not entry.name.endswith(own_suffix):
                self.logger.info(f"Removing {entry.path}, left by an interrupted save")
                os.remove(entry.path)

    def _write_atomically(self, path, write, mode):
        local_path = self.path_manager.get_local_path(os.path.dirname(path) or ".")
        if not os.path.isdir(local_path):
            # Not a plain local folder (e.g. a remote store): fall back to a direct write.
            with self.path_manager.open(path, mode) as f:
                write(f)
            return
        tmp_path = f"{path}{self._TMP_MARK}{os.getpid()}"
        with open(tmp_path, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)


class Trainer(DefaultTrainer):
    """DefaultTrainer with the DDL mapper, the DDL evaluator, parameter groups, a poly
    schedule, CPU-capable DDP and a stop on non-finite losses."""

    def __init__(self, cfg):
        # Same construction order as DefaultTrainer.__init__, with these changes: DDP comes from
        # build_ddp_model (works for CPU modules), the inner loop is DDLTrainLoop (float16 or
        # bfloat16 autocast, one host sync per step for the losses), optional channels-last
        # weights and torch.compile'd submodules, and a NonFiniteLossHook watches the losses.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        model = self.build_model(cfg)
        apply_memory_format(model, cfg.SOLVER.CHANNELS_LAST)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        compile_submodules(model, cfg.SOLVER.COMPILE.MODULES, cfg.SOLVER.COMPILE.MODE)
        model = build_ddp_model(model, cfg.SOLVER.DDP_FIND_UNUSED_PARAMETERS)

        # SOLVER.AMP.PRECISION picks float16 (GradScaler) or bfloat16 (no scaler, CPU too).
        self._trainer = DDLTrainLoop(
            model, data_loader, optimizer, amp_dtype=amp_dtype_from_cfg(cfg),
            device_type=torch.device(cfg.MODEL.DEVICE).type, early_loss_copy=cfg.SOLVER.EARLY_LOSS_COPY,
            mark_cudagraph_steps=bool(cfg.SOLVER.COMPILE.MODULES) and cfg.SOLVER.COMPILE.MODE == "reduce-overhead",
        )
        self.non_finite_loss_hook = NonFiniteLossHook(model)
        # after_backward is called by the inner trainer's run_step, so the hook lives there.
        self._trainer.register_hooks([self.non_finite_loss_hook])

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicDetectionCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        """detectron2's default hooks, with the log/metrics period from SOLVER.LOG_PERIOD, and
        with DATASETS.CALIBRATION a ``CalibrationHook`` just before the evaluation hook."""
        ret = super().build_hooks()
        for i, hook in enumerate(ret):
            if isinstance(hook, hooks.PeriodicWriter):
                # Reuse its writers: building new ones would open a second TensorBoard file.
                ret[i] = hooks.PeriodicWriter(hook._writers, period=self.cfg.SOLVER.LOG_PERIOD)
        if self.cfg.DATASETS.CALIBRATION:
            position = next((i for i, hook in enumerate(ret) if isinstance(hook, hooks.EvalHook)), len(ret))
            ret.insert(position, CalibrationHook(self.cfg.TEST.EVAL_PERIOD, self.cfg, self.checkpointer))
        return ret

    @classmethod
    def calibrate(cls, cfg, model):
        """Fit the verdict of ``model`` on DATASETS.CALIBRATION (every rule; the fits are stored
        in the model's buffers) and log them. Leaves torch's random state as it was."""
        from ..evaluation.calibration import calibrate_model, collect_records

        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            records = []
            for dataset_name in cfg.DATASETS.CALIBRATION:
                if not DatasetCatalog.get(dataset_name):
                    continue  # an empty split (a tiny dataset's held-out part): reported below
                records += collect_records(model, cls.build_test_loader(cfg, dataset_name),
                                           cfg.INPUT.MASK_THRESHOLD)
        labels = [r.label for r in records]
        if 0 not in labels or 1 not in labels:
            # A training run must not be lost at its end: say so loudly and keep the verdict as it is.
            logger.warning("Verdict NOT calibrated: DATASETS.CALIBRATION %s holds %d real and %d fake images; "
                           "calibration needs both (the verdict keeps its previous parameters)",
                           list(cfg.DATASETS.CALIBRATION), labels.count(0), labels.count(1))
            return []
        fits = calibrate_model(model, records, cfg.MODEL.DDL.VERDICT.TARGET_FPR)
        rule = cfg.MODEL.DDL.VERDICT.RULE
        lines = [f"  {fit.rule:<8} threshold {fit.threshold:.4f}  real called fake {100 * fit.fpr:5.1f} %  "
                 f"fake called fake {100 * fit.tpr:5.1f} %" + ("   <- in use" if fit.rule == rule else "")
                 for fit in fits]
        logger.info("Verdict calibrated on %s (%d images, target false-positive rate %.1f %%):\n%s",
                    ", ".join(cfg.DATASETS.CALIBRATION), len(records),
                    100 * cfg.MODEL.DDL.VERDICT.TARGET_FPR, "\n".join(lines))
        return fits

    @classmethod
    def build_train_loader(cls, cfg):
        from ..data import DDLDatasetMapper

        return build_detection_train_loader(cfg, mapper=DDLDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Evaluation and export see what ForgeryPredictor sees: the base-scale resize, or the
        native pixels with TEST.TILE.ENABLED (the model tiles them)."""
        from ..data import DDLDatasetMapper

        return build_detection_test_loader(cfg, dataset_name, mapper=DDLDatasetMapper(cfg, is_train=False))

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """detectron2's evaluation, leaving torch's random state as training had it: building a
        test data loader draws a seed from torch's generator, so without this the evaluation
        schedule (TEST.EVAL_PERIOD) would change every later random draw of training."""
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            results = super().test(cfg, model, evaluators)
        if cfg.TEST.EXPORT_DIR and comm.is_main_process():
            from ..evaluation.export import write_verdict_description
            from ..evaluation.calibration import unwrap_model

            verdict = unwrap_model(model).verdict
            for dataset_name in cfg.DATASETS.TEST:
                export_dir = cfg.TEST.EXPORT_DIR
                if len(cfg.DATASETS.TEST) > 1:
                    export_dir = os.path.join(export_dir, dataset_name)
                if verdict.enabled and os.path.isdir(export_dir):
                    write_verdict_description(export_dir, verdict.describe())
        return results

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """DDLEvaluator from cfg.TEST.* (export to TEST.EXPORT_DIR when set)."""
        from ..evaluation import build_ddl_evaluator

        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_ddl_evaluator(cfg, dataset_name, output_dir=output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)


class CalibrationHook(hooks.HookBase):
    """Calibrates the verdict on DATASETS.CALIBRATION before every evaluation (every ``period``
    iterations and after the last one), so each evaluation scores the verdict as it will be
    shipped; after the last iteration it saves ``model_final`` again with the fitted buffers.
    Register it before detectron2's ``EvalHook`` (``Trainer.build_hooks`` does)."""

    def __init__(self, period, cfg, checkpointer):
        self._period = period
        self._cfg = cfg
        self._checkpointer = checkpointer

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if self._period > 0 and next_iter % self._period == 0 and next_iter != self.trainer.max_iter:
            Trainer.calibrate(self._cfg, self.trainer.model)

    def after_train(self):
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            Trainer.calibrate(self._cfg, self.trainer.model)
            self._checkpointer.save("model_final")
            comm.synchronize()
