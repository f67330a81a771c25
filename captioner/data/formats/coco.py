"""COCO caption format: a JSON file with `images` (`id`, `file_name`) and `annotations` (`image_id`, `caption`).

Mini-COCO's layout is `captions.json` and the images in `Images/`. Records are
joined on `images[].file_name`; names are never rebuilt from ids. An
annotation's optional `style` gives its caption's style (`captioner.text.styles`).
"""

from __future__ import annotations

from pathlib import Path

from captioner.core.errors import CaptionerError
from captioner.core.files import read_json, require_keys
from captioner.data.formats.base import CaptionFormat
from captioner.sources.records import CaptionRecord, DataReport, RecordBuilder


class Coco(CaptionFormat):
    """COCO-format captions (`captions_train2014.json`, Mini-COCO's `captions.json`, ...).

    Args:
        captions_file: The JSON file, relative to the data folder.
        images_folder: The folder of the images, relative to the data folder.
    """

    def __init__(self, captions_file: str = "captions.json", images_folder: str = "Images") -> None:
        self.captions_file, self.images_folder = captions_file, images_folder

    @property
    def looks_for(self) -> str:
        return f"{self.captions_file} with the images in {self.images_folder}/"

    def locate(self, folder: Path) -> Path | None:
        path = folder / self.captions_file
        return path if path.is_file() else None

    def read(self, source: Path, report: DataReport) -> tuple[list[CaptionRecord], Path]:
        payload = read_json(source, "Caption")
        require_keys(payload, ("images", "annotations"), source, "Caption")
        for key in ("images", "annotations"):
            if not isinstance(payload[key], list):
                raise CaptionerError(f"Caption file {source}: '{key}' should be a list.")
        images_dir = source.parent / self.images_folder
        if not images_dir.is_dir():
            raise CaptionerError(
                f"Images folder {images_dir} does not exist. It should hold the files named in {source.name}; "
                "check --data.data_dir (or --data.format.images_folder)."
            )
        builder = RecordBuilder(images_dir, report)
        file_by_id: dict[object, str] = {}
        for position, image in enumerate(payload["images"]):
            require_keys(image, ("id", "file_name"), source, "Caption", f"images[{position}]")
            if image["id"] in file_by_id:
                report.count("duplicate image entries", f"images[{position}]")
                continue
            file_by_id[image["id"]] = str(image["file_name"])
            builder.add(str(image["file_name"]), image_id=image["id"])
        for position, annotation in enumerate(payload["annotations"]):
            require_keys(annotation, ("image_id", "caption"), source, "Caption", f"annotations[{position}]")
            file_name = file_by_id.get(annotation["image_id"])
            if file_name is None:
                report.count("captions whose image_id matches no image", f"annotations[{position}]")
                continue
            where = f"annotations[{position}]"
            builder.add(file_name, annotation["caption"], where=where, style=annotation.get("style"))
        return builder.build(source), images_dir
