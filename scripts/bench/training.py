"""Phases: training steps per decoder, from the cache (memory-mapped or resident), streamed shards, and images (a
fine-tuned encoder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.common import VOCAB_SIZE
from bench.data import GPT2_TOKENS, PREFIX_DRY, PREFIX_GPT2, _caption_tokens, _vocabulary, make_captions
from bench.harness import timed_fit


def ours_train_streamed(
    features_file: str, images: int, device: str, batch_size: int, steps: int, warmup: int, work: str, workers: int = 2
) -> dict:
    """Cross-entropy training steps streaming the features from LitData shards (written before the clock starts),
    one caption per item as the cache gives them: against `ours_train(resident=False)` on the same rows."""

    from captioner.features.stream_loader import train_loader
    from captioner.features.streamed import CHUNK_BYTES, StreamedFeatures

    litdata_writer = __import__("litdata.streaming.writer", fromlist=["BinaryWriter"])
    features = np.load(features_file, mmap_mode="r")[:images]
    captions = make_captions(images * 5)
    folder = Path(work) / "set" / "train"
    writer = litdata_writer.BinaryWriter(str(folder), chunk_bytes=CHUNK_BYTES)
    for row in range(images):
        text = "\n".join(" ".join(f"w{word}" for word in caption) for caption in captions[5 * row : 5 * row + 5])
        writer.add_item(row, {"name": str(row), "features": np.asarray(features[row]), "captions": text})
    writer.done()
    (index,) = folder.glob("*.index.json")
    index.replace(folder / "index.json")
    streamed = StreamedFeatures(str(folder.parent), {"counts": {"train": images}, "train_captions": 5 * images})
    loader = train_loader(streamed, _vocabulary(), batch_size, workers, seed=0, pin_memory=device.startswith("cuda"))
    model = _model("lstm")

    return {"captions_per_s": timed_fit(model, loader, device, steps, warmup), "images": images}


DECODERS = {
    "lstm": ("pooled", "LSTMDecoder", {"embed_dim": 256, "hidden_dim": 512}),
    "transformer": ("grid", "TransformerDecoder", {"width": 256, "layers": 3, "heads": 8, "ffn_dim": 1024}),
    "transformer-512": ("grid", "TransformerDecoder", {"width": 512, "layers": 3, "heads": 8, "ffn_dim": 2048}),
    "prefix-frozen": ("pooled", "PrefixLMDecoder", {**PREFIX_GPT2, "train_lm": False}),
    "prefix-trained": ("pooled", "PrefixLMDecoder", {**PREFIX_GPT2, "train_lm": True}),
    "prefix-frozen-dry": ("pooled", "PrefixLMDecoder", {**PREFIX_DRY, "train_lm": False}),
    "prefix-trained-dry": ("pooled", "PrefixLMDecoder", {**PREFIX_DRY, "train_lm": True}),
}
GRID_REGIONS = 49


def _model(decoder: str, beam_size: int = 3):
    import functools

    from captioner.decoding import DecodingConfig
    from captioner.encoders import TorchvisionEncoder
    from captioner.models import decoders
    from captioner.models.module import CaptionModel

    _, class_name, options = DECODERS[decoder]
    model = CaptionModel(
        functools.partial(getattr(decoders, class_name), **options),
        encoder=TorchvisionEncoder("resnet50", None, 224),
        decoding=DecodingConfig(num_beams=beam_size),
    )
    model.build(_vocabulary(GPT2_TOKENS if class_name == "PrefixLMDecoder" else VOCAB_SIZE))
    return model


def ours_train(
    features_file: str,
    images: int,
    device: str,
    batch_size: int,
    steps: int,
    warmup: int,
    decoder: str = "lstm",
    per_image: bool = False,
    workers: int = 2,
    resident: bool = True,
) -> dict:
    """Cross-entropy training steps; items are captions, or with `per_image` images with their 5 captions. With
    `resident` (what `fit` does when the cache fits), the features are held on the training device and batches
    carry rows; otherwise loader workers read them from the memory-mapped file."""
    from torch.utils.data import DataLoader

    from captioner.data.datasets import FeatureRows, ImageCaptions, RowIndex, TrainCaptions, passthrough
    from captioner.features.resident import ResidentFeatures

    vocabulary = _vocabulary()
    reader = RowIndex() if resident else FeatureRows(features_file)
    if per_image:
        words = [" ".join(f"w{word}" for word in caption) for caption in make_captions(images * 5)]
        captions = [words[5 * i : 5 * i + 5] for i in range(images)]
        dataset = ImageCaptions(reader, np.arange(images), [f"{i}.jpg" for i in range(images)], captions, vocabulary)
        batch_size = max(1, batch_size // 5)  # about the same number of captions per step
    else:
        rows = np.repeat(np.arange(images), 5)
        dataset = TrainCaptions(reader, rows, _caption_tokens(make_captions(images * 5)), pad_index=0)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=passthrough,
        num_workers=workers,
        persistent_workers=True,
        pin_memory=device.startswith("cuda"),
    )
    model = _model(decoder)
    if resident:  # what CaptionDataModule.on_after_batch_transfer does
        table = ResidentFeatures(np.load(features_file, mmap_mode="r")[:images], device)
        model.on_after_batch_transfer = lambda batch, index: {
            **{k: v for k, v in batch.items() if k != "rows"},
            "features": table.gather(batch["rows"]),
        }
    return {
        "captions_per_s": timed_fit(model, loader, device, steps, warmup),
        "images": images,
        "batch_size": batch_size,
        "resident": resident,
    }


def ours_train_encoder(
    images_dir: str,
    names: list[str],
    work: str,
    device: str,
    batch_size: int,
    steps: int,
    warmup: int,
    trainable: str = "0",
    workers: int = 2,
) -> dict:
    """LSTM training with a ResNet18 at 112 px: frozen on its cached features, or fine-tuned from the images (online
    features, the training transform), per-image items either way."""
    import functools

    from torch.utils.data import DataLoader

    from captioner.data.datasets import FeatureRows, ImageCaptions, PixelRows, passthrough
    from captioner.data.sampling import ResumableSampler
    from captioner.encoders import TorchvisionEncoder
    from captioner.features.cache import extract_cache
    from captioner.features.keys import FeatureSpec
    from captioner.models.decoders import LSTMDecoder
    from captioner.models.module import CaptionModel

    blocks = trainable if trainable == "all" else int(trainable)
    encoder = TorchvisionEncoder("resnet18", None, 112)
    model = CaptionModel(
        functools.partial(LSTMDecoder, embed_dim=256, hidden_dim=512), encoder=encoder, trainable_encoder_blocks=blocks
    )
    vocabulary = _vocabulary()
    model.build(vocabulary)
    words = [" ".join(f"w{word}" for word in caption) for caption in make_captions(len(names) * 5)]
    captions = [words[5 * i : 5 * i + 5] for i in range(len(names))]
    if blocks:
        reader = PixelRows([Path(images_dir) / name for name in names], encoder.preprocessing, augment=True)
    else:
        cache = extract_cache(
            Path(work) / "cache", "finetune", images_dir, names, FeatureSpec(encoder), device, 16, max(2, workers)
        )
        reader = FeatureRows(cache.directory / "features.npy")
    dataset = ImageCaptions(reader, np.arange(len(names)), names, captions, vocabulary)
    per_step = max(1, batch_size // 5)
    sampler = ResumableSampler(dataset, num_replicas=1, rank=0, seed=0, tag_epoch=True)
    loader = DataLoader(
        dataset,
        batch_size=per_step,
        sampler=sampler,
        collate_fn=passthrough,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.startswith("cuda"),
    )

    model.setup = lambda stage: None  # random weights: nothing to fetch
    return {
        "captions_per_s": timed_fit(model, loader, device, steps, warmup),
        "images_per_step": per_step,
        "trainable_blocks": trainable,
    }
