"""Captioning a set of images as one job over parts: any worker claims the next part, every part written whole,
resumable, and refusing to mix two models' or two settings' captions in one output (the command and its launchers:
`captioner.bulk.command`).

Workers, launched by Lightning (`--trainer.devices`, `--trainer.num_nodes`), or started on their own
(`--launcher none`), or mapped by Ray Data (`--launcher ray`, `captioner.bulk.ray_data`), share the parts through
claims in the output's state folder (`captioner.jobs.claims`): a worker claims its next part when it finishes one,
so a slow worker never holds the job, and a dead worker's part is taken over once its lease runs out. Each part's
images go through the captioning engine (`captioner.inference.engine`: decoded in threads, the next batches
decoding while this one is captioned), and its output is put in place whole when the part is done
(`captioner.bulk.outputs`), with its provenance; the part's record (`.captioner-job/parts/<part>.json`) then marks it
done. A rerun, or a killed run started again, does only the parts not done, so every image is captioned once into
the outputs.

A job knows what it is: its fingerprint (the model's digest, the decoding settings, the reranker, the output
format, the input, captioner's version) is kept in `.captioner-job/job.json`, and a rerun or resume with another is
refused in one line naming what differs (`--overwrite` redoes the job; another `--output` starts a new one). The
summary (printed, and `.captioner-job/summary.json`) adds up every part: captioned, failed by reason, the
calibrated confidence's distribution, the share of duplicate captions and of captions that repeat themselves; with
`--review_below X` the images under that confidence go to `review/index.html` and `review/review.jsonl` for a
curator.

An image's caption does not depend on its batch-mates, its worker or the entry point: the same search as
`caption`, `Captioner` and the server, seeded sampling included (each image's random stream is seeded by its pixels).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from captioner.bulk.inputs import InputPart, input_parts
from captioner.bulk.outputs import Output, output_for, output_row
from captioner.bulk.quality import CaptionTally
from captioner.bulk.review import gathered_review, review_row, write_part_review, write_review
from captioner.core.errors import CaptionerError
from captioner.core.files import read_json, remove_leftovers, write_json
from captioner.core.pipeline import ImageInput
from captioner.core.version import __version__
from captioner.decoding import config as decoding_config
from captioner.jobs.claims import Claims, new_worker_id, work_through
from captioner.jobs.state import PARTS_DIR, JobState, fingerprint_digest
from captioner.text.styles import style_of

log = logging.getLogger("captioner")
STATE_DIR = ".captioner-job"
PROGRESS_EVERY_S = 1.0


def model_identity(path: str | Path) -> dict[str, str]:
    """What identifies a model in a job's fingerprint: the SHA-256 of a checkpoint file, of an exported folder's
    manifest (which holds every file's digest), or of a published folder's files; a hub id by its name."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        return {"sha256": digest.hexdigest()}
    if path.is_dir():
        files = (
            [path / "manifest.json"]
            if (path / "manifest.json").is_file()
            else sorted(p for p in path.rglob("*") if p.is_file())
        )
        for file in files:
            digest.update(file.relative_to(path).as_posix().encode() + b"\0" + file.read_bytes())
        return {"sha256": digest.hexdigest()}
    return {"hub_id": str(path)}


def input_identity(source: str, parts: list[InputPart]) -> dict[str, Any]:
    """The input in a job's fingerprint: where it is, and a digest of its parts (names, files, shards)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps([part.name, part.shard, part.files]).encode())
    return {"source": source, "parts": len(parts), "digest": digest.hexdigest()[:16]}


def job_fingerprint(options: argparse.Namespace, captioner: Any, parts: list[InputPart]) -> dict[str, Any]:
    """Everything the captions depend on: the model, the decoding settings it runs with (its own, overridden), the
    reranker, the output format, the input and captioner's version."""
    return {
        "model": model_identity(options.ckpt_path),
        "decoding": captioner.decoding.to_dict(),
        **({"styles": list(options.styles)} if options.styles else {}),
        "rerank_clip": options.rerank_clip,
        "format": options.format,
        "input": input_identity(options.input, parts),
        "captioner": __version__,
    }


class Progress:
    """What a worker has done in this run, written every second for whoever shows the job's progress."""

    def __init__(self, folder: Path, worker: str) -> None:
        self.folder = folder / "workers"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path, self.images, self.saved = self.folder / f"{worker}.json", 0, 0.0

    def add(self, images: int) -> None:
        self.images += images
        if time.monotonic() - self.saved > PROGRESS_EVERY_S:
            self.save()

    def save(self) -> None:
        write_json(self.path, {"images": self.images})
        self.saved = time.monotonic()

    def total(self) -> int:
        """Images every worker of this run has gone through so far."""
        count = 0
        for path in self.folder.glob("*.json"):
            try:
                count += int(read_json(path, "A worker's progress")["images"])
            except (CaptionerError, KeyError, TypeError, ValueError):  # being replaced right now
                continue
        return count


def _samples(part: InputPart, output: Output, replace: bool, tally: CaptionTally) -> Iterator[ImageInput]:
    """The part's images that need a caption, as the engine's inputs (the others counted as skipped)."""
    for sample in part.samples():
        if output.wanted(part, sample, replace):
            yield ImageInput(sample.name, sample.data, sample)
        else:
            tally.skipped += 1


def caption_part(
    engine: Any,
    config: Any,
    part: InputPart,
    output: Output,
    provenance: dict[str, Any],
    replace: bool = False,
    review_below: float | None = None,
    progress: Progress | None = None,
    still_held: Any = lambda: True,
    styles: tuple[str, ...] = (),
) -> tuple[CaptionTally, list[dict[str, Any]]] | None:
    """Caption one part's images through the engine and put its output in place whole (`styles`: the caption styles
    each image is written in, encoded once; `caption-set --styles`).

    Returns:
        The part's tally and its rows to review, or None when the part was given up (`still_held()` said another
        worker took it over: its copy is dropped).
    """
    tally, review = CaptionTally(), []
    written = output.begin(part, provenance)
    try:
        for batch in engine.batches(_samples(part, output, replace, tally), config, styles=styles):
            rows = [output_row(prediction) for _, prediction in batch]
            for (item, _), row in zip(batch, rows):
                tally.add(item.name, row["caption"], row["confidence"], row["error"])
                if review_below is not None and row["confidence"] is not None and row["confidence"] < review_below:
                    review.append(review_row(item.name, row["caption"], row["confidence"], row["score"], item.data))
            written.add(rows, [item.payload for item, _ in batch])
            if progress is not None:
                progress.add(len(batch))
        if not still_held():
            log.warning(
                "Part %s was taken over by another worker while this one captioned it: this copy is dropped.", part.name
            )
            written.abandon()
            return None
        written.finish()
    except BaseException:
        written.abandon()
        raise
    return tally, review


class Worker:
    """One worker of a job: its captioner, engine and share of the parts (see the module docstring).

    Args:
        options: The command's options.
        device: Where the model runs ("auto": a GPU when there is one).
        worker: This worker's name.
    """

    def __init__(self, options: argparse.Namespace, device: str | None, worker: str | None = None) -> None:
        from captioner.inference.loading import check_model, load_captioner

        check_model(options.ckpt_path)
        self.options, self.worker = options, worker or new_worker_id()
        self.parts = input_parts(options.input, options.input_kind, options.files_per_part)
        self.output = output_for(options.format, options.output, self.parts)
        self.state = JobState(self.output.folder / STATE_DIR, "captions")
        settings = decoding_config.overrides_from(options)
        if options.styles:  # the first style is each row's caption; the others are written beside it
            settings["style"] = options.styles[0]
        self.captioner = load_captioner(options.ckpt_path, device, options.rerank_clip, **settings)
        for style in options.styles:
            style_of(style, self.captioner.limits.styles)  # one line naming the model's styles, before any work
        self.fingerprint = job_fingerprint(options, self.captioner, self.parts)
        self.digest = fingerprint_digest(self.fingerprint)

    @property
    def names(self) -> list[str]:
        return [part.name for part in self.parts]

    def remove_leftovers(self, older_than: float) -> None:
        """Remove what writers killed mid-write left in the output and state folders, last changed over `older_than`
        seconds ago (0: a launcher whose workers are all its own, starting)."""
        removed = sum(
            remove_leftovers(folder, older_than)
            for folder in (self.output.folder, self.state.folder, self.state.folder / PARTS_DIR)
        )
        if removed:
            log.info("Removed %d files a killed run left half-written in %s.", removed, self.output.folder)

    def start_over(self) -> None:
        """`--overwrite`: forget the job and remove its outputs (only a launcher whose workers are all its own)."""
        for part in self.parts:
            self.output.remove(part)
        self.state.reset()

    def adopt(self, replaces: bool) -> dict[str, Any]:
        """Record the job's fingerprint here, or refuse a folder that holds another job's captions.

        Raises:
            CaptionerError: When the folder holds captions of another job, or of an earlier captioner that kept no
                record of what wrote them.
        """
        if self.state.fingerprint() is None and any(self.output.exists(part) for part in self.parts):
            raise CaptionerError(
                f"{self.output.folder} holds captions that record no job (an earlier captioner, or another tool): "
                "they could be another model's. Give --overwrite to caption everything again, or a new --output."
            )
        return self.state.adopt(self.fingerprint, {"replaces_existing": replaces})

    def provenance(self, part: InputPart) -> dict[str, Any]:
        return {
            "job": self.digest,
            "part": part.name,
            "model": self.fingerprint["model"],
            "decoding": self.fingerprint["decoding"],
            "rerank_clip": self.options.rerank_clip,
            "captioner": __version__,
            "worker": self.worker,
            "host": socket.gethostname(),
            "started": time.time(),
        }

    def run(self, replaces: bool, wait_for_others: bool = True, start: int = 0, bar: Any = None) -> int:
        """Claim and caption parts until none is left (or, without `wait_for_others`, none is free).

        Returns:
            The parts this worker completed.
        """
        options = self.options
        claims = Claims(self.state.folder, self.worker, options.lease_seconds)
        engine = self.captioner.engine(
            batch_size=options.batch_size, decode_threads=options.threads, prefetch=options.prefetch
        )
        progress = Progress(self.state.folder, self.worker)
        config, completed = self.captioner.decoding, 0
        by_name = {part.name: part for part in self.parts}
        for lease in work_through(claims, self.names, self.state.done, wait_for_others=wait_for_others, start=start):
            part = by_name[lease.part]
            try:
                provenance = self.provenance(part)
                waited, busy = engine.stats.waited_s, engine.stats.busy_s
                result = caption_part(
                    engine,
                    config,
                    part,
                    self.output,
                    provenance,
                    replaces,
                    options.review_below,
                    progress,
                    lease.held,
                    tuple(options.styles),
                )
                if result is not None:
                    tally, review = result
                    if options.review_below is not None:
                        write_part_review(self.state.folder, part.name, review)
                    timing = {
                        "model_s": round(engine.stats.busy_s - busy, 4),
                        "waited_for_images_s": round(engine.stats.waited_s - waited, 4),
                    }
                    self.state.mark_done(
                        part.name,
                        {
                            **provenance,
                            "finished": time.time(),
                            **timing,
                            "review_below": options.review_below,
                            "tally": tally.to_dict(),
                        },
                    )
                    completed += 1
            finally:
                lease.release()
            if bar is not None:
                bar.update(progress.total() - bar.n)
        progress.save()
        if completed:
            stats = engine.stats
            log.info(
                "Worker %s: %d parts, %.1f images/s while captioning; the model waited for images %.0f%% of the time.",
                self.worker,
                completed,
                stats.images / max(stats.busy_s + stats.waited_s, 1e-9),
                100 * stats.waiting_share,
            )
        return completed

    def summary(self, done_before: int) -> dict[str, Any]:
        """The whole job's summary from every part's record (printed once, written to `summary.json`)."""
        records = list(self.state.records(self.names))
        total = CaptionTally()
        for record in records:
            total.merge(CaptionTally.from_dict(record["tally"]))
        model_s = sum(record.get("model_s", 0.0) for record in records)
        waited_s = sum(record.get("waited_for_images_s", 0.0) for record in records)
        summary: dict[str, Any] = {
            "job": self.digest,
            "parts": len(self.parts),
            "parts_done": len(records),
            "parts_done_before": done_before,
            "captioned": total.captioned,
            "failed": dict(total.failed),
            "skipped_as_done": total.skipped,
            "examples": total.examples,
            "output": str(self.output.folder),
            "format": self.options.format,
            "fingerprint": self.fingerprint,
            "quality": total.quality(),
            "workers": sorted({record["worker"] for record in records}),
            # Over every part: images per second of the workers' captioning time (model and waiting), and the share
            # of it the model spent waiting for images to be decoded (0: the decoding kept up).
            "images_per_worker_s": round(
                (total.captioned + sum(total.failed.values())) / max(model_s + waited_s, 1e-9), 2
            ),
            "model_waited_share": round(waited_s / max(model_s + waited_s, 1e-9), 4),
        }
        below = self.options.review_below
        if below is not None and len(records) == len(self.parts):
            rows = gathered_review(self.state.folder, self.names, below)
            listing, page = write_review(self.output.folder, rows, below, self.digest)
            without = [r["part"] for r in records if r.get("review_below") is None or r["review_below"] < below]
            summary["review"] = {
                "below": below,
                "images": len(rows),
                "page": str(page),
                "listing": str(listing),
                "parts_without_review": len(without),
            }
        write_json(self.state.folder / "summary.json", summary)
        return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """What the job prints when it ends."""
    failed = sum(summary["failed"].values())
    where = f"{summary['format']} in {summary['output']}"
    if summary["parts_done_before"] == summary["parts"]:
        lines = [
            f"Nothing left to caption: all {summary['parts']} parts were done before this run ({where}); "
            "--overwrite captions them again."
        ]
    else:
        lines = [
            f"{summary['captioned']} images captioned, {failed} failed, {summary['skipped_as_done']} skipped as "
            f"done; {summary['parts_done_before']} of {summary['parts']} parts were done before this run; "
            f"{where}"
        ]
    if failed:
        lines[0] += (
            " (failed: "
            + "; ".join(
                f"{count} {reason}, e.g. {summary['examples'].get(reason, '')}"
                for reason, count in summary["failed"].items()
            )
            + ")"
        )
    quality = summary["quality"]
    measures = []
    if "confidence" in quality:
        confidence = quality["confidence"]
        measures.append(
            f"confidence mean {confidence['mean']:.2f}, median {confidence['median']:.2f}, "
            f"{100 * confidence['below_0.5']:.0f}% under 0.5"
        )
    if "duplicate_share" in quality:
        measures.append(
            f"{100 * quality['duplicate_share']:.1f}% of images share their caption with another "
            f"({quality['distinct_captions']} distinct), {100 * quality['degenerate_share']:.1f}% "
            "repeat themselves"
        )
    if measures:
        lines.append("Captions: " + "; ".join(measures) + ".")
    model = summary["fingerprint"]["model"]
    lines.append(
        f"Job {summary['job']}: model {model.get('sha256', model.get('hub_id', ''))[:12]}, "
        f"{len(summary['workers'])} worker(s); every part records its provenance."
    )
    if "review" in summary:
        review = summary["review"]
        line = f"Review: {review['images']} images under confidence {review['below']:g} in {review['page']}"
        if review["parts_without_review"]:
            line += (
                f" ({review['parts_without_review']} parts were captioned without --review_below "
                f"{review['below']:g}: their images are not in it; --overwrite captions them again)"
            )
        lines.append(line + ".")
    return lines


def read_rows(folder: str | Path) -> list[dict[str, Any]]:
    """Every row a job wrote as JSON Lines under `folder` (for people and tests)."""
    return [json.loads(line) for path in sorted(Path(folder).glob("*.jsonl")) for line in path.open(encoding="utf-8")]
