"""DDL evaluation: streaming metrics, the detectron2 evaluator, submission export, ensembling.

``metrics`` (per-image numbers -> AUC, F1, IoU), ``ground_truth`` (one image's mask -> pixel
counts), ``evaluator`` (``DDLEvaluator``, in-process), ``export`` (prediction.txt, mask/,
prob/), ``scoring`` (an export against a split folder, offline), ``breakdown`` (the same
metrics per group of a split's manifest: forgery family, chain, ...) and ``fusion`` (paper
eq. 6).
"""
from .evaluator import DDLEvaluator, build_ddl_evaluator
from .export import decode_prob_u8, encode_prob_u8, read_predictions, write_submission_zip
from .fusion import calibrate_ensemble, fuse_exports, fuse_predictions, search_weights
from .ground_truth import count_against_ground_truth, read_ground_truth
from .metrics import ImageRecord, compute_ddl_metrics, compute_group_metrics, roc_auc
from .scoring import list_ddl_split, score_export

__all__ = [
    "DDLEvaluator",
    "build_ddl_evaluator",
    "ImageRecord",
    "roc_auc",
    "compute_ddl_metrics",
    "compute_group_metrics",
    "read_ground_truth",
    "count_against_ground_truth",
    "encode_prob_u8",
    "decode_prob_u8",
    "read_predictions",
    "write_submission_zip",
    "score_export",
    "list_ddl_split",
    "fuse_predictions",
    "calibrate_ensemble",
    "fuse_exports",
    "search_weights",
]
