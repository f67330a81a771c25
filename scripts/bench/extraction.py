"""Phases: feature extraction, from a folder and from tar shards, by encoder family."""

from __future__ import annotations

import time
from pathlib import Path

from bench.harness import _sync

# One encoder of each family, random weights (no download), at its own input definition, for extraction speed.
# The Hugging Face one is facebook/dinov2-small's architecture, written out (its config would come from the hub).
DINOV2_SMALL = {
    "model_type": "dinov2",
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "intermediate_size": 1536,
    "patch_size": 14,
    "image_size": 518,
}
ENCODERS = {
    "resnet50": {
        "class_path": "captioner.encoders.TorchvisionEncoder",
        "init_args": {"model": "resnet50", "weights": None, "image_size": 224},
    },
    "timm_convnext_tiny": {
        "class_path": "captioner.encoders.TimmEncoder",
        "init_args": {"model_name": "convnext_tiny", "pretrained": False},
    },
    "open_clip_vit_b32": {
        "class_path": "captioner.encoders.OpenClipEncoder",
        "init_args": {"model_name": "ViT-B-32", "pretrained": None},
    },
    "hf_dinov2_small": {
        "class_path": "captioner.encoders.HuggingFaceEncoder",
        "init_args": {
            "config": DINOV2_SMALL,
            "pretrained": False,
            "image_processor": {
                "size": {"shortest_edge": 256},
                "crop_size": {"height": 224, "width": 224},
                "do_center_crop": True,
                "resample": 3,
                "image_mean": [0.485, 0.456, 0.406],
                "image_std": [0.229, 0.224, 0.225],
            },
        },
    },
}


def ours_extract(
    images_dir: str,
    names: list[str],
    work: str,
    device: str,
    batch_size: int | None,
    workers: int,
    encoder: str = "resnet50",
) -> dict:
    import torch

    from captioner.encoders.base import encoder_from_spec
    from captioner.features.cache import extract_cache
    from captioner.features.extraction import default_batch_size
    from captioner.features.keys import FeatureSpec, extraction_method

    spec = FeatureSpec(encoder_from_spec(ENCODERS[encoder]))
    key = "benchmark"  # one cache per folder; the key only guards resuming
    batch_size = batch_size or default_batch_size(torch.device(device))
    # Warm up kernels (and cuDNN autotuning) outside the timed region, on a few images.
    extract_cache(Path(work) / "warmup", key, images_dir, names[:batch_size], spec, device, batch_size, 1)
    _sync(device)
    started = time.perf_counter()
    extract_cache(Path(work) / "cache", key, images_dir, names, spec, device, batch_size, max(2, workers))
    _sync(device)
    elapsed = time.perf_counter() - started
    decode, precision = extraction_method(device)
    grid = list(spec.encoder.grid_shape or ())
    return {
        "images_per_s": len(names) / elapsed,
        "images": len(names),
        "batch_size": batch_size,
        "decode": decode,
        "precision": precision,
        "feature_dim": spec.encoder.feature_dim,
        "grid": grid,
        "preprocessing": spec.encoder.preprocessing.describe(),
    }


def ours_extract_shards(
    images_dir: str, names: list[str], work: str, device: str, batch_size: int | None, workers: int, per_shard: int = 64
) -> dict:
    """Extraction straight from WebDataset tar shards into streamed feature shards (what a WebDataset source gets),
    on the same images and encoder as `ours_extract` from the folder."""
    import io
    import tarfile

    import torch

    from captioner.encoders.base import encoder_from_spec
    from captioner.features.extraction import default_batch_size
    from captioner.features.keys import FeatureSpec
    from captioner.features.streamed import prepare_streamed
    from captioner.sources.parts import shard_parts
    from captioner.sources.records import CaptionRecord

    shards = Path(work) / "shards"
    shards.mkdir(parents=True)
    records = []
    for shard, start in enumerate(range(0, len(names), per_shard)):  # written before the clock starts
        with tarfile.open(shards / f"{shard:05d}.tar", "w") as tar:
            for index, name in enumerate(names[start : start + per_shard], start):
                data = (Path(images_dir) / name).read_bytes()
                info = tarfile.TarInfo(f"{index:09d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                records.append(CaptionRecord(f"{shard:05d}.tar#{index:09d}.jpg", ("a caption",)))
    spec = FeatureSpec(encoder_from_spec(ENCODERS["resnet50"]))
    batch_size = batch_size or default_batch_size(torch.device(device))
    splits = {"train": records, "val": [], "test": []}
    warm = {"train": records[:batch_size], "val": [], "test": []}
    prepare_streamed(
        str(Path(work) / "warmup"),
        shard_parts([r.file_name for r in warm["train"]], shards),
        warm,
        spec,
        device=device,
        batch_size=batch_size,
        threads=max(2, workers),
    )
    _sync(device)
    started = time.perf_counter()
    prepare_streamed(
        str(Path(work) / "streamed"),
        shard_parts([r.file_name for r in records], shards),
        splits,
        spec,
        device=device,
        batch_size=batch_size,
        threads=max(2, workers),
    )
    _sync(device)
    return {
        "images_per_s": len(names) / (time.perf_counter() - started),
        "images": len(names),
        "shards": len(list(shards.glob("*.tar"))),
    }
