#!/usr/bin/env python
"""Write a synthetic dataset in DDL-I layout (stand-in for the real release).

    python datasets/make_synthetic_ddl.py --out datasets/synthetic-ddl \
        --num-train 200 --num-val 50 --num-test 20 --seed 0

Writes OUT/train/{real,fake,masks}/*.png, OUT/val/..., optionally a flat unlabeled OUT/test/
with its answers in OUT/test_answers/, and one manifest_<split>.jsonl per split describing
every image (source, forgery families and region shapes or forgery type, post-processing,
forged fraction). See datasets/README.md.

The varied generator (default) draws every image's families, region shapes and post-processing
chain from the lists given, so a family or chain can be held out of training and evaluated
alone (tools/cross_generator.py):

    python datasets/make_synthetic_ddl.py --out held_out_copy_move --num-train 0 --num-val 100 \
        --families copy_move

The mixed generator draws each image from the varied generator with probability
--varied-share (default 0.5), else from the classic one, and records which in the manifest.
"""
import argparse
import importlib.util
import os
import sys
import time

if importlib.util.find_spec("ddl_mask2former") is None:
    sys.exit("ddl_mask2former is not installed: run `make install` (or `pip install -e .`) first")

from ddl_mask2former.data.synthetic import DIFFICULTIES, generate_ddl_dataset
from ddl_mask2former.data.synthetic_regions import REGION_SHAPES
from ddl_mask2former.data.synthetic_sources import missing_registry_photos, photo_dir
from ddl_mask2former.data.synthetic_varied import FORGERY_FAMILIES, POST_CHAINS, generator_choice_error


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output root (created if missing)")
    parser.add_argument("--num-train", type=int, default=200, help="training images")
    parser.add_argument("--num-val", type=int, default=50, help="validation images")
    parser.add_argument("--num-test", type=int, default=0,
                        help="images in a flat unlabeled test/ folder (answers in test_answers/)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same files")
    parser.add_argument("--fake-fraction", type=float, default=0.5, help="share of fake images")
    parser.add_argument("--min-size", type=int, default=256, help="smallest image side (px)")
    parser.add_argument("--max-size", type=int, default=768, help="largest image side (px)")
    parser.add_argument("--difficulty", default="hard", choices=DIFFICULTIES,
                        help="strength of the forgery traces (datasets/README.md); 'hard' is the "
                             "subtlest")
    parser.add_argument("--generator", default="varied", choices=("varied", "classic", "mixed"),
                        help="'varied': many sources, shapes, families and post-processing chains; "
                             "'classic': ten photographs, ellipses, the FORGERY_TYPES of the first "
                             "generator; 'mixed': each image from one of the two, the varied one "
                             "with probability --varied-share (datasets/README.md)")
    parser.add_argument("--varied-share", type=float, default=None, metavar="P",
                        help="mixed generator: probability that an image comes from the varied "
                             "generator, else from the classic one (default 0.5)")
    parser.add_argument("--families", nargs="+", choices=FORGERY_FAMILIES, default=None,
                        help="forgery families to draw from (varied generator, or the varied share "
                             "of the mixed one; default all)")
    parser.add_argument("--shapes", nargs="+", choices=REGION_SHAPES, default=None,
                        help="region shapes to draw from (varied or mixed generator; default all)")
    parser.add_argument("--chains", nargs="+", choices=POST_CHAINS, default=None,
                        help="post-processing chains to draw from (varied or mixed generator; "
                             "default all)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="processes (the output does not depend on this)")
    parser.add_argument("--val-folder", default="val", choices=("val", "valid"),
                        help="name of the validation folder (the DDL-I release uses 'valid')")
    parser.add_argument("--mask-folder", default="masks", choices=("masks", "mask"),
                        help="name of the mask folder (some DDL-I copies use 'mask')")
    args = parser.parse_args(argv)
    for name in ("num_train", "num_val", "num_test"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if not 8 <= args.min_size <= args.max_size:
        parser.error("need 8 <= --min-size <= --max-size")
    if not 0.0 <= args.fake_fraction <= 1.0:
        parser.error("--fake-fraction must be in [0, 1]")
    given = [f"--{name}" for name in ("families", "shapes", "chains") if getattr(args, name)]
    error = generator_choice_error(args.generator, args.varied_share, given)
    if error:
        parser.error(error)
    if args.generator == "mixed" and args.varied_share is None:
        args.varied_share = 0.5
    return args


def variety_of(args):
    """The ``variety`` argument of generate_ddl_dataset for parsed arguments (None: classic)."""
    if args.generator == "classic":
        return None
    return {"families": args.families, "shapes": args.shapes, "chains": args.chains}


def main(argv=None):
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    start = time.perf_counter()
    summaries = generate_ddl_dataset(
        out, args.num_train, args.num_val, args.num_test, seed=args.seed,
        fake_fraction=args.fake_fraction, min_size=args.min_size, max_size=args.max_size,
        workers=args.workers, val_folder=args.val_folder, mask_folder=args.mask_folder,
        difficulty=args.difficulty, variety=variety_of(args), varied_share=args.varied_share)
    seconds = time.perf_counter() - start
    for summary in summaries:
        kind = "unlabeled" if summary["split"] == "test" else "labeled"
        print(f"wrote {summary['dir']}: {summary['num_images']} {kind} images "
              f"({summary['num_real']} real, {summary['num_fake']} fake); "
              f"manifest {summary['manifest']}")
    if args.generator != "classic" and missing_registry_photos():
        print(f"warning: {len(missing_registry_photos())} source photographs are not installed in "
              f"{photo_dir()} (tools/setup_env.sh unpacks them); the data differ from a full install")
    total = sum(s["num_images"] for s in summaries)
    generator = args.generator if args.generator != "mixed" else f"mixed, varied share {args.varied_share}"
    print(f"synthetic DDL data ({generator}, {args.difficulty}): {total} images under {out} in {seconds:.1f} s "
          f"(seed {args.seed})")


if __name__ == "__main__":
    main()
