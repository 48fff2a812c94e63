"""``ddl-mask2former serve --model FILE``: a local web page for checking images one by one.

Python's own ``http.server`` (threads per request) and one page (``page.html``); no web
framework, so serving stays as light as the runtime. Uploads go to ``POST /api/jobs`` as the raw
file bytes; one worker thread predicts them in turn (so memory holds one image at a time) and
reports each network call (tile) done, which the page polls as a progress bar.

Limits: the upload's bytes (checked from Content-Length before reading), the decoded pixels
(checked from the header before decoding: decompression bombs never expand) and the smallest
side. A bad file gets an error that names it, and the server goes on with the next request.
Binds to 127.0.0.1 unless told otherwise.
"""
import itertools
import json
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Optional
from urllib.parse import unquote

import numpy as np

from .images import ImageLimits, ImageReadError, human_bytes, load_image
from .overlay import encode_image, heat_map_rgb, outline_rgba, shrink
from .runtime import ExportedModel, forged_fraction, to_plain

__all__ = ["ForgeryServer", "make_server"]

logger = logging.getLogger(__name__)

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
# Longest side of the pictures the page shows (the mask download is at full size).
PREVIEW_SIDE = 1600
# Finished jobs kept for the page and its downloads (oldest dropped first).
KEEP_JOBS = 32
QUEUE_SIZE = 8


class Job:
    def __init__(self, job_id: str, name: str, rgb: np.ndarray, units: int):
        self.id = job_id
        self.name = name
        self.rgb: Optional[np.ndarray] = rgb
        self.state = "queued"
        self.done, self.total = 0, units
        self.error: Optional[str] = None
        self.result: Optional[Dict] = None
        self.files: Dict[str, bytes] = {}
        self.created = time.time()

    def status(self) -> Dict:
        status = {"id": self.id, "name": self.name, "state": self.state, "done": self.done, "total": self.total}
        if self.error:
            status["error"] = self.error
        if self.result is not None:
            status["result"] = self.result
        return status


class ForgeryServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, model: ExportedModel, limits: ImageLimits):
        super().__init__(address, _Handler)
        self.model = model
        self.limits = limits
        self.jobs: "OrderedDict[str, Job]" = OrderedDict()
        self.jobs_lock = threading.Lock()
        self.queue: "queue.Queue[Job]" = queue.Queue(maxsize=QUEUE_SIZE)
        self._ids = itertools.count(1)
        with open(PAGE, encoding="utf-8") as handle:
            self.page = handle.read().encode("utf-8")
        self.worker = threading.Thread(target=self._work, name="predict", daemon=True)
        self.worker.start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def info(self) -> Dict:
        return {"model": os.path.basename(self.model.path), "threshold": self.model.threshold,
                "target_fpr": self.model.target_fpr, "max_bytes": self.limits.max_bytes,
                "max_pixels": self.limits.max_pixels, "min_side": self.limits.min_side,
                "tasks": list(self.model.tasks)}

    def submit(self, name: str, data: bytes) -> Job:
        rgb = load_image(data, name=name, limits=self.limits)
        job = Job(f"{next(self._ids)}-{os.urandom(4).hex()}", name, rgb, self.model.work_units(*rgb.shape[:2]))
        with self.jobs_lock:
            self.jobs[job.id] = job
            while len(self.jobs) > KEEP_JOBS:
                self.jobs.popitem(last=False)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            with self.jobs_lock:
                self.jobs.pop(job.id, None)
            raise ImageReadError(name, f"the server is busy ({QUEUE_SIZE} images waiting); try again shortly")
        return job

    def job(self, job_id: str) -> Optional[Job]:
        with self.jobs_lock:
            return self.jobs.get(job_id)

    def _work(self):
        while True:
            job = self.queue.get()
            try:
                job.state = "running"
                self._predict(job)
                job.state = "done"
            except Exception as exc:  # a failure of one image must not stop the worker
                logger.exception("%s: prediction failed", job.name)
                job.error, job.state = f"{job.name}: prediction failed ({type(exc).__name__}: {exc})", "error"
            finally:
                job.rgb = None
                self.queue.task_done()

    def _predict(self, job: Job):
        model, rgb = self.model, job.rgb

        def progress(done, total):
            job.done, job.total = done, total

        start = time.perf_counter()
        prediction = to_plain(model.predict(rgb, progress))
        seconds = time.perf_counter() - start
        height, width = rgb.shape[:2]
        result = {"file": job.name, "width": width, "height": height, "threshold": model.threshold,
                  "target_fpr": model.target_fpr, "seconds": round(seconds, 3), "model": os.path.basename(model.path)}
        preview = shrink(rgb, PREVIEW_SIDE)
        job.files["image.jpg"] = encode_image(preview, ".jpg", quality=90)
        if "fake_prob" in prediction:
            result["fake_prob"] = prediction["fake_prob"]
            result["is_fake"] = prediction.get("is_fake", prediction["fake_prob"] > model.threshold)
            result["verdict"] = "FAKE" if result["is_fake"] else "REAL"
        if "mask" in prediction:
            mask = prediction["mask"]
            result["forged_fraction"] = forged_fraction(mask)
            small_prob = shrink(prediction["mask_prob"], PREVIEW_SIDE)
            job.files["heatmap.png"] = encode_image(heat_map_rgb(small_prob))
            job.files["outline.png"] = encode_image(outline_rgba(small_prob > 0.5))
            job.files["mask.png"] = encode_image(mask.astype(np.uint8) * 255)
        job.files["result.json"] = (json.dumps(result, indent=2) + "\n").encode()
        job.result = result


class _Handler(BaseHTTPRequestHandler):
    server: ForgeryServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # requests are logged at debug level, not on stderr
        logger.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, headers: Optional[Dict] = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: Dict):
        self._send(status, json.dumps(payload).encode(), "application/json")

    def do_GET(self):
        try:
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                return self._send(200, self.server.page, "text/html; charset=utf-8")
            if path == "/api/info":
                return self._json(200, self.server.info())
            parts = path.strip("/").split("/")
            if len(parts) in (3, 4) and parts[:2] == ["api", "jobs"]:
                job = self.server.job(parts[2])
                if job is None:
                    return self._json(404, {"error": f"no job {parts[2]} (finished jobs are kept for the last "
                                                     f"{KEEP_JOBS} images)"})
                if len(parts) == 3:
                    return self._json(200, job.status())
                data = job.files.get(parts[3])
                if data is None:
                    return self._json(404, {"error": f"{job.name}: no {parts[3]} (yet)"})
                types = {".jpg": "image/jpeg", ".png": "image/png", ".json": "application/json"}
                content_type = types[os.path.splitext(parts[3])[1]]
                stem = os.path.splitext(os.path.basename(job.name))[0] or "image"
                disposition = {"Content-Disposition": f'attachment; filename="{_safe(stem)}_{parts[3]}"'} \
                    if "download" in self.path else None
                return self._send(200, data, content_type, disposition)
            return self._json(404, {"error": f"nothing at {path}"})
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self):
        try:
            if self.path.split("?", 1)[0] != "/api/jobs":
                return self._json(404, {"error": f"nothing to post at {self.path}"})
            name = unquote(self.headers.get("X-Filename", "upload")) or "upload"
            length = self.headers.get("Content-Length")
            if length is None:
                self.close_connection = True
                return self._json(411, {"error": f"{name}: the upload has no Content-Length"})
            length = int(length)
            limit = self.server.limits.max_bytes
            if limit is not None and length > limit:
                # Not read: the connection closes instead.
                self.close_connection = True
                return self._json(413, {"error": f"{name}: file is {human_bytes(length)}, over the limit of "
                                                 f"{human_bytes(limit)}"})
            data = self.rfile.read(length)
            try:
                job = self.server.submit(name, data)
            except ImageReadError as exc:
                return self._json(400, {"error": str(exc)})
            except ValueError as exc:
                return self._json(400, {"error": f"{name}: {exc}"})
            return self._json(202, job.status())
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # keep serving whatever one request did
            logger.exception("POST %s failed", self.path)
            self._json(500, {"error": f"server error: {type(exc).__name__}: {exc}"})


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]


def make_server(model: ExportedModel, host: str = "127.0.0.1", port: int = 8765,
                limits: ImageLimits = ImageLimits()) -> ForgeryServer:
    """A ``ForgeryServer`` bound to ``host:port`` (port 0: any free port); call ``serve_forever``."""
    return ForgeryServer((host, port), model, limits)
