#!/usr/bin/env python3
"""Re-tag PyPI's ``sal-detectron2`` cp310 wheel as a pure-Python ``py3-none-any`` wheel.

Why: detectron2's authors publish no wheel; ``sal-detectron2==0.7.2`` repackages upstream's
sources but only for CPython 3.10, with a compiled ``_C`` this project never uses (upstream
guards every ``_C`` import) and a stray top-level ``tools`` package that would shadow ours.
This script drops both, drops the ``Requires-Dist`` lines (its ``numpy<2`` pin is wrong for the
sources; requirements/base.txt lists the real dependencies) and writes a wheel any CPython >= 3.8
installs. See ../shared/docs/ENVIRONMENT.md in the project's shared folder for the checks behind it.

Usage: repack_detectron2_wheel.py WHEEL OUT_DIR   (prints the path of the new wheel)
"""
import base64
import hashlib
import sys
import zipfile
from pathlib import Path

DROPPED_PREFIXES = ("tools/",)


def _is_dropped(name):
    return name.startswith(DROPPED_PREFIXES) or (
        name.startswith("detectron2/_C.") and name.endswith(".so")
    )


def _record_line(name, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _fix_metadata(text):
    return "".join(
        line for line in text.splitlines(keepends=True) if not line.startswith("Requires-Dist:")
    )


def repack(src, out_dir):
    src = Path(src)
    with zipfile.ZipFile(src) as zin:
        names = zin.namelist()
        dist_info = next((n.split("/")[0] for n in names if n.endswith(".dist-info/WHEEL")), None)
        if dist_info is None:
            raise SystemExit(f"{src}: not a wheel (no *.dist-info/WHEEL inside)")
        dist, version = dist_info[: -len(".dist-info")].rsplit("-", 1)
        out = Path(out_dir) / f"{dist}-{version}-py3-none-any.whl"
        records = []
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
            for name in names:
                if _is_dropped(name) or name == f"{dist_info}/RECORD":
                    continue
                data = zin.read(name)
                if name == f"{dist_info}/WHEEL":
                    data = (
                        "Wheel-Version: 1.0\nGenerator: ddl-mask2former repack\n"
                        "Root-Is-Purelib: true\nTag: py3-none-any\n"
                    ).encode()
                elif name == f"{dist_info}/top_level.txt":
                    data = b"detectron2\n"
                elif name == f"{dist_info}/METADATA":
                    data = _fix_metadata(data.decode("utf-8")).encode("utf-8")
                zout.writestr(name, data)
                records.append(_record_line(name, data))
            records.append(f"{dist_info}/RECORD,,")
            zout.writestr(f"{dist_info}/RECORD", "\n".join(records) + "\n")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(repack(sys.argv[1], sys.argv[2]))
