"""Metrics per group of images named by a split's manifest (forgery family, chain, ...).

The synthetic generator writes ``manifest_<split>.jsonl`` beside each split folder: one JSON
object per image with ``file``, ``label`` and, for the varied generator, ``families``,
``regions`` ({family, shape}), ``post`` ({chain, ...}) and ``source`` (mixed data add
``generator``). ``compute_breakdown`` scores each group from the per-image results of one
scoring pass (``scoring.ImageScores``), with the same formulas as the overall figures.

How real images are grouped depends on what a key describes:

- forgery keys (``family``, ``shape``) describe the forged regions, which real images lack:
  each group holds the fakes with that value plus *all* real images, so its AUC is "these fakes
  against every real image". A fake with several families (or shapes) counts in each.
- image keys (``chain``, ``generator``, ``source``) describe the whole image: a group holds the
  real and fake images with that value.

Images the manifest does not list, and entries without the key (classic images have no
``families``), go to the group ``(none)``; for forgery keys only fakes do. Nothing is dropped.
"""
import json
import math
import os
import textwrap
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import numpy as np
from tabulate import tabulate

from .scoring import ImageScores

__all__ = [
    "FORGERY_KEYS",
    "IMAGE_KEYS",
    "BREAKDOWN_KEYS",
    "NO_GROUP",
    "default_manifest_path",
    "read_manifest",
    "check_manifest",
    "group_images",
    "compute_breakdown",
    "format_breakdown",
]

FORGERY_KEYS = ("family", "shape")
IMAGE_KEYS = ("chain", "generator", "source")
BREAKDOWN_KEYS = FORGERY_KEYS + IMAGE_KEYS
# the group of images without a value for the key
NO_GROUP = "(none)"
# entries of real images in a forgery-key group: the same for every group, so not shown there
_REAL_ONLY_KEYS = ("real_forged_frac", "real_false_alarm")
_PLURALS = {"family": "families", "shape": "shapes"}
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


def _values(record: Optional[dict], key: str) -> List[str]:
    """The record's values for ``key`` (several for a forgery key); [] when it has none."""
    if record is None:
        return []
    if key == "family":
        values = record.get("families") or []
    elif key == "shape":
        # classic records list region kinds as strings: no shape
        values = [region.get("shape") for region in record.get("regions") or []
                  if isinstance(region, dict)]
    elif key == "chain":
        post = record.get("post")
        values = [post.get("chain")] if isinstance(post, dict) else []
    elif key in IMAGE_KEYS:
        values = [record.get(key)]
    else:
        raise ValueError(f"unknown breakdown key {key!r}; expected one of {BREAKDOWN_KEYS}")
    return sorted({str(value) for value in values if value is not None})


def group_images(manifest: Dict[str, dict], names: Sequence[str], labels: Sequence[int],
                 key: str) -> Dict[str, np.ndarray]:
    """Image indices per group of ``key`` (module docstring: how reals are grouped)."""
    labels = np.asarray(labels)
    members: Dict[str, List[int]] = defaultdict(list)
    for index, (name, label) in enumerate(zip(names, labels)):
        if key in FORGERY_KEYS and label != 1:
            continue
        for value in _values(manifest.get(name), key) or [NO_GROUP]:
            members[value].append(index)
    order = sorted(members, key=lambda group: (group == NO_GROUP, group))
    if key in FORGERY_KEYS:
        reals = np.flatnonzero(labels == 0)
        return {group: np.sort(np.concatenate([members[group], reals]).astype(np.int64))
                for group in order}
    return {group: np.asarray(members[group], dtype=np.int64) for group in order}


def compute_breakdown(scores: ImageScores, manifest: Dict[str, dict],
                      keys: Sequence[str]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{key: {group: metrics}}: ``ImageScores.metrics`` of each group's images.

    For forgery keys the entries about real images (``real_false_alarm``, ...) are left out:
    every group holds all reals, so they would repeat the overall figure.
    """
    names, labels = scores.images.names, scores.images.labels
    breakdown = {}
    for key in keys:
        breakdown[key] = {}
        for group, indices in group_images(manifest, names, labels, key).items():
            metrics = scores.metrics(indices, warn=False)
            metrics.pop("num_unlabeled", None)
            if key in FORGERY_KEYS:
                for entry in _REAL_ONLY_KEYS:
                    metrics.pop(entry, None)
            breakdown[key][group] = metrics
    return breakdown


def format_breakdown(key: str, groups: Dict[str, Dict[str, float]]) -> str:
    """One key's groups as a text table in percent, with a line on how reals are grouped."""
    if key in FORGERY_KEYS:
        note = (f"by {key}: a group is its fake images plus all real images (AUC: those fakes "
                f"against every real); a fake with several {_PLURALS[key]} counts in each")
    else:
        note = f"by {key}: a group holds the real and fake images with that {key}"
    note += (f"; {NO_GROUP}: not in the manifest or no {key} there; '-' marks a figure the group "
             "cannot define")
    columns = [(entry, header) for entry, header in _TABLE_COLUMNS
               if any(entry in metrics for metrics in groups.values())]

    def cell(metrics, entry):
        value = metrics.get(entry)
        if value is None:
            return ""
        if math.isnan(value):  # one class only, no fakes, or no reals
            return "-"
        return str(int(value)) if entry.startswith("num_") else f"{100 * value:.2f}"

    rows = [[group] + [cell(metrics, entry) for entry, _ in columns]
            for group, metrics in groups.items()]
    table = tabulate(rows, headers=[key] + [header for _, header in columns], tablefmt="pipe",
                     disable_numparse=True, stralign="right")
    return f"{textwrap.fill(note, width=100, break_on_hyphens=False)}\n{table}"
