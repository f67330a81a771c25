"""Lightning callbacks named from the YAML configs."""

from callbacks.writer import CaptionWriter

__all__ = ["CaptionWriter"]
