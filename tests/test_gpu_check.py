"""scripts/gpu_check.py, the prepared check of the GPU path, in its CPU dry run: every stage but the CUDA calls (the
offline install of carried wheels, the GPU tests collected, the ViT + prefix-LM demo trained and scored), its JSON
written and read back; and the slimming of a carried wheel."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
import zipfile

import pytest

from tests.conftest import TESTS

ROOT = TESTS.parent


def load_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_wheel(folder, name: str, files: dict[str, bytes]) -> object:
    """A minimal valid wheel of `name` 1.0 holding `files`."""
    info = f"{name}-1.0.dist-info"
    entries = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in [*entries, f"{info}/RECORD"])
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for entry, data in entries.items():
            wheel.writestr(entry, data)
        wheel.writestr(f"{info}/RECORD", record)
    return path


def test_a_carried_wheel_loses_its_java_parts_and_their_record_lines(tmp_path):
    check = load_check()
    wheel = fake_wheel(
        tmp_path,
        "pycocoevalcap",
        {
            "pycocoevalcap/cider/cider.py": b"# cider",
            "pycocoevalcap/spice/spice-1.0.jar": b"x" * 1000,
            "pycocoevalcap/meteor/meteor.py": b"# meteor",
            "pycocoevalcap/meteor/data/paraphrase-en.gz": b"y" * 1000,
            "pycocoevalcap/tokenizer/stanford-corenlp-3.4.1.jar": b"z" * 1000,
        },
    )
    check.slim_wheel(wheel)
    with zipfile.ZipFile(wheel) as slim:
        names = slim.namelist()
        record = slim.read("pycocoevalcap-1.0.dist-info/RECORD").decode()
    assert "pycocoevalcap/cider/cider.py" in names and "pycocoevalcap/meteor/meteor.py" in names
    assert not [name for name in names if name.endswith(".jar") or "/spice/" in name or "/meteor/data/" in name]
    assert ".jar" not in record and "cider.py" in record


def test_the_dry_run_goes_through_its_stages_but_the_cuda_calls_and_writes_its_figures(tmp_path):
    """Environment, the offline install of carried wheels (pip's dry run), the GPU tests collected: a JSON of each.
    (The benchmark's and the demo's dry runs take minutes on a CPU: `gpu_check.py run --dry-run` runs them; here the
    demo's command line is checked by LightningCLI, below.)"""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "captioner_gpu_probe", {"captioner_gpu_probe/__init__.py": b""})
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "scripts/gpu_check.py",
            "run",
            "--dry-run",
            "--out",
            str(out),
            "--wheels",
            str(wheels),
            "--stages",
            "environment,install,tests",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stages = json.loads((out / "gpu_check.json").read_text())["stages"]
    assert list(stages) == ["environment", "install", "tests"]
    assert stages["environment"]["cuda_available"] is False and stages["environment"]["python"]
    assert stages["install"]["wheels"] == ["captioner_gpu_probe-1.0-py3-none-any.whl"]
    assert stages["tests"]["collected"] >= 15  # every GPU test collected: none fails to import


def test_the_demo_stage_is_a_valid_run_of_the_shipped_demo_config(capsys):
    """The ViT-B/32 + prefix-LM demo the GPU runs, as LightningCLI reads it (every option known, CSV logs)."""
    from captioner.cli import main

    check = load_check()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "demo.yaml"), *check.DEMO, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "vit_b_32" in printed and "PrefixLMDecoder" in printed and "CSVLogger" in printed


def test_a_time_box_ends_the_command_with_everything_it_started_and_keeps_its_log(tmp_path):
    # The benchmark's phase processes outlived its time box on the GPU machine and held the GPU through the next
    # stage: the box must end the whole process group.
    check = load_check().Check(tmp_path, budget=60, dry_run=True)
    script = "sleep 120 & echo child $!; sleep 120"
    with pytest.raises(subprocess.TimeoutExpired) as cut:
        check.command(["bash", "-c", script], limit=5, log="boxed.log")  # time for bash to start on a busy machine
    child = int(cut.value.output.split("child ")[1].split()[0])  # the log's text comes with the timeout
    deadline = time.monotonic() + 10  # SIGKILL is delivered when the child is next scheduled, not at once
    while True:
        try:
            state = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            state = "gone"
        if state in ("gone", "Z") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert state in ("gone", "Z"), f"the background child is still {state}"


def test_stages_joined_by_a_plus_run_together_and_each_lands_in_the_report(tmp_path, monkeypatch):
    gpu_check = load_check()
    started = {}

    def stage(name):
        def run(check, limit):
            started[name] = gpu_check.time.monotonic()
            gpu_check.time.sleep(1.0)
            return {"status": "ok", "limit": limit}

        return run

    monkeypatch.setattr(gpu_check, "environment_stage", stage("environment"))
    monkeypatch.setattr(gpu_check, "tests_stage", stage("tests"))
    monkeypatch.setattr(gpu_check, "demo_stage", stage("demo"))
    results = gpu_check.run(tmp_path, budget=100, dry_run=True, stages=["environment", "tests+demo"])
    assert set(results["stages"]) == {"environment", "tests", "demo"}
    assert abs(started["tests"] - started["demo"]) < 0.5  # together, not one after the other
    assert started["tests"] - started["environment"] >= 0.9
    # The last group takes all that is left; an earlier one its share.
    assert results["stages"]["tests"]["limit"] > 90 and results["stages"]["environment"]["limit"] <= 10
    assert json.loads((tmp_path / "gpu_check.json").read_text())["stages"].keys() == results["stages"].keys()
