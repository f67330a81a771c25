"""Records, the one shape every caption format produces, and the report of what reading the data skipped.

Nothing after the records knows where the captions came from: splits,
vocabulary, features and training see only `CaptionRecord`s. Formats hand
their (image, caption) pairs to a `RecordBuilder`, which joins them per image,
checks the image files and counts every oddity once, for one summary.
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from captioner.core.errors import CaptionerError

SPLIT_LABELS = ("train", "val", "test", "restval")
STYLE_NAME = re.compile(r"[a-z][a-z0-9]{0,31}")  # a caption style's name (captioner.text.styles): it becomes a word


def text_style(name: str) -> str | None:
    """The style a caption file's name ends with: `tags.txt` (of `photo.tags.txt`, or a shard's `<key>.tags.txt`
    member) gives `tags`; None when the name is not `<style>.txt`."""
    style = name[: -len(".txt")] if name.endswith(".txt") else ""
    return style if STYLE_NAME.fullmatch(style) else None


@dataclass(frozen=True)
class CaptionRecord:
    """One image and its reference captions.

    Attributes:
        file_name: The image's path relative to the images folder (or absolute, when it lies elsewhere).
        captions: The image's captions as written in the source (whitespace folded), duplicates removed.
        image_id: The source's id of the image (COCO and Karpathy files have one), else None.
        split: The split the source assigns ("train", "val", "test" or "restval"), else None.
        styles: Each caption's style (`captioner.text.styles`; None for a caption without one), or empty when no
            caption of the image has a style.
    """

    file_name: str
    captions: tuple[str, ...]
    image_id: int | str | None = None
    split: str | None = None
    styles: tuple[str | None, ...] = ()

    @property
    def key(self) -> int | str:
        """The id results files use: the source's image id, else the file name."""
        return self.image_id if self.image_id is not None else self.file_name

    def style_of(self, index: int) -> str | None:
        """The style of the caption at `index` (None: it has none)."""
        return self.styles[index] if self.styles else None

    def captions_in(self, style: str | None, default: str | None = None) -> tuple[str, ...]:
        """The captions of one style (those without a style count as `default`'s)."""
        return tuple(c for i, c in enumerate(self.captions) if (self.style_of(i) or default) == style)

    def with_split(self, split: str | None) -> CaptionRecord:
        """The same record in another split."""
        return CaptionRecord(self.file_name, self.captions, self.image_id, split, self.styles)


@dataclass
class DataReport:
    """What reading the data kept, and what it skipped and why, for one summary line.

    Attributes:
        images: Images kept.
        captions: Captions kept.
        skipped: Reason -> count of what was skipped (or noted) for it.
        examples: Reason -> a few examples (file names, line numbers).
        undecodable: Images whose files could not be decoded (filled in by feature extraction).
        long_captions: Captions longer than the maximum length, cut (filled in by the vocabulary step).
    """

    images: int = 0
    captions: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    undecodable: dict[str, str] = field(default_factory=dict)
    long_captions: int = 0

    def count(self, reason: str, example: str | None = None, times: int = 1) -> None:
        """Note `times` occurrences of `reason`, keeping up to two examples."""
        self.skipped[reason] += times
        if example is not None and len(self.examples[reason]) < 2:
            self.examples[reason].append(example)

    def summary(self) -> str:
        """One line: what was kept and, if anything, what was skipped (with examples)."""
        counts, examples = Counter(self.skipped), {reason: list(found) for reason, found in self.examples.items()}
        if self.undecodable:
            reason = "images that could not be decoded"
            counts[reason] = len(self.undecodable)
            examples[reason] = [f"{name}: {why}" for name, why in list(self.undecodable.items())[:2]]
        line = f"{self.images - len(self.undecodable)} images with {self.captions} captions"
        if counts:
            line += "; skipped " + ", ".join(f"{count} {reason}" for reason, count in counts.items())
            shown = [f"{reason}: {examples[reason][0]}" for reason in counts if examples.get(reason)]  # one each
            if shown:
                line += f" (e.g. {'; '.join(shown)})"
        if self.long_captions:
            line += f"; {self.long_captions} captions longer than the maximum length are cut"
        return line


def _folded(caption: object) -> str:
    return " ".join(caption.split()) if isinstance(caption, str) else ""


class RecordBuilder:
    """Collects (image, caption) pairs from a format and turns them into records.

    Counts, once each, for the summary: empty captions, duplicate captions of
    an image, images listed without any caption, images whose file is missing
    or empty. Image paths may be relative to `images_dir` or absolute.

    Args:
        images_dir: The folder image paths are relative to.
        report: Where the counts go.
        sizes: The images' sizes in bytes when the format knows them (images inside shards): no file is looked at.
    """

    def __init__(self, images_dir: Path, report: DataReport, sizes: dict[str, int] | None = None) -> None:
        self.images_dir, self.report, self.sizes = Path(images_dir), report, sizes
        self._captions: dict[str, dict[tuple[str | None, str], None]] = {}  # (style, text): ordered, deduplicated
        self._ids: dict[str, int | str | None] = {}
        self._splits: dict[str, str | None] = {}

    def add(
        self,
        image: str,
        caption: object = None,
        image_id: int | str | None = None,
        split: str | None = None,
        where: str | None = None,
        style: str | None = None,
    ) -> None:
        """Note an image, with one caption (None or empty: the image is listed without one here).

        Args:
            image: Its path, relative to `images_dir` or absolute.
            caption: One of its captions.
            image_id: The source's id for it.
            split: The split the source assigns it.
            where: Where in the source this came from ("line 12"), for examples in the summary.
            style: The caption's style (`captioner.text.styles`), None for none; an empty one is none too.
        """
        name = self._relative(image)
        captions = self._captions.setdefault(name, {})
        self._ids.setdefault(name, image_id)
        self._splits.setdefault(name, split)
        text = _folded(caption)
        if style is not None and not isinstance(style, str):
            self.report.count("captions whose style is not a name", where)
            return
        style = style.strip().lower() or None if style is not None else None
        if style is not None and not STYLE_NAME.fullmatch(style):
            self.report.count("captions whose style is not lowercase letters and digits", where)
            return
        if caption is not None and not text:
            self.report.count("empty captions", where)
        elif (style, text) in captions:
            self.report.count("duplicate captions", where)
        elif text:
            captions[(style, text)] = None

    def _relative(self, image: str) -> str:
        if self.sizes is not None:  # names the format made (inside shards): as they are, without pathlib, which
            return str(image)  # interns every part of every path it parses for good (web-scale sets: ~75 B each)
        path = Path(str(image).replace("\\", "/"))
        if path.is_absolute():
            try:
                return path.relative_to(self.images_dir.resolve()).as_posix()
            except ValueError:
                return str(path)
        return path.as_posix()

    def build(self, source: str | Path, require_some: bool = True) -> list[CaptionRecord]:
        """The records, sorted by file name, of every image with at least one caption and a non-empty file.

        Args:
            source: Where the captions came from, for the message.
            require_some: Refuse to end with no record at all (False: one shard of many may hold none).

        Raises:
            CaptionerError: When nothing usable is left, naming `source` and what was skipped.
        """
        listing: dict[Path, dict[str, int]] = {}
        records = []
        for name in sorted(self._captions):
            styled = tuple(self._captions[name])
            captions = tuple(text for _, text in styled)
            styles = tuple(style for style, _ in styled) if any(style for style, _ in styled) else ()
            if not captions:
                self.report.count("images without captions", name)
                continue
            size = self._file_size(name, listing)
            if size is None:
                self.report.count("image files missing", name)
            elif size == 0:
                self.report.count("image files empty (0 bytes)", name)
            else:
                records.append(CaptionRecord(name, captions, self._ids[name], self._splits[name], styles))
                self.report.images += 1
                self.report.captions += len(captions)
        if not records and require_some:
            raise CaptionerError(
                f"No usable image in {source}: {self.report.summary()}. Check that --data.data_dir points at the "
                f"folder with the captions and that the images are in {self.images_dir}."
            )
        return records

    def _file_size(self, name: str, listing: dict[Path, dict[str, int]]) -> int | None:
        """The file's size (None when missing); one directory listing per folder instead of a stat per file."""
        if self.sizes is not None:
            return self.sizes.get(name)
        path = self.images_dir / name
        folder = path.parent
        if folder not in listing:
            try:
                with os.scandir(folder) as entries:
                    listing[folder] = {e.name: e.stat().st_size for e in entries if e.is_file()}
            except OSError:
                listing[folder] = {}
        return listing[folder].get(path.name)
