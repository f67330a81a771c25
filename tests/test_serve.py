"""The server, started for real on 127.0.0.1: concurrent requests, every bad request, and the page in a browser."""

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from captioner import Captioner
from tests.conftest import TESTS

ROOT = TESTS.parent
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    """`python -m captioner serve` on the tiny trained model, with small limits the tests can reach."""
    checkpoint, _ = trained
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    command = [sys.executable, "-m", "captioner", "serve", "--ckpt_path", str(checkpoint), "--port", str(port),
               "--device", "cpu", "--max_batch_size", "8", "--batch_timeout", "0.05", "--max_upload_mb", "1",
               "--max_pixels", "1000000"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, cwd=log.parent,
                                   start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if httpx.get(f"{url}/health", timeout=1).text == "ok":
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None:
                pytest.fail(f"the server exited:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        else:
            pytest.fail(f"the server did not become healthy:\n{log.read_text()[-3000:]}")
        yield url
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def pictures(scenes_source) -> list[Path]:
    return sorted((scenes_source / "Images").iterdir())[:32]


@pytest.fixture(scope="module")
def expected(trained, pictures) -> dict[Path, str]:
    """What the Python API says for each picture: the server must say the same."""
    captioner = Captioner.from_checkpoint(trained[0], device="cpu")
    return dict(zip(pictures, captioner.caption(pictures)))


def post(url: str, path: Path, as_json: bool = False, **fields) -> httpx.Response:
    if as_json:
        payload = {"image": base64.b64encode(path.read_bytes()).decode(), **fields}
        return httpx.post(f"{url}/predict", json=payload, timeout=60)
    return httpx.post(f"{url}/predict", files={"image": (path.name, path.read_bytes())},
                      data={k: str(v) for k, v in fields.items()}, timeout=60)  # fmt: skip


def test_32_concurrent_requests_each_get_the_caption_the_python_api_gives(server, pictures, expected):
    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda item: post(server, item[1], as_json=item[0] % 2 == 1),
                                  enumerate(pictures)))  # fmt: skip
    assert [r.status_code for r in responses] == [200] * 32
    bodies = [r.json() for r in responses]
    assert [b["caption"] for b in bodies] == [expected[p] for p in pictures]
    assert max(b["time_ms"]["batch_size"] for b in bodies) > 1  # requests that arrived together were batched
    for body in bodies:
        assert body["score"] < 0 and body["beams"][0]["caption"] == body["caption"]
        assert [beam["score"] for beam in body["beams"]] == sorted((beam["score"] for beam in body["beams"]),
                                                                   reverse=True)  # fmt: skip
        assert body["time_ms"]["total"] >= body["time_ms"]["model"] > 0


def test_health_and_the_page_are_served(server):
    assert httpx.get(f"{server}/health").text == "ok"
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and 'id="files"' in page.text and "/static/app.js" in page.text
    assert "https://" not in page.text  # nothing from a CDN: the page works offline
    assert 'fetch("/predict"' in httpx.get(f"{server}/static/app.js").text


def image_bytes(size, kind="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format=kind)
    return buffer.getvalue()


def test_every_bad_request_gets_a_4xx_that_says_why_and_the_server_keeps_serving(server, pictures, expected,
                                                                                   tmp_path):  # fmt: skip
    good = pictures[0].read_bytes()
    bad = {
        "not an image": (415, "Not an image", {"files": {"image": ("notes.jpg", b"hello, not a picture")}}),
        "truncated": (422, "truncated or corrupt", {"files": {"image": ("cut.jpg", good[: len(good) // 2])}}),
        "empty": (400, "empty", {"files": {"image": ("empty.jpg", b"")}}),
        "over the upload limit": (413, "limit", {"files": {"image": ("big.png", os.urandom(1_200_000))}}),
        "a decompression bomb": (413, "too large to decode safely", {"files": {"image": (
            "bomb.png", image_bytes((1200, 1000)))}}),
        "no image field": (400, "No image", {"data": {"beams": "2"}, "files": {"other": ("x.txt", b"x")}}),
        "malformed JSON": (400, "not valid JSON", {"content": b'{"image": ', "headers": {
            "Content-Type": "application/json"}}),
        "JSON that is not an object": (400, "must be an object", {"json": ["image"]}),
        "bad base64": (400, "not valid base64", {"json": {"image": "@@@ not base64 @@@"}}),
        "another content type": (415, "multipart/form-data", {"content": good, "headers": {
            "Content-Type": "image/jpeg"}}),
        "beams out of range": (400, "between 0 and", {"files": {"image": ("ok.jpg", good)}, "data": {"beams": "99"}}),
    }  # fmt: skip
    for name, (status, says, request) in bad.items():
        response = httpx.post(f"{server}/predict", timeout=60, **request)
        assert response.status_code == status, (name, response.status_code, response.text)
        assert says in response.json()["detail"], (name, response.text)
    response = post(server, pictures[0])
    assert response.status_code == 200 and response.json()["caption"] == expected[pictures[0]]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None or not CHROMEDRIVER.exists(),
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")  # fmt: skip
def test_the_page_captions_an_uploaded_picture_in_a_real_browser(server, pictures, expected, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900", f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)  # no Selenium Manager
    try:
        browser.get(f"{server}/")
        browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in pictures[:2]))
        WebDriverWait(browser, 60).until(lambda b: len([c for c in b.find_elements(By.CSS_SELECTOR, ".caption")
                                                         if c.text.strip()]) == 2)  # fmt: skip
        shown = {card.find_element(By.TAG_NAME, "img").get_attribute("alt"):
                 card.find_element(By.CSS_SELECTOR, ".caption").text
                 for card in browser.find_elements(By.CSS_SELECTOR, ".card")}  # fmt: skip
        assert shown == {p.name: expected[p] for p in pictures[:2]}
        assert browser.find_elements(By.CSS_SELECTOR, ".beams li")  # the alternatives are listed
        browser.save_screenshot(str(tmp_path / "page.png"))
    finally:
        browser.quit()
    with Image.open(tmp_path / "page.png") as screenshot:
        assert screenshot.size[0] >= 1000 and len(set(screenshot.convert("L").getdata())) > 20  # drawn, not blank
