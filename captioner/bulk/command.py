"""`python -m captioner caption-set`: its options, and the three ways its workers start (see `captioner.bulk.job`).

    python -m captioner caption-set --ckpt_path best.ckpt --input photos/ --format txt
    python -m captioner caption-set --ckpt_path best.ckpt --input 'shards/{00000..00099}.tar' --format webdataset \\
        --output recaptioned/ --trainer.devices 8 --trainer.num_nodes 2 --num_beams 3
    # independent workers on a shared filesystem (a SLURM array, a Kubernetes Job, N shells): no rendezvous
    python -m captioner caption-set --ckpt_path best.ckpt --input shards/ --output out/ --launcher none
    # Ray Data on a Ray cluster, Parquet out
    python -m captioner caption-set --ckpt_path best.ckpt --input shards/ --output out/ --format parquet --launcher ray
"""

from __future__ import annotations

import argparse
import socket
import sys
import zlib
from typing import Any

from captioner.bulk.inputs import FILES_PER_PART
from captioner.bulk.job import Worker, summary_lines
from captioner.bulk.outputs import FORMATS
from captioner.core.errors import CaptionerError
from captioner.core.parts import add_allow_argument, allow_modules
from captioner.core.pipeline import DEFAULT_DECODE_THREADS, DEFAULT_PREFETCH
from captioner.decoding import config as decoding_config
from captioner.jobs.claims import DEFAULT_LEASE_SECONDS, Claims

LAUNCHERS = ("lightning", "none", "ray")


def run_lightning(fabric: Any, options: argparse.Namespace) -> dict[str, Any]:
    """Every rank a worker, launched by Lightning Fabric: rank 0 prepares the job (and the summary); all claim."""
    worker = Worker(options, str(fabric.device), f"{socket.gethostname()}-rank{fabric.global_rank}")
    done_before = 0
    error = None
    if fabric.global_rank == 0:
        try:
            if options.overwrite:
                worker.start_over()
            worker.adopt(options.overwrite)
            # Every worker of this job is one of these ranks: older claims and half-written files are a dead run's.
            Claims(worker.state.folder).clear()
            worker.remove_leftovers(older_than=0.0)
            for old in (worker.state.folder / "workers").glob("*.json"):
                old.unlink()
        except CaptionerError as refused:
            error = str(refused)
        done_before = sum(worker.state.done(name) for name in worker.names)
    error, done_before = fabric.broadcast((error, done_before))
    if error:
        raise CaptionerError(error)
    replaces = bool(worker.state.adopt(worker.fingerprint).get("replaces_existing"))
    bar = _bar(worker) if fabric.global_rank == 0 and done_before < len(worker.parts) else None
    start = fabric.global_rank * len(worker.parts) // max(1, fabric.world_size)
    worker.run(replaces, wait_for_others=True, start=start, bar=bar)
    fabric.barrier()
    if fabric.global_rank != 0:
        return {}
    if bar is not None:
        bar.close()
    summary = worker.summary(done_before)
    print("\n".join(summary_lines(summary)), file=sys.stderr)
    return summary


def run_independent(options: argparse.Namespace) -> dict[str, Any]:
    """One worker with no rendezvous (`--launcher none`): as many as wanted, on one machine or many sharing the
    output's filesystem. The worker that completes the last part writes the summary."""
    if options.overwrite:
        raise CaptionerError(
            "--overwrite with --launcher none: independent workers cannot agree on which of them "
            "removes the old captions. Remove the output folder (or choose a new --output), then "
            "start the workers."
        )
    device = None if options.accelerator == "auto" else options.accelerator
    worker = Worker(options, device)
    replaces = bool(worker.adopt(False).get("replaces_existing"))
    worker.remove_leftovers(older_than=options.lease_seconds)  # another worker's file in writing is younger
    done_before = sum(worker.state.done(name) for name in worker.names)
    start = zlib.crc32(worker.worker.encode()) % max(1, len(worker.parts))
    worker.run(replaces, wait_for_others=not options.no_wait, start=start)
    left = sum(not worker.state.done(name) for name in worker.names)
    if left:
        print(
            f"{left} of {len(worker.parts)} parts are held by other workers; the one that completes the job writes "
            "the summary.",
            file=sys.stderr,
        )
        return {}
    if done_before < len(worker.parts) and not worker.state.claim_once("summary"):
        print(
            f"This worker's parts are done; another worker completed the job and writes the summary "
            f"({worker.state.folder / 'summary.json'}).",
            file=sys.stderr,
        )
        return {}
    summary = worker.summary(done_before)
    print("\n".join(summary_lines(summary)), file=sys.stderr)
    return summary


def _bar(worker: Worker) -> Any:
    from tqdm.auto import tqdm

    pending = [part for part in worker.parts if not worker.state.done(part.name)]
    known = sum(len(part.files) for part in pending if part.shard is None)
    return tqdm(
        total=known or None, unit="img", desc="captioning", dynamic_ncols=True, file=sys.stderr, mininterval=1.0
    )


def caption_set_parser() -> argparse.ArgumentParser:
    """The options of `python -m captioner caption-set`."""
    parser = argparse.ArgumentParser(prog="python -m captioner caption-set", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by fit, or an exported folder")
    parser.add_argument(
        "--input",
        required=True,
        help="a folder of images (recursive), a text file listing image paths, or WebDataset shards "
        "(a folder of *.tar, a brace pattern, URLs)",
    )
    parser.add_argument("--input_kind", default="auto", choices=["auto", "folder", "list", "shards"])
    parser.add_argument(
        "--format",
        default="jsonl",
        choices=FORMATS,
        help="txt: a .txt beside each image; jsonl or parquet: one file per part; webdataset: new "
        "shards with the caption added",
    )
    parser.add_argument("--output", default=None, help="the output folder (txt: mirror the input tree there)")
    parser.add_argument(
        "--overwrite", action="store_true", help="forget the job in the output folder and caption everything again"
    )
    parser.add_argument(
        "--review_below",
        type=float,
        default=None,
        metavar="CONFIDENCE",
        help="list the images whose calibrated confidence is under this in review/index.html and "
        "review/review.jsonl (models fitted with a calibrator)",
    )
    parser.add_argument("--batch_size", type=int, default=32, help="images captioned together")
    parser.add_argument("--threads", type=int, default=DEFAULT_DECODE_THREADS, help="images decoded at once")
    parser.add_argument(
        "--prefetch", type=int, default=DEFAULT_PREFETCH, help="batches decoded ahead of the one being captioned"
    )
    parser.add_argument(
        "--files_per_part",
        type=int,
        default=FILES_PER_PART,
        help="image files per part (a shard is one part): the unit of claiming and resuming",
    )
    parser.add_argument(
        "--launcher",
        default="lightning",
        choices=LAUNCHERS,
        help="lightning: the ranks --trainer.* launches; none: this process is one independent "
        "worker (start as many as wanted, anywhere the output's filesystem is shared); ray: "
        "Ray Data maps the engine over the images (captioner.bulk.ray_data)",
    )
    parser.add_argument(
        "--lease_seconds",
        type=float,
        default=DEFAULT_LEASE_SECONDS,
        help="a worker that stops renewing its claim this long loses its part to another",
    )
    parser.add_argument(
        "--no_wait",
        action="store_true",
        help="--launcher none: stop when no part is free instead of waiting to take over parts whose workers die",
    )
    parser.add_argument(
        "--ray_address", default=None, help="--launcher ray: the cluster (None: $RAY_ADDRESS, else a local Ray)"
    )
    parser.add_argument("--ray_workers", type=int, default=1, help="--launcher ray: model copies (actors)")
    parser.add_argument("--ray_gpus_per_worker", type=float, default=0, help="--launcher ray: GPUs per actor")
    parser.add_argument("--trainer.accelerator", dest="accelerator", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--trainer.devices", dest="devices", default="1", help="processes per node (GPUs), or auto")
    parser.add_argument("--trainer.num_nodes", dest="num_nodes", type=int, default=1)
    parser.add_argument("--trainer.strategy", dest="strategy", default=None, help="auto, ddp, ... (Lightning's)")
    parser.add_argument(
        "--styles",
        type=style_list,
        default=(),
        help="caption styles to write for each image, comma-separated (a model trained on several: short,tags): "
        "each image encoded once; the .txt holds one per line, JSONL/Parquet/shards a caption_<style> column each",
    )
    decoding_config.add_arguments(parser)
    add_allow_argument(parser)
    return parser


def style_list(text: str) -> tuple[str, ...]:
    """`--styles short,tags` as a tuple of names."""
    styles = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not styles:
        raise argparse.ArgumentTypeError("name at least one style: --styles short,tags")
    return styles


def caption_set_command(argv: list[str]) -> dict[str, Any]:
    """`python -m captioner caption-set ...`: the whole job, as the launcher says."""
    options = caption_set_parser().parse_args(argv)
    allow_modules(*options.allow_module)
    if options.launcher == "none":
        return run_independent(options)
    if options.launcher == "ray":
        from captioner.bulk.ray_data import caption_with_ray

        return caption_with_ray(options)
    from lightning.fabric import Fabric

    devices = options.devices if options.devices == "auto" else int(options.devices)
    several = devices == "auto" or devices > 1 or options.num_nodes > 1
    strategy = options.strategy or ("ddp" if several else "auto")
    fabric = Fabric(accelerator=options.accelerator, devices=devices, num_nodes=options.num_nodes, strategy=strategy)
    return fabric.launch(run_lightning, options) or {}
