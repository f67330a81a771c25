"""Phases at the user's scale: the records pass over web-scale shards (time and peak memory against the number of
records), and bulk captioning (`caption-set`, one process and two) against `Captioner.predict` on the same files,
with where a batch's time goes (decoding the files, the encoder, the search)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import ROOT


def _resident_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(next(line for line in handle if line.startswith(field)).split()[1])


def records_pass(work: str, count: int) -> dict:
    """The records pass (`prepare_data`) over `count` captions-only records in shards of 10,000: seconds, and how far
    the peak resident memory rose over what the process held before it."""
    from captioner.data.datamodule import CaptionDataModule
    from captioner.data.synthetic import write_caption_shards
    from captioner.encoders.torchvision_models import TorchvisionEncoder

    shards = write_caption_shards(Path(work) / f"shards-{count}", count, per_shard=10_000)
    import webdataset.tariterators  # noqa: F401  (what the pass imports, loaded before the baseline)

    with open("/proc/self/clear_refs", "w") as handle:  # the high-water mark restarts here
        handle.write("5")
    before = _resident_kb("VmRSS:")
    started = time.perf_counter()
    CaptionDataModule(data_dir=str(shards), work_dir=str(Path(work) / f"work-{count}"), val_size=1000,
                      test_size=1000, min_word_count=1, encoder=TorchvisionEncoder("resnet18", None, 32)).prepare_data()
    return {"seconds": time.perf_counter() - started, "records": count,
            "peak_rise_mb": (_resident_kb("VmHWM:") - before) / 1024}  # fmt: skip


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


def caption_files(checkpoint: str, images_dir: str, names: list[str], batch_size: int, threads: int) -> dict:
    """`Captioner` over the files, the same batches the bulk job makes, timed by stage: decoding the files (in
    `threads` threads, as the job does), the encoder, and the search."""
    import torch

    from captioner.inference import Captioner
    from captioner.models import captioning

    captioner = Captioner.from_checkpoint(checkpoint, device="cpu")
    paths = [Path(images_dir) / name for name in names]
    stages = {"decode_s": 0.0, "encode_s": 0.0, "search_s": 0.0}
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool, torch.no_grad():
        for start in range(0, len(paths), batch_size):
            moment = time.perf_counter()
            pixels = list(pool.map(lambda path: captioner.pixels_from_bytes(path.read_bytes()),
                                   paths[start : start + batch_size]))  # fmt: skip
            stages["decode_s"] += time.perf_counter() - moment
            moment = time.perf_counter()
            features = captioner.model.encode_images(torch.stack(pixels))
            stages["encode_s"] += time.perf_counter() - moment
            moment = time.perf_counter()
            captioning.decode_features(captioner.model, features, captioner.decoding)
            stages["search_s"] += time.perf_counter() - moment
    elapsed = time.perf_counter() - started
    return {"images_per_s": len(paths) / elapsed, "images": len(paths),
            **{key: value / elapsed for key, value in stages.items()}}  # fmt: skip


def caption_set(checkpoint: str, images_dir: str, work: str, processes: int, batch_size: int, threads: int) -> dict:
    """`python -m captioner caption-set` over the folder into JSON Lines, `processes` processes (DDP on the CPU):
    images per second of the whole job, start-up and model loading included."""
    output = Path(work) / f"caption-set-{processes}"
    command = [sys.executable, "-m", "captioner", "caption-set", "--ckpt_path", checkpoint, "--input", images_dir,
               "--format", "jsonl", "--output", str(output), "--batch_size", str(batch_size), "--threads",
               str(threads), "--trainer.devices", str(processes), "--trainer.accelerator", "cpu"]  # fmt: skip
    started = time.perf_counter()
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=environment)
    if done.returncode:
        raise RuntimeError(f"caption-set failed: {done.stderr[-1500:]}")
    elapsed = time.perf_counter() - started
    summary = json.loads((output / ".captioner-job" / "summary.json").read_text())
    return {"images_per_s": summary["captioned"] / elapsed, "images": summary["captioned"], "processes": processes}
