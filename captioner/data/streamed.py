"""Streamed feature shards, for sets beyond one disk: features extracted straight from image shards (or an image
folder) by every rank into LitData's chunked format, then streamed for training, DDP-aware and resumable mid-epoch
(`pip install 'captioner[shards]'`).

Layout of a streamed feature set (`<stream_dir>/<encoder>-<size>px-[grid-]<key>/`), each folder a LitData dataset:

    train/   one item per training image: {"name", "features" (float16), "captions" (one per line)}
    val/     the same for validation images (read whole into memory: they are few)
    test/
    meta/    one item: {"json": what the set is (key, encoder, preprocessing, counts, undecodable images)};
             written last, so a set with `meta/` is complete

The key is the cache key of the feature cache (encoder spec, preprocessing,
grid or pooled, decode path and precision) over the images' names tagged
with their split: another encoder, preprocessing or split is another set.

Extraction is the unit of work of a *part*: one input shard (`00042.tar`),
or 1,000 images of a folder. Rank r of W extracts parts r, r + W, ... each
into `parts/<part>/` (written whole, then renamed), so a killed extraction
resumes at the parts it had not finished; rank 0 then merges the parts into
the set with `litdata.merge_datasets` and removes them.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captioner.core.errors import CaptionerError
from captioner.core.files import jsonable, write_json
from captioner.core.pixels import DECODE_ERRORS, describe_error
from captioner.data.formats.webdataset import IMAGE_MEMBERS, SHARD_SEPARATOR, shard_path, shard_samples
from captioner.data.records import CaptionRecord
from captioner.encoders.extraction import FeatureSpec, default_batch_size, encode_in_chunks
from captioner.encoders.store import cache_key, extraction_method

log = logging.getLogger(__name__)

STREAM_VERSION = 1
SPLIT_NAMES = ("train", "val", "test")
PARTS_DIR, PART_FILE, META = "parts", "part.json", "meta"
IMAGES_PER_FOLDER_PART = 1000
CHUNK_BYTES = "64MB"


def _litdata(module: str = "litdata") -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise CaptionerError("Streamed features need the litdata package: pip install 'captioner[shards]'.") from None


# ---------------------------------------------------------------- where the images come from
@dataclass
class ImagePart:
    """A unit of extraction: some of the records' images, read in one pass.

    Attributes:
        name: A stable, file-system-safe name (the part's folder).
        names: The records' image names in this part.
    """

    name: str
    names: list[str]

    def images(self) -> Iterator[tuple[str, bytes | BaseException]]:
        """`(name, encoded image)` for each of `names` found (an error in place of bytes that cannot be read)."""
        raise NotImplementedError


@dataclass
class ShardPart(ImagePart):
    """The images of one input shard, read as a stream."""

    location: str = ""
    folder: Path = field(default_factory=Path)

    def images(self) -> Iterator[tuple[str, bytes | BaseException]]:
        wanted, done = set(self.names), set()
        for key, members in shard_samples(shard_path(self.folder, self.location), wanted=set(IMAGE_MEMBERS)):
            extension = next((e for e in IMAGE_MEMBERS if e in members), None)
            name = f"{self.location}{SHARD_SEPARATOR}{key}.{extension}"
            if name in wanted and name not in done:  # a key met twice: the first, as the records kept
                done.add(name)
                yield name, members[extension]


@dataclass
class FilePart(ImagePart):
    """Image files of a folder."""

    folder: Path = field(default_factory=Path)

    def images(self) -> Iterator[tuple[str, bytes | BaseException]]:
        for name in self.names:
            try:
                yield name, (self.folder / name).read_bytes()
            except OSError as error:
                yield name, error


def image_parts(records: list[CaptionRecord], images_dir: Path, sharded: bool) -> list[ImagePart]:
    """The parts extraction works through: one per input shard (in shard order), or runs of a folder's images."""
    if not sharded:
        names = sorted(record.file_name for record in records)
        return [FilePart(f"images-{start // IMAGES_PER_FOLDER_PART:06d}", names[start : start + IMAGES_PER_FOLDER_PART],
                         folder=images_dir)
                for start in range(0, len(names), IMAGES_PER_FOLDER_PART)]  # fmt: skip
    by_shard: dict[str, list[str]] = {}
    for record in records:
        location = record.file_name.rpartition(SHARD_SEPARATOR)[0]
        by_shard.setdefault(location, []).append(record.file_name)
    return [ShardPart(f"shard-{index:06d}-{Path(location).stem}"[:120], names, location=location, folder=images_dir)
            for index, (location, names) in enumerate(sorted(by_shard.items()))]  # fmt: skip


# ---------------------------------------------------------------- the streamed set
def stream_key(spec: FeatureSpec, splits: dict[str, list[CaptionRecord]], device: torch.device | str) -> str:
    """The set's key: the feature cache's (encoder, preprocessing, kind, precision) over split-tagged names."""
    _, precision = extraction_method(device, device_decode=False)  # shards are decoded by PIL on the host
    names = [f"{split}:{record.file_name}" for split in SPLIT_NAMES for record in splits[split]]
    return cache_key(spec.encoder_spec, spec.encoder.preprocessing, names, spec.grid, "pil", precision)


@dataclass
class StreamedFeatures:
    """A complete streamed feature set.

    Attributes:
        location: Its folder (local) or URL.
        meta: What it is (see the module docstring).
    """

    location: str
    meta: dict[str, Any]

    @property
    def failed(self) -> dict[str, str]:
        """Images whose decoding failed, with the reason (they have no features)."""
        return self.meta["failed"]

    def split(self, name: str) -> str:
        return f"{self.location.rstrip('/')}/{name}"

    def table(self, names: list[str], cache_dir: str | None = None) -> np.ndarray:
        """The features of `names` (validation and test images), read whole into memory, in that order.

        Raises:
            CaptionerError: When one of them is not in the set.
        """
        wanted = {name: row for row, name in enumerate(names)}
        table = np.zeros((len(names), *self.meta["row_shape"]), dtype=np.float16)
        found = 0
        for split in ("val", "test"):
            if not self.meta["counts"].get(split):
                continue
            dataset = _litdata().StreamingDataset(self.split(split), cache_dir=cache_dir)
            for index in range(self.meta["counts"][split]):  # global indices (a rank's len() is its share)
                item = dataset[index]
                row = wanted.get(item["name"])
                if row is not None:
                    table[row] = item["features"]
                    found += 1
        if found != len(names):
            raise CaptionerError(f"The streamed features in {self.location} lack {len(names) - found} validation or "
                                 "test images; delete the folder and run again to extract them.")  # fmt: skip
        return table


def open_streamed(location: str, key: str, encoder: dict[str, Any], cache_dir: str | None = None) -> StreamedFeatures:
    """Open a complete streamed set, checking it is the one asked for.

    Raises:
        CaptionerError: When it is incomplete, unreadable, or another set.
    """
    meta_dir = f"{location.rstrip('/')}/{META}"
    try:
        meta = json.loads(_litdata().StreamingDataset(meta_dir, cache_dir=cache_dir)[0]["json"])
    except CaptionerError:
        raise
    except Exception as error:  # LitData raises many types for a missing or damaged index
        raise CaptionerError(f"The streamed features in {location} are incomplete or unreadable ({error}).") from error
    if meta.get("version") != STREAM_VERSION or meta.get("key") != key or meta.get("encoder") != encoder:
        raise CaptionerError(f"The streamed features in {location} were extracted for other images, splits or "
                             "encoder settings.")  # fmt: skip
    return StreamedFeatures(location, meta)


def _is_local(location: str) -> bool:
    return "://" not in location


# ---------------------------------------------------------------- extraction
def _decode(preprocessing: Any, name: str, data: bytes | BaseException) -> tuple[str, torch.Tensor | str]:
    if isinstance(data, BaseException):
        return name, describe_error(data) if isinstance(data, DECODE_ERRORS) else str(data)
    try:
        return name, preprocessing.from_file(data)
    except DECODE_ERRORS as error:
        return name, describe_error(error)


class _PartWriter:
    """One part's items per split, written with LitData's `BinaryWriter` into a temporary folder."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.writers, self.counts = folder, {}, {}

    def add(self, split: str, item: dict[str, Any]) -> None:
        if split not in self.writers:
            writer_class = _litdata("litdata.streaming.writer").BinaryWriter
            self.writers[split] = writer_class(str(self.folder / split), chunk_bytes=CHUNK_BYTES)
            self.counts[split] = 0
        self.writers[split].add_item(self.counts[split], item)
        self.counts[split] += 1

    def close(self) -> None:
        for split, writer in self.writers.items():
            writer.done()
            # A lone writer leaves its index as `<rank>.index.json`; a dataset reads `index.json`.
            folder = self.folder / split
            indexes = sorted(folder.glob("*.index.json"))
            if len(indexes) != 1:
                raise CaptionerError(f"Writing streamed features into {folder} left {len(indexes)} indexes.")
            indexes[0].replace(folder / "index.json")


def extract_part(part: ImagePart, destination: dict[str, tuple[str, tuple[str, ...]]], spec: FeatureSpec,
                 forward: Callable[[torch.Tensor], torch.Tensor], folder: Path, batch_size: int,
                 threads: int) -> dict[str, Any]:  # fmt: skip
    """Extract one part into `folder` (written into a temporary sibling, then renamed into place).

    Args:
        destination: Each image's split and captions.
        forward: The encoder on the device, images in, features out.
        batch_size: Images per encoder pass.
        threads: Images decoded at once (PIL releases the interpreter while it decodes).

    Returns:
        What `part.json` records: items per split and the images that could not be decoded.
    """
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer, failed, chunk = _PartWriter(tmp), {}, [batch_size]
    preprocessing = spec.encoder.preprocessing
    missing = set(part.names)

    def flush(pending: list[tuple[str, bytes | BaseException]], pool: ThreadPoolExecutor) -> None:
        decoded = list(pool.map(lambda pair: _decode(preprocessing, *pair), pending))
        ok = [(name, image) for name, image in decoded if isinstance(image, torch.Tensor)]
        failed.update({name: reason for name, reason in decoded if isinstance(reason, str)})
        if ok:
            features = encode_in_chunks(forward, torch.stack([image for _, image in ok]), chunk)
            rows = features.float().cpu().numpy().astype(np.float16)
            for (name, _), row in zip(ok, rows, strict=True):
                split, captions = destination[name]
                writer.add(split, {"name": name, "features": row, "captions": "\n".join(captions)})

    with ThreadPoolExecutor(max(1, threads)) as pool:
        pending: list[tuple[str, bytes | BaseException]] = []
        for name, data in part.images():
            missing.discard(name)
            pending.append((name, data))
            if len(pending) == batch_size:
                flush(pending, pool)
                pending = []
        if pending:
            flush(pending, pool)
    failed.update({name: "not found in its shard" for name in missing})
    writer.close()
    record = {"counts": writer.counts, "failed": failed}
    write_json(tmp / PART_FILE, record)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return record


def _merge(directory: Path, part_folders: list[Path], split: str) -> int:
    """The parts' items of one split as one dataset; returns how many."""
    with_split = [folder / split for folder in part_folders if (folder / split / "index.json").exists()]
    target = directory / split
    shutil.rmtree(target, ignore_errors=True)
    if len(with_split) == 1:
        shutil.copytree(with_split[0], target)
    elif with_split:
        _litdata().merge_datasets([str(folder) for folder in with_split], str(target))
    return sum(json.loads((folder.parent / PART_FILE).read_text())["counts"].get(split, 0) for folder in with_split)


def _write_meta(directory: Path, meta: dict[str, Any]) -> None:
    tmp = directory / f".{META}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    writer = _PartWriter(tmp)
    writer.add(META, {"json": json.dumps(meta)})
    writer.close()
    (tmp / META).rename(directory / META)
    shutil.rmtree(tmp, ignore_errors=True)


def prepare_streamed(
    root: str,
    parts: list[ImagePart],
    splits: dict[str, list[CaptionRecord]],
    spec: FeatureSpec,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    threads: int = 4,
    cache_dir: str | None = None,
) -> StreamedFeatures:
    """The streamed feature set of these splits, extracted first where it is missing (every rank its share).

    Args:
        root: The folder of streamed sets (`--data.stream_dir`); a URL holds sets extracted and uploaded earlier.
        parts: The units of extraction (`image_parts`).
        splits: The records of each split.
        spec: The encoder and the kind of features.
        rank, world_size, barrier: This process among those sharing the work (1 process: no barrier needed).
        device: Where the encoder runs.
        batch_size: Images per encoder pass (None: 256 on a GPU, 8 on a CPU).
        threads: Images decoded at once.
        cache_dir: Where LitData keeps the chunks of a remote set (a bounded cache).

    Raises:
        CaptionerError: When a set at a URL is missing, or no image at all could be decoded.
    """
    device = torch.device(device)
    key = stream_key(spec, splits, device)
    name = f"{spec.encoder.name}-{spec.encoder.preprocessing.image_size}px-{'grid-' if spec.grid else ''}{key[:12]}"
    location = f"{root.rstrip('/')}/{name}"
    encoder_spec = spec.encoder_spec
    if not _is_local(root):
        return open_streamed(location, key, encoder_spec, cache_dir)
    directory = Path(location)
    if (directory / META / "index.json").exists():
        try:
            return open_streamed(location, key, encoder_spec)
        except CaptionerError as error:
            if rank == 0:
                log.warning("%s; extracting them again.", error)
    barrier()
    if rank == 0 and not (directory / PARTS_DIR).exists():
        shutil.rmtree(directory, ignore_errors=True)
    barrier()
    destination = {record.file_name: (split, record.captions) for split in SPLIT_NAMES for record in splits[split]}
    mine = [part for index, part in enumerate(parts) if index % world_size == rank]
    todo = [part for part in mine if not (directory / PARTS_DIR / part.name / PART_FILE).exists()]
    if todo:
        if len(todo) < len(mine):
            log.info("Resuming streamed extraction: %d of this process's %d parts are done.", len(mine) - len(todo),
                     len(mine))  # fmt: skip
        encoder = spec.encoder
        encoder.load_pretrained()
        encoder = encoder.to(device).eval()
        _, precision = extraction_method(device, device_decode=False)
        batch_size = batch_size or default_batch_size(device)

        def forward(images: torch.Tensor) -> torch.Tensor:
            return encoder(images.to(device, non_blocking=True), grid=spec.grid)

        with (torch.random.fork_rng(devices=[]), torch.inference_mode(),
              torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")):  # fmt: skip
            for number, part in enumerate(todo, 1):
                record = extract_part(part, destination, spec, forward, directory / PARTS_DIR / part.name,
                                      batch_size, threads)  # fmt: skip
                log.info(
                    "Streamed features: part %s done (%d of %d here; %s).",
                    part.name,
                    number,
                    len(todo),
                    ", ".join(f"{count} {split}" for split, count in record["counts"].items()) or "empty",
                )
    barrier()
    if rank == 0:
        folders = [directory / PARTS_DIR / part.name for part in parts]
        failed: dict[str, str] = {}
        for folder in folders:
            failed.update(json.loads((folder / PART_FILE).read_text())["failed"])
        counts = {split: _merge(directory, folders, split) for split in SPLIT_NAMES}
        if not any(counts.values()):
            raise CaptionerError(f"No image could be decoded ({len(failed)} failed, e.g. "
                                 f"{next(iter(failed.items()), ('', ''))}).")  # fmt: skip
        row_shape = list(spec.row_shape())
        _write_meta(directory, {"version": STREAM_VERSION, "key": key, "encoder": encoder_spec, "row_shape": row_shape,
                                "preprocessing": jsonable(spec.encoder.preprocessing.to_dict()), "counts": counts,
                                "failed": failed})  # fmt: skip
        shutil.rmtree(directory / PARTS_DIR, ignore_errors=True)
    barrier()
    return open_streamed(location, key, encoder_spec)


# ---------------------------------------------------------------- training from the stream
class TokenizedImage:
    """A streamed item as a training item: the image's features, its captions as tokens, its name."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        captions = item["captions"].split("\n")
        return {"features": torch.from_numpy(np.asarray(item["features"])), "name": item["name"],
                "tokens": self.tokenizer.encode_batch(captions)}  # fmt: skip


def collate_images_with_captions(items: list[dict[str, Any]], pad_index: int = 0) -> dict[str, Any]:
    """A batch like `ImageCaptions`' for training: `features` `(B, ...)`, every caption's `tokens` with the row
    (`owners`) of its image, and the images' `names` (to count what an epoch saw)."""
    tokens = torch.cat([item["tokens"] for item in items])
    owners = torch.cat([torch.full((len(item["tokens"]),), row) for row, item in enumerate(items)])
    used = int((tokens != pad_index).sum(dim=1).max()) if len(tokens) else 1
    return {"features": torch.stack([item["features"] for item in items]).float(), "tokens": tokens[:, :used],
            "owners": owners, "names": [item["name"] for item in items]}  # fmt: skip


class _Collate:
    """Picklable collate for loader workers."""

    def __init__(self, pad_index: int) -> None:
        self.pad_index = pad_index

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_images_with_captions(items, self.pad_index)
