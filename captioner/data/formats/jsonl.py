"""JSON Lines: one JSON object per line with an image path and a caption (or a list of captions)."""

from __future__ import annotations

import json
from pathlib import Path

from captioner.core.errors import CaptionerError
from captioner.data.formats.base import CaptionFormat, single_file
from captioner.sources.records import CaptionRecord, DataReport, RecordBuilder


class Jsonl(CaptionFormat):
    """`{"image": "...", "caption": "..."}` per line (several lines per image allowed, or a list of captions).

    Image paths are relative to the file's folder, or absolute. Blank lines are
    ignored; lines that are not JSON objects with both fields are counted and
    skipped. A file where no line can be read stops with its first error. An
    optional `style` field gives the line's captions their style
    (`captioner.text.styles`: short, long, tags).

    Args:
        file: The file, relative to the data folder (None: the one *.jsonl there).
        image_key: The field holding the image path.
        caption_key: The field holding the caption (a string or a list of strings).
    """

    looks_for = "one *.jsonl file"

    def __init__(self, file: str | None = None, image_key: str = "image", caption_key: str = "caption") -> None:
        self.file, self.image_key, self.caption_key = file, image_key, caption_key

    def locate(self, folder: Path) -> Path | None:
        return single_file(folder, self.file, ["*.jsonl"], "JSON Lines")

    def read(self, source: Path, report: DataReport) -> tuple[list[CaptionRecord], Path]:
        builder = RecordBuilder(source.parent, report)
        read, first_error = 0, None
        try:
            with source.open(encoding="utf-8-sig") as handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        item = json.loads(line)
                        if not isinstance(item, dict) or not isinstance(item.get(self.image_key), str):
                            raise ValueError(f"no string field {self.image_key!r}")
                        if self.caption_key not in item:
                            raise ValueError(f"no field {self.caption_key!r}")
                    except ValueError as error:  # json.JSONDecodeError is a ValueError
                        first_error = first_error or f"line {number}: {error}"
                        report.count("lines that are not an object with an image and a caption", f"line {number}")
                        continue
                    read += 1
                    captions = item[self.caption_key]
                    for caption in captions if isinstance(captions, list) else [captions]:
                        text = caption if caption is not None else ""
                        builder.add(item[self.image_key], text, where=f"line {number}", style=item.get("style"))
        except UnicodeDecodeError as error:
            raise CaptionerError(f"{source} is not UTF-8 text ({error}); save it as UTF-8.") from error
        if not read:
            raise CaptionerError(f"{source} holds no readable line ({first_error or 'it is empty'}).")
        return builder.build(source), source.parent
