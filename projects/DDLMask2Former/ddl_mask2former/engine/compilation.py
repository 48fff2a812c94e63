"""What the Trainer does to the model before training, not to the loop: ``torch.compile`` of
named parts (``SOLVER.COMPILE``) and channels-last weights (``SOLVER.CHANNELS_LAST``)."""
import logging

import torch

__all__ = ["WHOLE_NETWORK", "apply_memory_format", "compile_submodules"]

logger = logging.getLogger(__name__)

# The name that compiles the whole network (``model._network``: backbone, detection head, pixel
# and transformer decoders) as one graph; the losses and the input batching stay eager.
WHOLE_NETWORK = "network"


class _CompiledInTraining:
    """A module's forward (or ``_network``) that runs its compiled version while the module is
    in training mode and the eager one otherwise.

    Evaluation during training (``TEST.EVAL_PERIOD``) feeds images of many sizes: a compiled
    forward would compile again for new sizes (minutes each on a GPU), and under
    ``reduce-overhead`` keep one CUDA graph per size. Inference has its own bounded replay
    (``TEST.CUDA_GRAPH``)."""

    def __init__(self, module, eager, compiled):
        self.module, self.eager, self.compiled = module, eager, compiled

    def __call__(self, *args, **kwargs):
        return (self.compiled if self.module.training else self.eager)(*args, **kwargs)


def compile_submodules(model, names, mode="default", backend="inductor", training_only=True):
    """``torch.compile`` the named parts of ``model`` in place (state-dict keys unchanged).

    Names are submodule attribute paths ("backbone", "pixel_decoder") or ``"network"`` for the
    whole network as one graph (it traces without a graph break since the deformable attention
    is a registered operator); an unknown name raises. ``backend``: torch.compile's (tests use
    "aot_eager", which traces the same graphs without generating code). ``training_only``: the
    compiled code runs only while the model is in training mode (see ``_CompiledInTraining``);
    False compiles evaluation too (benchmarks of fixed-size inference).
    """
    mode_arg = None if mode == "default" else mode
    compiled = []
    for name in names:
        if name == WHOLE_NETWORK and hasattr(model, "_network"):
            owner, attribute = model, "_network"  # an instance attribute over the bound method
        else:
            owner = model
            for part in name.split("."):
                if not hasattr(owner, part):
                    raise ValueError(f"SOLVER.COMPILE.MODULES: {type(model).__name__} has no submodule {name!r}")
                owner = getattr(owner, part)
            if owner is None:
                continue  # a disabled branch (e.g. no localization)
            attribute = "forward"  # module hooks stay outside the graph, as with nn.Module.compile
        eager = getattr(owner, attribute)
        function = torch.compile(eager, mode=mode_arg, backend=backend)
        setattr(owner, attribute, _CompiledInTraining(owner, eager, function) if training_only else function)
        compiled.append(name)
    if compiled:
        logger.info("torch.compile (mode %s%s) on: %s", mode, ", training only" if training_only else "",
                    ", ".join(compiled))
    return compiled


def apply_memory_format(model, channels_last):
    """Convert the model's 4-D weights to channels-last when asked (convolutions then run NHWC)."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
        logger.info("model weights converted to channels-last")
    return model
