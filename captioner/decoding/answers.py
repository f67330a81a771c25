"""The per-image answer of captioning (caption, score, ranked alternatives), built once for the PyTorch captioner,
the exported runtime and the server."""

from __future__ import annotations

from typing import Any

from captioner.decoding.search import Decoded


def answer_rows(decoded: Decoded, vocabulary: Any, num_return: int) -> list[dict[str, Any]]:
    """One dict per image: `caption` and `score` (log-probability) of the best caption and, with `num_return` > 1,
    `alternatives`: up to that many `{"caption", "score"}`, best first (the best included), finished ones only
    where any finished.

    Args:
        decoded: A search's ranked captions (arrays of either library).
        vocabulary: Turns token ids into text.
        num_return: Captions returned per image.
    """
    rows = []
    scores, tokens = decoded.scores.tolist(), decoded.tokens
    for image, image_scores in enumerate(scores):
        texts = vocabulary.decode_batch(tokens[image][:num_return])
        ranked = [{"caption": text, "score": float(score)} for text, score in zip(texts, image_scores[:num_return])
                  if score != float("-inf")]  # fmt: skip
        row = {"caption": ranked[0]["caption"], "score": ranked[0]["score"]}
        if num_return > 1:
            row["alternatives"] = ranked
        rows.append(row)
    return rows
