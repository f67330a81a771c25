"""Lightning callbacks named from the YAML configs."""

from callbacks.checkpoints import LastCheckpoint
from callbacks.progress import RunSummary, Throughput
from callbacks.reports import TestReport
from callbacks.samples import CaptionSamples
from callbacks.writer import CaptionWriter

__all__ = ["CaptionSamples", "CaptionWriter", "LastCheckpoint", "RunSummary", "TestReport", "Throughput"]
