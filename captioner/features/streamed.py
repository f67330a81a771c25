"""Streamed feature shards, for sets beyond one disk: features extracted straight from image shards (or an image
folder) by every rank into LitData's chunked format, then streamed for training, DDP-aware and resumable mid-epoch
(`pip install 'captioner[shards]'`).

Layout of a streamed feature set (`<stream_dir>/<encoder>-<size>px-[grid-]<key>/`), each folder a LitData dataset:

    train/   one item per training image: {"name", "features" (float16), "captions" (one per line)}
    val/     the same for validation images (read whole into memory: they are few)
    test/
    meta/    one item: {"json": what the set is (key, encoder, preprocessing, counts, captions per image, undecodable
             images)}; written last, so a set with `meta/` is complete

The key is the feature key (`captioner.features.keys`) over the images' names
tagged with their split: another encoder, preprocessing or split is another set.
Extraction is the one pipeline (`captioner.features.extraction`), a part being
one input shard or a run of a folder's images, each written into `parts/<part>/`
(whole, then renamed), merged by rank 0 with `litdata.merge_datasets`.

Training reads it as the cache is read (`captioner.features.stream_loader`): one
item per caption unless the objective asks for whole images.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captioner.core.errors import CaptionerError
from captioner.core.files import jsonable, read_json, write_json
from captioner.core.parts import require_library
from captioner.features.extraction import extract_parts
from captioner.features.keys import FeatureSpec, cache_key, extraction_method
from captioner.sources.parts import ImagePart
from captioner.sources.records import CaptionRecord
from captioner.text.styles import training_texts

log = logging.getLogger(__name__)

STREAM_VERSION = 2
SPLIT_NAMES = ("train", "val", "test")
PARTS_DIR, PART_FILE, META = "parts", "part.json", "meta"
CHUNK_BYTES = "64MB"


def litdata(module: str = "litdata") -> Any:
    """LitData (or one of its modules), or one line naming the extra that installs it."""
    return require_library(module, "shards", "Streamed features")


def stream_key(spec: FeatureSpec, names: list[str], device: torch.device | str) -> str:
    """The set's key: the feature key (encoder, preprocessing, kind, precision) over what the images are (their
    split-tagged names, or what identifies a sharded set's records: `captioner.data.sharded`)."""
    _, precision = extraction_method(device, device_decode=False)  # images in shards are decoded on the host
    return cache_key(spec.encoder_spec, spec.preprocessing, names, spec.grid, "pil", precision)


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

    @property
    def captions_per_image(self) -> float:
        """Training captions per training image (what makes an epoch of captions from an epoch of images)."""
        return self.meta["train_captions"] / max(1, self.meta["counts"].get("train", 0))

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
            dataset = litdata().StreamingDataset(self.split(split), cache_dir=cache_dir)
            for index in range(self.meta["counts"][split]):  # global indices (a rank's len() is its share)
                item = dataset[index]
                row = wanted.get(item["name"])
                if row is not None:
                    table[row] = item["features"]
                    found += 1
        if found != len(names):
            raise CaptionerError(
                f"The streamed features in {self.location} lack {len(names) - found} validation or "
                "test images; delete the folder and run again to extract them."
            )
        return table


def open_streamed(location: str, key: str, encoder: dict[str, Any], cache_dir: str | None = None) -> StreamedFeatures:
    """Open a complete streamed set, checking it is the one asked for.

    Raises:
        CaptionerError: When it is incomplete, unreadable, or another set (nothing is deleted).
    """
    meta_dir = f"{location.rstrip('/')}/{META}"
    try:
        meta = json.loads(litdata().StreamingDataset(meta_dir, cache_dir=cache_dir)[0]["json"])
    except CaptionerError:
        raise
    except Exception as error:  # LitData raises many types for a missing or damaged index
        raise CaptionerError(f"The streamed features in {location} are incomplete or unreadable ({error}).") from error
    if meta.get("version") != STREAM_VERSION or meta.get("key") != key or meta.get("encoder") != encoder:
        raise CaptionerError(
            f"The streamed features in {location} were extracted for other images, splits, encoder "
            "settings or by another version of captioner. Nothing was deleted: remove that folder "
            "to extract them again, or point --data.feature_store.stream_dir elsewhere."
        )
    return StreamedFeatures(location, meta)


class _SplitWriters:
    """One part's items per split, written with LitData's `BinaryWriter` into a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.writers, self.counts = folder, {}, {}

    def add(self, split: str, item: dict[str, Any]) -> None:
        if split not in self.writers:
            writer_class = litdata("litdata.streaming.writer").BinaryWriter
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


class _StreamPartWriter:
    """One part's items (each image with its split's captions) in a temporary folder, renamed when done."""

    def __init__(self, folder: Path, destination: dict[str, tuple[str, tuple[str, ...]]]) -> None:
        self.folder, self.destination = folder, destination
        self.tmp = folder.with_name(f".{folder.name}.partial")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.writers, self.failed, self.captions = _SplitWriters(self.tmp), {}, {}

    def write(self, names: list[str], features: np.ndarray, errors: dict[str, str]) -> None:
        for name, row in zip(names, features, strict=True):
            split, captions = self.destination[name]
            self.writers.add(split, {"name": name, "features": row, "captions": "\n".join(captions)})
            self.captions[split] = self.captions.get(split, 0) + len(captions)
        self.failed.update(errors)

    def finish(self) -> dict[str, Any]:
        self.writers.close()
        record = {"counts": self.writers.counts, "captions": self.captions, "failed": self.failed}
        write_json(self.tmp / PART_FILE, record)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.tmp.rename(self.folder)
        log.info(
            "Streamed features: part %s done (%s).",
            self.folder.name,
            ", ".join(f"{count} {split}" for split, count in record["counts"].items()) or "empty",
        )
        return record


class StreamSink:
    """Extraction's writer of a streamed set (see `captioner.features.extraction.FeatureSink`)."""

    def __init__(
        self,
        directory: Path,
        key: str,
        spec: FeatureSpec,
        splits: dict[str, list[CaptionRecord]],
        styles: tuple[str, ...] = (),
    ) -> None:
        self.directory, self.key, self.spec, self.styles = directory, key, spec, styles
        self.folder = directory
        # Images of parts that do not know their records (runs of a folder's files); a shard's index knows its own.
        self.destination = dict(self._stored(record, split) for split in SPLIT_NAMES for record in splits[split])

    def _stored(self, record: CaptionRecord, split: str | None) -> tuple[str, tuple[str, tuple[str, ...]]]:
        """An image's split and the captions its item holds: training captions as the model learns them (with their
        style's marker, `captioner.text.styles`), references as written."""
        split = split or record.split
        texts = training_texts(record, self.styles) if split == "train" else record.captions
        return record.file_name, (split, texts)

    def _folder(self, part: ImagePart) -> Path:
        return self.directory / PARTS_DIR / part.name

    def done(self, part: ImagePart) -> bool:
        return (self._folder(part) / PART_FILE).is_file()

    def writer(self, part: ImagePart) -> _StreamPartWriter:
        records = part.records()
        if records is None:
            return _StreamPartWriter(self._folder(part), self.destination)
        return _StreamPartWriter(self._folder(part), dict(self._stored(record, None) for record in records))

    def assemble(self, parts: Sequence[ImagePart]) -> None:
        folders = [self._folder(part) for part in parts]
        failed: dict[str, str] = {}
        train_captions = 0
        for folder in folders:
            record = read_json(folder / PART_FILE, "Streamed part")
            failed.update(record["failed"])
            train_captions += record["captions"].get("train", 0)
        counts = {split: _merge(self.directory, folders, split) for split in SPLIT_NAMES}
        if not any(counts.values()):
            raise CaptionerError(
                f"No image could be decoded ({len(failed)} failed, e.g. {next(iter(failed.items()), ('', ''))})."
            )
        _write_meta(
            self.directory,
            {
                "version": STREAM_VERSION,
                "key": self.key,
                "encoder": self.spec.encoder_spec,
                "row_shape": list(self.spec.row_shape()),
                "counts": counts,
                "train_captions": train_captions,
                "preprocessing": jsonable(self.spec.preprocessing.to_dict()),
                "failed": failed,
            },
        )
        shutil.rmtree(self.directory / PARTS_DIR, ignore_errors=True)


def _merge(directory: Path, part_folders: list[Path], split: str) -> int:
    """The parts' items of one split as one dataset; returns how many."""
    with_split = [folder / split for folder in part_folders if (folder / split / "index.json").exists()]
    target = directory / split
    shutil.rmtree(target, ignore_errors=True)
    if len(with_split) == 1:
        shutil.copytree(with_split[0], target)
    elif with_split:
        litdata().merge_datasets([str(folder) for folder in with_split], str(target))
    return sum(json.loads((folder.parent / PART_FILE).read_text())["counts"].get(split, 0) for folder in with_split)


def _write_meta(directory: Path, meta: dict[str, Any]) -> None:
    tmp = directory / f".{META}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    writers = _SplitWriters(tmp)
    writers.add(META, {"json": json.dumps(meta)})
    writers.close()
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
    identity: list[str] | None = None,
    styles: tuple[str, ...] = (),
) -> StreamedFeatures:
    """The streamed feature set of these splits, extracted first where it is missing (every rank its share).

    Args:
        root: The folder of streamed sets (`--data.feature_store.stream_dir`); a URL holds sets extracted and
            uploaded earlier.
        parts: The units of extraction (`captioner.sources.parts.image_parts`).
        splits: The records of each split.
        spec: The encoder and the kind of features.
        rank, world_size, barrier: This process among those sharing the work.
        device: Where the encoder runs (images in shards are decoded on the host).
        batch_size: Images per encoder pass (None: 256 on a GPU, 8 on a CPU).
        threads: Images decoded at once.
        cache_dir: Where LitData keeps the chunks of a remote set (a bounded cache).
        identity: What the set's key is drawn from (None: the split-tagged names of `splits`' records).
        styles: The model's caption styles: training captions are stored with their style's marker.

    Raises:
        CaptionerError: When a set at a URL is missing, a complete set there is another one, or no image at all
            could be decoded.
    """
    device = torch.device(device)
    if identity is None:
        identity = [f"{split}:{record.file_name}" for split in SPLIT_NAMES for record in splits[split]]
    if styles:  # the stored training captions carry the styles' markers: another set
        identity = [*identity, f"styles:{','.join(styles)}"]
    key = stream_key(spec, identity, device)
    location = f"{root.rstrip('/')}/{spec.folder_name(key)}"
    if "://" in root:
        return open_streamed(location, key, spec.encoder_spec, cache_dir)
    directory = Path(location)
    if (directory / META / "index.json").exists():
        return open_streamed(location, key, spec.encoder_spec)
    barrier()
    directory.mkdir(parents=True, exist_ok=True)
    extract_parts(
        parts,
        spec,
        StreamSink(directory, key, spec, splits, styles),
        device,
        batch_size,
        threads,
        device_decode=False,
        rank=rank,
        world_size=world_size,
        barrier=barrier,
    )
    return open_streamed(location, key, spec.encoder_spec)
