"""Claims on the parts of a job, kept as files in its state folder: any worker claims the next free part when it
finishes one, and a dead worker's part is taken over once its lease runs out.

    <state>/claims/<part>.<n>.lease     claim number n of the part: who holds it (worker, host, process)

A claim is made by creating its file with `O_CREAT | O_EXCL`, which exactly one process wins, on one machine or
on a shared filesystem (NFS, Lustre, a cluster's home). The holder renews it (touches it) every third of
`lease_seconds` from a thread of its own, so a slow part never loses its claim while its worker lives. A claim
whose holder stopped renewing for `lease_seconds` (killed, its node gone), or whose holder is a process of this
machine that no longer exists, is taken over by creating claim n + 1, which again one worker wins. Before its
output is put in place, a worker checks that it still holds the part (`Lease.held`): one that lost it (paused
past its lease) drops its copy. Nothing here knows what a part is besides its name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("captioner")
DEFAULT_LEASE_SECONDS = 600.0


def new_worker_id() -> str:
    """A name for this worker, unique across machines: host, process and a random tail."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class Holder:
    """Who holds a claim, as its file says."""

    worker: str
    host: str
    pid: int

    def is_gone_here(self) -> bool:
        """Whether the holder is a process of this machine that no longer runs (its claim can go at once)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # it runs, as another user
            return False
        return False


class Lease:
    """A held claim: renewed in the background until released."""

    def __init__(self, claims: Claims, part: str, number: int) -> None:
        self.claims, self.part, self.number = claims, part, number
        self.path = claims.path(part, number)
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name=f"lease-{part}", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.claims.lease_seconds / 3):
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path)

    def held(self) -> bool:
        """Whether this worker still holds the part (no later claim took it over)."""
        return self.claims.latest(self.part) == self.number

    def release(self) -> None:
        """Stop renewing and remove every claim file of the part (it is done, or given back)."""
        self._stop.set()
        self._renewer.join()
        self.claims.forget(self.part)


class Claims:
    """The claims of one job's parts (see the module docstring).

    Args:
        folder: The job's state folder (`claims/` is made in it).
        worker: This worker's name (`new_worker_id`).
        lease_seconds: How long a claim lives without being renewed.
    """

    def __init__(
        self, folder: str | Path, worker: str | None = None, lease_seconds: float = DEFAULT_LEASE_SECONDS
    ) -> None:
        self.folder = Path(folder) / "claims"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.worker = worker or new_worker_id()
        self.lease_seconds = lease_seconds

    def path(self, part: str, number: int) -> Path:
        return self.folder / f"{part}.{number}.lease"

    def _numbers(self, part: str, names: list[str] | None = None) -> list[int]:
        names = os.listdir(self.folder) if names is None else names
        prefix, numbers = f"{part}.", []
        for name in names:
            if name.startswith(prefix) and name.endswith(".lease"):
                middle = name[len(prefix) : -len(".lease")]
                if middle.isdigit():
                    numbers.append(int(middle))
        return numbers

    def latest(self, part: str) -> int | None:
        """The number of the part's latest claim (None: unclaimed)."""
        numbers = self._numbers(part)
        return max(numbers) if numbers else None

    def holder(self, part: str, number: int) -> Holder | None:
        """Who holds claim `number` (None when its file is gone or unreadable: being written or released)."""
        try:
            payload = json.loads(self.path(part, number).read_text(encoding="utf-8"))
            return Holder(str(payload["worker"]), str(payload["host"]), int(payload["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def expired(self, part: str, number: int) -> bool:
        """Whether claim `number` is no longer held: not renewed for `lease_seconds`, or its holder is gone."""
        try:
            age = time.time() - self.path(part, number).stat().st_mtime
        except FileNotFoundError:
            return True
        if age > self.lease_seconds:
            return True
        holder = self.holder(part, number)
        return holder is not None and holder.is_gone_here()

    def try_claim(self, part: str, names: list[str] | None = None) -> Lease | None:
        """Claim `part` if it is free or its claim expired (None: another worker holds it, or won the race)."""
        numbers = self._numbers(part, names)
        number = 0
        if numbers:
            latest = max(numbers)
            if not self.expired(part, latest):
                return None
            previous = self.holder(part, latest)
            number = latest + 1
        else:
            previous = None
        payload = json.dumps(
            {"worker": self.worker, "host": socket.gethostname(), "pid": os.getpid(), "claimed": time.time()}
        )
        try:
            descriptor = os.open(self.path(part, number), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None  # another worker won this claim
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(payload)
        if number:
            log.warning(
                "Taking over part %s from %s, whose claim expired (killed, or its machine is gone).",
                part,
                previous.worker if previous else "a worker",
            )
        return Lease(self, part, number)

    def claim_next(self, parts: list[str], done: set[str] | None = None, start: int = 0) -> Lease | None:
        """The first part (from `start`, wrapping round) that is not done and can be claimed; None when none can."""
        names = os.listdir(self.folder)
        done = done or set()
        order = parts[start:] + parts[:start]
        for part in order:
            if part not in done:
                lease = self.try_claim(part, names)
                if lease is not None:
                    return lease
        return None

    def forget(self, part: str) -> None:
        """Remove every claim file of `part`."""
        for number in self._numbers(part):
            self.path(part, number).unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove every claim (a launcher whose workers are all its own, starting: any claim is a dead run's)."""
        for path in self.folder.glob("*.lease"):
            path.unlink(missing_ok=True)

    def held_by_others(self, parts: list[str], done: set[str]) -> list[str]:
        """The parts not done whose latest claim is alive."""
        names = os.listdir(self.folder)
        alive = []
        for part in parts:
            numbers = self._numbers(part, names)
            if part not in done and numbers and not self.expired(part, max(numbers)):
                alive.append(part)
        return alive


def work_through(
    claims: Claims,
    parts: list[str],
    is_done,
    poll_seconds: float | None = None,
    wait_for_others: bool = True,
    start: int = 0,
) -> Iterator[Lease]:
    """Every part this worker gets to do: claim the next free one, hand it over, and when none is free wait for the
    others' parts to finish or their leases to run out (then take them over), until every part is done.

    Args:
        claims: The job's claims.
        parts: Every part's name, in order.
        is_done: `is_done(part)` says whether a part was completed (by any worker, in any run).
        poll_seconds: How often at most to look again while others work (None: a tenth of the lease, at most 5 s);
            the first looks come sooner.
        wait_for_others: Wait for parts others hold (False: stop when nothing is free, as a worker that leaves the
            rest to its peers or to a later run).
        start: Where this worker starts looking (workers spread over the parts instead of all racing for the first).

    The caller does the part, then releases the lease (`Lease.release`) once the part is done or given up.
    """
    longest = poll_seconds if poll_seconds is not None else min(5.0, claims.lease_seconds / 10)
    wait = min(0.05, longest)
    while True:
        done = {part for part in parts if is_done(part)}
        if len(done) == len(parts):
            return
        lease = claims.claim_next(parts, done, start % max(1, len(parts)))
        if lease is not None:
            wait = min(0.05, longest)
            if is_done(lease.part):  # completed between the listing and the claim
                lease.release()
                continue
            yield lease
            continue
        if not wait_for_others:
            return
        time.sleep(wait)  # soon at first (the others' last parts end together), then less often
        wait = min(2 * wait, longest)
