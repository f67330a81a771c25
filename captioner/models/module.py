"""CaptionModel: a thin LightningModule that orchestrates encoder, decoder, objective, search and metrics.

The decoder and the objective are parts given by the config (see
`captioner.models.decoders.base` and `captioner.models.objectives.base`);
this module builds the decoder once the vocabulary is known, feeds the
objective its batches, decodes with the search functions and updates the
metrics. It implements no loss and writes no file.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule

from captioner.checkpointing import CAPTIONER_KEY, CHECKPOINT_VERSION, check_same_part, read_checkpoint, upgrade
from captioner.data.vocab import Vocabulary
from captioner.encoders.base import ImageEncoder, TrainableBlocks, check_grid, encoder_from_spec
from captioner.encoders.preprocessing import Preprocessing
from captioner.encoders.store import jsonable
from captioner.encoders.torchvision_models import TorchvisionEncoder
from captioner.errors import CaptionerError
from captioner.evaluation import evaluate_captions, loggable, test_report, unique_by_file
from captioner.metrics import CorpusCider, as_percent, bleu_collection
from captioner.models.decoders.base import CaptionDecoder, decoder_factory, decoder_features
from captioner.models.decoders.lstm import LSTMDecoder
from captioner.models.objectives.base import Decoding, Objective
from captioner.models.objectives.cross_entropy import CrossEntropy, caption_cross_entropy
from captioner.models.search import SearchResult, SpecialTokens, beam_search, best_beams, greedy_search
from captioner.parts import config_class

log = logging.getLogger(__name__)

# Frozen encoder parts stay in eval mode on purpose (see ImageEncoder.train).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)

DecoderFactory = Callable[[int, int], CaptionDecoder]


class CaptionModel(LightningModule):
    """Image captioning with an image encoder and a decoder chosen in the config.

    The encoder is part of the module so that a checkpoint alone can caption
    new images offline. Frozen (the default), training reads its features from
    the cache and never runs it; with `trainable_encoder_blocks` it computes
    features from the images and learns with the decoder. The decoder's sizes
    depend on the vocabulary, which comes from the datamodule
    (`configure_model`) or from a checkpoint (`on_load_checkpoint`).

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
        beam_size: Beams for test and predict (validation decodes greedily for speed).
        length_penalty: GNMT length penalty for choosing among beams (0: raw log-probability; > 0 favours
            longer captions).
        max_decode_length: Most words generated per caption (None: the vocabulary's maximum caption length).
        blind: Zero the image features (the blind baseline: what the language prior alone achieves).
        init_checkpoint: Start from the weights of this checkpoint (not its optimizer or epoch): the way
            to begin a second training stage such as self-critical training.
    """

    def __init__(
        self,
        decoder: DecoderFactory = LSTMDecoder,
        encoder: ImageEncoder | None = None,
        objective: Objective | None = None,
        trainable_encoder_blocks: TrainableBlocks = 0,
        encoder_lr: float | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        warmup_steps: int = 200,
        beam_size: int = 3,
        length_penalty: float = 0.0,
        max_decode_length: int | None = None,
        blind: bool = False,
        init_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["decoder", "encoder", "objective"])  # parts are recorded by their own spec
        self.decoder_factory = decoder
        self.objective = objective if objective is not None else CrossEntropy()
        # Architecture only: pretrained weights are loaded at fit start, or come from a checkpoint.
        self.encoder = encoder if encoder is not None else TorchvisionEncoder()
        self.encoder.set_trainable(trainable_encoder_blocks)
        # Before any data is prepared: a decoder that attends needs an encoder with a grid.
        check_grid(self.encoder, decoder_features(decoder), config_class(decoder, CaptionDecoder, "decoder").__name__)
        self.decoder: CaptionDecoder | None = None
        self.vocabulary: Vocabulary | None = None
        self.val_bleu = bleu_collection()
        self.val_cider = CorpusCider()  # CIDEr-D on token ids, document frequencies from the val references
        self.test_bleu = bleu_collection()
        self._test_rows: list[dict] = []
        self.test_results: dict[str, Any] | None = None  # the last test's report and rows, for TestReport

    # ---------------------------------------------------------------- building
    @property
    def preprocessing(self) -> Preprocessing:
        """How pixels reach the encoder: the encoder's definition, the one its features were extracted with."""
        return self.encoder.preprocessing

    @property
    def decoding(self) -> Decoding:
        """Special tokens and the longest caption, for search and objectives."""
        return Decoding(SpecialTokens.of(self.vocabulary), self.hparams.max_decode_length or self.vocabulary.max_length)

    def build(self, vocabulary: Vocabulary) -> None:
        """Create the decoder for `vocabulary` (once)."""
        if self.decoder is not None:
            return
        decoder = self.decoder_factory(len(vocabulary), self.encoder.feature_dim)
        if not isinstance(decoder, CaptionDecoder):
            raise CaptionerError(
                f"--model.decoder built a {type(decoder).__name__}, not a CaptionDecoder: see "
                "captioner/models/decoders/base.py for the protocol."
            )
        decoder.spec()  # fails early, naming the class, if it did not record its options
        self.vocabulary, self.decoder = vocabulary, decoder

    def configure_model(self) -> None:
        vocabulary = getattr(self.trainer.datamodule, "vocabulary", None) if self._trainer is not None else None
        if vocabulary is not None:
            if self.vocabulary is not None and vocabulary != self.vocabulary:
                raise CaptionerError(
                    f"The model's vocabulary ({len(self.vocabulary)} tokens) differs from the data's "
                    f"({len(vocabulary)})."
                )
            self.build(vocabulary)
            if self.hparams.init_checkpoint and self._trainer is not None and self.trainer.ckpt_path is None:
                self._load_initial_weights(self.hparams.init_checkpoint)

    def _load_initial_weights(self, path: str) -> None:
        """Weights (and nothing else) from a checkpoint, checked like any checkpoint."""
        checkpoint = read_checkpoint(path)
        self.on_load_checkpoint(checkpoint)
        self.load_state_dict(checkpoint["state_dict"])
        log.info("Starting from the weights of %s", path)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.trainer.ckpt_path is None and not self.hparams.init_checkpoint:
            self.encoder.load_pretrained()  # the same weights the feature cache was computed with

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_meta(self) -> dict[str, Any]:
        """What captioning with this model needs besides the weights (see `captioner.checkpointing`)."""
        hp = self.hparams
        return {
            "version": CHECKPOINT_VERSION,
            "decoder": self._require_decoder().spec(),
            "encoder": jsonable(self.encoder.spec()),
            "trainable_encoder_blocks": hp.trainable_encoder_blocks,
            "preprocessing": self.preprocessing.to_dict(),
            "vocabulary": self.vocabulary.to_dict(),
            "blind": hp.blind,
            "decoding": {
                "beam_size": hp.beam_size,
                "length_penalty": hp.length_penalty,
                "max_decode_length": hp.max_decode_length,
            },  # fmt: skip
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CAPTIONER_KEY] = self.checkpoint_meta()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = upgrade(checkpoint)
        use = "Use the config the checkpoint was trained with (its run folder holds config.yaml)."
        if meta["blind"] != self.hparams.blind:
            raise CaptionerError(f"The checkpoint was trained with blind={meta['blind']!r} but this run is configured "
                                 f"with blind={self.hparams.blind!r}. {use}")  # fmt: skip
        check_same_part(meta["encoder"], jsonable(self.encoder.spec()), "encoder", use)
        saved_preprocessing = Preprocessing.from_dict(meta["preprocessing"], "the checkpoint")
        if saved_preprocessing != self.preprocessing:
            raise CaptionerError(f"The checkpoint's images were prepared as {saved_preprocessing} but this run is "
                                 f"configured for {self.preprocessing}. {use}")  # fmt: skip
        vocabulary = Vocabulary.from_dict(meta["vocabulary"], "checkpoint")
        if self.vocabulary is not None and vocabulary != self.vocabulary:
            raise CaptionerError(
                f"The checkpoint's vocabulary ({len(vocabulary)} tokens) is not the one prepared from this data "
                f"({len(self.vocabulary)} tokens): it was trained on other data or with other --data.min_word_count / "
                "--data.max_caption_length. Use the data settings the checkpoint was trained with."
            )
        self.build(vocabulary)
        check_same_part(meta["decoder"], self.decoder.spec(), "decoder", use,
                        ignored=getattr(self.decoder, "training_only_options", ()))  # fmt: skip
        self.encoder.mark_weights_loaded()  # the checkpoint's weights replace whatever the encoder would fetch

    @classmethod
    def from_checkpoint(cls, path: str, **overrides: Any) -> CaptionModel:
        """A model rebuilt from a checkpoint alone (its encoder, decoder, vocabulary, preprocessing and weights),
        with no network access.

        Args:
            path: The checkpoint.
            overrides: Decoding options to use instead of the checkpoint's (`beam_size`, `length_penalty`,
                `max_decode_length`).

        Raises:
            CaptionerError: When the file is missing or not a captioner checkpoint, or its encoder or decoder class
                cannot be imported.
        """
        checkpoint = read_checkpoint(path)
        meta = upgrade(checkpoint)
        decoding = {**meta["decoding"], **{k: v for k, v in overrides.items() if v is not None}}
        encoder = encoder_from_spec(meta["encoder"])
        # The definition the weights were trained with, even if the encoder's library now resolves another one.
        encoder.use_preprocessing(Preprocessing.from_dict(meta["preprocessing"], str(path)))
        model = cls(decoder=decoder_factory(meta["decoder"]), encoder=encoder, blind=meta["blind"], **decoding)
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"])
        return model.eval()

    # ---------------------------------------------------------------- decoding
    def _require_decoder(self) -> CaptionDecoder:
        if self.decoder is None:
            raise CaptionerError("The model has no vocabulary yet: give it a datamodule or a checkpoint.")
        return self.decoder

    def image_features(self, features: torch.Tensor) -> torch.Tensor:
        """What the decoder sees of the image (zeros for the blind baseline)."""
        return torch.zeros_like(features) if self.hparams.blind else features

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder features of `(B, 3, S, S)` uint8 images, pooled or grid as the decoder reads."""
        grid = self._require_decoder().features == "grid"
        return self.encoder(images.to(self.device, non_blocking=True), grid=grid)

    def batch_features(self, batch: dict) -> torch.Tensor:
        """A batch's image features: read from the cache, or computed from its `images` (a fine-tuned encoder;
        with gradients where the encoder trains)."""
        if "features" in batch:
            return batch["features"]
        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(self.encoder.trainable_blocks)):
            return self.encode_images(batch["images"])

    def generate(self, features: torch.Tensor, beam_size: int | None = None) -> SearchResult:
        """Decode captions for a batch of features; beam size 1 (or 0) is greedy."""
        decoder, decoding = self._require_decoder(), self.decoding
        beam_size = self.hparams.beam_size if beam_size is None else beam_size
        features = self.image_features(features)
        if beam_size <= 1:
            return greedy_search(decoder, features, decoding.max_length, decoding.special)
        return beam_search(decoder, features, beam_size, decoding.max_length, decoding.special,
                           self.hparams.length_penalty)  # fmt: skip

    @torch.no_grad()
    def caption_images(self, images: torch.Tensor, beam_size: int | None = None) -> tuple[list[str], list[float]]:
        """Captions and their log-probabilities for a `(B, 3, H, W)` uint8 batch of preprocessed images.

        The one inference path: `predict`, the `caption` command, `Captioner` and the server all end here.
        """
        result = self.generate(self.encode_images(images), beam_size)
        return self.vocabulary.decode_batch(result.tokens), result.log_probs.tolist()

    @torch.no_grad()
    def attention_maps(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor):
        """Where the decoder looked for each word of given captions, for decoders that attend over a grid.

        Replaying the chosen words with teacher forcing gives the weights the search used on that path.

        Returns:
            One `(words, grid_h, grid_w)` tensor per caption (its words and the final `<end>`), or None when
            the decoder does not attend or the features are pooled.
        """
        if features.ndim != 3:
            return None
        start = torch.full_like(tokens[:, :1], self.vocabulary.start_index)
        output = self.decoder(self.image_features(features), torch.cat([start, tokens[:, :-1]], dim=1),
                              return_attention=True)  # fmt: skip
        if output.attention is None:
            return None
        rows, columns = self.encoder.grid_shape
        return [w[:n].float().view(-1, rows, columns).cpu() for w, n in zip(output.attention, lengths.tolist())]

    @torch.no_grad()
    def describe_images(self, images: torch.Tensor, beam_size: int | None = None, beams: int = 0) -> list[dict]:
        """Everything inference can tell about a batch of preprocessed images, one dict per image.

        Keys: `caption`, `score` (log-probability), `attention` (per-word maps or None), and with `beams` > 0,
        `beams`: up to that many alternatives `[{"caption", "score"}]`, best first.
        """
        features = self.encode_images(images)
        beam_size = self.hparams.beam_size if beam_size is None else beam_size
        decoding = self.decoding
        if beams and beam_size > 1:
            decoder, penalty = self._require_decoder(), self.hparams.length_penalty
            result, all_beams = best_beams(decoder, self.image_features(features), beam_size, decoding.max_length,
                                           decoding.special, penalty)  # fmt: skip
        else:
            result, all_beams = self.generate(features, beam_size), None
        captions = self.vocabulary.decode_batch(result.tokens)
        maps = self.attention_maps(features, result.tokens, result.lengths)
        rows = []
        for index, (caption, score) in enumerate(zip(captions, result.log_probs.tolist())):
            row = {"caption": caption, "score": score, "attention": maps[index] if maps is not None else None}
            if beams:
                if all_beams is None:
                    row["beams"] = [{"caption": caption, "score": score}]
                else:
                    texts = self.vocabulary.decode_batch(all_beams.tokens[index])
                    scores = all_beams.log_probs[index].tolist()
                    row["beams"] = [{"caption": t, "score": v} for t, v in zip(texts, scores)][:beams]
            rows.append(row)
        return rows

    # ---------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        if self.objective.needs_initial_weights and not self.hparams.init_checkpoint and self.trainer.ckpt_path is None:
            raise CaptionerError(
                f"{type(self.objective).__name__} is a second training stage: start it from a cross-entropy model "
                "with --model.init_checkpoint path/to/best.ckpt."
            )
        train = self.trainer.datamodule.datasets["train"]
        if self.objective.train_items == "images" and not hasattr(train, "reference_ids"):
            raise CaptionerError(
                f"{type(self.objective).__name__} trains on whole images: set --data.train_items images "
                "(the config link does this from --model.objective)."
            )
        self.objective.prepare(getattr(train, "reference_ids", []), self.decoding.special)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        features = self.image_features(self.batch_features(batch))
        output = self.objective(self._require_decoder(), features, batch, self.decoding)
        self.log("train/loss", output.loss, prog_bar=True, batch_size=output.batch_size)
        for name, value in output.logs.items():
            self.log(f"train/{name}", value, prog_bar=name == "reward_cider", batch_size=output.batch_size)
        return output.loss

    # ---------------------------------------------------------------- evaluation
    def _evaluate(self, batch: dict, stage: str, beam_size: int) -> SearchResult:
        raw_features = self.batch_features(batch)
        tokens = batch["tokens"]
        output = self._require_decoder()(self.image_features(raw_features), tokens[:, :-1], owners=batch["owners"])
        loss = caption_cross_entropy(output.logits, tokens[:, 1:], self.vocabulary.pad_index)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=len(tokens), sync_dist=True)
        result = self.generate(raw_features, beam_size)
        metric = self.val_bleu if stage == "val" else self.test_bleu
        metric.update(self.vocabulary.decode_batch(result.tokens), batch["references"])
        return result

    def on_validation_start(self) -> None:
        if self.val_cider.scorer is None:  # the validation references are fixed for the whole run
            self.val_cider.set_references(self.trainer.datamodule.datasets["val"].reference_ids)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        result = self._evaluate(batch, "val", beam_size=1)
        self.val_cider.update(self.vocabulary.words_of(result.tokens), batch["index"].tolist())

    def on_validation_epoch_end(self) -> None:
        # Every rank holds the same corpus scores (torchmetrics reduces counts and sums); sync_dist only agrees on it.
        scores = {f"val/{name}": value for name, value in as_percent(self.val_bleu.compute()).items()}
        scores["val/cider"] = float(self.val_cider.compute())
        self.log_dict(scores, prog_bar=True, sync_dist=True)
        self.val_bleu.reset()
        self.val_cider.reset()

    def on_test_epoch_start(self) -> None:
        self._test_rows, self.test_results = [], None

    def test_step(self, batch: dict, batch_idx: int) -> None:
        captions = self.vocabulary.decode_batch(self._evaluate(batch, "test", self.hparams.beam_size).tokens)
        self._test_rows.extend(  # raw references: the COCO evaluation tokenises them itself
            {"file_name": name, "image_id": image_id, "caption": caption, "references": refs}
            for name, image_id, caption, refs in zip(batch["file_names"], batch["image_ids"], captions,
                                                     batch["raw_references"])
        )  # fmt: skip

    def on_test_epoch_end(self) -> None:
        bleu = as_percent(self.test_bleu.compute())
        self.test_bleu.reset()
        rows = unique_by_file(self._gather(self._test_rows))
        evaluation = evaluate_captions(rows) if self.trainer.is_global_zero else None
        evaluation = self.trainer.strategy.broadcast(evaluation)
        self.log_dict({f"test/{name}": value for name, value in bleu.items()}, sync_dist=True)
        self.log_dict(loggable(evaluation), sync_dist=True)
        decoding = {"beam_size": self.hparams.beam_size, "length_penalty": self.hparams.length_penalty,
                    "max_length": self.decoding.max_length}  # fmt: skip
        report = test_report(bleu, evaluation, decoding, checkpoint=self.trainer.ckpt_path,
                             split_sizes=getattr(self.trainer.datamodule, "split_sizes", {}),
                             blind=self.hparams.blind)  # fmt: skip
        self.test_results = {"report": report, "rows": rows}

    def _gather(self, rows: list[dict]) -> list[dict]:
        """Every rank's rows on every rank (one Python object per rank)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return rows
        gathered: list[list[dict]] = [[] for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather_object(gathered, rows)
        return [row for part in gathered for row in part]

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        rows = [
            {"path": path, "caption": None, "score": None, "error": batch["errors"].get(position)}
            for position, path in zip(batch["positions"], batch["paths"])
        ]
        if batch["ok"]:
            described = self.describe_images(batch["images"])
            row_of = {position: i for i, position in enumerate(batch["positions"])}
            for position, result in zip(batch["ok"], described):
                rows[row_of[position]].update(caption=result["caption"], score=result["score"])
                if result["attention"] is not None:  # for CaptionWriter's attention pictures, not the tables
                    rows[row_of[position]]["attention"] = result["attention"]
        return rows

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        hp = self.hparams
        decoder = self._require_decoder()
        # A fused AdamW unscales gradients inside its step, so Lightning's mixed-precision plugins refuse to clip
        # gradients for it: fused only when nothing is clipped (the foreach kernels are nearly as fast).
        fused = not self.trainer.gradient_clip_val
        groups = [{"params": list(decoder.parameters()), "lr": hp.lr}]
        encoder_parameters = self.encoder.trainable_parameters()
        if encoder_parameters:  # a fine-tuned encoder learns more gently than the decoder it feeds
            groups.append({"params": encoder_parameters, "lr": hp.encoder_lr or hp.lr / 10})
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay, fused=fused)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(hp.warmup_steps, total // 2)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if hp.lr_schedule == "constant":
                return 1.0
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
