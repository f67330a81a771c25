"""A `CaptionModel` as the side `captioner.decoding.answers.describe` runs on (`CheckpointSide`): features, the one
search over its decoder, the replayed confidence, and where each word looked. Inference (`predict`, `caption`,
`Captioner`, the server, `caption-set`) describes through it; training decodes its validation and test batches with
`decode_features` and `confidence_features` here."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from captioner.core.pipeline import DecodedBatch
from captioner.decoding import answers
from captioner.decoding.answers import Prediction, caption_decoded
from captioner.decoding.config import DecodingConfig, SpecialTokens
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


def decode_features(
    model: CaptioningModel,
    features: torch.Tensor,
    config: DecodingConfig | None = None,
    compiled: bool | None = None,
    places: list[int] | None = None,
) -> Decoded:
    """Ranked captions of a batch of features, by the one search (`captioner.decoding.search.decode`): the model's
    own decoding settings unless `config` is given; the decoder step compiled when `compiled`, else as the model's
    `compile_search` says; `places` seed each image's sampling stream (None: its row)."""
    config = config or model.decoding
    vocabulary = model.vocabulary
    compiled = model.hparams.get("compile_search", False) if compiled is None else compiled
    return decode_with(
        model.require_decoder(),
        model.image_features(features),
        config,
        SpecialTokens.of(vocabulary),
        config.max_words(vocabulary.max_length),
        vocabulary,
        compiled,
        places,
    )


@torch.no_grad()
def attention_maps(
    model: CaptioningModel, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor
) -> list[torch.Tensor] | None:
    """Where the decoder looked for each word of given captions, for decoders that attend over a grid.

    Replaying the chosen words with teacher forcing gives the weights the search used on that path.

    Returns:
        One `(words, rows, columns)` tensor per caption (its words and the final `<end>`), or None when the decoder
        does not attend or the features are pooled.
    """
    if features.ndim != 3:
        return None
    start = torch.full_like(tokens[:, :1], model.vocabulary.start_index)
    output = model.require_decoder()(
        model.image_features(features), torch.cat([start, tokens[:, :-1]], dim=1), return_attention=True
    )
    if output.attention is None:
        return None
    rows, columns = model.encoder.grid_shape
    return [w[:n].float().view(-1, rows, columns).cpu() for w, n in zip(output.attention, lengths.tolist())]


class CheckpointSide:
    """A `CaptionModel` as `captioner.decoding.answers.ModelSide`.

    Args:
        model: The model, with its vocabulary.
        compiled: Step the decoder through `torch.compile` (None: as the model's `compile_search` says).
    """

    def __init__(self, model: CaptioningModel, compiled: bool | None = None) -> None:
        self.model, self.compiled = model, compiled
        self.vocabulary = model.vocabulary
        confidence = getattr(model, "confidence", None)  # models without one (a plugin's) describe without it
        self.calibrator = getattr(confidence, "calibrator", None)
        self.clip_calibrator = getattr(confidence, "clip_calibrator", None)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixels)

    def search(self, features: torch.Tensor, config: DecodingConfig, places: list[int] | None) -> Decoded:
        return decode_features(self.model, features, config, self.compiled, places)

    def stepper(self, features: torch.Tensor) -> DecoderStepper:
        return DecoderStepper(self.model.require_decoder(), self.model.image_features(features))

    def ops(self, features: torch.Tensor) -> TorchOps:
        return TorchOps(features.device)

    def attention(self, features: torch.Tensor, decoded: Decoded) -> list[torch.Tensor] | None:
        return attention_maps(self.model, features, decoded.best_tokens, decoded.best_lengths)


@torch.no_grad()
def describe(
    model: CaptioningModel,
    images: torch.Tensor,
    config: DecodingConfig | None = None,
    attention: bool = False,
    compiled: bool | None = None,
    reranker: Any = None,
    styles: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """`captioner.decoding.answers.describe` of a `(B, 3, S, S)` uint8 batch of preprocessed images with `model`
    (its own decoding settings unless `config` is given; `styles`: caption styles each image is also captioned in)."""
    side = CheckpointSide(model, compiled)
    return answers.describe(side, images, config or model.decoding, attention, reranker, styles)


@torch.no_grad()
def confidence_features(
    model: CaptioningModel, features: torch.Tensor, decoded: Decoded, config: DecodingConfig
) -> np.ndarray:
    """`(B, 3)` confidence features of the best captions (`captioner.decoding.answers.confidence_features`)."""
    return answers.confidence_features(CheckpointSide(model), features, decoded, config)


def prediction_rows(model: CaptioningModel, batch: dict, attention: bool = False) -> list[Prediction]:
    """`predict`'s rows for a `collate_images` batch: every file with its caption, or its error (and, on request,
    the attention maps the writer draws)."""
    decoded = DecodedBatch(batch["paths"], batch["images"], batch["ok"], batch["errors"])
    return caption_decoded(lambda pixels: describe(model, pixels, attention=attention), decoded)


@torch.no_grad()
def style_test_rows(model: CaptioningModel, batch: dict, features: torch.Tensor) -> list[dict]:
    """A test batch's captions in each style but the default (`captioner.text.styles`), each against its style's
    references (images without a caption of that style left out): `test`'s per-style scores. None for a model
    without styles."""
    rows = []
    for style, references in batch.get("style_references", {}).items():
        decoded = decode_features(model, features, model.decoding.with_overrides(style=style))
        captions = model.vocabulary.decode_batch(decoded.best_tokens)
        for name, image_id, caption, refs in zip(batch["file_names"], batch["image_ids"], captions, references):
            if refs:
                rows.append(
                    {"style": style, "file_name": name, "image_id": image_id, "caption": caption, "references": refs}
                )
    return rows
