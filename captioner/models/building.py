"""Building a model from a checkpoint, and checking a checkpoint against the model configured to use it.

`check_and_build` refuses a checkpoint whose encoder, preprocessing, tokenizer,
decoder or blind setting differs from the configured model's (naming the
difference), else builds the decoder for its tokenizer; `model_from_checkpoint`
rebuilds a whole model from a checkpoint alone, offline. What a checkpoint
holds is `captioner.models.checkpoints`', and reading older ones `captioner.compat.checkpoints`'.

The model is a `CaptionModel` (`captioner.models.module`), which imports this
module: nothing here imports it back.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from captioner.compat.checkpoints import upgrade
from captioner.core.errors import CaptionerError
from captioner.core.files import jsonable
from captioner.core.parts import import_trusted_class
from captioner.decoding.confidence import Calibrator
from captioner.decoding.config import DecodingConfig, ModelLimits, SpecialTokens
from captioner.decoding.rules import rules_for
from captioner.encoders.base import ImageEncoder, encoder_from_spec
from captioner.encoders.preprocessing import Preprocessing
from captioner.models.checkpoints import read_checkpoint
from captioner.models.decoders.base import CaptionDecoder, decoder_factory
from captioner.models.objectives.base import SequenceSpec
from captioner.text.base import same_tokenizer_message, tokenizer_from_dict

log = logging.getLogger(__name__)
USE_THE_RUN_CONFIG = "Use the config the checkpoint was trained with (its run folder holds config.yaml)."


def built_decoder(factory: Any, vocabulary: Any, encoder: ImageEncoder) -> CaptionDecoder:
    """The decoder a factory builds for a vocabulary and an encoder's feature size, checked.

    Raises:
        CaptionerError: When it is not a `CaptionDecoder` or did not record its options.
    """
    decoder = factory(len(vocabulary), encoder.feature_dim)
    if not isinstance(decoder, CaptionDecoder):
        raise CaptionerError(
            f"--model.decoder built a {type(decoder).__name__}, not a CaptionDecoder: see "
            "captioner/models/decoders/base.py for the protocol."
        )
    decoder.spec()  # fails early, naming the class, if it did not record its options
    return decoder


def check_and_build(model: Any, checkpoint: dict[str, Any]) -> None:
    """Refuse a checkpoint that does not fit the configured model (naming the difference), else build its decoder.

    Raises:
        CaptionerError: On another encoder, preprocessing, vocabulary, decoder, or blind setting.
    """
    meta = upgrade(checkpoint)
    if meta["blind"] != model.hparams.blind:
        raise CaptionerError(
            f"The checkpoint was trained with blind={meta['blind']!r} but this run is configured "
            f"with blind={model.hparams.blind!r}. {USE_THE_RUN_CONFIG}"
        )
    check_same_part(meta["encoder"], jsonable(model.encoder.spec()), "encoder", USE_THE_RUN_CONFIG)
    saved_preprocessing = Preprocessing.from_dict(meta["preprocessing"], "the checkpoint")
    if saved_preprocessing != model.preprocessing:
        raise CaptionerError(
            f"The checkpoint's images were prepared as {saved_preprocessing} but this run is "
            f"configured for {model.preprocessing}. {USE_THE_RUN_CONFIG}"
        )
    vocabulary = tokenizer_from_dict(meta["vocabulary"], "The checkpoint")
    if model.vocabulary is not None and vocabulary != model.vocabulary:
        differences = same_tokenizer_message(vocabulary, model.vocabulary)
        raise CaptionerError(
            f"The checkpoint's tokenizer is not the one prepared from this data ({differences}): it was trained on "
            "other data or with another --data.tokenizer or --data.captions. Use the "
            "data settings the checkpoint was trained with."
        )
    model.build(vocabulary)
    check_same_part(
        meta["decoder"],
        model.decoder.spec(),
        "decoder",
        USE_THE_RUN_CONFIG,
        ignored=getattr(model.decoder, "training_only_options", ()),
    )
    model.encoder.mark_weights_loaded()  # the checkpoint's weights replace whatever the encoder would fetch
    model.confidence.calibrator = Calibrator.from_dict(meta.get("confidence"))  # fitted on validation, if it was
    model.confidence.clip_calibrator = Calibrator.from_dict(meta.get("confidence_clip"))  # with a CLIP's cosine too


def load_weights(model: Any, path: str) -> None:
    """Weights (and nothing else) from a checkpoint into `model`, checked like any checkpoint (`init_checkpoint`)."""
    checkpoint = read_checkpoint(path)
    check_and_build(model, checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    log.info("Starting from the weights of %s", path)


def check_checkpoint_file(path: str | Path) -> None:
    """Refuse, in one line and before a command starts, a file it would load as a model: one that is not a
    checkpoint (`read_checkpoint`: nothing in it is executed), not captioner's, or that names an encoder, decoder or
    tokenizer class from a module nobody allowed. Cheap: the tensors are mapped, not read.

    Raises:
        CaptionerError: Saying what failed and what to give instead.
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionerError(f"{path} is not a file: give a checkpoint `fit` wrote (last.ckpt, epochNN-*.ckpt).")
    source = f"The checkpoint {path}"
    try:
        meta = upgrade(read_checkpoint(path, mmap=True))
    except CaptionerError as error:
        raise CaptionerError(f"{path}: {error}" if str(path) not in str(error) else str(error)) from None
    import_trusted_class(meta["encoder"]["class_path"], ImageEncoder, "encoder", source)
    decoder_factory(meta["decoder"], source)
    tokenizer_from_dict(meta["vocabulary"], source)


def model_from_checkpoint(cls: type, path: str | Path, **overrides: Any) -> Any:
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
    return model_from_checkpoint_data(cls, read_checkpoint(path), f"The checkpoint {path}", **overrides)


def model_from_checkpoint_data(cls: type, checkpoint: dict[str, Any], source: str, **overrides: Any) -> Any:
    """`model_from_checkpoint` for a checkpoint already read (`captioner` entry and `state_dict`: a published
    model's too); `source` names it in messages."""
    meta = upgrade(checkpoint)
    decoding = DecodingConfig.from_dict(meta["decoding"], source).with_overrides(**overrides)
    encoder = encoder_from_spec(meta["encoder"], source)
    # The definition the weights were trained with, even if the encoder's library now resolves another one.
    encoder.use_preprocessing(Preprocessing.from_dict(meta["preprocessing"], source))
    decoder = decoder_factory(meta["decoder"], source)
    model = cls(decoder=decoder, encoder=encoder, blind=meta["blind"], decoding=decoding)
    check_and_build(model, checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def check_same_part(
    saved: dict[str, Any], configured: dict[str, Any], what: str, use: str, ignored: tuple[str, ...] = ()
) -> None:
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
        raise CaptionerError(
            f"The checkpoint holds a {saved['class_path']} {what} but this run is configured with "
            f"{configured['class_path']}. {use}"
        )
    saved_args, configured_args = saved.get("init_args") or {}, configured.get("init_args") or {}
    differences = [
        f"{name}={saved_args.get(name)!r} (configured: {configured_args.get(name)!r})"
        for name in sorted(set(saved_args) | set(configured_args))
        if name not in ignored and saved_args.get(name) != configured_args.get(name)
    ]
    if differences:
        raise CaptionerError(
            f"The checkpoint's {saved['class_path'].rsplit('.', 1)[-1]} was trained with "
            f"{', '.join(differences)}. {use}"
        )


def configure(model: Any, vocabulary: Any, trainer: Any) -> None:
    """A model's parts for a run (`CaptionModel.configure_model`): the decoder built for the data's `vocabulary`,
    then its weights: from `init_checkpoint` (a second training stage), or a pretrained language model's at the
    start of a fit (a resumed run's come from its checkpoint).

    Raises:
        CaptionerError: When the model already has another vocabulary.
    """
    if model.vocabulary is not None and vocabulary != model.vocabulary:
        raise CaptionerError(
            f"The model's vocabulary ({len(model.vocabulary)} tokens) differs from the data's ({len(vocabulary)})."
        )
    model.build(vocabulary)
    if model.hparams.init_checkpoint and trainer.ckpt_path is None:
        load_weights(model, model.hparams.init_checkpoint)
    elif trainer.state.fn == "fit" and trainer.ckpt_path is None:
        model.decoder.load_pretrained()  # a pretrained language model's weights, fetched once


def sequence_spec(model: Any) -> SequenceSpec:
    """Special tokens, the longest caption and the search's rules of a built model, for its objective."""
    special = SpecialTokens.of(model.vocabulary)
    max_words = model.decoding.max_words(model.vocabulary.max_length)
    return SequenceSpec(special, max_words, rules_for(model.decoding, special, model.vocabulary, max_words))


def model_limits(model: Any) -> ModelLimits:
    """What a built model can decode (its vocabulary, its decoder's positions), which settings are checked against."""
    decoder, vocabulary = model.require_decoder(), model.vocabulary
    return ModelLimits(
        len(vocabulary),
        vocabulary.max_length,
        decoder.longest_caption(),
        type(decoder).__name__,
        vocabulary.stoi,
        vocabulary,
    )


def test_facts(model: Any) -> dict[str, Any]:
    """What a test report says of how the model was tested: its decoding (the longest caption resolved), the
    checkpoint, the splits' sizes, whether it is the blind baseline, its caption styles."""
    return {
        "styles": tuple(getattr(model.vocabulary, "styles", ()) or ()),
        "decoding": {**model.decoding.to_dict(), "max_length": sequence_spec(model).max_length},
        "checkpoint": model.trainer.ckpt_path,
        "split_sizes": getattr(model.data, "split_sizes", {}),
        "blind": model.hparams.blind,
    }
