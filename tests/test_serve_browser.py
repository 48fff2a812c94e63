"""The web page in a real browser (issue 32): headless Chromium from Debian's packages, driven by
Selenium (no browser download). The server runs in this process on a free port of 127.0.0.1;
the page gets a photograph on each side of the verdict threshold, then the bad files, one by
one, and must show each verdict, the heat map and outline layers, and each error; the server
must keep serving after them.

The screenshots (serve_page.png, serve_page_errors.png) go to $DDL_SCREENSHOT_DIR when set, else
to the test's temporary folder; README "Try it" shows them (docs/images/*.jpg, converted to JPEG).
"""
import json
import os
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from serve_helpers import bad_files, exported_model, photos

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _driver():
    selenium = pytest.importorskip("selenium", reason="selenium is not installed (tools/setup_env.sh installs it)")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("Chromium or chromedriver is not installed (apt-get install chromium chromium-driver; "
                    "tools/setup_env.sh does it as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    del selenium
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1500", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from ddl_mask2former_serve.runtime import ExportedModel
    from ddl_mask2former_serve.server import make_server

    path, _ = exported_model(tmp_path_factory.mktemp("browser"))
    server = make_server(ExportedModel(path, num_threads=1), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _wait(condition, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_page_shows_verdicts_overlays_and_errors(server, tmp_path):
    from selenium.webdriver.common.by import By

    folder = tmp_path / "upload"
    folder.mkdir()
    for name, rgb in photos().items():
        cv2.imwrite(str(folder / f"{name}.png"), rgb[:, :, ::-1])
    bad = bad_files(tmp_path / "bad")
    driver = _driver()
    try:
        driver.get(server.url)
        _wait(lambda: "fake_prob >" in driver.find_element(By.ID, "model").text, 20, "the model's settings")
        upload = driver.find_element(By.ID, "files")
        upload.send_keys("\n".join(str(folder / f"{name}.png") for name in ("real", "fake")))
        _wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".card.done")) == 2, 180, "two verdicts")
        cards = {card.find_element(By.TAG_NAME, "h2").text: card
                 for card in driver.find_elements(By.CSS_SELECTOR, ".card.done")}
        assert set(cards) == {"real.png", "fake.png"}
        for name, verdict in (("real.png", "REAL"), ("fake.png", "FAKE")):
            card = cards[name]
            assert card.find_element(By.CSS_SELECTOR, ".badge").text == verdict
            assert "threshold" in card.text and "forged area" in card.text
            for layer in ("heatmap", "outline"):
                image = card.find_element(By.CSS_SELECTOR, f"img.{layer}")
                _wait(lambda: driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                                    image), 20, f"the {layer} of {name}")
        links = [a.get_attribute("href") for a in cards["fake.png"].find_elements(By.TAG_NAME, "a")]
        mask_url = next(link for link in links if "mask.png" in link)
        mask = cv2.imdecode(np.frombuffer(urllib.request.urlopen(mask_url).read(), np.uint8), 0)
        assert mask.shape == (130, 130)
        result = json.loads(urllib.request.urlopen(next(link for link in links if "result.json" in link)).read())
        assert result["verdict"] == "FAKE" and result["threshold"] == pytest.approx(server.model.threshold)
        screenshot = Path(os.environ.get("DDL_SCREENSHOT_DIR", tmp_path)) / "serve_page.png"
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.execute_script("window.scrollTo(0, 0)")
        assert driver.save_screenshot(str(screenshot)), f"no screenshot written to {screenshot}"

        for card in cards.values():
            slider = card.find_element(By.CSS_SELECTOR, "input.opacity")
            driver.execute_script("arguments[0].value = 25; arguments[0].dispatchEvent(new Event('input'))", slider)
            assert card.find_element(By.CSS_SELECTOR, "img.heatmap").value_of_css_property("opacity") == "0.25"
        expected = {"not_an_image": "not an image file", "truncated": "truncated or corrupt",
                    "empty": "empty file (0 bytes)", "one_pixel": "only 1x1 pixels",
                    "huge": "decompression bomb"}
        for key, reason in expected.items():
            upload.send_keys(str(bad[key]))
            error = _wait(lambda: [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".card.failed .error")
                                   if bad[key].name in e.text], 30, f"the error for {bad[key].name}")
            assert reason in error[0], error
        # Still serving after the bad files; a larger image (6 x 8 tiles of 64 px) shows its tiles' progress.
        large = folder / "large.png"
        cv2.imwrite(str(large), cv2.resize(photos()["real"], (400, 300))[:, :, ::-1])
        upload.send_keys(str(large))
        progress = _wait(lambda: [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".card .status")
                                  if "tile" in e.text], 60, "the tiles' progress of large.png")
        assert progress[0].startswith("running: tile ") and progress[0].endswith(" of 48"), progress
        _wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".card.done")) == 3, 120, "a verdict after the errors")
        assert driver.find_elements(By.CSS_SELECTOR, ".card.done")[0].find_element(By.CSS_SELECTOR, "h2").text == "large.png"
        errors = screenshot.with_name("serve_page_errors.png")
        driver.execute_script("document.querySelector('.card.failed').scrollIntoView()")
        assert driver.save_screenshot(str(errors)), f"no screenshot written to {errors}"
    finally:
        driver.quit()
