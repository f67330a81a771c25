"""CaptionDataModule: prepares Mini-COCO (or any COCO-format set) once and serves cached features."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

from captioner.data.coco import CaptionRecord, ParseReport, parse_coco_captions
from captioner.data.datasets import ImageCaptions, TrainCaptions, passthrough
from captioner.data.download import KAGGLE_DATASET, resolve_dataset
from captioner.data.features import (
    FEATURES_FILE,
    FeatureCache,
    FeatureSpec,
    load_features,
    prepare_features,
    prepare_features_sharded,
)
from captioner.data.images import IMAGE_EXTENSIONS, ImageFileDataset, collate_images, find_images
from captioner.data.preprocessing import Preprocessing
from captioner.data.splits import SPLITS, load_splits, prepare_splits, records_fingerprint
from captioner.data.vocab import Vocabulary, normalize
from captioner.errors import CaptionerError
from captioner.files import read_json, write_json
from captioner.models.encoder import check_backbone

log = logging.getLogger(__name__)

SOURCE_FILE, SPLITS_FILE, VOCAB_FILE, FEATURES_DIR = "source.json", "splits.json", "vocab.json", "features"


class CaptionDataModule(LightningDataModule):
    """Mini-COCO (or any COCO-format caption set) as cached encoder features and captions.

    `prepare_data` (once per node) fetches the data, parses it, splits it,
    builds the vocabulary and the feature cache, all under `work_dir`.
    `setup` (every process) opens them read-only.

    Args:
        data_dir: A local COCO-format copy (folder with `captions.json` and
            `Images/`). When set, kagglehub is never called.
        kaggle_dataset: Kaggle dataset fetched with kagglehub when `data_dir` is unset.
        kaggle_version: Pinned dataset version (null: latest, which needs the network on every run).
        synthetic_images: Generate this many synthetic scenes into `data_dir` if it holds no data (the offline demo).
        captions_file: Name of the caption file inside the dataset folder.
        images_folder: Name of the image folder inside the dataset folder.
        work_dir: Where splits, vocabulary and feature cache are kept for every later run.
        val_size: Validation images, as a count or a fraction.
        test_size: Test images, as a count or a fraction.
        split_seed: Seed of the image-level shuffle.
        min_word_count: Words seen fewer times in training captions become `<unk>`.
        max_caption_length: Most words kept per caption (and generated).
        backbone: resnet18, resnet34, resnet50 or resnet101.
        weights: torchvision weights name, or null for a seeded random frozen backbone.
        image_size: Images are resized to this square size before the encoder.
        extraction_batch_size: Images per encoder pass while caching features (null: 256 on a GPU, 8 on a
            CPU; halved on out-of-memory).
        compile_encoder: Run the encoder through `torch.compile` while caching features (worth it on a GPU).
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
    """

    def __init__(
        self,
        data_dir: str | None = None,
        kaggle_dataset: str = KAGGLE_DATASET,
        kaggle_version: int | None = 1,
        synthetic_images: int = 0,
        captions_file: str = "captions.json",
        images_folder: str = "Images",
        work_dir: str = "data/mini-coco",
        val_size: int | float = 0.05,
        test_size: int | float = 0.05,
        split_seed: int = 0,
        min_word_count: int = 5,
        max_caption_length: int = 34,
        backbone: str = "resnet50",
        weights: str | None = "IMAGENET1K_V2",
        image_size: int = 224,
        extraction_batch_size: int | None = None,
        compile_encoder: bool = False,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 2,
        predict_dir: str | None = None,
        shared_filesystem: bool = True,
        features: Literal["pooled", "grid"] = "pooled",
        train_items: Literal["captions", "images"] = "captions",
    ) -> None:
        super().__init__()
        self.prepare_data_per_node = not shared_filesystem
        check_backbone(backbone, weights)
        if max_caption_length < 1 or image_size < 32:
            raise CaptionerError("--data.max_caption_length must be >= 1 and --data.image_size >= 32.")
        self.save_hyperparameters()
        self.work_dir = Path(work_dir)
        self.vocabulary: Vocabulary | None = None
        self._report: ParseReport | None = None  # kept by the process that prepared, for the summary
        self.datasets: dict[str, torch.utils.data.Dataset] = {}
        self.split_sizes: dict[str, int] = {}

    # ---------------------------------------------------------------- preparation (one process per node)
    def prepare_data(self) -> None:
        """Fetch, parse, split, build the vocabulary and cache the features (each step skipped if done).

        Nothing at all for `predict`: a checkpoint and a folder of images are all it needs.
        """
        if self.trainer is not None and self.trainer.predicting:
            return
        hp = self.hparams
        root = resolve_dataset(hp.data_dir, hp.kaggle_dataset, hp.kaggle_version, hp.synthetic_images, hp.captions_file)
        records, report = parse_coco_captions(root / hp.captions_file, root / hp.images_folder)
        report.long_captions = sum(len(normalize(c)) > hp.max_caption_length for r in records for c in r.captions)
        splits = prepare_splits(self.work_dir / SPLITS_FILE, records, hp.val_size, hp.test_size, hp.split_seed)
        self._prepare_vocabulary(splits["train"])
        write_json(self.work_dir / SOURCE_FILE, {"root": str(root.resolve())})
        self._report = report
        if self._world_size() == 1:  # distributed runs share the extraction out in setup()
            self._features(sorted(r.file_name for r in records), root)

    @property
    def preprocessing(self) -> Preprocessing:
        """How pixels reach the encoder, for extraction and predict alike."""
        return Preprocessing(self.hparams.image_size)

    @property
    def feature_spec(self) -> FeatureSpec:
        """The encoder and kind of features the cache holds."""
        hp = self.hparams
        return FeatureSpec(hp.backbone, hp.weights, self.preprocessing, grid=hp.features == "grid")

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def _features(self, file_names: list[str], root: Path) -> FeatureCache:
        """The feature cache, computed if needed: by this process alone, or shared out across the ranks."""
        hp = self.hparams
        common = dict(
            batch_size=hp.extraction_batch_size,
            num_workers=hp.num_workers,
            device=self._device(),
            compile_encoder=hp.compile_encoder,
        )
        spec = self.feature_spec
        if self._world_size() > 1:
            trainer = self.trainer
            # Without a shared file system each node builds its own cache on its own disk, its ranks sharing
            # the work; rank 0 could not read the parts other nodes wrote.
            rank, world_size = (
                (trainer.global_rank, trainer.world_size) if hp.shared_filesystem
                else (trainer.local_rank, trainer.num_devices)
            )  # fmt: skip
            cache = prepare_features_sharded(
                self.work_dir / FEATURES_DIR,
                root / hp.images_folder,
                file_names,
                spec,
                rank=rank,
                world_size=world_size,
                barrier=trainer.strategy.barrier,
                **common,
            )
        else:
            cache = prepare_features(self.work_dir / FEATURES_DIR, root / hp.images_folder, file_names, spec, **common)
        if self._report is not None:
            self._report.undecodable = cache.failed
            # One summary of everything preparation kept and skipped, at the end.
            (log.warning if self._report.skipped else log.info)("Dataset %s: %s", root, self._report.summary())
            self._report = None
        return cache

    def _prepare_vocabulary(self, train: list[CaptionRecord]) -> Vocabulary:
        hp, path = self.hparams, self.work_dir / VOCAB_FILE
        source = records_fingerprint(train)
        if path.exists():
            payload = read_json(path, "Vocabulary")
            if (
                payload.get("source") == source
                and payload.get("min_count") == hp.min_word_count
                and payload.get("max_length") == hp.max_caption_length
            ):
                return Vocabulary.from_dict(payload, str(path))
            log.info("Vocabulary settings or training split changed: rebuilding %s.", path)
        vocabulary = Vocabulary.build((c for r in train for c in r.captions), hp.min_word_count, hp.max_caption_length)
        write_json(path, {**vocabulary.to_dict(), "source": source})
        log.info(
            "Vocabulary: %d tokens (words seen >= %d times in training captions).", len(vocabulary), hp.min_word_count
        )
        return vocabulary

    # ---------------------------------------------------------------- setup (every process)
    def setup(self, stage: str) -> None:
        """Open the prepared files read-only and build the datasets `stage` needs."""
        if stage == "predict":
            self._setup_predict()
            return
        hp = self.hparams
        if not (self.work_dir / SOURCE_FILE).exists():
            raise CaptionerError(f"{self.work_dir} holds no prepared data; run `fit` (or call prepare_data()) first.")
        root = Path(read_json(self.work_dir / SOURCE_FILE, "Dataset source")["root"])
        splits, _ = load_splits(self.work_dir / SPLITS_FILE)
        self.vocabulary = Vocabulary.load(self.work_dir / VOCAB_FILE)
        all_names = sorted(r.file_name for part in splits.values() for r in part)
        if self._world_size() > 1:
            cache = self._features(all_names, root)
        else:
            cache = load_features(self.work_dir / FEATURES_DIR, all_names, self.feature_spec, self._device())
        self.images_dir = root / hp.images_folder
        self.split_sizes = {}
        for name in SPLITS:
            records = [r for r in splits[name] if r.file_name not in cache.failed]
            self.split_sizes[name] = len(records)
            if not records:
                raise CaptionerError(f"The {name} split has no usable image; adjust --data.{name}_size or the data.")
            self.datasets[name] = self._dataset(name, records, cache)

    def _dataset(self, name: str, records: list[CaptionRecord], cache: FeatureCache) -> torch.utils.data.Dataset:
        if name == "train" and self.hparams.train_items == "captions":
            captions = [c for r in records for c in r.captions]
            rows = np.array([cache.row_of[r.file_name] for r in records for _ in r.captions], dtype=np.int64)
            return TrainCaptions(cache.directory / FEATURES_FILE, rows, self.vocabulary.encode_batch(captions),
                                 self.vocabulary.pad_index)  # fmt: skip
        rows = np.array([cache.row_of[r.file_name] for r in records], dtype=np.int64)
        return ImageCaptions(cache.directory / FEATURES_FILE, rows, [r.file_name for r in records],
                             [r.captions for r in records], self.vocabulary)  # fmt: skip

    def _setup_predict(self) -> None:
        if self.hparams.predict_dir is None:
            raise CaptionerError("predict needs --data.predict_dir: the folder of images to caption.")
        folder = Path(self.hparams.predict_dir).expanduser()
        if not folder.is_dir():
            raise CaptionerError(f"--data.predict_dir {folder} does not exist or is not a folder.")
        scan = find_images(folder)
        for problem, items in (
            ("folders could not be read", scan.unreadable_folders),
            ("symbolic links were not followed", scan.skipped_links),
        ):
            if items:
                log.warning("%d %s under %s (e.g. %s).", len(items), problem, folder, items[0])
        if not scan.images:
            raise CaptionerError(
                f"--data.predict_dir {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)}), "
                "searched recursively."
            )
        self.datasets["predict"] = ImageFileDataset(scan.images, self.preprocessing)

    # ---------------------------------------------------------------- loaders
    def _loader(
        self, split: str, batch_size: int, shuffle: bool, collate=passthrough, drop_last: bool = False
    ) -> DataLoader:
        if split not in self.datasets:
            raise CaptionerError(f"The {split} data is not set up; call setup() first.")
        workers = self.hparams.num_workers
        sampler = None
        if split in ("val", "test") and self._world_size() > 1:
            # Lightning's default DistributedSampler pads by repeating images; metrics must count each once.
            sampler = UnrepeatedDistributedSampler(
                self.datasets[split], num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
            )
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate,
            drop_last=drop_last,
            pin_memory=self.trainer is not None and self.trainer.strategy.root_device.type == "cuda",
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        # A last batch of one item would break the decoders' batch norm in training mode (and is noise anyway).
        drop_last = len(self.datasets.get("train", ())) > self.hparams.batch_size
        return self._loader("train", self.hparams.batch_size, shuffle=True, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", self.hparams.eval_batch_size, shuffle=False, collate=collate_images)
