"""Atomic writes and validated reads for every file a later run trusts.

A later run must never take a half-written file for a complete one, so every
writer goes through a temporary file (or folder) in the same folder followed by
`os.replace`, which is atomic on POSIX and Windows.

What lands carries the permissions a plain `open` (or `mkdir`) would give it
under the process's umask: `tempfile` creates its files `0600` and its folders
`0700`, which would make checkpoints, metrics and exported models private to
the user who wrote them, where a team shares a runs folder or a service account
serves an exported model.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from captioner.core.errors import CaptionerError


def _no_space_message(path: Path) -> str:
    return (
        f"No space left on device while writing {path}. Nothing was replaced: the previous "
        "version (if any) is intact. Free some space or point the run at another disk, then rerun."
    )


_umask_lock = threading.Lock()


def process_umask() -> int:
    """The process's current umask, read without changing it where the system allows (Linux's /proc), else by
    setting and restoring it under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def plain_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file under the current umask."""
    return 0o666 & ~process_umask()


def plain_folder_mode() -> int:
    """The mode `mkdir` gives a new folder under the current umask."""
    return 0o777 & ~process_umask()


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file that replaces `path` only when the block succeeds.

    Args:
        path: The final destination.
        mode: "w" for text or "wb" for bytes.
        encoding: Text encoding (ignored for binary mode).

    Yields:
        A writable file object. On any exception the temporary file is removed
        and `path` is left untouched. The file that lands has the mode a plain
        `open` would give it under the process's umask.

    Raises:
        CaptionerError: When the disk is full.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fchmod(handle.fileno(), plain_file_mode())
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.errno == errno.ENOSPC:
            raise CaptionerError(_no_space_message(path)) from error
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_leftovers(folder: str | Path, older_than: float = 0.0) -> int:
    """Remove what writers killed mid-write left in `folder` (not below it): `atomic_open`'s temporary files and
    partial files (`.<name>.partial`), those last changed more than `older_than` seconds ago (a writer still at work
    may be renewing its own).

    Returns:
        How many were removed.
    """
    folder, removed, now = Path(folder), 0, time.time()
    if not folder.is_dir():
        return 0
    for path in [*folder.glob(".*.tmp"), *folder.glob(".*.partial")]:
        try:
            if now - path.stat().st_mtime >= older_than and path.is_file():
                path.unlink()
                removed += 1
        except FileNotFoundError:  # another worker removed it, or its writer finished
            continue
    return removed


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Build a folder under a temporary name beside `path`, renamed to `path` when the block succeeds.

    Args:
        path: The final folder: it must not exist, or be empty.

    Yields:
        The temporary folder to fill. On any exception it is removed and `path` is left as it was. The folder
        that lands has the mode `mkdir` would give it under the process's umask.

    Raises:
        CaptionerError: When the disk is full.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(plain_folder_mode())
        if path.exists():
            path.rmdir()  # empty, as the caller checked: a non-empty one fails here rather than being replaced
        tmp.rename(path)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if error.errno == errno.ENOSPC:
            raise CaptionerError(_no_space_message(path)) from error
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | Path, payload: Any) -> None:
    """Write `payload` as JSON to `path` atomically."""
    with atomic_open(path, "w") as handle:
        json.dump(payload, handle, ensure_ascii=False, indent=1)
        handle.write("\n")


def jsonable(value: Any) -> Any:
    """`value` as it reads back from JSON (what an index or a checkpoint holds), so specs compare equal before and
    after."""
    return json.loads(json.dumps(value, default=str))


def read_json(path: str | Path, what: str) -> Any:
    """Read a JSON file, turning a missing or malformed file into a clear error.

    Args:
        path: The file to read.
        what: What the file is, for the message ("the vocabulary").

    Raises:
        CaptionerError: When the file is missing, cannot be read or is not valid JSON.
    """
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as error:
        raise CaptionerError(f"{what} file {path} does not exist.") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CaptionerError(f"{what} file {path} is not valid JSON ({error}).") from error
    except OSError as error:  # a folder, no permission, ...
        raise CaptionerError(f"{what} file {path} could not be read ({error}).") from error


def require_keys(payload: Any, keys: tuple[str, ...], path: str | Path, what: str, where: str = "") -> None:
    """Check that a parsed JSON object holds `keys`.

    Args:
        payload: The parsed JSON value.
        keys: The keys it must hold.
        path: The file it came from, for the message.
        what: What the file is ("Caption", "Vocabulary").
        where: The entry inside the file ("images[3]"), empty for the top level.

    Raises:
        CaptionerError: Naming the file, the entry and the first missing key.
    """
    place = f"{what} file {path}" + (f", entry {where}," if where else "")
    if not isinstance(payload, dict):
        raise CaptionerError(f"{place} should hold a JSON object, found {type(payload).__name__}.")
    for key in keys:
        if key not in payload:
            raise CaptionerError(f"{place} has no key '{key}'.")
