"""The library as users write it: `import ddl_mask2former` registers, ForgeryPredictor predicts."""
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from PIL import Image

import ddl_mask2former
from ddl_mask2former import ForgeryPredictor, add_ddl_mask2former_config
from ddl_mask2former.data import DDLDataError
from model_helpers import build

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"
SUBPROCESS_TIMEOUT_S = 300


def _python(code):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_import_registers_datasets_model_and_evaluator():
    # A fresh process: in this one, other tests have already imported the subpackages.
    out = _python(
        "import ddl_mask2former\n"
        "from detectron2.data import DatasetCatalog, MetadataCatalog\n"
        "from detectron2.modeling import META_ARCH_REGISTRY, BACKBONE_REGISTRY\n"
        "assert {'ddl_i_train', 'ddl_i_val', 'ddl_i_test'} <= set(DatasetCatalog.list())\n"
        "assert MetadataCatalog.get('ddl_i_val').evaluator_type == 'ddl'\n"
        "META_ARCH_REGISTRY.get('DDLMask2Former'); BACKBONE_REGISTRY.get('build_swin_backbone')\n"
        "from ddl_mask2former import ForgeryPredictor, add_ddl_mask2former_config, register_all\n"
        "register_all()\n"
        "print('ok')\n")
    assert out.strip() == "ok"


def test_import_leaves_the_hosts_warning_filters_alone_and_hides_detectron2s_jit_warning():
    result = subprocess.run(
        [sys.executable, "-W", "default", "-c",
         "import warnings\n"
         "before = list(warnings.filters)\n"
         "import ddl_mask2former\n"
         "assert warnings.filters == before, 'import ddl_mask2former changed the warning filters'\n"],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.jit.script" not in result.stderr


def test_ops_and_package_import_without_detectron2():
    # sys.modules[name] = None makes `import detectron2` fail as if it were not installed.
    out = _python(
        "import sys\n"
        "sys.modules['detectron2'] = None\n"
        "import ddl_mask2former.ops\n"
        "import ddl_mask2former\n"
        "assert not [m for m in sys.modules if m.startswith('detectron2.')]\n"
        "assert ddl_mask2former.ops.MSDeformAttn is not None\n"
        "try:\n"
        "    from ddl_mask2former import ForgeryPredictor\n"
        "except ImportError as exc:\n"
        "    print(exc)\n")
    assert "needs detectron2" in out


def test_register_all_is_an_idempotent_alias():
    ddl_mask2former.register_all()
    ddl_mask2former.register_all()


def test_options_not_yet_run_on_a_gpu_are_off_by_default():
    """What runs by default on a GPU has run there (modeling/README.md "Defaults and the GPU")."""
    cfg = get_cfg()
    add_ddl_mask2former_config(cfg)
    assert not any([cfg.MODEL.SWIN.RECOMPUTE_GELU, cfg.MODEL.SWIN.RECOMPUTE_ATTENTION,
                    cfg.MODEL.DDL.PIXEL_DECODER.RECOMPUTE_FFN, cfg.MODEL.DDL.PIXEL_DECODER.REGISTERED_OP,
                    cfg.SOLVER.EARLY_LOSS_COPY, cfg.SOLVER.COMPILE.MODULES, cfg.TEST.CUDA_GRAPH])


def _tiny_config(weights=""):
    cfg = get_cfg()
    add_ddl_mask2former_config(cfg)
    cfg.merge_from_file(str(TINY_CONFIG))
    cfg.MODEL.WEIGHTS = weights
    return cfg


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """Weights of the tiny model with a fixed seed, saved as a detectron2 checkpoint."""
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save({"model": build(_tiny_config(), seed=3).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def predictor(weights_file):
    return ForgeryPredictor(_tiny_config(str(weights_file)))


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 45x70 RGB picture saved as PNG: (path, RGB array)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)
    rgb[10:30, 20:50] = (230, 40, 40)
    path = tmp_path_factory.mktemp("photos") / "photo.png"
    Image.fromarray(rgb).save(path)
    return path, rgb


def _check_prediction(prediction, height, width):
    assert set(prediction) == {"fake_prob", "is_fake", "mask_prob", "mask"}
    assert isinstance(prediction["fake_prob"], float) and 0.0 <= prediction["fake_prob"] <= 1.0
    mask_prob, mask = prediction["mask_prob"], prediction["mask"]
    assert mask_prob.shape == (height, width) and mask_prob.dtype == np.float32
    assert mask_prob.min() >= 0.0 and mask_prob.max() <= 1.0
    assert mask.dtype == bool and np.array_equal(mask, mask_prob > 0.5)


def _assert_same(a, b):
    assert a["fake_prob"] == pytest.approx(b["fake_prob"], abs=1e-6)
    np.testing.assert_allclose(a["mask_prob"], b["mask_prob"], atol=1e-5)


def test_predictor_loads_weights_from_config(predictor, weights_file):
    saved = torch.load(weights_file)["model"]
    for name, value in predictor.model.state_dict().items():
        torch.testing.assert_close(value, saved[name], msg=name)


def test_predictor_path_array_pil_and_list_at_original_size(predictor, photo):
    path, rgb = photo
    from_path = predictor(str(path))
    _check_prediction(from_path, 45, 70)
    _assert_same(predictor(path), from_path)  # a pathlib.Path works too
    _assert_same(predictor(rgb), from_path)
    _assert_same(predictor(np.ascontiguousarray(rgb[:, :, ::-1]), format="BGR"), from_path)
    _assert_same(predictor(cv2.imread(str(path)), format="BGR"), from_path)
    _assert_same(predictor(Image.open(path)), from_path)

    other = np.full((33, 21, 3), 128, dtype=np.uint8)
    outputs = predictor([str(path), other, Image.fromarray(rgb), rgb])
    assert isinstance(outputs, list) and len(outputs) == 4
    _check_prediction(outputs[1], 33, 21)
    for output in (outputs[0], outputs[2], outputs[3]):
        _assert_same(output, from_path)
    _assert_same(outputs[1], predictor(other))


def test_predictor_takes_grayscale_as_users_load_it(predictor, photo, tmp_path):
    """cv2.imread(path, 0) gives HxW; some loaders give HxWx1: both mean the gray replicated."""
    import cv2

    path, rgb = photo
    gray_path = tmp_path / "gray.png"
    cv2.imwrite(str(gray_path), rgb[:, :, 1])
    gray = cv2.imread(str(gray_path), 0)
    assert gray.shape == rgb.shape[:2]
    expected = predictor(np.repeat(gray[:, :, None], 3, axis=2))
    _assert_same(predictor(gray), expected)
    _assert_same(predictor(gray[:, :, None]), expected)
    _assert_same(predictor(str(gray_path)), expected)


def test_predictor_error_names_the_bad_input(predictor, photo, tmp_path):
    path, rgb = photo
    missing = tmp_path / "missing.png"
    with pytest.raises(DDLDataError, match="missing.png: file does not exist"):
        predictor(str(missing))
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a picture")
    with pytest.raises(DDLDataError, match="broken.jpg: not an image file"):
        predictor([str(path), str(broken)])
    with pytest.raises(ValueError, match=r"input 1: expected a uint8 HxWx3 \(color\), HxW or HxWx1 \(grayscale\) "
                                         r"array, got float32"):
        predictor([rgb, rgb.astype(np.float32)])
    with pytest.raises(ValueError, match=r"input image: expected a uint8 HxWx3 .*\(45, 70, 4\)"):
        predictor(np.zeros((45, 70, 4), dtype=np.uint8))
    with pytest.raises(TypeError, match="input 0: expected a file path.*got int"):
        predictor([7])
    with pytest.raises(ValueError, match="format must be 'RGB' or 'BGR'"):
        predictor(rgb, format="rgb")
