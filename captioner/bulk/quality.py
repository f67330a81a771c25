"""What a set of captions is worth, counted part by part and added up for the job's summary: how many were
captioned and failed (by reason), the calibrated confidence's distribution, the share of images whose caption
another image also got (duplicates), and captions that repeat themselves (degenerate: "a red a red circle")."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

CONFIDENCE_BINS = 20


def failure_kind(reason: str) -> str:
    """A failure's kind, for counting: its reason up to the first detail ("unreadable image", "file not found")."""
    return reason.split(":")[0].split(" (")[0]


def is_degenerate(caption: str) -> bool:
    """Whether a caption repeats itself: a word three times in a row, or a phrase of two words or more twice in a
    row ("on the left on the left")."""
    words = caption.split()
    for index in range(len(words) - 2):
        if words[index] == words[index + 1] == words[index + 2]:
            return True
    for size in range(2, len(words) // 2 + 1):
        for index in range(len(words) - 2 * size + 1):
            if words[index : index + size] == words[index + size : index + 2 * size]:
                return True
    return False


def caption_key(caption: str) -> str:
    """A short digest of a caption, to count duplicates across parts without keeping every caption."""
    return hashlib.blake2b(caption.strip().lower().encode(), digest_size=8).hexdigest()


@dataclass
class CaptionTally:
    """One part's (or the whole job's) counts.

    Attributes:
        captioned: Images captioned.
        skipped: Images skipped as done (their caption was there already).
        failed: Failures by kind; `examples` one of each.
        confidences: Histogram of the calibrated confidence, `CONFIDENCE_BINS` equal bins over [0, 1], with its sum.
        captions: How often each caption (by `caption_key`) was given.
        degenerate: Captions that repeat themselves.
    """

    captioned: int = 0
    skipped: int = 0
    failed: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    confidences: list[int] = field(default_factory=lambda: [0] * CONFIDENCE_BINS)
    confidence_sum: float = 0.0
    captions: Counter = field(default_factory=Counter)
    degenerate: int = 0

    def add(self, image: str, caption: str | None, confidence: float | None, error: str | None) -> None:
        """Count one image's row."""
        if error is not None or caption is None:
            kind = failure_kind(error or "no caption")
            self.failed[kind] += 1
            self.examples.setdefault(kind, f"{image}: {error}")
            return
        self.captioned += 1
        self.captions[caption_key(caption)] += 1
        self.degenerate += is_degenerate(caption)
        if confidence is not None:
            self.confidences[min(int(confidence * CONFIDENCE_BINS), CONFIDENCE_BINS - 1)] += 1
            self.confidence_sum += confidence

    def merge(self, other: CaptionTally) -> None:
        """Add another part's counts to these."""
        self.captioned += other.captioned
        self.skipped += other.skipped
        self.failed.update(other.failed)
        for kind, example in other.examples.items():
            self.examples.setdefault(kind, example)
        self.confidences = [a + b for a, b in zip(self.confidences, other.confidences)]
        self.confidence_sum += other.confidence_sum
        self.captions.update(other.captions)
        self.degenerate += other.degenerate

    def to_dict(self) -> dict[str, Any]:
        return {
            "captioned": self.captioned,
            "skipped": self.skipped,
            "failed": dict(self.failed),
            "examples": self.examples,
            "confidences": self.confidences,
            "confidence_sum": round(self.confidence_sum, 6),
            "captions": dict(self.captions),
            "degenerate": self.degenerate,
        }

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> CaptionTally:
        return cls(
            int(payload["captioned"]),
            int(payload.get("skipped", 0)),
            Counter(payload.get("failed", {})),
            dict(payload.get("examples", {})),
            list(payload.get("confidences", [0] * CONFIDENCE_BINS)),
            float(payload.get("confidence_sum", 0.0)),
            Counter(payload.get("captions", {})),
            int(payload.get("degenerate", 0)),
        )

    def quality(self) -> dict[str, Any]:
        """The summary's measures: the confidence's mean, quartiles (from the histogram: each within a bin's width,
        0.05) and share under 0.5; the share of captioned images whose caption another image also got; and the
        share of degenerate captions."""
        scored = sum(self.confidences)
        report: dict[str, Any] = {"captioned": self.captioned}
        if scored:
            report["confidence"] = {
                "images": scored,
                "mean": round(self.confidence_sum / scored, 4),
                **{name: self._quantile(q) for name, q in (("p25", 0.25), ("median", 0.5), ("p75", 0.75))},
                "below_0.5": round(sum(self.confidences[: CONFIDENCE_BINS // 2]) / scored, 4),
                "histogram": self.confidences,
            }
        if self.captioned:
            shared = sum(count for count in self.captions.values() if count > 1)
            report["duplicate_share"] = round(shared / self.captioned, 4)
            report["distinct_captions"] = len(self.captions)
            report["degenerate_share"] = round(self.degenerate / self.captioned, 4)
        return report

    def _quantile(self, q: float) -> float:
        """The confidence below which a share `q` of the scored captions lie, read off the histogram (bin centres)."""
        total, running = sum(self.confidences), 0
        for index, count in enumerate(self.confidences):
            running += count
            if running >= q * total:
                return round((index + 0.5) / CONFIDENCE_BINS, 3)
        return 1.0
