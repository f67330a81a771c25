"""The interface every captioner offers (`CaptionerProtocol`), and `ImageCaptioner`, the part of it written once
(torch-free).

`captioner.inference.Captioner` (a checkpoint, torch) and `captioner.inference.OnnxCaptioner` (an exported folder,
ONNX Runtime) are both `ImageCaptioner`s: each says how its images become pixels (`pixel_decoder`) and how a batch
of pixels is described (`describe_pixels`); naming images, checking settings before the model runs, batching
through the captioning engine and failing a bad image alone are done here, once. `tests/test_captioner_protocol.py`
runs one conformance suite on both; the server, `caption`, `caption-set` and `publish` take either.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from captioner.decoding.answers import Prediction, captions_or_error
from captioner.decoding.config import DecodingConfig, ModelLimits
from captioner.inference.engine import DEFAULT_DECODE_THREADS, CaptioningEngine, PixelDecoder


@runtime_checkable
class CaptionerProtocol(Protocol):
    """What every captioner offers (see the module docstring).

    Attributes:
        decoding: Its decoding settings (`captioner.decoding.DecodingConfig`), the model's own unless overridden.
        limits: What its model can decode (`captioner.decoding.ModelLimits`), which settings are checked against.
        preprocessing: The encoder's input definition (a `Preprocessing`, or its dict where torch is absent).
        batch_size: Images per encoder and decoder run.
    """

    decoding: Any
    limits: Any
    preprocessing: Any
    batch_size: int

    def settings(self, **overrides: Any) -> Any:
        """Its decoding settings with `overrides`, checked against the model (`CaptionerError` when they cannot run)."""

    def caption(self, images: Any, **overrides: Any) -> list[str]:
        """Captions for one image or a list (paths, bytes or images); `CaptionerError` on an unreadable one."""

    def predict(self, images: Any, **overrides: Any) -> list[Prediction]:
        """A `Prediction` per image, unreadable ones with their error instead of stopping the rest."""

    def iter_predict(self, images: Any, **overrides: Any) -> Any:
        """Like `predict`, batch by batch."""

    def describe(self, images: Any, attention: bool = False, **overrides: Any) -> list[dict[str, Any]]:
        """Caption, score, ranked alternatives (with `num_return` > 1) and attention (or None) of decoded images."""

    def pixels_from_bytes(self, data: bytes, max_pixels: int | None = None) -> Any:
        """An image file's bytes as the encoder's input (one of `captioner.core.pixels.DECODE_ERRORS` if it cannot)."""


def _one_or_many(images: Any) -> list[Any]:
    """A single image (a path, bytes, a PIL image, an `(H, W, 3)` array or a `(3, H, W)` tensor) as a list of one;
    a `(B, 3, H, W)` tensor as its images; a list as it is."""
    if isinstance(images, (str, Path, bytes, bytearray)) or hasattr(images, "getbands"):  # a PIL image
        return [images]
    return [images] if getattr(images, "ndim", None) == 3 else list(images)


class ImageCaptioner:
    """What `Captioner` and `OnnxCaptioner` share: a subclass sets `decoding`, `limits`, `preprocessing` and
    `batch_size`, and implements `pixel_decoder`, `describe_pixels` and `pixels_from_bytes`.

    Attributes:
        decode_threads: Images decoded at once while captioning lists of images.
    """

    decoding: DecodingConfig
    limits: ModelLimits
    preprocessing: Any
    batch_size: int
    decode_threads: int = DEFAULT_DECODE_THREADS

    # ------------------------------------------------------------ what a subclass says
    def pixel_decoder(self) -> PixelDecoder:
        """How images become this model's input (`captioner.inference.engine.PixelDecoder`)."""
        raise NotImplementedError

    def describe_pixels(
        self, pixels: Any, config: DecodingConfig, attention: bool = False, styles: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]:
        """`captioner.decoding.answers.describe` over a `(B, 3, S, S)` uint8 batch on the model's device, with
        settings already checked (`styles`: caption styles each image is also captioned in)."""
        raise NotImplementedError

    def pixels_from_bytes(self, data: bytes, max_pixels: int | None = None) -> Any:
        """An image file's bytes as the encoder's `(3, S, S)` uint8 input (the full-size picture is not kept).

        Raises:
            One of `captioner.core.pixels.DECODE_ERRORS` (`TooManyPixelsError` over `max_pixels`,
            `UnsupportedFormatError` for formats outside `ACCEPTED_FORMATS`).
        """
        decoder = self.pixel_decoder()
        if decoder.for_device(data, max_pixels):  # decoded as the engine decodes it: the same pixels, the same caption
            (pixels,) = decoder.on_device([data])
            if isinstance(pixels, BaseException):
                raise pixels
            return pixels
        return decoder.host(data, max_pixels)

    # ------------------------------------------------------------ written once
    def settings(self, **overrides: Any) -> DecodingConfig:
        """This captioner's decoding settings with `overrides`, checked against the model.

        Raises:
            CaptionerError: Naming a setting that is unknown, out of range, or more than the model can do.
        """
        return self.decoding.with_overrides(**overrides).checked(self.limits)

    def engine(self, **options: Any) -> CaptioningEngine:
        """The captioning engine over this captioner (`options`: `batch_size`, `decode_threads`, `prefetch`,
        `max_pixels`)."""
        options.setdefault("decode_threads", self.decode_threads)
        return CaptioningEngine(self, **options)

    def iter_predict(self, images: Iterable[Any], **overrides: Any) -> Iterator[Prediction]:
        """Caption paths, bytes, PIL images, arrays or tensors, yielding rows batch by batch, in order; an image that
        cannot be read gets its `error` and the rest go on (`overrides`: decoding settings for this call, checked
        before any image is read)."""
        config = self.settings(**overrides)
        yield from self.engine().predictions(images, config)

    def predict(self, images: Iterable[Any], **overrides: Any) -> list[Prediction]:
        """Caption every image; unreadable ones get an error instead of stopping the rest."""
        return list(self.iter_predict(images, **overrides))

    def caption(self, images: Any, **overrides: Any) -> list[str]:
        """Captions for one image or a list of them (`overrides`: decoding settings for this call, e.g.
        `num_beams=5`).

        Raises:
            CaptionerError: Naming the first image that could not be read.
        """
        return captions_or_error(self.predict(_one_or_many(images), **overrides))

    def describe(self, images: Sequence[Any], attention: bool = False, **overrides: Any) -> list[dict[str, Any]]:
        """Everything the model can say about images, one dict per image (what the server returns).

        Args:
            images: Paths, bytes, decoded PIL images (any mode), arrays or tensors, or `pixels_from_bytes` inputs.
            attention: Also return, for decoders that attend over a grid of regions, where each word looked.
            overrides: Decoding settings for this call (`num_return=3` for ranked alternatives, ...).

        Returns:
            Dicts with `caption`, `score` (log-probability), `confidence` (with a calibrator), `alternatives` (with
            `num_return` > 1: `[{"caption", "score"}]`, best first), `constraints_met` (with forced words) and
            `attention` (`{"words", "grid": [rows, columns], "weights": one list per word}` or None).
        """
        config = self.settings(**overrides)
        decoder = self.pixel_decoder()
        pixels = decoder.stack([image if _is_pixels(image, self) else decoder.host(_read(image)) for image in images])
        return [attention_as_lists(row) for row in self.describe_pixels(pixels, config, attention)]


def _read(image: Any) -> Any:
    """A path's bytes (an image file is read as the server reads an upload); anything else as it is."""
    return Path(image).read_bytes() if isinstance(image, (str, os.PathLike)) else image


def _is_pixels(image: Any, captioner: ImageCaptioner) -> bool:
    """Whether `image` is already the encoder's `(3, S, S)` uint8 input (from `pixels_from_bytes`)."""
    shape = getattr(image, "shape", None)
    size = (
        captioner.preprocessing["image_size"]
        if isinstance(captioner.preprocessing, dict)
        else captioner.preprocessing.image_size
    )
    return shape is not None and tuple(shape) == (3, size, size) and "uint8" in str(getattr(image, "dtype", ""))


def attention_as_lists(row: dict[str, Any]) -> dict[str, Any]:
    """A `describe` row with its attention maps as plain lists (JSON-ready), or None."""
    maps = row.pop("attention", None)
    row["attention"] = None
    if maps is not None:
        words = [*row["caption"].split(), "<end>"][: len(maps)]
        row["attention"] = {
            "words": words,
            "grid": list(maps.shape[1:]),
            "weights": [[round(float(v), 5) for v in word.flatten()] for word in maps],
        }
    return row
