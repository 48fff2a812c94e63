#!/usr/bin/env python
r"""Generalization protocol: train without a forgery family (or post-processing chain), evaluate on it.

    python tools/cross_generator.py --out runs/xgen --recipe varied \
        [--folds family:copy_move+chain:double_jpeg ...] [--seeds 0 1 2] \
        [--stages data train evaluate report] [--generator varied|classic|mixed] \
        [--varied-share P] [KEY VALUE ...]

A fold names what training never sees: ``family:F``, ``chain:C`` or both joined by ``+``
(default: every family of the varied generator in turn, then every chain). For each fold:

* **data**: the training data of the quickstart's size made by the varied generator without
  the held-out family and chain (OUT/data/<fold>/, with its in-domain val split), and one
  evaluation set per held-out axis: ``held_out_family`` (that family only, the training chains)
  and ``held_out_chain`` (the training families, that chain only), each 120 images, half real.
  A recipe with ``--generator classic`` trains on the classic generator's data instead
  (OUT/data/classic/), the same for every fold; the held-out sets are the same as any recipe's.
  One with ``--generator mixed`` trains on a mix (OUT/data/mixed-<P>/<fold>/): each image from
  the varied generator, without the held-out family and chain, with probability
  ``--varied-share`` P, else from the classic one (whose ellipse forgeries of its own types have
  no post-processing chain, as in a classic recipe).
* **train**: ``tools/quickstart.py`` per seed (``--model-seed``), trailing KEY VALUE overrides
  passed on: OUT/<recipe>/<fold>/seed<S>/.
* **evaluate**: ``tools/robustness.py`` on the in-domain val split, clean and at JPEG 70 and
  resize 0.5, and on each held-out set as it is: OUT/<recipe>/<fold>/seed<S>/eval/<set>/.
* **report**: every recipe found under OUT, the mean and the worst seed of each figure, per fold
  and over all folds: OUT/report.md and OUT/report.json (docs/PERFORMANCE.md "Generalization").

Stages skip what exists already (a trained model, a robustness.json), so a run can be resumed
or extended with more seeds, folds or recipes; delete a folder to redo it.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if importlib.util.find_spec("ddl_mask2former") is None:
    sys.exit("ddl_mask2former is not installed: run `make install` (or `pip install -e .`) first")

from ddl_mask2former.config import split_config_overrides
from ddl_mask2former.data.synthetic_varied import FORGERY_FAMILIES, POST_CHAINS, generator_choice_error

ROOT = Path(__file__).resolve().parents[1]
TOOL = "cross_generator.py"
STAGES = ("data", "train", "evaluate", "report")
CONFIG = ROOT / "configs" / "quickstart" / "ddl_mask2former_quickstart_swin.yaml"
EVAL_IMAGES = 120
# Seed of the evaluation sets' images: apart from any training data's (seed 0 by default).
EVAL_DATA_SEED = 1000
IN_DOMAIN = "in_domain"
HELD_OUT_SETS = ("held_out_family", "held_out_chain")
ROBUSTNESS_LEVELS = ("jpeg:70", "resize:0.5")


def parse_fold(text):
    """{"family": F or None, "chain": C or None} of a fold name; ValueError naming what is wrong."""
    fold = {"family": None, "chain": None}
    for part in text.split("+"):
        axis, _, name = part.partition(":")
        known = {"family": FORGERY_FAMILIES, "chain": POST_CHAINS}.get(axis)
        if known is None or name not in known:
            raise ValueError(f"fold {text!r}: expected family:F and/or chain:C joined by '+', with F in "
                             f"{', '.join(FORGERY_FAMILIES)} and C in {', '.join(POST_CHAINS)}")
        if fold[axis] is not None:
            raise ValueError(f"fold {text!r} names two {axis}s")
        fold[axis] = name
    return fold


def fold_name(fold):
    return "+".join(f"{axis}-{fold[axis]}" for axis in ("family", "chain") if fold[axis])


def training_variety(fold):
    """--families/--chains arguments of the fold's training data (all but the held-out ones)."""
    args = []
    if fold["family"]:
        args += ["--families", *[f for f in FORGERY_FAMILIES if f != fold["family"]]]
    if fold["chain"]:
        args += ["--chains", *[c for c in POST_CHAINS if c != fold["chain"]]]
    return args


def held_out_sets(fold):
    """{set name: make_synthetic_ddl.py variety arguments} of a fold's evaluation sets."""
    sets = {}
    train_chains = [c for c in POST_CHAINS if c != fold["chain"]]
    train_families = [f for f in FORGERY_FAMILIES if f != fold["family"]]
    if fold["family"]:
        sets["held_out_family"] = ["--families", fold["family"], "--chains", *train_chains]
    if fold["chain"]:
        sets["held_out_chain"] = ["--families", *train_families, "--chains", fold["chain"]]
    return sets


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--out", required=True, help="root of data, models, evaluations and report")
    parser.add_argument("--recipe", default="varied", help="name of the recipe (a folder under OUT)")
    parser.add_argument("--generator", default="varied", choices=("varied", "classic", "mixed"),
                        help="generator of the recipe's training data")
    parser.add_argument("--varied-share", type=float, default=None, metavar="P",
                        help="mixed generator: probability that a training image comes from the "
                             "varied generator, else from the classic one (default 0.5)")
    parser.add_argument("--folds", nargs="+", default=None, metavar="FOLD",
                        help="held-out family/chain per fold (default: each family, then each chain)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="model seeds")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--difficulty", default="easy", choices=("easy", "medium", "hard"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides of the recipe, for training and evaluation")
    # "--chains jpeg INPUT.X v": the overrides end the lists.
    options, overrides = split_config_overrides(argv)
    args = parser.parse_args(options)
    args.opts = list(args.opts) + overrides
    if len(args.opts) % 2:
        parser.error(f"config overrides come in KEY VALUE pairs; got {args.opts}")
    if not args.recipe or "/" in args.recipe or args.recipe in ("data", "report"):
        parser.error(f"--recipe {args.recipe!r}: a plain folder name other than data/report")
    error = generator_choice_error(args.generator, args.varied_share)
    if error:
        parser.error(error)
    if args.generator == "mixed" and args.varied_share is None:
        args.varied_share = 0.5
    texts = args.folds or ([f"family:{f}" for f in FORGERY_FAMILIES] + [f"chain:{c}" for c in POST_CHAINS])
    try:
        args.fold_list = [parse_fold(text) for text in texts]
    except ValueError as exc:
        parser.error(str(exc))
    return args


def run(cmd, log_path, env=None, echo=False):
    """Run ``cmd`` with its output in ``log_path``; SystemExit naming the log when it fails."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
        for line in proc.stdout:
            log.write(line)
            if echo:
                print("  " + line.rstrip(), flush=True)
        proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"{TOOL}: {cmd[1]} failed (exit {proc.returncode}); its output is in {log_path}")


def data_root(out, args, fold):
    """DETECTRON2_DATASETS of a recipe's training data for ``fold``."""
    if args.generator == "classic":
        return out / "data" / "classic"
    if args.generator == "mixed":
        return out / "data" / f"mixed-{args.varied_share}" / fold_name(fold)
    return out / "data" / fold_name(fold)


def stage_data(out, args):
    for fold in args.fold_list:
        name = fold_name(fold)
        for set_name, variety in held_out_sets(fold).items():
            folder = out / "data" / name / "eval" / set_name
            if (folder / "val").is_dir():
                continue
            run([sys.executable, ROOT / "datasets" / "make_synthetic_ddl.py", "--out", folder,
                 "--num-train", 0, "--num-val", EVAL_IMAGES, "--seed", EVAL_DATA_SEED,
                 "--difficulty", args.difficulty, *variety], out / "logs" / f"data_{name}_{set_name}.log")
            print(f"  wrote {folder / 'val'}")
    # Training data: quickstart.py makes it on first use (train stage), in the shared folder.


def model_dir(out, args, fold, seed):
    """Where a model's evaluations go (and, but for classic recipes, the model itself)."""
    return out / args.recipe / fold_name(fold) / f"seed{seed}"


def trained_dir(out, args, fold, seed):
    """The quickstart output of the model of ``fold`` and ``seed``: a classic recipe never sees
    any family of the varied generator, so one model per seed serves every fold."""
    if args.generator == "classic":
        return out / args.recipe / "classic-data" / f"seed{seed}"
    return model_dir(out, args, fold, seed)


def stage_train(out, args):
    jobs = {trained_dir(out, args, fold, seed): (fold, seed) for fold in args.fold_list for seed in args.seeds}
    start = time.monotonic()
    for number, (target, (fold, seed)) in enumerate(jobs.items(), 1):
        if (target / "model_main" / "model_final.pth").is_file():
            print(f"[{number}/{len(jobs)}] {target}: trained already")
            continue
        variety = [] if args.generator == "classic" else training_variety(fold)
        if args.generator == "mixed":
            variety += ["--varied-share", args.varied_share]
        # The lists first: an option after them ends them, and the overrides come last.
        cmd = [sys.executable, ROOT / "tools" / "quickstart.py", *variety, "--out", target,
               "--model-seed", seed, "--data", data_root(out, args, fold), "--generator", args.generator,
               "--difficulty", args.difficulty, "--demo-images", 2, *args.opts]
        t0 = time.monotonic()
        run(cmd, out / "logs" / f"train_{args.recipe}_{fold_name(fold)}_seed{seed}.log")
        done = time.monotonic() - start
        eta = (time.monotonic() - t0) * (len(jobs) - number)
        print(f"[{number}/{len(jobs)}] trained {target} in {(time.monotonic() - t0) / 60:.1f} min "
              f"(elapsed {done / 60:.1f} min, ETA {eta / 60:.0f} min)", flush=True)


def evaluation_sets(out, args, fold):
    """{set name: (split folder, robustness.py level arguments)} a model of ``fold`` is scored on."""
    sets = {IN_DOMAIN: (data_root(out, args, fold) / "DDL-I" / "val", ["--levels", *ROBUSTNESS_LEVELS])}
    for set_name in held_out_sets(fold):
        sets[set_name] = (out / "data" / fold_name(fold) / "eval" / set_name / "val", ["--clean-only"])
    return sets


def stage_evaluate(out, args):
    jobs = [(fold, seed, set_name, spec) for fold in args.fold_list for seed in args.seeds
            for set_name, spec in evaluation_sets(out, args, fold).items()]
    for number, (fold, seed, set_name, (split, levels)) in enumerate(jobs, 1):
        result = model_dir(out, args, fold, seed) / "eval" / set_name
        if (result / "robustness.json").is_file():
            continue
        weights = trained_dir(out, args, fold, seed) / "model_main" / "model_final.pth"
        if not weights.is_file():
            raise SystemExit(f"{TOOL}: no model at {weights}: run the train stage first")
        if not split.is_dir():
            raise SystemExit(f"{TOOL}: no evaluation set at {split}: run the data stage first")
        run([sys.executable, ROOT / "tools" / "robustness.py", "--config-file", CONFIG, "--split", split,
             "--output", result, *levels, "--num-gpus", 2, *args.opts, "MODEL.WEIGHTS", weights],
            out / "logs" / f"eval_{args.recipe}_{fold_name(fold)}_seed{seed}_{set_name}.log")
        summary = json.loads((result / "robustness.json").read_text())["clean"]
        print(f"[{number}/{len(jobs)}] {args.recipe} {fold_name(fold)} seed {seed} {set_name}: "
              f"AUC {100 * summary['auc']:.1f}  IoU {100 * summary['iou']:.1f}  "
              f"real marked {100 * summary['real_false_alarm']:.1f} %", flush=True)


# ---------------------------------------------------------------------------------------------
# report

# (column, set, perturbation kind, level, metric, better): one figure of the report per row.
FIGURES = (
    ("in-domain AUC", IN_DOMAIN, None, None, "auc", max),
    ("in-domain IoU", IN_DOMAIN, None, None, "iou", max),
    ("in-domain real marked", IN_DOMAIN, None, None, "real_false_alarm", min),
    ("held-out family AUC", "held_out_family", None, None, "auc", max),
    ("held-out family IoU", "held_out_family", None, None, "iou", max),
    ("held-out family real marked", "held_out_family", None, None, "real_false_alarm", min),
    ("held-out chain AUC", "held_out_chain", None, None, "auc", max),
    ("held-out chain IoU", "held_out_chain", None, None, "iou", max),
    ("JPEG 70 AUC kept", IN_DOMAIN, "jpeg", "70", "auc", max),
    ("JPEG 70 IoU kept", IN_DOMAIN, "jpeg", "70", "iou", max),
    ("resize 0.5 AUC kept", IN_DOMAIN, "resize", "0.5", "auc", max),
    ("resize 0.5 IoU kept", IN_DOMAIN, "resize", "0.5", "iou", max),
)


def figure_value(evaluations, set_name, kind, level, metric):
    """One figure of one model, or None where it was not evaluated; "kept" figures are the
    perturbed value as a share of the clean one."""
    result = evaluations.get(set_name)
    if result is None:
        return None
    clean = result["clean"].get(metric)
    if kind is None:
        return clean
    perturbed = result.get(kind, {}).get(level, {}).get(metric)
    if perturbed is None or not clean:
        return None
    return perturbed / clean


def collect(out):
    """{recipe: {fold: {seed: {set: robustness.json}}}} of every evaluation under ``out``."""
    found = {}
    for path in sorted(out.glob("*/*/seed*/eval/*/robustness.json")):
        set_name, seed, fold, recipe = path.parts[-2], path.parts[-4], path.parts[-5], path.parts[-6]
        found.setdefault(recipe, {}).setdefault(fold, {}).setdefault(int(seed[4:]), {})[set_name] = (
            json.loads(path.read_text()))
    return found


def summarize(found):
    """{recipe: {"folds": {fold: {column: {mean, worst, seeds}}}, "all": {...}}}: over seeds per
    fold; "all" takes, per seed, the mean over folds, then the mean and worst over seeds."""
    summary = {}
    for recipe, folds in found.items():
        per_fold, per_seed_all = {}, {}
        for fold, seeds in folds.items():
            per_fold[fold] = {}
            for column, set_name, kind, level, metric, better in FIGURES:
                values = {seed: figure_value(evals, set_name, kind, level, metric) for seed, evals in seeds.items()}
                values = {seed: v for seed, v in values.items() if v is not None}
                if not values:
                    continue
                per_fold[fold][column] = _stats(values, better)
                for seed, value in values.items():
                    per_seed_all.setdefault(column, {}).setdefault(seed, []).append(value)
        overall = {column: _stats({seed: float(sum(v) / len(v)) for seed, v in seeds.items()},
                                  dict((f[0], f[5]) for f in FIGURES)[column])
                   for column, seeds in per_seed_all.items()}
        summary[recipe] = {"folds": per_fold, "all": overall}
    return summary


def _stats(values, better):
    worst = min if better is max else max
    return {"mean": float(sum(values.values()) / len(values)), "worst": float(worst(values.values())),
            "seeds": {str(seed): float(v) for seed, v in sorted(values.items())}}


def report_markdown(summary):
    columns = [f[0] for f in FIGURES]
    lines = ["Percent, mean (worst seed) over the seeds; \"all folds\" averages each seed over its folds "
             "first. \"kept\": the perturbed value as a share of the clean one. \"real marked\": real "
             "images with more than 1 % of their pixels marked.", ""]
    for scope in ["all"] + sorted({fold for s in summary.values() for fold in s["folds"]}):
        lines += [f"### {'all folds' if scope == 'all' else scope}", ""]
        lines.append("| recipe | seeds | " + " | ".join(columns) + " |")
        lines.append("|---|---|" + "---|" * len(columns))
        for recipe, data in sorted(summary.items()):
            row = data["all"] if scope == "all" else data["folds"].get(scope)
            if not row:
                continue
            seeds = max(len(v["seeds"]) for v in row.values())
            cells = [f"{100 * row[c]['mean']:.1f} ({100 * row[c]['worst']:.1f})" if c in row else "n/a"
                     for c in columns]
            lines.append(f"| {recipe} | {seeds} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def stage_report(out):
    summary = summarize(collect(out))
    if not summary:
        raise SystemExit(f"{TOOL}: no evaluations under {out} (run the evaluate stage first)")
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    markdown = report_markdown(summary)
    (out / "report.md").write_text(markdown + "\n")
    print(markdown)
    print(f"wrote {out / 'report.md'} and {out / 'report.json'}")


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stage in STAGES:
        if stage not in args.stages:
            continue
        print(f"=== {stage}", flush=True)
        if stage == "data":
            stage_data(out, args)
        elif stage == "train":
            stage_train(out, args)
        elif stage == "evaluate":
            stage_evaluate(out, args)
        else:
            stage_report(out)


if __name__ == "__main__":
    main()
