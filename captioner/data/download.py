"""Where the dataset comes from: a local folder, generated scenes, or Kaggle through kagglehub."""

from __future__ import annotations

import logging
from pathlib import Path

from captioner.data.synthetic import write_synthetic_dataset
from captioner.errors import CaptionerError

log = logging.getLogger(__name__)

KAGGLE_DATASET = "nagasai524/mini-coco2014-dataset-for-image-captioning"


def kaggle_handle(dataset: str, version: int | None) -> str:
    """The kagglehub handle; a pinned version is reproducible and, once cached, works offline."""
    return f"{dataset}/versions/{version}" if version is not None else dataset


def _folder_with(root: Path, captions_file: str) -> Path | None:
    """`root` or the one subfolder of it (Kaggle archives sometimes nest) holding `captions_file`."""
    if (root / captions_file).is_file():
        return root
    nested = sorted(path.parent for path in root.glob(f"*/{captions_file}"))
    return nested[0] if nested else None


def download_from_kaggle(dataset: str, version: int | None, captions_file: str = "captions.json") -> Path:
    """Fetch (or find in kagglehub's cache) the dataset and return the folder holding `captions_file`.

    kagglehub writes into its own cache and marks a version complete only
    after the whole archive is in place, so a failed download leaves nothing
    that a later run would take for complete.

    Raises:
        CaptionerError: One paragraph on what failed and how to use a local copy instead.
    """
    handle = kaggle_handle(dataset, version)
    try:
        import kagglehub

        path = Path(kagglehub.dataset_download(handle))
    except Exception as error:  # kagglehub raises many types (HTTP, auth, OS); all mean the same to the user
        raise CaptionerError(
            f"Could not download the Kaggle dataset '{handle}' with kagglehub ({type(error).__name__}: {error}). "
            "Kaggle needs network access, and some datasets need credentials (KAGGLE_USERNAME and KAGGLE_KEY, or "
            "~/.kaggle/kaggle.json). If you have a copy of the data, pass its folder instead: "
            "--data.data_dir /path/to/mini-coco (the folder holding captions.json and Images/); kagglehub is then "
            "never called."
        ) from error
    folder = _folder_with(path, captions_file)
    if folder is None:
        raise CaptionerError(f"kagglehub returned {path}, which holds no {captions_file}; check --data.kaggle_dataset.")
    return folder


def resolve_dataset(
    data_dir: str | None,
    kaggle_dataset: str,
    kaggle_version: int | None,
    synthetic_images: int = 0,
    captions_file: str = "captions.json",
) -> Path:
    """The folder holding `captions_file` and the images, fetching or generating it if needed.

    Args:
        data_dir: A local copy; when given, kagglehub is never called.
        kaggle_dataset: Kaggle dataset (owner/slug) used when `data_dir` is None.
        kaggle_version: Pinned dataset version, or None for the latest (needs the network every time).
        synthetic_images: When > 0 and `data_dir` holds no data yet, generate that many scenes there.
        captions_file: Name of the COCO-format caption file.
    """
    if data_dir is None:
        return download_from_kaggle(kaggle_dataset, kaggle_version, captions_file)
    root = Path(data_dir).expanduser()
    if synthetic_images > 0 and not (root / captions_file).exists():
        log.info("Generating %d synthetic scenes in %s", synthetic_images, root)
        write_synthetic_dataset(root, synthetic_images)
    folder = _folder_with(root, captions_file) if root.is_dir() else None
    if folder is None:
        raise CaptionerError(
            f"--data.data_dir {root} holds no {captions_file}. Point it at the folder with {captions_file} and the "
            "images, or leave it unset to download Mini-COCO with kagglehub."
        )
    return folder
