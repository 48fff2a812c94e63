"""``DDLEvaluator``: detectron2 evaluator for joint deepfake detection and localization."""
import copy
import itertools
import json
import logging
import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from .export import (
    HEAD_PREDICTION_FILE,
    PREDICTION_FILE,
    PROB_THRESHOLD,
    ExportWriter,
    encode_prob_u8,
    mask_file_name,
    write_predictions,
    write_submission_zip,
)
from .ground_truth import count_against_ground_truth
from .metrics import (
    LABEL_UNKNOWN,
    NO_GROUP,
    GroupValue,
    ImageRecord,
    compute_ddl_metrics,
    compute_group_metrics,
    format_metrics_table,
)

__all__ = ["DDLEvaluator", "build_ddl_evaluator", "to_percent_results"]

logger = logging.getLogger(__name__)

# compute_ddl_metrics key -> detectron2 result key; fractions become percent
_RESULT_KEYS = OrderedDict(
    auc="AUC", f1="F1", iou="IoU", score="score", f1_pixel="F1_pixel", iou_pixel="IoU_pixel",
    real_forged_frac="real_forged_frac", real_false_alarm="real_false_alarm",
)
_COUNT_KEYS = OrderedDict(num_real="num_real", num_fake="num_fake")


def to_percent_results(metrics: Dict[str, float]) -> Dict[str, float]:
    """compute_ddl_metrics' fractions -> detectron2-style result dict in percent."""
    results = OrderedDict()
    for key, name in _RESULT_KEYS.items():
        if key in metrics:
            results[name] = 100.0 * metrics[key]
    for key, name in _COUNT_KEYS.items():
        results[name] = int(metrics[key])
    return results


class DDLEvaluator(DatasetEvaluator):
    """Detection AUC and localization F1/IoU of a DDL model, optionally exporting a submission.

    ``process`` takes the test mapper's dicts (``file_name``, ``image_id``, ``height``,
    ``width``, and ``label`` / ``mask_file`` when labeled) and the model's outputs
    (``fake_prob``, ``mask_prob``, ``mask`` at the original size; a disabled task's keys are
    absent). The predicted mask is ``mask_prob > 0.5`` (``mask`` when no probabilities are
    given). Per image only a name, the label, the score and pixel counts are kept; results are
    gathered with ``detectron2.utils.comm`` and are identical for any number of processes.

    With ``export_dir`` every process writes ``mask/`` and ``prob/`` PNGs there (a folder all
    processes can reach), and the main process writes ``prediction.txt`` for all images and,
    with ``export_zip``, ``submission.zip``. Metric conventions: ``metrics.py``.
    """

    def __init__(self, dataset_name: str, output_dir: Optional[str] = None,
                 export_dir: Optional[str] = None, *, export_prob: bool = True,
                 export_zip: bool = False, group_key: Optional[str] = None,
                 gt_mask_threshold: int = 127, distributed: bool = True):
        """
        Args:
            dataset_name: registered dataset being evaluated (for logs and group lookup).
            output_dir: if given, ``ddl_metrics.json`` with the results is written there.
            export_dir: if given, write the challenge submission there.
            export_prob: also export 8-bit probability maps (needed by tools/ensemble.py).
            export_zip: also write ``submission.zip`` (prediction.txt + mask/).
            group_key: dataset-dict key (e.g. a forgery type; a value or a list of values)
                for metrics per group, grouped as ``metrics.group_images`` says; taken from the
                inputs when present there, else from the registered dataset dicts.
            gt_mask_threshold: ground-truth mask pixels above this 8-bit value are forged.
            distributed: gather results from all processes (False: each process alone).
        """
        self.dataset_name = dataset_name
        self.output_dir = output_dir
        self.export_dir = export_dir or None
        self.export_prob = export_prob
        self.export_zip = export_zip
        self.group_key = group_key or None
        self.gt_mask_threshold = gt_mask_threshold
        self.distributed = distributed
        self._group_by_image_id = None
        self._records: List[ImageRecord] = []
        self._writer: Optional[ExportWriter] = None

    def reset(self) -> None:
        self._records = []
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.export_dir:
            self._writer = ExportWriter(self.export_dir, write_prob=self.export_prob)

    def process(self, inputs: List[Dict], outputs: List[Dict]) -> None:
        for image_input, output in zip(inputs, outputs):
            self._records.append(self._process_one(image_input, output))

    def _process_one(self, image_input: Dict, output: Dict) -> ImageRecord:
        file_name = image_input["file_name"]
        name = os.path.basename(file_name)
        label = int(image_input.get("label", LABEL_UNKNOWN))
        if label not in (0, 1, LABEL_UNKNOWN):
            raise ValueError(f"{file_name}: label must be 0 (real) or 1 (fake), got {label}")
        fake_prob = float("nan")
        if "fake_prob" in output:
            fake_prob = float(output["fake_prob"])
            if not math.isfinite(fake_prob):
                raise ValueError(f"{file_name}: model returned fake_prob={fake_prob}")
        tp = fp = fn = -1
        num_pixels = int(image_input["height"]) * int(image_input["width"])
        if "mask_prob" in output or "mask" in output:
            pred = self._predicted_mask(image_input, output, name)
            mask_file = image_input.get("mask_file") if label == 1 else None
            if label == 1 and not mask_file:
                raise ValueError(f"{file_name}: a fake image (label 1) needs a 'mask_file' to "
                                 "score localization")
            tp, fp, fn = count_against_ground_truth(pred, mask_file, self.gt_mask_threshold,
                                                    file_name)
            if "ungated_mask_prob" in output and self._writer is not None and self.export_prob:
                self._writer.submit_ungated(name, encode_prob_u8(output["ungated_mask_prob"].detach().float()))
        head_prob = float(output["head_prob"]) if "head_prob" in output else math.nan
        return ImageRecord(name, label, fake_prob, tp, fp, fn, num_pixels,
                           self._group_of(image_input), head_prob)

    def _predicted_mask(self, image_input: Dict, output: Dict, name: str) -> np.ndarray:
        expected = (int(image_input["height"]), int(image_input["width"]))
        key = "mask_prob" if "mask_prob" in output else "mask"
        prediction = output[key]
        if tuple(prediction.shape) != expected:
            raise ValueError(f"{image_input['file_name']}: model output {key} is "
                             f"{tuple(prediction.shape)} but the image is {expected} (H, W); "
                             "outputs must be at the original resolution")
        if key == "mask_prob":
            prob = prediction.detach().float()
            if not bool(torch.isfinite(prob).all()):
                raise ValueError(f"{image_input['file_name']}: mask_prob has NaN or inf")
            pred = (prob > PROB_THRESHOLD).cpu().numpy()
            if self._writer is not None:
                self._writer.submit(name, encode_prob_u8(prob))
        else:
            pred = prediction.detach().cpu().numpy().astype(bool)
            if self._writer is not None:
                self._writer.submit_mask(name, pred)
        return pred

    def _group_of(self, image_input: Dict) -> GroupValue:
        if self.group_key is None:
            return None
        if self.group_key in image_input:
            group = image_input[self.group_key]
        else:
            if self._group_by_image_id is None:
                # mappers usually drop extra keys: look them up once in the registered dicts
                self._group_by_image_id = {
                    d["image_id"]: d.get(self.group_key)
                    for d in DatasetCatalog.get(self.dataset_name)
                } if self.dataset_name in DatasetCatalog.list() else {}
            group = self._group_by_image_id.get(image_input["image_id"])
        return group  # a value, a list of values or None; group_images reads all three

    def evaluate(self) -> Dict:
        if self._writer is not None:
            self._writer.flush()
        if self.distributed:
            # a collective: after it every process has finished writing its PNGs
            gathered = comm.gather(self._records, dst=0)
            if not comm.is_main_process():
                return {}
            records = list(itertools.chain(*gathered))
        else:
            records = copy.copy(self._records)
        # a fixed order makes every result independent of how images were split over processes
        records.sort(key=lambda r: r.name)
        self._check_unique(records)
        if self.export_dir:
            self._write_export(records)
        if all(r.label == LABEL_UNKNOWN for r in records):
            logger.info("%s: %d unlabeled images, nothing scored", self.dataset_name, len(records))
            return {}
        metrics = compute_ddl_metrics(records)
        groups = compute_group_metrics(records) if self.group_key else {}
        if self.group_key and list(groups) == [NO_GROUP]:
            logger.warning("%s: no image has the group key '%s' (TEST.EVAL_GROUP_KEY); every "
                           "image is in the group %s", self.dataset_name, self.group_key, NO_GROUP)
        logger.info("DDL evaluation on %s (%d images, percent):\n%s", self.dataset_name,
                    len(records), format_metrics_table(metrics, groups))
        results = OrderedDict(ddl=to_percent_results(metrics))
        if groups:
            # one level deep, "group/metric": detectron2's print_csv_format needs flat floats
            results["ddl_groups"] = OrderedDict(
                (f"{group}/{key}", value)
                for group, group_metrics in groups.items()
                for key, value in to_percent_results(group_metrics).items()
            )
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            path = os.path.join(self.output_dir, "ddl_metrics.json")
            with open(path, "w") as f:
                json.dump(_json_safe(results), f, indent=2)
            logger.info("DDL metrics written to %s", path)
        return results

    @staticmethod
    def _check_unique(records: List[ImageRecord]) -> None:
        seen = set()
        for record in records:
            key = mask_file_name(record.name)
            if key in seen:
                raise ValueError(f"two evaluated images share the name {record.name} (export "
                                 f"name {key}); image file names must be unique")
            seen.add(key)

    def _write_export(self, records: List[ImageRecord]) -> None:
        if records and records[0].has_detection:
            write_predictions(os.path.join(self.export_dir, PREDICTION_FILE),
                              [(r.name, r.fake_prob) for r in records])
        if records and not math.isnan(records[0].head_prob):
            write_predictions(os.path.join(self.export_dir, HEAD_PREDICTION_FILE),
                              [(r.name, r.head_prob) for r in records])
        if self._writer is not None and any(r.has_localization for r in records):
            self._check_export_complete(records)
        zip_note = f" (zip: {write_submission_zip(self.export_dir)})" if self.export_zip else ""
        logger.info("DDL submission for %d images exported to %s%s", len(records), self.export_dir,
                    zip_note)

    def _check_export_complete(self, records: List[ImageRecord]) -> None:
        mask_dir = os.path.join(self.export_dir, "mask")
        written = set(os.listdir(mask_dir))
        missing = [r.name for r in records if mask_file_name(r.name) not in written]
        if missing:
            raise RuntimeError(f"{mask_dir}: {len(missing)} masks missing after all processes "
                               f"finished (e.g. {missing[:3]}); is EXPORT_DIR on a filesystem "
                               "every process can write to?")


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def build_ddl_evaluator(cfg, dataset_name: str, output_dir: Optional[str] = None) -> DDLEvaluator:
    """A ``DDLEvaluator`` configured from ``cfg.TEST.*`` (see ``_add_evaluation_config``).

    ``TEST.EXPORT_DIR`` gets a per-dataset subfolder when several test datasets are evaluated.
    """
    export_dir = cfg.TEST.EXPORT_DIR or None
    if export_dir and len(cfg.DATASETS.TEST) > 1:
        export_dir = os.path.join(export_dir, dataset_name)
    return DDLEvaluator(
        dataset_name,
        output_dir=output_dir,
        export_dir=export_dir,
        export_prob=cfg.TEST.EXPORT_PROB,
        export_zip=cfg.TEST.EXPORT_ZIP,
        group_key=cfg.TEST.EVAL_GROUP_KEY or None,
        gt_mask_threshold=cfg.INPUT.MASK_THRESHOLD,
    )
