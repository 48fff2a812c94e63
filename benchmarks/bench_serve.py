#!/usr/bin/env python
"""Serving without torch (issue 32): what `pip install ddl-mask2former[serve]` installs, how long
its import takes, the peak memory of a 1 MP prediction, and its latency against the PyTorch
predictor, side by side in one process.

The paper's Swin-T model (configs/ddl-i/ddl_mask2former_swin_tiny.yaml) with random weights is
exported to ONNX once (plain settings, and the same graph with TEST.TILE 512 px / overlap 64
settings, as bench_deploy.py), then:

* install size: the serving environment's site-packages (``--serve-python``, a venv holding only
  ``pip install ddl-mask2former[serve]``), by package, beside torch's own folder here;
* import time and RSS after import, median of ``--import-runs`` fresh processes:
  ``from ddl_mask2former_serve import ExportedModel`` in the serving venv, and
  ``from ddl_mask2former.deploy import ExportedModel`` here (the training stack);
* peak RSS (VmHWM) of one process that loads the model and predicts one 1000x1000 image:
  serving venv (ExportedPredictor) vs here (ForgeryPredictor, PyTorch), plain and tiled;
* latency, interleaved in this process, 1 thread each: the PyTorch predictor vs the serving
  runtime (ExportedPredictor, the same code the serving venv runs) at 512x512 and on the tiled
  1 MP image. Wall and CPU medians, ratios to PyTorch (goal: <= 0.8x).

``--scan-files 1000 10000`` measures only the folder scan's own peak RSS (VmHWM) over folders of
that many small PNGs, with a stand-in network, in the serving venv (about a minute for 10,000).

Usage: python benchmarks/bench_serve.py --serve-python /tmp/serve-venv/bin/python [--runs 3] [--warmup 1]
       [--threads 1] [--import-runs 5] [--out-dir DIR] [--json F] [--scan-files N ...]
Takes about 10-15 minutes on the 2-core dev machine.
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile

if importlib.util.find_spec("ddl_mask2former") is None:
    sys.exit("ddl_mask2former is not installed: run `make install` (or `pip install -e .`) first")
from ddl_mask2former import ForgeryPredictor  # noqa: E402  (first: hides detectron2's import warning)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ddl_mask2former.config import load_config  # noqa: E402
from ddl_mask2former.deploy import export_model, metadata_path  # noqa: E402
from ddl_mask2former.deploy.export import build_metadata  # noqa: E402
from ddl_mask2former_serve import ExportedPredictor  # noqa: E402

from _common import PAPER_CONFIG, TILE_OPTS_1MP, interleaved_timing, latency_report, write_json  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = str(PAPER_CONFIG)
TILE_OPTS = TILE_OPTS_1MP
# Peak RSS of the calling process's own address space (VmHWM resets at exec; getrusage's
# ru_maxrss does not, so a child started from this big process would report this one's).
PEAK_RSS = """
def peak_rss_mib():
    with open('/proc/self/status') as status:
        for line in status:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 1024
"""
VENV_OWN = {"pip", "setuptools", "_distutils_hack", "pkg_resources", "distutils-precedence.pth", "__pycache__"}

SERVE_IMPORT = PEAK_RSS + """
import time
start = time.perf_counter()
from ddl_mask2former_serve import ExportedModel
seconds = time.perf_counter() - start
import json, sys
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'detectron2', 'cv2'))
print(json.dumps({"seconds": seconds, "rss_mib": peak_rss_mib(),
                  "heavy_modules": heavy}))
"""
TORCH_IMPORT = PEAK_RSS + """
import time, warnings
warnings.simplefilter("ignore")
start = time.perf_counter()
from ddl_mask2former.deploy import ExportedModel
seconds = time.perf_counter() - start
import json
print(json.dumps({"seconds": seconds, "rss_mib": peak_rss_mib()}))
"""
# The end of both peak scripts: the RSS once the predictor is loaded, then one 1 MP image.
PREDICT_ONE_MEGAPIXEL = """
loaded = peak_rss_mib()
image = np.random.default_rng(1).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
start = time.perf_counter()
predictor(image)
print(json.dumps({"loaded_rss_mib": loaded, "peak_rss_mib": peak_rss_mib(),
                  "seconds": time.perf_counter() - start}))
"""
SERVE_PEAK = PEAK_RSS + """
import json, sys, time
import numpy as np
from ddl_mask2former_serve import ExportedPredictor
model, threads = sys.argv[1], int(sys.argv[2])
predictor = ExportedPredictor(model, num_threads=threads)
""" + PREDICT_ONE_MEGAPIXEL
TORCH_PEAK = PEAK_RSS + """
import json, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np
import torch
from ddl_mask2former import ForgeryPredictor
from ddl_mask2former.config import load_config
config, weights, threads, tiled = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "tiled"
torch.set_num_threads(threads)
opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", weights] + (%r if tiled else [])
predictor = ForgeryPredictor(load_config(config, opts))
""" % (TILE_OPTS,) + PREDICT_ONE_MEGAPIXEL


SCAN_MEMORY = PEAK_RSS + """
import json, os, sys, tempfile, time
import numpy as np
from PIL import Image
from ddl_mask2former_serve import scan

count = int(sys.argv[1])


class ConstantNetwork:
    # Stands in for the network (its cost is the model's, measured above): what is measured is
    # the scan itself: walking, decoding, thumbnails, the JSONL, the CSV and the HTML report.
    threshold, target_fpr, settings = 0.5, 0.05, {"stand-in": True}

    def __init__(self, path):
        self.path = path

    def predict(self, rgb, progress=None):
        prob = np.full(rgb.shape[:2], 0.2, np.float32)
        return {"fake_prob": np.float32(0.3), "is_fake": False, "mask_prob": prob}


with tempfile.TemporaryDirectory() as folder:
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(os.path.join(folder, "seed.png"))
    data = open(os.path.join(folder, "seed.png"), "rb").read()
    os.makedirs(os.path.join(folder, "images"))
    for index in range(count):
        with open(os.path.join(folder, "images", f"{index // 1000:02d}_{index:06d}.png"), "wb") as handle:
            handle.write(data)
    stub = os.path.join(folder, "stub.onnx")
    open(stub, "wb").close()
    before = peak_rss_mib()
    start = time.perf_counter()
    result = scan.scan_folder(os.path.join(folder, "images"), ConstantNetwork(stub), os.path.join(folder, "report"),
                              progress_interval=1e9)
    seconds = time.perf_counter() - start
    html_mib = os.path.getsize(result["html"]) / 2**20
print(json.dumps({"files": count, "scanned": result["scanned"], "rss_before_mib": before, "peak_rss_mib": peak_rss_mib(),
                  "seconds": seconds, "html_mib": html_mib}))
"""


def scan_memory(serve_python, counts):
    rows = {}
    print("scan of N 64x64 PNG files with a stand-in network (the scan's own memory): peak RSS (VmHWM)")
    for count in counts:
        rows[count] = _child(serve_python, SCAN_MEMORY, count)
        row = rows[count]
        print(f"  {count:>6} files: peak {row['peak_rss_mib']:.1f} MiB (before the scan {row['rss_before_mib']:.1f}), "
              f"{row['seconds']:.1f} s, report.html {row['html_mib']:.1f} MiB", flush=True)
    return rows


def _du_mib(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                total += os.path.getsize(full)
    return total / 2**20 if os.path.isdir(path) else os.path.getsize(path) / 2**20


def install_size(serve_python):
    purelib = subprocess.run([serve_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    by_entry = {name: _du_mib(os.path.join(purelib, name)) for name in os.listdir(purelib)}
    serving = {k: v for k, v in by_entry.items() if k not in VENV_OWN}
    torch_dir = os.path.dirname(torch.__file__)
    print(f"install size: {purelib}")
    for name, mib in sorted(serving.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {name:<40} {mib:8.1f} MiB")
    total = sum(serving.values())
    print(f"  total without the venv's own pip/setuptools: {total:.1f} MiB (with them: {sum(by_entry.values()):.1f}); "
          f"torch alone here: {_du_mib(torch_dir):.1f} MiB")
    return {"site_packages": purelib, "serving_mib": total, "with_pip_mib": sum(by_entry.values()),
            "torch_mib": _du_mib(torch_dir), "largest": dict(sorted(serving.items(), key=lambda kv: -kv[1])[:8])}


def _child(python, code, *args, env=None):
    result = subprocess.run([python, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{python} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _thread_env(threads):
    return dict(os.environ, OMP_NUM_THREADS=str(threads))


def import_times(serve_python, runs):
    rows = {}
    for name, python, code in (("serving venv: ddl_mask2former_serve", serve_python, SERVE_IMPORT),
                               ("training stack: ddl_mask2former.deploy", sys.executable, TORCH_IMPORT)):
        samples = [_child(python, code) for _ in range(runs)]
        rows[name] = {"seconds": statistics.median(s["seconds"] for s in samples),
                      "rss_mib": statistics.median(s["rss_mib"] for s in samples),
                      "heavy_modules": samples[0].get("heavy_modules")}
        print(f"import, median of {runs}: {name:<42} {rows[name]['seconds']:6.2f} s, RSS {rows[name]['rss_mib']:7.1f} MiB"
              + (f", torch/detectron2/cv2 imported: {rows[name]['heavy_modules']}" if "heavy_modules" in samples[0] else ""))
    return rows


def peak_rss(serve_python, plain_onnx, tiled_onnx, weights, threads):
    rows = {}
    env = _thread_env(threads)
    for mode, onnx_file in (("plain", plain_onnx), ("tiled", tiled_onnx)):
        rows[f"serving, {mode}"] = _child(serve_python, SERVE_PEAK, onnx_file, threads, env=env)
        rows[f"pytorch, {mode}"] = _child(sys.executable, TORCH_PEAK, CONFIG, weights, threads, mode, env=env)
    print("peak RSS, one process: load the model, predict one 1000x1000 image")
    for name, row in rows.items():
        print(f"  {name:<18} after load {row['loaded_rss_mib']:7.1f} MiB, peak {row['peak_rss_mib']:7.1f} MiB, "
              f"prediction {row['seconds']:.1f} s")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--serve-python", required=True, help="python of a venv with only ddl-mask2former[serve]")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--import-runs", type=int, default=5)
    parser.add_argument("--out-dir", default=None, help="where the exported files go (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--scan-files", type=int, nargs="+", default=None,
                        help="only measure the scan's peak RSS over folders of these many files, then stop")
    args = parser.parse_args()
    if args.scan_files:
        rows = scan_memory(args.serve_python, args.scan_files)
        write_json(args.json, {"scan_memory": rows})
        return
    torch.set_num_threads(args.threads)
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="bench_serve_")
    os.makedirs(out_dir, exist_ok=True)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; exported files in {out_dir}", flush=True)
    results = {"threads": args.threads, "load_average_start": os.getloadavg()[0]}
    results["install"] = install_size(args.serve_python)

    cfg = load_config(CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    pytorch = ForgeryPredictor(cfg)
    weights = os.path.join(out_dir, "swin_tiny_random.pth")
    torch.save({"model": pytorch.model.state_dict()}, weights)
    plain_onnx = os.path.join(out_dir, "swin_tiny.onnx")
    export_model(pytorch.model, cfg, "onnx", plain_onnx)
    tiled_cfg = load_config(CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", weights, *TILE_OPTS])
    tiled = ForgeryPredictor(tiled_cfg)
    tiled_onnx = os.path.join(out_dir, "swin_tiny_tiled.onnx")
    if os.path.exists(tiled_onnx):
        os.remove(tiled_onnx)
    os.link(plain_onnx, tiled_onnx)
    with open(metadata_path(tiled_onnx), "w") as handle:
        json.dump(build_metadata(tiled.model, tiled_cfg, "onnx", tiled_onnx, None), handle, indent=2)
    print(f"exported {plain_onnx} ({os.path.getsize(plain_onnx) / 2**20:.1f} MiB) and its tiled settings", flush=True)

    results["import"] = import_times(args.serve_python, args.import_runs)
    results["peak_rss_1mp"] = peak_rss(args.serve_python, plain_onnx, tiled_onnx, weights, args.threads)

    serving = ExportedPredictor(plain_onnx, num_threads=args.threads)
    serving_tiled = ExportedPredictor(tiled_onnx, num_threads=args.threads)
    image = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    wall, cpu = interleaved_timing({"pytorch predictor": lambda: pytorch(image),
                                 "serving runtime (onnxruntime)": lambda: serving(image)}, args.runs, args.warmup)
    results["512"] = latency_report(f"one 512x512 image, {args.runs} interleaved runs after {args.warmup} warm-up",
                                   wall, cpu, "pytorch predictor")
    megapixel = np.random.default_rng(1).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    wall, cpu = interleaved_timing({"pytorch tiled": lambda: tiled(megapixel),
                                 "serving runtime tiled": lambda: serving_tiled(megapixel)}, args.runs, args.warmup)
    results["1mp_tiled"] = latency_report(f"one 1000x1000 image, 512 px tiles overlap 64 (9 tiles), {args.runs} "
                                         f"interleaved runs after {args.warmup} warm-up", wall, cpu, "pytorch tiled")
    results["load_average_end"] = os.getloadavg()[0]
    print(f"serving / PyTorch, CPU-time medians: 512 px {results['512']['serving runtime (onnxruntime)']['cpu_ratio']:.3f}, "
          f"1 MP tiled {results['1mp_tiled']['serving runtime tiled']['cpu_ratio']:.3f} (goal <= 0.8); "
          f"load average {results['load_average_end']:.1f}")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
