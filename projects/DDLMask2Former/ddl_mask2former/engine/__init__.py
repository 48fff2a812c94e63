"""Training plumbing: the detectron2 Trainer and its train loop, what it does to the model first
(``compilation``: torch.compile, channels-last), optimizer groups, schedules and hooks. (Overlay
pictures live in ``ddl_mask2former.visualization``.)"""
from .checkpoint import CheckpointMismatchError, TrainedModelCheckpointer
from .hooks import NonFiniteLossError, NonFiniteLossHook
from .launch import launch, leave_process_group
from .lr_scheduler import PolyParamScheduler, build_lr_scheduler
from .optimizer import build_optimizer, build_param_groups, with_gradient_clipping
from .train_loop import DDLTrainLoop, PendingHostLosses, amp_dtype_from_cfg, losses_to_host
from .trainer import (AtomicDetectionCheckpointer, Trainer, build_ddp_model, check_evaluation_verdict,
                      checkpoint_iteration,
                      load_evaluation_model, prepare_verdict, requested_target_fpr)

__all__ = [
    "AtomicDetectionCheckpointer",
    "CheckpointMismatchError",
    "DDLTrainLoop",
    "NonFiniteLossError",
    "NonFiniteLossHook",
    "PendingHostLosses",
    "PolyParamScheduler",
    "amp_dtype_from_cfg",
    "losses_to_host",
    "Trainer",
    "TrainedModelCheckpointer",
    "build_ddp_model",
    "check_evaluation_verdict",
    "checkpoint_iteration",
    "load_evaluation_model",
    "prepare_verdict",
    "requested_target_fpr",
    "build_lr_scheduler",
    "build_optimizer",
    "build_param_groups",
    "launch",
    "leave_process_group",
    "with_gradient_clipping",
]
