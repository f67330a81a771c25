"""The per-image answer of captioning (caption, score, ranked alternatives), built once for the PyTorch captioner,
the exported runtime and the server."""

from __future__ import annotations

from typing import Any

from captioner.decoding.search import Decoded


def answer_rows(decoded: Decoded, vocabulary: Any, num_return: int, confidences: Any = None,
                clip_scores: Any = None) -> list[dict[str, Any]]:  # fmt: skip
    """One dict per image: `caption` and `score` (log-probability) of the best caption and, with `num_return` > 1,
    `alternatives`: up to that many `{"caption", "score"}`, best first (the best included), finished ones only
    where any finished. With forced words, each also says whether it holds them all (`constraints_met`): a caption
    that could not within the length is returned, after those that could.

    Args:
        decoded: A search's ranked captions (arrays of either library).
        vocabulary: Turns token ids into text.
        num_return: Captions returned per image.
        confidences: Each image's best caption's calibrated confidence (`captioner.decoding.confidence`), for models
            that have a calibrator: `confidence` in [0, 1].
        clip_scores: `(B, N)` CLIP-S of each caption, after reranking by it (`captioner.evaluation.clip_rerank`):
            each caption's `clip_score`.
    """
    rows = []
    scores, tokens = decoded.scores.tolist(), decoded.tokens
    met = decoded.met.tolist() if decoded.met is not None else None
    for image, image_scores in enumerate(scores):
        texts = vocabulary.decode_batch(tokens[image][:num_return])
        ranked = [{"caption": text, "score": float(score)} for text, score in zip(texts, image_scores[:num_return])
                  if score != float("-inf")]  # fmt: skip
        for rank, entry in enumerate(ranked):
            if met is not None:
                entry["constraints_met"] = bool(met[image][rank])
            if clip_scores is not None:
                entry["clip_score"] = round(float(clip_scores[image][rank]), 4)
        row = {key: value for key, value in ranked[0].items()}
        if confidences is not None:
            row["confidence"] = round(float(confidences[image]), 4)
        if num_return > 1:
            row["alternatives"] = ranked
        rows.append(row)
    return rows
