"""What captioning an image answers, written once for the PyTorch captioner, the exported runtime, the server and
every job (torch-free):

- `Prediction`: one image's row, the one schema every output uses (`ROW_FIELDS`);
- `describe`: a batch of preprocessed images through features, the one search, an optional reranking, the
  calibrated confidence and the ranked alternatives, over a `ModelSide` (the checkpoint's modules, or the export's
  graphs);
- `answer_rows`: a search's ranked captions as per-image answers;
- `caption_decoded`: the rows of a batch some of whose images could not be decoded (each fails alone).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from captioner.core.errors import CaptionerError
from captioner.core.pipeline import DecodedBatch
from captioner.core.pixels import image_places
from captioner.decoding.confidence import Calibrator, caption_features, replay_log_probs, with_clip
from captioner.decoding.config import DecodingConfig, SpecialTokens
from captioner.decoding.decoded import Decoded
from captioner.decoding.rules import rules_for

# Every output's columns, in order: `caption --json`, predict's files, caption-set's parts, the Python API.
ROW_FIELDS = ("image", "caption", "score", "confidence", "alternatives", "constraints_met", "clip_score", "error")


@dataclass
class Prediction:
    """One image's caption, or why it has none: a row of every output (see `ROW_FIELDS`).

    Attributes:
        image: The image's name: a path as given, `<shard>#<member>`, or `<Image #3>` for an image in memory.
        caption: The best caption; None when the image could not be read.
        score: Its log-probability under the model (the search's rules applied).
        error: Why the image has no caption, else None.
        confidence: The calibrated probability that the caption is good (models fitted with a calibrator).
        alternatives: With `num_return` > 1, the ranked captions (the best first), each a dict of `caption`,
            `score` and, where they apply, `constraints_met` and `clip_score`.
        constraints_met: With `force_words`, whether the caption holds every forced word.
        clip_score: With a CLIP reranker, the caption's CLIP-S.
        attention: Where each word looked (decoders that attend, on request); not a column of the outputs.
        styles: With several caption styles asked for at once (`caption-set --styles`), the caption in each, the
            first being `caption`'s; `caption-set` writes them as `caption_<style>` columns (not a row field).
    """

    image: str
    caption: str | None
    score: float | None
    error: str | None = None
    confidence: float | None = None
    alternatives: tuple[dict[str, Any], ...] | None = None
    constraints_met: bool | None = None
    clip_score: float | None = None
    attention: Any = field(default=None, compare=False, repr=False)
    styles: dict[str, str] | None = None

    @property
    def source(self) -> str:
        """The image's name (captioner 0.3 called it `source`)."""
        return self.image

    @classmethod
    def answered(cls, image: str, answer: dict[str, Any]) -> Prediction:
        """A row from one of `describe`'s answers."""
        alternatives = answer.get("alternatives")
        return cls(
            image,
            answer["caption"],
            answer["score"],
            None,
            answer.get("confidence"),
            None if alternatives is None else tuple(alternatives),
            answer.get("constraints_met"),
            answer.get("clip_score"),
            answer.get("attention"),
            answer.get("styles"),
        )

    @classmethod
    def failed(cls, image: str, reason: str) -> Prediction:
        """A row for an image that has no caption."""
        return cls(image, None, None, reason)

    def row(self) -> dict[str, Any]:
        """The JSON-ready row, every field of `ROW_FIELDS` present (None where it does not apply)."""
        row = {name: getattr(self, name) for name in ROW_FIELDS}
        if self.alternatives is not None:
            row["alternatives"] = [dict(entry) for entry in self.alternatives]
        return row


def captions_or_error(predictions: Sequence[Prediction]) -> list[str]:
    """The captions of `predictions`, in order.

    Raises:
        CaptionerError: Naming the first image that could not be read.
    """
    for prediction in predictions:
        if prediction.error:
            raise CaptionerError(f"Cannot caption {prediction.image}: {prediction.error}.")
    return [prediction.caption for prediction in predictions]


class ModelSide(Protocol):
    """What `describe` needs of a model: the checkpoint's modules (`captioner.models.captioning.CheckpointSide`) or
    an export's graphs (`captioner.inference.exported.ExportSide`).

    Attributes:
        vocabulary: The tokenizer.
        calibrator: The confidence calibrator (None: the model has none).
        clip_calibrator: The calibrator that also reads a CLIP cosine (None: none).
    """

    vocabulary: Any
    calibrator: Calibrator | None
    clip_calibrator: Calibrator | None

    def encode(self, pixels: Any) -> Any:
        """Features of a `(B, 3, S, S)` uint8 batch."""

    def search(self, features: Any, config: DecodingConfig, places: list[int] | None) -> Decoded:
        """The one search over the features (`captioner.decoding.search.decode`)."""

    def stepper(self, features: Any) -> Any:
        """The model one step at a time over the features (`captioner.decoding.search.Stepper`)."""

    def ops(self, features: Any) -> Any:
        """The array operations of the stepper's arrays (`NumpyOps`, `TorchOps`)."""

    def attention(self, features: Any, decoded: Decoded) -> list[Any] | None:
        """Where each word of the best captions looked (None: the decoder does not attend, or cannot say)."""


def describe(
    side: ModelSide,
    pixels: Any,
    config: DecodingConfig,
    attention: bool = False,
    reranker: Any = None,
    styles: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Everything captioning tells about a `(B, 3, S, S)` uint8 batch of preprocessed images, one dict per image.

    Keys: `caption`, `score` (log-probability), `confidence` (models with a calibrator), `alternatives` (with
    `num_return` > 1; see `answer_rows`), `constraints_met` (with `force_words`), `clip_score` (with a reranker) and
    `attention` (per-word maps, only when asked for and the decoder attends; else None). Sampling draws each image's
    words from a stream seeded by its pixels (`captioner.core.pixels.image_places`): the same caption whatever its
    batch-mates and whichever side runs it. A `reranker` (`captioner.evaluation.clip_rerank.ClipReranker`) reorders
    all `num_beams` alternatives before the best is taken. With `styles` (a model of several caption styles,
    `captioner.text.styles`), the images are encoded once and captioned in each style too: `styles` holds
    `{style: caption}`, `config.style`'s (the row's caption) first.
    """
    features = side.encode(pixels)
    searched = config if reranker is None else dataclasses.replace(config, num_return=max(config.num_beams, 1))
    decoded = side.search(features, searched, image_places(pixels) if config.do_sample else None)
    cosines = None
    if reranker is not None:
        decoded, cosines = reranker(pixels, decoded, side.vocabulary)
    confidences = confidences_of(side, features, decoded, config, cosines, getattr(reranker, "name", None))
    rows = answer_rows(
        decoded,
        side.vocabulary,
        config.num_return,
        confidences,
        None if cosines is None else reranker.clip_scores(cosines),
    )
    maps = side.attention(features, decoded) if attention else None
    for index, row in enumerate(rows):
        row["attention"] = maps[index] if maps is not None else None
    if styles:
        first = config.style or side.vocabulary.styles[0]  # the rows' own captions (reranked, if a reranker ran)
        by_style = {first: [row["caption"] for row in rows]}
        for style in (style for style in styles if style != first):
            restyled = dataclasses.replace(config, style=style, num_return=1)
            found = side.search(features, restyled, image_places(pixels) if config.do_sample else None)
            by_style[style] = side.vocabulary.decode_batch(found.best_tokens)
        for index, row in enumerate(rows):
            row["styles"] = {style: captions[index] for style, captions in by_style.items()}
    return rows


def confidences_of(
    side: ModelSide,
    features: Any,
    decoded: Decoded,
    config: DecodingConfig,
    cosines: Any = None,
    clip_model: str | None = None,
) -> np.ndarray | None:
    """The best captions' calibrated confidences (None for a model without a calibrator): with the CLIP cosines of
    `decoded`'s captions `(B, N)` from the CLIP its second calibrator was fitted with, that one's."""
    calibrator, clip_calibrator = side.calibrator, side.clip_calibrator
    if clip_calibrator is not None and cosines is not None and clip_calibrator.clip_model == clip_model:
        return clip_calibrator(with_clip(confidence_features(side, features, decoded, config), cosines[:, 0]))
    return None if calibrator is None else calibrator(confidence_features(side, features, decoded, config))


def confidence_features(side: ModelSide, features: Any, decoded: Decoded, config: DecodingConfig) -> np.ndarray:
    """`(B, 3)` confidence features of the best captions (`captioner.decoding.confidence.caption_features`), from
    one replay of them through the model under `config`'s rules."""
    vocabulary, ops = side.vocabulary, side.ops(features)
    special = SpecialTokens.of(vocabulary)
    rules = rules_for(config, special, vocabulary, config.max_words(vocabulary.max_length))
    tokens = np.asarray(ops.to_numpy(decoded.best_tokens), dtype=np.int64)
    lengths = np.asarray(ops.to_numpy(decoded.best_lengths), dtype=np.int64)
    return caption_features(replay_log_probs(side.stepper(features), tokens, special.start, ops, rules), lengths)


def answer_rows(
    decoded: Decoded, vocabulary: Any, num_return: int, confidences: Any = None, clip_scores: Any = None
) -> list[dict[str, Any]]:
    """One dict per image: `caption` and `score` (log-probability) of the best caption and, with `num_return` > 1,
    `alternatives`: up to that many `{"caption", "score"}`, best first (the best included), finished ones only
    where any finished. With forced words, each also says whether it holds them all (`constraints_met`): a caption
    that could not within the length is returned, after those that could.

    Args:
        decoded: A search's ranked captions (arrays of either library).
        vocabulary: Turns token ids into text.
        num_return: Captions returned per image.
        confidences: Each image's best caption's calibrated confidence (`captioner.decoding.confidence`), for models
            that have a calibrator: `confidence` in [0, 1].
        clip_scores: `(B, N)` CLIP-S of each caption, after reranking by it (`captioner.evaluation.clip_rerank`):
            each caption's `clip_score`.
    """
    rows = []
    scores, tokens = decoded.scores.tolist(), decoded.tokens
    met = decoded.met.tolist() if decoded.met is not None else None
    for image, image_scores in enumerate(scores):
        texts = vocabulary.decode_batch(tokens[image][:num_return])
        ranked = [
            {"caption": text, "score": float(score)}
            for text, score in zip(texts, image_scores[:num_return])
            if score != float("-inf")
        ]
        for rank, entry in enumerate(ranked):
            if met is not None:
                entry["constraints_met"] = bool(met[image][rank])
            if clip_scores is not None:
                entry["clip_score"] = round(float(clip_scores[image][rank]), 4)
        row = {key: value for key, value in ranked[0].items()}
        if confidences is not None:
            row["confidence"] = round(float(confidences[image]), 4)
        if num_return > 1:
            row["alternatives"] = ranked
        rows.append(row)
    return rows


def caption_decoded(describe_batch: Callable[[Any], list[dict[str, Any]]], batch: DecodedBatch) -> list[Prediction]:
    """Every image's row of a decoded batch, in order: `describe_batch(pixels)` for those that decoded (one call),
    the reason for the others (each fails alone)."""
    answers = describe_batch(batch.pixels) if batch.ok else []
    found = dict(zip(batch.ok, answers))
    return [
        Prediction.answered(name, found[position])
        if position in found
        else Prediction.failed(name, batch.errors.get(position, "not decoded"))
        for position, name in enumerate(batch.names)
    ]
