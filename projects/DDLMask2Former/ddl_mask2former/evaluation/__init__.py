"""DDL evaluation: streaming metrics, the detectron2 evaluator, submission export, ensembling.

``metrics``, ``export``, ``scoring`` and ``fusion`` need no detectron2; ``DDLEvaluator`` does.
"""
from .evaluator import DDLEvaluator, build_ddl_evaluator
from .export import decode_prob_u8, encode_prob_u8, read_predictions, write_submission_zip
from .fusion import fuse_exports, fuse_predictions, search_weights
from .metrics import ImageRecord, compute_ddl_metrics, compute_group_metrics, roc_auc
from .scoring import list_ddl_split, score_export

__all__ = [
    "DDLEvaluator",
    "build_ddl_evaluator",
    "ImageRecord",
    "roc_auc",
    "compute_ddl_metrics",
    "compute_group_metrics",
    "encode_prob_u8",
    "decode_prob_u8",
    "read_predictions",
    "write_submission_zip",
    "score_export",
    "list_ddl_split",
    "fuse_predictions",
    "fuse_exports",
    "search_weights",
]
