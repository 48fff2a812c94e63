"""DDL-Mask2Former: joint deepfake detection and forgery localization on detectron2.

What users write, as with Mask2Former and PointRend::

    import ddl_mask2former                   # registers datasets, meta-architecture, evaluator
    from ddl_mask2former import add_ddl_mask2former_config, ForgeryPredictor

When detectron2 is installed, importing this package imports ``data``, ``modeling`` and
``evaluation``, whose decorators and calls register the DDL-I datasets (``ddl_i_train``,
``ddl_i_val``, ``ddl_i_test``), the ``DDLMask2Former`` meta-architecture with its backbone and
decoders, and the DDL evaluator with detectron2. Without detectron2 nothing is registered and
only ``ddl_mask2former.ops`` (multi-scale deformable attention, torch alone) is usable; the
names above then raise an ImportError that says so.

Serving an exported model needs neither: ``ddl_mask2former_serve`` (installed beside this package,
``pip install .[serve]`` for its dependencies alone) and the ``ddl-mask2former`` command.
"""
import importlib.util
import warnings

__version__ = "0.1.0"

__all__ = ["ForgeryPredictor", "add_ddl_mask2former_config", "register_all", "__version__"]

# Public names that need detectron2.
_DETECTRON2_API = ("ForgeryPredictor", "add_ddl_mask2former_config")


def register_all():
    """Register datasets, model components and the evaluator with detectron2.

    ``import ddl_mask2former`` already does this when detectron2 is installed; calling it again
    is harmless (each module registers once, on its first import).
    """
    with warnings.catch_warnings():
        # detectron2 decorates helpers with torch.jit.script, which torch 2.14 deprecates with a
        # warning when detectron2 is first imported (here); it says nothing about this project.
        # Scoped: the host's own warning filters are left as they were.
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        from . import data, evaluation, modeling  # noqa: F401  (imported for registration)


def __getattr__(name):
    # Only reached when the eager imports below did not run, i.e. without detectron2.
    if name in _DETECTRON2_API:
        raise ImportError(f"ddl_mask2former.{name} needs detectron2, which is not installed "
                          "(only ddl_mask2former.ops works without it)")
    raise AttributeError(f"module 'ddl_mask2former' has no attribute {name!r}")


if importlib.util.find_spec("detectron2") is not None:
    register_all()
    from .config import add_ddl_mask2former_config
    from .predictor import ForgeryPredictor
