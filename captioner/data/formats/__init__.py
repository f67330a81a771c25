"""Caption formats: one file each; `base` holds the protocol. Folders are searched in `KNOWN_FORMATS`' order."""

from captioner.data.formats.base import CaptionFormat, find_format
from captioner.data.formats.coco import Coco
from captioner.data.formats.folder import TextFolder
from captioner.data.formats.jsonl import Jsonl
from captioner.data.formats.karpathy import Karpathy
from captioner.data.formats.table import Csv
from captioner.data.formats.webdataset import WebDataset


def known_formats() -> list[CaptionFormat]:
    """Every built-in format with its default options, in the order a folder is searched."""
    return [Coco(), Karpathy(), Csv(), Jsonl(), TextFolder(), WebDataset()]


__all__ = [
    "CaptionFormat",
    "Coco",
    "Csv",
    "Jsonl",
    "Karpathy",
    "TextFolder",
    "WebDataset",
    "find_format",
    "known_formats",
]
