"""CaptionModel: a thin LightningModule over the encoder, decoder, search and metrics."""

from __future__ import annotations

import inspect
import logging
import math
import warnings
from typing import Literal

import torch
from lightning.pytorch import LightningModule

from captioner.cider import CiderD
from captioner.data.preprocessing import Preprocessing
from captioner.data.vocab import Vocabulary
from captioner.errors import CaptionerError
from captioner.evaluation import evaluate_captions, format_table, loggable, unique_by_file
from captioner.files import write_json
from captioner.metrics import as_percent, bleu_collection
from captioner.models.decoder import AttentionDecoder, CaptionDecoder, caption_loss, doubly_stochastic_penalty
from captioner.models.encoder import ImageEncoder
from captioner.models.search import SearchResult, SpecialTokens, beam_search, greedy_search, sample_captions
from captioner.runs import run_dir, write_jsonl

log = logging.getLogger(__name__)

# The frozen encoder stays in eval mode on purpose (see ImageEncoder.train).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)

# Hyperparameters a checkpoint's weights depend on: a config that differs in any is refused.
ARCHITECTURE_KEYS = (
    "backbone", "weights", "image_size", "decoder", "embed_dim", "hidden_dim", "num_layers", "attention_dim", "blind",
)  # fmt: skip


class CaptionModel(LightningModule):
    """Image captioning with a frozen CNN encoder and an LSTM decoder.

    The encoder is part of the module so that a checkpoint alone can caption
    new images offline; training itself reads cached features and never runs
    it. The decoder's size depends on the vocabulary, which comes from the
    datamodule (`configure_model`) or from a checkpoint (`on_load_checkpoint`).

    Args:
        backbone: Encoder backbone (linked from `data.backbone`).
        weights: Encoder weights name or None (linked from `data.weights`).
        image_size: Encoder input size (linked from `data.image_size`).
        decoder: "lstm" (the pooled image feature sets the LSTM's initial state) or "attention" (Show,
            Attend and Tell soft attention over the grid of image regions; sets `data.features` to "grid").
        embed_dim: Word embedding size.
        hidden_dim: LSTM state size.
        num_layers: LSTM layers (the attention decoder has one).
        attention_dim: Size of the attention layer.
        attention_regularization: Weight of the doubly stochastic attention penalty.
        dropout: Decoder dropout.
        lr: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        lr_schedule: "cosine" (linear warm-up, cosine decay to zero over the run) or "constant" (warm-up only).
        warmup_steps: Optimizer steps of linear warm-up.
        beam_size: Beams for test and predict (validation decodes greedily for speed).
        length_penalty: GNMT length penalty for choosing among beams (0: raw log-probability).
        max_decode_length: Most words generated per caption (None: the vocabulary's maximum caption length).
        blind: Zero the image features (the blind baseline: what the language prior alone achieves).
        scst: Self-critical sequence training (Rennie et al. 2017): reward sampled captions with CIDEr-D
            (document frequencies from the training split), baseline each with the greedy caption's reward.
            A second stage: start it from a cross-entropy model with `init_checkpoint`. Sets
            `data.train_items` to "images" (one item per image with all its references).
        scst_samples: Captions sampled per image per step in self-critical training.
        init_checkpoint: Start from the weights of this checkpoint (not its optimizer or epoch): the way
            to begin a second training stage such as SCST.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        weights: str | None = "IMAGENET1K_V2",
        image_size: int = 224,
        decoder: Literal["lstm", "attention"] = "lstm",
        embed_dim: int = 256,
        hidden_dim: int = 512,
        num_layers: int = 1,
        attention_dim: int = 256,
        attention_regularization: float = 1.0,
        dropout: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        warmup_steps: int = 200,
        beam_size: int = 3,
        length_penalty: float = 0.0,
        max_decode_length: int | None = None,
        blind: bool = False,
        scst: bool = False,
        scst_samples: int = 5,
        init_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # Architecture only: pretrained weights are loaded at fit start, or come from a checkpoint.
        self.encoder = ImageEncoder(backbone, weights, pretrained=False)
        self.decoder: CaptionDecoder | AttentionDecoder | None = None
        self.vocabulary: Vocabulary | None = None
        self.val_bleu = bleu_collection()
        self.test_bleu = bleu_collection()
        self._test_rows: list[dict] = []
        self._cider: CiderD | None = None

    # ---------------------------------------------------------------- building
    def build(self, vocabulary: Vocabulary) -> None:
        """Create the decoder for `vocabulary` (once)."""
        if self.decoder is not None:
            return
        hp = self.hparams
        self.vocabulary = vocabulary
        self.special = SpecialTokens.of(vocabulary)
        if hp.decoder == "attention":
            self.decoder = AttentionDecoder(len(vocabulary), self.encoder.feature_dim, hp.embed_dim, hp.hidden_dim,
                                            hp.attention_dim, hp.dropout, vocabulary.pad_index)  # fmt: skip
        else:
            self.decoder = CaptionDecoder(len(vocabulary), self.encoder.feature_dim, hp.embed_dim, hp.hidden_dim,
                                          hp.num_layers, hp.dropout, vocabulary.pad_index)  # fmt: skip

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
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError) as error:
            raise CaptionerError(f"--model.init_checkpoint {path} cannot be read ({error}).") from error
        self.on_load_checkpoint(checkpoint)
        self.load_state_dict(checkpoint["state_dict"])
        log.info("Starting from the weights of %s", path)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.trainer.ckpt_path is None:
            self.encoder.load_pretrained()  # the same weights the feature cache was computed with

    @property
    def preprocessing(self) -> Preprocessing:
        """How pixels reach the encoder: the definition the features were extracted with, kept in checkpoints."""
        return Preprocessing(self.hparams.image_size)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vocabulary"] = self.vocabulary.to_dict()
        checkpoint["preprocessing"] = self.preprocessing.to_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "vocabulary" not in checkpoint or "hyper_parameters" not in checkpoint:
            raise CaptionerError("This checkpoint was not written by captioner (it has no vocabulary).")
        saved = checkpoint["hyper_parameters"]
        defaults = inspect.signature(CaptionModel.__init__).parameters  # keys older checkpoints lack
        for key in ARCHITECTURE_KEYS:
            if saved.get(key, defaults[key].default) != self.hparams[key]:
                raise CaptionerError(
                    f"The checkpoint was trained with {key}={saved.get(key)!r} but this run is configured with "
                    f"{key}={self.hparams[key]!r}. Use the config the checkpoint was trained with "
                    "(its run folder holds config.yaml)."
                )
        if "preprocessing" in checkpoint:  # older checkpoints were all made with today's definition
            saved_preprocessing = Preprocessing.from_dict(checkpoint["preprocessing"], "the checkpoint")
            if saved_preprocessing != self.preprocessing:
                raise CaptionerError(
                    f"The checkpoint's images were prepared as {saved_preprocessing} but this run is configured "
                    f"for {self.preprocessing}. Use the config the checkpoint was trained with."
                )
        vocabulary = Vocabulary.from_dict(checkpoint["vocabulary"], "checkpoint")
        if self.vocabulary is not None and vocabulary != self.vocabulary:
            raise CaptionerError(
                f"The checkpoint's vocabulary ({len(vocabulary)} tokens) is not the one prepared from this data "
                f"({len(self.vocabulary)} tokens): it was trained on other data or with other --data.min_word_count / "
                "--data.max_caption_length. Use the data settings the checkpoint was trained with."
            )
        self.build(vocabulary)

    # ---------------------------------------------------------------- steps
    def _require_decoder(self) -> CaptionDecoder:
        if self.decoder is None:
            raise CaptionerError("The model has no vocabulary yet: give it a datamodule or a checkpoint.")
        return self.decoder

    def image_features(self, features: torch.Tensor) -> torch.Tensor:
        """What the decoder sees of the image (zeros for the blind baseline)."""
        return torch.zeros_like(features) if self.hparams.blind else features

    def teacher_forced_loss(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Masked cross-entropy of predicting each caption token from the previous ones."""
        decoder, inputs, targets = self._require_decoder(), tokens[:, :-1], tokens[:, 1:]
        if isinstance(decoder, AttentionDecoder):
            logits, weights = decoder(self.image_features(features), inputs, return_attention=True)
            penalty = doubly_stochastic_penalty(weights, targets != self.vocabulary.pad_index)
            loss = caption_loss(logits, targets, self.vocabulary.pad_index)
            return loss + self.hparams.attention_regularization * penalty
        logits = decoder(self.image_features(features), inputs)
        return caption_loss(logits, targets, self.vocabulary.pad_index)

    def generate(self, features: torch.Tensor, beam_size: int | None = None) -> SearchResult:
        """Decode captions for `(B, D)` features; beam size 1 (or 0) is greedy."""
        decoder, beam_size = self._require_decoder(), self.hparams.beam_size if beam_size is None else beam_size
        features = self.image_features(features)
        max_length = self.hparams.max_decode_length or self.vocabulary.max_length
        if beam_size <= 1:
            return greedy_search(decoder, features, max_length, self.special)
        return beam_search(decoder, features, beam_size, max_length, self.special, self.hparams.length_penalty)

    @torch.no_grad()
    def caption_images(self, images: torch.Tensor, beam_size: int | None = None) -> tuple[list[str], list[float]]:
        """Captions and their log-probabilities for a `(B, 3, H, W)` uint8 batch of resized images.

        The one inference path: `predict`, the `caption` command and `Captioner` all end here.
        """
        captions, scores, _ = self.caption_images_with_attention(images, beam_size)
        return captions, scores

    @torch.no_grad()
    def caption_images_with_attention(
        self, images: torch.Tensor, beam_size: int | None = None
    ) -> tuple[list[str], list[float], list[torch.Tensor] | None]:
        """Like `caption_images`, plus, for the attention decoder, where it looked for each word.

        Returns:
            Captions, log-probabilities and (attention decoder only, else None) one
            `(words, grid_h, grid_w)` tensor of attention weights per image, for the
            words of its caption and the final `<end>`.
        """
        attention = self.hparams.decoder == "attention"
        features = self.encoder(images.to(self.device, non_blocking=True), grid=attention)
        result = self.generate(features, beam_size)
        captions = self.vocabulary.decode_batch(result.tokens)
        if not attention:
            return captions, result.log_probs.tolist(), None
        # Replaying the chosen words with teacher forcing gives exactly the weights the search used on that path.
        start = torch.full_like(result.tokens[:, :1], self.vocabulary.start_index)
        inputs = torch.cat([start, result.tokens[:, :-1]], dim=1)
        _, weights = self.decoder(self.image_features(features), inputs, return_attention=True)
        side = round(weights.shape[-1] ** 0.5)
        maps = [w[:length].float().view(-1, side, side).cpu() for w, length in zip(weights, result.lengths.tolist())]
        return captions, result.log_probs.tolist(), maps

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self.hparams.scst:
            return self.self_critical_step(batch)
        features, tokens = batch
        loss = self.teacher_forced_loss(features, tokens)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(tokens))
        return loss

    def on_fit_start(self) -> None:
        if self.hparams.scst:
            if not self.hparams.init_checkpoint and self.trainer.ckpt_path is None:
                raise CaptionerError(
                    "Self-critical training is a second stage: start it from a cross-entropy model with "
                    "--model.init_checkpoint path/to/best.ckpt."
                )
            train = self.trainer.datamodule.datasets["train"]
            if not hasattr(train, "references"):
                raise CaptionerError("SCST needs one training item per image: set --data.train_items images.")
            # Document frequencies from the training split only.
            self._cider = CiderD([[self._word_ids(ref) for ref in refs] for refs in train.references])

    def _word_ids(self, caption) -> list[int]:
        """A caption (text, or ids with specials) as word ids without `<start>`, `<end>` and `<pad>`."""
        ids = self.vocabulary.encode(caption)[1:-1] if isinstance(caption, str) else caption
        words = []
        for token in ids:
            if token == self.vocabulary.end_index:
                break
            if token not in (self.vocabulary.start_index, self.vocabulary.pad_index):
                words.append(int(token))
        return words

    def self_critical_step(self, batch: dict) -> torch.Tensor:
        """Policy gradient with reward CIDEr-D(sample) - CIDEr-D(greedy) for `scst_samples` samples per image."""
        k, decoder = self.hparams.scst_samples, self._require_decoder()
        features = self.image_features(batch["features"])
        references = [[self._word_ids(ref) for ref in refs] for refs in batch["references"]]
        max_length = self.hparams.max_decode_length or self.vocabulary.max_length
        decoder.eval()  # the baseline is the test-time greedy caption
        with torch.no_grad():
            greedy = greedy_search(decoder, features, max_length, self.special)
        decoder.train()
        samples = sample_captions(decoder, features.repeat_interleave(k, dim=0), max_length, self.special)
        baseline = self._cider.batch([self._word_ids(t) for t in greedy.tokens.tolist()], references)
        rewards = self._cider.batch(
            [self._word_ids(t) for t in samples.tokens.tolist()], [refs for refs in references for _ in range(k)]
        )
        reward = torch.tensor(rewards, device=self.device)
        advantage = reward - torch.tensor(baseline, device=self.device).repeat_interleave(k)
        loss = -(advantage * samples.log_probs).mean()
        size = len(references)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/reward_cider", reward.mean(), prog_bar=True, batch_size=size)
        self.log("train/baseline_cider", float(sum(baseline) / size), batch_size=size)
        return loss

    def _evaluate(self, batch: dict, stage: str, beam_size: int) -> list[str]:
        loss = self.teacher_forced_loss(batch["features"][batch["owners"]], batch["tokens"])
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=len(batch["tokens"]), sync_dist=True)
        captions = self.vocabulary.decode_batch(self.generate(batch["features"], beam_size).tokens)
        metric = self.val_bleu if stage == "val" else self.test_bleu
        metric.update(captions, batch["references"])
        return captions

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", beam_size=1)

    def on_validation_epoch_end(self) -> None:
        # Every rank holds the same corpus BLEU (torchmetrics reduces the n-gram counts); sync_dist only agrees on it.
        scores = {f"val/{name}": value for name, value in as_percent(self.val_bleu.compute()).items()}
        self.log_dict(scores, prog_bar=True, sync_dist=True)
        self.val_bleu.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        captions = self._evaluate(batch, "test", beam_size=self.hparams.beam_size)
        self._test_rows.extend(
            {"file_name": name, "caption": caption, "references": refs}
            for name, caption, refs in zip(batch["file_names"], captions, batch["references"])
        )

    def on_test_epoch_start(self) -> None:
        self._test_rows = []

    def on_test_epoch_end(self) -> None:
        bleu = as_percent(self.test_bleu.compute())
        self.test_bleu.reset()
        rows = unique_by_file(self._gather(self._test_rows))
        evaluation = evaluate_captions(rows) if self.trainer.is_global_zero else None
        evaluation = self.trainer.strategy.broadcast(evaluation)
        self.log_dict({f"test/{name}": value for name, value in bleu.items()}, sync_dist=True)
        self.log_dict(loggable(evaluation), sync_dist=True)
        if self.trainer.is_global_zero:
            self._write_test_report(bleu, evaluation, rows)

    def _gather(self, rows: list[dict]) -> list[dict]:
        """Every rank's rows on every rank (one Python object per rank)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return rows
        gathered: list[list[dict]] = [[] for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather_object(gathered, rows)
        return [row for part in gathered for row in part]

    def _write_test_report(self, bleu: dict[str, float], evaluation: dict, rows: list[dict]) -> None:
        folder = run_dir(self.trainer)
        report = {
            "scale": "0-100 (CIDEr is CIDEr-D x 100)",
            "images": evaluation["images"],
            "metrics": {
                "pycocoevalcap": {name: round(value, 4) for name, value in evaluation["scores"].items()},
                "torchmetrics": {f"BLEU-{name[-1]}": round(value, 4) for name, value in bleu.items()},
            },
            "tokenizer": evaluation["tokenizer"],
            "diversity": evaluation["diversity"],
            "decoding": {
                "beam_size": self.hparams.beam_size,
                "length_penalty": self.hparams.length_penalty,
                "max_length": self.hparams.max_decode_length or self.vocabulary.max_length,
            },
            "checkpoint": self.trainer.ckpt_path,
            "split_sizes": getattr(self.trainer.datamodule, "split_sizes", {}),
            "blind": self.hparams.blind,
        }
        write_json(folder / "test_metrics.json", report)
        write_jsonl(folder / "test_captions.jsonl", rows)
        print(format_table(report))
        log.info(
            "Test metrics written to %s, captions to %s", folder / "test_metrics.json", folder / "test_captions.jsonl"
        )

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        rows = [
            {"path": path, "caption": None, "score": None, "error": batch["errors"].get(position)}
            for position, path in zip(batch["positions"], batch["paths"])
        ]
        if batch["ok"]:
            captions, scores, maps = self.caption_images_with_attention(batch["images"])
            row_of = {position: i for i, position in enumerate(batch["positions"])}
            for index, (position, caption, score) in enumerate(zip(batch["ok"], captions, scores)):
                rows[row_of[position]].update(caption=caption, score=score)
                if maps is not None:  # for CaptionWriter's attention pictures; never written to the tables
                    rows[row_of[position]]["attention"] = maps[index]
        return rows

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        hp = self.hparams
        decoder = self._require_decoder()
        # A fused AdamW unscales gradients inside its step, so Lightning's mixed-precision plugins refuse to clip
        # gradients for it: fused only when nothing is clipped (the foreach kernels are nearly as fast).
        fused = not self.trainer.gradient_clip_val
        optimizer = torch.optim.AdamW(decoder.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, fused=fused)
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
