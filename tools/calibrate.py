#!/usr/bin/env python
"""Calibrate the verdict of a trained checkpoint and write a calibrated copy.

    python tools/calibrate.py --config-file CFG --output model_calibrated.pth \
        MODEL.WEIGHTS model_final.pth [DATASETS.CALIBRATION "('ddl_i_train_calib',)"] \
        [MODEL.DDL.VERDICT.TARGET_FPR 0.05]

Training with DATASETS.CALIBRATION already stores a calibration in ``model_final.pth``; this is
for a checkpoint trained without it, or to calibrate again on other data or at another
false-positive rate. It runs the model over DATASETS.CALIBRATION, fits every verdict rule
(docs/EVALUATION.md "Verdict") and saves the weights with the fitted buffers to ``--output``.
Trailing ``KEY VALUE`` pairs override the config, as in train_net.py.
"""
import argparse
import importlib.util
import os
import sys

if importlib.util.find_spec("ddl_mask2former") is None:
    sys.exit("ddl_mask2former is not installed: run `make install` (or `pip install -e .`) first")
import ddl_mask2former  # noqa: F401  (registers datasets and the model)

import torch
from ddl_mask2former.config import load_config
from ddl_mask2former.engine import CheckpointMismatchError, Trainer, TrainedModelCheckpointer, checkpoint_iteration


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", required=True, metavar="FILE", help="calibrated checkpoint to write")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_config(args.config_file, args.opts)
    except FileNotFoundError as exc:
        raise SystemExit(f"calibrate.py: {exc}") from None
    if not cfg.MODEL.WEIGHTS or not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise SystemExit(f"calibrate.py: MODEL.WEIGHTS must name a checkpoint file, got {cfg.MODEL.WEIGHTS!r}")
    if not cfg.DATASETS.CALIBRATION:
        raise SystemExit("calibrate.py: DATASETS.CALIBRATION is empty; name the datasets to calibrate on, "
                         "e.g. DATASETS.CALIBRATION \"('ddl_i_train_calib',)\"")
    model = Trainer.build_model(cfg)
    try:
        checkpoint = TrainedModelCheckpointer(model, backbone_name=cfg.MODEL.BACKBONE.NAME).load(cfg.MODEL.WEIGHTS)
    except CheckpointMismatchError as exc:
        raise SystemExit(f"calibrate.py: {exc}") from None
    iteration = checkpoint_iteration(checkpoint)
    fits = Trainer.calibrate(cfg, model, iteration=iteration)
    if not fits:
        raise SystemExit(f"calibrate.py: nothing calibrated (see the warning above); {args.output} not written")
    output = os.path.abspath(args.output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    # The weights' iteration goes along, so that evaluation can match the fit to its weights.
    torch.save({"model": model.state_dict(), **({} if iteration is None else {"iteration": iteration})}, output)
    verdict = model.verdict.describe()
    print(f"rule {verdict['rule']}: FAKE when fake_prob > {verdict['threshold']:.4f} "
          f"(at most {100 * verdict['target_fpr']:.1f} % of the calibration reals)")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
