"""``ddl-mask2former``: check images with an exported model (no torch, no detectron2).

  ddl-mask2former predict IMAGE... --model model.onnx [--output results.jsonl] [--masks DIR]
  ddl-mask2former scan FOLDER --model model.onnx --report OUT [--restart]
  ddl-mask2former serve --model model.onnx [--host 127.0.0.1] [--port 8765]

``model.onnx`` is a file of tools/export_model.py, with its settings JSON beside it. Exit status:
0 when every image was read, 1 when some could not be (they are reported), 2 for a usage error
(bad model file, missing folder).
"""
import argparse
import json
import os
import sys
from typing import List, Optional

from . import __version__
from .images import ImageLimits, ImageReadError, load_image
from .progress import Progress
from .runtime import ExportedModel, ExportedModelError, forged_fraction, to_plain

__all__ = ["main"]


def _limits(args) -> ImageLimits:
    return ImageLimits(max_bytes=int(args.max_mib * 2**20) if args.max_mib > 0 else None,
                       max_pixels=int(args.max_megapixels * 1e6) if args.max_megapixels > 0 else None,
                       min_side=args.min_side)


def _add_common(parser):
    parser.add_argument("--model", required=True, help="exported .onnx file (its .onnx.json beside it)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its choice)")
    parser.add_argument("--max-mib", type=float, default=50, help="largest file read, MiB (0: no limit; default 50)")
    parser.add_argument("--max-megapixels", type=float, default=40,
                        help="largest decoded image, megapixels, checked before decoding (0: no limit; default 40)")
    parser.add_argument("--min-side", type=int, default=16, help="smallest image side in pixels (default 16)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddl-mask2former", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="one JSON line per image")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--output", default="-", help="JSON lines file (default: standard output)")
    predict.add_argument("--masks", default=None, help="also write each forgery mask as DIR/<name>_mask.png")
    _add_common(predict)
    scan = commands.add_parser("scan", help="a whole folder, with a CSV/JSONL and an HTML report; resumable")
    scan.add_argument("folder")
    scan.add_argument("--report", required=True, help="report folder (results.jsonl, results.csv, report.html)")
    scan.add_argument("--restart", action="store_true", help="start over instead of resuming the report folder")
    scan.add_argument("--progress-interval", type=float, default=10.0,
                      help="seconds between progress lines when stderr is not a terminal (default 10)")
    _add_common(scan)
    serve = commands.add_parser("serve", help="a local web page to drop images on")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port)")
    _add_common(serve)
    return parser


def _load_model(args) -> ExportedModel:
    return ExportedModel(args.model, num_threads=args.threads)


def _predict(args, model: ExportedModel) -> int:
    limits = _limits(args)
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    if args.masks:
        os.makedirs(args.masks, exist_ok=True)
    failed = 0
    # Several images: a progress line with an ETA on stderr (JSON lines stay alone on stdout).
    progress = Progress(len(args.images), "predict") if len(args.images) > 1 else None
    try:
        for path in args.images:
            record = {"file": path}
            try:
                rgb = load_image(path, limits=limits)
            except ImageReadError as exc:
                failed += 1
                record["error"] = exc.problem
                print(f"{exc}", file=sys.stderr)
                out.write(json.dumps(record) + "\n")
                if progress is not None:
                    progress.update(1, note=os.path.basename(path))
                continue
            prediction = to_plain(model.predict(rgb))
            record.update(height=rgb.shape[0], width=rgb.shape[1])
            if "fake_prob" in prediction:
                # the float64 value is_fake compares, written exactly (rounded, it could cross the threshold)
                record.update(fake_prob=prediction["fake_prob"],
                              is_fake=prediction.get("is_fake", prediction["fake_prob"] > model.threshold))
                record["verdict"] = "FAKE" if record["is_fake"] else "REAL"
            record.update(threshold=model.threshold, target_fpr=model.target_fpr)
            if "mask" in prediction:
                record["forged_fraction"] = round(forged_fraction(prediction["mask"]), 6)
                if args.masks:
                    from .overlay import encode_image

                    stem = os.path.splitext(os.path.basename(path))[0]
                    mask_path = os.path.join(args.masks, f"{stem}_mask.png")
                    with open(mask_path, "wb") as handle:
                        handle.write(encode_image(prediction["mask"].astype("uint8") * 255))
                    record["mask_png"] = mask_path
            out.write(json.dumps(record) + "\n")
            out.flush()
            if progress is not None:
                progress.update(1, note=os.path.basename(path))
    finally:
        if progress is not None:
            progress.close()
        if out is not sys.stdout:
            out.close()
    where = "standard output" if args.output == "-" else args.output
    masks = f", masks in {args.masks}" if args.masks else ""
    print(f"{len(args.images) - failed} of {len(args.images)} images predicted; JSON lines on {where}{masks}",
          file=sys.stderr)
    return 1 if failed else 0


def _scan(args, model: ExportedModel) -> int:
    from .scan import ScanError, scan_folder, summarize

    try:
        result = scan_folder(args.folder, model, args.report, _limits(args), restart=args.restart,
                             progress_interval=args.progress_interval)
    except ScanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summarize(result), file=sys.stderr)
    if result["interrupted"]:
        return 130
    return 1 if result["unreadable"] else 0


def _serve(args, model: ExportedModel) -> int:
    from .server import make_server

    try:
        server = make_server(model, args.host, args.port, _limits(args))
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port} ({exc})", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach this machine can upload images",
              file=sys.stderr)
    print(f"serving {model.path} at {server.url} (Ctrl+C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model = _load_model(args)
    except (FileNotFoundError, ExportedModelError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return {"predict": _predict, "scan": _scan, "serve": _serve}[args.command](args, model)


if __name__ == "__main__":
    sys.exit(main())
