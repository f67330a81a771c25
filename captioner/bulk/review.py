"""The review of a captioned set: the images whose calibrated confidence is under a threshold (`--review_below`),
least confident first, as a page a curator opens in a browser (`<output>/review/index.html`: each image small, its
caption and confidence) and as JSON Lines for tools (`<output>/review/review.jsonl`; in a folder of its own, so the
output's own `*.jsonl` parts stay the only JSON Lines at its top).

Rows are gathered part by part while the job runs (`<state>/review/<part>.jsonl`, written with the part) and put
together when the job is complete.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from captioner.core.files import atomic_open
from captioner.core.pixels import DECODE_ERRORS, open_image

REVIEW_DIR = "review"
THUMBNAIL_SIDE = 160
MOST_ON_THE_PAGE = 5000


def thumbnail(data: Any) -> str | None:
    """A small JPEG of an image (its bytes, or its path) as a data URL, for the page; None when it cannot be read."""
    try:
        raw = Path(data).read_bytes() if isinstance(data, (str, Path)) else bytes(data)
        image = open_image(raw, reduce_for={"image_size": THUMBNAIL_SIDE, "resize": "squash"})
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
    except (*DECODE_ERRORS, TypeError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def review_row(image: str, caption: str, confidence: float, score: float, data: Any) -> dict[str, Any]:
    """One image to review, its thumbnail included."""
    return {
        "image": image,
        "caption": caption,
        "confidence": confidence,
        "score": round(score, 5),
        "thumbnail": thumbnail(data),
    }


def write_part_review(folder: Path, part: str, rows: list[dict[str, Any]]) -> None:
    """A part's rows to review (written with the part: atomically)."""
    with atomic_open(folder / REVIEW_DIR / f"{part}.jsonl") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def gathered_review(folder: Path, parts: list[str], below: float) -> list[dict[str, Any]]:
    """Every part's rows under `below`, least confident first."""
    rows = []
    for part in parts:
        path = folder / REVIEW_DIR / f"{part}.jsonl"
        if path.is_file():
            rows += [
                row
                for row in map(json.loads, path.read_text(encoding="utf-8").splitlines())
                if row["confidence"] < below
            ]
    return sorted(rows, key=lambda row: (row["confidence"], row["image"]))


def write_review(output: Path, rows: list[dict[str, Any]], below: float, job: str) -> tuple[Path, Path]:
    """`review/review.jsonl` (every row, without thumbnails) and `review/index.html` (the least confident
    `MOST_ON_THE_PAGE`)."""
    listing, page = output / REVIEW_DIR / "review.jsonl", output / REVIEW_DIR / "index.html"
    with atomic_open(listing) as handle:
        for row in rows:
            handle.write(json.dumps({k: v for k, v in row.items() if k != "thumbnail"}, ensure_ascii=False) + "\n")
    shown = rows[:MOST_ON_THE_PAGE]
    cards = "\n".join(
        f'<figure><img alt="" src="{html.escape(row["thumbnail"] or "")}"><figcaption>'
        f"<b>{row['confidence']:.2f}</b> {html.escape(row['caption'])}<br><small>{html.escape(row['image'])}</small>"
        "</figcaption></figure>"
        for row in shown
    )
    more = f"<p>The {len(rows) - len(shown)} more are in review.jsonl.</p>" if len(rows) > len(shown) else ""
    with atomic_open(page) as handle:
        handle.write(
            "<!doctype html><meta charset='utf-8'><title>Captions to review</title><style>"
            "body{font:14px sans-serif;margin:1em}figure{display:inline-block;width:180px;margin:6px;"
            "vertical-align:top}img{max-width:160px;max-height:160px}figcaption{margin-top:4px}</style>"
            f"<h1>{len(rows)} captions with a confidence under {below:g}</h1><p>Job {html.escape(job)}; least "
            f"confident first. The confidence is the calibrated probability that a caption is good.</p>{more}"
            f"{cards}"
        )
    return listing, page
