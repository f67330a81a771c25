"""The server, started for real on 127.0.0.1: concurrent requests, every bad request, and the page in a browser."""

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from captioner import Captioner
from tests.conftest import TESTS, chromium, headless_chromium

ROOT = TESTS.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(checkpoint: Path, folder: Path, *options: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m captioner serve` in its own process group, until the block ends; yields its URL and process."""
    port = free_port()
    log = folder / "server.log"
    command = [
        sys.executable,
        "-m",
        "captioner",
        "serve",
        "--ckpt_path",
        str(checkpoint),
        "--port",
        str(port),
        "--device",
        "cpu",
        *options,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CAPTIONER_API_KEY", None)
    with log.open("w") as output:
        process = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True
        )
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
        yield url, process
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    """The server on the tiny trained model, with small limits the tests can reach."""
    with running_server(
        trained[0],
        tmp_path_factory.mktemp("serve"),
        "--max_batch_size",
        "8",
        "--batch_timeout",
        "0.05",
        "--max_upload_mb",
        "1",
        "--max_pixels",
        "1000000",
        "--body_timeout",
        "3",
        "--max_bodies",
        "55",
    ) as (url, _):
        yield url


@pytest.fixture(scope="module")
def pictures(scenes_source) -> list[Path]:
    return sorted((scenes_source / "Images").iterdir())[:32]


@pytest.fixture(scope="module")
def expected(trained, pictures) -> dict[Path, str]:
    """What the Python API says for each picture: the server must say the same."""
    captioner = Captioner.from_checkpoint(trained[0], device="cpu")
    return dict(zip(pictures, captioner.caption(pictures)))


@pytest.fixture(scope="module")
def expected_with_three_beams(trained, pictures) -> dict[Path, str]:
    """The same with 3 beams: what a request asking for 3 ranked captions searches with."""
    captioner = Captioner.from_checkpoint(trained[0], device="cpu")
    return dict(zip(pictures, captioner.caption(pictures, num_beams=3)))


def post(url: str, path: Path, as_json: bool = False, **fields) -> httpx.Response:
    if as_json:
        payload = {"image": base64.b64encode(path.read_bytes()).decode(), **fields}
        return httpx.post(f"{url}/predict", json=payload, timeout=60)
    return httpx.post(
        f"{url}/predict",
        files={"image": (path.name, path.read_bytes())},
        data={k: str(v) for k, v in fields.items()},
        timeout=60,
    )


def test_32_concurrent_requests_each_get_the_caption_the_python_api_gives(server, pictures, expected_with_three_beams):
    with ThreadPoolExecutor(32) as pool:
        # Half ask for alternatives by today's name, half by captioner 0.2's (`beams`).
        responses = list(
            pool.map(
                lambda item: post(
                    server, item[1], as_json=item[0] % 2 == 1, **{"num_return" if item[0] % 4 < 2 else "beams": 3}
                ),
                enumerate(pictures),
            )
        )
    assert [r.status_code for r in responses] == [200] * 32
    bodies = [r.json() for r in responses]
    assert [b["caption"] for b in bodies] == [expected_with_three_beams[p] for p in pictures]
    assert max(b["time_ms"]["batch_size"] for b in bodies) > 1  # requests that arrived together were batched
    for body in bodies:
        assert body["score"] < 0 and body["alternatives"][0]["caption"] == body["caption"]
        ranked = [alternative["score"] for alternative in body["alternatives"]]
        assert len(ranked) == 3 and ranked == sorted(ranked, reverse=True)
        assert body["time_ms"]["total"] >= body["time_ms"]["model"] > 0


def test_a_request_decodes_with_its_own_settings(server, pictures, trained):
    captioner = Captioner.from_checkpoint(trained[0], device="cpu")
    with Image.open(pictures[5]) as image:
        image.load()

    def python_api(**settings) -> dict:  # what the Python API answers with the same settings
        (row,) = captioner.describe([image], **settings)
        return {key: value for key, value in row.items() if key != "attention"}

    def served(**settings) -> dict:
        body = post(server, pictures[5], **settings).json()
        return {key: body[key] for key in ("caption", "score", "alternatives") if body[key] is not None}

    greedy = post(server, pictures[5], num_beams=1, num_return=1).json()
    assert greedy["alternatives"] is None
    for settings in (
        {"num_beams": 5, "num_return": 5, "length_penalty": 0.6},
        {"num_beams": 4, "num_return": 4, "num_beam_groups": 2, "diversity_penalty": 2.0, "early_stopping": "never"},
        {"num_beams": 3, "bad_endings": "a", "no_repeat_ngram_size": 2, "min_length": 4, "max_length": 6},
    ):
        answer, expected = (
            served(**settings),
            python_api(**{**settings, "bad_endings": settings.get("bad_endings", "").split() or None}),
        )
        assert answer["caption"] == expected["caption"], settings
        assert answer["score"] == pytest.approx(expected["score"], abs=1e-4), settings
        assert [a["caption"] for a in answer.get("alternatives", [])] == [
            a["caption"] for a in expected.get("alternatives", [])
        ]
    ruled = served(num_beams=3, bad_endings="a", min_length=4, max_length=6)["caption"].split()
    assert 4 <= len(ruled) <= 7 and ruled[-1] != "a"
    sampled = [
        post(server, pictures[5], as_json=True, num_beams=1, do_sample=True, seed=seed, temperature=3.0).json()
        for seed in range(6)
    ]
    assert len({row["caption"] for row in sampled}) > 1  # drawn, not searched: seeds give different captions
    again = post(server, pictures[5], as_json=True, num_beams=1, do_sample=True, seed=0, temperature=3.0).json()
    assert again["caption"] == sampled[0]["caption"]


def test_bad_uploads_and_impossible_settings_fail_alone_among_concurrent_good_requests(server, pictures, expected):
    """Good and bad requests in the same batch windows: each bad one gets its own 4xx, every good one its caption."""
    good = pictures[0].read_bytes()
    bad = {
        "garbage": (415, "Not an image", {"files": {"image": ("x.jpg", b"\x00garbage" * 64)}}),
        "truncated": (422, "truncated or corrupt", {"files": {"image": ("cut.jpg", good[: len(good) // 2])}}),
        "top_p": (
            400,
            "'top_p' must be between 0 and 1",
            {"files": {"image": ("a.jpg", good)}, "data": {"top_p": "5"}},
        ),
        "unknown ending": (
            400,
            "not single tokens",
            {"files": {"image": ("a.jpg", good)}, "data": {"bad_endings": "zebra"}},
        ),
        "groups": (
            400,
            "a divisor of num_beams=3",
            {"json": {"image": base64.b64encode(good).decode(), "num_beams": 3, "num_beam_groups": 2}},
        ),
    }
    jobs = []
    for index, picture in enumerate(pictures[:20]):
        jobs.append(("good", picture))
        if index % 4 == 0:
            jobs.append(("bad", list(bad)[index // 4]))

    def send(job):
        kind, what = job
        if kind == "good":
            return post(server, what)
        return httpx.post(f"{server}/predict", timeout=60, **bad[what][2])

    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(send, jobs))
    sizes = []
    for (kind, what), response in zip(jobs, responses):
        if kind == "good":
            assert response.status_code == 200, (what, response.text)
            assert response.json()["caption"] == expected[what]
            sizes.append(response.json()["time_ms"]["batch_size"])
        else:
            status, says, _ = bad[what]
            assert response.status_code == status and says in response.json()["detail"], (what, response.text)
    assert max(sizes) > 1  # good requests were batched, with bad ones arriving among them


def test_health_and_the_page_are_served(server):
    assert httpx.get(f"{server}/health").text == "ok"
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and 'id="files"' in page.text and "/static/app.js" in page.text
    assert "https://" not in page.text  # nothing from a CDN: the page works offline
    assert 'fetch("/predict"' in httpx.get(f"{server}/static/app.js").text


def image_bytes(size, kind="PNG", mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, "red").save(buffer, format=kind)
    return buffer.getvalue()


def refused_formats() -> dict[str, bytes]:
    """Real files of formats Pillow can read but the README does not promise (PSD written by hand: Pillow cannot)."""
    files = {kind.lower(): image_bytes((16, 16), kind) for kind in ("TIFF", "PPM", "ICO", "TGA", "EPS", "PDF")}
    header = b"8BPS" + (1).to_bytes(2, "big") + bytes(6) + (3).to_bytes(2, "big") + (16).to_bytes(4, "big") * 2
    files["psd"] = header + (8).to_bytes(2, "big") + (3).to_bytes(2, "big") + bytes(12) + bytes(2) + bytes(16 * 16 * 3)
    return files


def test_every_bad_request_gets_a_4xx_that_says_why_and_the_server_keeps_serving(server, pictures, expected, tmp_path):
    good = pictures[0].read_bytes()
    bad = {
        "not an image": (415, "Not an image", {"files": {"image": ("notes.jpg", b"hello, not a picture")}}),
        **{
            f"a {kind} file": (415, "not a format this server accepts", {"files": {"image": (f"x.{kind}", data)}})
            for kind, data in refused_formats().items()
        },
        "truncated": (422, "truncated or corrupt", {"files": {"image": ("cut.jpg", good[: len(good) // 2])}}),
        "empty": (400, "empty", {"files": {"image": ("empty.jpg", b"")}}),
        "over the upload limit": (413, "limit", {"files": {"image": ("big.png", os.urandom(1_200_000))}}),
        "a decompression bomb": (
            413,
            "too large to decode safely",
            {"files": {"image": ("bomb.png", image_bytes((1200, 1000)))}},
        ),
        "no image field": (400, "No image", {"data": {"beams": "2"}, "files": {"other": ("x.txt", b"x")}}),
        "malformed JSON": (
            400,
            "not valid JSON",
            {"content": b'{"image": ', "headers": {"Content-Type": "application/json"}},
        ),
        "JSON that is not an object": (400, "must be an object", {"json": ["image"]}),
        "bad base64": (400, "not valid base64", {"json": {"image": "@@@ not base64 @@@"}}),
        "another content type": (
            415,
            "multipart/form-data",
            {"content": good, "headers": {"Content-Type": "image/jpeg"}},
        ),
        "beams out of range": (400, "between 0 and", {"files": {"image": ("ok.jpg", good)}, "data": {"beams": "99"}}),
        "no beam at all": (
            400,
            "'num_beams' must be between 1",
            {"files": {"image": ("ok.jpg", good)}, "data": {"num_beams": "0"}},
        ),
        "sampling with beams": (
            400,
            "do_sample with num_beams > 1",
            {"json": {"image": base64.b64encode(good).decode(), "do_sample": True, "num_beams": 3}},
        ),
    }
    for name, (status, says, request) in bad.items():
        response = httpx.post(f"{server}/predict", timeout=60, **request)
        assert response.status_code == status, (name, response.status_code, response.text)
        assert says in response.json()["detail"], (name, response.text)
    response = post(server, pictures[0])
    assert response.status_code == 200 and response.json()["caption"] == expected[pictures[0]]


@pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_the_page_captions_an_uploaded_picture_in_a_real_browser(server, pictures, expected, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = headless_chromium(tmp_path / "profile")
    try:
        browser.get(f"{server}/")
        browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in pictures[:2]))
        WebDriverWait(browser, 60).until(
            lambda b: len([c for c in b.find_elements(By.CSS_SELECTOR, ".caption") if c.text.strip()]) == 2
        )
        shown = {
            card.find_element(By.TAG_NAME, "img").get_attribute("alt"): card.find_element(
                By.CSS_SELECTOR, ".caption"
            ).text
            for card in browser.find_elements(By.CSS_SELECTOR, ".card")
        }
        assert shown == {p.name: expected[p] for p in pictures[:2]}
        assert browser.find_elements(By.CSS_SELECTOR, ".beams li")  # the alternatives are listed
        browser.save_screenshot(str(tmp_path / "page.png"))
    finally:
        browser.quit()
    with Image.open(tmp_path / "page.png") as screenshot:
        assert screenshot.size[0] >= 1000 and len(set(screenshot.convert("L").getdata())) > 20  # drawn, not blank


def slow_client(url: str, declared: int = 900_000) -> socket.socket:
    """A connection that declares a body and then sends it one byte at a time (call `trickle` to send more)."""
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=30)
    connection.sendall(
        f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n{{".encode()
    )
    return connection


def answer_of(connection: socket.socket) -> tuple[bytes, bool]:
    """What the server sent on a connection, and whether it then closed it (without waiting forever)."""
    received = b""
    connection.settimeout(15)
    try:
        while chunk := connection.recv(65536):
            received += chunk
        return received, True
    except ConnectionResetError:  # closed by the server while the client was still sending: a reset, still closed
        return received, True
    except TimeoutError:
        return received, False


def test_slow_clients_are_cut_off_and_others_are_served_meanwhile(server, pictures, expected):
    slow = [slow_client(server) for _ in range(50)]
    started = time.monotonic()
    # Opened at once, before the 3 s deadline can free any place: 5 fit under --max_bodies 55, the last 5 do not.
    extra = [slow_client(server) for _ in range(10)]
    crawling = [*slow, *extra[:4]]

    def trickle():  # one byte every half second on every slow connection, for as long as they stay open
        while time.monotonic() - started < 12:
            for connection in crawling:
                with contextlib.suppress(OSError):
                    connection.send(b" ")
            time.sleep(0.5)

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    turned_away = [answer_of(connection) for connection in extra[5:]]
    assert all(
        b" 503 " in answer.split(b"\r\n")[0] and b"retry-after: 1" in answer.lower() and closed
        for answer, closed in turned_away
    ), turned_away[:1]
    extra[4].close()  # a client that gives up frees its place: the next upload is served while 54 crawl in
    for _ in range(50):
        response = post(server, pictures[1])
        if response.status_code != 503:  # the server may not have seen the close yet: retry, as Retry-After says
            break
        time.sleep(0.05)
    assert response.status_code == 200 and response.json()["caption"] == expected[pictures[1]]
    answers = [answer_of(connection) for connection in crawling]
    wrong = [
        (answer, closed)
        for answer, closed in answers
        if not (b" 408 " in answer.split(b"\r\n")[0] and b"--body_timeout" in answer and closed)
    ]
    assert not wrong, wrong[:2]
    # Cut off by the 3 s deadline while the clients still send, not when they stop (12 s).
    assert time.monotonic() - started < 11
    for connection in [*slow, *extra]:
        connection.close()
    response = post(server, pictures[2])
    assert response.status_code == 200 and response.json()["caption"] == expected[pictures[2]]


def test_no_format_outside_the_list_reaches_pillow_even_eps(monkeypatch):
    """Pillow's EPS plugin runs Ghostscript: with the list of accepted formats it is never even asked."""
    from PIL import EpsImagePlugin

    from captioner.core.pixels import UnsupportedFormatError, open_image

    def ghostscript(*args, **kwargs):
        raise AssertionError("the EPS plugin was run on an upload")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", ghostscript)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    for data in refused_formats().values():
        with pytest.raises(UnsupportedFormatError):
            open_image(data)
    assert open_image(image_bytes((8, 8), "WEBP")).size == (8, 8)  # the promised ones open


def server_memory_mb(process: subprocess.Popen) -> float:
    """Resident memory of the server and every process it started (API server, inference workers), from /proc."""
    total, pids = 0, {process.pid}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if os.getpgid(int(entry.name)) == process.pid:
                    pids.add(int(entry.name))
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


@pytest.mark.slow
def test_64_uploads_at_the_pixel_limit_stay_within_the_memory_bound_and_a_key_is_required(trained, tmp_path):
    side = 2000  # 4 Mpx each, under the limit below: 64 decoded at once would take about 3 GB
    big = image_bytes((side, side), "PNG", "RGBA")
    # 256 MB for decodes: 5 at once (4 Mpx x 12 bytes each), run in parallel threads within a batch.
    with running_server(
        trained[0],
        tmp_path,
        "--max_pixels",
        str(4_100_000),
        "--api_key",
        "s3cret",
        "--max_batch_size",
        "16",
        "--decode_memory_mb",
        "256",
    ) as (url, process):
        assert httpx.get(f"{url}/info").json()["api_key_required"] is True
        unauthorised = httpx.post(f"{url}/predict", files={"image": ("a.png", big)}, timeout=60)
        assert unauthorised.status_code == 401 and "X-API-Key" in unauthorised.json()["detail"]
        wrong = httpx.post(f"{url}/predict", files={"image": ("a.png", big)}, headers={"X-API-Key": "guess"})
        assert wrong.status_code == 401
        key = {"X-API-Key": "s3cret"}
        assert httpx.post(f"{url}/predict", files={"image": ("a.png", big)}, headers=key, timeout=60).status_code == 200
        import openai  # OpenAI's clients send the key as a bearer token

        small = f"data:image/png;base64,{base64.b64encode(image_bytes((64, 48))).decode()}"
        chat = {"model": "m", "messages": chat_messages(small)}
        assert openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret").chat.completions.create(**chat).choices
        with pytest.raises(openai.AuthenticationError, match="API key"):
            openai.OpenAI(base_url=f"{url}/v1", api_key="guess", max_retries=0).chat.completions.create(**chat)
        time.sleep(1)
        idle = server_memory_mb(process)
        peak, done = [idle], threading.Event()

        def sample():
            while not done.is_set():
                peak.append(server_memory_mb(process))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with ThreadPoolExecutor(64) as pool:
            statuses = list(
                pool.map(
                    lambda _: (
                        httpx.post(
                            f"{url}/predict", files={"image": ("a.png", big)}, headers=key, timeout=120
                        ).status_code
                    ),
                    range(64),
                )
            )
        done.set()
        sampler.join()
        time.sleep(1)
        after = server_memory_mb(process)
    assert statuses == [200] * 64
    assert max(peak) - idle < 256 + 256, (idle, max(peak))  # the decodes' budget, and the batch around them
    assert after - idle < 200, (idle, after)


def test_fuzzed_bodies_get_4xx_never_500_and_the_server_lives(server, pictures, expected):
    """A few hundred generated requests over HTTP (the request parser), after thousands in-process (the opener)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    good = image_bytes((8, 8), "PNG")
    bodies = st.one_of(
        st.binary(max_size=2048),
        st.binary(min_size=1, max_size=64).map(lambda noise: good[:24] + noise + good[24:]),  # a damaged PNG
        st.integers(0, len(good)).map(lambda cut: good[:cut]),
    )
    fields = st.dictionaries(
        st.sampled_from(["beams", "num_beams", "length_penalty", "top_p", "attention", "image", "x"]),
        st.one_of(st.text(max_size=12), st.integers(-5, 50).map(str)),
        max_size=3,
    )

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(body=bodies, data=fields, as_json=st.booleans())
    def request(body, data, as_json):
        if as_json:
            payload = {**data, "image": base64.b64encode(body).decode()} if "image" not in data else data
            response = httpx.post(f"{server}/predict", json=payload, timeout=60)
        else:
            response = httpx.post(f"{server}/predict", files={"image": ("f", body)}, data=data, timeout=60)
        assert response.status_code < 500, (response.status_code, response.text)

    request()
    response = post(server, pictures[3])
    assert response.status_code == 200 and response.json()["caption"] == expected[pictures[3]]


def test_thousands_of_fuzzed_files_are_refused_with_a_decode_error_only():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from captioner.core.pixels import DECODE_ERRORS, open_image

    seeds = [image_bytes((12, 9), kind) for kind in ("PNG", "JPEG", "BMP", "GIF", "WEBP")]

    @settings(max_examples=3000, deadline=None, derandomize=True)
    @given(seed=st.sampled_from(seeds), at=st.integers(0, 200), noise=st.binary(max_size=32), cut=st.integers(0, 400))
    def open_damaged(seed, at, noise, cut):
        data = (seed[:at] + noise + seed[at + len(noise) :])[: cut or None]
        try:
            image = open_image(data, max_pixels=1_000_000)
        except DECODE_ERRORS:
            return
        assert image.mode == "RGB"

    open_damaged()


def test_the_0_2_beams_option_of_serve_still_works_as_num_return(capsys, monkeypatch):
    from captioner.compat import names
    from captioner.core.errors import CaptionerError
    from captioner.serve import decoding_overrides, serve_parser

    def given(*args: str) -> dict:
        return decoding_overrides(serve_parser().parse_args(["--ckpt_path", "model.ckpt", *args]))

    monkeypatch.setattr(names, "_warned", set())  # as in a fresh process
    assert given() == {}
    assert given("--num_beams", "5", "--num_return", "2") == {"num_beams": 5, "num_return": 2}
    assert given("--beams", "0") == {"num_return": 1}  # 0.2: no alternatives, the best caption only
    assert given("--beams", "3", "--num_beams", "5") == {"num_beams": 5, "num_return": 3}
    with pytest.raises(CaptionerError, match="both beams=3 and num_return=2"):
        given("--beams", "3", "--num_return", "2")
    assert capsys.readouterr().err.count("'beams' is deprecated; it is 'num_return' now") == 1  # once a process


# The same images and settings through every entry point: `Captioner`, `OnnxCaptioner`, `caption --json`, `caption-set`,
# Lightning's `predict` and the server. (Here, beside the server this file already runs.)
CASES = {
    "default": ({}, [], []),
    "constrained": (
        {"num_beams": 3, "force_words": ("red",)},
        ["--num_beams", "3", "--force_words", "red"],
        ["--model.decoding.num_beams", "3", "--model.decoding.force_words", '["red"]'],
    ),
    "sampled": (
        {"do_sample": True, "seed": 5, "temperature": 1.5},
        ["--do_sample", "--seed", "5", "--temperature", "1.5"],
        [
            "--model.decoding.num_beams",
            "1",
            "--model.decoding.do_sample",
            "true",
            "--model.decoding.seed",
            "5",
            "--model.decoding.temperature",
            "1.5",
        ],
    ),
}


@pytest.fixture(scope="module")
def conformance_images(pictures, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("conformance") / "images"
    folder.mkdir()
    for picture in pictures[:5]:
        (folder / picture.name).write_bytes(picture.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a picture at all")
    return folder


def by_name(rows) -> dict[str, dict]:
    return {Path(row["image"]).name: row for row in rows}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_entry_point_gives_the_same_rows_fields_and_errors(
    case, server, trained, conformance_images, tmp_path, capsys
):
    from captioner.bulk.command import caption_set_command
    from captioner.bulk.job import read_rows
    from captioner.cli import main
    from captioner.decoding.answers import ROW_FIELDS
    from captioner.inference import OnnxCaptioner
    from captioner.runs import run_dir
    from tests.conftest import predict_args

    settings, flags, config = CASES[case]
    checkpoint = trained[0]
    paths = sorted(conformance_images.iterdir())
    rows = {
        "Captioner": by_name(
            p.row()
            for p in Captioner.from_checkpoint(checkpoint, device="cpu", batch_size=4).predict(paths, **settings)
        )
    }
    exported = tmp_path / "exported"
    main(["export", "--ckpt_path", str(checkpoint), "--output", str(exported)])
    rows["OnnxCaptioner"] = by_name(p.row() for p in OnnxCaptioner(exported, batch_size=4).predict(paths, **settings))
    capsys.readouterr()
    with pytest.raises(SystemExit):  # exit status 1: one file failed
        main(["caption", str(conformance_images), "--ckpt_path", str(checkpoint), "--device", "cpu", "--json", *flags])
    rows["caption"] = by_name(json.loads(line) for line in capsys.readouterr().out.splitlines())
    caption_set_command(
        ["--ckpt_path", str(checkpoint), "--input", str(conformance_images), "--output", str(tmp_path / "set"), *flags]
    )
    rows["caption-set"] = by_name(read_rows(tmp_path / "set"))
    predicted = main(predict_args(checkpoint, conformance_images, tmp_path / "predict", *config))
    rows["predict"] = by_name(
        json.loads(line) for line in (run_dir(predicted.trainer) / "predictions.jsonl").read_text().splitlines()
    )
    served = {}
    for path in paths:
        response = post(
            server, path, as_json=True, **{k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
        )
        served[path.name] = response.json() if response.status_code == 200 else {"status": response.status_code}
    rows["serve"] = served

    reference = rows["Captioner"]
    assert reference["broken.jpg"]["error"] and reference["broken.jpg"]["caption"] is None
    assert served["broken.jpg"] == {"status": 415}  # the server answers a bad upload with its own status
    for entry_point, got in rows.items():
        assert sorted(got) == sorted(reference), entry_point
        for name, row in got.items():
            if entry_point == "serve" and name == "broken.jpg":
                continue
            assert tuple(row)[: len(ROW_FIELDS)] == ROW_FIELDS, (entry_point, name)  # every field, in order
            expected = reference[name]
            assert row["caption"] == expected["caption"], (entry_point, case, name)
            assert row["error"] == expected["error"], (entry_point, name)
            if expected["caption"] is not None:
                assert row["score"] == pytest.approx(expected["score"], abs=1e-3), (entry_point, name)
                assert row["confidence"] == pytest.approx(expected["confidence"], abs=2e-3), (entry_point, name)
                assert row["constraints_met"] == expected["constraints_met"], (entry_point, name)
    if case == "constrained":
        assert all(row["constraints_met"] for row in reference.values() if row["caption"])
    else:
        assert all(row["constraints_met"] is None for row in reference.values())


# The OpenAI chat API (captioner.serve.openai): what the captioning tools send, through the official client.


def data_url(path: Path) -> str:
    return f"data:image/jpeg;base64,{base64.b64encode(path.read_bytes()).decode()}"


def chat_messages(url: str, text: str = "Describe this image in one sentence.") -> list[dict]:
    return [
        {"role": "system", "content": "You are an image captioner."},
        {
            "role": "user",
            "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}],
        },
    ]


def test_the_openai_client_gets_the_python_apis_captions_among_concurrent_mixed_requests(
    server, pictures, expected, trained
):
    """Chat requests through the official `openai` client, good and bad, ranked (n=3) and plain, with /predict
    requests among them: each good one gets the caption `Captioner` gives, each bad one its own OpenAI-shaped error."""
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)
    (model,) = client.models.list().data
    assert model.id == httpx.get(f"{server}/info").json()["openai"]["model"] == trained[0].stem
    captioner = Captioner.from_checkpoint(trained[0], device="cpu")
    ranked = {}
    for picture in pictures[:12:3]:
        (row,) = captioner.describe([picture], num_beams=3, num_return=3)
        ranked[picture] = [alternative["caption"] for alternative in row["alternatives"]]
    corrupt = pictures[1].read_bytes()[:300]
    bad = {
        "corrupt": (
            openai.UnprocessableEntityError,
            "truncated or corrupt",
            {"messages": chat_messages("data:image/jpeg;base64," + base64.b64encode(corrupt).decode())},
        ),
        "url": (openai.BadRequestError, "--allow_url_fetch", {"messages": chat_messages("http://127.0.0.1:9/x.jpg")}),
        "top_k": (
            openai.BadRequestError,
            "top_k",
            {"messages": chat_messages(data_url(pictures[0])), "extra_body": {"top_k": 10**6}},
        ),
        "no image": (openai.BadRequestError, "No image", {"messages": [{"role": "user", "content": "a caption?"}]}),
        "n sampled": (
            openai.BadRequestError,
            "'n' > 1 with sampling",
            {"messages": chat_messages(data_url(pictures[0])), "n": 2, "temperature": 0.8},
        ),
    }
    jobs = []
    for index, picture in enumerate(pictures[:12]):
        jobs.append(("ranked" if index % 3 == 0 else "chat", picture))
        if index % 2 == 0:
            jobs.append(("predict", picture))
        if index % 2 == 1 and index // 2 < len(bad):
            jobs.append(("bad", list(bad)[index // 2]))

    def send(job):
        kind, what = job
        try:
            if kind == "predict":
                return post(server, what)
            if kind == "bad":
                return client.chat.completions.create(model="any", **bad[what][2])
            n = 3 if kind == "ranked" else None
            return client.chat.completions.create(
                model="gpt-4o", messages=chat_messages(data_url(what)), max_tokens=300, temperature=0, n=n
            )
        except openai.APIStatusError as error:
            return error

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(send, jobs))
    for (kind, what), answer in zip(jobs, answers):
        if kind == "bad":
            error_class, says, _ = bad[what]
            assert isinstance(answer, error_class) and says in answer.body["message"], (what, answer)
            assert answer.body["type"] == "invalid_request_error"
        elif kind == "predict":
            assert answer.json()["caption"] == expected[what]
        else:
            captions = [choice.message.content for choice in answer.choices]
            assert captions == (ranked[what] if kind == "ranked" else [expected[what]]), (kind, what)
            assert answer.model == model.id and answer.object == "chat.completion"
            assert answer.usage.completion_tokens == sum(len(caption.split()) for caption in captions)


def test_max_tokens_caps_a_chat_caption_and_a_seeded_temperature_samples_the_python_apis_caption(
    server, pictures, trained
):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)
    captioner = Captioner.from_checkpoint(trained[0], device="cpu")
    picture = pictures[4]

    def chat(**fields) -> str:
        answer = client.chat.completions.create(model="m", messages=chat_messages(data_url(picture)), **fields)
        return answer.choices[0].message.content

    assert chat(max_tokens=3) == captioner.caption([picture], max_length=3)[0]
    assert len(chat(max_tokens=3).split()) <= 3 < len(chat(max_tokens=1000).split())
    sampled = [chat(temperature=3.0, seed=seed) for seed in range(4)]
    assert len(set(sampled)) > 1  # sampled, not searched
    for seed, caption in enumerate(sampled):
        assert caption == captioner.caption([picture], do_sample=True, temperature=3.0, seed=seed)[0]
    assert (
        chat(temperature=3.0, top_p=0.5, seed=1, extra_body={"top_k": 5})
        == captioner.caption([picture], do_sample=True, temperature=3.0, top_p=0.5, top_k=5, seed=1)[0]
    )


def test_chat_requests_the_model_cannot_read_get_openai_shaped_errors_and_predict_keeps_its_own(server, pictures):
    chat = f"{server}/v1/chat/completions"
    good = {"model": "m", "messages": chat_messages(data_url(pictures[0]))}
    cases = [
        (httpx.post(chat, content=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        (httpx.post(chat, json=[good]), 400, "must be an object"),
        (httpx.post(chat, files={"image": ("a.jpg", pictures[0].read_bytes())}), 415, "as JSON"),
        (httpx.post(chat, json={**good, "stream": True}), 400, "'stream' is not supported"),
        (httpx.post(chat, json={**good, "max_tokens": 0}), 400, "'max_tokens'"),
        (httpx.post(chat, json={"model": "m", "messages": chat_messages("data:image/png,raw")}), 400, "base64"),
        (httpx.post(chat, json={**good, "messages": "hello"}), 400, "'messages' must be a list"),
        (httpx.post(chat, json={**good, "num_beams": 3, "num_beam_groups": 2}), 400, "divisor"),
        (httpx.get(chat), 405, "Method Not Allowed"),
    ]
    for response, status, says in cases:
        assert response.status_code == status, (says, response.text)
        error = response.json()["error"]
        assert says in error["message"] and error["code"] == str(status), (says, error)
    assert httpx.post(f"{server}/predict", json={"image": "%%"}).json()["detail"] == "'image' is not valid base64."
    assert httpx.post(chat, json=good).status_code == 200  # and the server still answers


def test_a_chat_image_url_is_fetched_only_where_allowed_within_the_upload_limit():
    """The fetch a chat request's http(s) image URL asks for, against a local HTTP server (no network)."""
    import asyncio
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from fastapi import HTTPException

    from captioner.serve.api import CaptionAPI

    picture = image_bytes((64, 48), "JPEG")

    class Pictures(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the standard library's name)
            body = {"/a.jpg": picture, "/big.jpg": b"x" * 5000}.get(self.path)
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    host = ThreadingHTTPServer(("127.0.0.1", 0), Pictures)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{host.server_address[1]}"

    def fetch(url: str, allow: bool = True) -> bytes | HTTPException:
        api = CaptionAPI("model.ckpt", allow_url_fetch=allow, max_fetch_bytes=4096, fetch_timeout=5)
        try:
            return asyncio.run(api.chat_image(url))
        except HTTPException as error:
            return error

    try:
        assert fetch(f"{base}/a.jpg") == picture
        assert fetch(f"data:image/jpeg;base64,{base64.b64encode(picture).decode()}", allow=False) == picture
        refused = fetch(f"{base}/a.jpg", allow=False)
        assert refused.status_code == 400 and "--allow_url_fetch" in refused.detail
        too_big = fetch(f"{base}/big.jpg")
        assert too_big.status_code == 413 and "--max_upload_mb" in too_big.detail
        missing = fetch(f"{base}/none.jpg")
        assert missing.status_code == 400 and "answered 404" in missing.detail
        assert fetch("ftp://127.0.0.1/a.jpg").status_code == 400
    finally:
        host.shutdown()
