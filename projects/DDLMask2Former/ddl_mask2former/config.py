"""Every config key DDL-Mask2Former adds to detectron2's defaults, each with a comment.

``add_ddl_mask2former_config(cfg)`` must run before ``cfg.merge_from_file``.
"""
from detectron2.config import CfgNode as CN


def add_ddl_mask2former_config(cfg):
    """Add all DDL-Mask2Former keys to a detectron2 config, in place."""
    _add_model_config(cfg)
    _add_data_config(cfg)
    _add_evaluation_config(cfg)
    _add_solver_config(cfg)


def _add_model_config(cfg):
    """Backbones, pixel decoder, transformer decoder, detection head, losses."""


def _add_data_config(cfg):
    """DDL-I datasets, mapper and augmentations."""


def _add_evaluation_config(cfg):
    """DDL evaluator, export of challenge submissions."""


def _add_solver_config(cfg):
    """Optimizer groups and schedule extras used by tools/train_net.py."""
    # detectron2 already has WEIGHT_DECAY, WEIGHT_DECAY_NORM, WEIGHT_DECAY_BIAS, BIAS_LR_FACTOR,
    # WARMUP_*, LR_SCHEDULER_NAME, CLIP_GRADIENTS.*, AMP.ENABLED and CHECKPOINT_PERIOD; those
    # are reused (their meaning is extended where noted), only the missing ones are added here.
    # LR_SCHEDULER_NAME accepts "WarmupPolyLR" besides detectron2's schedulers.
    # "ADAMW" (the paper's optimizer) or "SGD" (uses SOLVER.MOMENTUM / SOLVER.NESTEROV).
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # AdamW betas.
    cfg.SOLVER.ADAMW_BETAS = (0.9, 0.999)
    # Learning-rate factor for every parameter under model.backbone (0.1: pretrained backbone).
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Weight decay for embeddings, learned queries, position tables and relative-position bias tables.
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # Exponent of the poly decay used by LR_SCHEDULER_NAME "WarmupPolyLR": (1 - t/T) ** power.
    cfg.SOLVER.POLY_LR_POWER = 0.9
    # Floor of the poly decay as a fraction of BASE_LR (0 decays to zero at MAX_ITER).
    cfg.SOLVER.POLY_LR_CONSTANT_ENDING = 0.0
    # SOLVER.CLIP_GRADIENTS.CLIP_TYPE accepts "full_model" besides detectron2's per-parameter
    # "value" / "norm": one norm over all parameters together, capped at CLIP_VALUE.
    # Let DDP tolerate parameters without gradients (e.g. one branch disabled); slower when on.
    cfg.SOLVER.DDP_FIND_UNUSED_PARAMETERS = False
    # Iterations between log lines / metrics.json / TensorBoard writes.
    cfg.SOLVER.LOG_PERIOD = 20
