"""The calibrated confidence, as a part of the model (`CaptionModel.confidence`): fitted at every validation on the
captions the model gives with its own decoding, saved in the checkpoint with it, and measured at test.

At validation, for each batch, the captions are decoded with the model's own settings (the shipped configs: beam
search; validation's greedy captions would make a calibrator over-confident on beams, whose captions are
likelier), each caption's three confidence features (`captioner.decoding.confidence`) are taken by one replay, and
its CIDEr-D against its own references; with a CLIP configured (`--model.extra_metrics.clip_model`), its CLIP
cosine too. At the epoch's end the calibrators are fitted on every rank's rows (the same on each). At test, each
caption's confidence is reported beside its CIDEr-D, and the report measures the calibration (ECE).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from captioner.decoding.confidence import Calibrator, with_clip
from captioner.decoding.decoded import Decoded
from captioner.evaluation.clip_confidence import ClipCosines
from captioner.evaluation.metrics import CorpusCider
from captioner.evaluation.report import gathered
from captioner.models import captioning

log = logging.getLogger("captioner")
MIN_ROWS = 8  # fewer validation captions than this fit nothing


class ConfidenceCalibration:
    """The confidence calibrators of a model and how they are fitted (see the module docstring).

    Args:
        threshold: The CIDEr-D (x 100) at or above which a validation caption counts as good (None: the validation
            captions' median).
        clip_model: The CLIP whose cosine a second calibrator reads (None: none).

    Attributes:
        calibrator: The three-feature calibrator (None until fitted, or read from a checkpoint).
        clip_calibrator: The one that also reads the CLIP cosine (None without a CLIP).
    """

    def __init__(self, threshold: float | None = None, clip_model: str | None = None) -> None:
        self.threshold, self.clip_model = threshold, clip_model
        self.calibrator: Calibrator | None = None
        self.clip_calibrator: Calibrator | None = None
        self._rows: list[tuple[list[float], float, float | None]] = []
        self._clip: ClipCosines | None = None
        self._clip_loaded = False
        self.test_cider: CorpusCider | None = None

    # ---------------------------------------------------------------- validation: gather, then fit
    def start_validation(self) -> None:
        self._rows = []

    def observe(self, model: Any, batch: dict, features: torch.Tensor, greedy: Decoded, ciders: Any) -> None:
        """One validation batch: the captions the model gives with its own decoding (`greedy`'s when they are
        its own), their confidence features, their CIDEr-D (`ciders(words)`: one per caption) and CLIP cosines."""
        decoded = (
            greedy
            if model.decoding == model.decoding.greedy()
            else captioning.decode_features(model, features, model.decoding)
        )
        scores = ciders(model.vocabulary.words_of(decoded.best_tokens))
        confidence = captioning.confidence_features(model, features, decoded, model.decoding)
        cosines = self.clip_cosines(model, batch, decoded)
        self._rows.extend(
            zip(confidence.tolist(), scores, cosines.tolist() if cosines is not None else [None] * len(scores))
        )

    def fit(self) -> None:
        """The calibrators on this validation's captions, every rank's (each rank fits the same on the same rows):
        on three features, and with every caption's CLIP cosine known, on four."""
        rows = gathered(self._rows)
        if len(rows) < MIN_ROWS:
            return
        features, ciders = np.array([row[0] for row in rows]), np.array([row[1] for row in rows])
        threshold = float(np.median(ciders)) if self.threshold is None else float(self.threshold)
        good = ciders >= threshold
        if good.all() or not good.any():
            log.info(
                "Confidence calibrator not fitted: every validation caption is on one side of CIDEr-D %.1f.", threshold
            )
            return
        self.calibrator = Calibrator.fit(features, good, threshold)
        if all(row[2] is not None for row in rows):
            cosines = np.array([row[2] for row in rows])
            self.clip_calibrator = Calibrator.fit(
                with_clip(features, cosines), good, threshold, clip_model=self.clip_model
            )

    def clip_cosines(self, model: Any, batch: dict, decoded: Decoded) -> np.ndarray | None:
        """The best captions' CLIP cosines with their images (`captioner.evaluation.clip_confidence`), when a CLIP is
        configured, loads, and every image of the batch is a file (None otherwise)."""
        data = model.data
        if not self.clip_model or data is None:
            return None
        image_file = getattr(data, "image_file", lambda name: None)
        files = [image_file(name) for name in batch["file_names"]]
        if any(path is None for path in files):
            return None
        if not self._clip_loaded:  # once: a CLIP that cannot load is said once, and training goes on without it
            self._clip_loaded = True
            # OpenCLIP builds random weights before reading its own: training's random stream is kept as it was.
            with torch.random.fork_rng(devices=[]):
                self._clip = ClipCosines.load(self.clip_model, model.preprocessing, model.device)
        if self._clip is None:
            return None
        return self._clip(files, model.vocabulary.decode_batch(decoded.best_tokens))

    def calibrators(self) -> dict[str, Calibrator | None]:
        """The calibrators by the test row's column each one fills."""
        return {"confidence": self.calibrator, "confidence_clip": self.clip_calibrator}

    @property
    def clip(self) -> Any:
        """The CLIP loaded for the cosines (the test's CLIPScore reuses it), or None."""
        return self._clip.clip if self._clip is not None else None

    # ---------------------------------------------------------------- test: each caption's confidence
    def start_test(self, data: Any) -> None:
        """Before a test: each caption's CIDEr-D is scored against the data's test references (when there is a
        calibrator to measure)."""
        self.test_cider = None
        references = data.references("test") if self.calibrator is not None and data is not None else None
        if references:
            self.test_cider = CorpusCider()
            self.test_cider.set_references(references)

    def annotate(self, model: Any, batch: dict, features: torch.Tensor, decoded: Decoded, rows: list[dict]) -> None:
        """Add to each test row its caption's `confidence`, the uncalibrated `token_probability`, its `cider_d`
        and, with the CLIP calibrator and cosines, `confidence_clip`."""
        if self.calibrator is None or self.test_cider is None:
            return
        confidence_features = captioning.confidence_features(model, features, decoded, model.decoding)
        confidences = self.calibrator(confidence_features)
        cosines = self.clip_cosines(model, batch, decoded) if self.clip_calibrator is not None else None
        with_cosines = (
            self.clip_calibrator(with_clip(confidence_features, cosines)) if cosines is not None else [None] * len(rows)
        )
        words = model.vocabulary.words_of(decoded.best_tokens)
        for row, caption_words, image, confidence, clip_confidence, features_ in zip(
            rows, words, batch["index"].tolist(), confidences, with_cosines, confidence_features
        ):
            row["confidence"] = round(float(confidence), 4)
            row["token_probability"] = round(float(np.exp(features_[0])), 4)  # the uncalibrated stand-in
            if clip_confidence is not None:
                row["confidence_clip"] = round(float(clip_confidence), 4)
            vectors = self.test_cider.reference_vectors[image]
            row["cider_d"] = round(100 * self.test_cider.scorer.score_vectors(caption_words, vectors), 3)
