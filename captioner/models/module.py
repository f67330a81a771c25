"""CaptionModel: a thin LightningModule that trains and evaluates an encoder, a decoder and an objective (parts
from the config). It builds the decoder once the vocabulary is known, feeds the objective its batches and updates
the metrics; decoding is `captioner.decoding`, inference `captioner.models.captioning`, checkpoint compatibility
`captioner.models.checkpoints` (older ones: `captioner.compat`). It implements no loss, no search and writes no file."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule

from captioner.compat.names import moved
from captioner.core.errors import CaptionerError
from captioner.core.parts import config_class
from captioner.data.contract import CaptionData
from captioner.decoding.answers import Prediction
from captioner.decoding.confidence import Calibrator, with_clip
from captioner.decoding.config import DecodingConfig, ModelLimits, SpecialTokens
from captioner.decoding.decoded import Decoded
from captioner.decoding.rules import rules_for
from captioner.encoders.base import ImageEncoder, TrainableBlocks, check_grid
from captioner.encoders.preprocessing import Preprocessing
from captioner.encoders.torchvision_models import default_encoder
from captioner.evaluation.beyond import ExtraMetrics, confidence_report, extra_scores, loggable_extra
from captioner.evaluation.clip_confidence import ClipCosines
from captioner.evaluation.metrics import CorpusCider, as_percent, bleu_collection
from captioner.evaluation.report import evaluate_captions, gathered, loggable, test_report, unique_by_file
from captioner.models import building, captioning, checkpoints
from captioner.models.decoders.base import CaptionDecoder, decoder_features
from captioner.models.decoders.lstm import LSTMDecoder
from captioner.models.objectives.base import Objective, SequenceSpec
from captioner.models.objectives.cross_entropy import CrossEntropy, caption_cross_entropy
from captioner.models.optimisation import optimizer_and_schedule
from captioner.text.words import normalize

log = logging.getLogger("captioner")
# Frozen encoder parts stay in eval mode on purpose (see ImageEncoder.train).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)


class CaptionModel(LightningModule):
    """Image captioning with an image encoder and a decoder chosen in the config.

    The encoder is part of the module so that a checkpoint alone captions offline. Frozen (the default), training
    reads its cached features; with `trainable_encoder_blocks` it encodes the images and learns with the decoder.
    The decoder's sizes come from the vocabulary: the datamodule's (`configure_model`) or a checkpoint's.

    Args:
        decoder: A callable `(vocab_size, feature_dim) -> CaptionDecoder`: in YAML, a `class_path` with its
            `init_args` (`captioner.models.decoders.LSTMDecoder`, `AttentionDecoder`, `TransformerDecoder`,
            or your own). Sets `data.features` to what the decoder reads.
        encoder: The image encoder (`captioner.encoders.TorchvisionEncoder`, `TimmEncoder`, `OpenClipEncoder`,
            `HuggingFaceEncoder`, or your own; default: an ImageNet ResNet50). The data side extracts features with
            this same instance.
        objective: The training objective (default: cross-entropy): `captioner.models.objectives.CrossEntropy`
            or `SelfCritical`, or your own. Sets `data.train_items` to what it trains on.
        trainable_encoder_blocks: Fine-tune the encoder's last this many blocks ("all": the whole encoder; 0: frozen,
            features cached once). Anything but 0 makes the data side deliver images (`data.online_features`).
        encoder_lr: Peak learning rate of the trained encoder blocks (None: `lr` / 10).
        lr: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        lr_schedule: "cosine" (linear warm-up, cosine decay to zero over the run) or "constant" (warm-up only).
        warmup_steps: Optimizer steps of linear warm-up.
        decoding: How `test` and `predict` decode (`captioner.decoding.DecodingConfig`: num_beams, num_return,
            length_penalty, max_length, rules, sampling); validation decodes greedily with the same rules.
        compile_search: `test` and `predict` step the decoder through `torch.compile` (CUDA graphs on a GPU).
        blind: Zero the image features (the blind baseline: what the language prior alone achieves).
        init_checkpoint: Start from the weights of this checkpoint (not its optimizer or epoch): the way
            to begin a second training stage such as self-critical training.
        confidence_threshold: The CIDEr-D (x 100) at or above which a validation caption counts as good when the
            confidence calibrator is fitted (null: the validation captions' median; see
            `captioner.decoding.confidence`).
        extra_metrics: What `test` measures beyond the COCO metrics (`captioner.evaluation.beyond.ExtraMetrics`:
            CHAIR where objects are known, on by default; CLIPScore with `clip_model`; BERTScore; SPICE).
        beam_size, length_penalty, max_decode_length: The 0.2 names of `decoding.num_beams`,
            `decoding.length_penalty` and `decoding.max_length` (they still work, with a deprecation line).
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
        beam_size: int | None = None,
        length_penalty: float | None = None,
        max_decode_length: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["decoder", "encoder", "objective", "decoding", "beam_size",
                                          "length_penalty", "max_decode_length", "extra_metrics"])  # fmt: skip
        self.extra_metrics = extra_metrics if extra_metrics is not None else ExtraMetrics()  # how, not the model
        self.decoder_factory = decoder
        self.objective = objective if objective is not None else CrossEntropy()
        self.decoding = (decoding or DecodingConfig()).with_overrides(  # the 0.2 options, each with a note
            beam_size=beam_size, max_decode_length=max_decode_length, **moved("length_penalty", length_penalty)
        )
        # Architecture only: pretrained weights are loaded at fit start, or come from a checkpoint.
        self.encoder = encoder if encoder is not None else default_encoder()
        self.encoder.set_trainable(trainable_encoder_blocks)
        # Before any data is prepared: a decoder that attends needs an encoder with a grid.
        check_grid(self.encoder, decoder_features(decoder), config_class(decoder, CaptionDecoder, "decoder").__name__)
        self.decoder: CaptionDecoder | None = None
        self.vocabulary: Any = None  # the tokenizer (captioner.text): a word vocabulary or subwords
        self.val_bleu, self.test_bleu = bleu_collection(), bleu_collection()
        self.val_cider = CorpusCider()  # CIDEr-D on token ids, document frequencies from the val references
        self._test_rows: list[dict] = []
        self.test_results: dict[str, Any] | None = None  # the last test's report and rows, for TestReport
        # `predict` rows carry where each word looked (a writer that draws it sets this: CaptionWriter).
        self.predict_attention = False
        # The confidence calibrator: fitted at every validation on its captions, saved with the checkpoint.
        self.calibrator: Calibrator | None = None
        # With a CLIP configured (extra_metrics.clip_model), a second one with the caption's CLIP cosine as well.
        self.clip_calibrator: Calibrator | None = None
        self._clip: ClipCosines | None = None
        self._clip_loaded = False
        self._calibration: list[tuple[list[float], float, float | None]] = []

    # ---------------------------------------------------------------- building
    @property
    def preprocessing(self) -> Preprocessing:
        """How pixels reach the encoder: the encoder's definition, the one its features were extracted with."""
        return self.encoder.preprocessing

    @property
    def sequences(self) -> SequenceSpec:
        """Special tokens and the longest caption, for objectives."""
        special = SpecialTokens.of(self.vocabulary)
        max_words = self.decoding.max_words(self.vocabulary.max_length)
        return SequenceSpec(special, max_words, rules_for(self.decoding, special, self.vocabulary, max_words))

    @property
    def limits(self) -> ModelLimits:
        """What this model can decode, to check decoding settings against before it runs."""
        decoder = self.require_decoder()
        return ModelLimits(len(self.vocabulary), self.vocabulary.max_length, decoder.longest_caption(),
                           type(decoder).__name__, self.vocabulary.stoi, self.vocabulary)  # fmt: skip

    def build(self, vocabulary: Any) -> None:
        """Create the decoder for `vocabulary` (once), and check the decoding settings against it.

        Raises:
            CaptionerError: When the decoding settings ask for more than the decoder can do.
        """
        if self.decoder is None:
            self.vocabulary, self.decoder = vocabulary, building.built_decoder(self.decoder_factory, vocabulary,
                                                                                    self.encoder)  # fmt: skip
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
        vocabulary = getattr(self.data, "vocabulary", None)
        if vocabulary is None:
            return
        if self.vocabulary is not None and vocabulary != self.vocabulary:
            raise CaptionerError(f"The model's vocabulary ({len(self.vocabulary)} tokens) differs from the data's "
                                 f"({len(vocabulary)}).")  # fmt: skip
        self.build(vocabulary)
        if self.hparams.init_checkpoint and self.trainer.ckpt_path is None:
            building.load_weights(self, self.hparams.init_checkpoint)
        elif self.trainer.state.fn == "fit" and self.trainer.ckpt_path is None:
            self.decoder.load_pretrained()  # a pretrained language model's weights, fetched once

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

    # ---------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        has_weights = bool(self.hparams.init_checkpoint) or self.trainer.ckpt_path is not None
        data = self.data
        self.objective.start(data.references("train"), data.train_items, self.sequences.special, has_weights)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        output = self.objective(self.require_decoder(), self.image_features(self.batch_features(batch)), batch,
                                self.sequences)  # fmt: skip
        self.log("train/loss", output.loss, prog_bar=True, batch_size=output.batch_size)
        for name, value in output.logs.items():
            self.log(f"train/{name}", value, prog_bar=name == "reward_cider", batch_size=output.batch_size)
        return output.loss

    # ---------------------------------------------------------------- evaluation
    def _evaluate(self, batch: dict, stage: str, config: DecodingConfig) -> tuple[torch.Tensor, Decoded]:
        """Teacher-forced loss and decoded captions of a validation or test batch; returns the batch's image features
        (read or encoded once) and the decoded captions (a test batch's confidence features kept in `_features` when
        there is a calibrator)."""
        features, tokens = self.batch_features(batch), batch["tokens"]
        output = self.require_decoder()(self.image_features(features), tokens[:, :-1], owners=batch["owners"])
        loss = caption_cross_entropy(output.logits, tokens[:, 1:], self.vocabulary.pad_index)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=len(tokens), sync_dist=True)
        decoded = captioning.decode_features(self, features, config)
        best = decoded.best_tokens
        if stage == "test" and self.calibrator is not None:  # to measure the confidence
            self._features = captioning.confidence_features(self, features, decoded, config)
        hypotheses = [" ".join(normalize(text)) for text in self.vocabulary.decode_batch(best)]  # as the references
        (self.val_bleu if stage == "val" else self.test_bleu).update(hypotheses, batch["references"])
        return features, decoded

    def on_validation_start(self) -> None:
        if self.val_cider.scorer is None:  # the validation references are fixed for the whole run
            self.val_cider.set_references(self.data.references("val"))

    def on_validation_epoch_start(self) -> None:
        self._calibration = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        greedy = self.decoding.greedy()
        features, decoded = self._evaluate(batch, "val", greedy)
        words = self.vocabulary.words_of(decoded.best_tokens)
        images = batch["index"].tolist()
        self.val_cider.update(words, images)
        # The calibrator learns from the captions the model gives where it is used (its own decoding: beam search in
        # the shipped configs), not from validation's greedy ones: a beam's captions are likelier, and a calibrator
        # fitted on greedy captions was over-confident on them.
        if self.decoding != greedy:
            decoded = captioning.decode_features(self, features, self.decoding)
            words = self.vocabulary.words_of(decoded.best_tokens)
        ciders = [100 * self.val_cider.scorer.score_vectors(w, self.val_cider.reference_vectors[i])
                  for w, i in zip(words, images)]  # fmt: skip
        confidence = captioning.confidence_features(self, features, decoded, self.decoding)
        cosines = self._clip_cosines(batch, decoded)
        self._calibration.extend(zip(confidence.tolist(), ciders,
                                     cosines.tolist() if cosines is not None else [None] * len(ciders)))  # fmt: skip

    def on_validation_epoch_end(self) -> None:
        # Every rank holds the same corpus scores (torchmetrics reduces counts and sums); sync_dist only agrees on it.
        scores = {f"val/{name}": value for name, value in as_percent(self.val_bleu.compute()).items()}
        scores["val/cider"] = float(self.val_cider.compute())
        self.log_dict(scores, prog_bar=True, sync_dist=True)
        self.val_bleu.reset()
        self.val_cider.reset()
        self._fit_calibrator(gathered(self._calibration))

    def _clip_cosines(self, batch: dict, decoded: Decoded) -> np.ndarray | None:
        """The best captions' CLIP cosines with their images (`captioner.evaluation.clip_confidence`), when a CLIP is
        configured, loads, and every image of the batch is a file (None otherwise)."""
        if not self.extra_metrics.clip_model or self.data is None:
            return None
        image_file = getattr(self.data, "image_file", lambda name: None)
        files = [image_file(name) for name in batch["file_names"]]
        if any(path is None for path in files):
            return None
        if not self._clip_loaded:  # once: a CLIP that cannot load is said once, and training goes on without it
            self._clip_loaded = True
            # OpenCLIP builds random weights before reading its own: training's random stream is kept as it was.
            with torch.random.fork_rng(devices=[]):
                self._clip = ClipCosines.load(self.extra_metrics.clip_model, self.preprocessing, self.device)
        if self._clip is None:
            return None
        return self._clip(files, self.vocabulary.decode_batch(decoded.best_tokens))

    def _fit_calibrator(self, rows: list[tuple[list[float], float, float | None]]) -> None:
        """The confidence calibrators on this validation's captions (every rank fits the same on the same rows): on
        three features, and with every caption's CLIP cosine known, on four."""
        if len(rows) < 8:
            return
        features, ciders = np.array([row[0] for row in rows]), np.array([row[1] for row in rows])
        threshold = self.hparams.confidence_threshold
        threshold = float(np.median(ciders)) if threshold is None else float(threshold)
        good = ciders >= threshold
        if good.all() or not good.any():
            log.info("Confidence calibrator not fitted: every validation caption is on one side of CIDEr-D %.1f.",
                     threshold)  # fmt: skip
            return
        self.calibrator = Calibrator.fit(features, good, threshold)
        if all(row[2] is not None for row in rows):
            cosines = np.array([row[2] for row in rows])
            self.clip_calibrator = Calibrator.fit(with_clip(features, cosines), good, threshold,
                                                  clip_model=self.extra_metrics.clip_model)  # fmt: skip

    def on_test_epoch_start(self) -> None:
        self._test_rows, self.test_results = [], None
        references = self.data.references("test") if self.calibrator is not None and self.data is not None else None
        self._test_cider = CorpusCider()  # each caption's CIDEr-D, to measure the confidence against
        if references:
            self._test_cider.set_references(references)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        _, decoded = self._evaluate(batch, "test", self.decoding)
        best = decoded.best_tokens
        captions = self.vocabulary.decode_batch(best)
        rows = [{"file_name": name, "image_id": image_id, "caption": caption, "references": refs}
                for name, image_id, caption, refs in zip(batch["file_names"], batch["image_ids"], captions,
                                                         batch["raw_references"])]  # fmt: skip
        if self.calibrator is not None and self._test_cider.scorer is not None:
            confidences = self.calibrator(self._features)
            cosines = self._clip_cosines(batch, decoded) if self.clip_calibrator is not None else None
            with_cosines = (self.clip_calibrator(with_clip(self._features, cosines)) if cosines is not None
                            else [None] * len(rows))  # fmt: skip
            for row, words, image, confidence, clip_confidence, features in zip(
                    rows, self.vocabulary.words_of(best), batch["index"].tolist(), confidences, with_cosines,
                    self._features):  # fmt: skip
                row["confidence"] = round(float(confidence), 4)
                row["token_probability"] = round(float(np.exp(features[0])), 4)  # the uncalibrated stand-in
                if clip_confidence is not None:
                    row["confidence_clip"] = round(float(clip_confidence), 4)
                vectors = self._test_cider.reference_vectors[image]
                row["cider_d"] = round(100 * self._test_cider.scorer.score_vectors(words, vectors), 3)
        self._test_rows.extend(rows)  # raw references: the COCO evaluation tokenises them itself

    def on_test_epoch_end(self) -> None:
        bleu = as_percent(self.test_bleu.compute())
        self.test_bleu.reset()
        rows = unique_by_file(gathered(self._test_rows))
        evaluation = self.trainer.strategy.broadcast(evaluate_captions(rows) if self.trainer.is_global_zero else None)
        extra = self.trainer.strategy.broadcast(self._extra_scores(rows) if self.trainer.is_global_zero else None)
        if self.calibrator is not None and rows and "confidence" in rows[0]:
            extra["confidence"] = confidence_report(rows, self.calibrator)
        if self.clip_calibrator is not None and rows and all("confidence_clip" in row for row in rows):
            extra["confidence_clip"] = confidence_report(rows, self.clip_calibrator, key="confidence_clip")
        self.log_dict(loggable_extra(extra), sync_dist=True)
        self.log_dict({f"test/{name}": value for name, value in bleu.items()}, sync_dist=True)
        self.log_dict(loggable(evaluation), sync_dist=True)
        decoding = {**self.decoding.to_dict(), "max_length": self.sequences.max_length}
        report = test_report(bleu, evaluation, decoding, checkpoint=self.trainer.ckpt_path,
                             split_sizes=getattr(self.data, "split_sizes", {}),
                             blind=self.hparams.blind, extra=extra)  # fmt: skip
        self.test_results = {"report": report, "rows": rows}

    def _extra_scores(self, rows: list[dict]) -> dict:
        """CHAIR, CLIPScore, ... as `extra_metrics` asks, where the data can give what they need."""
        data = self.data
        captions = {row["file_name"]: row["caption"] for row in rows}
        references = {row["file_name"]: row["references"] for row in rows}
        image_file = getattr(data, "image_file", lambda name: None)
        objects_file = data.objects_file() if hasattr(data, "objects_file") else None
        return extra_scores(self.extra_metrics, captions, references, image_file, objects_file, str(self.device),
                            self._clip.clip if self._clip is not None else None)  # the confidence's CLIP, if loaded

    def predict_step(self, batch: dict, batch_idx: int) -> list[Prediction]:
        return captioning.prediction_rows(self, batch, self.predict_attention)

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        hp = self.hparams
        return optimizer_and_schedule(self.require_decoder(), self.encoder.trainable_parameters(), hp.lr,
                                      hp.encoder_lr, hp.weight_decay, hp.warmup_steps,
                                      int(self.trainer.estimated_stepping_batches), hp.lr_schedule,
                                      clipping=bool(self.trainer.gradient_clip_val))  # fmt: skip
