"""``ddl-mask2former predict | scan | serve`` (issue 32) on the tiny exported model.

Scan: every readable image in the report, sorted by fake_prob, thumbnails inline, the threshold
and target FPR, the unreadable files with their reasons; an interrupted scan resumes without
redoing finished files (also after a torn last line); a report folder of another model is
refused. Serve (over HTTP on 127.0.0.1, no browser): the limits on bytes and pixels, bad files
answered with a message while the server goes on, progress of a tiled image, the downloads.
"""
import json
import re
import threading
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest

from serve_helpers import bad_files, exported_model, photos

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e .[serve])")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return exported_model(tmp_path_factory.mktemp("cli"))[0]


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    images = photos()
    cv2.imwrite(str(folder / "real.png"), images["real"][:, :, ::-1])
    cv2.imwrite(str(folder / "sub" / "fake.JPG"), images["fake"][:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    cv2.imwrite(str(folder / "sub" / "fake_gray.webp"), images["fake"][:, :, 1])
    cv2.imwrite(str(folder / "real.tiff"), images["real"][:, :, ::-1])
    (folder / "notes.txt").write_text("not scanned: not an image extension")
    bad = bad_files(folder / "bad")
    return folder, bad


def test_predict_writes_json_lines(model_path, folder, tmp_path, capsys):
    from ddl_mask2former_serve.cli import main

    folder, bad = folder
    masks = tmp_path / "masks"
    code = main(["predict", str(folder / "real.png"), str(folder / "sub" / "fake.JPG"), str(bad["truncated"]),
                 "--model", str(model_path), "--masks", str(masks)])
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert code == 1 and [r.get("verdict") for r in records] == ["REAL", "FAKE", None]
    assert records[0]["threshold"] == records[1]["threshold"] and records[0]["target_fpr"] == 0.05
    # The line carries the float64 fake_prob that is_fake compares, unrounded.
    assert all(r["is_fake"] == (r["fake_prob"] > r["threshold"]) for r in records[:2])
    assert "truncated or corrupt" in records[2]["error"] and "truncated.jpg" in captured.err
    assert cv2.imread(records[1]["mask_png"], 0).shape == (130, 130)
    assert f"masks in {masks}" in captured.err and "2 of 3 images predicted" in captured.err
    assert main(["predict", "x.png", "--model", str(tmp_path / "absent.onnx")]) == 2
    assert "exported model not found" in capsys.readouterr().err


def test_scan_report_and_resume(model_path, folder, tmp_path, capsys, monkeypatch):
    from ddl_mask2former_serve import scan
    from ddl_mask2former_serve.cli import main

    folder, bad = folder
    report = tmp_path / "report"
    args = ["scan", str(folder), "--model", str(model_path), "--report", str(report)]
    # Interrupted (Ctrl+C) during the third image: two are kept, the report covers them.
    real_scan_one, calls = scan._scan_one, []

    def interrupt_third(*a, **k):
        calls.append(a[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_scan_one(*a, **k)

    monkeypatch.setattr(scan, "_scan_one", interrupt_third)
    assert main(args) == 130
    assert "interrupted after 2 images; run the same command again to resume" in capsys.readouterr().err
    assert len((report / "results.jsonl").read_text().splitlines()) == 2
    monkeypatch.setattr(scan, "_scan_one", real_scan_one)
    # A torn last line (killed while writing) is dropped and that file redone.
    with open(report / "results.jsonl", "a") as handle:
        handle.write('{"file": "half')
    calls.clear()
    monkeypatch.setattr(scan, "_scan_one", lambda *a, **k: calls.append(a[1]) or real_scan_one(*a, **k))
    assert main(args) == 1  # unreadable files are reported: exit status 1
    err = capsys.readouterr().err
    assert len(calls) == 9 - 2 and "9 images (2 from an earlier run, 7 scanned now" in err
    assert f"wrote {report / 'report.html'}" in err and "ETA" in err
    records = [json.loads(line) for line in (report / "results.jsonl").read_text().splitlines()]
    assert sorted(r["file"] for r in records) == sorted(
        ["real.png", "real.tiff", "sub/fake.JPG", "sub/fake_gray.webp"] + [f"bad/{p.name}" for p in bad.values()])
    reasons = {r["file"]: r["error"] for r in records if r["status"] != "ok"}
    assert "not an image file" in reasons["bad/notes.png"] and "empty file" in reasons["bad/empty.jpg"]
    assert "1x1 pixels" in reasons["bad/one_pixel.png"] and "decompression bomb" in reasons["bad/huge.png"]
    verdicts = {r["file"]: r["verdict"] for r in records if r["status"] == "ok"}
    assert verdicts["real.png"] == "REAL" and verdicts["sub/fake.JPG"] == "FAKE"
    csv_lines = (report / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("file,status,verdict,fake_prob") and len(csv_lines) == 10

    html = (report / "report.html").read_text()
    assert html.count("data:image/jpeg;base64,") == 4  # self-contained: thumbnails inline
    ranked = re.findall(r"<code>([^<]+)</code></td><td><span class='(?:FAKE|REAL)'", html)
    scores = {r["file"]: r["fake_prob"] for r in records if r["status"] == "ok"}
    threshold = exported_model(tmp_path)[1].threshold
    assert all(r["is_fake"] == (r["fake_prob"] > threshold) for r in records if r["status"] == "ok")
    assert ranked == sorted(scores, key=lambda f: -scores[f])
    assert f"fake_prob &gt; <b>{exported_model(tmp_path)[1].threshold:.4f}</b>" in html
    assert "target false-positive rate of 5 %" in html and "Could not be read (5)" in html
    assert "image is only 1x1 pixels" in html

    # Done already: nothing rescanned. Another model's report folder: refused.
    assert main(args) == 0 and "(9 from an earlier run, 0 scanned now" in capsys.readouterr().err
    other = exported_model(tmp_path, "TEST.TILE.OVERLAP", "8")[0]
    assert main(["scan", str(folder), "--model", str(other), "--report", str(report)]) == 2
    assert "use another --report folder or --restart" in capsys.readouterr().err
    assert main(["scan", str(tmp_path / "nowhere"), "--model", str(model_path), "--report", str(report)]) == 2


def test_scan_memory_is_flat_in_the_number_of_files(tmp_path):
    """2,000 files through the scan with a stand-in network: traced memory stays a few MB
    (one short record per file for the sorted report, nothing per image kept)."""
    import tracemalloc

    from ddl_mask2former_serve import scan

    class Constant:
        path = str(tmp_path / "stub.onnx")
        settings = {"stub": True}
        threshold, target_fpr = 0.5, 0.05

        def predict(self, rgb, progress=None):
            prob = np.full(rgb.shape[:2], 0.2, np.float32)
            return {"fake_prob": np.float32(0.3), "is_fake": False, "mask_prob": prob, "mask": prob > 0.5}

    (tmp_path / "stub.onnx").write_bytes(b"")
    folder = tmp_path / "many"
    folder.mkdir()
    ok, png = cv2.imencode(".png", np.full((16, 16, 3), 90, np.uint8))
    for index in range(2000):
        (folder / f"{index:05d}.png").write_bytes(png.tobytes())
    tracemalloc.start()
    result = scan.scan_folder(str(folder), Constant(), str(tmp_path / "report"), progress_interval=1e9)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert result["scanned"] == 2000
    assert peak < 8 * 2**20, f"scan of 2,000 files peaked at {peak / 2**20:.1f} MiB traced"


def _post(url, data, name):
    request = urllib.request.Request(url + "api/jobs", data=data, method="POST",
                                     headers={"X-Filename": name, "Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_server_limits_errors_progress_and_downloads(model_path, folder):
    from ddl_mask2former_serve.images import ImageLimits
    from ddl_mask2former_serve.runtime import ExportedModel
    from ddl_mask2former_serve.server import make_server

    folder, bad = folder
    server = make_server(ExportedModel(model_path, num_threads=1), port=0,
                         limits=ImageLimits(max_bytes=200_000, max_pixels=1_000_000))
    assert server.server_address[0] == "127.0.0.1"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = server.url
        page = urllib.request.urlopen(url).read().decode()
        assert "Drop images here" in page
        info = json.loads(urllib.request.urlopen(url + "api/info").read())
        assert info["max_bytes"] == 200_000 and info["threshold"] == pytest.approx(server.model.threshold)
        status, answer = _post(url, b"\0" * 300_000, "big.png")
        assert status == 413 and "big.png: file is 293 KiB, over the limit of 195 KiB" in answer["error"]
        big = np.random.default_rng(0).integers(0, 256, (1100, 1000, 3), np.uint8)
        status, answer = _post(url, cv2.imencode(".jpg", big[:, :, :1].repeat(3, 2))[1].tobytes()[:190_000],
                               "wide.jpg")
        assert status == 400 and "1000x1100 = 1.1 megapixels, over the limit of 1 megapixels" in answer["error"]
        for key, reason in {"not_an_image": "not an image file", "empty": "empty file", "truncated": "truncated",
                            "one_pixel": "1x1 pixels", "huge": "decompression bomb"}.items():
            status, answer = _post(url, bad[key].read_bytes(), bad[key].name)
            assert status == 400 and answer["error"].startswith(bad[key].name + ": ") and reason in answer["error"]
        # Still serving: a tiled image reports its tiles as it goes, then the result and downloads.
        status, job = _post(url, (folder / "real.png").read_bytes(), "real.png")
        assert status == 202 and job["total"] == 6
        seen = set()
        while job["state"] not in ("done", "error"):
            time.sleep(0.05)
            job = json.loads(urllib.request.urlopen(url + f"api/jobs/{job['id']}").read())
            seen.add(job["done"])
        assert job["state"] == "done" and job["result"]["verdict"] == "REAL" and job["done"] == 6
        mask = cv2.imdecode(np.frombuffer(urllib.request.urlopen(url + f"api/jobs/{job['id']}/mask.png").read(),
                                          np.uint8), 0)
        assert mask.shape == (100, 150) and not mask.any()  # called real: the gate empties the mask
        download = urllib.request.urlopen(url + f"api/jobs/{job['id']}/result.json?download")
        assert 'filename="real_result.json"' in download.headers["Content-Disposition"]
        assert json.loads(download.read())["fake_prob"] == job["result"]["fake_prob"]
    finally:
        server.shutdown()
        server.server_close()
