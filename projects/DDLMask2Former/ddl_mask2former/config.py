"""Every config key DDL-Mask2Former adds to detectron2's defaults, each with a comment.

``add_ddl_mask2former_config(cfg)`` must run before ``cfg.merge_from_file``.
"""
import os
import re
import sys

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg


def add_ddl_mask2former_config(cfg):
    """Add all DDL-Mask2Former keys to a detectron2 config, in place."""
    _add_model_config(cfg)
    _add_data_config(cfg)
    _add_evaluation_config(cfg)
    _add_solver_config(cfg)


# A config key on a command line: a dotted upper-case path (MODEL.WEIGHTS, SOLVER.BASE_LR) or one
# of the top-level keys (OUTPUT_DIR, SEED); no option value, dataset name or path of ours is one.
CONFIG_KEY = re.compile(r"^([A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+|OUTPUT_DIR|SEED|CUDNN_BENCHMARK|VIS_PERIOD|VERSION)$")


def split_config_overrides(argv=None):
    """(options, overrides) of a command line: the overrides start at the first config key.

    A command whose options take lists (``--levels a b``) and that ends with ``KEY VALUE``
    overrides cannot leave the split to argparse, whose list option would swallow the overrides
    (or refuse them as invalid choices). Parse ``options`` with argparse and take ``overrides``
    as they are."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((i for i, arg in enumerate(argv) if CONFIG_KEY.match(arg)), len(argv))
    return argv[:first], argv[first:]


def load_config(config_file, opts=(), freeze=True):
    """detectron2's defaults + this project's keys + ``config_file`` + ``KEY VALUE`` ``opts``.

    Raises FileNotFoundError naming ``config_file`` when it does not exist, and ValueError naming
    the key when a value is out of its range (``check_config``)."""
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file not found: {config_file}")
    cfg = get_cfg()
    add_ddl_mask2former_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    check_config(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def check_config(cfg):
    """ValueError naming the key of a value that no run could use (checked when the config is
    loaded, so that a run does not find out at its end)."""
    target_fpr = cfg.MODEL.DDL.VERDICT.TARGET_FPR
    if isinstance(target_fpr, bool) or not isinstance(target_fpr, (int, float)) or not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"MODEL.DDL.VERDICT.TARGET_FPR must be a false-positive rate in [0, 1) "
                         f"(0.05 calls at most 5 % of the calibration reals fake), got {target_fpr!r}")


def _add_model_config(cfg):
    """Backbones, pixel decoder, transformer decoder, detection head, losses."""
    # ImageNet mean/std in RGB order (INPUT.FORMAT is RGB); detectron2's defaults are BGR, std 1.
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    # Per-channel std the normalized image is divided by (RGB).
    cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    # Swin backbone (timm trunk), used when MODEL.BACKBONE.NAME is "build_swin_backbone".
    cfg.MODEL.SWIN = CN()
    # Channels of stage 1; stage i has EMBED_DIM * 2**i (Swin-T/S: 96).
    cfg.MODEL.SWIN.EMBED_DIM = 96
    # Blocks per stage (Swin-T: [2, 2, 6, 2], Swin-S: [2, 2, 18, 2]).
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
    # Attention heads per stage (Swin-T/S: [3, 6, 12, 24]).
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
    # Attention window side in tokens; shift is half of it.
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    # Patch-embedding stride (res2 stride); inputs must be multiples of PATCH_SIZE * 2**(stages-1).
    cfg.MODEL.SWIN.PATCH_SIZE = 4
    # FFN width as a multiple of the stage width.
    cfg.MODEL.SWIN.MLP_RATIO = 4.0
    # Stochastic-depth rate, linearly increasing over blocks up to this value.
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.3
    # Stages returned (res2..res5 = strides 4..32).
    cfg.MODEL.SWIN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # LayerNorm on each returned stage (Swin's detection/segmentation convention).
    cfg.MODEL.SWIN.OUT_NORM = True
    # Window attention through F.scaled_dot_product_attention (timm's fused_attn): same outputs
    # to rounding; on a GPU its memory-efficient kernel need not keep the attention probabilities
    # for the backward. Off until its GPU speed and memory are measured (docs/PERFORMANCE.md); on
    # the CPU it is not faster.
    cfg.MODEL.SWIN.FUSED_ATTENTION = False
    # Each block's MLP keeps only its hidden pre-activation for the backward and recomputes the
    # GELU there (modeling/backbone/gelu_linear.py): same gradients, about half the MLP's saved
    # activations, one extra elementwise pass per block. False runs timm's MLP as it is.
    # Off until measured on a GPU (its memory gain there is an estimate).
    cfg.MODEL.SWIN.RECOMPUTE_GELU = False
    # Each block's window attention keeps q, k and v for the backward and recomputes the
    # attention probabilities there (modeling/backbone/window_attention.py): same gradients,
    # without the float32 probabilities and their autocast copy, one extra q k^T and softmax per
    # block in the backward. No effect with FUSED_ATTENTION (that path keeps no probabilities).
    # False runs timm's attention as it is. Off until measured on a GPU.
    cfg.MODEL.SWIN.RECOMPUTE_ATTENTION = False
    # Activation checkpointing: every Swin block keeps only its input for the backward and runs
    # its forward again there (timm's set_grad_checkpointing). For training that is bound by
    # GPU memory (larger batches per GPU): the backbone's activations shrink to one tensor per
    # block, at the cost of a second backbone forward per step. Off by default.
    cfg.MODEL.SWIN.GRAD_CHECKPOINTING = False

    cfg.MODEL.DDL = CN()
    # Branches to build and run: any non-empty subset of ["detection", "localization"].
    cfg.MODEL.DDL.TASKS = ["detection", "localization"]
    # Batched inputs are padded to a multiple of this (raised to the backbone's own need).
    cfg.MODEL.DDL.SIZE_DIVISIBILITY = 32
    # Localization classes given mask targets: ["forged"] (one target per image, the union of
    # forged pixels) or ["authentic", "forged"] (also the authentic pixels, as MMSegmentation's
    # binary Mask2Former); see modeling/README.md for the measured choice.
    cfg.MODEL.DDL.TARGET_CLASSES = ["forged"]
    # Append fixed SRM high-pass residuals to the RGB input (beyond the paper; for from-scratch training).
    cfg.MODEL.DDL.NOISE_RESIDUALS = False

    # Detection head: global average pooling + one linear layer.
    cfg.MODEL.DDL.DET_HEAD = CN()
    # Backbone maps pooled and concatenated before the linear layer.
    cfg.MODEL.DDL.DET_HEAD.IN_FEATURES = ["res5"]
    # Dropout on the pooled vector.
    cfg.MODEL.DDL.DET_HEAD.DROPOUT = 0.0
    # "avg": global average pooling, then the linear layer (paper); "max": the linear layer scores
    # every position and the image takes the highest score (small regions are not diluted).
    cfg.MODEL.DDL.DET_HEAD.POOLING = "avg"

    # The image-level verdict (modeling/verdict.py; docs/EVALUATION.md "Verdict").
    cfg.MODEL.DDL.VERDICT = CN()
    # How fake_prob is made: "head" (the paper's detection head alone), "map_max" (the forgery
    # map's maximum: the best query's confidence x its mask), "map_top" (mean of the map's top
    # 0.5 % of pixels) or "fusion" (logistic regression on the head's and the map's features).
    # Measured against each other in docs/PERFORMANCE.md#quickstart. A detection-only model
    # (MODEL.DDL.TASKS ["detection"]) needs "head"; the others refuse to build without the map.
    cfg.MODEL.DDL.VERDICT.RULE = "map_max"
    # "gate": an image called real (fake_prob <= threshold) gets an empty mask_prob and mask;
    # "independent": the map as the localization branch made it (the paper).
    cfg.MODEL.DDL.VERDICT.MASK_POLICY = "gate"
    # Calibration (DATASETS.CALIBRATION) sets the verdict threshold so that at most this share
    # of the calibration split's real images is called fake; a rate in [0, 1), checked on loading.
    cfg.MODEL.DDL.VERDICT.TARGET_FPR = 0.05

    # Pixel decoder (registry DDL_PIXEL_DECODER).
    cfg.MODEL.DDL.PIXEL_DECODER = CN()
    # Registered pixel decoder class.
    cfg.MODEL.DDL.PIXEL_DECODER.NAME = "MSDeformAttnPixelDecoder"
    # Backbone maps the pixel decoder reads (the finest one sets the mask resolution).
    cfg.MODEL.DDL.PIXEL_DECODER.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    # Maps refined by the deformable encoder (the others join through the FPN path).
    cfg.MODEL.DDL.PIXEL_DECODER.DEFORM_IN_FEATURES = ["res3", "res4", "res5"]
    # Width of the encoder and FPN maps.
    cfg.MODEL.DDL.PIXEL_DECODER.CONV_DIM = 256
    # Channels of the per-pixel embeddings P.
    cfg.MODEL.DDL.PIXEL_DECODER.MASK_DIM = 256
    # Deformable-attention encoder layers.
    cfg.MODEL.DDL.PIXEL_DECODER.ENCODER_LAYERS = 6
    # Heads of each deformable attention.
    cfg.MODEL.DDL.PIXEL_DECODER.ENCODER_HEADS = 8
    # Sampling points per head and level.
    cfg.MODEL.DDL.PIXEL_DECODER.ENCODER_POINTS = 4
    # FFN width of each encoder layer.
    cfg.MODEL.DDL.PIXEL_DECODER.ENCODER_FFN_DIM = 1024
    # Dropout in the encoder layers.
    cfg.MODEL.DDL.PIXEL_DECODER.DROPOUT = 0.0
    # Under autocast, run each deformable-attention layer wholly in float32 (True, as Mask2Former
    # keeps its pixel decoder in float32). False: only the sampling offsets, attention weights and
    # the sampling in float32, the value and output projections in autocast's dtype, which halves
    # what they keep for the backward (docs/PERFORMANCE.md, "Model").
    cfg.MODEL.DDL.PIXEL_DECODER.FP32_PROJECTIONS = True
    # Encoder FFNs keep their 256-wide input for the backward and recompute the 1024-wide hidden
    # there (one more matmul per layer; ~1 GiB less at batch 16, 512 px estimated without a GPU;
    # the same gradients). Off until measured on a GPU.
    cfg.MODEL.DDL.PIXEL_DECODER.RECOMPUTE_FFN = False
    # Deformable attention through the registered operator torch.ops.ddl_mask2former.ms_deform_attn
    # (ops/registered_op.py): torch.compile traces it without a graph break, so SOLVER.COMPILE
    # MODULES ["network"] is one graph. False: the compiled CUDA kernels through an
    # autograd.Function (the path measured on a GPU), the PyTorch path on the CPU. Off until
    # measured on a GPU.
    cfg.MODEL.DDL.PIXEL_DECODER.REGISTERED_OP = False

    # Masked-attention transformer decoder (registry DDL_TRANSFORMER_DECODER).
    cfg.MODEL.DDL.TRANSFORMER_DECODER = CN()
    # Registered transformer decoder class.
    cfg.MODEL.DDL.TRANSFORMER_DECODER.NAME = "MaskedAttentionDecoder"
    # Query width.
    cfg.MODEL.DDL.TRANSFORMER_DECODER.HIDDEN_DIM = 256
    # Learnable queries N.
    cfg.MODEL.DDL.TRANSFORMER_DECODER.NUM_QUERIES = 100
    # Attention heads.
    cfg.MODEL.DDL.TRANSFORMER_DECODER.NHEADS = 8
    # FFN width of each layer.
    cfg.MODEL.DDL.TRANSFORMER_DECODER.DIM_FEEDFORWARD = 2048
    # Decoder layers L (exactly this many; plus one prediction from the initial queries).
    cfg.MODEL.DDL.TRANSFORMER_DECODER.DEC_LAYERS = 9
    # Dropout in the decoder layers.
    cfg.MODEL.DDL.TRANSFORMER_DECODER.DROPOUT = 0.0

    # Losses; the matcher uses the same class/mask/dice weights and NUM_POINTS as its costs.
    cfg.MODEL.DDL.LOSS = CN()
    # lambda_det of eq. 5 (detection BCE).
    cfg.MODEL.DDL.LOSS.DET_WEIGHT = 0.1
    # lambda_loc of eq. 5 (scales every localization term).
    cfg.MODEL.DDL.LOSS.LOC_WEIGHT = 1.0
    # Weight of the confidence BCE (L_cls).
    cfg.MODEL.DDL.LOSS.CLASS_WEIGHT = 2.0
    # Weight of the point-sampled mask BCE.
    cfg.MODEL.DDL.LOSS.MASK_WEIGHT = 5.0
    # Weight of the point-sampled Dice loss.
    cfg.MODEL.DDL.LOSS.DICE_WEIGHT = 5.0
    # Relative weight of unmatched ("no object") queries in L_cls.
    cfg.MODEL.DDL.LOSS.NO_OBJECT_WEIGHT = 0.1
    # Supervise the initial queries' and every layer's predictions, not just the last.
    cfg.MODEL.DDL.LOSS.DEEP_SUPERVISION = True
    # Points per mask for the mask losses and matching costs.
    cfg.MODEL.DDL.LOSS.NUM_POINTS = 12544
    # Candidate points drawn per kept point before importance selection.
    cfg.MODEL.DDL.LOSS.OVERSAMPLE_RATIO = 3.0
    # Fraction of points chosen by uncertainty (the rest uniformly at random).
    cfg.MODEL.DDL.LOSS.IMPORTANCE_SAMPLE_RATIO = 0.75


def _add_data_config(cfg):
    """DDL-I datasets, mapper and augmentations."""
    # detectron2's INPUT.FORMAT, INPUT.RANDOM_FLIP and INPUT.CROP.* are reused by DDLDatasetMapper;
    # only their defaults change here. MIN_SIZE_*/MAX_SIZE_* are not used (BASE_SCALE replaces them).
    # Channel order of mapper images; the paper's ImageNet-pretrained backbones expect RGB.
    cfg.INPUT.FORMAT = "RGB"
    # Training random crop, always an absolute (H, W) in pixels; smaller images are padded up to it.
    cfg.INPUT.CROP.ENABLED = True
    # Must stay "absolute" for DDL training (the mapper rejects other crop types).
    cfg.INPUT.CROP.TYPE = "absolute"
    # Crop (H, W) (paper: 512x512).
    cfg.INPUT.CROP.SIZE = (512, 512)
    # Re-draw the crop (up to 10 times) until no class (authentic / forged) covers this share
    # or more of it and both are present (MMSegmentation's cat_max_ratio; paper pipeline 0.75);
    # 1.0 is a plain random crop.
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    # Keep-ratio resize target (long, short): long side <= long, short side <= short (paper: 2048x512).
    cfg.INPUT.BASE_SCALE = (2048, 512)
    # Also enlarge images smaller than BASE_SCALE (paper/MMSegmentation); False keeps their native size.
    cfg.INPUT.BASE_SCALE_ENLARGE = True
    # Training multiplies BASE_SCALE by a ratio drawn uniformly from this range (paper: [0.5, 2.0]).
    cfg.INPUT.RATIO_RANGE = (0.5, 2.0)
    # A mask pixel is forged when its 8-bit gray value is above this (0/255 masks: any value 0-254).
    cfg.INPUT.MASK_THRESHOLD = 127
    # Training: a fake image's crop with no forged pixel left is labeled real for detection.
    cfg.INPUT.CROP_LABEL_FROM_MASK = True
    # Photometric distortion of training images (MMSegmentation's PhotoMetricDistortion).
    cfg.INPUT.PHOTOMETRIC = CN()
    # Apply it at all.
    cfg.INPUT.PHOTOMETRIC.ENABLED = True
    # Probability of each of the four changes (brightness, contrast, saturation, hue).
    cfg.INPUT.PHOTOMETRIC.PROB = 0.5
    # Brightness: add a value drawn from [-delta, delta] (8-bit scale).
    cfg.INPUT.PHOTOMETRIC.BRIGHTNESS_DELTA = 32
    # Contrast: multiply by a factor drawn from this range.
    cfg.INPUT.PHOTOMETRIC.CONTRAST_RANGE = (0.5, 1.5)
    # Saturation: multiply the HSV saturation by a factor drawn from this range.
    cfg.INPUT.PHOTOMETRIC.SATURATION_RANGE = (0.5, 1.5)
    # Hue: shift by an integer in [-delta, delta] in OpenCV 8-bit hue units (180 = full circle).
    cfg.INPUT.PHOTOMETRIC.HUE_DELTA = 18
    # Degradation of training samples (rescaling, blur, noise, JPEG; data/augmentations.py
    # RandomDegradation): rescaling acts on the decoded image before the resize and crop, the
    # others on the final crop; the mask is resampled by nearest neighbour or left unchanged.
    cfg.INPUT.DEGRADATION = CN()
    # Apply it at all (training only; never at test time). Off everywhere: in the CPU quickstart's
    # budget it cost 35 points of clean IoU and made JPEG 70 / resize 0.5 no better (three
    # seeds, docs/PERFORMANCE.md "Robustness"); not yet measured at GPU scale.
    cfg.INPUT.DEGRADATION.ENABLED = False
    # Probability that a training sample is degraded; each operation then has its own probability.
    cfg.INPUT.DEGRADATION.PROB = 0.5
    # Rescaling of a degraded sample: probability, and factor range (the sample keeps the new size).
    cfg.INPUT.DEGRADATION.RESCALE_PROB = 0.5
    # Factor drawn uniformly from this range (TruFor: +-50 %); < 1 shrinks (INTER_AREA), > 1 enlarges.
    cfg.INPUT.DEGRADATION.RESCALE_RANGE = (0.5, 1.5)
    # Gaussian blur of a degraded sample: probability.
    cfg.INPUT.DEGRADATION.BLUR_PROB = 0.5
    # Odd kernel sizes (low, high), one drawn uniformly among the odd sizes; sigma from the size.
    cfg.INPUT.DEGRADATION.BLUR_KERNEL_RANGE = (3, 7)
    # Additive Gaussian noise of a degraded sample: probability.
    cfg.INPUT.DEGRADATION.NOISE_PROB = 0.5
    # Noise variance drawn uniformly from this range, in 8-bit units (std = sqrt(variance)).
    cfg.INPUT.DEGRADATION.NOISE_VAR_RANGE = (3.0, 23.0)
    # JPEG recompression of a degraded sample (last, after blur and noise): probability.
    cfg.INPUT.DEGRADATION.JPEG_PROB = 0.5
    # JPEG quality drawn uniformly from these integers, both included (TruFor / DDL 3rd place: 50-100).
    cfg.INPUT.DEGRADATION.JPEG_QUALITY_RANGE = (50, 100)
    # Datasets the verdict is calibrated on before every evaluation during training (Platt
    # scaling and the TARGET_FPR threshold, stored in the checkpoint); kept apart from training
    # and evaluation data, e.g. ("ddl_i_train_calib",) with DATASETS.TRAIN ("ddl_i_train_fit",).
    # Empty: no calibration (fake_prob is the rule's uncalibrated score, threshold 0.5).
    cfg.DATASETS.CALIBRATION = ()
    # Training leaves unreadable files out of its index and drops samples that fail to decode
    # later, listing both in OUTPUT_DIR/bad_files.txt and counting them at the end (False: the
    # index stops, naming every unreadable file).
    cfg.DATALOADER.SKIP_BAD_SAMPLES = False
    # Training keeps decoded images and masks in memory up to this many MiB per data-loader
    # worker (0: decode every sample). For small datasets such as the CPU quickstart's.
    cfg.DATALOADER.DECODED_CACHE_MB = 0


def _add_evaluation_config(cfg):
    """DDL evaluator, export of challenge submissions."""
    # Folder for the challenge submission written during evaluation: prediction.txt, mask/,
    # prob/ (one subfolder per dataset when DATASETS.TEST has several); "" exports nothing.
    cfg.TEST.EXPORT_DIR = ""
    # Also export 8-bit forgery probability maps to prob/ (tools/ensemble.py fuses them).
    cfg.TEST.EXPORT_PROB = True
    # Also zip prediction.txt and mask/ into submission.zip, the archive the challenge accepts.
    cfg.TEST.EXPORT_ZIP = False
    # Dataset-dict key (e.g. a forgery type) to break metrics down by, grouped as
    # docs/EVALUATION.md "Per group" says (the rule of evaluate_predictions --by); "": none.
    cfg.TEST.EVAL_GROUP_KEY = ""
    # Tiled inference at native resolution (modeling/tiled_inference.py): the test input keeps
    # its size (no INPUT.BASE_SCALE resize) and the model runs on overlapping square tiles.
    cfg.TEST.TILE = CN()
    # Tile the image instead of resizing it to INPUT.BASE_SCALE.
    cfg.TEST.TILE.ENABLED = False
    # Tile side in pixels; a multiple of the model's input divisibility (32 for Swin).
    cfg.TEST.TILE.SIZE = 512
    # Pixels shared by neighbouring tiles, blended with weights that taper to 0 across them; < SIZE.
    cfg.TEST.TILE.OVERLAP = 64
    # Tiles per forward pass (twice as many images with flip TTA).
    cfg.TEST.TILE.BATCH_SIZE = 1
    # Image fake_prob from the tiles' fake_probs: "tile_max" (best measured with a model that
    # learned, docs/PERFORMANCE.md#tiled-inference-issue-12), "tile_mean", "global" (the
    # INPUT.BASE_SCALE view alone) or "global_tile_max" (mean of global and tile_max).
    cfg.TEST.TILE.FAKE_PROB = "tile_max"
    # Inference forwards on a GPU replay a CUDA graph per input shape (captured the second time a
    # shape comes; modeling/cuda_graph.py): no per-operator host cost. For inputs of fixed size
    # (tiles, a fixed BASE_SCALE, benchmarks); each kept shape holds one forward's memory.
    cfg.TEST.CUDA_GRAPH = False
    # detectron2's TEST.AUG.ENABLED with TEST.AUG.FLIP (on by default) averages each prediction with
    # that of the horizontally flipped input, un-flipped; composes with tiling. Flip is the only
    # test-time augmentation: TEST.AUG.MIN_SIZES and TEST.AUG.MAX_SIZE are not used.


def _add_solver_config(cfg):
    """Optimizer groups and schedule extras used by tools/train_net.py."""
    # detectron2 already has WEIGHT_DECAY, WEIGHT_DECAY_NORM, WEIGHT_DECAY_BIAS, BIAS_LR_FACTOR,
    # WARMUP_*, LR_SCHEDULER_NAME, CLIP_GRADIENTS.*, AMP.ENABLED and CHECKPOINT_PERIOD; those
    # are reused (their meaning is extended where noted), only the missing ones are added here.
    # LR_SCHEDULER_NAME accepts "WarmupPolyLR" besides detectron2's schedulers.
    # "ADAMW" (the paper's optimizer) or "SGD" (uses SOLVER.MOMENTUM / SOLVER.NESTEROV).
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # AdamW betas.
    cfg.SOLVER.ADAMW_BETAS = (0.9, 0.999)
    # Learning-rate factor for every parameter under model.backbone (0.1: pretrained backbone).
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Weight decay for embeddings, learned queries, position tables and relative-position bias tables.
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # Exponent of the poly decay used by LR_SCHEDULER_NAME "WarmupPolyLR": (1 - t/T) ** power.
    cfg.SOLVER.POLY_LR_POWER = 0.9
    # Floor of the poly decay as a fraction of BASE_LR (0 decays to zero at MAX_ITER).
    cfg.SOLVER.POLY_LR_CONSTANT_ENDING = 0.0
    # SOLVER.CLIP_GRADIENTS.CLIP_TYPE accepts "full_model" besides detectron2's per-parameter
    # "value" / "norm": one norm over all parameters together, capped at CLIP_VALUE.
    # Let DDP tolerate parameters without gradients (e.g. one branch disabled); slower when on.
    cfg.SOLVER.DDP_FIND_UNUSED_PARAMETERS = False
    # Iterations between log lines / metrics.json / TensorBoard writes.
    cfg.SOLVER.LOG_PERIOD = 20
    # Autocast dtype when SOLVER.AMP.ENABLED: "float16" (CUDA only, with a GradScaler) or
    # "bfloat16" (no GradScaler; also runs on CPUs).
    cfg.SOLVER.AMP.PRECISION = "float16"
    # Training speed options, off by default: not yet measured on a GPU (modeling/README.md
    # "Defaults and the GPU").
    # Copy the step's losses to the host right after the forward and read them after the
    # backward has been launched (engine/train_loop.py PendingHostLosses); False copies them
    # after the backward.
    cfg.SOLVER.EARLY_LOSS_COPY = False
    # Convert the model's 4-D weights to channels-last (NHWC convolutions).
    cfg.SOLVER.CHANNELS_LAST = False
    cfg.SOLVER.COMPILE = CN()
    # Submodules of the model to torch.compile in place for training, e.g. ["backbone", "pixel_decoder"],
    # or ["network"]: backbone, heads and decoders as one graph, and/or "criterion" (the losses).
    # The compiled code runs in training mode only: evaluation (TEST.EVAL_PERIOD) stays eager, so
    # new image sizes compile nothing; TEST.CUDA_GRAPH speeds up inference on GPUs instead.
    cfg.SOLVER.COMPILE.MODULES = []
    # torch.compile mode: "default", "reduce-overhead" (CUDA graphs) or "max-autotune".
    cfg.SOLVER.COMPILE.MODE = "default"
