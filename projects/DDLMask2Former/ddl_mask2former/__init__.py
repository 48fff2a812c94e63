"""DDL-Mask2Former: joint deepfake detection and forgery localization on detectron2.

Importing this package is cheap and needs no detectron2 (``ddl_mask2former.ops`` runs
without it). Components register themselves with detectron2 when their subpackage is
imported; ``register_all()`` imports every one of them in one place.
"""

__version__ = "0.1.0"


def register_all():
    """Import every subpackage whose import registers datasets, models or evaluators."""
    from . import data, evaluation, modeling  # noqa: F401  (imported for registration)
