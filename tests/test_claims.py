"""Claims on parts (`captioner.jobs.claims`): one winner per claim, leases that run out, and a worker that lost its
part knowing it; the job's state (`captioner.jobs.state`): a fingerprint that refuses another job, naming what
differs."""

import json
import os
import threading
import time

import pytest

from captioner.core.errors import CaptionerError
from captioner.jobs.claims import Claims, work_through
from captioner.jobs.state import JobState, differences


def test_of_many_workers_racing_for_the_same_parts_exactly_one_wins_each(tmp_path):
    parts = [f"part-{i}" for i in range(20)]
    won: dict[str, list[str]] = {}
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(number: int) -> None:
        claims = Claims(tmp_path, f"worker{number}", lease_seconds=60)
        start.wait()
        for part in parts:
            lease = claims.try_claim(part)
            if lease is not None:
                with lock:
                    won.setdefault(part, []).append(claims.worker)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(won) == sorted(parts) and all(len(winners) == 1 for winners in won.values())


def test_a_lease_not_renewed_runs_out_and_the_next_claim_takes_the_part_over(tmp_path):
    """A holder on another machine (its process cannot be checked) stops renewing: its claim lives `lease_seconds`,
    then exactly one worker takes it over, and the first holder learns it lost the part."""
    first = Claims(tmp_path, "elsewhere", lease_seconds=1.0)
    lease = first.try_claim("part-a")
    lease._stop.set()  # the holder's machine is gone: no more renewals
    payload = json.loads(lease.path.read_text())
    lease.path.write_text(json.dumps({**payload, "host": "another-machine"}))
    other = Claims(tmp_path, "here", lease_seconds=1.0)
    assert other.try_claim("part-a") is None  # still alive
    old = time.time() - 5
    os.utime(lease.path, (old, old))
    taken = other.try_claim("part-a")
    assert taken is not None and taken.number == 1 and taken.held()
    assert not lease.held()  # the first holder drops its copy before putting it in place
    assert Claims(tmp_path, "third", lease_seconds=1.0).try_claim("part-a") is None
    taken.release()
    assert not list((tmp_path / "claims").iterdir())


def test_a_claim_of_a_process_of_this_machine_that_is_gone_is_taken_at_once(tmp_path):
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claims = Claims(tmp_path, "dead", lease_seconds=3600)
    lease = claims.try_claim("part-a")
    lease._stop.set()
    payload = json.loads(lease.path.read_text())
    lease.path.write_text(json.dumps({**payload, "pid": int(gone.stdout)}))  # a process that has ended
    assert Claims(tmp_path, "alive", lease_seconds=3600).try_claim("part-a") is not None


def test_a_held_claim_is_renewed_so_a_slow_part_keeps_it(tmp_path):
    claims = Claims(tmp_path, "slow", lease_seconds=0.6)
    lease = claims.try_claim("part-a")
    payload = json.loads(lease.path.read_text())
    lease.path.write_text(json.dumps({**payload, "host": "another-machine"}))  # judged by its renewals alone
    time.sleep(1.5)  # over twice the lease: renewed every 0.2 s meanwhile
    assert Claims(tmp_path, "other", lease_seconds=0.6).try_claim("part-a") is None
    lease.release()


def test_workers_go_through_every_part_once_and_wait_for_the_others(tmp_path):
    parts = [f"part-{i}" for i in range(12)]
    done: set[str] = set()
    did: dict[str, str] = {}
    lock = threading.Lock()

    def worker(name: str, start: int) -> None:
        claims = Claims(tmp_path, name, lease_seconds=30)
        for lease in work_through(claims, parts, lambda part: part in done, start=start):
            time.sleep(0.02 if name == "fast" else 0.1)
            with lock:
                assert lease.part not in did
                did[lease.part] = name
                done.add(lease.part)
            lease.release()

    threads = [threading.Thread(target=worker, args=("fast", 0)), threading.Thread(target=worker, args=("slow", 6))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(did) == sorted(parts)
    counts = {name: list(did.values()).count(name) for name in ("fast", "slow")}
    assert counts["fast"] > counts["slow"] >= 1  # claimed as they finished, not dealt out in advance


def test_a_job_refuses_another_fingerprint_naming_what_differs(tmp_path):
    state = JobState(tmp_path / "state", "captions")
    first = {"model": {"sha256": "aaa"}, "decoding": {"num_beams": 1, "force_words": []}, "format": "jsonl"}
    state.adopt(first, {"replaces_existing": False})
    assert state.adopt(first) == {"replaces_existing": False}  # the same job: resumed
    second = {**first, "decoding": {"num_beams": 5, "force_words": ["purple"]}}
    with pytest.raises(CaptionerError) as refused:
        state.adopt(second)
    message = str(refused.value)
    assert "decoding.num_beams: 1 before, 5 now" in message and "decoding.force_words: [] before" in message
    assert "--overwrite" in message
    assert differences(first, {**first, "model": {"sha256": "bbb"}}) == ["model.sha256: 'aaa' before, 'bbb' now"]
    state.mark_done("part-a", {"images": 3})
    assert state.done("part-a") and state.record("part-a")["images"] == 3
    state.reset()
    assert state.fingerprint() is None and not state.done("part-a")
