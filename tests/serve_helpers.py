"""A tiny exported model for the serving tests: the quickstart Swin config with random weights,
tiled (64 px tiles, overlap 16) with flip, exported to ONNX; its map_max verdict's threshold is
set halfway between the scores of two photographs, so that ``PHOTOS["fake"]`` is called FAKE and
``PHOTOS["real"]`` REAL (the names say which side of the threshold they fall on, nothing more).

Exports are cached per test session (one per settings), because exporting takes ~15 s.
"""
from pathlib import Path

import numpy as np

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart" /
                 "ddl_mask2former_quickstart_swin.yaml")
TILE_OPTS = ["TEST.TILE.ENABLED", "True", "TEST.TILE.SIZE", "64", "TEST.TILE.OVERLAP", "16",
             "TEST.TILE.BATCH_SIZE", "4", "TEST.AUG.ENABLED", "True"]
MASK_TOLERANCE = 1e-4
FAKE_PROB_TOLERANCE = 1e-5

_EXPORTS = {}


def photos():
    """Two photographs from scikit-image at sizes that are not multiples of 32 (uint8 RGB)."""
    import cv2
    from skimage import data

    return {"real": cv2.resize(data.coffee(), (150, 100), interpolation=cv2.INTER_AREA),
            "fake": cv2.resize(data.astronaut(), (130, 130), interpolation=cv2.INTER_AREA)}


def exported_model(folder: Path, *opts):
    """(onnx path, the PyTorch ``ForgeryPredictor`` it was exported from), cached per ``opts``."""
    key = tuple(opts)
    if key in _EXPORTS:
        return _EXPORTS[key]
    import torch
    from detectron2.modeling import build_model

    from ddl_mask2former.config import load_config
    from ddl_mask2former.deploy import export_model
    from ddl_mask2former.predictor import ForgeryPredictor

    folder = Path(folder) / f"export{len(_EXPORTS)}"
    folder.mkdir(parents=True, exist_ok=True)
    # map_max, the verdict calibrated by hand below (the config's rule is fusion)
    cfg = load_config(QUICKSTART, ["MODEL.DEVICE", "cpu", "MODEL.DDL.VERDICT.RULE", "map_max", *TILE_OPTS, *opts])
    torch.manual_seed(0)
    weights = folder / "model.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    cfg.defrost()
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.freeze()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        predictor = ForgeryPredictor(cfg)
        verdict = predictor.model.verdict
        verdict.set_calibration("map_max", {"map_max": 1.0}, 0.0, 0.5, 0.05)
        images = photos()
        real, fake = (predictor(images[name])["fake_prob"] for name in ("real", "fake"))
        if real > fake:  # scale the map_max odds so that "fake" scores higher
            verdict.set_calibration("map_max", {"map_max": -1.0}, 0.0, 0.5, 0.05)
            real, fake = 1.0 - real, 1.0 - fake
        assert fake - real > 1e-3, f"test photographs too close to split: {real} {fake}"
        verdict.set_calibration("map_max", dict(verdict.describe()["features"]), 0.0, 0.5 * (real + fake), 0.05)
        path = folder / "model.onnx"
        export_model(predictor.model, cfg, "onnx", path)
    finally:
        torch.set_num_threads(previous)
    _EXPORTS[key] = (path, predictor)
    return _EXPORTS[key]


def bad_files(folder: Path):
    """name -> path of files a server or scan must refuse, each with its own reason."""
    import struct
    import zlib

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    files["not_an_image"] = folder / "notes.png"
    files["not_an_image"].write_text("this is text, not a picture\n")
    files["empty"] = folder / "empty.jpg"
    files["empty"].write_bytes(b"")
    import cv2

    ok, jpeg = cv2.imencode(".jpg", np.full((64, 64, 3), 128, np.uint8))
    files["truncated"] = folder / "truncated.jpg"
    files["truncated"].write_bytes(jpeg.tobytes()[: len(jpeg) // 2])
    files["one_pixel"] = folder / "one_pixel.png"
    cv2.imwrite(str(files["one_pixel"]), np.zeros((1, 1, 3), np.uint8))

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    # A 30,000 x 30,000 PNG header with no pixel data: the size alone must get it refused.
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    files["huge"] = folder / "huge.png"
    files["huge"].write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                              + chunk(b"IEND", b""))
    return files
