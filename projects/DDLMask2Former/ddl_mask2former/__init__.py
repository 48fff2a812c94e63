"""DDL-Mask2Former: joint deepfake detection and forgery localization on detectron2.

Importing this package is cheap and needs no detectron2 (``ddl_mask2former.ops`` runs
without it). Components register themselves with detectron2 when their subpackage is
imported; ``register_all()`` imports every one of them in one place.
"""

import warnings

__version__ = "0.1.0"

# detectron2 decorates helpers with torch.jit.script, which torch 2.14 deprecates with a warning
# at import time; it says nothing about this project and buries every command's first lines.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)


def register_all():
    """Import every subpackage whose import registers datasets, models or evaluators."""
    from . import data, evaluation, modeling  # noqa: F401  (imported for registration)
