"""Lightning callbacks named from the YAML configs."""

from captioner.callbacks.checkpoints import LastCheckpoint, ResumableRun
from captioner.callbacks.progress import RunSummary, Throughput
from captioner.callbacks.reports import TestReport
from captioner.callbacks.samples import CaptionSamples
from captioner.callbacks.writer import CaptionWriter

__all__ = [
    "CaptionSamples",
    "CaptionWriter",
    "LastCheckpoint",
    "ResumableRun",
    "RunSummary",
    "TestReport",
    "Throughput",
]
