"""Phases: the original approach (scripts/original_approach.py), re-implemented faithfully, for comparison."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.common import MAX_LENGTH, VOCAB_SIZE
from bench.data import make_captions
from bench.harness import _sync


# ------------------------------------------------------------------ phases: the original approach
def original_extract(images_dir: str, names: list[str], work: str, device: str) -> dict:
    import torch
    from original_approach import extract_one_by_one

    paths = [Path(images_dir) / name for name in names]
    extract_one_by_one(paths[:2], Path(work) / "warmup.pkl", torch.device(device))
    _sync(device)
    started = time.perf_counter()
    extract_one_by_one(paths, Path(work) / "features.pkl", torch.device(device))
    _sync(device)
    return {"images_per_s": len(names) / (time.perf_counter() - started), "images": len(names)}


def original_train(features_file: str, images: int, device: str, images_per_batch: int, steps: int) -> dict:
    import torch
    from original_approach import MergeCaptioner, prefix_samples, train_steps

    features = np.asarray(np.load(features_file, mmap_mode="r")[:images], dtype=np.float32)
    captions = make_captions(images * 5)
    model = MergeCaptioner(VOCAB_SIZE).to(device)
    optimizer = torch.optim.Adam(model.parameters())
    per_image = [[[1, *[w + 4 for w in c[:MAX_LENGTH]], 2] for c in captions[i * 5 : i * 5 + 5]] for i in range(images)]

    def batches(start_step: int, count: int):
        for step in range(start_step, start_step + count):
            chosen = [(step * images_per_batch + j) % images for j in range(images_per_batch)]
            feats = np.repeat(features[chosen], 5, axis=0)
            yield prefix_samples(feats, [c for i in chosen for c in per_image[i]], MAX_LENGTH, VOCAB_SIZE)

    train_steps(model, batches(0, 1), device, optimizer)  # warm-up
    _sync(device)
    started = time.perf_counter()
    train_steps(model, batches(1, steps), device, optimizer)  # the generator's work is part of the cost
    _sync(device)
    return {"captions_per_s": steps * images_per_batch * 5 / (time.perf_counter() - started)}


def original_decode(features_file: str, count: int, device: str) -> dict:
    import torch
    from original_approach import MergeCaptioner, generate_caption

    model = MergeCaptioner(VOCAB_SIZE).to(device)
    word_index = {"startseq": 1, "endseq": 2, **{f"w{i}": i + 4 for i in range(VOCAB_SIZE - 4)}}
    features = torch.from_numpy(np.asarray(np.load(features_file, mmap_mode="r")[:count], dtype=np.float32)).to(device)
    generate_caption(model, features[0], word_index, MAX_LENGTH)  # warm-up
    started, lengths = time.perf_counter(), []
    for feature in features:
        lengths.append(len(generate_caption(model, feature, word_index, MAX_LENGTH).split()) - 1)
    return {"captions_per_s": count / (time.perf_counter() - started), "mean_length": float(np.mean(lengths))}
