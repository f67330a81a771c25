"""CaptionDataModule: prepares a caption set once (in any supported format, `captioner.data.preparation`) and serves
its features from the configured store; it orchestrates and owns nothing else."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jsonargparse import lazy_instance
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image
from torch.utils.data import DataLoader

from captioner.core.errors import CaptionerError
from captioner.core.pixels import open_accepted
from captioner.data.datasets import ImageCaptions, TrainCaptions, passthrough
from captioner.data.formats import CaptionFormat
from captioner.data.options import Captions, Extraction, Loading, ModelNeeds, Origin, Splits
from captioner.data.preparation import Preparation, load_tokenizer
from captioner.data.sampling import ResumableLoader, ResumableSampler, TrainingPosition
from captioner.data.sharded import SHARDED_FILE, ShardedRecords
from captioner.data.splits import SPLITS, load_splits
from captioner.encoders.base import ImageEncoder
from captioner.encoders.image_files import ImageFileDataset, collate_images
from captioner.encoders.torchvision_models import default_encoder
from captioner.features.keys import FeatureSpec
from captioner.features.stores import DefaultStore, FeatureStore, StoreRun
from captioner.sources.images import IMAGE_EXTENSIONS, find_images
from captioner.sources.parts import indexed_parts
from captioner.sources.records import CaptionRecord, DataReport
from captioner.sources.shards import SHARD_SEPARATOR
from captioner.text.base import TokenizerRecipe
from captioner.text.styles import captions_in_style, default_references, training_texts
from captioner.text.words import Words

log = logging.getLogger(__name__)


class CaptionDataModule(LightningDataModule):
    """A caption set (Mini-COCO by default) as encoder features (or images) and captions.

    `prepare_data` (once per node) fetches the data, reads it, splits it and builds the tokenizer under `work_dir`
    (`captioner.data.preparation`). `setup` (every process) opens them and the run's feature store
    (`captioner.features.stores`), which extracts what is missing first, every process claiming its next part.
    The datamodule orchestrates: what a split's items are, the training order and where training stands; the
    store owns where features live and how they are read.

    Args:
        data_dir: The folder holding the captions and images. When set, kagglehub is never called.
        format: How the captions are written (`captioner.data.formats`: Coco, Karpathy, Csv, Jsonl, TextFolder,
            WebDataset, or your own), with its options. None: the first format found in `data_dir`.
        origin: Where the data comes from when `data_dir` does not say: a Kaggle dataset (kagglehub) or
            generated scenes (`captioner.data.options.Origin`).
        splits: How images are split into train, val and test (`Splits`: sizes, seed, a Karpathy split file).
        tokenizer: How captions become tokens (`captioner.text.Words`, the default: a word vocabulary;
            `captioner.text.Bpe`: byte-level BPE trained on the training captions; `captioner.text.Pretrained`: a
            pretrained tokenizer, such as GPT-2's for `PrefixLMDecoder`; or your own recipe).
        captions: How captions are kept (`Captions`: the longest caption, the word vocabulary's minimum count).
        encoder: The image encoder features are extracted with (set from `--model.encoder`: the model's own
            instance, so one config entry chooses it). None: an ImageNet ResNet50.
        needs: What the model reads (`ModelNeeds`: pooled or grid features, captions or images per training item,
            images for an encoder that trains), set from the model's parts.
        feature_store: Where features go (`captioner.features.stores`): the built-in stores by `kind` with their
            options (`DefaultStore`: "auto", "cache" or "stream"; resident features, a stream's folder), or a
            `FeatureStore` of your own by class_path. Whatever the store, a training item and the batch size mean
            the same.
        extraction: How features are extracted (`Extraction`: batch size, compiled encoder, decode threads, part
            size).
        loading: How items reach the model (`Loading`: batch sizes, loader workers, a trained encoder's crop).
        work_dir: Where prepared data and feature caches are kept for every later run.
        shared_filesystem: All nodes of a multi-node run see `work_dir` on one shared file system, so data is
            prepared once in all (False: once per node, each into its own `work_dir`).
        predict_dir: Folder of images to caption with `predict` (searched recursively).
    """

    def __init__(
        self,
        data_dir: str | None = None,
        format: CaptionFormat | None = None,
        origin: Origin = Origin(),
        splits: Splits = Splits(),
        tokenizer: TokenizerRecipe | None = None,
        captions: Captions = Captions(),
        encoder: ImageEncoder | None = None,
        needs: ModelNeeds = ModelNeeds(),
        feature_store: FeatureStore = lazy_instance(DefaultStore),
        extraction: Extraction = Extraction(),
        loading: Loading = Loading(),
        work_dir: str = "data/mini-coco",
        shared_filesystem: bool = True,
        predict_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.prepare_data_per_node = not shared_filesystem
        self.save_hyperparameters(ignore=["format", "encoder", "tokenizer", "feature_store"])
        self.needs, self.extraction, self.loading = needs, extraction, loading
        self.feature_store = feature_store
        self.encoder = encoder if encoder is not None else default_encoder()
        self.work_dir = Path(work_dir)
        self.preparation = Preparation(
            self.work_dir, data_dir, format, origin, splits, captions, tokenizer if tokenizer is not None else Words()
        )
        self.vocabulary: Any = None  # the tokenizer: a word vocabulary or subwords (see captioner.text.base)
        self.images_dir: Path | None = None
        self.data_root: Path | None = None
        self._report: DataReport | None = None  # kept by the process that prepared, for the summary
        self.datasets: dict[str, torch.utils.data.Dataset] = {}
        self._resume_at: TrainingPosition | None = None  # set from a checkpoint, used by the next training loader
        self.store: FeatureStore | None = None  # where this run's features come from, once set up
        self.split_sizes: dict[str, int] = {}
        self._stream_state: dict[str, Any] | None = None  # a streamed loader's position, from a checkpoint

    # ---------------------------------------------------------------- preparation (one process per node)
    def prepare_data(self) -> None:
        """Fetch, read, split and build the tokenizer (`captioner.data.preparation`: each step skipped if done);
        features come in `setup`. Nothing at all for `predict`: a checkpoint and a folder of images are all it
        needs."""
        if self.trainer is not None and self.trainer.predicting:
            return
        self._report = self.preparation.run()

    @property
    def feature_spec(self) -> FeatureSpec:
        """The encoder and kind of features the cache holds."""
        return FeatureSpec(self.encoder, grid=self.needs.features == "grid")

    def _rank_and_world(self) -> tuple[int, int]:
        """This process's place among those sharing the extraction: all ranks with a shared file system, else the
        node's own (each node builds its own copy on its own disk, as rank 0 could not read the others' parts)."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return 0, 1
        if self.hparams.shared_filesystem:
            return trainer.global_rank, trainer.world_size
        return trainer.local_rank, trainer.num_devices

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def _store_run(self, splits: dict[str, list[CaptionRecord]], sharded: bool) -> StoreRun:
        rank, world_size = self._rank_and_world()
        barrier = self.trainer.strategy.barrier if self.trainer is not None and world_size > 1 else (lambda: None)
        extraction = self.extraction
        return StoreRun(
            self.work_dir,
            self.images_dir,
            splits,
            self.feature_spec,
            sharded,
            self._device(),
            rank,
            world_size,
            barrier,
            extraction.batch_size,
            max(extraction.decode_threads, self.loading.num_workers, 1),
            extraction.compile_encoder,
            self.shuffle_seed,
            self.loading.train_crop,
            extraction.part_size,
            styles=tuple(getattr(self.vocabulary, "styles", ())),
        )

    def _report_once(self, root: Path, undecodable: dict[str, str]) -> None:
        """One summary of everything preparation kept and skipped, at the end."""
        if self._report is not None:
            self._report.undecodable = undecodable
            noisy = self._report.skipped or undecodable
            (log.warning if noisy else log.info)("Dataset %s: %s", root, self._report.summary())
            self._report = None

    # ---------------------------------------------------------------- setup (every process)
    def setup(self, stage: str) -> None:
        """Open the prepared files and the feature store (extracting what is missing), and build the datasets."""
        if stage == "predict":
            self._setup_predict()
            return
        prepared = self.preparation.prepared()
        dataset = prepared.read_dataset()
        root, self.images_dir = Path(dataset["root"]), Path(dataset["images_dir"])
        self.data_root = root
        splits, _ = load_splits(prepared.splits_file)
        self.vocabulary = load_tokenizer(prepared.vocab_file)
        self.store = self.feature_store.resolved(dataset["sharded"], self.needs.online_features)
        run = self._store_run(splits, dataset["sharded"])
        if dataset["sharded"]:  # training records live in the shard index: each part reads its own
            sharded = ShardedRecords.read(prepared.folder / SHARDED_FILE)
            run.parts = indexed_parts(sharded, self.images_dir)
            run.identity = [f"shards:{prepared.folder.name}:{json.dumps(sharded.to_dict(), sort_keys=True)}"]
        self.store.open(run)
        failed = self.store.failed
        self._report_once(root, failed)
        self.split_sizes = {}
        for name in SPLITS:
            records = [r for r in splits[name] if r.file_name not in failed]
            self.split_sizes[name] = (
                self.store.train_size if name == "train" and self.store.streams_training else (len(records))
            )
            if not self.split_sizes[name]:
                raise CaptionerError(
                    f"The {name} split has no usable image; adjust --data.splits.{name}_size or the data."
                )
            if name == "train" and self.store.streams_training:
                self.datasets[name] = StreamedSplit(self.split_sizes[name])
                continue
            reader, row_of = self.store.rows(name, [r.file_name for r in records])
            self.datasets[name] = self._dataset(name, records, reader, row_of)

    # ---------------------------------------------------------------- what the model reads (captioner.data.contract)
    @property
    def train_items(self) -> str:
        """What one training item is: "captions", or "images" with all their captions."""
        return self.needs.train_items

    def references(self, split: str) -> list[list[list[int]]] | None:
        """The word ids of each image's references in `split` (dataset order); None when the split streams.

        Raises:
            CaptionerError: When the split is not set up.
        """
        if split not in self.datasets:
            raise CaptionerError(f"The {split} data is not set up; call setup() first.")
        return getattr(self.datasets[split], "reference_ids", None)

    def image_file(self, name: str) -> Path | None:
        """The file of an image of the data by its record name (None for an image inside a shard)."""
        path = Path(self.images_dir) / name if self.images_dir is not None else None
        return path if path is not None and path.is_file() else None

    def objects_file(self) -> Path | None:
        """The data's own captions file when its images list their objects (the demo's scenes do), for CHAIR with
        `--model.extra_metrics.objects auto`; None otherwise."""
        if self.data_root is None or not (self.data_root / "captions.json").is_file():
            return None
        from captioner.evaluation.chair import read_objects

        try:
            read_objects(self.data_root / "captions.json")
        except CaptionerError:  # captions without objects: no CHAIR
            return None
        return self.data_root / "captions.json"

    def sample_image(self, name: str) -> Image.Image:
        """An image of the data by its record name, for pictures of samples (a grey tile for an image inside a
        shard: reading one would mean reading its shard through)."""
        if SHARD_SEPARATOR in name and not (Path(self.images_dir) / name).exists():
            return Image.new("RGB", (self.encoder.preprocessing.image_size,) * 2, (128, 128, 128))
        with open_accepted(Path(self.images_dir) / name) as image:
            image.seek(0)
            return image.convert("RGB")

    def materialize(self, batch: dict) -> dict:
        """A batch completed where its store gathers features on the device (rows of a resident table)."""
        return self.store.to_device(batch) if self.store is not None else batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.materialize(batch)  # on the training device: the gather runs there

    def _dataset(self, name: str, records: list[CaptionRecord], reader, row_of: dict[str, int]):
        styles = tuple(
            getattr(self.vocabulary, "styles", ())
        )  # a model of several caption styles learns each caption with its marker
        if name == "train" and self.needs.train_items == "captions":
            captions = [c for r in records for c in training_texts(r, styles)]
            rows = np.array([row_of[r.file_name] for r in records for _ in r.captions], dtype=np.int64)
            return TrainCaptions(reader, rows, self.vocabulary.encode_batch(captions), self.vocabulary.pad_index)
        rows = np.array([row_of[r.file_name] for r in records], dtype=np.int64)
        return ImageCaptions(
            reader,
            rows,
            [r.file_name for r in records],
            [default_references(r, styles) for r in records],
            self.vocabulary,
            [r.key for r in records],
            texts=[training_texts(r, styles) for r in records] if styles else None,
            style_references={style: [captions_in_style(r, style, styles) for r in records] for style in styles[1:]},
        )

    def _setup_predict(self) -> None:
        if self.hparams.predict_dir is None:
            raise CaptionerError("predict needs --data.predict_dir: the folder of images to caption.")
        folder = Path(self.hparams.predict_dir).expanduser()
        if not folder.is_dir():
            raise CaptionerError(f"--data.predict_dir {folder} does not exist or is not a folder.")
        scan = find_images(folder)
        scan.report(folder)
        if not scan.images:
            raise CaptionerError(
                f"--data.predict_dir {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)}), "
                "searched recursively."
            )
        self.datasets["predict"] = ImageFileDataset(scan.images, self.encoder.preprocessing)

    # ---------------------------------------------------------------- loaders
    def _loader(
        self, split: str, batch_size: int, shuffle: bool, collate=passthrough, drop_last: bool = False
    ) -> DataLoader:
        if split not in self.datasets:
            raise CaptionerError(f"The {split} data is not set up; call setup() first.")
        workers = self.loading.num_workers
        sampler, loader = None, DataLoader
        if shuffle:
            # The order is a function of the seed and the epoch alone; a resumed run starts where the checkpoint
            # stood (see captioner.data.sampling), so it sees the batches the uninterrupted run would have seen.
            world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
            # Augmented images need the epoch with each index (their random crop is a function of both).
            sampler = ResumableSampler(
                self.datasets[split],
                world,
                rank,
                self.shuffle_seed,
                self._resume_at,
                tag_epoch=getattr(self.datasets[split], "augmented", False),
            )
            self._resume_at, loader, shuffle = None, ResumableLoader, False
        elif split in ("val", "test") and self._world_size() > 1:
            # Lightning's default DistributedSampler pads by repeating images; metrics must count each once.
            sampler = UnrepeatedDistributedSampler(
                self.datasets[split], num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
            )
        return loader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate,
            drop_last=drop_last,
            # Worker seeds come from this generator, not the global one the model's dropout draws from: how many
            # loaders were opened (a sanity check, a resume) never changes the training's random numbers.
            generator=torch.Generator().manual_seed(self.shuffle_seed),
            pin_memory=self.trainer is not None and self.trainer.strategy.root_device.type == "cuda",
            persistent_workers=workers > 0,
        )

    # ---------------------------------------------------------------- where training stands (in checkpoints)
    def state_dict(self) -> dict[str, Any]:
        """The training position, which Lightning writes into every checkpoint taken while fitting (and, when
        training streams, LitData's state at that position)."""
        trainer = self.trainer
        loader = trainer.train_dataloader if trainer is not None and trainer.training else None
        if not isinstance(loader, ResumableLoader) and not hasattr(loader, "state_at"):
            return {}
        # Items per training batch: what both loaders yield (a streamed loader reads windows of several batches).
        position = TrainingPosition.of_trainer(trainer, self.loading.batch_size)
        state: dict[str, Any] = {"training_position": position.to_dict()}
        if hasattr(loader, "state_at"):
            state["stream_state"] = loader.state_at(position.epoch, position.items)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Start the next training loader where the checkpoint stood (Lightning calls this before building it)."""
        position = state.get("training_position")
        self._resume_at = TrainingPosition(**position) if position else None
        self._stream_state = state.get("stream_state")

    @property
    def shuffle_seed(self) -> int:
        """The seed of the training order: `seed_everything`'s (Lightning's PL_GLOBAL_SEED), else 0."""
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def train_dataloader(self) -> DataLoader:
        if self.store is not None and self.store.streams_training:
            return self._stream_loader()
        # A last batch of one item would break the decoders' batch norm in training mode (and is noise anyway).
        drop_last = len(self.datasets.get("train", ())) > self.loading.batch_size
        return self._loader("train", self.loading.batch_size, shuffle=True, drop_last=drop_last)

    def _stream_loader(self) -> Any:
        """The store's own training loader, started where a checkpoint stood."""
        rank = self.trainer.global_rank if self.trainer is not None else 0
        loader = self.store.train_loader(
            self.vocabulary,
            self.loading.batch_size,
            self.loading.num_workers,
            self.shuffle_seed,
            self.needs.train_items == "images",
            pin_memory=self._device().type == "cuda",
            rank=rank,
        )
        position = self._resume_at
        loader.start_at(position.epoch if position else 0, self._stream_state if position else None)
        self._resume_at, self._stream_state = None, None
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.loading.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.loading.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", self.loading.eval_batch_size, shuffle=False, collate=collate_images)


class StreamedSplit:
    """The training split when it streams: its size in images (the items live in the stream, read by the store's
    loader). It holds no references, so objectives that score whole images against them (self-critical training)
    refuse it."""

    streamed = True

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size
