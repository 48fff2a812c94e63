"""benchmarks/bench_dataset_index.py builds its tree within the filesystem's limits."""
import importlib.util
import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_dataset_index.py"


def _load_bench():
    if str(BENCH.parent) not in sys.path:
        sys.path.insert(0, str(BENCH.parent))  # the script imports its neighbour _common
    spec = importlib.util.spec_from_file_location("bench_dataset_index", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hard_linked_tree_rotates_its_templates(tmp_path):
    # --links at 1.2 M entries stopped at ~65,000 with "Too many links" (ext4's cap per inode):
    # every file of one size was a link to one template. Here a cap of 5 links stands in for it.
    bench = _load_bench()
    bench.build_tree(str(tmp_path), 100, links=True, links_per_template=5)
    files = [p for folder in ("real", "fake", "masks") for p in (tmp_path / folder).iterdir()]
    assert len([p for p in files if p.parent.name != "masks"]) == 100
    assert max(os.stat(p).st_nlink for p in files) <= 5 + 1  # the links and the template itself
    names = sorted(p.name for p in (tmp_path / "real").iterdir())
    assert names == sorted(set(names))
