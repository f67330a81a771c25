"""What a job over parts knows of itself, kept in its state folder beside its outputs:

    <state>/job.json            the job's fingerprint: what produced its outputs (a rerun with another is refused)
    <state>/parts/<part>.json   a part's record, written when the part is done: who did it, when, with what, and
                                what it holds (the resume marker, and the part's provenance)
    <state>/claims/             who works on what (`captioner.jobs.claims`)

Every file is written atomically and validated on read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from captioner.core.errors import CaptionerError
from captioner.core.files import read_json, write_json

FINGERPRINT_FILE = "job.json"
PARTS_DIR = "parts"


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """A short stable digest of a fingerprint (it names the job in every part's provenance)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """What differs between two fingerprints, one line per setting: `num_beams: 1 before, 5 now`."""
    lines = []
    for key in sorted(set(old) | set(new)):
        before, now = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(now, dict):
            lines += differences(before, now, f"{prefix}{key}.")
        elif before != now:
            lines.append(f"{prefix}{key}: {before!r} before, {now!r} now")
    return lines


class JobState:
    """A job's state folder (see the module docstring).

    Args:
        folder: The state folder (made if missing).
        what: What the job makes, for messages ("captions").
    """

    def __init__(self, folder: str | Path, what: str = "outputs") -> None:
        self.folder = Path(folder)
        self.what = what
        (self.folder / PARTS_DIR).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ the fingerprint
    def fingerprint(self) -> dict[str, Any] | None:
        """The fingerprint of the job whose outputs are here (None: no job yet).

        Raises:
            CaptionerError: When the file is not a fingerprint (damaged).
        """
        path = self.folder / FINGERPRINT_FILE
        if not path.is_file():
            return None
        payload = read_json(path, "The job's fingerprint")
        if not isinstance(payload, dict) or not isinstance(payload.get("fingerprint"), dict):
            raise CaptionerError(f"{path} is not a job fingerprint; remove the output folder to start again.")
        return payload["fingerprint"]

    def adopt(self, fingerprint: dict[str, Any], notes: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record `fingerprint` as this folder's job, with `notes` (how it was started, not compared), or check it is
        the one already recorded.

        Returns:
            The notes the job was started with.

        Raises:
            CaptionerError: Naming every difference when the folder holds a job with another fingerprint.
        """
        recorded = self.fingerprint()
        if recorded is None:
            write_json(
                self.folder / FINGERPRINT_FILE,
                {"fingerprint": fingerprint, "notes": notes or {}, "digest": fingerprint_digest(fingerprint)},
            )
            return notes or {}
        changed = differences(recorded, fingerprint)
        if changed:
            raise CaptionerError(
                f"{self.folder.parent} holds {self.what} of another job; resuming would mix the two. What differs: "
                + "; ".join(changed)
                + ". Give --overwrite to redo the whole job with these settings, or a new "
                "--output folder."
            )
        return read_json(self.folder / FINGERPRINT_FILE, "The job's fingerprint").get("notes", {})

    # ------------------------------------------------------------ parts
    def record_path(self, part: str) -> Path:
        return self.folder / PARTS_DIR / f"{part}.json"

    def done(self, part: str) -> bool:
        """Whether `part` was completed (by any worker, in any run)."""
        return self.record_path(part).is_file()

    def mark_done(self, part: str, record: dict[str, Any]) -> None:
        """Record `part` as done, with what it holds (atomically: a part is done or it is not)."""
        write_json(self.record_path(part), {"part": part, **record})

    def record(self, part: str) -> dict[str, Any]:
        """A done part's record.

        Raises:
            CaptionerError: When it is damaged.
        """
        payload = read_json(self.record_path(part), "A part's record")
        if not isinstance(payload, dict) or payload.get("part") != part:
            raise CaptionerError(
                f"{self.record_path(part)} is not the record of part {part}; remove it to redo the part."
            )
        return payload

    def records(self, parts: list[str]) -> Iterator[dict[str, Any]]:
        """The records of the done parts among `parts`, in order."""
        for part in parts:
            if self.done(part):
                yield self.record(part)

    def claim_once(self, what: str) -> bool:
        """Whether this process is the one to do `what` for the job (the first to ask wins; until `reset`)."""
        try:
            os.close(os.open(self.folder / f"{what}.claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False
        return True

    def forget(self, part: str) -> None:
        """Forget that `part` was done (its output is being redone)."""
        self.record_path(part).unlink(missing_ok=True)

    def reset(self) -> None:
        """Forget the whole job: fingerprint, records, claims (`--overwrite`)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        (self.folder / PARTS_DIR).mkdir(parents=True, exist_ok=True)
