"""CaptionModel: a thin LightningModule over an encoder, a decoder and an objective (parts from the config), its
confidence calibration (`models.calibration`) and scores (`models.scores`); building is `models.building`, decoding
`captioner.decoding`, the test report `captioner.evaluation.report`. It implements no loss, no search, no file."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule

from captioner.core.errors import CaptionerError
from captioner.core.parts import config_class
from captioner.data.contract import CaptionData
from captioner.decoding.answers import Prediction
from captioner.decoding.config import DecodingConfig, ModelLimits
from captioner.decoding.decoded import Decoded
from captioner.encoders.base import ImageEncoder, TrainableBlocks, check_grid
from captioner.encoders.preprocessing import Preprocessing
from captioner.encoders.torchvision_models import default_encoder
from captioner.evaluation.beyond import ExtraMetrics, extra_scores_of
from captioner.evaluation.report import finished_test, test_rows
from captioner.models import building, captioning, checkpoints
from captioner.models.calibration import ConfidenceCalibration
from captioner.models.decoders.base import CaptionDecoder, decoder_features
from captioner.models.decoders.lstm import LSTMDecoder
from captioner.models.objectives.base import Objective, SequenceSpec
from captioner.models.objectives.cross_entropy import CrossEntropy, caption_cross_entropy
from captioner.models.optimisation import configured_optimizers
from captioner.models.scores import CaptionScores

warnings.filterwarnings("ignore", r"Found \d+ module\(s\) in eval mode", UserWarning)  # frozen encoder parts


class CaptionModel(LightningModule):
    """Image captioning with an image encoder and a decoder chosen in the config.

    The encoder is part of the module so that a checkpoint alone captions offline. Frozen (the default), training
    reads its cached features; with `trainable_encoder_blocks` it learns with the decoder. The decoder's sizes come
    from the vocabulary: the datamodule's (`configure_model`) or a checkpoint's.

    Args:
        decoder: A callable `(vocab_size, feature_dim) -> CaptionDecoder`: in YAML, a `class_path` with its
            `init_args` (`captioner.models.decoders.LSTMDecoder`, `AttentionDecoder`, `TransformerDecoder`,
            or your own). Sets `data.needs.features` to what the decoder reads.
        encoder: The image encoder (`captioner.encoders.TorchvisionEncoder`, `TimmEncoder`, `OpenClipEncoder`,
            `HuggingFaceEncoder`, or your own; default: an ImageNet ResNet50). The data side extracts features with
            this same instance.
        objective: The training objective (default: cross-entropy): `captioner.models.objectives.CrossEntropy`
            or `SelfCritical`, or your own. Sets `data.needs.train_items` to what it trains on.
        trainable_encoder_blocks: Fine-tune the encoder's last this many blocks ("all": the whole encoder; 0: frozen,
            features cached once). Anything but 0 makes the data side deliver images (`data.needs.online_features`).
        encoder_lr: Peak learning rate of the trained encoder blocks (None: `lr` / 10).
        lr, weight_decay: AdamW's peak learning rate and weight decay.
        lr_schedule, warmup_steps: "cosine" (warm-up, then cosine decay to zero) or "constant"; warm-up steps.
        decoding: How `test` and `predict` decode (`captioner.decoding.DecodingConfig`: num_beams, num_return,
            length_penalty, max_length, rules, sampling); validation decodes greedily with the same rules.
        compile_search: `test` and `predict` step the decoder through `torch.compile` (CUDA graphs on a GPU).
        blind: Zero the image features (the blind baseline: what the language prior alone achieves).
        init_checkpoint: Start from this checkpoint's weights (not its optimizer or epoch): a second training stage.
        confidence_threshold: The CIDEr-D (x 100) at or above which a validation caption counts as good for the
            confidence calibrator (null: the validation captions' median; `captioner.models.calibration`).
        extra_metrics: What `test` measures beyond the COCO metrics (`captioner.evaluation.beyond.ExtraMetrics`:
            CHAIR where objects are known, on by default; CLIPScore with `clip_model`; BERTScore; SPICE).
    """

    def __init__(
        self,
        decoder: Callable[[int, int], CaptionDecoder] = LSTMDecoder,
        encoder: ImageEncoder | None = None,
        objective: Objective | None = None,
        trainable_encoder_blocks: TrainableBlocks = 0,
        encoder_lr: float | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        warmup_steps: int = 200,
        decoding: DecodingConfig | None = None,
        compile_search: bool = False,
        blind: bool = False,
        init_checkpoint: str | None = None,
        extra_metrics: ExtraMetrics | None = None,
        confidence_threshold: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["decoder", "encoder", "objective", "decoding", "extra_metrics"])
        self.extra_metrics = extra_metrics if extra_metrics is not None else ExtraMetrics()  # how, not the model
        self.decoder_factory = decoder
        self.objective = objective if objective is not None else CrossEntropy()
        self.decoding = decoding or DecodingConfig()
        # Architecture only: pretrained weights are loaded at fit start, or come from a checkpoint.
        self.encoder = encoder if encoder is not None else default_encoder()
        self.encoder.set_trainable(trainable_encoder_blocks)
        decoder_name = config_class(decoder, CaptionDecoder, "decoder").__name__
        check_grid(self.encoder, decoder_features(decoder), decoder_name)  # a decoder that attends needs a grid
        self.decoder: CaptionDecoder | None = None
        self.vocabulary: Any = None  # the tokenizer (captioner.text): a word vocabulary or subwords
        self.scores = CaptionScores()  # BLEU for validation and test, CIDEr-D for validation
        self._test_rows, self._style_rows, self.test_results = [], [], None  # test_results: the report, for TestReport
        self.predict_attention = False  # rows carry where each word looked (set by a writer that draws it)
        self.confidence = ConfidenceCalibration(confidence_threshold, self.extra_metrics.clip_model)

    @property
    def preprocessing(self) -> Preprocessing:
        """How pixels reach the encoder: the encoder's definition, the one its features were extracted with."""
        return self.encoder.preprocessing

    @property
    def sequences(self) -> SequenceSpec:
        """Special tokens, the longest caption and the search's rules, for objectives."""
        return building.sequence_spec(self)

    @property
    def limits(self) -> ModelLimits:
        """What this model can decode, to check decoding settings against before it runs."""
        return building.model_limits(self)

    def build(self, vocabulary: Any) -> None:
        """Create the decoder for `vocabulary` (once), and check the decoding settings against it.

        Raises:
            CaptionerError: When the decoding settings ask for more than the decoder can do.
        """
        if self.decoder is None:
            self.vocabulary = vocabulary
            self.decoder = building.built_decoder(self.decoder_factory, vocabulary, self.encoder)
            self.decoding.checked(self.limits)

    @property
    def data(self) -> CaptionData | None:
        """The datamodule of the run (`captioner.data.CaptionData`: any datamodule with its members works), if any."""
        return self.trainer.datamodule if self._trainer is not None else None

    def require_decoder(self) -> CaptionDecoder:
        if self.decoder is None:
            raise CaptionerError("The model has no vocabulary yet: give it a datamodule or a checkpoint.")
        return self.decoder

    def configure_model(self) -> None:
        if getattr(self.data, "vocabulary", None) is not None:
            building.configure(self, self.data.vocabulary, self.trainer)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.trainer.ckpt_path is None and not self.hparams.init_checkpoint:
            self.encoder.load_pretrained()  # the same weights the feature cache was computed with

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[checkpoints.CAPTIONER_KEY] = checkpoints.meta_of(self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        building.check_and_build(self, checkpoint)

    @classmethod
    def from_checkpoint(cls, path: str, **overrides: Any) -> CaptionModel:
        """A model rebuilt from a checkpoint alone (see `captioner.models.building.model_from_checkpoint`)."""
        return building.model_from_checkpoint(cls, path, **overrides)

    def image_features(self, features: torch.Tensor) -> torch.Tensor:
        """What the decoder sees of the image (zeros for the blind baseline)."""
        return torch.zeros_like(features) if self.hparams.blind else features

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder features of `(B, 3, S, S)` uint8 images, pooled or grid as the decoder reads."""
        grid = self.require_decoder().features == "grid"
        return self.encoder(images.to(self.device, non_blocking=True), grid=grid)

    def batch_features(self, batch: dict) -> torch.Tensor:
        """A batch's image features: read from the cache, or computed from its `images` (a fine-tuned encoder;
        with gradients where the encoder trains)."""
        if "features" in batch:
            return batch["features"]
        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(self.encoder.trainable_blocks)):
            return self.encode_images(batch["images"])

    def on_fit_start(self) -> None:
        has_weights = bool(self.hparams.init_checkpoint) or self.trainer.ckpt_path is not None
        self.objective.start(self.data.references("train"), self.data.train_items, self.sequences.special, has_weights)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        output = self.objective(
            self.require_decoder(), self.image_features(self.batch_features(batch)), batch, self.sequences
        )
        self.log("train/loss", output.loss, prog_bar=True, batch_size=output.batch_size)
        for name, value in output.logs.items():
            self.log(f"train/{name}", value, prog_bar=name == "reward_cider", batch_size=output.batch_size)
        return output.loss

    def _evaluate(self, batch: dict, stage: str, config: DecodingConfig) -> tuple[torch.Tensor, Decoded]:
        """Teacher-forced loss and decoded captions of a validation or test batch, the BLEU updated; returns the
        batch's image features (read or encoded once) and the decoded captions."""
        features, tokens = self.batch_features(batch), batch["tokens"]
        output = self.require_decoder()(self.image_features(features), tokens[:, :-1], owners=batch["owners"])
        loss = caption_cross_entropy(output.logits, tokens[:, 1:], self.vocabulary.pad_index)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=len(tokens), sync_dist=True)
        decoded = captioning.decode_features(self, features, config)
        self.scores.add(stage, self.vocabulary, decoded.best_tokens, batch["references"])
        return features, decoded

    def on_validation_start(self) -> None:
        self.scores.set_val_references(self.data.references("val"))

    def on_validation_epoch_start(self) -> None:
        self.confidence.start_validation()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        features, decoded = self._evaluate(batch, "val", self.decoding.greedy())
        images = batch["index"].tolist()
        self.scores.add_val_cider(self.vocabulary.words_of(decoded.best_tokens), images)
        self.confidence.observe(self, batch, features, decoded, lambda words: self.scores.val_ciders(words, images))

    def on_validation_epoch_end(self) -> None:
        # Every rank holds the same corpus scores (torchmetrics reduces counts and sums); sync_dist only agrees on it.
        self.log_dict(self.scores.validation(), prog_bar=True, sync_dist=True)
        self.confidence.fit()

    def on_test_epoch_start(self) -> None:
        self._test_rows, self._style_rows, self.test_results = [], [], None
        self.confidence.start_test(self.data)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        features, decoded = self._evaluate(batch, "test", self.decoding)
        rows = test_rows(batch, self.vocabulary.decode_batch(decoded.best_tokens))
        self.confidence.annotate(self, batch, features, decoded, rows)
        self._test_rows.extend(rows)
        self._style_rows.extend(captioning.style_test_rows(self, batch, features))  # a model of several styles

    def on_test_epoch_end(self) -> None:
        report, rows, logged = finished_test(
            self._test_rows,
            self.scores.test(),
            self._extra_scores,
            self.confidence.calibrators(),
            self.trainer.strategy.broadcast,
            self.trainer.is_global_zero,
            self._style_rows,
            **building.test_facts(self),
        )
        self.log_dict(logged, sync_dist=True)
        self.test_results = {"report": report, "rows": rows}

    def _extra_scores(self, rows: list[dict]) -> dict:
        return extra_scores_of(self.extra_metrics, rows, self.data, str(self.device), self.confidence.clip)

    def predict_step(self, batch: dict, batch_idx: int) -> list[Prediction]:
        return captioning.prediction_rows(self, batch, self.predict_attention)

    def configure_optimizers(self) -> dict:
        return configured_optimizers(self)
