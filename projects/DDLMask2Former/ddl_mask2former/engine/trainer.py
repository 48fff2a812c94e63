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

from .checkpoint import TrainedModelCheckpointer
from .hooks import NonFiniteLossHook
from .lr_scheduler import build_lr_scheduler
from .optimizer import build_optimizer
from .compilation import apply_memory_format, compile_submodules
from .train_loop import DDLTrainLoop, amp_dtype_from_cfg

__all__ = ["AtomicDetectionCheckpointer", "CalibrationHook", "Trainer", "build_ddp_model",
           "check_evaluation_verdict", "checkpoint_iteration", "load_evaluation_model", "prepare_verdict", "requested_target_fpr"]

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
            seed=_run_seed(cfg),
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
        with DATASETS.CALIBRATION a ``CalibrationHook`` just before the periodic checkpointer
        (and the evaluation hook), so that every checkpoint and evaluation has a fit of its own
        weights."""
        ret = super().build_hooks()
        for i, hook in enumerate(ret):
            if isinstance(hook, hooks.PeriodicWriter):
                # Reuse its writers: building new ones would open a second TensorBoard file.
                ret[i] = hooks.PeriodicWriter(hook._writers, period=self.cfg.SOLVER.LOG_PERIOD)
        if self.cfg.DATALOADER.SKIP_BAD_SAMPLES:
            ret.append(BadFilesReport(self.cfg.OUTPUT_DIR))
        if self.cfg.DATASETS.CALIBRATION:
            # Only the main process has a checkpointer; every process calibrates (it gathers).
            position = next((i for i, hook in enumerate(ret)
                             if isinstance(hook, (hooks.PeriodicCheckpointer, hooks.EvalHook))), len(ret))
            ret.insert(position, CalibrationHook(self.cfg))
        return ret

    @classmethod
    def calibrate(cls, cfg, model, iteration=None):
        """Fit the verdict of ``model`` on DATASETS.CALIBRATION (every rule; the fits are stored
        in the model's buffers, marked with the weights' training ``iteration``, None: unknown)
        and log them. Leaves torch's random state as it was."""
        from ..evaluation.calibration import calibrate_model, collect_records

        from ..data.ddl_dataset import bad_file_policy

        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        # The calibration split is training data: SKIP_BAD_SAMPLES leaves its unreadable files out too.
        with torch.random.fork_rng(devices=devices), \
                bad_file_policy(cfg.DATALOADER.SKIP_BAD_SAMPLES, cfg.OUTPUT_DIR):
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
        fits = calibrate_model(model, records, cfg.MODEL.DDL.VERDICT.TARGET_FPR, iteration=iteration)
        rule = cfg.MODEL.DDL.VERDICT.RULE
        lines = [f"  {fit.rule:<8} threshold {fit.threshold:.4f}  real called fake {100 * fit.fpr:5.1f} %  "
                 f"fake called fake {100 * fit.tpr:5.1f} %" + ("   <- in use" if fit.rule == rule else "")
                 for fit in fits]
        logger.info("Verdict calibrated on %s (%d images, target false-positive rate %.1f %%%s):\n%s",
                    ", ".join(cfg.DATASETS.CALIBRATION), len(records),
                    100 * cfg.MODEL.DDL.VERDICT.TARGET_FPR,
                    "" if iteration is None else f", weights of iteration {iteration}", "\n".join(lines))
        return fits

    @classmethod
    def build_train_loader(cls, cfg):
        """The DDL mapper's loader; with DATALOADER.SKIP_BAD_SAMPLES the index leaves unreadable
        files out and lists them in OUTPUT_DIR (else it stops, naming them all)."""
        from detectron2.data import get_detection_dataset_dicts
        from detectron2.data.common import DatasetFromList

        from ..data import DDLDatasetMapper
        from ..data.ddl_dataset import bad_file_policy
        from ..data.training_order import DrawSampler, SeededDrawDataset

        with bad_file_policy(cfg.DATALOADER.SKIP_BAD_SAMPLES, cfg.OUTPUT_DIR):
            dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
        # Draws seeded by the run's seed (data/training_order.py), so that --resume continues them.
        world_size = comm.get_world_size()
        sampler = DrawSampler(comm.get_rank(), world_size, cfg.SOLVER.IMS_PER_BATCH // world_size)
        dataset = SeededDrawDataset(DatasetFromList(dicts, copy=False), DDLDatasetMapper(cfg, is_train=True),
                                    _run_seed(cfg))
        loader = build_detection_train_loader(
            dataset, mapper=None, sampler=sampler, total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING, num_workers=cfg.DATALOADER.NUM_WORKERS)
        loader.draw_sampler = sampler
        return loader

    def resume_or_load(self, resume=True):
        """detectron2's, then the data stream set to continue at the resumed iteration."""
        super().resume_or_load(resume=resume)
        sampler = getattr(self._trainer.data_loader, "draw_sampler", None)
        if sampler is not None:
            sampler.start_at(self.start_iter)

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
        from ..evaluation.calibration import unwrap_model

        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        verdict = getattr(unwrap_model(model), "verdict", None)
        # An export also writes the evidence before the verdict, which ensembles fuse.
        previous = verdict.keep_evidence if verdict is not None else None
        if verdict is not None:
            verdict.keep_evidence = bool(cfg.TEST.EXPORT_DIR)
        try:
            with torch.random.fork_rng(devices=devices):
                results = super().test(cfg, model, evaluators)
        finally:
            if verdict is not None:
                verdict.keep_evidence = previous
        if cfg.TEST.EXPORT_DIR and comm.is_main_process() and verdict is not None:
            from ..evaluation.export import write_verdict_description

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


def _run_seed(cfg):
    """The seed of the data stream and of each iteration's random state: SEED, or (SEED < 0) one
    random seed shared by every process (then a resumed run cannot repeat the interrupted one)."""
    return cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()


class CalibrationHook(hooks.HookBase):
    """Calibrates the verdict on DATASETS.CALIBRATION whenever the weights are about to be saved
    or evaluated: every SOLVER.CHECKPOINT_PERIOD and TEST.EVAL_PERIOD iterations and after the
    last one. Each fit is marked with the iteration of the weights it was made on, the number
    the checkpoint stores as ``iteration``. Register it before detectron2's
    ``PeriodicCheckpointer`` and ``EvalHook`` (``Trainer.build_hooks`` does)."""

    def __init__(self, cfg):
        self._cfg = cfg
        self._periods = [p for p in (cfg.SOLVER.CHECKPOINT_PERIOD, cfg.TEST.EVAL_PERIOD) if p > 0]

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter == self.trainer.max_iter or any(next_iter % p == 0 for p in self._periods):
            Trainer.calibrate(self._cfg, self.trainer.model, iteration=self.trainer.iter)


class BadFilesReport(hooks.HookBase):
    """At the end of training (DATALOADER.SKIP_BAD_SAMPLES), says how many unreadable files the
    index left out and how many samples every process and worker skipped while training, from
    OUTPUT_DIR/bad_files.txt, where both are listed."""

    def __init__(self, output_dir):
        self._output_dir = output_dir

    def after_train(self):
        from ..data.ddl_dataset import BAD_FILES_NAME, read_bad_files

        if not comm.is_main_process():
            return
        found = read_bad_files(self._output_dir)
        if found:
            logger.warning("Left out as unreadable (DATALOADER.SKIP_BAD_SAMPLES): %d file(s) when indexing, %d "
                           "sample(s) during training; listed in %s", len(found.get("index", ())),
                           len(found.get("training", ())), os.path.join(self._output_dir, BAD_FILES_NAME))


def checkpoint_iteration(checkpoint):
    """The training iteration a loaded checkpoint's weights come from (the ``iteration`` that
    detectron2's checkpointer stores), or None (weights saved without it)."""
    iteration = checkpoint.get("iteration") if isinstance(checkpoint, dict) else None
    if iteration is None and isinstance(checkpoint, dict) and isinstance(checkpoint.get("trainer"), dict):
        iteration = checkpoint["trainer"].get("iteration")
    return None if iteration is None else int(iteration)


def _calibration_data_problem(cfg):
    """Why DATASETS.CALIBRATION cannot be read (its first error), or None."""
    from ..data.image_io import DDLDataError

    for dataset_name in cfg.DATASETS.CALIBRATION:
        try:
            DatasetCatalog.get(dataset_name)
        except (DDLDataError, KeyError, OSError) as exc:
            return f"{dataset_name}: {exc}"
    return None


def prepare_verdict(cfg, model, checkpoint, weights, requested_target_fpr=None, dry_run=False):
    """Make the verdict of a loaded ``model`` fit for evaluation, or say why it cannot be.

    The verdict is (re)fitted on DATASETS.CALIBRATION when the checkpoint ``weights`` holds no
    calibration, when its fit was made on the weights of another iteration than the
    checkpoint's, or when ``requested_target_fpr`` (a TARGET_FPR given on the command line)
    differs from the rate it was fitted at. Without calibration data a stale fit or another rate
    is refused (``VerdictCalibrationError``, saying how to go on); an uncalibrated checkpoint runs
    with its uncalibrated verdict, with a warning, only when DATASETS.CALIBRATION is empty.
    ``dry_run``: only check (before processes are launched). Returns the reason it refitted, or None.
    """
    from ..evaluation.calibration import VerdictCalibrationError, unwrap_model

    verdict = unwrap_model(model).verdict
    if not verdict.enabled:
        return None
    weights_iteration = checkpoint_iteration(checkpoint)
    fitted_at = verdict.fitted_at_iteration
    # reason: why the fit must be made again; other_way: how to run without doing so (or None).
    if not verdict.calibrated:
        reason = f"{weights} holds no verdict calibration (uncalibrated checkpoint)"
        other_way = ('or run with the uncalibrated verdict (threshold 0.5, with a warning): add '
                     'DATASETS.CALIBRATION "()"')
    elif fitted_at is not None and weights_iteration is not None and fitted_at != weights_iteration:
        reason = (f"the verdict in {weights} was fitted on the weights of iteration {fitted_at}, "
                  f"but its weights are from iteration {weights_iteration}")
        other_way = None
    elif requested_target_fpr is not None and abs(requested_target_fpr - verdict.target_fpr) > 1e-12:
        reason = (f"the verdict in {weights} was calibrated at a false-positive rate of "
                  f"{verdict.target_fpr:g}, and MODEL.DDL.VERDICT.TARGET_FPR {requested_target_fpr:g} was given")
        other_way = f"or leave out the TARGET_FPR override to use the checkpoint's rate {verdict.target_fpr:g}"
    else:
        return None
    calibrate_command = (f"python tools/calibrate.py --config-file CONFIG --output calibrated.pth "
                         f"MODEL.WEIGHTS {weights} DATASETS.CALIBRATION \"('DATASET',)\"")
    if not cfg.DATASETS.CALIBRATION:
        if verdict.calibrated:
            raise VerdictCalibrationError(
                f"{reason}, and DATASETS.CALIBRATION is empty, so it cannot be fitted again. Name the "
                f"calibration data (DATASETS.CALIBRATION \"('ddl_i_train_calib',)\"), or calibrate the "
                f"checkpoint once where that data is: {calibrate_command}" + (f"; {other_way}" if other_way else ""))
        if not dry_run:
            logger.warning("%s and DATASETS.CALIBRATION is empty: running with the uncalibrated '%s' verdict "
                           "(threshold 0.5); fake_prob and is_fake are not calibrated", reason, verdict.rule)
        return None
    problem = _calibration_data_problem(cfg)
    if problem is not None:
        raise VerdictCalibrationError(
            f"{reason}; calibrating it needs DATASETS.CALIBRATION {tuple(cfg.DATASETS.CALIBRATION)}, "
            f"which cannot be read ({problem}). Either calibrate the checkpoint once where that data "
            f"is: {calibrate_command}" + (f"; {other_way}" if other_way else ""))
    if not dry_run:
        logger.info("%s: calibrating on %s first", reason, ", ".join(cfg.DATASETS.CALIBRATION))
        fits = Trainer.calibrate(cfg, model, iteration=weights_iteration)
        if not fits and verdict.calibrated:
            raise VerdictCalibrationError(f"{reason}, and it could not be fitted again (see the warning above)")
    return reason


def requested_target_fpr(opts):
    """The MODEL.DDL.VERDICT.TARGET_FPR given among command-line ``KEY VALUE`` opts, or None."""
    opts = list(opts or ())
    for key, value in zip(opts[::2], opts[1::2]):
        if key == "MODEL.DDL.VERDICT.TARGET_FPR":
            return float(value)
    return None


def check_evaluation_verdict(cfg, opts=()):
    """``prepare_verdict``'s checks on the MODEL.WEIGHTS file alone, without building the model
    (a tool runs it before launching its processes); VerdictCalibrationError as it would raise."""
    from types import SimpleNamespace

    from ..modeling.verdict import Verdict

    weights = cfg.MODEL.WEIGHTS
    if not weights.endswith((".pth", ".pt")) or not os.path.isfile(weights):
        return  # another format (a converted backbone, a URL): the full load checks it
    checkpoint = torch.load(weights, map_location="cpu", weights_only=False)
    state = checkpoint.get("model", {}) if isinstance(checkpoint, dict) else {}
    verdict = Verdict.from_config(cfg)
    verdict.load_state_dict({k[len("verdict."):]: v for k, v in state.items() if k.startswith("verdict.")},
                            strict=False)
    prepare_verdict(cfg, SimpleNamespace(verdict=verdict), checkpoint, weights, requested_target_fpr(opts),
                    dry_run=True)


def load_evaluation_model(cfg, opts=(), resume=False):
    """The model of ``cfg`` with MODEL.WEIGHTS (or, with ``resume``, the last checkpoint in
    OUTPUT_DIR) and a verdict fit for evaluation (``prepare_verdict``), as
    ``tools/train_net.py --eval-only`` and ``tools/robustness.py`` use it; ``opts``: the command
    line's overrides (a TARGET_FPR among them is applied or refused). CheckpointMismatchError when
    the checkpoint does not fit the model of ``cfg``."""
    model = Trainer.build_model(cfg)
    checkpointer = TrainedModelCheckpointer(model, save_dir=cfg.OUTPUT_DIR,
                                            backbone_name=cfg.MODEL.BACKBONE.NAME)
    checkpoint = checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
    weights = cfg.MODEL.WEIGHTS
    if resume and checkpointer.has_checkpoint():
        weights = checkpointer.get_checkpoint_file()
    prepare_verdict(cfg, model, checkpoint, weights, requested_target_fpr(opts))
    return model
