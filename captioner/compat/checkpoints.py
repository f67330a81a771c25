"""Older checkpoints, upgraded to the entry captioner writes today (`captioner.models.checkpoints`).

Checkpoints of captioner 0.1 (the decoder named by a string in the
hyperparameters, the vocabulary beside them), 0.2 (a torchvision ResNet named
by `backbone` and `weights`, version 2) and of 0.3's first weeks (version 3:
decoding settings under their 0.2 names) are read through `upgrade`, so they
keep working (tested on files those versions wrote: tests/fixtures/old/).
Building a model from an entry is `captioner.models.building`'s.
"""

from __future__ import annotations

from typing import Any

from captioner.compat.names import upgraded
from captioner.core.errors import CaptionerError

CHECKPOINT_VERSION = 4
TORCHVISION_ENCODER = "captioner.encoders.torchvision_models.TorchvisionEncoder"
CAPTIONER_KEY = "captioner"


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
        decoder = {
            "class_path": "captioner.models.decoders.attention.AttentionDecoder",
            "init_args": {
                "embed_dim": hp.get("embed_dim", 256),
                "hidden_dim": hp.get("hidden_dim", 512),
                "attention_dim": hp.get("attention_dim", 256),
                "dropout": hp.get("dropout", 0.5),
                "regularization": hp.get("attention_regularization", 1.0),
            },
        }
    else:
        decoder = {
            "class_path": "captioner.models.decoders.lstm.LSTMDecoder",
            "init_args": {
                "embed_dim": hp.get("embed_dim", 256),
                "hidden_dim": hp.get("hidden_dim", 512),
                "num_layers": hp.get("num_layers", 1),
                "dropout": hp.get("dropout", 0.5),
            },
        }
    preprocessing = checkpoint.get("preprocessing") or squashed_imagenet(hp.get("image_size", 224))
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
            },
        }
    )


def _from_version_2(meta: dict[str, Any]) -> dict[str, Any]:
    """A captioner 0.2 entry (a torchvision ResNet by `backbone` and `weights`, squashed images) in this version."""
    encoder = meta["encoder"]
    size = int(meta["preprocessing"]["image_size"])
    spec = {
        "class_path": TORCHVISION_ENCODER,
        "init_args": {
            "model": encoder["backbone"],
            "weights": encoder["weights"],
            "image_size": size,
            "resize": "squash",
        },
    }
    return {
        **meta,
        "version": CHECKPOINT_VERSION,
        "encoder": spec,
        "trainable_encoder_blocks": 0,
        "decoding": _decoding_of(meta["decoding"]),
    }


def _decoding_of(old: dict[str, Any]) -> dict[str, Any]:
    """Decoding settings under their 0.2 names, under today's (checked when the model is built)."""
    return upgraded(dict(old), "the checkpoint's decoding settings", quiet=True)


def squashed_imagenet(size: int) -> dict[str, Any]:
    """The preprocessing of captioner 0.1 and 0.2: the whole frame squashed to `size`, bilinear, ImageNet's
    mean and standard deviation (a version-1 `Preprocessing.to_dict()`)."""
    return {
        "version": 1,
        "image_size": int(size),
        "resize": "squash",
        "interpolation": "bilinear",
        "antialias": True,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
