"""Parse a COCO-format caption file into records, counting what has to be skipped.

The Mini-COCO layout is `captions.json` with `images` (`id`, `file_name`) and
`annotations` (`image_id`, `caption`), images in `Images/`. Records are joined
on `images[].file_name`; names are never rebuilt from ids.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from captioner.errors import CaptionerError
from captioner.files import read_json, require_keys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionRecord:
    """One image and its reference captions.

    Attributes:
        file_name: Path of the image relative to the images folder.
        captions: The image's captions as written in the source, duplicates removed.
    """

    file_name: str
    captions: tuple[str, ...]


@dataclass
class ParseReport:
    """What parsing kept and what it skipped, for one summary line."""

    images: int = 0
    captions: int = 0
    missing_files: list[str] = field(default_factory=list)
    empty_files: list[str] = field(default_factory=list)
    images_without_captions: int = 0
    captions_without_images: int = 0
    empty_captions: int = 0
    duplicate_captions: int = 0
    duplicate_image_entries: int = 0
    undecodable: dict[str, str] = field(default_factory=dict)  # filled in by feature extraction
    long_captions: int = 0  # filled in by the vocabulary step: captions cut to the maximum length

    @property
    def skipped(self) -> dict[str, int]:
        """Counts of every kind of skipped input, zero counts left out."""
        counts = {
            "image files missing": len(self.missing_files),
            "image files empty (0 bytes)": len(self.empty_files),
            "images without captions": self.images_without_captions,
            "captions whose image_id matches no image": self.captions_without_images,
            "empty captions": self.empty_captions,
            "duplicate captions": self.duplicate_captions,
            "duplicate image entries": self.duplicate_image_entries,
            "images that could not be decoded": len(self.undecodable),
        }
        return {name: count for name, count in counts.items() if count}

    def summary(self) -> str:
        """One line: what was kept and, if anything, what was skipped."""
        images = self.images - len(self.undecodable)
        line = f"{images} images with {self.captions} captions"
        if self.skipped:
            line += "; skipped " + ", ".join(f"{count} {name}" for name, count in self.skipped.items())
            examples = self.missing_files[:2] + self.empty_files[:2]
            examples += [f"{name}: {why}" for name, why in list(self.undecodable.items())[:2]]
            if examples:
                line += f" (e.g. {'; '.join(examples)})"
        if self.long_captions:
            line += f"; {self.long_captions} captions longer than the maximum length are cut"
        return line


def _list_image_sizes(images_dir: Path) -> dict[str, int]:
    """Map every file name directly inside `images_dir` to its size in bytes."""
    try:
        with os.scandir(images_dir) as entries:
            return {entry.name: entry.stat().st_size for entry in entries if entry.is_file()}
    except FileNotFoundError as error:
        raise CaptionerError(
            f"Images folder {images_dir} does not exist. It should hold the files named in "
            "captions.json; check --data.data_dir."
        ) from error


def _file_size(images_dir: Path, file_name: str, listing: dict[str, int]) -> int | None:
    if file_name in listing:
        return listing[file_name]
    if "/" in file_name or os.sep in file_name:  # nested names are not in the flat listing
        path = images_dir / file_name
        return path.stat().st_size if path.is_file() else None
    return None


def parse_coco_captions(captions_file: str | Path, images_dir: str | Path) -> tuple[list[CaptionRecord], ParseReport]:
    """Read a COCO-format caption file and join it with the image files on disk.

    Args:
        captions_file: The JSON file with `images` and `annotations`.
        images_dir: The folder holding the image files.

    Returns:
        Records sorted by file name, and a report of what was skipped.

    Raises:
        CaptionerError: When the file is missing, is not JSON, or lacks a required key.
    """
    captions_file, images_dir = Path(captions_file), Path(images_dir)
    payload = read_json(captions_file, "Caption")
    require_keys(payload, ("images", "annotations"), captions_file, "Caption")
    for key in ("images", "annotations"):
        if not isinstance(payload[key], list):
            raise CaptionerError(f"Caption file {captions_file}: '{key}' should be a list.")

    report = ParseReport()
    file_by_id: dict[object, str] = {}
    for position, image in enumerate(payload["images"]):
        require_keys(image, ("id", "file_name"), captions_file, "Caption", f"images[{position}]")
        if image["id"] in file_by_id:
            report.duplicate_image_entries += 1
            continue
        file_by_id[image["id"]] = str(image["file_name"])

    captions_by_file: dict[str, dict[str, None]] = defaultdict(dict)  # dict keeps first-seen order
    for position, annotation in enumerate(payload["annotations"]):
        require_keys(annotation, ("image_id", "caption"), captions_file, "Caption", f"annotations[{position}]")
        file_name = file_by_id.get(annotation["image_id"])
        if file_name is None:
            report.captions_without_images += 1
            continue
        caption = annotation["caption"]
        caption = " ".join(caption.split()) if isinstance(caption, str) else ""
        if not caption:
            report.empty_captions += 1
        elif caption in captions_by_file[file_name]:
            report.duplicate_captions += 1
        else:
            captions_by_file[file_name][caption] = None

    listing = _list_image_sizes(images_dir)
    records = []
    for file_name in sorted(set(file_by_id.values())):
        captions = tuple(captions_by_file.get(file_name, ()))
        if not captions:
            report.images_without_captions += 1
            continue
        size = _file_size(images_dir, file_name, listing)
        if size is None:
            report.missing_files.append(file_name)
        elif size == 0:
            report.empty_files.append(file_name)
        else:
            records.append(CaptionRecord(file_name, captions))
            report.images += 1
            report.captions += len(captions)
    if not records:
        raise CaptionerError(
            f"No usable image in {captions_file}: {report.summary()}. Check that --data.data_dir "
            f"points at a folder with captions.json and the images in {images_dir.name}/."
        )
    return records, report
