"""The GPU path checked in one command, on a bare GPU machine, within ten minutes; every figure written as JSON.

On a machine with the package registry (once, in the repository's root), the wheels the GPU machine lacks:

    python scripts/gpu_check.py prepare            # into .whl/ (ignored by git): about 27 MB for CPython 3.12

On the GPU machine (the repository with .whl/ beside it; nothing is fetched there):

    python scripts/gpu_check.py run --out "$OUT"   # install offline, GPU tests, GPU benchmark, ViT + prefix-LM demo

On a CPU, everything but the CUDA calls (what the test suite runs):

    python scripts/gpu_check.py run --dry-run --out /tmp/gpu-check

`run` goes through its stages in order, each in its own process under a time box cut from the whole budget
(`--budget`, 540 s by default), and rewrites `gpu_check.json` in `--out` after each, so a stage that hangs or a
machine taken back still leaves what was measured before it:

- environment: Python, torch, CUDA, the device, its bf16 support, which optional libraries import;
- install: the carried wheels into a private folder put on PYTHONPATH (pip --no-index: never the network);
- tests: `pytest -m gpu` (tests/test_gpu.py: bf16 training steps of each decoder on the resident store, a
  compiled search with CUDA graphs against eager, nvJPEG against PIL pixels, the compiled encoder, an encoder
  fine-tuning step, prefix-LM and LoRA steps), with a JUnit report; the dry run collects them only;
- benchmark: `scripts/benchmark.py`'s GPU phases (extraction with the decode threads, training cached and resident,
  greedy and beam-3 with and without the compiled step, the Transformer, ViT-B/32- and DINOv2-shaped encoders at
  224 px, the prefix decoder over a GPT-2-small-shaped LM), the JSON kept;
- demo: the demo trained end to end on the GPU with a ViT-B/32 encoder (random weights, 224 px) and the prefix
  LM (a small GPT-2 from a config over a BPE of the captions), its held-out metrics and time.

The wheels are those of packages the GPU image lacks (its package list is in the device notes), at the versions
installed here, so the GPU runs what CI tested: pycocoevalcap without its Java jars (the GPU machine has no Java;
the captions are then tokenized in Python), no wandb (the check's runs log to CSV).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
# What the GPU image lacks that the check needs (the image has torch, lightning, transformers, timm, peft,
# scikit-image, pytest, pyarrow, onnx and onnxruntime).
CARRIED = [
    "jsonargparse",
    "docstring-parser",
    "typeshed-client",
    "pycocoevalcap",
    "open_clip_torch",
    "ftfy",
    "wcwidth",
    "litdata",
    "boto3",
    "botocore",
    "s3transfer",
    "jmespath",
    "obstore",
    "webdataset",
    "braceexpand",
]
# Not carried: wandb (its dependencies weigh more than the rest: the check logs to CSV), litserve and kagglehub (no
# GPU test serves or downloads).
# pycocoevalcap's Java tools and data (100 MB): nothing on the GPU machine can run them.
JAVA_PARTS = ("pycocoevalcap/spice/", "pycocoevalcap/meteor/data/", ".jar")
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
# The benchmark's phases that say something about a GPU (`--only` patterns), those the targets name first
# within each part of the benchmark (it runs them in its own order; a time box cut keeps the phases measured).
GPU_PHASES = [
    "extract",
    "extract_open_clip_vit_b32",
    "extract_hf_dinov2_small",
    "train_small",
    "train_disk",
    "greedy",
    "beam3",
    "greedy_compiled",
    "beam3_compiled",
    "beam3_wide",
    "train_transformer",
    "beam3_transformer",
    "train_prefix*",
    "beam3_prefix",
    "train_encoder_*",
    "beam3_lstm_same",
]
# The demo's run: ViT-B/32 at 224 px (torchvision, random weights) and a small GPT-2 prefix LM over a BPE.
SMALL_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 64}
DEMO = [
    "--model.encoder.model",
    "vit_b_32",
    "--model.encoder.image_size",
    "224",
    "--model.decoder",
    "captioner.models.decoders.PrefixLMDecoder",
    "--model.decoder.lm",
    "null",
    "--model.decoder.lm_config",
    json.dumps(SMALL_GPT2),
    "--model.decoder.train_lm",
    "true",
    "--model.decoder.prefix_length",
    "4",
    "--model.decoder.mapper",
    "mlp",
    "--model.decoder.dropout",
    "0.1",
    "--data.tokenizer",
    "captioner.text.Bpe",
    "--data.tokenizer.vocab_size",
    "500",
    "--model.lr",
    "0.001",
    "--model.warmup_steps",
    "100",
    "--trainer.logger",
    "lightning.pytorch.loggers.CSVLogger",
]
# Each stage's share of what is left of the budget when it starts (the last takes the rest).
SHARES = {"environment": 0.05, "install": 0.1, "tests": 0.5, "benchmark": 0.6, "demo": 0.5}


# ------------------------------------------------------------------ prepare (where the registry is)
def prepare(folder: Path, python_version: str) -> list[Path]:
    """Download the carried wheels (the versions installed here) for CPython `python_version` on x86-64 Linux,
    pycocoevalcap slimmed of its Java parts. Returns the wheels."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in CARRIED:
        version = importlib.metadata.version(name)
        platforms = [argument for platform_tag in PLATFORMS for argument in ("--platform", platform_tag)]
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                python_version,
                "--implementation",
                "cp",
                *platforms,
                "-d",
                str(folder),
                f"{name}=={version}",
            ],
            check=True,
        )
    for wheel in folder.glob("pycocoevalcap-*.whl"):
        slim_wheel(wheel)
    wheels = sorted(folder.glob("*.whl"))
    total = sum(wheel.stat().st_size for wheel in wheels) / 2**20
    print(f"{len(wheels)} wheels, {total:.1f} MiB in {folder} (carry it: the device tool's `carry: [.whl]`)")
    return wheels


def slim_wheel(wheel: Path) -> None:
    """Rewrite `wheel` without its Java parts (and their RECORD lines), atomically."""
    with zipfile.ZipFile(wheel) as source:
        kept = [item for item in source.infolist() if not any(part in item.filename for part in JAVA_PARTS)]
        if len(kept) == len(source.infolist()):
            return
        partial = wheel.with_suffix(".partial")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as target:
            for item in kept:
                data = source.read(item)
                if item.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines()
                    data = "\n".join(line for line in lines if not any(p in line for p in JAVA_PARTS)).encode()
                target.writestr(item, data)
    os.replace(partial, wheel)


# ------------------------------------------------------------------ run (on the GPU machine, or dry on a CPU)
class Check:
    """The stages' results, rewritten to `gpu_check.json` after each."""

    def __init__(self, out: Path, budget: float, dry_run: bool, wheels: Path = WHEELS) -> None:
        self.out, self.dry_run, self.wheels = out, dry_run, wheels
        self.deadline = time.monotonic() + budget
        self.lock = threading.Lock()
        self.phases = GPU_PHASES
        self.results: dict = {"dry_run": dry_run, "budget_s": budget, "stages": {}}
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self.environment = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled", PYTHONPATH=path)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def stage(self, name: str, function, share: float) -> None:
        limit = max(10.0, self.left() * share)
        started = time.monotonic()
        print(f"== {name} (at most {limit:.0f} s)", flush=True)
        try:
            result = function(limit)
        except subprocess.TimeoutExpired as error:
            result = {"status": "timeout", "after_s": limit, "output_tail": _tail(error.output)}
        except Exception as error:  # a stage that breaks is reported; the next ones still run
            result = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
        result["seconds"] = round(time.monotonic() - started, 1)
        with self.lock:  # stages run together write one file
            self.results["stages"][name] = result
            self.save()
        print(json.dumps({name: result}, indent=1)[:3000], flush=True)

    def command(self, arguments: list[str], limit: float, log: str) -> subprocess.CompletedProcess:
        """Run `arguments` under `limit` seconds, its output kept in `log` under --out."""
        with open(self.out / log, "w") as sink:
            # A session of its own: a time box ends the command with all it started (the benchmark's phase
            # processes, loader workers, pytest's children), which would hold the GPU through the next stage.
            process = subprocess.Popen(
                arguments,
                cwd=ROOT,
                env=self.environment,
                stdout=sink,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            try:
                returncode = process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise subprocess.TimeoutExpired(arguments, limit, output=(self.out / log).read_text()) from None
        return subprocess.CompletedProcess(arguments, returncode)

    def save(self) -> None:
        partial = self.out / "gpu_check.json.partial"
        partial.write_text(json.dumps(self.results, indent=1))
        os.replace(partial, self.out / "gpu_check.json")


def environment_stage(check: Check, limit: float) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    result = {
        "status": "ok",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": cuda,
        "cpu_count": os.cpu_count(),
        "libraries": {
            name: importlib.util.find_spec(module) is not None
            for name, module in (
                ("jsonargparse", "jsonargparse"),
                ("transformers", "transformers"),
                ("timm", "timm"),
                ("open_clip", "open_clip"),
                ("peft", "peft"),
                ("litdata", "litdata"),
                ("pycocoevalcap", "pycocoevalcap"),
                ("wandb", "wandb"),
                ("onnxruntime", "onnxruntime"),
            )
        },
    }
    if cuda:
        properties = torch.cuda.get_device_properties(0)
        result.update(
            device=properties.name,
            memory_gib=round(properties.total_memory / 2**30, 1),
            capability=f"{properties.major}.{properties.minor}",
            bf16=torch.cuda.is_bf16_supported(),
        )
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        result["nvidia_smi"] = smi.stdout.strip()
    if not cuda and not check.dry_run:
        result["status"] = "failed"
        result["error"] = "no CUDA device: run with --dry-run on a CPU"
    return result


def install_stage(check: Check, limit: float) -> dict:
    started = time.monotonic()
    wheels = sorted(check.wheels.glob("*.whl"))
    if not wheels:
        return {"status": "skipped", "reason": f"no wheels in {check.wheels} (python scripts/gpu_check.py prepare)"}
    target = Path(tempfile.gettempdir()) / "captioner-gpu-site"
    arguments = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--upgrade",
        "--target",
        str(target),
        *map(str, wheels),
    ]
    if check.dry_run:
        arguments.insert(4, "--dry-run")
    done = check.command(arguments, limit, "install.log")
    if done.returncode:
        return {"status": "failed", "output_tail": _tail((check.out / "install.log").read_text())}
    # The project itself, editable: its packages are mapped (callbacks/ is captioner.callbacks), so the checkout on
    # PYTHONPATH alone does not import. No build isolation: its build backend is the image's setuptools.
    project = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-index",
        "--no-deps",
        "--no-build-isolation",
        "--no-cache-dir",
        *(["--dry-run"] if check.dry_run else []),
        "-e",
        str(ROOT),
    ]
    done = check.command(project, max(10.0, limit - (time.monotonic() - started)), "install.log")
    if done.returncode:
        return {"status": "failed", "output_tail": _tail((check.out / "install.log").read_text())}
    if not check.dry_run:  # every later stage imports them from there
        check.environment["PYTHONPATH"] = os.pathsep.join([str(target), check.environment["PYTHONPATH"]])
    return {"status": "ok", "wheels": [wheel.name for wheel in wheels]}


def tests_stage(check: Check, limit: float) -> dict:
    report = check.out / "gpu_tests.xml"
    # -v: each test's outcome in the log as it ends, so a stage cut by its time box still says which passed.
    arguments = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-p",
        "no:cacheprovider",
        "-n",
        "0",
        "-q" if check.dry_run else "-v",
        "--durations",
        "0",
        "--junitxml",
        str(report),
        "tests/test_gpu.py",
    ]
    if check.dry_run:
        arguments.append("--collect-only")
    done = check.command(arguments, limit, "gpu_tests.log")
    log = (check.out / "gpu_tests.log").read_text()
    result = {"status": "ok" if done.returncode == 0 else "failed", "exit_code": done.returncode}
    if check.dry_run:
        result["collected"] = sum(1 for line in log.splitlines() if "::test_" in line)
        return result
    if report.is_file():
        suite = ElementTree.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        result.update({key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")})
        result["failed"] = [
            case.get("name")
            for case in suite.iter("testcase")
            if case.find("failure") is not None or case.find("error") is not None
        ]
    result["output_tail"] = _tail(log)
    return result


def benchmark_stage(check: Check, limit: float) -> dict:
    figures = check.out / "benchmark.json"
    partial = figures.with_suffix(".partial.json")  # each phase as it is measured (scripts/bench/harness.py)
    device = ["--device", "cpu", "--sizes", "dry"] if check.dry_run else ["--device", "cuda"]
    arguments = [
        sys.executable,
        "scripts/benchmark.py",
        *device,
        "--json",
        str(figures),
        "--only",
        ",".join(check.phases),
    ]
    try:
        done = check.command(arguments, limit, "benchmark.log")
    except subprocess.TimeoutExpired:  # the phases measured before the time box closed are kept
        phases = json.loads(partial.read_text()) if partial.is_file() else {}
        return {
            "status": "timeout",
            "after_s": round(limit),
            "phases": phases,
            "output_tail": _tail((check.out / "benchmark.log").read_text()),
        }
    if not figures.is_file():
        return {
            "status": "failed",
            "exit_code": done.returncode,
            "output_tail": _tail((check.out / "benchmark.log").read_text()),
        }
    partial.unlink(missing_ok=True)  # the whole run is in benchmark.json
    summary = json.loads(figures.read_text())["summary"]
    return {
        "status": "ok" if done.returncode == 0 else "failed",
        "exit_code": done.returncode,
        "figures": {key: value for key, value in summary.items() if value is not None},
    }


def demo_stage(check: Check, limit: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix="captioner-gpu-demo-"))
    sizes = (
        [
            "--data.origin.synthetic_images",
            "48",
            "--data.splits.val_size",
            "8",
            "--data.splits.test_size",
            "8",
            "--trainer.max_epochs",
            "1",
            "--trainer.accelerator",
            "cpu",
            "--data.loading.batch_size",
            "16",
        ]
        if check.dry_run
        else ["--trainer.max_epochs", "6"]
    )
    arguments = [
        sys.executable,
        "-m",
        "captioner",
        "fit",
        "--config",
        "configs/demo.yaml",
        *DEMO,
        *sizes,
        "--data.data_dir",
        str(work / "scenes"),
        "--data.work_dir",
        str(work / "work"),
        "--trainer.logger.init_args.save_dir",
        str(work / "runs"),
        "--trainer.enable_progress_bar",
        "false",
    ]
    started = time.monotonic()
    done = check.command(arguments, limit, "demo.log")
    seconds = time.monotonic() - started
    reports = sorted((work / "runs").rglob("test_metrics.json"))
    if done.returncode or not reports:
        return {
            "status": "failed",
            "exit_code": done.returncode,
            "output_tail": _tail((check.out / "demo.log").read_text()),
        }
    report = json.loads(reports[-1].read_text())
    return {
        "status": "ok",
        "wall_s": round(seconds, 1),
        "encoder": "torchvision vit_b_32, random, 224 px",
        "decoder": "PrefixLMDecoder, GPT-2 2 x 128 from a config, trained; BPE 500",
        "test": report.get("metrics", {}).get("pycocoevalcap"),
        "distinct_captions": report.get("diversity", {}).get("distinct_captions"),
    }


def _tail(text: str | bytes | None, characters: int = 3000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-characters:]


def run(
    out: Path, budget: float, dry_run: bool, stages: list[str], wheels: Path = WHEELS, phases: list[str] | None = None
) -> dict:
    """The stages in the order given, `gpu_check.json` in `out` rewritten after each.

    A stage is one of SHARES; `a+b` runs stages together (their own processes, at once: tests and the demo leave
    most of a GPU machine idle), each under its share of the time left; the last group takes all that is left.
    """
    groups = [group.split("+") for group in stages]
    unknown = {name for group in groups for name in group} - set(SHARES)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}: choose among {','.join(SHARES)}")
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, budget, dry_run, wheels)
    check.phases = phases or GPU_PHASES
    steps = {
        "environment": environment_stage,
        "install": install_stage,
        "tests": tests_stage,
        "benchmark": benchmark_stage,
        "demo": demo_stage,
    }
    for index, group in enumerate(groups):
        last = index == len(groups) - 1
        threads = [
            threading.Thread(
                target=check.stage,
                args=(name, lambda limit, step=steps[name]: step(check, limit), 1.0 if last else SHARES[name]),
            )
            for name in group
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return check.results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepared = commands.add_parser("prepare", help="download the wheels the GPU machine lacks (needs the registry)")
    prepared.add_argument("--wheels", type=Path, default=WHEELS)
    prepared.add_argument("--python_version", default="3.12", help="the GPU machine's Python (3.12 there)")
    running = commands.add_parser("run", help="the check itself")
    running.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check")))
    running.add_argument("--budget", type=float, default=540.0, help="seconds for every stage together")
    running.add_argument("--dry-run", action="store_true", help="on a CPU: everything but the CUDA calls")
    running.add_argument(
        "--stages",
        default=",".join(SHARES),
        help=f"stages among {','.join(SHARES)} in order; a+b runs a and b together",
    )
    running.add_argument("--phases", default=",".join(GPU_PHASES), help="the benchmark's phases (--only patterns)")
    running.add_argument("--wheels", type=Path, default=WHEELS, help="the carried wheels")
    options = parser.parse_args(argv)
    if options.command == "prepare":
        prepare(options.wheels, options.python_version)
        return 0
    results = run(
        options.out,
        options.budget,
        options.dry_run,
        options.stages.split(","),
        options.wheels,
        options.phases.split(","),
    )
    failed = [name for name, stage in results["stages"].items() if stage["status"] in ("failed", "timeout")]
    print(
        f"gpu check: {len(results['stages']) - len(failed)} stages passed, failed: {failed or 'none'}; "
        f"{options.out / 'gpu_check.json'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
