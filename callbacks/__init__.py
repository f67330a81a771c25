"""Lightning callbacks named from the YAML configs."""

from callbacks.progress import RunSummary, Throughput
from callbacks.samples import CaptionSamples
from callbacks.writer import CaptionWriter

__all__ = ["CaptionSamples", "CaptionWriter", "RunSummary", "Throughput"]
