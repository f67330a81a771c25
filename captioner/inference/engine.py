"""The captioning engine: images in any form, decoded in a bounded pool of threads, assembled into batches ahead of
the model (`captioner.core.pipeline`), captioned by the one search, and answered as rows of one schema (torch-free).

    images ─> ImageInput (a path, bytes, a PIL image, an array or tensor, a shard's sample)
          ─> decode threads (PIL releases the interpreter; large JPEGs decode reduced, see core.pixels)
          ─> batches assembled `prefetch` ahead (stacked, pinned and copied to the device, or JPEGs decoded there
             by nvJPEG: the backend's `PixelDecoder`), so the next batches decode while this one is captioned
          ─> the captioner's `describe_pixels` (features, the one search, confidence, alternatives)
          ─> one `Prediction` per image (`captioner.decoding.answers.ROW_FIELDS`), a bad image failing alone

Every entry point is a thin caller: `Captioner` and `OnnxCaptioner` (`predict`, `iter_predict`, `caption`), the
`caption` command, `caption-set` and `publish --measure_dir` run `CaptioningEngine.batches`; the server decodes each
request on its own and captions the batch through the same `describe_pixels`; feature extraction runs
`decoded_batches` with the encoder in place of the search; Lightning's `predict` captions its loader's batches
through `caption_decoded`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from captioner.core.pipeline import (
    DEFAULT_DECODE_THREADS,
    DEFAULT_PREFETCH,
    ImageInput,
    PipelineStats,
    PixelDecoder,
    as_inputs,
    decoded_batches,
)
from captioner.decoding.answers import Prediction, caption_decoded
from captioner.decoding.config import DecodingConfig

__all__ = ["DEFAULT_DECODE_THREADS", "CaptioningEngine", "ImageInput", "PixelDecoder", "as_inputs"]


class Captioning(Protocol):
    """What the engine needs of a captioner (`captioner.inference.protocol.ImageCaptioner` implements it)."""

    decoding: DecodingConfig
    batch_size: int

    def pixel_decoder(self) -> PixelDecoder:
        """How images become the model's input."""

    def describe_pixels(
        self, pixels: Any, config: DecodingConfig, attention: bool = False, styles: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]:
        """`captioner.decoding.answers.describe` over a stacked batch."""


@dataclass
class CaptioningEngine:
    """Images to rows with a captioner, the device fed while the next batches decode (see the module docstring).

    Args:
        captioner: A `Captioner` or `OnnxCaptioner` (anything `Captioning`).
        batch_size: Images per batch (None: the captioner's).
        decode_threads: Images decoded at once.
        prefetch: Batches decoded ahead of the one being captioned.
        max_pixels: Refuse images whose header declares more pixels.
    """

    captioner: Captioning
    batch_size: int | None = None
    decode_threads: int = DEFAULT_DECODE_THREADS
    prefetch: int = DEFAULT_PREFETCH
    max_pixels: int | None = None
    stats: PipelineStats = field(default_factory=PipelineStats)

    def batches(
        self,
        inputs: Iterable[ImageInput],
        config: DecodingConfig | None = None,
        attention: bool = False,
        styles: tuple[str, ...] = (),
    ) -> Iterator[list[tuple[ImageInput, Prediction]]]:
        """Each batch's images with their rows, in order.

        Args:
            inputs: The images (`as_inputs` turns paths, bytes and images into them).
            config: Decoding settings, already checked against the model (None: the captioner's own).
            attention: Rows also carry where each word looked (decoders that attend).
            styles: Caption styles each image is also captioned in, encoded once (`Prediction.styles`; a model of
                several styles, `config.style` being the first).
        """
        config = config or self.captioner.decoding
        captioner = self.captioner

        def describe(pixels: Any) -> list[dict[str, Any]]:
            return captioner.describe_pixels(pixels, config, attention, styles)

        for batch in decoded_batches(
            inputs,
            captioner.pixel_decoder(),
            self.batch_size or captioner.batch_size,
            self.decode_threads,
            self.prefetch,
            self.max_pixels,
            self.stats,
        ):
            started = time.perf_counter()
            predictions = caption_decoded(describe, batch)
            self.stats.busy_s += time.perf_counter() - started
            yield list(zip(batch.payloads, predictions))

    def predictions(self, images: Iterable[Any], config: DecodingConfig | None = None) -> Iterator[Prediction]:
        """One row per image, in order, for images in any form."""
        for batch in self.batches(as_inputs(images), config):
            yield from (prediction for _, prediction in batch)
