"""Learning-rate schedules: detectron2's, plus the poly decay with warm-up the paper uses."""
import math

from detectron2.solver import build_lr_scheduler as build_detectron2_lr_scheduler
from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler
from fvcore.common.param_scheduler import ParamScheduler

__all__ = ["PolyParamScheduler", "build_lr_scheduler"]


class PolyParamScheduler(ParamScheduler):
    """``max((1 - where) ** power, constant_ending)``, a multiplier of the base learning rate.

    ``where`` is the fraction of training done, in [0, 1].
    """

    def __init__(self, power=0.9, constant_ending=0.0):
        if power <= 0:
            raise ValueError(f"SOLVER.POLY_LR_POWER must be > 0, got {power}")
        if not 0.0 <= constant_ending < 1.0:
            raise ValueError(
                f"SOLVER.POLY_LR_CONSTANT_ENDING must be in [0, 1), got {constant_ending}"
            )
        self.power = power
        self.constant_ending = constant_ending

    def __call__(self, where):
        remaining = max(0.0, 1.0 - where)
        return max(math.pow(remaining, self.power), self.constant_ending)


def build_lr_scheduler(cfg, optimizer):
    """"WarmupPolyLR" from this project, every other name from detectron2."""
    solver = cfg.SOLVER
    if solver.LR_SCHEDULER_NAME != "WarmupPolyLR":
        return build_detectron2_lr_scheduler(cfg, optimizer)
    if solver.MAX_ITER <= 0:
        raise ValueError(f"SOLVER.MAX_ITER must be > 0 for WarmupPolyLR, got {solver.MAX_ITER}")
    poly = PolyParamScheduler(solver.POLY_LR_POWER, solver.POLY_LR_CONSTANT_ENDING)
    warmup_length = min(solver.WARMUP_ITERS / solver.MAX_ITER, 1.0)
    multiplier = WarmupParamScheduler(
        poly,
        solver.WARMUP_FACTOR,
        warmup_length,
        solver.WARMUP_METHOD,
        solver.RESCALE_INTERVAL,
    )
    return LRMultiplier(optimizer, multiplier=multiplier, max_iter=solver.MAX_ITER)
