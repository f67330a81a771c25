"""Generated data the phases share: captions of COCO length over the vocabulary, feature files, tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.common import COCO_MEAN_WORDS, COCO_SD_WORDS, MAX_LENGTH, VOCAB_SIZE


def make_captions(count: int, seed: int = 0) -> list[list[int]]:
    """Word ids (1-based over the regular words) with COCO's caption lengths and a Zipf-like word distribution."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, VOCAB_SIZE - 4 + 1)
    weights = 1.0 / ranks
    weights /= weights.sum()
    lengths = np.clip(np.rint(rng.normal(COCO_MEAN_WORDS, COCO_SD_WORDS, count)), 5, MAX_LENGTH).astype(int)
    words = rng.choice(len(ranks), size=int(lengths.sum()), p=weights)  # one draw: fast at GPU sizes
    return [list(caption) for caption in np.split(words, np.cumsum(lengths)[:-1])]


def make_feature_file(path: Path, source: np.ndarray, count: int, regions: int = 0) -> Path:
    """A memory-mapped fp16 file of `count` rows filled by repeating the extracted pooled features.

    With `regions`, each row is a `(regions, D)` grid: the pooled feature plus a fixed per-region perturbation
    (timings do not depend on the values: the untrained decoders run to the maximum length either way).
    """
    shape = (count, regions, source.shape[1]) if regions else (count, source.shape[1])
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
    offsets = np.random.default_rng(0).standard_normal((regions, source.shape[1])).astype(np.float16) if regions else 0
    for start in range(0, count, len(source)):
        stop = min(count, start + len(source))
        rows = source[: stop - start]
        array[start:stop] = rows[:, None, :] + offsets if regions else rows
    array.flush()
    return path


def _caption_tokens(captions: list[list[int]]):
    import torch

    tokens = torch.zeros(len(captions), MAX_LENGTH + 2, dtype=torch.long)
    for row, caption in enumerate(captions):
        ids = [1, *[word + 4 for word in caption[:MAX_LENGTH]], 2]  # <start> words <end>, words after the 4 specials
        tokens[row, : len(ids)] = torch.tensor(ids)
    return tokens


def _vocabulary(size: int = VOCAB_SIZE):
    from captioner.text.words import Vocabulary

    return Vocabulary([f"w{i}" for i in range(size - 4)], max_length=MAX_LENGTH)


# The decoders compared: the LSTM at the original's size, and a Transformer doing about the same arithmetic per
# word (width 256, 3 layers, feed-forward 1,024: 4.1 M multiply-adds per word against the LSTM's 4.0 M), reading
# the 7x7 grid of regions. "transformer-512" is configs/decoders/transformer.yaml's size (3 times the arithmetic).
# The prefix LM is configs/decoders/prefix_gpt2.yaml's: GPT-2 small's shape (12 layers, 768 wide; random weights,
# which cost what trained ones do) with GPT-2's 50,259 tokens (its own and <pad>, <start>), a prefix of 40 from an
# 8-layer Transformer mapper, the LM frozen or trained.
PREFIX_GPT2 = {
    "lm": None,
    "lm_config": {"model_type": "gpt2"},
    "prefix_length": 40,
    "mapper": "transformer",
    "mapper_layers": 8,
    "feature_tokens": 40,
}
GPT2_TOKENS = 50_259
# The dry run's prefix LM (`--sizes dry`): the same decoder at the least size it runs with, so that every phase runs
# within a dry run's time box on a CPU (GPT-2 small's shape took 138 s of it there); its figures mean nothing.
PREFIX_DRY = {
    "lm": None,
    "lm_config": {"model_type": "gpt2", "n_layer": 1, "n_embd": 64, "n_head": 2, "n_positions": 64},
    "prefix_length": 4,
    "mapper": "mlp",
}
