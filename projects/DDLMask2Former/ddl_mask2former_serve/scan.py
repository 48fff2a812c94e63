"""``ddl-mask2former scan FOLDER --model FILE --report OUT``: every image of a folder, with a
progress line and an ETA, into a report folder:

* ``results.jsonl``: one line per file, appended and flushed as each image finishes, so an
  interrupted scan resumes where it stopped (files already in it are skipped);
* ``results.csv``: the same rows, written at the end;
* ``report.html``: self-contained (thumbnails inline), sorted by ``fake_prob``, with the
  threshold and target FPR used and the files that could not be read, with the reason;
* ``thumbnails/``: the overlay of each image (the HTML embeds them; kept for resuming);
* ``scan.json``: what was scanned with which model (a resume with another model is refused).

Memory stays nearly flat over any number of files: the folder is walked as a stream, one image
is in memory at a time, and the report keeps a sort key and a file offset per image (about 100
bytes), reading each record back from results.jsonl as it writes its row.
"""
import base64
import csv
import hashlib
import html
import json
import os
import time
from datetime import datetime, timezone
from typing import Dict, Iterator, List, Optional

from .images import IMAGE_EXTENSIONS, ImageLimits, ImageReadError, load_image
from .overlay import encode_image, thumbnail
from .progress import Progress
from .runtime import ExportedModel, forged_fraction, to_plain

__all__ = ["iter_images", "scan_folder", "write_report", "ScanError"]

RESULTS = "results.jsonl"
CSV_NAME = "results.csv"
HTML_NAME = "report.html"
THUMBNAILS = "thumbnails"
STATE = "scan.json"
CSV_COLUMNS = ["file", "status", "verdict", "fake_prob", "is_fake", "forged_fraction", "width", "height",
               "seconds", "error"]


class ScanError(RuntimeError):
    """A scan that cannot start: bad folder, report folder of another scan."""


def iter_images(folder: str) -> Iterator[str]:
    """Paths of the images under ``folder`` (JPEG, PNG, WebP, TIFF by extension, any case), relative
    to it, in sorted order per folder; hidden files and folders are skipped."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.relpath(os.path.join(root, name), folder)


def _model_identity(model: ExportedModel) -> Dict:
    stat = os.stat(model.path)
    settings = json.dumps(model.settings, sort_keys=True).encode()
    return {"model": os.path.abspath(model.path), "model_bytes": stat.st_size,
            "model_mtime": int(stat.st_mtime), "settings_sha256": hashlib.sha256(settings).hexdigest()}


def _read_done(results_path: str) -> set:
    """Files already in a results.jsonl; a torn last line (killed while writing) is dropped."""
    done = set()
    if not os.path.exists(results_path):
        return done
    good_bytes = 0
    with open(results_path, "rb") as handle:
        for raw in handle:
            try:
                done.add(json.loads(raw)["file"])
                good_bytes += len(raw)
            except (ValueError, KeyError):
                break
    if good_bytes != os.path.getsize(results_path):
        with open(results_path, "r+b") as handle:
            handle.truncate(good_bytes)
    return done


def _thumbnail_name(relative: str) -> str:
    return hashlib.sha1(relative.encode("utf-8", "surrogateescape")).hexdigest()[:20] + ".jpg"


def scan_folder(folder: str, model: ExportedModel, report: str, limits: ImageLimits = ImageLimits(),
                restart: bool = False, progress_stream=None, progress_interval: float = 10.0) -> Dict:
    """Scan ``folder`` into the ``report`` folder (see the module docstring); returns counts
    and the paths written. Raises ``ScanError`` for a folder that does not exist or a report
    folder written with another model (unless ``restart``)."""
    if not os.path.isdir(folder):
        raise ScanError(f"{folder}: not a folder")
    os.makedirs(os.path.join(report, THUMBNAILS), exist_ok=True)
    results_path, state_path = os.path.join(report, RESULTS), os.path.join(report, STATE)
    identity = dict(_model_identity(model), folder=os.path.abspath(folder))
    if restart and os.path.exists(results_path):
        os.remove(results_path)
    if os.path.exists(state_path) and os.path.exists(results_path):
        with open(state_path) as handle:
            previous = json.load(handle)
        changed = [k for k in ("folder", "model", "model_bytes", "model_mtime", "settings_sha256")
                   if previous.get(k) != identity[k]]
        if changed:
            raise ScanError(f"{report}: holds a scan of {previous.get('folder')} with {previous.get('model')} "
                            f"({', '.join(changed)} differ); use another --report folder or --restart")
    with open(state_path, "w") as handle:
        json.dump(dict(identity, started=datetime.now(timezone.utc).isoformat(timespec="seconds")), handle, indent=2)
    done = _read_done(results_path)
    total = sum(1 for _ in iter_images(folder))
    remaining = sum(1 for f in iter_images(folder) if f not in done) if done else total
    progress = Progress(remaining, "scan", stream=progress_stream, interval=progress_interval)
    counts = {"total": total, "resumed": total - remaining, "scanned": 0, "unreadable": 0}
    interrupted = False
    with open(results_path, "a", encoding="utf-8") as results:
        try:
            for relative in iter_images(folder):
                if relative in done:
                    continue
                record = _scan_one(folder, relative, model, report, limits)
                results.write(json.dumps(record) + "\n")
                results.flush()
                counts["scanned"] += 1
                counts["unreadable"] += record["status"] != "ok"
                progress.update(1, note=relative[-60:])
        except KeyboardInterrupt:
            interrupted = True
        finally:
            progress.close()
    written = write_report(report, model)
    return dict(counts, interrupted=interrupted, **written)


def _scan_one(folder: str, relative: str, model: ExportedModel, report: str, limits: ImageLimits) -> Dict:
    start = time.perf_counter()
    try:
        rgb = load_image(os.path.join(folder, relative), limits=limits)
    except ImageReadError as exc:
        return {"file": relative, "status": "unreadable", "error": exc.problem}
    prediction = to_plain(model.predict(rgb))
    height, width = rgb.shape[:2]
    name = _thumbnail_name(relative)
    with open(os.path.join(report, THUMBNAILS, name), "wb") as handle:
        handle.write(encode_image(thumbnail(rgb, prediction, model.threshold), ".jpg", quality=80))
    record = {"file": relative, "status": "ok", "width": width, "height": height}
    if "fake_prob" in prediction:
        record["fake_prob"] = prediction["fake_prob"]  # exact: the value is_fake compares
        record["is_fake"] = prediction.get("is_fake", prediction["fake_prob"] > model.threshold)
        record["verdict"] = "FAKE" if record["is_fake"] else "REAL"
    if "mask" in prediction:
        record["forged_fraction"] = round(forged_fraction(prediction["mask"]), 6)
    record["thumbnail"] = f"{THUMBNAILS}/{name}"
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def _records_with_offsets(report: str) -> Iterator:
    """(byte offset, record) of each line of results.jsonl."""
    with open(os.path.join(report, RESULTS), "rb") as handle:
        while True:
            offset = handle.tell()
            line = handle.readline()
            if not line:
                return
            yield offset, json.loads(line)


def _record_at(handle, offset: int) -> Dict:
    handle.seek(offset)
    return json.loads(handle.readline())


def _sort_key(record: Dict) -> float:
    return -record.get("fake_prob", record.get("forged_fraction", 0.0))


def write_report(report: str, model: ExportedModel) -> Dict:
    """results.csv and report.html from results.jsonl; returns their paths.

    Memory: a sort key and a byte offset per file (about 100 bytes); each record is read
    back from results.jsonl when its row is written."""
    csv_path, html_path = os.path.join(report, CSV_NAME), os.path.join(report, HTML_NAME)
    ok: List = []
    unreadable: List[int] = []
    counts = {"fake": 0}
    # errors="replace": a file name that is not valid UTF-8 is shown with a replacement mark.
    with open(csv_path, "w", newline="", encoding="utf-8", errors="replace") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for offset, record in _records_with_offsets(report):
            writer.writerow(record)
            if record["status"] == "ok":
                ok.append((_sort_key(record), offset))
                counts["fake"] += bool(record.get("is_fake"))
            else:
                unreadable.append(offset)
    ok.sort()
    with open(html_path, "w", encoding="utf-8", errors="replace") as handle, \
            open(os.path.join(report, RESULTS), "rb") as results:
        _write_html(handle, report, model, [offset for _, offset in ok], unreadable, counts["fake"], results)
    return {"results": os.path.join(report, RESULTS), "csv": csv_path, "html": html_path}


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#1d1d1f;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} .meta{color:#555;margin-bottom:16px;line-height:1.6}
table{border-collapse:collapse;width:100%;background:#fff} th,td{padding:6px 10px;border-bottom:1px solid #e3e3e3;
text-align:left;vertical-align:middle} th{background:#f0f0f0;position:sticky;top:0}
img{max-width:256px;max-height:256px;display:block} .FAKE{color:#fff;background:#c81e1e;padding:2px 8px;border-radius:4px;
font-weight:600} .REAL{color:#fff;background:#1e8c1e;padding:2px 8px;border-radius:4px;font-weight:600}
.num{font-variant-numeric:tabular-nums} .err{color:#a00} code{font-size:13px}
"""


def _write_html(handle, report: str, model: ExportedModel, ok: List[int], unreadable: List[int], fakes: int,
                results) -> None:
    target_fpr = model.target_fpr
    esc = html.escape
    handle.write(f"<!doctype html><html><head><meta charset='utf-8'><title>Forgery scan: "
                 f"{esc(os.path.basename(os.path.abspath(report)))}</title><style>{_STYLE}</style></head><body>")
    with open(os.path.join(report, STATE)) as state_file:
        state = json.load(state_file)
    handle.write("<h1>Forgery scan</h1><div class='meta'>")
    handle.write(f"Folder <code>{esc(state['folder'])}</code><br>Model <code>{esc(state['model'])}</code><br>")
    fpr = "uncalibrated" if target_fpr is None else f"calibrated at a target false-positive rate of {100 * target_fpr:g} % on real images"
    handle.write(f"Verdict FAKE when fake_prob &gt; <b>{model.threshold:.4f}</b> ({fpr})<br>")
    handle.write(f"<b>{len(ok)}</b> images scanned: <b>{fakes}</b> FAKE, <b>{len(ok) - fakes}</b> REAL; "
                 f"<b>{len(unreadable)}</b> could not be read. Written "
                 f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.</div>")
    handle.write("<label><input type='checkbox' id='onlyfake' onchange=\"document.querySelectorAll('tr.real')"
                 ".forEach(r=>r.style.display=this.checked?'none':'')\"> show only FAKE</label>")
    handle.write("<table><thead><tr><th>#</th><th>overlay</th><th>file</th><th>verdict</th><th>fake_prob</th>"
                 "<th>forged area</th><th>size</th></tr></thead><tbody>")
    for rank, offset in enumerate(ok, 1):
        record = _record_at(results, offset)
        thumb_path = os.path.join(report, record["thumbnail"])
        try:
            with open(thumb_path, "rb") as thumb:
                data = base64.b64encode(thumb.read()).decode("ascii")
            image = f"<img alt='overlay' src='data:image/jpeg;base64,{data}'>"
        except OSError:
            image = "<span class='err'>thumbnail missing</span>"
        verdict = record.get("verdict", "")
        fake_prob = f"{record['fake_prob']:.4f}" if "fake_prob" in record else "-"
        area = f"{100 * record['forged_fraction']:.2f} %" if "forged_fraction" in record else "-"
        handle.write(f"<tr class='{'fake' if record.get('is_fake') else 'real'}'><td class='num'>{rank}</td>"
                     f"<td>{image}</td><td><code>{esc(record['file'])}</code></td><td><span class='{verdict}'>{verdict}"
                     f"</span></td><td class='num'>{fake_prob}</td><td class='num'>{area}</td>"
                     f"<td class='num'>{record['width']}x{record['height']}</td></tr>\n")
    handle.write("</tbody></table>")
    handle.write(f"<h2>Could not be read ({len(unreadable)})</h2>")
    if unreadable:
        handle.write("<table><thead><tr><th>file</th><th>reason</th></tr></thead><tbody>")
        for offset in unreadable:
            record = _record_at(results, offset)
            handle.write(f"<tr><td><code>{esc(record['file'])}</code></td><td class='err'>{esc(record['error'])}</td></tr>\n")
        handle.write("</tbody></table>")
    else:
        handle.write("<p>None.</p>")
    handle.write("</body></html>\n")


def summarize(result: Dict, report: Optional[str] = None) -> str:
    """The lines a scan prints at its end."""
    lines = []
    if result["interrupted"]:
        lines.append(f"interrupted after {result['scanned']} images; run the same command again to resume")
    lines.append(f"{result['total']} images ({result['resumed']} from an earlier run, {result['scanned']} scanned now, "
                 f"{result['unreadable']} unreadable now)")
    lines.append(f"wrote {result['html']} (report), {result['csv']} and {result['results']}")
    return "\n".join(lines)
