"""What a plain install gets: one top-level package with the configs inside, shipped configs by name, old names."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from captioner.core.errors import CaptionerError
from captioner.shipped import resolve_config, shipped_configs, with_shipped_configs
from tests.conftest import TESTS, TINY_CONFIG, copy_scenes

ROOT = TESTS.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel, built from a copy of the checkout: a build writes build/ and *.egg-info beside its sources, and no
    test writes into the checkout."""
    folder, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source") / "captioner"
    left_out = {".git", "build", "dist", "data", "runs", ".venv", "venv"}  # at the top: captioner/data is a package

    def ignore(folder: str, names: list[str]) -> list[str]:
        top = Path(folder) == ROOT
        return [n for n in names if (top and n in left_out) or n == "__pycache__" or n.endswith(".egg-info")]

    shutil.copytree(ROOT, source, ignore=ignore)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(folder),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = folder.glob("captioner-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_holds_one_top_level_package_with_every_module_config_and_page(wheel):
    names = set(wheel.namelist())
    distribution, version = Path(wheel.filename).name.split("-")[:2]
    assert {name.split("/")[0] for name in names} == {"captioner", f"{distribution}-{version}.dist-info"}
    assert not any(name.startswith("callbacks/") for name in names)  # no clash with PyPI's unrelated `callbacks`
    packages = {path.parent.relative_to(ROOT).as_posix() for path in (ROOT / "captioner").rglob("__init__.py")}
    for package in packages:  # every subpackage of the source tree is installed
        assert f"{package}/__init__.py" in names, package
    for path in (ROOT / "callbacks").glob("*.py"):
        assert f"captioner/callbacks/{path.name}" in names, path.name
    for path in (ROOT / "configs").rglob("*.yaml"):
        assert f"captioner/configs/{path.relative_to(ROOT / 'configs').as_posix()}" in names, path
    for path in (ROOT / "captioner" / "serve" / "static").iterdir():
        assert f"captioner/serve/static/{path.name}" in names, path.name


def test_a_shipped_config_is_found_by_name_a_path_wins_and_an_unknown_name_lists_them(tmp_path, monkeypatch):
    available = shipped_configs()
    assert {
        "demo",
        "default",
        "decoders/transformer",
        "decoders/attention",
        "objectives/scst",
        "encoders/clip_vit_b32",
    } <= set(available)
    assert Path(resolve_config("demo")) == ROOT / "configs" / "demo.yaml"
    assert Path(resolve_config("decoders/transformer.yaml")) == ROOT / "configs" / "decoders" / "transformer.yaml"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("seed_everything: 1\n")  # a file of that name beside the user: it wins
    assert resolve_config("demo") == "demo"
    expanded = with_shipped_configs(["fit", "--config", "default", "--config=decoders/attention", "--model.lr", "1"])
    # default extends base: base first, then default's own keys (`extends` read and left out), then the overlay's,
    # the run named after it.
    assert expanded[:3] == ["fit", "--config", str(available["base"])]
    assert expanded[3] == "--config" and "extends" not in expanded[4] and "model:" in expanded[4]
    assert expanded[5] == "--config" and "AttentionDecoder" in expanded[6] and "run_name" not in expanded[6]
    assert expanded[7:] == ["--model.lr", "1", "--trainer.logger.init_args.name", "attention"]
    with pytest.raises(
        CaptionerError, match=r"no shipped config of that name\. Shipped: base, decoders/attention, .*demo"
    ):
        resolve_config("demoo")


def test_the_configs_command_lists_what_each_is_for(capsys):
    from captioner.cli import main

    main(["configs"])
    out = capsys.readouterr().out
    assert "demo" in out and "Offline demo" in out and "decoders/transformer" in out


def test_an_old_config_naming_callbacks_still_runs_with_one_deprecation_line(trained, scenes_source, tmp_path):
    """Outside the checkout (no `callbacks/` folder on the path), as an installed captioner runs."""
    checkpoint, _ = trained
    photos = copy_scenes(scenes_source, tmp_path / "photos", 2)
    old = tmp_path / "old.yaml"
    old.write_text(TINY_CONFIG.read_text().replace("captioner.callbacks.LastCheckpoint", "callbacks.LastCheckpoint"))
    args = [
        "predict",
        "--config",
        str(old),
        "--ckpt_path",
        str(checkpoint),
        "--data.predict_dir",
        str(photos),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        "--trainer.callbacks+=callbacks.CaptionWriter",
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-m", "captioner", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("'callbacks.…' in a config is deprecated; write 'captioner.callbacks.…'") == 1
    assert "2 captioned, 0 failed" in result.stdout
    assert len(list(tmp_path.rglob("predictions.jsonl"))) == 1


def test_modules_that_moved_still_import_by_their_old_names_with_one_deprecation_line():
    """Plugins and configs written for the first 0.3 layout (`captioner.errors`, `captioner.checkpointing`) work."""
    code = (
        "import captioner.errors, captioner.parts\n"
        "from captioner.checkpointing import AtomicCheckpointIO\n"
        "from captioner.core.errors import CaptionerError\n"
        "from captioner.models.checkpoints import AtomicCheckpointIO as New\n"
        "assert captioner.errors.CaptionerError is CaptionerError and AtomicCheckpointIO is New\n"
        "import captioner.errors\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines == [
        f"captioner: '{old}' is deprecated; it is '{new}' now (it works for now)."
        for old, new in (
            ("captioner.errors", "captioner.core.errors"),
            ("captioner.parts", "captioner.core.parts"),
            ("captioner.checkpointing", "captioner.models.checkpoints"),
        )
    ]
