"""The datamodule's options, grouped into parts (each a dataclass: `--data.splits.val_size 500` on the command line,
`splits: {val_size: 500}` in YAML). Keys of captioner 0.3 and older (`--data.val_size`, `--data.batch_size`, ...)
are rewritten into these by `captioner.compat.configs`, with one deprecation line each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from captioner.core.errors import CaptionerError
from captioner.data.download import KAGGLE_DATASET
from captioner.sources.parts import IMAGES_PER_FOLDER_PART


@dataclass
class Origin:
    """Where the data comes from when `data_dir` does not say.

    Attributes:
        kaggle_dataset: The Kaggle dataset fetched with kagglehub when `data_dir` is unset.
        kaggle_version: Its pinned version (null: the latest, which needs the network on every run).
        synthetic_images: Generate this many synthetic scenes into `data_dir` when it is missing or empty (the
            offline demo); a folder that holds anything is never written to.
        synthetic_styles: The generated scenes' captions come in three styles, short, long and tags
            (`captioner.text.styles`), for a model that writes each as it is asked.
    """

    kaggle_dataset: str = KAGGLE_DATASET
    kaggle_version: int | None = 1
    synthetic_images: int = 0
    synthetic_styles: bool = False


@dataclass
class Splits:
    """How the images are split into train, val and test (image-level: every caption of an image in one split).

    Attributes:
        val_size: Validation images, as a count or a fraction (drawn splits only).
        test_size: Test images, as a count or a fraction (drawn splits only).
        seed: Seed of the image-level draw (drawn splits only).
        file: A Karpathy split file (`dataset_coco.json`, `dataset_flickr8k.json`, ...): the splits come from it,
            matched by file name, instead of being drawn.
        restval: Where Karpathy's "restval" images go: "train" (as papers do) or "drop".
    """

    val_size: int | float = 0.05
    test_size: int | float = 0.05
    seed: int = 0
    file: str | None = None
    restval: Literal["train", "drop"] = "train"


@dataclass
class Captions:
    """How captions are kept.

    Attributes:
        max_length: Most words kept per caption (and generated).
        min_word_count: Words seen fewer times in training captions become `<unk>` (the word vocabulary's).
    """

    max_length: int = 34
    min_word_count: int = 5

    def __post_init__(self) -> None:
        if self.max_length < 1 or self.min_word_count < 1:
            raise CaptionerError("--data.captions.max_length and --data.captions.min_word_count must be at least 1.")


@dataclass
class ModelNeeds:
    """What the model reads, set from its parts (by the command line's links; set them only for a datamodule
    used without a model config).

    Attributes:
        features: "pooled" (one vector per image) or "grid" (regions, for decoders that attend); from the decoder.
        train_items: "captions" (one training item per caption) or "images" (one per image with all its
            captions); from the objective.
        online_features: Deliver images instead of cached features, for an encoder that trains; from
            `model.trainable_encoder_blocks`.
    """

    features: Literal["pooled", "grid"] = "pooled"
    train_items: Literal["captions", "images"] = "captions"
    online_features: bool = False


@dataclass
class Extraction:
    """How features are extracted into the store.

    Attributes:
        batch_size: Images per encoder pass (null: 256 on a GPU, 8 on a CPU; halved on out-of-memory).
        compile_encoder: Run the encoder through `torch.compile` (worth it on a GPU).
        decode_threads: Images decoded at once (PIL releases the interpreter), and on a GPU the batches of JPEGs
            decoded ahead of the encoder (nvJPEG).
        part_size: Images of a folder per part: the unit a killed extraction resumes at and ranks claim (a
            WebDataset shard is one part).
    """

    batch_size: int | None = None
    compile_encoder: bool = False
    decode_threads: int = 4
    part_size: int = IMAGES_PER_FOLDER_PART


@dataclass
class Loading:
    """How items reach the model.

    Attributes:
        batch_size: Training items per batch: captions, or images with all their captions (see `train_items`).
        eval_batch_size: Images per validation, test and predict batch.
        num_workers: DataLoader worker processes (image decoding and feature reads).
        train_crop: With an encoder that trains, its training images' random crop keeps at least this share of
            each side (1: no crop). No flips and no colour jitter: captions name left and right, and colours.
    """

    batch_size: int = 128
    eval_batch_size: int = 256
    num_workers: int = 2
    train_crop: float = 0.9

    def __post_init__(self) -> None:
        if not 0.5 <= self.train_crop <= 1.0:
            raise CaptionerError("--data.loading.train_crop must be between 0.5 and 1.")
