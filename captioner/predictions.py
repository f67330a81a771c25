"""What captioning an image returns, the interface every captioner offers, and captioning a list of images in batches
(torch-free).

`CaptionerProtocol` is what `captioner.inference.Captioner` (a checkpoint,
torch) and `captioner.runtime.OnnxCaptioner` (an exported folder, ONNX
Runtime) both implement (tests/test_captioners.py runs one conformance suite on
both); the server, the `caption` command and the bulk job take either. Both name
sources, report unreadable images and batch the rest the same way, here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from captioner.core.errors import CaptionerError
from captioner.core.pixels import DECODE_ERRORS, describe_error


@dataclass(frozen=True)
class Prediction:
    """One image's caption, or why it has none.

    Attributes:
        source: The path (as given) or a description of an in-memory image.
        caption: The caption, None when the image could not be read.
        score: The model's log-probability of the caption.
        error: Why the image could not be read, else None.
    """

    source: str
    caption: str | None
    score: float | None
    error: str | None = None


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
        """Captions for one image or a list (paths, bytes or PIL images); `CaptionerError` on an unreadable one."""

    def predict(self, images: Any, **overrides: Any) -> list[Prediction]:
        """A `Prediction` per image, unreadable ones with their error instead of stopping the rest."""

    def iter_predict(self, images: Any, **overrides: Any) -> Any:
        """Like `predict`, batch by batch."""

    def describe(self, images: Any, attention: bool = False, **overrides: Any) -> list[dict[str, Any]]:
        """Caption, score, ranked alternatives (with `num_return` > 1) and attention (or None) of decoded images."""

    def pixels_from_bytes(self, data: bytes, max_pixels: int | None = None) -> Any:
        """An image file's bytes as the encoder's input (one of `captioner.core.pixels.DECODE_ERRORS` if it cannot)."""


def predict_in_batches(
    items: Sequence[Any], batch_size: int, load: Callable[[Any], Any],
    caption: Callable[[list[Any]], tuple[list[str], list[float]]],
) -> Iterator[Prediction]:  # fmt: skip
    """Caption `items` `batch_size` at a time: `load(item)` reads one, `caption(loaded)` captions a batch.

    An item that cannot be read gets a `Prediction` with its `error`; the rest of its batch goes on.
    """
    for start in range(0, len(items), batch_size):
        loaded, results = [], []
        for offset, item in enumerate(items[start : start + batch_size]):
            name = str(item) if isinstance(item, (str, Path)) else f"<{type(item).__name__} #{start + offset}>"
            try:
                loaded.append(load(item))
                results.append(Prediction(name, None, None))
            except DECODE_ERRORS as error:
                results.append(Prediction(name, None, None, describe_error(error)))
        if loaded:
            ready = iter(zip(*caption(loaded)))
            results = [r if r.error else Prediction(r.source, *next(ready)) for r in results]
        yield from results


def captions_or_error(predictions: Sequence[Prediction]) -> list[str]:
    """The captions of `predictions`, in order.

    Raises:
        CaptionerError: Naming the first image that could not be read.
    """
    for prediction in predictions:
        if prediction.error:
            raise CaptionerError(f"Cannot caption {prediction.source}: {prediction.error}.")
    return [prediction.caption for prediction in predictions]
