"""Karpathy's split files (`dataset_coco.json`, `dataset_flickr8k.json`, `dataset_flickr30k.json`).

The files every captioning paper's COCO and Flickr numbers come from:
`images[]` with `filename`, optionally `filepath` (COCO: `train2014`,
`val2014`), `split` (train, val, test, restval) and `sentences[].raw`, plus
`cocoid` or `imgid`. Used as a caption format they give both the captions and
the splits; `--data.splits.file` takes only the splits from one.
"""

from __future__ import annotations

from pathlib import Path

from captioner.core.errors import CaptionerError
from captioner.core.files import read_json, require_keys
from captioner.data.formats.base import CaptionFormat, single_file
from captioner.sources.records import SPLIT_LABELS, CaptionRecord, DataReport, RecordBuilder


def read_karpathy_entries(path: Path) -> list[dict]:
    """The `images` entries of a Karpathy split file, checked.

    Raises:
        CaptionerError: When the file is not one (naming the entry and key).
    """
    payload = read_json(path, "Karpathy split")
    require_keys(payload, ("images",), path, "Karpathy split")
    if not isinstance(payload["images"], list):
        raise CaptionerError(f"Karpathy split file {path}: 'images' should be a list.")
    for position, entry in enumerate(payload["images"]):
        require_keys(entry, ("filename", "split", "sentences"), path, "Karpathy split", f"images[{position}]")
        if entry["split"] not in SPLIT_LABELS:
            raise CaptionerError(
                f"Karpathy split file {path}, entry images[{position}]: split {entry['split']!r} is not one of "
                f"{', '.join(SPLIT_LABELS)}."
            )
    return payload["images"]


def entry_path(entry: dict) -> str:
    """An entry's image path relative to the data folder: `filepath/filename` (COCO) or `filename` (Flickr)."""
    return f"{entry['filepath']}/{entry['filename']}" if entry.get("filepath") else str(entry["filename"])


class Karpathy(CaptionFormat):
    """Captions and splits from a Karpathy split file.

    Images are looked for at `filepath/filename` under the images folder, then
    at `filename` alone (flat copies such as Mini-COCO's). Images the file names
    but the folder lacks are counted and skipped.

    Args:
        file: The split file (None: the one `dataset_*.json` in the data folder).
        images_folder: The images' folder, relative to the data folder (None: the data folder itself, or its
            `Images/` when there is one).
    """

    looks_for = "a Karpathy split file dataset_*.json"

    def __init__(self, file: str | None = None, images_folder: str | None = None) -> None:
        self.file, self.images_folder = file, images_folder

    def locate(self, folder: Path) -> Path | None:
        return single_file(folder, self.file, ["dataset_*.json"], "Karpathy split")

    def read(self, source: Path, report: DataReport) -> tuple[list[CaptionRecord], Path]:
        entries = read_karpathy_entries(source)
        folder = source.parent
        images_dir = (
            folder / self.images_folder
            if self.images_folder
            else (folder / "Images" if (folder / "Images").is_dir() else folder)
        )
        builder = RecordBuilder(images_dir, report)
        for position, entry in enumerate(entries):
            path = entry_path(entry)
            if not (images_dir / path).is_file() and (images_dir / str(entry["filename"])).is_file():
                path = str(entry["filename"])  # a flat copy
            image_id = entry.get("cocoid", entry.get("imgid"))
            builder.add(path, image_id=image_id, split=entry["split"])
            sentences = entry["sentences"] if isinstance(entry["sentences"], list) else []
            if not sentences:
                report.count("images with an empty sentence list", f"images[{position}]")
            for sentence in sentences:
                raw = sentence.get("raw") if isinstance(sentence, dict) else None
                builder.add(path, raw if raw is not None else "", where=f"images[{position}]")
        return builder.build(source), images_dir
