"""Bulk captioning on Ray Data, for clusters that run Ray (`pip install 'captioner[ray]'`): the captioning engine
as a `map_batches` callable over Ray's readers, rows written to Parquet.

    python -m captioner caption-set --ckpt_path best.ckpt --input shards/ --output out/ --launcher ray \\
        --ray_workers 8 --ray_gpus_per_worker 1

or in a pipeline of your own:

    import ray.data
    from captioner.bulk.ray_data import CaptionBatches
    ds = ray.data.read_binary_files("s3://bucket/photos/", include_paths=True)       # or read_webdataset, read_images
    ds.map_batches(CaptionBatches, fn_constructor_kwargs={"ckpt_path": "best.ckpt"}, batch_size=64,
                   compute=ray.data.ActorPoolStrategy(size=8), num_gpus=1).write_parquet("s3://bucket/captions/")

Each actor loads the model once and captions the batches Ray hands it through the same engine as every other
entry point (`captioner.inference.engine`): the same pixels, the same search, the same row schema
(`captioner.bulk.outputs.row_schema`, the job's provenance in each file's metadata). Ray schedules, retries failed
tasks and streams the data; a job that stops part way is run again whole (Ray Data keeps no per-part record), and
its output folder's fingerprint refuses a rerun with another model or other settings as the other launchers do.

Batches may hold any of: `bytes` and `path` (`read_binary_files(..., include_paths=True)`), a shard's members
(`read_webdataset(..., decoder=None)`: `__key__`, `__url__`, `jpg`/`png`/`webp`/...), or decoded `image` arrays
(`read_images(..., include_paths=True)`; decoded at full size by Ray, so not reduced as the engine does).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from captioner.core.errors import CaptionerError
from captioner.core.parts import allow_modules, require_library

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")


class CaptionBatches:
    """A Ray Data callable class: a batch of images in -> an Arrow table of rows out (see the module docstring).

    Args:
        ckpt_path: A checkpoint, an exported or published folder, or a hub id.
        device: Where the model runs (None: a GPU when Ray gave the actor one).
        batch_size: Images per model call.
        decode_threads: Images decoded at once in the actor.
        settings: Decoding settings replacing the model's own.
        rerank_clip: A CLIP model reordering the beam's alternatives.
        provenance: What each output file records in its metadata.
        allowed_modules: Modules the checkpoint may name besides captioner's (`--allow_module`).
        styles: Caption styles each image is written in (`--styles`; the first is `caption`).
    """

    def __init__(
        self,
        ckpt_path: str,
        device: str | None = None,
        batch_size: int = 32,
        decode_threads: int = 4,
        settings: dict[str, Any] | None = None,
        rerank_clip: str | None = None,
        provenance: dict[str, Any] | None = None,
        allowed_modules: tuple[str, ...] = (),
        styles: tuple[str, ...] = (),
    ) -> None:
        from captioner.inference.loading import load_captioner

        allow_modules(*allowed_modules)
        self.captioner = load_captioner(ckpt_path, device, rerank_clip, **(settings or {}))
        self.engine = self.captioner.engine(batch_size=batch_size, decode_threads=decode_threads, prefetch=1)
        self.provenance, self.styles = provenance, styles

    def __call__(self, batch: dict[str, Any]) -> Any:
        from captioner.bulk.outputs import output_row, rows_table
        from captioner.core.pipeline import ImageInput

        inputs = [ImageInput(name, data) for name, data in images_of(batch)]
        groups = self.engine.batches(inputs, styles=self.styles)
        rows = [output_row(prediction) for group in groups for _, prediction in group]
        return rows_table(rows, self.provenance)


def images_of(batch: dict[str, Any]) -> list[tuple[str, Any]]:
    """`(name, image)` for every row of a Ray batch, whichever reader made it (see the module docstring).

    Raises:
        CaptionerError: When the batch holds no column of images.
    """
    if "bytes" in batch:
        names = batch.get("path", [f"<row #{i}>" for i in range(len(batch["bytes"]))])
        return [(str(name), bytes(data)) for name, data in zip(names, batch["bytes"])]
    if "image" in batch:
        names = batch.get("path", [f"<row #{i}>" for i in range(len(batch["image"]))])
        return [(str(name), image) for name, image in zip(names, batch["image"])]
    if "__key__" in batch:
        rows = []
        for index, key in enumerate(batch["__key__"]):
            column = next(
                (c for c in IMAGE_COLUMNS if c in batch and isinstance(batch[c][index], (bytes, bytearray))), None
            )  # a member the sample lacks is missing (None, or NaN in a column of others)
            url = str(batch["__url__"][index]) if "__url__" in batch else ""
            name = f"{Path(url).name}#{key}.{column or ''}"
            rows.append((name, bytes(batch[column][index]) if column else FileNotFoundError("no image in sample")))
        return rows
    raise CaptionerError(
        f"A Ray batch with columns {sorted(batch)} holds no images: read them with "
        "read_binary_files(include_paths=True), read_webdataset(decoder=None) or read_images."
    )


def caption_with_ray(options: argparse.Namespace) -> dict[str, Any]:
    """`caption-set --launcher ray`: the input read by Ray, captioned by `--ray_workers` actors, written as Parquet.

    Raises:
        CaptionerError: When Ray is not installed, the format is not Parquet, or the output holds another job.
    """
    ray = require_library("ray", "ray", "caption-set --launcher ray")
    require_library("ray.data", "ray", "caption-set --launcher ray")

    from captioner.bulk.inputs import input_parts
    from captioner.bulk.job import STATE_DIR, Worker
    from captioner.core.files import write_json
    from captioner.jobs.state import JobState

    if options.format != "parquet" or not options.output:
        raise CaptionerError("--launcher ray writes Parquet: give --format parquet and an --output folder.")
    parts = input_parts(options.input, options.input_kind, options.files_per_part)
    worker = Worker(options, "cpu")  # the fingerprint's model and settings, read once here
    state = JobState(Path(options.output) / STATE_DIR, "captions")
    if options.overwrite:
        state.reset()
    state.adopt(worker.fingerprint)
    done = state.folder / "ray.json"
    if done.is_file() and not options.overwrite:
        print(
            f"Nothing left to caption: this job was completed by Ray before ({options.output}); --overwrite "
            "captions it again.",
            file=sys.stderr,
        )
        return {"parts": len(parts), "captioned": 0}
    if not ray.is_initialized():
        ray.init(address=options.ray_address, include_dashboard=False, log_to_driver=False)
    if parts[0].shard is not None:
        from captioner.sources.shards import shard_path

        dataset = ray.data.read_webdataset([shard_path(part.root, part.shard) for part in parts], decoder=None)
    else:
        dataset = ray.data.read_binary_files(
            [str(part.root / name) for part in parts for name in part.files], include_paths=True
        )
    provenance = {key: value for key, value in worker.provenance(parts[0]).items() if key not in ("part", "worker")}
    arguments = {
        "ckpt_path": options.ckpt_path,
        "batch_size": options.batch_size,
        "decode_threads": options.threads,
        "settings": worker.fingerprint["decoding"],
        "rerank_clip": options.rerank_clip,
        "provenance": provenance,
        "allowed_modules": tuple(options.allow_module),
        "styles": tuple(options.styles),
    }
    captioned = dataset.map_batches(
        CaptionBatches,
        fn_constructor_kwargs=arguments,
        batch_size=options.batch_size,
        compute=ray.data.ActorPoolStrategy(size=options.ray_workers),
        num_gpus=options.ray_gpus_per_worker,
        batch_format="numpy",
    )
    for old in Path(options.output).glob("*.parquet"):  # a run that stopped part way: its files go, the state stays
        old.unlink()
    captioned.write_parquet(options.output, mode=ray.data.SaveMode.APPEND)
    import pyarrow.parquet as pq

    table = pq.read_table(options.output, columns=["error"])
    captioned = table.column("error").null_count  # a row without an error is a captioned image
    summary = {
        "images": table.num_rows,
        "captioned": captioned,
        "failed": table.num_rows - captioned,
        "output": options.output,
        "format": "parquet",
        "job": worker.digest,
    }
    write_json(done, summary)
    print(
        f"{summary['captioned']} images captioned, {summary['failed']} failed; Parquet in {options.output} "
        f"(Ray Data, {options.ray_workers} workers; job {worker.digest}).",
        file=sys.stderr,
    )
    return summary
