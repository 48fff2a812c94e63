"""Metrics per group of images named by a split's manifest (forgery family, chain, ...).

The synthetic generator writes ``manifest_<split>.jsonl`` beside each split folder: one JSON
object per image with ``file``, ``label`` and, for the varied generator, ``families``,
``regions`` ({family, shape}), ``post`` ({chain, ...}) and ``source`` (mixed data add
``generator``). ``compute_breakdown`` reads each image's value(s) of a key from there (several
for ``family`` and ``shape``; none for an image the manifest does not list or an entry without
the key) and hands them to ``metrics.compute_group_metrics_from_arrays``: the groups are
chosen by ``metrics.group_images``, the rule the in-process evaluator's
``TEST.EVAL_GROUP_KEY`` follows too, and scored with the formulas of the overall figures.
"""
import json
import math
import os
from typing import Dict, List, Optional, Sequence

from tabulate import tabulate

from .metrics import NO_GROUP, VS_ALL_REALS_NOTE, compute_group_metrics_from_arrays
from .scoring import ImageScores

__all__ = [
    "FORGERY_KEYS",
    "IMAGE_KEYS",
    "BREAKDOWN_KEYS",
    "NO_GROUP",
    "default_manifest_path",
    "read_manifest",
    "check_manifest",
    "compute_breakdown",
    "format_breakdown",
]

# keys of the forged regions (several values per fake, none on reals) and of the whole image
FORGERY_KEYS = ("family", "shape")
IMAGE_KEYS = ("chain", "generator", "source")
BREAKDOWN_KEYS = FORGERY_KEYS + IMAGE_KEYS
_TABLE_COLUMNS = (("num_real", "#real"), ("num_fake", "#fake"), ("auc", "AUC"), ("f1", "F1"),
                  ("iou", "IoU"), ("real_false_alarm", "real >1% marked"))


def default_manifest_path(split_dir: str) -> str:
    """``manifest_<split folder name>.jsonl`` in the split folder's parent (the generator's)."""
    split_dir = os.path.abspath(split_dir)
    return os.path.join(os.path.dirname(split_dir),
                        f"manifest_{os.path.basename(split_dir)}.jsonl")


def read_manifest(path: str) -> Dict[str, dict]:
    """The manifest's records by file name; a malformed line or a repeated file is an error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: manifest not found (--manifest names another one)")
    records: Dict[str, dict] = {}
    with open(path) as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_number}: not JSON ({exc})") from None
            if not isinstance(record, dict) or not isinstance(record.get("file"), str):
                raise ValueError(f"{path}:{line_number}: expected an object with a 'file' name")
            name = os.path.basename(record["file"])
            if name in records:
                raise ValueError(f"{path}:{line_number}: {name} is listed twice")
            records[name] = record
    return records


def check_manifest(manifest: Dict[str, dict], names: Sequence[str], labels: Sequence[int],
                   manifest_path: str, split_dir: str) -> List[str]:
    """Raise when the manifest lists files the split lacks or gives another label.

    Returns the split's images the manifest does not list (they go to ``(none)``).
    """
    label_of = dict(zip(names, (int(label) for label in labels)))
    unknown = sorted(set(manifest) - set(label_of))
    if unknown:
        raise ValueError(f"{manifest_path}: {len(unknown)} files are not in {split_dir}, e.g. "
                         f"{', '.join(unknown[:5])}; is it the manifest of another split "
                         "(--manifest)?")
    relabeled = sorted(name for name, record in manifest.items()
                       if "label" in record and int(record["label"]) != label_of[name])
    if relabeled:
        raise ValueError(f"{manifest_path}: {len(relabeled)} files have another label than in "
                         f"{split_dir} (real/ or fake/), e.g. {', '.join(relabeled[:5])}")
    return sorted(set(label_of) - set(manifest))


def _values(record: Optional[dict], key: str) -> List:
    """The record's values for ``key`` (several for ``family`` and ``shape``); [] for none."""
    if record is None:
        return []
    if key == "family":
        return record.get("families") or []
    if key == "shape":
        # classic records list region kinds as strings: no shape
        return [region.get("shape") for region in record.get("regions") or []
                if isinstance(region, dict)]
    if key == "chain":
        post = record.get("post")
        return [post.get("chain")] if isinstance(post, dict) else []
    if key in IMAGE_KEYS:
        return [record.get(key)]
    raise ValueError(f"unknown breakdown key {key!r}; expected one of {BREAKDOWN_KEYS}")


def compute_breakdown(scores: ImageScores, manifest: Dict[str, dict],
                      keys: Sequence[str]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{key: {group: metrics}} from one scoring pass (``compute_group_metrics_from_arrays``)."""
    names, labels, counts = scores.images.names, scores.images.labels, scores.counts
    return {key: compute_group_metrics_from_arrays(
                [_values(manifest.get(name), key) for name in names], labels, scores.fake_prob,
                counts[:, 0], counts[:, 1], counts[:, 2], scores.num_pixels, names=names)
            for key in keys}


def format_breakdown(key: str, groups: Dict[str, Dict[str, float]]) -> str:
    """One key's groups as a text table in percent (``metrics.GROUP_RULE``: how they are chosen)."""
    columns = [(entry, header) for entry, header in _TABLE_COLUMNS
               if any(entry in metrics for metrics in groups.values())]

    def cell(metrics, entry):
        value = metrics.get(entry)
        if value is None:
            return ""
        if math.isnan(value):  # one class only, no fakes, or no reals
            return "-"
        if entry.startswith("num_"):
            return str(int(value))
        return f"{100 * value:.2f}" + ("*" if entry == "auc" and metrics.get("auc_vs_all_reals")
                                       else "")

    rows = [[group] + [cell(metrics, entry) for entry, _ in columns]
            for group, metrics in groups.items()]
    table = tabulate(rows, headers=[key] + [header for _, header in columns], tablefmt="pipe",
                     disable_numparse=True, stralign="right")
    if any(metrics.get("auc_vs_all_reals") for metrics in groups.values()):
        table += "\n" + VS_ALL_REALS_NOTE
    return table
