#!/usr/bin/env python
"""Time and peak memory of building the DDL-I index at the release's scale.

    python benchmarks/bench_dataset_index.py --num 1200000
    python benchmarks/bench_dataset_index.py --num 100000 --workers 1,2

Writes a split in DDL layout (real/, fake/, masks/; 83.6% fakes, the DDL-I train ratio) of
small but complete PNG files: zero-valued images of eight different sizes (256x256 to
1024x768), each a few KiB, so sizes really come from the headers and the end-of-file check
really runs. Files are distinct (one inode each), as in the release; ``--links`` hard-links
one file per size instead (fast to create, little disk, but every open hits one of a few inodes;
a fresh copy of a template starts every 60,000 links, under ext4's 65,000 per inode).

Each measurement runs in a fresh Python process and reports wall seconds, CPU seconds (user +
system, header-reader processes included; less sensitive to other jobs on a shared machine
than wall time) and peak RSS (including the ~0.7 GB of importing torch and detectron2, which
training pays anyway):

* ``index``: load_ddl_split without cache, once per --workers value;
* ``cache build`` / ``cache load``: first and second load with an index cache;
* ``d2 serialize``: the index followed by detectron2's DatasetFromList(serialize=True),
  which is what the training loader does with the dicts next.

The page cache is warm after writing the tree (dropping it needs root and disturbs other
users); on a cold disk the first index is bounded by file-open latency instead.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from _common import require_package

require_package()

SIZES = ((256, 256), (384, 512), (512, 512), (512, 640), (600, 800), (720, 720),
         (768, 1024), (1024, 768))
FAKE_FRACTION = 798831 / (798831 + 156100)


def _png_bytes(height, width, channels):
    import cv2
    import numpy as np

    shape = (height, width, channels) if channels > 1 else (height, width)
    ok, encoded = cv2.imencode(".png", np.zeros(shape, np.uint8))
    if not ok:
        raise RuntimeError("OpenCV could not encode a PNG")
    return encoded.tobytes()


# Hard links per template file before a fresh copy starts (ext4 allows 65,000 per inode).
LINKS_PER_TEMPLATE = 60000


def build_tree(split_dir, num, links, links_per_template=LINKS_PER_TEMPLATE):
    """Write ``num`` entries (images; fakes also get a mask); return seconds taken. With
    ``links``, each file is a hard link to a template of its kind and size, and a template that
    has ``links_per_template`` links is replaced by a fresh copy (the filesystem caps links per inode)."""
    images = [_png_bytes(h, w, 3) for h, w in SIZES]
    masks = [_png_bytes(h, w, 1) for h, w in SIZES]
    for folder in ("real", "fake", "masks"):
        os.makedirs(os.path.join(split_dir, folder), exist_ok=True)
    payloads_of = {"img": images, "mask": masks}
    templates = {}  # (kind, size id) -> [template path, links made to it]

    def link(kind, size_id, path):
        template = templates.get((kind, size_id))
        if template is None or template[1] >= links_per_template:
            generation = 0 if template is None else int(template[0].rsplit("_", 1)[1][:-4]) + 1
            template_path = os.path.join(split_dir, f".template_{kind}_{size_id}_{generation}.png")
            with open(template_path, "wb") as handle:
                handle.write(payloads_of[kind][size_id])
            template = templates[(kind, size_id)] = [template_path, 0]
        os.link(template[0], path)
        template[1] += 1

    num_fake = int(round(num * FAKE_FRACTION))
    start = time.perf_counter()
    real_dir = os.path.join(split_dir, "real")
    fake_dir = os.path.join(split_dir, "fake")
    mask_dir = os.path.join(split_dir, "masks")
    for index in range(num):
        size_id = index % len(SIZES)
        name = f"{index:09d}.png"
        # Spread fakes evenly among reals, like a shuffled release.
        is_fake = (index * num_fake) // num != ((index + 1) * num_fake) // num
        targets = [(os.path.join(fake_dir if is_fake else real_dir, name), "img")]
        if is_fake:
            targets.append((os.path.join(mask_dir, name), "mask"))
        for path, kind in targets:
            if links:
                link(kind, size_id, path)
            else:
                with open(path, "wb") as handle:
                    handle.write(payloads_of[kind][size_id])
    return time.perf_counter() - start


def _cpu_seconds():
    """User + system CPU of this process and its finished children (the header readers)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(mode, split_dir, workers, cache_dir):
    """One measurement in this (fresh) process; prints a JSON line."""
    os.environ["DDL_INDEX_WORKERS"] = str(workers)
    from ddl_mask2former.data.ddl_dataset import load_ddl_split

    import_rss = _peak_rss_mb()
    cpu_before = _cpu_seconds()
    start = time.perf_counter()
    dicts = load_ddl_split(split_dir, cache_dir=cache_dir)
    seconds = time.perf_counter() - start
    result = {"mode": mode, "workers": workers, "entries": len(dicts), "seconds": seconds,
              "cpu_seconds": _cpu_seconds() - cpu_before, "import_rss_mb": import_rss}
    if mode == "d2 serialize":
        from detectron2.data.common import DatasetFromList

        start = time.perf_counter()
        dataset = DatasetFromList(dicts, copy=False, serialize=True)
        del dicts
        result["serialize_seconds"] = time.perf_counter() - start
        result["entries"] = len(dataset)
    result["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(result))


def run_child(mode, split_dir, workers, cache_dir):
    command = [sys.executable, os.path.abspath(__file__), "--child", mode, "--split", split_dir,
               "--child-workers", str(workers), "--cache", cache_dir or ""]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr)
        raise SystemExit(f"measurement {mode!r} failed (exit {completed.returncode})")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=1_200_000, help="index entries (images)")
    parser.add_argument("--root", default=None,
                        help="where to write the tree (default: a new folder in $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the tree afterwards")
    parser.add_argument("--links", action="store_true",
                        help="hard-link a few template files instead of writing distinct files")
    parser.add_argument("--workers", default="1,2",
                        help="comma-separated header-reader process counts to time")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--split", help=argparse.SUPPRESS)
    parser.add_argument("--child-workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.split, args.child_workers, args.cache or None)
        return

    root = args.root or tempfile.mkdtemp(prefix="ddl_index_bench_")
    split_dir = os.path.join(root, "train")
    if os.path.isdir(split_dir):
        print(f"reusing the tree in {split_dir}")
        build_seconds = None
    else:
        build_seconds = build_tree(split_dir, args.num, args.links)
        print(f"wrote {args.num} entries ({'hard links' if args.links else 'distinct files'}) "
              f"under {split_dir} in {build_seconds:.1f} s")
    cache_dir = os.path.join(root, "index_cache")
    print(f"{'measurement':<14} {'workers':>7} {'seconds':>8} {'CPU s':>7} {'peak RSS MB':>12} "
          f"{'after imports MB':>17}", flush=True)
    plan = [("index", int(w)) for w in args.workers.split(",")]
    plan += [("cache build", 1), ("cache load", 1), ("d2 serialize", 1)]
    entries = None
    try:
        for mode, workers in plan:
            r = run_child(mode, split_dir, workers, cache_dir if mode.startswith("cache") else None)
            entries = r["entries"]
            extra = (f"  (then DatasetFromList serialize {r['serialize_seconds']:.1f} s)"
                     if "serialize_seconds" in r else "")
            print(f"{r['mode']:<14} {r['workers']:>7} {r['seconds']:>8.1f} {r['cpu_seconds']:>7.1f} "
                  f"{r['peak_rss_mb']:>12.0f} {r['import_rss_mb']:>17.0f}{extra}", flush=True)
        print(f"DDL index benchmark: {entries} entries, {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f} at the end", flush=True)
    finally:
        if not args.keep:
            print(f"removing {root} ...", flush=True)
            shutil.rmtree(root, ignore_errors=True)
            print(f"removed {root}")


if __name__ == "__main__":
    main()
