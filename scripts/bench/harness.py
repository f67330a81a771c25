"""A phase in a process of its own and what it measures: its memory peak (loader workers counted), timed training."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time


# ------------------------------------------------------------------ memory measurement
def _status(pid: str) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon"):
                    values[key] = int(rest.split()[0])  # kB
    except OSError:
        pass
    return values


def _descendants(pid: str) -> list[str]:
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/task/{current}/children") as handle:
                children = handle.read().split()
        except OSError:
            children = []
        found += children
        stack += children
    return found


class MemorySampler(threading.Thread):
    """Peak memory of this process and its children (DataLoader workers) together, sampled every 20 ms.

    `anon`: anonymous memory (RssAnon: the heap, tensors), which leaves out the
    page cache of memory-mapped files; `resident`: VmRSS. Read from
    /proc/<pid>/status, which costs the measured processes nothing; proportional
    sizes (smaps_rollup) would count pages a forked worker shares with its parent
    once, but reading them walks the page tables under the process's memory lock
    and slowed the measured phases (the server phase by 1.5x). So pages shared
    with forked workers count once per worker: with many workers (a GPU run's 16)
    the anonymous figure overstates the memory used.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_anon_kb = 0
        self.peak_rss_kb = 0
        self._done = threading.Event()

    def run(self) -> None:
        me = str(os.getpid())
        while not self._done.is_set():
            pids = [me, *_descendants(me)]
            stats = [_status(pid) for pid in pids]
            self.peak_anon_kb = max(self.peak_anon_kb, sum(s.get("RssAnon", 0) for s in stats))
            self.peak_rss_kb = max(self.peak_rss_kb, sum(s.get("VmRSS", 0) for s in stats))
            time.sleep(0.02)

    def stop(self) -> dict[str, float]:
        self._done.set()
        self.join()
        return {"peak_anon_mb": self.peak_anon_kb / 1024, "peak_rss_mb": self.peak_rss_kb / 1024}


def _child(queue, function, kwargs) -> None:
    import torch

    # This process was spawned (a clean memory baseline); its DataLoader workers
    # should be forked as they are in a normal run, not spawned (seconds of start-up each).
    multiprocessing.set_start_method("fork", force=True)
    torch.manual_seed(0)
    sampler = MemorySampler()
    sampler.start()
    try:
        result = function(**kwargs)
    except BaseException as error:  # report to the parent instead of leaving it waiting
        queue.put({"error": f"{type(error).__name__}: {error}"})
        raise
    result.update(sampler.stop())
    if torch.cuda.is_available():
        result["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    queue.put(result)


def run_phase(name: str, function, **kwargs) -> dict:
    """Run one phase in a fresh process so its memory peak is its own."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, function, kwargs))
    started = time.perf_counter()
    process.start()
    result = queue.get()
    process.join()
    if "error" in result:  # report it in the table and go on with the other phases
        print(f"  {name:<34} FAILED: {result['error']}", flush=True)
        return {"unsupported": f"failed: {result['error'][:60]}"}
    result["wall_s"] = time.perf_counter() - started
    print(
        f"  {name:<34} {json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()})}",
        flush=True,
    )
    return result


# Phases to run (`--only`); None runs all. Extraction always runs: every later phase reads its features.
ONLY: tuple[str, ...] | None = None
ALWAYS = ("extract",)
# Where each phase's result is written as soon as it is measured (`--json`'s `.partial.json`): a run cut short by
# its time box (scripts/gpu_check.py) keeps what it measured.
PARTIAL: str | None = None


def measure(results: dict, key: str, name: str, function, **kwargs) -> None:
    """`run_phase` into `results[key]`, unless `--only` leaves this phase out."""
    wanted = ONLY is None or any(key == name or (name.endswith("*") and key.startswith(name[:-1])) for name in ONLY)
    if wanted or key in ALWAYS:
        results[key] = run_phase(name, function, **kwargs)
        if PARTIAL:
            from captioner.core.files import write_json

            write_json(PARTIAL, results)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_fit(model, loader, device: str, steps: int, warmup: int) -> float:
    """Train `model` on `loader` for `warmup + steps` steps with Lightning's Trainer, in the precision `fit` picks
    on this device, and return the captions per second of the steps after the warm-up."""
    from lightning.pytorch import Callback, Trainer

    from captioner.core.hardware import default_precision

    class Timer(Callback):
        def __init__(self):
            self.start, self.end, self.captions = 0.0, 0.0, 0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == warmup:
                _sync(device)
                self.start = time.perf_counter()
            if trainer.global_step >= warmup:
                self.captions += len(batch["tokens"])

        def on_train_end(self, trainer, module):
            _sync(device)
            self.end = time.perf_counter()

    timer = Timer()
    kind = "gpu" if device.startswith("cuda") else "cpu"
    trainer = Trainer(
        accelerator=kind,
        devices=1,
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        precision=default_precision(kind),
        callbacks=[timer],
    )
    model.on_fit_start = lambda: None  # no datamodule here; cross-entropy needs no preparation
    trainer.fit(model, train_dataloaders=loader)
    return timer.captions / (timer.end - timer.start)
