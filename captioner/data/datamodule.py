"""CaptionDataModule: prepares a caption set once (in any supported format) and serves cached features."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image
from torch.utils.data import DataLoader

from captioner.core.errors import CaptionerError
from captioner.core.files import read_json, write_json
from captioner.core.pixels import open_accepted
from captioner.data.datasets import (
    ImageCaptions,
    TrainCaptions,
    passthrough,
)
from captioner.data.download import KAGGLE_DATASET, find_caption_set, read_caption_set, resolve_dataset
from captioner.data.formats import CaptionFormat
from captioner.data.prepared import PreparedData
from captioner.data.sampling import ResumableLoader, ResumableSampler, TrainingPosition
from captioner.data.sharded import SHARDED_FILE, ShardedRecords, index_shards, shards_fingerprint
from captioner.data.splits import (
    SPLITS,
    label_from_split_file,
    load_splits,
    make_splits,
    records_fingerprint,
    save_splits,
)
from captioner.encoders.base import ImageEncoder
from captioner.encoders.image_files import ImageFileDataset, collate_images
from captioner.encoders.torchvision_models import default_encoder
from captioner.features.keys import FeatureSpec
from captioner.features.stores import FeatureStore, StoreRun, store_for
from captioner.sources.images import IMAGE_EXTENSIONS, find_images
from captioner.sources.parts import IMAGES_PER_FOLDER_PART, indexed_parts
from captioner.sources.records import CaptionRecord, DataReport
from captioner.sources.shards import SHARD_SEPARATOR
from captioner.text.base import TokenizerRecipe, tokenizer_from_dict
from captioner.text.words import Words, normalize

log = logging.getLogger(__name__)



class CaptionDataModule(LightningDataModule):
    """A caption set (Mini-COCO by default) as encoder features (or images) and captions.

    `prepare_data` (once per node) fetches the data, reads it, splits it and
    builds the tokenizer under `work_dir`. `setup` (every process) opens them
    and the run's feature store (`captioner.features.stores`), which extracts
    what is missing first, every rank its share. The datamodule orchestrates:
    what a split's items are, the training order and where training stands;
    the store owns where features live and how they are read.

    Args:
        data_dir: The folder holding the captions and images. When set, kagglehub is never called.
        format: How the captions are written (`captioner.data.formats`: Coco, Karpathy, Csv, Jsonl,
            TextFolder, or your own), with its options. None: the first format found in `data_dir`.
        kaggle_dataset: Kaggle dataset fetched with kagglehub when `data_dir` is unset.
        kaggle_version: Pinned dataset version (null: latest, which needs the network on every run).
        synthetic_images: Generate this many synthetic scenes into `data_dir` when it is missing or empty (the
            offline demo); a folder that holds anything is never written to.
        split_file: A Karpathy split file (`dataset_coco.json`, `dataset_flickr8k.json`, ...): take the
            train/val/test splits from it, matching images by file name, instead of drawing them.
        restval: Where Karpathy's "restval" images go: "train" (as papers do) or "drop".
        work_dir: Where prepared data and feature caches are kept for every later run.
        val_size: Validation images, as a count or a fraction (drawn splits only).
        test_size: Test images, as a count or a fraction (drawn splits only).
        split_seed: Seed of the image-level shuffle (drawn splits only).
        min_word_count: Words seen fewer times in training captions become `<unk>` (the word vocabulary).
        tokenizer: How captions become tokens (`captioner.text.Words`, the default: a word vocabulary;
            `captioner.text.Bpe`: byte-level BPE trained on the training captions; `captioner.text.Pretrained`: a
            pretrained tokenizer, such as GPT-2's for `PrefixLMDecoder`; or your own recipe).
        max_caption_length: Most words kept per caption (and generated).
        encoder: The image encoder features are extracted with (set from `--model.encoder`: the model's own
            instance, so one config entry chooses it). None: an ImageNet ResNet50.
        online_features: Deliver images instead of cached features (set from `--model.trainable_encoder_blocks`:
            a trained encoder's features change every step). Training images get the encoder's training transform.
        train_crop: That transform's random crop keeps at least this share of each side (1: no crop). No flips and
            no colour jitter: captions name left and right, and colours.
        resident_features: Hold the whole feature cache in memory on the training device (or, on a GPU machine, in
            pinned host memory) and gather batches there by row, instead of reading them from disk in the loader
            workers: "auto" when it fits the budget, true (stop if it does not), false (always read from disk).
        resident_budget_gb: The most memory the cache may take there (None: half the GPU's free memory, or a
            quarter of the host's available memory).
        feature_store: Where features go (`captioner.features.stores`): "cache" (one memory-mapped array per node,
            or resident, see above), "stream" (LitData feature shards streamed for training: sets beyond one disk or
            in an object store), "auto" ("stream" for WebDataset shards, "cache" otherwise), or a `FeatureStore`
            of your own by class_path. Whatever the store, a training item and `batch_size` mean the same.
        stream_dir: The folder of streamed feature sets (None: `<work_dir>/streamed`), or the URL of one where sets
            extracted earlier were uploaded (s3://..., gs://...).
        stream_cache_gb: The most disk LitData's local cache of a remote streamed set may take (None: its default).
        backbone, weights, image_size: Removed in captioner 0.3 (the encoder is `--model.encoder`); setting them
            stops with the config to write instead.
        extraction_batch_size: Images per encoder pass while caching features (null: 256 on a GPU, 8 on a
            CPU; halved on out-of-memory).
        compile_encoder: Run the encoder through `torch.compile` while caching features (worth it on a GPU).
        decode_threads: Images decoded at once while extracting features (PIL releases the interpreter), and on a GPU
            the batches of JPEGs decoded ahead of the encoder (nvJPEG), each in a thread with its own CUDA stream.
        extraction_part_size: Images of a folder per part of extraction: the unit a killed extraction resumes at and
            that ranks share out (a WebDataset shard is one part).
        batch_size: Training items per batch: captions, or images with all their captions (see `train_items`).
        eval_batch_size: Images per validation/test/predict batch.
        num_workers: DataLoader worker processes (image decoding and feature reads).
        predict_dir: Folder of images to caption with `predict` (searched recursively).
        shared_filesystem: All nodes of a multi-node run see `work_dir` on one shared file system, so data
            is prepared once in all (False: once per node, each into its own `work_dir`).
        features: "pooled" (one vector per image) or "grid" (the last convolutional map as regions, for
            decoders that attend; set from `--model.decoder`).
        train_items: "captions" (one training item per caption) or "images" (one per image with all its
            captions); set from `--model.objective`.
        object_annotations: The test images' objects, for CHAIR in the test report: COCO `instances_*.json`, a
            JSON file mapping file names to object lists, or "auto" (the captions file's own, when its images list
            them: the demo's scenes); null: no CHAIR.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        format: CaptionFormat | None = None,
        kaggle_dataset: str = KAGGLE_DATASET,
        kaggle_version: int | None = 1,
        synthetic_images: int = 0,
        split_file: str | None = None,
        restval: Literal["train", "drop"] = "train",
        work_dir: str = "data/mini-coco",
        val_size: int | float = 0.05,
        test_size: int | float = 0.05,
        split_seed: int = 0,
        min_word_count: int = 5,
        tokenizer: TokenizerRecipe | None = None,
        max_caption_length: int = 34,
        encoder: ImageEncoder | None = None,
        online_features: bool = False,
        train_crop: float = 0.9,
        resident_features: bool | Literal["auto"] = "auto",
        resident_budget_gb: float | None = None,
        feature_store: Literal["auto", "cache", "stream"] | FeatureStore = "auto",
        stream_dir: str | None = None,
        stream_cache_gb: float | None = None,
        backbone: str | None = None,
        weights: str | None = None,
        image_size: int | None = None,
        extraction_batch_size: int | None = None,
        compile_encoder: bool = False,
        decode_threads: int = 4,
        extraction_part_size: int = IMAGES_PER_FOLDER_PART,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 2,
        predict_dir: str | None = None,
        shared_filesystem: bool = True,
        features: Literal["pooled", "grid"] = "pooled",
        train_items: Literal["captions", "images"] = "captions",
        object_annotations: str | None = "auto",
    ) -> None:
        super().__init__()
        self.prepare_data_per_node = not shared_filesystem
        _refuse_removed_options(backbone, weights, image_size)
        if max_caption_length < 1 or not 0.5 <= train_crop <= 1.0:
            raise CaptionerError("--data.max_caption_length must be >= 1 and --data.train_crop between 0.5 and 1.")
        self.save_hyperparameters(ignore=["format", "encoder", "tokenizer", "backbone", "weights", "image_size",
                                          "feature_store"])  # fmt: skip
        self.feature_store = feature_store
        self.encoder = encoder if encoder is not None else default_encoder()
        self.caption_format = format
        self.work_dir = Path(work_dir)
        self.vocabulary: Any = None  # the tokenizer: a word vocabulary or subwords (see captioner.text.base)
        self.tokenizer_recipe = tokenizer if tokenizer is not None else Words()
        self.images_dir: Path | None = None
        self.data_root: Path | None = None
        self._report: DataReport | None = None  # kept by the process that prepared, for the summary
        self.datasets: dict[str, torch.utils.data.Dataset] = {}
        self._resume_at: TrainingPosition | None = None  # set from a checkpoint, used by the next training loader
        self.store: FeatureStore | None = None  # where this run's features come from, once set up
        self.split_sizes: dict[str, int] = {}
        self._stream_state: dict[str, Any] | None = None  # a streamed loader's position, from a checkpoint

    # ---------------------------------------------------------------- preparation (one process per node)
    def preparation_settings(self) -> dict[str, Any]:
        """Everything that shapes the prepared splits and vocabulary (see `captioner.data.prepared`)."""
        hp = self.hparams
        source = (str(Path(hp.data_dir).expanduser().resolve()) if hp.data_dir is not None
                  else f"kaggle:{hp.kaggle_dataset}/{hp.kaggle_version}")  # fmt: skip
        split_file = None
        if hp.split_file is not None:
            path = Path(hp.split_file).expanduser()
            if not path.is_file():
                raise CaptionerError(f"--data.split_file {path} does not exist.")
            split_file = {"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        settings = {
            "source": source,
            "format": self.caption_format.describe() if self.caption_format is not None else None,
            "synthetic_images": hp.synthetic_images,
            "split_file": split_file,
            "restval": hp.restval,
            "val_size": hp.val_size,
            "test_size": hp.test_size,
            "split_seed": hp.split_seed,
            "min_word_count": hp.min_word_count,
            "max_caption_length": hp.max_caption_length,
        }
        if hp_tokenizer_set(self):  # the default word vocabulary keeps the keys of data prepared before tokenizers
            settings["tokenizer"] = self.tokenizer_recipe.describe()
        return settings

    def prepare_data(self) -> None:
        """Fetch, read, split and build the tokenizer (each step skipped if done); features come in `setup`.

        A format that streams (WebDataset shards) is read a shard at a time into per-shard index files with splits
        by hash (`captioner.data.sharded`): no process holds every record. Nothing at all for `predict`: a checkpoint
        and a folder of images are all it needs.
        """
        if self.trainer is not None and self.trainer.predicting:
            return
        hp, settings = self.hparams, self.preparation_settings()
        prepared = PreparedData.for_settings(self.work_dir, settings)
        root = resolve_dataset(hp.data_dir, hp.kaggle_dataset, hp.kaggle_version, hp.synthetic_images)
        caption_format, source = find_caption_set(root, self.caption_format)
        if getattr(caption_format, "streams", False):
            self._prepare_sharded(prepared, root, source, caption_format, settings)
            return
        records, images_dir, caption_format, report = read_caption_set(root, self.caption_format)
        if hp.split_file is not None:
            records = label_from_split_file(records, hp.split_file, report)
        fingerprint = records_fingerprint(records)
        prepared.check_records(fingerprint, str(root))
        if not prepared.complete:
            prepared.write_settings(settings)
            splits = make_splits(records, hp.val_size, hp.test_size, hp.split_seed, hp.restval)
            save_splits(prepared.splits_file, splits, settings)
            train_captions = (c for r in splits["train"] for c in r.captions)
            tokenizer = self.tokenizer_recipe.build(train_captions, hp.max_caption_length, hp.min_word_count)
            write_json(prepared.vocab_file, tokenizer.to_dict())
            prepared.write_dataset(root, images_dir, caption_format.describe(), fingerprint)  # marks it complete
        splits, _ = load_splits(prepared.splits_file)
        vocabulary = load_tokenizer(prepared.vocab_file)
        log.info("Prepared data in %s: %s; %s.", prepared.folder, ", ".join(f"{len(splits[n])} {n}" for n in SPLITS),
                 vocabulary.describe())  # fmt: skip
        report.long_captions = sum(len(normalize(c)) > hp.max_caption_length for r in records for c in r.captions)
        self._report = report  # summarised once the features are extracted (setup): undecodable images count too

    def _prepare_sharded(self, prepared: PreparedData, root: Path, source: Path, caption_format: CaptionFormat,
                         settings: dict[str, Any]) -> None:  # fmt: skip
        """The records pass over shards, once: index files, hash splits, the tokenizer from a pass over training
        captions; validation and test records (few) kept in splits.json, training records in the shard index.

        Raises:
            CaptionerError: With a split file (it names image files, not images inside shards), or when the shards
                changed since the data was prepared from them.
        """
        hp = self.hparams
        if hp.split_file is not None:
            raise CaptionerError("--data.split_file names image files; images inside shards are split by a hash of "
                                 "their names (--data.val_size, --data.test_size, --data.split_seed).")  # fmt: skip
        prepared.check_records(shards_fingerprint(source, caption_format), str(root))
        if prepared.complete:
            sharded = ShardedRecords.read(prepared.folder / SHARDED_FILE)
            self._report = DataReport(images=sum(c["images"] for c in sharded.counts.values()),
                                      captions=sum(c["captions"] for c in sharded.counts.values()))  # fmt: skip
        else:
            prepared.write_settings(settings)
            report = DataReport()
            log.info("Reading %s as %s, a shard at a time", source, caption_format.describe())
            sharded = index_shards(caption_format.shard_records(source, report), prepared.folder, hp.val_size,
                                   hp.test_size, hp.split_seed, report)  # fmt: skip
            evaluated = {"train": [], "val": [], "test": []}
            for record in sharded.records():
                if record.split != "train":
                    evaluated[record.split].append(record)
            save_splits(prepared.splits_file, evaluated, settings)  # training records stay in the shard index
            tokenizer = self.tokenizer_recipe.build(sharded.captions("train"), hp.max_caption_length,
                                                    hp.min_word_count)  # fmt: skip
            write_json(prepared.vocab_file, tokenizer.to_dict())
            prepared.write_dataset(root, source, caption_format.describe(), shards_fingerprint(source, caption_format),
                                   sharded=True)  # fmt: skip
            self._report = report
        log.info("Prepared data in %s: %s; %s.", prepared.folder,
                 ", ".join(f"{sharded.counts[n]['images']} {n}" for n in SPLITS),
                 load_tokenizer(prepared.vocab_file).describe())  # fmt: skip

    @property
    def feature_spec(self) -> FeatureSpec:
        """The encoder and kind of features the cache holds."""
        return FeatureSpec(self.encoder, grid=self.hparams.features == "grid")

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
        hp = self.hparams
        rank, world_size = self._rank_and_world()
        barrier = self.trainer.strategy.barrier if self.trainer is not None and world_size > 1 else (lambda: None)
        return StoreRun(self.work_dir, self.images_dir, splits, self.feature_spec, sharded, self._device(), rank,
                        world_size, barrier, hp.extraction_batch_size, max(hp.decode_threads, hp.num_workers, 1),
                        hp.compile_encoder, self.shuffle_seed, hp.train_crop, hp.extraction_part_size)  # fmt: skip

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
        hp = self.hparams
        prepared = PreparedData.for_settings(self.work_dir, self.preparation_settings())
        dataset = prepared.read_dataset()
        root, self.images_dir = Path(dataset["root"]), Path(dataset["images_dir"])
        self.data_root = root
        splits, _ = load_splits(prepared.splits_file)
        self.vocabulary = load_tokenizer(prepared.vocab_file)
        self.store = store_for(self.feature_store, dataset["sharded"], hp.online_features, hp.resident_features,
                               hp.resident_budget_gb, hp.stream_dir, hp.stream_cache_gb)  # fmt: skip
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
            self.split_sizes[name] = self.store.train_size if name == "train" and self.store.streams_training else (
                len(records))  # fmt: skip
            if not self.split_sizes[name]:
                raise CaptionerError(f"The {name} split has no usable image; adjust --data.{name}_size or the data.")
            if name == "train" and self.store.streams_training:
                self.datasets[name] = StreamedSplit(self.split_sizes[name])
                continue
            reader, row_of = self.store.rows(name, [r.file_name for r in records])
            self.datasets[name] = self._dataset(name, records, reader, row_of)

    # ---------------------------------------------------------------- what the model reads (captioner.data.contract)
    @property
    def train_items(self) -> str:
        """What one training item is: "captions", or "images" with all their captions."""
        return self.hparams.train_items

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
        """Where the test images' object annotations are, for CHAIR (`--data.object_annotations`): a file, or with
        "auto" the data's own captions file when its images list their objects (the demo's scenes do)."""
        setting = self.hparams.object_annotations
        if setting is None or setting == "auto" and self.data_root is None:
            return None
        if setting != "auto":
            return Path(setting)
        candidate = self.data_root / "captions.json"
        if not candidate.is_file():
            return None
        from captioner.evaluation.chair import read_objects

        try:
            read_objects(candidate)
        except CaptionerError:  # captions without objects: no CHAIR
            return None
        return candidate

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
        if name == "train" and self.hparams.train_items == "captions":
            captions = [c for r in records for c in r.captions]
            rows = np.array([row_of[r.file_name] for r in records for _ in r.captions], dtype=np.int64)
            return TrainCaptions(reader, rows, self.vocabulary.encode_batch(captions), self.vocabulary.pad_index)
        rows = np.array([row_of[r.file_name] for r in records], dtype=np.int64)
        return ImageCaptions(reader, rows, [r.file_name for r in records], [r.captions for r in records],
                             self.vocabulary, [r.key for r in records])  # fmt: skip

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
        workers = self.hparams.num_workers
        sampler, loader = None, DataLoader
        if shuffle:
            # The order is a function of the seed and the epoch alone; a resumed run starts where the checkpoint
            # stood (see captioner.data.sampling), so it sees the batches the uninterrupted run would have seen.
            world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
            # Augmented images need the epoch with each index (their random crop is a function of both).
            sampler = ResumableSampler(self.datasets[split], world, rank, self.shuffle_seed, self._resume_at,
                                       tag_epoch=getattr(self.datasets[split], "augmented", False))  # fmt: skip
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
        position = TrainingPosition.of_trainer(trainer, self.hparams.batch_size)
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
        drop_last = len(self.datasets.get("train", ())) > self.hparams.batch_size
        return self._loader("train", self.hparams.batch_size, shuffle=True, drop_last=drop_last)

    def _stream_loader(self) -> Any:
        """The store's own training loader, started where a checkpoint stood."""
        hp = self.hparams
        rank = self.trainer.global_rank if self.trainer is not None else 0
        loader = self.store.train_loader(self.vocabulary, hp.batch_size, hp.num_workers, self.shuffle_seed,
                                         hp.train_items == "images", pin_memory=self._device().type == "cuda",
                                         rank=rank)  # fmt: skip
        position = self._resume_at
        loader.start_at(position.epoch if position else 0, self._stream_state if position else None)
        self._resume_at, self._stream_state = None, None
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", self.hparams.eval_batch_size, shuffle=False, collate=collate_images)


class StreamedSplit:
    """The training split when it streams: its size in images (the items live in the stream, read by the store's
    loader). It holds no references, so objectives that score whole images against them (self-critical training)
    refuse it."""

    streamed = True

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


def hp_tokenizer_set(datamodule: CaptionDataModule) -> bool:
    """Whether a tokenizer other than the default word vocabulary is configured (older prepared data keys stay)."""
    return not isinstance(datamodule.tokenizer_recipe, Words) or datamodule.tokenizer_recipe.min_count is not None


def load_tokenizer(path: Path) -> Any:
    """The prepared tokenizer (`vocab.json`), whichever kind it is, validated."""
    return tokenizer_from_dict(read_json(path, "Tokenizer"), str(path))


def _refuse_removed_options(backbone: str | None, weights: str | None, image_size: int | None) -> None:
    """Stop on captioner 0.2's `data.backbone` / `data.weights` / `data.image_size`, with the config to write instead.

    Raises:
        CaptionerError: When any of them is set.
    """
    if backbone is None and weights is None and image_size is None:
        return
    weights_text = "null" if weights is None else weights
    raise CaptionerError(
        "--data.backbone, --data.weights and --data.image_size were removed in captioner 0.3: the encoder is a part "
        "of the model now. Write instead:\n"
        "  model:\n    encoder:\n      class_path: captioner.encoders.TorchvisionEncoder\n"
        f"      init_args: {{model: {backbone or 'resnet50'}, weights: {weights_text}, "
        f"image_size: {image_size or 224}}}\n"
        "(or on the command line: --model.encoder captioner.encoders.TorchvisionEncoder "
        f"--model.encoder.model {backbone or 'resnet50'} --model.encoder.weights {weights_text} "
        f"--model.encoder.image_size {image_size or 224})."
    )
