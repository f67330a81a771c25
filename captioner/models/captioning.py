"""Captioning a batch with a `CaptionModel`: features, the one search, the answer rows, and (on request) where each
word looked. The inference path of `predict`, `caption`, `Captioner` and the server; training never calls it."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch

from captioner.core.pixels import image_places
from captioner.decoding.answers import answer_rows
from captioner.decoding.confidence import caption_features, replay_log_probs, with_clip
from captioner.decoding.config import DecodingConfig, SpecialTokens
from captioner.decoding.rules import rules_for
from captioner.decoding.search import Decoded
from captioner.decoding.torch_ops import TorchOps
from captioner.models.stepping import DecoderStepper, decode_with


class CaptioningModel(Protocol):
    """What inference needs of a model: `captioner.models.module.CaptionModel` is one (this module does not import
    it: the model imports this module)."""

    vocabulary: Any
    decoding: DecodingConfig
    encoder: Any
    hparams: Any

    def require_decoder(self) -> Any: ...

    def image_features(self, features: torch.Tensor) -> torch.Tensor: ...

    def encode_images(self, images: torch.Tensor) -> torch.Tensor: ...


def decode_features(model: CaptioningModel, features: torch.Tensor, config: DecodingConfig | None = None,
                    compiled: bool | None = None, places: list[int] | None = None) -> Decoded:  # fmt: skip
    """Ranked captions of a batch of features, by the one search (`captioner.decoding.search.decode`): the model's
    own decoding settings unless `config` is given; the decoder step compiled when `compiled`, else as the model's
    `compile_search` says; `places` seed each image's sampling stream (None: its row)."""
    config = config or model.decoding
    vocabulary = model.vocabulary
    compiled = model.hparams.get("compile_search", False) if compiled is None else compiled
    return decode_with(model.require_decoder(), model.image_features(features), config, SpecialTokens.of(vocabulary),
                       config.max_words(vocabulary.max_length), vocabulary, compiled, places)  # fmt: skip


@torch.no_grad()
def attention_maps(model: CaptioningModel, features: torch.Tensor, tokens: torch.Tensor,
                   lengths: torch.Tensor) -> list[torch.Tensor] | None:  # fmt: skip
    """Where the decoder looked for each word of given captions, for decoders that attend over a grid.

    Replaying the chosen words with teacher forcing gives the weights the search used on that path.

    Returns:
        One `(words, rows, columns)` tensor per caption (its words and the final `<end>`), or None when the decoder
        does not attend or the features are pooled.
    """
    if features.ndim != 3:
        return None
    start = torch.full_like(tokens[:, :1], model.vocabulary.start_index)
    output = model.require_decoder()(model.image_features(features), torch.cat([start, tokens[:, :-1]], dim=1),
                                     return_attention=True)  # fmt: skip
    if output.attention is None:
        return None
    rows, columns = model.encoder.grid_shape
    return [w[:n].float().view(-1, rows, columns).cpu() for w, n in zip(output.attention, lengths.tolist())]


@torch.no_grad()
def describe(model: CaptioningModel, images: torch.Tensor, config: DecodingConfig | None = None,
             attention: bool = False, compiled: bool | None = None,
             reranker: Any = None) -> list[dict[str, Any]]:  # fmt: skip
    """Everything inference can tell about a `(B, 3, S, S)` uint8 batch of preprocessed images, one dict per image.

    Keys: `caption`, `score` (log-probability), `alternatives` (with `num_return` > 1; see
    `captioner.decoding.answers`) and `attention` (per-word maps, only when asked for and the decoder attends;
    else None). Sampling draws each image's words from a stream seeded by its pixels
    (`captioner.core.pixels.image_places`): the same caption whatever its batch-mates. A `reranker`
    (`captioner.evaluation.clip_rerank.ClipReranker`) reorders all `num_beams` alternatives before the best is
    taken, and each caption gains its `clip_score`.
    """
    config = config or model.decoding
    features = model.encode_images(images)
    searched = config if reranker is None else dataclasses.replace(config, num_return=max(config.num_beams, 1))
    decoded = decode_features(model, features, searched, compiled, image_places(images) if config.do_sample else None)
    cosines = None
    if reranker is not None:
        decoded, cosines = reranker(images, decoded, model.vocabulary)
    confidences = confidences_of(model, features, decoded, config, cosines, getattr(reranker, "name", None))
    rows = answer_rows(decoded, model.vocabulary, config.num_return, confidences,
                       None if cosines is None else reranker.clip_scores(cosines))  # fmt: skip
    maps = attention_maps(model, features, decoded.best_tokens, decoded.best_lengths) if attention else None
    for index, row in enumerate(rows):
        row["attention"] = maps[index] if maps is not None else None
    return rows


def confidences_of(model: CaptioningModel, features: torch.Tensor, decoded: Decoded, config: DecodingConfig,
                   cosines: Any = None, clip_model: str | None = None) -> Any:  # fmt: skip
    """The best captions' calibrated confidences (None for a model without a calibrator): with the CLIP cosines of
    `decoded`'s captions `(B, N)` from the CLIP its second calibrator was fitted with, that one's."""
    calibrator, clip_calibrator = getattr(model, "calibrator", None), getattr(model, "clip_calibrator", None)
    if clip_calibrator is not None and cosines is not None and clip_calibrator.clip_model == clip_model:
        return clip_calibrator(with_clip(confidence_features(model, features, decoded, config), cosines[:, 0]))
    return None if calibrator is None else calibrator(confidence_features(model, features, decoded, config))


@torch.no_grad()
def confidence_features(model: CaptioningModel, features: torch.Tensor, decoded: Decoded,
                        config: DecodingConfig) -> Any:  # fmt: skip
    """`(B, 3)` confidence features of the best captions (`captioner.decoding.confidence.caption_features`), from
    one replay of them through the decoder under `config`'s rules."""
    stepper = DecoderStepper(model.require_decoder(), model.image_features(features))
    special = SpecialTokens.of(model.vocabulary)
    rules = rules_for(config, special, model.vocabulary, config.max_words(model.vocabulary.max_length))
    tokens = decoded.best_tokens.cpu().numpy()
    return caption_features(replay_log_probs(stepper, tokens, special.start, TorchOps(features.device), rules),
                            decoded.best_lengths.cpu().numpy())  # fmt: skip


def prediction_rows(model: CaptioningModel, batch: dict, attention: bool = False) -> list[dict[str, Any]]:
    """`predict`'s rows for a `collate_images` batch: every file with its caption and score, or its error (and, on
    request, the attention maps the writer draws)."""
    described = describe(model, batch["images"], attention=attention) if batch["ok"] else []
    found = dict(zip(batch["ok"], described))
    rows = []
    for position, path in zip(batch["positions"], batch["paths"]):
        row = {"path": path, "caption": None, "score": None, "error": batch["errors"].get(position)}
        if position in found:
            row.update(caption=found[position]["caption"], score=found[position]["score"])
            if "confidence" in found[position]:
                row["confidence"] = found[position]["confidence"]
            if found[position]["attention"] is not None:  # for CaptionWriter's pictures, not the tables
                row["attention"] = found[position]["attention"]
        rows.append(row)
    return rows
