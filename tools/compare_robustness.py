#!/usr/bin/env python
"""Compare the robustness of training recipes, each over several seeds.

    python tools/compare_robustness.py --recipe "plain" RUN_A RUN_B RUN_C \
        --recipe "INPUT.DEGRADATION" RUN_D RUN_E RUN_F --output OUT

Each RUN is a ``tools/robustness.py`` output folder (or its ``robustness.json``), one per seed.
Every run must hold the same conditions (clean and the same perturbation levels). For every
condition and recipe it prints the mean and the worst seed of AUC, F1 and IoU (worst = lowest)
and of the real false alarms (worst = highest), and the share of the clean value each seed
keeps under the perturbation (its perturbed value / its own clean value; mean and worst), as a
Markdown table. Writes ``OUT/robustness_comparison.json`` and ``OUT/robustness_comparison.png``
(one panel per metric: the mean of each recipe per condition, the bar spanning its seeds).
"""
import argparse
import json
import os
import sys
from collections import OrderedDict

import numpy as np

TOOL = "compare_robustness.py"
RESULT_FILE = "robustness.json"
CLEAN = "clean"
# metric key -> (label, whether higher is better)
METRICS = OrderedDict(auc=("AUC", True), f1=("F1", True), iou=("IoU", True),
                      real_false_alarm=("real >1% marked", False))
# metrics whose kept share of the clean value is reported
KEPT = ("auc", "iou")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", nargs="+", action="append", required=True,
                        metavar=("NAME", "RUN"),
                        help="a recipe's name and its robustness runs (one per seed)")
    parser.add_argument("--output", required=True, help="folder for the JSON and the PNG")
    args = parser.parse_args(argv)
    for recipe in args.recipe:
        if len(recipe) < 2:
            parser.error(f"--recipe {recipe[0]!r} names no run")
    names = [recipe[0] for recipe in args.recipe]
    if len(set(names)) != len(names):
        parser.error(f"recipe names must differ, got {names}")
    return args


def read_run(path):
    """A robustness.json as {condition: metrics}, condition "clean" or "kind level"."""
    if os.path.isdir(path):
        path = os.path.join(path, RESULT_FILE)
    try:
        with open(path) as handle:
            results = json.load(handle)
    except FileNotFoundError:
        raise SystemExit(f"{TOOL}: {path}: not found (a tools/robustness.py output folder or its "
                         f"{RESULT_FILE})")
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{TOOL}: {path}: not valid JSON ({exc})")
    if not isinstance(results, dict) or CLEAN not in results:
        raise SystemExit(f"{TOOL}: {path}: no '{CLEAN}' entry; not a robustness.json")
    conditions = OrderedDict([(CLEAN, results[CLEAN])])
    for kind, levels in results.items():
        if kind != CLEAN:
            for level, metrics in levels.items():
                conditions[f"{kind} {level}"] = metrics
    for condition, metrics in conditions.items():
        missing = [key for key in METRICS if key not in metrics]
        if missing:
            raise SystemExit(f"{TOOL}: {path}: condition '{condition}' lacks {missing}")
    return path, conditions


def summarize(recipes):
    """{recipe: {condition: {metric: {"mean", "worst", "seeds", ["kept_mean", "kept_worst"]}}}}."""
    reference_path, reference = recipes[0][1][0]
    summary = OrderedDict()
    for name, runs in recipes:
        for path, conditions in runs:
            if list(conditions) != list(reference):
                raise SystemExit(f"{TOOL}: {path} holds conditions {list(conditions)} but "
                                 f"{reference_path} holds {list(reference)}; compare like with like")
        per_condition = OrderedDict()
        for condition in reference:
            entry = OrderedDict()
            for key, (_label, higher_is_better) in METRICS.items():
                values = [runs_conditions[condition][key] for _path, runs_conditions in runs]
                if any(value is None for value in values):
                    continue
                values = np.asarray(values, dtype=np.float64)
                stats = {"mean": float(values.mean()),
                         "worst": float(values.min() if higher_is_better else values.max()),
                         "seeds": values.tolist()}
                if key in KEPT:
                    clean = np.asarray([c[CLEAN][key] for _p, c in runs], dtype=np.float64)
                    kept = values / np.where(clean > 0, clean, np.nan)
                    # a clean value of 0 keeps nothing measurable: None (null in the JSON)
                    stats["kept_mean"] = None if np.isnan(kept).any() else float(np.mean(kept))
                    stats["kept_worst"] = None if np.isnan(kept).any() else float(np.min(kept))
                entry[key] = stats
            per_condition[condition] = entry
        summary[name] = per_condition
    return summary


def format_table(summary):
    """Markdown: a row per condition and recipe, percent, mean (worst)."""
    header = (["condition", "recipe"] + [label for label, _ in METRICS.values()]
              + [f"{METRICS[key][0]} kept" for key in KEPT])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    conditions = list(next(iter(summary.values())))
    for condition in conditions:
        for name, per_condition in summary.items():
            entry = per_condition[condition]

            def cell(key, mean="mean", worst="worst"):
                if key not in entry or entry[key][mean] is None:
                    return "n/a"
                return f"{100 * entry[key][mean]:.1f} ({100 * entry[key][worst]:.1f})"

            cells = [cell(key) for key in METRICS]
            cells += ["" if condition == CLEAN else cell(key, "kept_mean", "kept_worst")
                      for key in KEPT]
            lines.append(f"| {condition} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary, out_png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = list(next(iter(summary.values())))
    figure, axes = plt.subplots(1, len(METRICS), figsize=(3.9 * len(METRICS), 4.2), squeeze=False)
    offsets = np.linspace(-0.15, 0.15, len(summary)) if len(summary) > 1 else [0.0]
    xs = np.arange(len(conditions))
    for axis, (key, (label, _higher)) in zip(axes[0], METRICS.items()):
        for offset, (name, per_condition) in zip(offsets, summary.items()):
            seeds = [per_condition[c][key]["seeds"] if key in per_condition[c] else [np.nan]
                     for c in conditions]
            means = np.array([100 * np.mean(s) for s in seeds])
            lows = means - np.array([100 * np.min(s) for s in seeds])
            highs = np.array([100 * np.max(s) for s in seeds]) - means
            axis.errorbar(xs + offset, means, yerr=[lows, highs], marker="o", capsize=3,
                          label=name)
        axis.set_xticks(xs)
        axis.set_xticklabels(conditions, rotation=35, ha="right", fontsize=8)
        axis.set_ylim(-2, 102)
        axis.set_title(label)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("percent (mean; bar: all seeds)")
    axes[0][0].legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    figure.savefig(out_png, dpi=100)
    plt.close(figure)
    return out_png


def main(argv=None):
    args = parse_args(argv)
    recipes = [(recipe[0], [read_run(run) for run in recipe[1:]]) for recipe in args.recipe]
    summary = summarize(recipes)
    print("percent, mean (worst seed) over "
          + ", ".join(f"{name}: {len(runs)} runs" for name, runs in recipes)
          + "; 'kept' = perturbed / clean per seed")
    print(format_table(summary))
    os.makedirs(args.output, exist_ok=True)
    json_path = os.path.join(args.output, "robustness_comparison.json")
    with open(json_path, "w") as handle:
        json.dump({"runs": {name: [path for path, _ in runs] for name, runs in recipes},
                   "summary": summary}, handle, indent=2)
    png = plot(summary, os.path.join(args.output, "robustness_comparison.png"))
    print(f"wrote {json_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
