"""Start one process per device (or per CPU share) and end each one cleanly.

detectron2's ``launch`` spawns the workers and joins the process group but never leaves it.
With gloo, a worker that exits with the group still alive can abort at interpreter shutdown
("terminate called without an active exception", SIGABRT): gloo's threads still hold
tensors while Python is being torn down. The run has finished by then, yet the job exits
with an error. Here each worker waits for the others and destroys the group before it
returns.
"""
import gc

import torch.distributed as dist
from detectron2.engine import launch as detectron2_launch
from detectron2.utils import comm

__all__ = ["launch", "leave_process_group"]


def leave_process_group():
    """Wait for every process, then destroy the process groups (no-op when none).

    ``destroy_process_group`` only drops torch's own references. detectron2's ``comm`` keeps
    the per-machine group it made in ``launch`` (and caches of groups), so that group's gloo
    object, with its threads, would still live until interpreter shutdown: the abort above,
    seen now and then in CI. Those references are dropped and collected here too.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    comm.synchronize()
    dist.destroy_process_group()
    comm._LOCAL_PROCESS_GROUP = None
    for cached in ("_get_global_gloo_group", "create_local_process_group"):
        cache_clear = getattr(getattr(comm, cached, None), "cache_clear", None)
        if cache_clear is not None:
            cache_clear()
    gc.collect()


def _run_then_leave(main_func, *args):
    result = main_func(*args)
    leave_process_group()
    return result


def launch(main_func, num_processes_per_machine, num_machines=1, machine_rank=0,
           dist_url=None, args=(), **kwargs):
    """``detectron2.engine.launch`` whose workers leave the process group when ``main_func``
    returns. An exception skips the goodbye: the other ranks may never reach it."""
    detectron2_launch(_run_then_leave, num_processes_per_machine, num_machines=num_machines,
                      machine_rank=machine_rank, dist_url=dist_url,
                      args=(main_func, *args), **kwargs)
