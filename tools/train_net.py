#!/usr/bin/env python
r"""Train or evaluate DDL-Mask2Former with detectron2.

Examples:
    # train on one GPU (CPU: add MODEL.DEVICE cpu); after an interruption add --resume
    python tools/train_net.py --num-gpus 1 \
        --config-file configs/ddl-i/ddl_mask2former_swin_tiny.yaml
    # two CPU processes over gloo (the quickstart configs set MODEL.DEVICE cpu)
    python tools/train_net.py --num-gpus 2 \
        --config-file configs/quickstart/ddl_mask2former_quickstart_swin.yaml
    # evaluate a checkpoint and export a challenge submission
    python tools/train_net.py --config-file cfg.yaml --eval-only \
        MODEL.WEIGHTS output/model_final.pth TEST.EXPORT_DIR output/export

Trailing ``KEY VALUE`` pairs override the config. Relative paths (config file, OUTPUT_DIR,
MODEL.WEIGHTS) are relative to the current directory; the script runs from any directory.
"""
import importlib.util
import logging
import os
import sys

if importlib.util.find_spec("ddl_mask2former") is None:
    sys.exit("ddl_mask2former is not installed: run `make install` (or `pip install -e .`) first")
import ddl_mask2former  # noqa: F401  first: registers everything, without detectron2's jit warning

import torch
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ddl_mask2former.config import load_config
from ddl_mask2former.engine import (CheckpointMismatchError, Trainer, check_evaluation_verdict, launch,
                                    load_evaluation_model)
from ddl_mask2former.evaluation.calibration import VerdictCalibrationError


def setup(args):
    """Build the frozen config from the DDL defaults, the config file and the overrides (the
    file's existence is checked once, by ``invoke_main`` before the processes start)."""
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="ddl_mask2former")
    return cfg


def _share_cpu_threads(cfg):
    """Give each CPU process an equal share of the cores instead of all of them each."""
    if torch.device(cfg.MODEL.DEVICE).type != "cpu":
        return
    local_processes = comm.get_local_size()
    if local_processes > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))


def main(args):
    cfg = setup(args)
    _share_cpu_threads(cfg)
    logger = logging.getLogger("ddl_mask2former")

    if args.eval_only:
        # The verdict is refitted when the checkpoint has none, one of other weights, or another
        # TARGET_FPR than the command line gives (engine.prepare_verdict).
        try:
            model = load_evaluation_model(cfg, args.opts, resume=args.resume)
        except (CheckpointMismatchError, VerdictCalibrationError) as exc:
            raise SystemExit(f"train_net.py --eval-only: {exc}") from None
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
            logger.info("Evaluation outputs are under %s", os.path.abspath(cfg.OUTPUT_DIR))
        return results

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if args.resume and trainer.start_iter > 0:
        logger.info("Resumed at iteration %d of %d", trainer.start_iter, trainer.max_iter)
    results = trainer.train()
    if comm.is_main_process():
        logger.info(
            "Training finished; checkpoints, metrics.json and TensorBoard events are in %s",
            os.path.abspath(cfg.OUTPUT_DIR),
        )
    return results


def invoke_main():
    epilog = __doc__.split("\n\n", 1)[1] + """
Several machines (same command on each, --machine-rank 0..N-1):
    python tools/train_net.py --num-machines 2 --machine-rank 0 --dist-url tcp://HOST:PORT ...
"""
    parser = default_argument_parser(epilog=epilog)
    args = parser.parse_args()
    # Checked before launch so a bad path fails once, not in every spawned process.
    if not args.config_file:
        parser.error("--config-file is required")
    if not os.path.isfile(args.config_file):
        parser.error(f"config file not found: {args.config_file}")
    print("Command Line Args:", args)
    if args.eval_only and not args.resume:
        # Checked before launch, so that a verdict that cannot be calibrated stops once, saying why.
        try:
            check_evaluation_verdict(load_config(args.config_file, args.opts), args.opts)
        except VerdictCalibrationError as exc:
            sys.exit(f"train_net.py --eval-only: {exc}")
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
