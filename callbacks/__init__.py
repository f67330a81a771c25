"""Lightning callbacks named from the YAML configs."""

from captioner.callbacks.checkpoints import LastCheckpoint, ResumableRun
from captioner.callbacks.progress import RunSummary, Throughput
from captioner.callbacks.publishing import PublishedModel
from captioner.callbacks.reports import TestReport
from captioner.callbacks.samples import CaptionSamples
from captioner.callbacks.writer import CaptionWriter

__all__ = [
    "CaptionSamples",
    "CaptionWriter",
    "LastCheckpoint",
    "PublishedModel",
    "ResumableRun",
    "RunSummary",
    "TestReport",
    "Throughput",
]
