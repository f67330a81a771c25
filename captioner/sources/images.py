"""Finding the image files of a folder (what `predict` captions)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("captioner")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")


@dataclass
class FolderScan:
    """Image files found under a folder, and what could not be looked into."""

    images: list[Path] = field(default_factory=list)
    unreadable_folders: list[str] = field(default_factory=list)
    skipped_links: list[str] = field(default_factory=list)

    def report(self, folder: str | Path) -> None:
        """Say once, for each kind, what under `folder` was not looked into (the images found go on)."""
        for problem, items in (
            ("folders could not be read", self.unreadable_folders),
            ("symbolic links were not followed", self.skipped_links),
        ):
            if items:
                log.warning("%d %s under %s (e.g. %s).", len(items), problem, folder, items[0])


def find_images(folder: str | Path) -> FolderScan:
    """All image files under `folder`, recursively, sorted.

    Symbolic links to folders are not followed (no loops, no escaping the
    tree); links to files are. Folders that cannot be listed are recorded,
    not fatal.
    """
    scan = FolderScan()

    def unreadable(error: OSError) -> None:
        scan.unreadable_folders.append(f"{error.filename}: {error.strerror}")

    for directory, folders, files in os.walk(folder, onerror=unreadable, followlinks=False):
        for name in folders:
            if os.path.islink(os.path.join(directory, name)):
                scan.skipped_links.append(os.path.join(directory, name))
        for name in files:
            path = Path(directory) / name
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                if path.is_symlink() and not path.exists():
                    scan.skipped_links.append(str(path))
                    continue
                scan.images.append(path)
    scan.images.sort()
    return scan


def files_and_folders(paths: list[str | Path]) -> tuple[list[str], list[str]]:
    """The image files `paths` name, each folder among them replaced by the images under it (`find_images`, in
    place and sorted); and the folders that hold none (for the caller to report).

    Files are kept as given, whatever their extension, so a file that is not an image is reported by the decoder
    that refuses it, not dropped without a word.
    """
    files: list[str] = []
    empty: list[str] = []
    for path in paths:
        if Path(path).is_dir():
            scan = find_images(path)
            scan.report(path)
            found = scan.images
            files += [str(image) for image in found]
            if not found:
                empty.append(str(path))
        else:
            files.append(str(path))
    return files, empty
