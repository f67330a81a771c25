"""Where the dataset comes from (a local folder, generated scenes, or Kaggle through kagglehub) and reading it."""

from __future__ import annotations

import logging
from pathlib import Path

from captioner.core.errors import CaptionerError
from captioner.data.formats import CaptionFormat, find_format, known_formats
from captioner.data.synthetic import write_synthetic_dataset
from captioner.sources.records import CaptionRecord, DataReport

log = logging.getLogger(__name__)

KAGGLE_DATASET = "nagasai524/mini-coco2014-dataset-for-image-captioning"


def kaggle_handle(dataset: str, version: int | None) -> str:
    """The kagglehub handle; a pinned version is reproducible and, once cached, works offline."""
    return f"{dataset}/versions/{version}" if version is not None else dataset


def download_from_kaggle(dataset: str, version: int | None) -> Path:
    """Fetch (or find in kagglehub's cache) the dataset and return the folder kagglehub gives.

    kagglehub writes into its own cache and marks a version complete only
    after the whole archive is in place, so a failed download leaves nothing
    that a later run would take for complete.

    Raises:
        CaptionerError: One paragraph on what failed and how to use a local copy instead.
    """
    handle = kaggle_handle(dataset, version)
    try:
        import kagglehub

        return Path(kagglehub.dataset_download(handle))
    except Exception as error:  # kagglehub raises many types (HTTP, auth, OS); all mean the same to the user
        raise CaptionerError(
            f"Could not download the Kaggle dataset '{handle}' with kagglehub ({type(error).__name__}: {error}). "
            "Kaggle needs network access, and some datasets need credentials (KAGGLE_USERNAME and KAGGLE_KEY, or "
            "~/.kaggle/kaggle.json). If you have a copy of the data, pass its folder instead: "
            "--data.data_dir /path/to/mini-coco (the folder holding captions.json and Images/); kagglehub is then "
            "never called."
        ) from error


def resolve_dataset(
    data_dir: str | None,
    kaggle_dataset: str,
    kaggle_version: int | None,
    synthetic_images: int = 0,
    synthetic_styles: bool = False,
) -> Path:
    """The folder holding the captions and the images, fetched or generated if need be.

    Args:
        data_dir: A local folder; when given, kagglehub is never called.
        kaggle_dataset: Kaggle dataset (owner/slug) used when `data_dir` is None.
        kaggle_version: Pinned dataset version, or None for the latest (needs the network every time).
        synthetic_images: When > 0 and `data_dir` is missing or empty, generate that many scenes there. A folder
            that already holds anything is never written to.
        synthetic_styles: Generate captions in three styles (short, long, tags).

    Raises:
        CaptionerError: When `data_dir` is not a folder.
    """
    if data_dir is None:
        return download_from_kaggle(kaggle_dataset, kaggle_version)
    root = Path(data_dir).expanduser()
    if synthetic_images > 0 and (not root.exists() or (root.is_dir() and not any(root.iterdir()))):
        log.info("Generating %d synthetic scenes in %s", synthetic_images, root)
        write_synthetic_dataset(root, synthetic_images, styles=synthetic_styles)
    if not root.is_dir():
        raise CaptionerError(f"--data.data_dir {root} is not a folder. Point it at the folder holding the captions.")
    return root


def find_caption_set(root: Path, caption_format: CaptionFormat | None = None) -> tuple[CaptionFormat, Path]:
    """Which format `root` (or its one subfolder: Kaggle archives sometimes nest) holds, and what it reads.

    Args:
        root: The data folder.
        caption_format: The format to look for (None: the first known format the folder holds).

    Raises:
        CaptionerError: When it holds none, naming what was looked for.
    """
    formats = [caption_format] if caption_format is not None else known_formats()
    subfolders = [path for path in root.iterdir() if path.is_dir()] if root.is_dir() else []
    try:
        return find_format(root, formats)
    except CaptionerError:
        if len(subfolders) != 1:
            raise
        return find_format(subfolders[0], formats)


def read_caption_set(
    root: Path, caption_format: CaptionFormat | None = None
) -> tuple[list[CaptionRecord], Path, CaptionFormat, DataReport]:
    """Find the captions under `root` (see `find_caption_set`) and read them all.

    Returns:
        The records, the folder their file names are relative to, the format and what reading skipped.
    """
    found_format, source = find_caption_set(root, caption_format)
    report = DataReport()
    records, images_dir = found_format.read(source, report)
    log.info("Reading %s as %s", source, found_format.describe())
    return records, images_dir, found_format, report
