"""The manual runs: every shell and Python block of README.md and docs/ is executed, page by page, in order, offline,
at the demo's tiny sizes, on one demo checkpoint shared by the whole run; its generated reference holds every option;
its links resolve; and the built site works in a browser.

How a page runs (`run_page`): in a fresh folder holding `best.ckpt` (the shared demo checkpoint, trained once with
`configs/demo.yaml` at the sizes of `tests/conf/docs_tiny.yaml`), `photos/` and `photo.jpg` (generated scenes), and
the repository's `configs/` and `scripts/`. `python -m captioner ...` runs in this process (a training command with
`--config` gets `tests/conf/docs_tiny.yaml` after the page's own options); `python -m captioner serve` starts a
server the page's later `curl` lines talk to; `export NAME=value` sets the variable for the page; any other line
runs in bash; a run of several processes (`--trainer.devices 2`) runs as its own command, as DDP needs. Python
blocks run in one namespace per page; one with a `title="name.py"` is also written to that file (a module the
page's commands then import). A block is skipped only where the line before it says why in the page itself: it
needs the network or a GPU, takes minutes, or is this test suite (`*Not run by the tests: needs the network (...)*`).
"""

import contextlib
import http.server
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest

from tests.conftest import TESTS, chromium, copy_scenes, headless_chromium

ROOT = TESTS.parent
TINY = TESTS / "conf" / "docs_tiny.yaml"
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
FENCE = re.compile(r"^(\s*)```(\S*)(.*)$")
SKIP = re.compile(
    r"^\*Not run by the tests: (needs the network|needs a GPU|takes minutes|is the test suite itself)\b[^*]*\*$"
)
TITLE = re.compile(r'title="([^"]+)"')
SHELL, PYTHON = ("bash", "sh", "shell"), ("python",)
NOT_CODE = ("text", "json", "yaml", "toml", "jsonl", "csv", "html", "mermaid")
LIGHTNING = ("fit", "validate", "test", "predict")
# What the pages' commands built or started that other pages and tests reuse (one site build, one server per command
# line: the pages' `best.ckpt` files are copies of one checkpoint).
BUILT: dict[str, Path] = {}
SERVERS: dict[tuple[str, ...], subprocess.Popen] = {}


@dataclass
class Block:
    """A fenced block of a page: where it starts, its language, its code, why it is skipped (None: it runs)."""

    page: Path
    line: int
    language: str
    code: str
    skipped: str | None
    title: str | None = None


def blocks_of(page: Path) -> list[Block]:
    """The fenced blocks of a page, in order."""
    blocks, lines, index = [], page.read_text(encoding="utf-8").splitlines(), 0
    while index < len(lines):
        opened = FENCE.match(lines[index])
        if not opened:
            index += 1
            continue
        indent, language, attributes = opened.groups()
        title = TITLE.search(attributes)
        before = next((line.strip() for line in reversed(lines[:index]) if line.strip()), "")
        end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "```")
        code = "\n".join(line[len(indent) :] for line in lines[index + 1 : end])
        skipped = before if SKIP.match(before) else None
        blocks.append(Block(page, index + 1, language, code, skipped, title.group(1) if title else None))
        index = end + 1
    return blocks


def commands_of(code: str) -> list[str]:
    """A shell block's commands: continuation lines joined, prompts and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line.strip().removeprefix("$ ") for line in joined.splitlines() if line.strip()]


class Page:
    """Runs one page's blocks in its own folder (see the module docstring)."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.folder, self.monkeypatch, self.namespace = folder, monkeypatch, {"__name__": "__docs__"}

    def python(self, block: Block) -> None:
        if block.title:  # a file the page's commands use (a module of the reader's own)
            (self.folder / block.title).write_text(block.code + "\n", encoding="utf-8")
        exec(compile(block.code, f"{block.page.name}:{block.line}", "exec"), self.namespace)  # noqa: S102

    def shell(self, block: Block) -> None:
        for command in commands_of(block.code):
            words = shlex.split(command, comments=True)
            if not words:
                continue
            where = f"{block.page.name}:{block.line}: {command}"
            if words[0] == "export":
                for assignment in words[1:]:
                    name, _, value = assignment.partition("=")
                    self.monkeypatch.setenv(name, value)
            elif words[:3] == ["python", "-m", "captioner"] and "--trainer.devices" not in words:
                self.captioner(words[3:], where)
            elif words[:2] == ["python", "scripts/demo_check.py"]:
                self.script(words[1], [*words[2:], "--config", str(TINY)], where)
            else:
                if words[:2] == ["mkdocs", "build"]:
                    BUILT["site"] = self.folder / "site"
                if words[:3] == ["python", "-m", "captioner"]:  # several processes: a command of its own
                    command = shlex.join([sys.executable, "-m", "captioner", *tiny(words[3:])])
                result = subprocess.run(
                    command, shell=True, cwd=self.folder, capture_output=True, text=True, timeout=300, check=False
                )
                assert result.returncode == 0, f"{where}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"

    def script(self, path: str, args: list[str], where: str) -> None:
        """A script of the repository, run in this process as `python scripts/...` runs it."""
        self.monkeypatch.setattr(sys, "argv", [path, *args])
        try:
            runpy.run_path(str(self.folder / path), run_name="__main__")
        except SystemExit as stop:
            assert stop.code in (0, None), f"{where}: exit status {stop.code}"

    def captioner(self, args: list[str], where: str) -> None:
        if args[:1] == ["serve"]:
            return self.serve(args)
        args = tiny(args)
        from captioner.cli import main

        try:
            main(args)
        except SystemExit as stop:
            assert stop.code in (0, None), f"{where}: exit status {stop.code}"
        return None

    def serve(self, args: list[str]) -> None:
        """A server in its own process (it runs until the tests of the manual end; a page that starts the same one
        finds it running), ready before the next line runs."""
        if tuple(args) in SERVERS and SERVERS[tuple(args)].poll() is None:
            return
        port = args[args.index("--port") + 1] if "--port" in args else "8000"
        log = (self.folder / "server.log").open("w")
        command = [sys.executable, "-m", "captioner", *args, "--device", "cpu"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        server = subprocess.Popen(
            command, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        SERVERS[tuple(args)] = server
        for _ in range(240):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).text == "ok":
                    return
            assert server.poll() is None, (self.folder / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        pytest.fail(f"the page's server did not start:\n{(self.folder / 'server.log').read_text()[-3000:]}")


def stop_servers() -> None:
    for server in SERVERS.values():
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    SERVERS.clear()


def tiny(args: list[str]) -> list[str]:
    """A training command at the tiny sizes: `tests/conf/docs_tiny.yaml` right after its last `--config` (the
    options the page gives after it still win)."""
    if not (args[:1] and args[0] in LIGHTNING and "--config" in args):
        return args
    last = len(args) - 1 - args[::-1].index("--config")
    return [*args[: last + 2], "--config", str(TINY), *args[last + 2 :]]


@pytest.fixture(scope="module", autouse=True)
def servers():
    """The pages' servers, stopped when the manual's tests end."""
    yield
    stop_servers()


@pytest.fixture(scope="module")
def shared(tmp_path_factory, scenes_source) -> Path:
    """The demo checkpoint every page uses (`best.ckpt`), trained once at the tiny sizes, and the demo's prepared
    data, which the pages' own training commands find again."""
    from captioner.cli import main

    folder, here = tmp_path_factory.mktemp("docs-shared"), Path.cwd()
    os.chdir(folder)
    try:
        cli = main(["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(TINY)])
    finally:
        os.chdir(here)
    shutil.copy(folder / cli.trainer.checkpoint_callback.best_model_path, folder / "best.ckpt")
    copy_scenes(scenes_source, folder / "photos", 4)
    return folder


def runnable_pages() -> list[Path]:
    return [page for page in PAGES if any(b.language in SHELL + PYTHON for b in blocks_of(page))]


@pytest.mark.parametrize("page", runnable_pages(), ids=lambda page: str(page.relative_to(ROOT)))
def test_every_block_of_the_page_runs(page, shared, tmp_path, monkeypatch):
    (tmp_path / "data").symlink_to(shared / "data", target_is_directory=True)
    for name in ("configs", "scripts", "docs", "mkdocs.yml", "CHANGELOG.md"):
        (tmp_path / name).symlink_to(ROOT / name)
    shutil.copy(shared / "best.ckpt", tmp_path / "best.ckpt")
    shutil.copytree(shared / "photos", tmp_path / "photos")
    shutil.copy(next((shared / "photos").iterdir()), tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # the page's own modules (a block with a title)
    runner = Page(tmp_path, monkeypatch)
    for block in blocks_of(page):
        if block.skipped is None and block.language in SHELL:
            runner.shell(block)
        elif block.skipped is None and block.language in PYTHON:
            runner.python(block)


def test_every_block_is_tagged_and_only_the_network_or_a_gpu_skips_one():
    for page in PAGES:
        for block in blocks_of(page):
            where = f"{page.relative_to(ROOT)}:{block.line}"
            assert block.language in SHELL + PYTHON + NOT_CODE, f"{where}: tag the block (bash, python, text, ...)"
            before = next(
                (line.strip() for line in reversed(page.read_text().splitlines()[: block.line - 1]) if line.strip()),
                "",
            )
            if before.startswith("*Not run by the tests"):
                assert block.skipped, f"{where}: a block is skipped only for the network or a GPU"


def test_the_reference_holds_every_command_option_decoding_setting_and_config_key():
    """The generated reference (docs/hooks.py, what the site shows) names every option of every command, every
    `DecodingConfig` field and every `fit` key: one added to the code is in the manual without anyone writing it."""
    import dataclasses

    hooks = load_hooks()
    from captioner.cli import COMMANDS, command_parser
    from captioner.decoding.config import DecodingConfig

    commands = hooks.commands()
    for name in COMMANDS:
        for action in command_parser(name)._actions:
            if action.help == "show this help message and exit":
                continue
            for option in action.option_strings:
                assert f"`{option}`" in commands, f"{name} {option}"
    decoding = hooks.decoding()
    assert all(f"`{field.name}`" in decoding for field in dataclasses.fields(DecodingConfig))
    configuration = hooks.configuration()
    for key in ("model.decoding", "data.loading.batch_size", "data.origin.synthetic_styles", "trainer.max_epochs"):
        assert f"`{key}`" in configuration, key
    assert len(hooks.config_keys()) > 80


def load_hooks():
    """docs/hooks.py, as MkDocs loads it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readmes_links_lead_to_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme):
        assert (ROOT / target).exists(), target


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The manual built as CI builds it: `mkdocs build --strict` (a broken link or anchor fails it); the build the
    development page ran, when it ran."""
    if "site" in BUILT and (BUILT["site"] / "index.html").is_file():
        return BUILT["site"]
    folder = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


@pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_the_built_site_navigates_shows_the_reference_and_searches_in_a_browser(site, tmp_path):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    driver = headless_chromium(tmp_path / "profile")
    try:
        driver.get(f"{url}/")
        assert "captioner" in driver.title
        driver.find_element(By.LINK_TEXT, "Every command's options").click()
        WebDriverWait(driver, 20).until(expected_conditions.url_contains("/reference/commands/"))
        text = driver.find_element(By.TAG_NAME, "article").text
        assert "--styles" in text and "caption-set" in text  # the generated reference, rendered
        box = driver.find_element(By.CSS_SELECTOR, "input[data-md-component='search-query']")
        driver.execute_script("document.querySelector('#__search').checked = true")  # the header's search opened
        WebDriverWait(driver, 10).until(lambda d: box.is_displayed())
        box.send_keys("nvJPEG")
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".md-search-result__item"))
        results = driver.find_elements(By.CSS_SELECTOR, ".md-search-result__item a")
        assert any("performance" in (link.get_attribute("href") or "") for link in results), [
            link.get_attribute("href") for link in results
        ]
    finally:
        driver.quit()
        httpd.shutdown()
