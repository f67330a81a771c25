"""Captioning a set of images as one job: resumable, idempotent, shared out over the processes Lightning launches.

    python -m captioner caption-set --ckpt_path best.ckpt --input photos/ --format txt
    python -m captioner caption-set --ckpt_path best.ckpt --input 'shards/{00000..00099}.tar' --format webdataset \\
        --output recaptioned/ --trainer.devices 8 --trainer.num_nodes 2 --num_beams 3

Every rank (Lightning Fabric's launch: `--trainer.devices`, `--trainer.num_nodes`,
DDP) takes its share of the parts not done (rank 0 decides which, for all), decodes
their images in threads, captions them in batches and writes each part's output
atomically when the part is done (`captioner.bulk.outputs`). A rerun, or a killed
run started again, does only the parts not done, so no image is captioned twice
into the outputs; `--overwrite` redoes everything. Rank 0 shows one progress bar
(images/s and ETA over all ranks) and prints one summary at the end: captioned,
failed with their reasons, skipped as done.

An image's caption does not depend on its batch-mates, its rank or the entry point:
the same search as `caption`, `Captioner` and the server, seeded sampling included
(each image's random stream is seeded by its pixels).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from captioner.bulk.inputs import FILES_PER_PART, InputPart, Sample, input_parts
from captioner.bulk.outputs import FORMATS, Output, output_for
from captioner.core.errors import CaptionerError
from captioner.core.files import read_json, write_json
from captioner.core.parts import add_allow_argument, allow_modules
from captioner.core.pixels import DECODE_ERRORS, describe_error
from captioner.decoding import config as decoding_config

log = logging.getLogger("captioner")
STATE_DIR = ".captioner-job"
PROGRESS_EVERY_S = 1.0


def _batches(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Tally:
    """What a rank did: images captioned, failed (by reason), skipped as done; written for rank 0 to add up."""

    def __init__(self, folder: Path, rank: int) -> None:
        self.path = folder / f"rank{rank}.json"
        self.captioned, self.skipped, self.failed = 0, 0, Counter()
        self.examples: dict[str, str] = {}
        self.saved = 0.0

    def fail(self, name: str, reason: str) -> None:
        kind = reason.split(":")[0].split(" (")[0]
        self.failed[kind] += 1
        self.examples.setdefault(kind, f"{name}: {reason}")

    def save(self, force: bool = False) -> None:
        if force or time.monotonic() - self.saved > PROGRESS_EVERY_S:
            write_json(self.path, {"captioned": self.captioned, "skipped": self.skipped, "failed": dict(self.failed),
                                   "examples": self.examples})  # fmt: skip
            self.saved = time.monotonic()

    @staticmethod
    def total(folder: Path) -> dict[str, Any]:
        """Every rank's counts added up."""
        total = {"captioned": 0, "skipped": 0, "failed": Counter(), "examples": {}}
        for path in folder.glob("rank*.json"):
            try:
                counts = read_json(path, "Job progress")
            except CaptionerError:  # being replaced right now: read at the next refresh
                continue
            total["captioned"] += counts["captioned"]
            total["skipped"] += counts["skipped"]
            total["failed"].update(counts["failed"])
            total["examples"].update(counts["examples"])
        return total


def _wanted(part: InputPart, output: Output, overwrite: bool, tally: Tally) -> Iterator[Sample]:
    """The part's images that still need a caption (the others counted as skipped)."""
    for sample in part.samples():
        if output.wanted(part, sample, overwrite):
            yield sample
        else:
            tally.skipped += 1


def caption_part(captioner: Any, part: InputPart, output: Output, batch_size: int, pool: ThreadPoolExecutor,
                 tally: Tally, overwrite: bool, bar: Any = None, state: Path | None = None) -> None:  # fmt: skip
    """Caption one part's images in batches and write its output, complete, at the end."""
    written = output.begin(part)
    try:
        for batch in _batches(_wanted(part, output, overwrite, tally), batch_size):
            decoded = list(pool.map(lambda sample: _pixels(captioner, sample), batch))
            ok = [index for index, pixels in enumerate(decoded) if not isinstance(pixels, str)]
            described = captioner.describe([decoded[i] for i in ok]) if ok else []
            rows = [{"image": sample.name, "caption": None, "score": None, "error": pixels}
                    if isinstance(pixels, str) else None for sample, pixels in zip(batch, decoded)]  # fmt: skip
            for index, row in zip(ok, described):
                rows[index] = {"image": batch[index].name, "caption": row["caption"], "score": row["score"],
                               "error": None}  # fmt: skip
                for optional in ("alternatives", "confidence", "clip_score"):
                    if optional in row:
                        rows[index][optional] = row[optional]
            for row in rows:
                if row["error"]:
                    tally.fail(row["image"], row["error"])
            written.add(rows, batch)
            tally.captioned += len(ok)
            tally.save()
            if bar is not None and state is not None and time.monotonic() - bar.last_print_t > 1.0:
                total = Tally.total(state)  # every rank's count: one bar for the whole job
                bar.update(total["captioned"] + sum(total["failed"].values()) - bar.n)
        written.finish()
    except BaseException:
        written.abandon()
        raise


def _pixels(captioner: Any, sample: Sample) -> Any:
    """The encoder's input for one image, or why it cannot be read (a string)."""
    if isinstance(sample.data, BaseException):
        return describe_error(sample.data) if isinstance(sample.data, DECODE_ERRORS) else str(sample.data)
    try:
        return captioner.pixels_from_bytes(sample.data)
    except DECODE_ERRORS as error:
        return describe_error(error)


def run_job(fabric: Any, options: argparse.Namespace) -> dict[str, Any]:
    """One rank's share of the job, then (rank 0) the summary of all. Every rank calls it."""
    from captioner.captioners import load_captioner

    parts = input_parts(options.input, options.input_kind, options.files_per_part)
    output = output_for(options.format, options.output, parts)
    state = output.folder / STATE_DIR
    if fabric.global_rank == 0:
        if options.overwrite:
            for part in parts:
                output.remove(part)
        state.mkdir(parents=True, exist_ok=True)
        for old in state.glob("rank*.json"):
            old.unlink()
    fabric.barrier()
    pending = fabric.broadcast([part.name for part in parts if not output.done(part)] if fabric.global_rank == 0
                               else None)  # fmt: skip
    by_name = {part.name: part for part in parts}
    mine = [by_name[name] for name in pending[fabric.global_rank :: fabric.world_size]]
    settings = decoding_config.overrides_from(options)
    captioner = load_captioner(options.ckpt_path, str(fabric.device), options.rerank_clip, **settings)
    captioner.batch_size = options.batch_size
    tally = Tally(state, fabric.global_rank)
    done_before = len(parts) - len(pending)
    bar = None
    if fabric.global_rank == 0:
        from tqdm.auto import tqdm

        known = sum(len(part.files) for part in parts if part.name in set(pending) and part.shard is None)
        bar = tqdm(total=known or None, unit="img", desc="captioning", dynamic_ncols=True, file=sys.stderr,
                   mininterval=1.0)  # fmt: skip
    with ThreadPoolExecutor(max(1, options.threads), thread_name_prefix="bulk-decode") as pool:
        for part in mine:
            caption_part(captioner, part, output, options.batch_size, pool, tally, options.overwrite, bar, state)
    tally.save(force=True)
    fabric.barrier()
    if fabric.global_rank != 0:
        return {}
    total = Tally.total(state)
    if bar is not None:
        bar.update(total["captioned"] + sum(total["failed"].values()) - bar.n)
        bar.close()
    summary = {"parts": len(parts), "parts_done_before": done_before, "captioned": total["captioned"],
               "failed": dict(total["failed"]), "skipped_as_done": total["skipped"],
               "examples": total["examples"], "output": str(output.folder), "format": options.format}  # fmt: skip
    write_json(state / "summary.json", summary)
    failed = sum(summary["failed"].values())
    if pending:
        line = (f"{summary['captioned']} images captioned, {failed} failed, {summary['skipped_as_done']} skipped as "
                f"done; {done_before} of {len(parts)} parts were done before this run; {options.format} in "
                f"{output.folder}")  # fmt: skip
    else:
        line = (f"Nothing left to caption: all {len(parts)} parts were done before this run ({options.format} in "
                f"{output.folder}); --overwrite captions them again.")  # fmt: skip
    if failed:
        line += " (failed: " + "; ".join(f"{count} {reason}, e.g. {summary['examples'].get(reason, '')}"
                                         for reason, count in summary["failed"].items()) + ")"  # fmt: skip
    print(line, file=sys.stderr)
    return summary


def caption_set_parser() -> argparse.ArgumentParser:
    """The options of `python -m captioner caption-set`."""
    parser = argparse.ArgumentParser(prog="python -m captioner caption-set", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by fit, or an exported folder")
    parser.add_argument("--input", required=True,
                        help="a folder of images (recursive), a text file listing image paths, or WebDataset shards "
                             "(a folder of *.tar, a brace pattern, URLs)")  # fmt: skip
    parser.add_argument("--input_kind", default="auto", choices=["auto", "folder", "list", "shards"])
    parser.add_argument("--format", default="jsonl", choices=FORMATS,
                        help="txt: a .txt beside each image; jsonl or parquet: one file per part; webdataset: new "
                             "shards with the caption added")  # fmt: skip
    parser.add_argument("--output", default=None, help="the output folder (txt: mirror the input tree there)")
    parser.add_argument("--overwrite", action="store_true", help="caption again what a previous run did")
    parser.add_argument("--batch_size", type=int, default=32, help="images captioned together")
    parser.add_argument("--threads", type=int, default=8, help="images decoded at once")
    parser.add_argument("--files_per_part", type=int, default=FILES_PER_PART,
                        help="image files per part (a shard is one part): the unit of resuming")  # fmt: skip
    parser.add_argument("--trainer.accelerator", dest="accelerator", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--trainer.devices", dest="devices", default="1", help="processes per node (GPUs), or auto")
    parser.add_argument("--trainer.num_nodes", dest="num_nodes", type=int, default=1)
    parser.add_argument("--trainer.strategy", dest="strategy", default=None, help="auto, ddp, ... (Lightning's)")
    decoding_config.add_arguments(parser)
    add_allow_argument(parser)
    return parser


def caption_set_command(argv: list[str]) -> dict[str, Any]:
    """`python -m captioner caption-set ...`: the whole job, launched by Lightning Fabric on every rank."""
    from lightning.fabric import Fabric

    options = caption_set_parser().parse_args(argv)
    allow_modules(*options.allow_module)
    devices = options.devices if options.devices == "auto" else int(options.devices)
    several = devices == "auto" or devices > 1 or options.num_nodes > 1
    strategy = options.strategy or ("ddp" if several else "auto")
    fabric = Fabric(accelerator=options.accelerator, devices=devices, num_nodes=options.num_nodes, strategy=strategy)
    return fabric.launch(run_job, options) or {}


def read_rows(folder: str | Path) -> list[dict[str, Any]]:
    """Every row a job wrote as JSON Lines under `folder` (for people and tests)."""
    return [json.loads(line) for path in sorted(Path(folder).glob("*.jsonl")) for line in path.open(encoding="utf-8")]
