"""A calibrated confidence per caption: the probability, in [0, 1], that a caption is good.

A caption's log-probability is no confidence: longer captions always score lower, and scores do not compare across
images. The confidence here is a logistic regression on three features of the returned caption,

- its mean token log-probability (the score over its length),
- its least likely token's log-probability (one unlikely word is often a wrong one),
- its length in tokens,

and, when a CLIP model is configured (`--model.extra_metrics.clip_model`), a second calibrator on a fourth: the
caption's CLIP cosine with its image (as CLIPScore embeds it; `with_clip`), used where that CLIP is loaded beside the
model (`--rerank_clip` naming it), the three-feature one everywhere else (the exported runtime has no CLIP). Both are
fitted on the validation captions against whether each is good: its CIDEr-D against its own references at or
above a threshold (by default the validation captions' median, so 0.5 means "as good as this model's typical
caption"; an absolute CIDEr-D can be set instead). The token log-probabilities come from replaying the caption
through the decoder (`replay_log_probs`, one step per token, the same `Stepper` protocol search uses), so PyTorch and
the exported runtime compute the same number. Its reliability is measured on the test split as the expected
calibration error (ECE), beside that of the naive confidence exp(mean token log-probability).

Torch-free: the runtime uses it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

FEATURES = ("mean_log_prob", "min_log_prob", "tokens")
CLIP_FEATURE = "clip_cosine"


def feature_names(clip_model: str | None) -> tuple[str, ...]:
    """The features a calibrator reads, in order: `FEATURES`, and the CLIP cosine last when it has a CLIP."""
    return FEATURES + ((CLIP_FEATURE,) if clip_model else ())


def replay_log_probs(stepper: Any, tokens: np.ndarray, start: int, ops: Any, rules: list) -> np.ndarray:
    """Each token's log-probability as the search scored it, `(B, T)`, for captions `tokens` `(B, T)` (one per image
    of the stepper's batch; after `<end>`, whatever follows is replayed and ignored): the same logits rules, then the
    log-softmax, so a caption's replayed log-probabilities add up to its score.

    Args:
        stepper: The model, one step at a time (`captioner.decoding.search.Stepper`).
        tokens: The captions' tokens without `<start>`, as a NumPy array.
        start: The `<start>` token.
        ops: The stepper's array operations.
        rules: The search's logits rules (`captioner.decoding.rules.rules_for`).
    """
    from captioner.decoding.rules import apply

    batch, width = tokens.shape
    state = stepper.start(1)
    previous = ops.as_long([start] * batch)
    picked = np.zeros((batch, width), dtype=np.float64)
    for step in range(width):
        logits, state = stepper.step(previous, state)
        words = ops.as_long(tokens[:, :step].tolist()).reshape(batch, step)
        log_probs = ops.to_numpy(ops.log_softmax(apply(rules, ops.as_float(logits), words, step, ops)))
        picked[:, step] = log_probs[np.arange(batch), tokens[:, step]]
        previous = ops.as_long(tokens[:, step].tolist())
    return picked


def caption_confidences(
    calibrator: Calibrator, stepper: Any, decoded: Any, start: int, ops: Any, rules: list
) -> np.ndarray:
    """The calibrated confidence of each image's best caption in `decoded` (one replay through `stepper`)."""
    tokens = np.asarray(ops.to_numpy(decoded.best_tokens), dtype=np.int64)
    lengths = np.asarray(ops.to_numpy(decoded.best_lengths), dtype=np.int64)
    return calibrator(caption_features(replay_log_probs(stepper, tokens, start, ops, rules), lengths))


def with_clip(features: np.ndarray, cosines: np.ndarray) -> np.ndarray:
    """`(B, 4)` features: `caption_features`'s three and each caption's CLIP cosine with its image."""
    return np.hstack([np.asarray(features, dtype=np.float64), np.asarray(cosines, dtype=np.float64).reshape(-1, 1)])


def caption_features(token_log_probs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """`(B, 3)` features (see `FEATURES`) from each caption's token log-probabilities and its length (`<end>`
    included)."""
    lengths = np.maximum(np.asarray(lengths, dtype=np.int64), 1)
    mask = np.arange(token_log_probs.shape[1])[None, :] < lengths[:, None]
    finite = np.where(mask & np.isfinite(token_log_probs), token_log_probs, 0.0)
    mean = finite.sum(axis=1) / lengths
    least = np.where(mask, np.where(np.isfinite(token_log_probs), token_log_probs, -50.0), np.inf).min(axis=1)
    return np.stack([mean, least, lengths.astype(np.float64)], axis=1)


@dataclass(frozen=True)
class Calibrator:
    """A logistic regression from caption features to the probability that the caption is good.

    Attributes:
        mean, scale: Feature standardisation (from the fitting set).
        weights, bias: The regression on standardised features.
        threshold: The CIDEr-D (x 100) at or above which a caption counted as good.
        fitted_on: How many captions it was fitted on.
        clip_model: The CLIP whose cosine is its fourth feature (None: the three features alone).
    """

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    threshold: float
    fitted_on: int
    clip_model: str | None = None

    @property
    def features(self) -> tuple[str, ...]:
        """The names of the features it reads, in order."""
        return feature_names(self.clip_model)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """The probability that each caption (a row of `caption_features`) is good."""
        standard = (np.asarray(features, dtype=np.float64) - np.asarray(self.mean)) / np.asarray(self.scale)
        return 1.0 / (1.0 + np.exp(-(standard @ np.asarray(self.weights) + self.bias)))

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        good: np.ndarray,
        threshold: float,
        l2: float = 1e-2,
        iterations: int = 50,
        clip_model: str | None = None,
    ) -> Calibrator:
        """Maximum likelihood (Newton's method, a little L2 for separable sets) on standardised features.

        Args:
            features: `(N, 3)` caption features (`(N, 4)` with `clip_model`: the CLIP cosine last).
            good: `(N,)` whether each caption is good.
            threshold: The CIDEr-D that made a caption good, recorded.
            clip_model: The CLIP whose cosine is the fourth column.
            l2: Ridge penalty on the weights (not the bias).
            iterations: Newton steps at most (it converges in a handful).
        """
        features, good = np.asarray(features, dtype=np.float64), np.asarray(good, dtype=np.float64)
        mean = features.mean(axis=0)
        scale = np.where(features.std(axis=0) > 1e-9, features.std(axis=0), 1.0)
        design = np.hstack([(features - mean) / scale, np.ones((len(features), 1))])
        theta = np.zeros(design.shape[1])
        theta[-1] = np.log((good.mean() + 1e-3) / (1 - good.mean() + 1e-3))  # start at the base rate
        penalty = np.diag([l2] * (design.shape[1] - 1) + [0.0])
        for _ in range(iterations):
            probability = 1.0 / (1.0 + np.exp(-design @ theta))
            gradient = design.T @ (probability - good) + penalty @ theta
            hessian = (
                design.T @ (design * (probability * (1 - probability))[:, None]) + penalty + 1e-9 * np.eye(len(theta))
            )
            change = np.linalg.solve(hessian, gradient)
            theta -= change
            if np.abs(change).max() < 1e-8:
                break
        return cls(
            tuple(map(float, mean)),
            tuple(map(float, scale)),
            tuple(map(float, theta[:-1])),
            float(theta[-1]),
            float(threshold),
            len(features),
            clip_model,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (checkpoints and export manifests hold it)."""
        payload = {
            "features": list(self.features),
            "mean": list(self.mean),
            "scale": list(self.scale),
            "weights": list(self.weights),
            "bias": self.bias,
            "threshold": self.threshold,
            "fitted_on": self.fitted_on,
        }
        if self.clip_model:
            payload["clip_model"] = self.clip_model
        return payload

    @classmethod
    def from_dict(cls, payload: dict[str, Any] | None) -> Calibrator | None:
        """The calibrator `to_dict` wrote (None for a model without one, or one of other features)."""
        if not payload:
            return None
        clip_model = payload.get("clip_model")
        if tuple(payload.get("features", ())) != feature_names(clip_model):
            return None
        return cls(
            tuple(payload["mean"]),
            tuple(payload["scale"]),
            tuple(payload["weights"]),
            float(payload["bias"]),
            float(payload["threshold"]),
            int(payload["fitted_on"]),
            clip_model,
        )


def expected_calibration_error(confidences: np.ndarray, good: np.ndarray, bins: int = 10) -> float:
    """ECE: over equal-width confidence bins, the mean |accuracy - confidence| weighted by the bin's share (0-1)."""
    return float(
        sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in reliability(confidences, good, bins))
        / max(len(confidences), 1)
    )


def reliability(confidences: np.ndarray, good: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Each non-empty confidence bin: its range, mean confidence, share of good captions, and count."""
    confidences, good = np.asarray(confidences, dtype=np.float64), np.asarray(good, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidences, edges[1:-1]), 0, bins - 1)
    rows = []
    for number in range(bins):
        members = index == number
        if members.any():
            rows.append(
                {
                    "low": float(edges[number]),
                    "high": float(edges[number + 1]),
                    "confidence": float(confidences[members].mean()),
                    "accuracy": float(good[members].mean()),
                    "count": int(members.sum()),
                }
            )
    return rows


def naive_confidence(features: np.ndarray) -> np.ndarray:
    """What users take for a confidence without calibration: the geometric mean token probability."""
    return np.exp(np.asarray(features, dtype=np.float64)[:, 0])
