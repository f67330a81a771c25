"""Checkpoints: what captioner adds to Lightning's, how they are written, read and upgraded.

Besides Lightning's state (weights, optimizer, loops), every checkpoint holds,
under the key `captioner`, everything captioning new images needs without the
dataset, the config or the network:

    {"version": 3,
     "decoder": {"class_path": ..., "init_args": {...}},     # CaptionDecoder.spec()
     "encoder": {"class_path": ..., "init_args": {...}},     # ImageEncoder.spec()
     "trainable_encoder_blocks": 0,                           # how the encoder was trained
     "preprocessing": {...},                                  # Preprocessing.to_dict(), the encoder's
     "vocabulary": {...},                                     # the tokenizer's to_dict() (captioner.text)
     "blind": false,
     "decoding": {...}}                                       # DecodingConfig.to_dict()

It also checks a checkpoint against the model configured to use it
(`check_and_build`: the same encoder, preprocessing, vocabulary and decoder,
or a message naming the difference) and rebuilds a model from a checkpoint
alone (`model_from_checkpoint`).

Checkpoints of captioner 0.1 (the decoder named by a string in the
hyperparameters) and 0.2 (a torchvision ResNet named by `backbone` and
`weights`) are read through `upgrade`, so they keep working.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from captioner.decoding.config import DecodingConfig
from captioner.encoders.base import ImageEncoder, encoder_from_spec
from captioner.encoders.preprocessing import Preprocessing
from captioner.encoders.store import jsonable
from captioner.errors import CaptionerError
from captioner.files import atomic_open
from captioner.models.decoders.base import CaptionDecoder, decoder_factory
from captioner.text.base import same_tokenizer_message, tokenizer_from_dict

if TYPE_CHECKING:
    from captioner.models.module import CaptionModel

log = logging.getLogger(__name__)
USE_THE_RUN_CONFIG = "Use the config the checkpoint was trained with (its run folder holds config.yaml)."

CHECKPOINT_VERSION = 4
TORCHVISION_ENCODER = "captioner.encoders.torchvision_models.TorchvisionEncoder"
CAPTIONER_KEY = "captioner"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save checkpoints to a temporary file in the target folder and rename it into place.

    Lightning's own save goes through an fsspec transaction whose temporary
    file lives in the system temp folder; when that is another file system
    the final step is a copy, which a full disk can cut short. Renaming
    within one folder is atomic: a checkpoint is complete or absent.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        with atomic_open(path, "wb") as handle:
            torch.save(checkpoint, handle)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file (tensors and plain data only: nothing in it is executed).

    Raises:
        CaptionerError: When the file is missing or cannot be read as a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionerError(f"Checkpoint {path} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a file that is not a checkpoint
        raise CaptionerError(
            f"{path} is not a usable captioner checkpoint ({type(error).__name__}: {error})."
        ) from error


def upgrade(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's `captioner` entry, made from an older checkpoint's if need be.

    Raises:
        CaptionerError: When the checkpoint was not written by captioner.
    """
    if CAPTIONER_KEY in checkpoint:
        meta = checkpoint[CAPTIONER_KEY]
        if isinstance(meta, dict) and meta.get("version") == 2:
            return _from_version_2(meta)
        if isinstance(meta, dict) and meta.get("version") == 3:  # decoding settings under their 0.2 names
            return {**meta, "version": CHECKPOINT_VERSION, "decoding": _decoding_of(meta["decoding"])}
        if not isinstance(meta, dict) or meta.get("version") != CHECKPOINT_VERSION:
            raise CaptionerError(
                f"This checkpoint's format (version {meta.get('version') if isinstance(meta, dict) else '?'}) is "
                f"not the one this captioner reads ({CHECKPOINT_VERSION}): upgrade captioner."
            )
        return meta
    if "vocabulary" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise CaptionerError("This checkpoint was not written by captioner (it has no vocabulary).")
    hp = checkpoint["hyper_parameters"]
    if hp.get("decoder", "lstm") == "attention":
        decoder = {"class_path": "captioner.models.decoders.attention.AttentionDecoder",
                   "init_args": {"embed_dim": hp.get("embed_dim", 256), "hidden_dim": hp.get("hidden_dim", 512),
                                 "attention_dim": hp.get("attention_dim", 256), "dropout": hp.get("dropout", 0.5),
                                 "regularization": hp.get("attention_regularization", 1.0)}}  # fmt: skip
    else:
        decoder = {"class_path": "captioner.models.decoders.lstm.LSTMDecoder",
                   "init_args": {"embed_dim": hp.get("embed_dim", 256), "hidden_dim": hp.get("hidden_dim", 512),
                                 "num_layers": hp.get("num_layers", 1), "dropout": hp.get("dropout", 0.5)}}  # fmt: skip
    preprocessing = checkpoint.get("preprocessing") or Preprocessing(hp.get("image_size", 224)).to_dict()
    return _from_version_2(
        {
            "version": 2,
            "decoder": decoder,
            "encoder": {"backbone": hp.get("backbone", "resnet50"), "weights": hp.get("weights", "IMAGENET1K_V2")},
            "preprocessing": preprocessing,
            "vocabulary": checkpoint["vocabulary"],
            "blind": bool(hp.get("blind", False)),
            "decoding": {
                key: hp.get(key, default)
                for key, default in (("beam_size", 3), ("length_penalty", 0.0), ("max_decode_length", None))
            },  # fmt: skip
        }
    )


def _from_version_2(meta: dict[str, Any]) -> dict[str, Any]:
    """A captioner 0.2 entry (a torchvision ResNet by `backbone` and `weights`, squashed images) in this version."""
    encoder = meta["encoder"]
    size = int(meta["preprocessing"]["image_size"])
    spec = {"class_path": TORCHVISION_ENCODER, "init_args": {"model": encoder["backbone"],
            "weights": encoder["weights"], "image_size": size, "resize": "squash"}}  # fmt: skip
    return {
        **meta,
        "version": CHECKPOINT_VERSION,
        "encoder": spec,
        "trainable_encoder_blocks": 0,
        "decoding": _decoding_of(meta["decoding"]),
    }


def _decoding_of(old: dict[str, Any]) -> dict[str, Any]:
    return DecodingConfig.from_dict(old, "the checkpoint's decoding settings").to_dict()


# ---------------------------------------------------------------- a model and its checkpoints
def built_decoder(factory: Any, vocabulary: Any, encoder: ImageEncoder) -> CaptionDecoder:
    """The decoder a factory builds for a vocabulary and an encoder's feature size, checked.

    Raises:
        CaptionerError: When it is not a `CaptionDecoder` or did not record its options.
    """
    decoder = factory(len(vocabulary), encoder.feature_dim)
    if not isinstance(decoder, CaptionDecoder):
        raise CaptionerError(f"--model.decoder built a {type(decoder).__name__}, not a CaptionDecoder: see "
                             "captioner/models/decoders/base.py for the protocol.")  # fmt: skip
    decoder.spec()  # fails early, naming the class, if it did not record its options
    return decoder


def meta_of(model: CaptionModel) -> dict[str, Any]:
    """What captioning with `model` needs besides the weights (the checkpoint's `captioner` entry)."""
    return {
        "version": CHECKPOINT_VERSION,
        "decoder": model.require_decoder().spec(),
        "encoder": jsonable(model.encoder.spec()),
        "trainable_encoder_blocks": model.hparams.trainable_encoder_blocks,
        "preprocessing": model.preprocessing.to_dict(),
        "vocabulary": model.vocabulary.to_dict(),
        "blind": model.hparams.blind,
        "decoding": model.decoding.to_dict(),
    }


def check_and_build(model: CaptionModel, checkpoint: dict[str, Any]) -> None:
    """Refuse a checkpoint that does not fit the configured model (naming the difference), else build its decoder.

    Raises:
        CaptionerError: On another encoder, preprocessing, vocabulary, decoder, or blind setting.
    """
    meta = upgrade(checkpoint)
    if meta["blind"] != model.hparams.blind:
        raise CaptionerError(f"The checkpoint was trained with blind={meta['blind']!r} but this run is configured "
                             f"with blind={model.hparams.blind!r}. {USE_THE_RUN_CONFIG}")  # fmt: skip
    check_same_part(meta["encoder"], jsonable(model.encoder.spec()), "encoder", USE_THE_RUN_CONFIG)
    saved_preprocessing = Preprocessing.from_dict(meta["preprocessing"], "the checkpoint")
    if saved_preprocessing != model.preprocessing:
        raise CaptionerError(f"The checkpoint's images were prepared as {saved_preprocessing} but this run is "
                             f"configured for {model.preprocessing}. {USE_THE_RUN_CONFIG}")  # fmt: skip
    vocabulary = tokenizer_from_dict(meta["vocabulary"], "The checkpoint")
    if model.vocabulary is not None and vocabulary != model.vocabulary:
        differences = same_tokenizer_message(vocabulary, model.vocabulary)
        raise CaptionerError(
            f"The checkpoint's tokenizer is not the one prepared from this data ({differences}): it was trained on "
            "other data or with another --data.tokenizer, --data.min_word_count or --data.max_caption_length. Use the "
            "data settings the checkpoint was trained with."
        )
    model.build(vocabulary)
    check_same_part(meta["decoder"], model.decoder.spec(), "decoder", USE_THE_RUN_CONFIG,
                    ignored=getattr(model.decoder, "training_only_options", ()))  # fmt: skip
    model.encoder.mark_weights_loaded()  # the checkpoint's weights replace whatever the encoder would fetch


def load_weights(model: CaptionModel, path: str) -> None:
    """Weights (and nothing else) from a checkpoint into `model`, checked like any checkpoint (`init_checkpoint`)."""
    checkpoint = read_checkpoint(path)
    check_and_build(model, checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    log.info("Starting from the weights of %s", path)


def model_from_checkpoint(cls: type, path: str | Path, **overrides: Any) -> CaptionModel:
    """A model rebuilt from a checkpoint alone (its encoder, decoder, vocabulary, preprocessing, decoding settings
    and weights), with no network access.

    Args:
        cls: `CaptionModel`.
        path: The checkpoint.
        overrides: Decoding settings to use instead of the checkpoint's (`num_beams`, `length_penalty`, ...; the
            0.2 names `beam_size` and `max_decode_length` too).

    Raises:
        CaptionerError: When the file is missing or not a captioner checkpoint, or its encoder or decoder class
            cannot be imported.
    """
    checkpoint = read_checkpoint(path)
    meta = upgrade(checkpoint)
    decoding = DecodingConfig.from_dict(meta["decoding"], str(path)).with_overrides(**overrides)
    encoder = encoder_from_spec(meta["encoder"], f"The checkpoint {path}")
    # The definition the weights were trained with, even if the encoder's library now resolves another one.
    encoder.use_preprocessing(Preprocessing.from_dict(meta["preprocessing"], str(path)))
    decoder = decoder_factory(meta["decoder"], f"The checkpoint {path}")
    model = cls(decoder=decoder, encoder=encoder, blind=meta["blind"], decoding=decoding)
    check_and_build(model, checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def check_same_part(saved: dict[str, Any], configured: dict[str, Any], what: str, use: str,
                    ignored: tuple[str, ...] = ()) -> None:  # fmt: skip
    """Refuse a checkpoint whose encoder or decoder is another class or has other options than the configured one.

    Args:
        saved: The part's spec in the checkpoint (`{"class_path", "init_args"}`).
        configured: The configured part's spec.
        what: "encoder" or "decoder", for the message.
        use: What to do instead, appended to the message.
        ignored: Options that may differ (they change training, not what the weights mean: dropout, loss weights).

    Raises:
        CaptionerError: Naming every option that differs.
    """
    if saved["class_path"] != configured["class_path"]:
        raise CaptionerError(f"The checkpoint holds a {saved['class_path']} {what} but this run is configured with "
                             f"{configured['class_path']}. {use}")  # fmt: skip
    saved_args, configured_args = saved.get("init_args") or {}, configured.get("init_args") or {}
    differences = [f"{name}={saved_args.get(name)!r} (configured: {configured_args.get(name)!r})"
                   for name in sorted(set(saved_args) | set(configured_args))
                   if name not in ignored and saved_args.get(name) != configured_args.get(name)]  # fmt: skip
    if differences:
        raise CaptionerError(f"The checkpoint's {saved['class_path'].rsplit('.', 1)[-1]} was trained with "
                             f"{', '.join(differences)}. {use}")  # fmt: skip
