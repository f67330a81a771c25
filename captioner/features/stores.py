"""Feature stores as parts: where a run's image features come from, behind one interface the datamodule uses.

    class MyStore(FeatureStore):
        def open(self, run: StoreRun) -> None: ...          # extract what is missing (every rank), open read-only
        def rows(self, split, names) -> tuple[reader, row_of]: ...   # what a split's datasets read, by image name
        # optional: to_device(batch), and a training loader of its own (train_loader, state_at, start_at)

Built in:

- `DefaultStore` (the default): the cache or the stream by `kind` ("auto": streamed for images inside shards),
  with their options (`--data.feature_store.kind cache`, `--data.feature_store.resident false`, ...);
- `CacheStore`: one memory-mapped fp16 array per node
  (`captioner.features.cache`), held whole on the training device when it fits (`resident`);
- `StreamStore`: LitData feature shards (`captioner.features.streamed`), training streamed one
  caption per item, validation and test held in memory;
- `PixelStore` (chosen when the encoder trains): no features, images decoded by the loader workers.

All extract with the one pipeline (`captioner.features.extraction`); a training item is one caption (or one image
with all its captions, when the objective asks) and `data.loading.batch_size` counts items, whatever the store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from captioner.core.errors import CaptionerError
from captioner.features.cache import FEATURES_FILE, FeatureCache, prepare_cache
from captioner.features.keys import FeatureSpec
from captioner.features.resident import ResidentFeatures, host_budget, memory_budget
from captioner.features.rows import FeatureRows, PixelRows, RowIndex
from captioner.sources.parts import IMAGES_PER_FOLDER_PART, image_parts
from captioner.sources.records import CaptionRecord

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
FEATURES_DIR, STREAMED_DIR = "features", "streamed"


@dataclass
class StoreRun:
    """What a store needs of the run to prepare and open its features.

    Attributes:
        work_dir: Where prepared data and features are kept.
        images_dir: What image names are relative to.
        splits: The records of each split.
        spec: The encoder and the kind of features.
        sharded: The images are inside WebDataset shards (`<shard>#<member>` names), not files.
        device: The training device (the encoder extracts there).
        rank, world_size, barrier: This process among those sharing extraction.
        batch_size: Images per encoder pass (None: 256 on a GPU, 8 on a CPU).
        threads: Images decoded at once.
        compile_encoder: Run the encoder through `torch.compile` while extracting.
        seed: The run's seed (training order, random crops).
        train_crop: The random crop of a trained encoder's training images (1: none).
        per_part: Images per part of a folder (the unit of resuming and sharing out extraction).
        parts: The parts to extract, when the data gives them (the shards of a sharded set); None: built from the
            splits' images.
        identity: What a streamed set's key is drawn from (None: the splits' image names).
        styles: The caption styles of the model (`captioner.text.styles`): a streamed set stores each training
            caption as the model learns it, its style's marker first.
    """

    work_dir: Path
    images_dir: Path
    splits: dict[str, list[CaptionRecord]]
    spec: FeatureSpec
    sharded: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None
    batch_size: int | None = None
    threads: int = 4
    compile_encoder: bool = False
    seed: int = 0
    train_crop: float = 1.0
    per_part: int = IMAGES_PER_FOLDER_PART
    parts: list | None = None
    identity: list[str] | None = None
    styles: tuple[str, ...] = ()

    def names(self, splits: tuple[str, ...] = SPLITS) -> list[str]:
        """Every image of these splits, sorted."""
        return sorted(record.file_name for split in splits for record in self.splits[split])


class FeatureStore:
    """Base class and written protocol of feature stores (see the module docstring).

    Attributes:
        failed: Images whose decoding failed, with the reason (left out of every split), once opened.
        streams_training: The training set is read through the store's own loader (`train_loader`).
    """

    failed: dict[str, str]
    streams_training = False

    def open(self, run: StoreRun) -> None:
        """Make the features of the run's images available: extract what is missing (every rank of a distributed
        run calls this, sharing the work), then open them read-only."""
        raise NotImplementedError

    def rows(self, split: str, names: list[str]) -> tuple[Any, dict[str, int]]:
        """What a split's datasets read (`captioner.data.datasets`: `FeatureRows`, `RowIndex`, `PixelRows`) and the
        row of each of its images."""
        raise NotImplementedError

    def to_device(self, batch: dict) -> dict:
        """A batch on the training device, completed where the store gathers there (a no-op by default)."""
        return batch

    def describe(self) -> str:
        return type(self).__name__

    def resolved(self, sharded: bool, online: bool) -> FeatureStore:
        """The store that serves this data: itself (a store of the user's, or a built-in one named by class path),
        or the one `DefaultStore` chooses; images for an encoder that trains.

        Raises:
            CaptionerError: For an encoder that trains (it reads images), when this store serves features only.
        """
        if online and not isinstance(self, PixelStore):
            raise CaptionerError(
                f"A trained encoder reads images, not features: {type(self).__name__} cannot serve "
                "it; leave --data.feature_store at its default."
            )
        return self


def check_images(run: StoreRun, store: FeatureStore) -> None:
    """Refuse a store that cannot read images inside shards.

    Raises:
        CaptionerError: Naming what to choose instead.
    """
    if run.sharded:
        raise CaptionerError(
            f"The images are inside shards: their features can only be streamed (--data."
            f"feature_store.kind stream or auto), not read by {type(store).__name__}."
        )


class CacheStore(FeatureStore):
    """One memory-mapped fp16 array per node, read row by row in the loader workers, or held whole on the training
    device (or pinned host memory beside a GPU) and gathered there.

    Args:
        resident: "auto" (held in memory when it fits the budget), True (stop if it does not) or False (read from
            disk per batch).
        resident_budget_gb: The most memory it may take there (None: half the GPU's free memory, or a quarter of
            the host's available memory).
    """

    def __init__(self, resident: bool | str = "auto", resident_budget_gb: float | None = None) -> None:
        self.resident_choice, self.resident_budget_gb = resident, resident_budget_gb
        self.cache: FeatureCache | None = None
        self.resident: ResidentFeatures | None = None
        self.failed = {}

    def open(self, run: StoreRun) -> None:
        check_images(run, self)
        self.cache = prepare_cache(
            run.work_dir / FEATURES_DIR,
            run.images_dir,
            run.names(),
            run.spec,
            run.device,
            run.batch_size,
            run.threads,
            run.compile_encoder,
            run.rank,
            run.world_size,
            run.barrier,
            run.per_part,
        )
        self.failed = self.cache.failed
        self.resident = self._resident(run.device)

    def _resident(self, device: torch.device) -> ResidentFeatures | None:
        size, choice = self.cache.features.nbytes, self.resident_choice
        if choice is False:
            return None
        budget = int(self.resident_budget_gb * 2**30) if self.resident_budget_gb else memory_budget(device)
        if size <= budget:
            log.info("Feature cache (%.0f MB) held in %s memory.", size / 2**20, device.type.upper())
            return ResidentFeatures(self.cache.features, device)
        if device.type == "cuda" and size <= host_budget():
            log.info("Feature cache (%.0f MB) held in pinned host memory.", size / 2**20)
            return ResidentFeatures(self.cache.features, device, host=True)
        if choice is True:
            raise CaptionerError(
                f"--data.feature_store.resident true: the feature cache ({size / 2**30:.1f} GB) is "
                "over the memory budget; raise --data.feature_store.resident_budget_gb or set it to "
                "auto."
            )
        return None

    def rows(self, split: str, names: list[str]) -> tuple[Any, dict[str, int]]:
        reader = RowIndex() if self.resident is not None else FeatureRows(self.cache.directory / FEATURES_FILE)
        return reader, self.cache.row_of

    def to_device(self, batch: dict) -> dict:
        if isinstance(batch, dict) and "rows" in batch and self.resident is not None:
            batch = {**batch, "features": self.resident.gather(batch["rows"])}
            del batch["rows"]
        return batch

    def describe(self) -> str:
        return "resident cache" if self.resident is not None else "memory-mapped cache"


class PixelStore(FeatureStore):
    """No features: the images themselves, decoded and preprocessed by the loader workers, for an encoder that
    trains (its features change every step). Training images get the encoder's random crop."""

    def __init__(self) -> None:
        self.failed, self.run = {}, None

    def open(self, run: StoreRun) -> None:
        check_images(run, self)
        self.run, self.names = run, run.names()

    def rows(self, split: str, names: list[str]) -> tuple[Any, dict[str, int]]:
        run = self.run
        reader = PixelRows(
            [run.images_dir / name for name in self.names],
            run.spec.preprocessing,
            augment=run.train_crop if split == "train" else 1.0,
            seed=run.seed,
        )
        return reader, {name: row for row, name in enumerate(self.names)}


class StreamStore(FeatureStore):
    """LitData feature shards: training streamed from a folder or an object store with a bounded local cache, one
    caption per item (`captioner.features.stream_loader`); validation and test features held in memory (they are
    few). Images inside WebDataset shards can only be read this way.

    Args:
        stream_dir: The folder of streamed feature sets (None: `<work_dir>/streamed`), or the URL where sets
            extracted earlier were uploaded (s3://..., gs://...).
        cache_gb: The most disk LitData's local cache of a remote set may take (None: its default).
    """

    streams_training = True

    def __init__(self, stream_dir: str | None = None, cache_gb: float | None = None) -> None:
        self.stream_dir, self.cache_gb = stream_dir, cache_gb
        self.features, self.resident, self.failed = None, None, {}
        self.run: StoreRun | None = None

    def root(self, run: StoreRun) -> str:
        return self.stream_dir or str(run.work_dir / STREAMED_DIR)

    def cache_dir(self, run: StoreRun) -> str | None:
        """Where LitData keeps chunks of a remote set (its default place when None)."""
        return None if "://" not in self.root(run) else str(run.work_dir / "stream-cache")

    def open(self, run: StoreRun) -> None:
        from captioner.features.streamed import prepare_streamed

        self.run = run
        parts = (
            run.parts if run.parts is not None else image_parts(run.names(), run.images_dir, run.sharded, run.per_part)
        )
        self.features = prepare_streamed(
            self.root(run),
            parts,
            run.splits,
            run.spec,
            rank=run.rank,
            world_size=run.world_size,
            barrier=run.barrier,
            device=run.device,
            batch_size=run.batch_size,
            threads=run.threads,
            cache_dir=self.cache_dir(run),
            identity=run.identity,
            styles=run.styles,
        )
        self.failed = self.features.failed
        names = [
            record.file_name
            for split in ("val", "test")
            for record in run.splits[split]
            if record.file_name not in self.failed
        ]
        self.row_of = {name: row for row, name in enumerate(names)}
        self.resident = ResidentFeatures(self.features.table(names, self.cache_dir(run)), run.device)

    @property
    def train_size(self) -> int:
        return self.features.meta["counts"].get("train", 0)

    def rows(self, split: str, names: list[str]) -> tuple[Any, dict[str, int]]:
        if split == "train":
            raise CaptionerError("A streamed training set is read through its own loader (train_loader).")
        return RowIndex(), self.row_of

    def to_device(self, batch: dict) -> dict:
        return CacheStore.to_device(self, batch)  # validation and test batches carry rows

    def train_loader(
        self,
        tokenizer: Any,
        batch_size: int,
        num_workers: int,
        seed: int,
        per_image: bool,
        pin_memory: bool,
        rank: int = 0,
    ) -> Any:
        """LitData's loader over the training stream (see `captioner.features.stream_loader`)."""
        from captioner.features.stream_loader import train_loader

        return train_loader(
            self.features,
            tokenizer,
            batch_size,
            num_workers,
            seed,
            pin_memory,
            per_image,
            cache_dir=self.cache_dir(self.run),
            max_cache_gb=self.cache_gb,
            rank=rank,
        )

    def describe(self) -> str:
        return f"streamed features ({self.features.location})"


class DefaultStore(FeatureStore):
    """The built-in stores with their options (the default `--data.feature_store`): `kind` chooses the cache or the
    stream, or each by the data ("auto": streamed for images inside WebDataset shards, the cache otherwise); an
    encoder that trains reads images (`PixelStore`) whatever the kind.

    Args:
        kind: "auto", "cache" or "stream".
        resident: The cache's: "auto" (held in memory when it fits the budget), true (stop if it does not) or false
            (read from disk per batch).
        resident_budget_gb: The most memory the cache may take there (None: half the GPU's free memory, or a
            quarter of the host's available memory).
        stream_dir: The folder of streamed feature sets (None: `<work_dir>/streamed`), or the URL of one where sets
            extracted earlier were uploaded (s3://..., gs://...).
        stream_cache_gb: The most disk LitData's local cache of a remote streamed set may take (None: its default).
    """

    def __init__(
        self,
        kind: Literal["auto", "cache", "stream"] = "auto",
        resident: bool | Literal["auto"] = "auto",
        resident_budget_gb: float | None = None,
        stream_dir: str | None = None,
        stream_cache_gb: float | None = None,
    ) -> None:
        if kind not in ("auto", "cache", "stream"):
            raise CaptionerError(f"--data.feature_store.kind {kind!r}: choose auto, cache or stream.")
        self.kind, self.resident, self.resident_budget_gb = kind, resident, resident_budget_gb
        self.stream_dir, self.stream_cache_gb = stream_dir, stream_cache_gb

    def resolved(self, sharded: bool, online: bool) -> FeatureStore:
        streams = self.kind == "stream" or (self.kind == "auto" and sharded)
        if online:
            if streams:
                raise CaptionerError(
                    "A trained encoder reads images, not features: --model.trainable_encoder_blocks "
                    "> 0 needs image files and --data.feature_store.kind cache."
                )
            return PixelStore()
        if streams:
            return StreamStore(self.stream_dir, self.stream_cache_gb)
        return CacheStore(self.resident, self.resident_budget_gb)
