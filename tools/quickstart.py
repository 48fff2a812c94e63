#!/usr/bin/env python
"""The CPU quickstart (``make quickstart``): the whole pipeline on data it makes itself.

    python tools/quickstart.py [--out output/quickstart] [--ensemble]

Steps, each printing where it wrote:
  1. generate a synthetic DDL-format dataset (datasets/make_synthetic_ddl.py) at a trace
     difficulty (default "easy": traces a from-scratch CPU model can learn in minutes);
  2. train a small DDL-Mask2Former from scratch on the CPU (tools/train_net.py, a config from
     configs/quickstart/), evaluating on the synthetic val split a few times and at the end,
     exporting the final predictions in the challenge's submission format;
  3. score the export with tools/evaluate_predictions.py, and draw the learning curve and a
     contact sheet of val predictions;
  4. run the visualizer demo (tools/demo.py) on a few val images;
  5. with --ensemble: train a second model (another backbone) and fuse both exports with
     tools/ensemble.py (paper eq. 6); without it, print the ready command.
The terminal shows progress with an ETA, the loss and each evaluation; full logs go to
<out>/logs/. It ends with the metrics table and the paths of pictures, checkpoints and logs.
"""
import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

if importlib.util.find_spec("ddl_mask2former") is None:
    sys.exit("ddl_mask2former is not installed: run `make install` (or `pip install -e .`) first")

from ddl_mask2former.config import split_config_overrides
from ddl_mask2former.data.synthetic_varied import FORGERY_FAMILIES, POST_CHAINS, generator_choice_error

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_CONFIGS = {
    "main": ROOT / "configs" / "quickstart" / "ddl_mask2former_quickstart_swin.yaml",
    "second": ROOT / "configs" / "quickstart" / "ddl_mask2former_quickstart_R18.yaml",
}
# Two single-threaded gloo processes train fastest on 2 cores, and stay fast when other jobs
# share the machine (two threads in one process slow down ten-fold then: docs/PERFORMANCE.md).
TRAIN_PROCESSES = 2
VAL_DATASET = "ddl_i_val"  # registered at $DETECTRON2_DATASETS/DDL-I/val
CALIBRATION_DATASET = "ddl_i_train_calib"  # the held-out tenth of DDL-I/train


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "output" / "quickstart"),
                        help="folder for data, models, exports and pictures")
    parser.add_argument("--num-train", type=int, default=680,
                        help="synthetic training images (a tenth is held out to calibrate the verdict)")
    parser.add_argument("--num-val", type=int, default=120, help="synthetic validation images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--model-seed", type=int, default=None,
                        help="seed of the model's training (SEED; default: the config's, 0)")
    parser.add_argument("--difficulty", default="easy", choices=("easy", "medium", "hard"),
                        help="strength of the synthetic forgery traces (datasets/README.md)")
    # classic stays the default: at this budget the recipe does not learn the varied data
    # (docs/PERFORMANCE.md "Generalization").
    parser.add_argument("--generator", default="classic", choices=("classic", "varied", "mixed"),
                        help="synthetic generator (datasets/README.md): 'classic' (ten photographs, "
                             "ellipses), 'varied' (many sources, region shapes, forgery families and "
                             "post-processing chains) or 'mixed' (each image from one of the two)")
    parser.add_argument("--varied-share", type=float, default=None, metavar="P",
                        help="mixed generator: probability that an image comes from the varied "
                             "generator, else from the classic one (default 0.5)")
    parser.add_argument("--families", nargs="+", default=None, choices=FORGERY_FAMILIES, metavar="FAMILY",
                        help="forgery families of the varied generator (or the mixed one's varied "
                             "share) to train on (default all; tools/cross_generator.py holds one out)")
    parser.add_argument("--chains", nargs="+", default=None, choices=POST_CHAINS, metavar="CHAIN",
                        help="post-processing chains of the varied generator (or the mixed one's "
                             "varied share; default all)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="folder of the synthetic data (made there if missing or different; "
                             "default OUT/data), so several runs can share it")
    parser.add_argument("--image-size", type=int, nargs=2, default=(256, 768), metavar=("MIN", "MAX"),
                        help="range of synthetic image sides in pixels")
    parser.add_argument("--iters", type=int, default=None,
                        help="training iterations (default: the config's SOLVER.MAX_ITER)")
    parser.add_argument("--ensemble", action="store_true",
                        help="also train a second model and fuse both with tools/ensemble.py")
    parser.add_argument("--demo-images", type=int, default=6, help="val images for the demo")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides for training and the demo, as in train_net.py "
                             "(e.g. INPUT.DEGRADATION.ENABLED True)")
    # "--chains jpeg INPUT.X v": the overrides end the lists.
    options, overrides = split_config_overrides(argv)
    args = parser.parse_args(options)
    args.opts = list(args.opts) + overrides
    if len(args.opts) % 2:
        parser.error(f"config overrides come in KEY VALUE pairs; got {args.opts}")
    given = [f"--{name}" for name in ("families", "chains") if getattr(args, name)]
    error = generator_choice_error(args.generator, args.varied_share, given)
    if error:
        parser.error(error)
    if args.generator == "mixed" and args.varied_share is None:
        args.varied_share = 0.5
    return args


class Steps:
    """Runs the pipeline's commands, timing each and logging its full output to a file."""

    def __init__(self, out_dir, data_root):
        self.out_dir = out_dir
        self.start = time.monotonic()
        self.env = dict(os.environ, DETECTRON2_DATASETS=str(data_root), PYTHONUNBUFFERED="1")

    def banner(self, text):
        elapsed = time.monotonic() - self.start
        print(f"\n=== [{elapsed / 60:5.1f} min] {text}", flush=True)

    def run(self, name, cmd, show=lambda line: line):
        """Run ``cmd``; keep its whole output in <out>/logs/<name>.log and echo what ``show``
        makes of each line (None hides it)."""
        log_path = self.out_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        print("$ " + " ".join(str(c) for c in cmd), flush=True)
        t0 = time.monotonic()
        with open(log_path, "w") as log, subprocess.Popen(
            [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=self.env, cwd=ROOT,
        ) as proc:
            for line in proc.stdout:
                log.write(line)
                shown = show(line)
                if shown:
                    print("  " + shown.rstrip(), flush=True)
        if proc.returncode != 0:
            raise SystemExit(f"quickstart: step '{name}' failed (exit {proc.returncode}); "
                             f"its full output is in {log_path}")
        print(f"  ({time.monotonic() - t0:.0f} s; log: {log_path})", flush=True)
        return log_path


_EVENT_LINE = re.compile(r"eta: (?P<eta>\S+)\s+iter: (?P<iter>\d+)\s+total_loss: (?P<loss>\S+)")
_METRIC_NAMES = ("AUC", "F1", "IoU")


class TrainingProgress:
    """Condenses train_net.py's output for the terminal: one line per log period (iteration,
    loss, ETA) and one per evaluation (AUC, F1, IoU); errors pass through. The log keeps all."""

    def __init__(self, max_iter, eval_period):
        self.max_iter = max_iter
        self.eval_period = eval_period
        self.header = None
        self.evaluations = 0

    def __call__(self, line):
        event = _EVENT_LINE.search(line)
        if event:
            return (f"iter {int(event['iter']) + 1:>5}/{self.max_iter}   loss {float(event['loss']):7.3f}"
                    f"   eta {event['eta']}")
        if "copypaste:" in line:
            fields = line.split("copypaste:", 1)[1].strip().split(",")
            if "AUC" in fields:
                self.header = fields
            elif self.header and len(fields) == len(self.header):
                values = dict(zip(self.header, fields))
                metrics = "  ".join(f"{name} {float(values[name]):5.1f}" for name in _METRIC_NAMES)
                # detectron2 evaluates every EVAL_PERIOD iterations and after the last one.
                self.evaluations += 1
                iteration = min(self.evaluations * self.eval_period, self.max_iter) if self.eval_period else self.max_iter
                return f"val after iter {iteration:>5}:  {metrics}  (percent)"
            return None
        if "<- in use" in line:
            fields = line.split()
            return (f"verdict ({fields[0]}): FAKE above {float(fields[2]):.3f}; on the calibration images "
                    f"{fields[6]} % of real called fake, {fields[11]} % of fake called fake")
        if "Verdict NOT calibrated" in line:
            return line.rstrip()
        if "Traceback" in line or "Error" in line:
            return line.rstrip()
        return None


def data_dir(args, out_dir):
    """The folder that DETECTRON2_DATASETS points at (it holds DDL-I/)."""
    return Path(args.data).resolve() if args.data else out_dir / "data"


def synthetic_data_args(args, data_root):
    """The datasets/make_synthetic_ddl.py arguments that write the quickstart's data to ``data_root``."""
    generator = ["--generator", args.generator]
    if args.generator == "mixed":
        generator += ["--varied-share", args.varied_share]
    if args.families:
        generator += ["--families", *args.families]
    if args.chains:
        generator += ["--chains", *args.chains]
    return ["--out", data_root, "--num-train", args.num_train, "--num-val", args.num_val, "--seed", args.seed,
            "--min-size", args.image_size[0], "--max-size", args.image_size[1],
            "--difficulty", args.difficulty, *generator]


def generate_data(steps, args):
    data_root = data_dir(args, steps.out_dir) / "DDL-I"
    stamp = data_root / "quickstart_params.json"
    params = {"num_train": args.num_train, "num_val": args.num_val, "seed": args.seed,
              "image_size": list(args.image_size), "difficulty": args.difficulty,
              "generator": args.generator, "families": args.families, "chains": args.chains}
    if args.generator == "mixed":
        # Only here: the stamps of classic and varied data written before the mix stay valid.
        params["varied_share"] = args.varied_share
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        print(f"reusing the synthetic data in {data_root} (same generator, size, seed and difficulty)")
        return data_root
    steps.run("make_synthetic_ddl", [
        sys.executable, ROOT / "datasets" / "make_synthetic_ddl.py", *synthetic_data_args(args, data_root)],
        show=lambda line: line if line.startswith(("warning", "synthetic DDL data")) else None)
    stamp.write_text(json.dumps(params))
    return data_root


def config_value(config, key):
    """A SOLVER/TEST value of a quickstart config, read the way train_net.py reads it."""
    from ddl_mask2former.config import load_config

    node = load_config(str(config))
    for part in key.split("."):
        node = node[part]
    return node


def train_and_export(steps, args, config, model_dir):
    export_dir = model_dir / "export"
    opts = ["OUTPUT_DIR", model_dir, "TEST.EXPORT_DIR", export_dir, "DATASETS.TEST", f"('{VAL_DATASET}',)"]
    if args.model_seed is not None:
        opts += ["SEED", args.model_seed]
    opts += args.opts
    if args.iters is not None:
        # A few evaluation points along the way, whatever the length.
        max_iter, eval_period = args.iters, max(1, args.iters // 3)
        opts += ["SOLVER.MAX_ITER", max_iter, "TEST.EVAL_PERIOD", eval_period]
    else:
        max_iter, eval_period = config_value(config, "SOLVER.MAX_ITER"), config_value(config, "TEST.EVAL_PERIOD")
    steps.run(f"train_{model_dir.name}", [
        sys.executable, ROOT / "tools" / "train_net.py", "--config-file", config,
        "--num-gpus", TRAIN_PROCESSES, "--dist-url", "auto", *opts], show=TrainingProgress(max_iter, eval_period))
    return export_dir


def export_calibration_split(steps, args, config, model_dir):
    """The trained model's export of its calibration split (the ensemble calibrates its own
    verdict on the members' exports of it); returns the export folder."""
    export_dir = model_dir / "calib_export"
    steps.run(f"export_calibration_{model_dir.name}", [
        sys.executable, ROOT / "tools" / "train_net.py", "--config-file", config, "--eval-only",
        "--num-gpus", TRAIN_PROCESSES, "--dist-url", "auto", *args.opts,
        "OUTPUT_DIR", model_dir / "calib_eval", "TEST.EXPORT_DIR", export_dir,
        "DATASETS.TEST", f"('{CALIBRATION_DATASET}',)", "MODEL.WEIGHTS", model_dir / "model_final.pth"])
    return export_dir


def calibration_split_has_both_labels(data_root):
    """Whether the held-out tenth of DDL-I/train holds real and fake images (a tiny run's may not)."""
    from ddl_mask2former.data.ddl_dataset import calibration_key, in_calibration_part, load_ddl_split

    labels = {d["label"] for d in load_ddl_split(str(data_root / "train")) if in_calibration_part(calibration_key(d))}
    return labels == {0, 1}


def draw_pictures(model_dir, export_dir, val_dir, title):
    """Learning curve and contact sheet of a trained model; returns their paths."""
    from ddl_mask2former.report import plot_learning_curve, write_contact_sheet

    curve = plot_learning_curve(str(model_dir / "metrics.json"), str(model_dir / "learning_curve.png"), title)
    sheet = write_contact_sheet(str(export_dir), str(val_dir), str(model_dir / "val_contact_sheet.png"))
    print(f"  learning curve: {curve}\n  contact sheet:  {sheet}")
    return curve, sheet


def score(steps, export_dir, gt_dir, json_path):
    steps.run(f"score_{json_path.stem}", [
        sys.executable, ROOT / "tools" / "evaluate_predictions.py", "--pred", export_dir,
        "--gt", gt_dir, "--json", json_path, "--no-progress"])
    return json.loads(json_path.read_text())


def pick_demo_images(gt_dir, count):
    fakes = sorted((gt_dir / "fake").glob("*.png"))
    reals = sorted((gt_dir / "real").glob("*.png"))
    half = max(1, count // 2)
    return fakes[:count - half] + reals[:half]


def metrics_table(rows):
    header = (f"{'model':<28}{'AUC':>8}{'F1':>8}{'IoU':>8}{'score':>8}{'F1 px':>8}{'IoU px':>8}"
              f"{'real FA':>9}")
    lines = [header, "-" * len(header)]
    for name, m in rows:
        lines.append(f"{name:<28}" + "".join(
            f"{100 * m[k]:8.2f}" for k in ("auc", "f1", "iou", "score", "f1_pixel", "iou_pixel"))
            + f"{100 * m['real_false_alarm']:9.1f}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = Steps(out_dir, data_dir(args, out_dir))

    steps.banner("1/5 synthetic DDL-format data")
    data_root = generate_data(steps, args)
    val_dir = data_root / "val"

    steps.banner(f"2/5 training {QUICKSTART_CONFIGS['main'].name} on the CPU")
    main_dir = out_dir / "model_main"
    main_export = train_and_export(steps, args, QUICKSTART_CONFIGS["main"], main_dir)

    steps.banner("3/5 scoring the exported predictions (tools/evaluate_predictions.py) and drawing them")
    rows = [(QUICKSTART_CONFIGS["main"].stem.replace("ddl_mask2former_", ""),
             score(steps, main_export, val_dir, main_dir / "scores.json"))]
    curve, sheet = draw_pictures(main_dir, main_export, val_dir,
                                 f"{QUICKSTART_CONFIGS['main'].stem} on synthetic '{args.difficulty}' data")

    steps.banner("4/5 visualizer demo on val images (tools/demo.py)")
    demo_dir = out_dir / "demo"
    steps.run("demo", [
        sys.executable, ROOT / "tools" / "demo.py", "--config-file", QUICKSTART_CONFIGS["main"],
        "--input", *pick_demo_images(val_dir, args.demo_images), "--output", demo_dir,
        "--opts", *args.opts, "MODEL.WEIGHTS", main_dir / "model_final.pth"])

    steps.banner("5/5 ensemble (paper eq. 6)")
    second_dir = out_dir / "model_second"
    fused_dir = out_dir / "ensemble"
    ensemble_cmd = [
        sys.executable, ROOT / "tools" / "ensemble.py", "--inputs", main_export,
        second_dir / "export", "--det-weights", "1", "1", "--loc-weights", "1", "1",
        "--out", fused_dir, "--gt", val_dir, "--json", fused_dir / "scores.json", "--no-progress"]
    calibration_flags = ["--calibration-inputs", main_dir / "calib_export", second_dir / "calib_export",
                         "--calibration-split", data_root / "train"]
    if args.ensemble:
        train_and_export(steps, args, QUICKSTART_CONFIGS["second"], second_dir)
        if calibration_split_has_both_labels(data_root):
            # The ensemble calibrates its own verdict on both models' exports of the calibration split.
            for config, model_dir in ((QUICKSTART_CONFIGS["main"], main_dir),
                                      (QUICKSTART_CONFIGS["second"], second_dir)):
                export_calibration_split(steps, args, config, model_dir)
            ensemble_cmd += calibration_flags
        else:
            print("the calibration split lacks real or fake images: the ensemble's verdict stays uncalibrated")
        rows.append((QUICKSTART_CONFIGS["second"].stem.replace("ddl_mask2former_", ""),
                     score(steps, second_dir / "export", val_dir, second_dir / "scores.json")))
        steps.run("ensemble", ensemble_cmd)
        # tools/ensemble.py --gt writes {"metrics": {...}} (the scorer's keys).
        rows.append(("ensemble (1:1, 1:1)",
                     json.loads((fused_dir / "scores.json").read_text())["metrics"]))
    else:
        print("skipped (run `python tools/quickstart.py --ensemble` to train a second model);"
              " with two exports (and their exports of ddl_i_train_calib) the fusion is:\n  "
              + " ".join(str(c) for c in ensemble_cmd[1:] + calibration_flags))

    steps.banner("done")
    print(f"Synthetic val split ('{args.difficulty}' traces), percent "
          "(F1/IoU: per-image means; 'px': dataset-level; real FA: real images with > 1 % marked):")
    print(metrics_table(rows))
    print(f"\ndata:        {data_root}")
    print(f"checkpoint:  {main_dir / 'model_final.pth'} (TensorBoard events and metrics.json beside it)")
    print(f"submission:  {main_export} (prediction.txt, mask/, prob/)")
    print(f"demo:        {demo_dir} (overlays and predictions.jsonl)")
    print(f"pictures:    {curve} (learning curve)\n             {sheet} (val contact sheet)")
    print(f"logs:        {out_dir / 'logs'}")
    print(f"total time:  {(time.monotonic() - steps.start) / 60:.1f} min")


if __name__ == "__main__":
    main()
