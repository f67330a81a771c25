"""Phases at the user's scale: the records pass over web-scale shards (time and peak memory against the number of
records), and bulk captioning (`caption-set`, one process and two) against `Captioner.predict` on the same files,
both through the captioning engine, with the share of the model's time spent waiting for images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT


def _resident_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(next(line for line in handle if line.startswith(field)).split()[1])


def records_pass(work: str, count: int) -> dict:
    """The records pass (`prepare_data`) over `count` captions-only records in shards of 10,000: seconds, and how far
    the peak resident memory rose over what the process held before it."""
    from captioner.data.datamodule import CaptionDataModule
    from captioner.data.options import Captions, Splits
    from captioner.data.synthetic import write_caption_shards
    from captioner.encoders.torchvision_models import TorchvisionEncoder

    shards = write_caption_shards(Path(work) / f"shards-{count}", count, per_shard=10_000)
    import webdataset.tariterators  # noqa: F401  (what the pass imports, loaded before the baseline)

    with open("/proc/self/clear_refs", "w") as handle:  # the high-water mark restarts here
        handle.write("5")
    before = _resident_kb("VmRSS:")
    started = time.perf_counter()
    CaptionDataModule(
        data_dir=str(shards),
        work_dir=str(Path(work) / f"work-{count}"),
        splits=Splits(val_size=1000, test_size=1000),
        captions=Captions(min_word_count=1),
        encoder=TorchvisionEncoder("resnet18", None, 32),
    ).prepare_data()
    return {
        "seconds": time.perf_counter() - started,
        "records": count,
        "peak_rise_mb": (_resident_kb("VmHWM:") - before) / 1024,
    }


def image_folder(images_dir: str, names: list[str], folder: str, count: int) -> tuple[str, list[str]]:
    """`count` image files (the generated ones, again and again under new names) in a folder of their own: enough
    work that a job's start-up and model loading do not dominate."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    made = []
    for index in range(count):
        name = f"{index:06d}-{names[index % len(names)]}"
        (target / name).write_bytes((Path(images_dir) / names[index % len(names)]).read_bytes())
        made.append(name)
    return str(target), made


def caption_files(
    checkpoint: str, images_dir: str, names: list[str], batch_size: int, threads: int, device: str = "cpu"
) -> dict:
    """The Python API over the files, model loading included (as the job's figure includes it): `Captioner.predict`
    through the captioning engine, and the share of the model's time it waited for images."""
    from captioner.inference import Captioner

    paths = [Path(images_dir) / name for name in names]
    started = time.perf_counter()
    captioner = Captioner.from_checkpoint(checkpoint, device=device, batch_size=batch_size, decode_threads=threads)
    engine = captioner.engine()
    captioned = sum(prediction.caption is not None for prediction in engine.predictions(paths))
    elapsed = time.perf_counter() - started
    stats = engine.stats
    return {
        "images_per_s": len(paths) / elapsed,
        "images": len(paths),
        "captioned": captioned,
        "model_waited_share": stats.waiting_share,
        "captioning_images_per_s": stats.images / max(stats.busy_s + stats.waited_s, 1e-9),
    }


def caption_set(
    checkpoint: str, images_dir: str, work: str, processes: int, batch_size: int, threads: int, device: str = "cpu"
) -> dict:
    """`caption-set` over the folder into JSON Lines: one process in this one (`--launcher none`, model loading
    included, process start-up not, as for the API), or `processes` processes launched by Lightning (DDP, start-up
    included); images per second of the whole job, and the model's waiting share from its summary."""
    output = Path(work) / f"caption-set-{processes}"
    options = [
        "--ckpt_path",
        checkpoint,
        "--input",
        images_dir,
        "--format",
        "jsonl",
        "--output",
        str(output),
        "--batch_size",
        str(batch_size),
        "--threads",
        str(threads),
        "--trainer.accelerator",
        device,
    ]
    started = time.perf_counter()
    if processes == 1:
        import contextlib
        import io

        from captioner.bulk.command import caption_set_command

        with contextlib.redirect_stderr(io.StringIO()):
            caption_set_command([*options, "--launcher", "none"])
    else:
        command = [sys.executable, "-m", "captioner", "caption-set", *options, "--trainer.devices", str(processes)]
        environment = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=environment)
        if done.returncode:
            raise RuntimeError(f"caption-set failed: {done.stderr[-1500:]}")
    elapsed = time.perf_counter() - started
    summary = json.loads((output / ".captioner-job" / "summary.json").read_text())
    images = summary["captioned"] + sum(summary["failed"].values())
    return {
        "images_per_s": images / elapsed,
        "images": images,
        "processes": processes,
        "model_waited_share": summary["model_waited_share"],
        "captioning_images_per_s": summary["images_per_worker_s"],
    }
