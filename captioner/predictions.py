"""What captioning an image returns, and captioning a list of images in batches (torch-free).

Shared by `captioner.inference.Captioner` (torch) and
`captioner.runtime.OnnxCaptioner` (ONNX Runtime), so both name sources,
report unreadable images and batch the rest the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.errors import CaptionerError
from captioner.pixels import DECODE_ERRORS, describe_error


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
