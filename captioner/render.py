"""Pictures with their captions set underneath, for people to look at."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from captioner.core.pixels import to_rgb

_FONT_CACHE: dict[int, ImageFont.ImageFont] = {}


def _font(size: int) -> ImageFont.ImageFont:
    if size not in _FONT_CACHE:
        _FONT_CACHE[size] = ImageFont.load_default(size=size)
    return _FONT_CACHE[size]


def _wrap(lines: Sequence[str], width_px: int, font_size: int) -> list[str]:
    chars = max(10, int(width_px / (0.55 * font_size)))
    wrapped: list[str] = []
    for line in lines:
        wrapped.extend(textwrap.wrap(line, chars) or [""])
    return wrapped


def captioned_image(image: Image.Image, lines: Sequence[str], width: int = 512) -> Image.Image:
    """The image scaled to `width` with `lines` of text set on a white band under it.

    Args:
        image: Any PIL image (converted to RGB).
        lines: Text lines, the first set in black, the rest in grey (e.g. references).
        width: Output width in pixels.
    """
    image = to_rgb(image)
    height = max(1, round(image.height * width / image.width))
    picture = image.resize((width, height), Image.Resampling.BILINEAR)
    font_size = max(12, width // 28)
    text = _wrap(lines, width - 16, font_size)
    line_height = round(font_size * 1.3)
    band = 12 + line_height * len(text)
    canvas = Image.new("RGB", (width, height + band), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    first_count = len(_wrap(lines[:1], width - 16, font_size))
    for row, line in enumerate(text):
        colour = (0, 0, 0) if row < first_count else (90, 90, 90)
        draw.text((8, height + 6 + row * line_height), line, fill=colour, font=_font(font_size))
    return canvas


def image_grid(tiles: Sequence[Image.Image], columns: int = 4, background: str = "white") -> Image.Image:
    """Tiles laid out row by row; each cell is as large as the largest tile."""
    if not tiles:
        raise ValueError("image_grid needs at least one tile")
    cell_w, cell_h = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = (len(tiles) + columns - 1) // columns
    grid = Image.new("RGB", (cell_w * min(columns, len(tiles)), cell_h * rows), background)
    for index, tile in enumerate(tiles):
        grid.paste(tile, ((index % columns) * cell_w, (index // columns) * cell_h))
    return grid


def attention_figure(
    image: Image.Image, words: Sequence[str], weights, tile: int = 160, columns: int = 5
) -> Image.Image:
    """The image, then one panel per word with the regions it attended to lit up.

    Args:
        image: The input picture.
        words: The caption's words (and "<end>"), one per row of `weights`.
        weights: `(len(words), grid_h, grid_w)` attention weights (each panel scaled to its own maximum).
        tile: Panel width in pixels.
        columns: Panels per row.
    """
    import numpy as np

    base = to_rgb(image).resize((tile, round(image.height * tile / image.width)), Image.Resampling.BILINEAR)
    panels = [captioned_image(base, ["(input)"], tile)]
    for word, grid in zip(words, weights):
        heat = np.asarray(grid, dtype=np.float32)
        heat = (255 * heat / max(float(heat.max()), 1e-8)).astype(np.uint8)
        mask = Image.fromarray(heat).resize(base.size, Image.Resampling.BILINEAR)
        lit = Image.composite(base, Image.blend(base, Image.new("RGB", base.size, "black"), 0.75), mask)
        panels.append(captioned_image(lit, [word], tile))
    return image_grid(panels, columns)


def reliability_diagram(bins: Sequence[dict], ece: float, naive_ece: float, size: int = 420) -> Image.Image:
    """A reliability diagram of the confidence: per bin, the share of good captions (bar) against the mean
    confidence (the diagonal is perfect calibration), with both ECEs in the title.

    Args:
        bins: `captioner.decoding.confidence.reliability` rows (low, high, confidence, accuracy, count).
        ece: The calibrated confidence's ECE (0-100).
        naive_ece: The uncalibrated token probability's ECE (0-100).
        size: The plot's side in pixels.
    """
    margin, top = 44, 40
    picture = Image.new("RGB", (size + margin + 12, size + margin + top), "white")
    draw = ImageDraw.Draw(picture)
    font = _font(13)

    def point(x: float, y: float) -> tuple[float, float]:
        return margin + x * size, top + (1 - y) * size

    draw.rectangle((*point(0, 1), *point(1, 0)), outline=(80, 80, 80))
    total = max(sum(row["count"] for row in bins), 1)
    for row in bins:
        left, right = point(row["low"], 0)[0] + 2, point(row["high"], 0)[0] - 2
        draw.rectangle((left, point(0, row["accuracy"])[1], right, point(0, 0)[1]), fill=(90, 130, 200))
        marker = point((row["low"] + row["high"]) / 2, row["confidence"])
        draw.ellipse((marker[0] - 3, marker[1] - 3, marker[0] + 3, marker[1] + 3), fill=(200, 80, 60))
        draw.text((left, point(0, 0)[1] + 4), f"{100 * row['count'] / total:.0f}%", fill=(90, 90, 90), font=font)
    draw.line((*point(0, 0), *point(1, 1)), fill=(60, 60, 60), width=1)
    draw.text(
        (margin, 6), f"confidence: ECE {ece:.1f}   token probability: ECE {naive_ece:.1f}", fill="black", font=font
    )
    draw.text(
        (margin, 22),
        "bars: share of good captions; dots: mean confidence; diagonal: calibrated",
        fill=(90, 90, 90),
        font=_font(11),
    )
    return picture
