"""Lightning callbacks named from the YAML configs."""

from callbacks.checkpoints import LastCheckpoint, ResumableRun
from callbacks.progress import RunSummary, Throughput
from callbacks.reports import TestReport
from callbacks.samples import CaptionSamples
from callbacks.writer import CaptionWriter

__all__ = [
    "CaptionSamples",
    "CaptionWriter",
    "LastCheckpoint",
    "ResumableRun",
    "RunSummary",
    "TestReport",
    "Throughput",
]
