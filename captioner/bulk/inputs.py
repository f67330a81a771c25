"""What a bulk job captions, a part at a time: the image files of a folder tree or of a list, or the images of
WebDataset shards (a folder of `*.tar`, a brace pattern, or URLs). A part is a run of files or one shard: the unit
a job shares out over ranks, writes whole, and skips once done."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from captioner.core.errors import CaptionerError
from captioner.sources.images import find_images
from captioner.sources.shards import IMAGE_MEMBERS, is_url, shard_locations, shard_path, shard_samples

FILES_PER_PART = 1000


class NoImageError(Exception):
    """A shard's sample holds no image (a caption alone)."""


@dataclass
class Sample:
    """One image to caption: its `name` (a path relative to the input, or `<shard>#<key>`), its bytes (or why they
    could not be read), and, for shards, every member of its sample (copied into output shards)."""

    name: str
    data: bytes | BaseException
    members: dict[str, bytes] = field(default_factory=dict)
    key: str = ""


@dataclass
class InputPart:
    """A run of image files, or one shard.

    Attributes:
        name: A stable, file-system-safe name (its outputs are named after it).
        root: The folder file names are relative to, or the shards' folder.
        files: The image files (relative to `root`), for a run of files.
        shard: The shard's location, for a shard.
    """

    name: str
    root: Path
    files: list[str] = field(default_factory=list)
    shard: str | None = None

    def samples(self) -> Iterator[Sample]:
        """The part's images in order."""
        if self.shard is None:
            for relative in self.files:
                try:
                    yield Sample(relative, (self.root / relative).read_bytes(), key=Path(relative).stem)
                except OSError as error:
                    yield Sample(relative, error, key=Path(relative).stem)
            return
        for key, members in shard_samples(shard_path(self.root, self.shard)):
            extension = next((e for e in IMAGE_MEMBERS if e in members), None)
            data = members[extension] if extension else NoImageError("no image in this sample (other members only)")
            yield Sample(f"{self.shard}#{key}.{extension or ''}", data, members, key)


def input_parts(source: str, kind: str = "auto", files_per_part: int = FILES_PER_PART) -> list[InputPart]:
    """The parts of an input, in a stable order.

    Args:
        source: A folder (of images, searched recursively, or of `*.tar` shards), a text file listing image paths
            (one per line), or a shard pattern or URL (`shards/{00000..00099}.tar`, `s3://bucket/{00000..00331}.tar`).
        kind: "folder", "list", "shards", or "auto" (shards when the folder holds `*.tar` or the source is a pattern).
        files_per_part: Image files per part.

    Raises:
        CaptionerError: When the source holds nothing to caption.
    """
    path = Path(source).expanduser()
    if kind == "auto":
        if "{" in source or is_url(source) or source.endswith(".tar"):
            kind = "shards"
        elif path.is_file():
            kind = "list"
        elif path.is_dir():
            kind = "shards" if any(path.rglob("*.tar")) and not find_images(path).images else "folder"
        else:
            raise CaptionerError(f"--input {source} is not a folder, a list of images or a shard pattern.")
    if kind == "shards":
        folder, pattern = (path, None) if path.is_dir() else (Path("."), source)
        locations = shard_locations(folder, pattern)
        if not locations:
            raise CaptionerError(f"--input {source} holds no WebDataset shards (*.tar).")
        return [
            InputPart(f"{index:06d}-{Path(location).stem}"[:120], folder, shard=location)
            for index, location in enumerate(locations)
        ]
    if kind == "list":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        files = [line for line in lines if line and not line.startswith("#")]
        root = path.parent
    elif kind == "folder":
        if not path.is_dir():
            raise CaptionerError(f"--input {source} is not a folder.")
        scan = find_images(path)
        scan.report(path)
        files, root = [image.relative_to(path).as_posix() for image in scan.images], path
    else:
        raise CaptionerError(f"--input_kind {kind!r}: choose auto, folder, list or shards.")
    if not files:
        raise CaptionerError(f"--input {source} holds no image to caption.")
    return [
        InputPart(f"files-{start // files_per_part:06d}", root, files[start : start + files_per_part])
        for start in range(0, len(files), files_per_part)
    ]
