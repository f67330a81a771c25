"""Benchmark captioner against the original approach, phase by phase, in one run.

    python scripts/benchmark.py --quick          # about 12 minutes on a 2-core CPU
    python scripts/benchmark.py                  # bigger sizes; uses the GPU when there is one
    python scripts/benchmark.py --json out.json  # also write every figure as JSON

On the same generated data (640x480 JPEG scenes, captions of COCO length over
a 5,000-word vocabulary) it measures, for captioner and for a faithful
re-implementation of the original approach (scripts/original_approach.py):

- feature extraction, images/s, file on disk to cached feature;
- training on cached features, captions/s (ours through Lightning's Trainer);
- decoding, captions/s (ours batched greedy and beam-3; the original per word);
- peak memory of each phase (each runs in its own process, its loader
  workers counted with it): resident and anonymous memory, the latter leaving
  out the page cache of memory-mapped files (see `MemorySampler`). Training
  is run on two dataset sizes to show that its memory does not grow with the
  number of images.

The last lines are `name: value`, for scripts.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

# Spawned phases read the vocabulary size from the environment `main` sets (--vocab).
VOCAB_SIZE = int(os.environ.get("CAPTIONER_BENCHMARK_VOCAB", "5000"))
MAX_LENGTH = 34
COCO_MEAN_WORDS, COCO_SD_WORDS = 10.5, 2.4


# ------------------------------------------------------------------ memory measurement
def _status(pid: str) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon"):
                    values[key] = int(rest.split()[0])  # kB
    except OSError:
        pass
    return values


def _descendants(pid: str) -> list[str]:
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/task/{current}/children") as handle:
                children = handle.read().split()
        except OSError:
            children = []
        found += children
        stack += children
    return found


class MemorySampler(threading.Thread):
    """Peak memory of this process and its children (DataLoader workers) together, sampled every 20 ms.

    `anon`: anonymous memory (RssAnon: the heap, tensors), which leaves out the
    page cache of memory-mapped files; `resident`: VmRSS. Read from
    /proc/<pid>/status, which costs the measured processes nothing; proportional
    sizes (smaps_rollup) would count pages a forked worker shares with its parent
    once, but reading them walks the page tables under the process's memory lock
    and slowed the measured phases (the server phase by 1.5x). So pages shared
    with forked workers count once per worker: with many workers (a GPU run's 16)
    the anonymous figure overstates the memory used.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_anon_kb = 0
        self.peak_rss_kb = 0
        self._done = threading.Event()

    def run(self) -> None:
        me = str(os.getpid())
        while not self._done.is_set():
            pids = [me, *_descendants(me)]
            stats = [_status(pid) for pid in pids]
            self.peak_anon_kb = max(self.peak_anon_kb, sum(s.get("RssAnon", 0) for s in stats))
            self.peak_rss_kb = max(self.peak_rss_kb, sum(s.get("VmRSS", 0) for s in stats))
            time.sleep(0.02)

    def stop(self) -> dict[str, float]:
        self._done.set()
        self.join()
        return {"peak_anon_mb": self.peak_anon_kb / 1024, "peak_rss_mb": self.peak_rss_kb / 1024}


def _child(queue, function, kwargs) -> None:
    import torch

    # This process was spawned (a clean memory baseline); its DataLoader workers
    # should be forked as they are in a normal run, not spawned (seconds of start-up each).
    multiprocessing.set_start_method("fork", force=True)
    torch.manual_seed(0)
    sampler = MemorySampler()
    sampler.start()
    try:
        result = function(**kwargs)
    except BaseException as error:  # report to the parent instead of leaving it waiting
        queue.put({"error": f"{type(error).__name__}: {error}"})
        raise
    result.update(sampler.stop())
    if torch.cuda.is_available():
        result["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    queue.put(result)


def run_phase(name: str, function, **kwargs) -> dict:
    """Run one phase in a fresh process so its memory peak is its own."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, function, kwargs))
    started = time.perf_counter()
    process.start()
    result = queue.get()
    process.join()
    if "error" in result:  # report it in the table and go on with the other phases
        print(f"  {name:<34} FAILED: {result['error']}", flush=True)
        return {"unsupported": f"failed: {result['error'][:60]}"}
    result["wall_s"] = time.perf_counter() - started
    print(
        f"  {name:<34} {json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()})}",
        flush=True,
    )
    return result


# Phases to run (`--only`); None runs all. Extraction always runs: every later phase reads its features.
ONLY: tuple[str, ...] | None = None
ALWAYS = ("extract",)


def measure(results: dict, key: str, name: str, function, **kwargs) -> None:
    """`run_phase` into `results[key]`, unless `--only` leaves this phase out."""
    wanted = ONLY is None or any(key == name or (name.endswith("*") and key.startswith(name[:-1])) for name in ONLY)
    if wanted or key in ALWAYS:
        results[key] = run_phase(name, function, **kwargs)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_fit(model, loader, device: str, steps: int, warmup: int) -> float:
    """Train `model` on `loader` for `warmup + steps` steps with Lightning's Trainer, in the precision `fit` picks
    on this device, and return the captions per second of the steps after the warm-up."""
    from lightning.pytorch import Callback, Trainer

    from captioner.core.hardware import default_precision

    class Timer(Callback):
        def __init__(self):
            self.start, self.end, self.captions = 0.0, 0.0, 0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == warmup:
                _sync(device)
                self.start = time.perf_counter()
            if trainer.global_step >= warmup:
                self.captions += len(batch["tokens"])

        def on_train_end(self, trainer, module):
            _sync(device)
            self.end = time.perf_counter()

    timer = Timer()
    kind = "gpu" if device.startswith("cuda") else "cpu"
    trainer = Trainer(accelerator=kind, devices=1, max_steps=warmup + steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      precision=default_precision(kind), callbacks=[timer])  # fmt: skip
    model.on_fit_start = lambda: None  # no datamodule here; cross-entropy needs no preparation
    trainer.fit(model, train_dataloaders=loader)
    return timer.captions / (timer.end - timer.start)


# ------------------------------------------------------------------ data
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


# ------------------------------------------------------------------ phases: ours
# One encoder of each family, random weights (no download), at its own input definition, for extraction speed.
# The Hugging Face one is facebook/dinov2-small's architecture, written out (its config would come from the hub).
DINOV2_SMALL = {"model_type": "dinov2", "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
                "intermediate_size": 1536, "patch_size": 14, "image_size": 518}  # fmt: skip
ENCODERS = {
    "resnet50": {"class_path": "captioner.encoders.TorchvisionEncoder",
                 "init_args": {"model": "resnet50", "weights": None, "image_size": 224}},
    "timm_convnext_tiny": {"class_path": "captioner.encoders.TimmEncoder",
                           "init_args": {"model_name": "convnext_tiny", "pretrained": False}},
    "open_clip_vit_b32": {"class_path": "captioner.encoders.OpenClipEncoder",
                          "init_args": {"model_name": "ViT-B-32", "pretrained": None}},
    "hf_dinov2_small": {"class_path": "captioner.encoders.HuggingFaceEncoder",
                        "init_args": {"config": DINOV2_SMALL, "pretrained": False, "image_processor": {
                            "size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224},
                            "do_center_crop": True, "resample": 3, "image_mean": [0.485, 0.456, 0.406],
                            "image_std": [0.229, 0.224, 0.225]}}},
}  # fmt: skip


def ours_extract(
    images_dir: str, names: list[str], work: str, device: str, batch_size: int | None, workers: int,
    encoder: str = "resnet50",
) -> dict:  # fmt: skip
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
    return {"images_per_s": len(names) / elapsed, "images": len(names), "batch_size": batch_size, "decode": decode,
            "precision": precision, "feature_dim": spec.encoder.feature_dim, "grid": grid,
            "preprocessing": spec.encoder.preprocessing.describe()}  # fmt: skip


def ours_extract_shards(images_dir: str, names: list[str], work: str, device: str, batch_size: int | None,
                        workers: int, per_shard: int = 64) -> dict:  # fmt: skip
    """Extraction straight from WebDataset tar shards into streamed feature shards (what a WebDataset source gets),
    on the same images and encoder as `ours_extract` from the folder."""
    import io
    import tarfile

    import torch

    from captioner.data.records import CaptionRecord
    from captioner.encoders.base import encoder_from_spec
    from captioner.features.extraction import default_batch_size
    from captioner.features.keys import FeatureSpec
    from captioner.features.sources import shard_parts
    from captioner.features.streamed import prepare_streamed

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
    prepare_streamed(str(Path(work) / "warmup"), shard_parts([r.file_name for r in warm["train"]], shards), warm, spec,
                     device=device, batch_size=batch_size, threads=max(2, workers))  # fmt: skip
    _sync(device)
    started = time.perf_counter()
    prepare_streamed(str(Path(work) / "streamed"), shard_parts([r.file_name for r in records], shards), splits, spec,
                     device=device,
                     batch_size=batch_size, threads=max(2, workers))  # fmt: skip
    _sync(device)
    return {"images_per_s": len(names) / (time.perf_counter() - started), "images": len(names),
            "shards": len(list(shards.glob("*.tar")))}  # fmt: skip


def ours_train_streamed(features_file: str, images: int, device: str, batch_size: int, steps: int, warmup: int,
                        work: str, workers: int = 2) -> dict:  # fmt: skip
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
    loader = train_loader(streamed, _vocabulary(), batch_size, workers, seed=0,
                          pin_memory=device.startswith("cuda"))  # fmt: skip
    model = _model("lstm")

    return {"captions_per_s": timed_fit(model, loader, device, steps, warmup), "images": images}


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
PREFIX_GPT2 = {"lm": None, "lm_config": {"model_type": "gpt2"}, "prefix_length": 40, "mapper": "transformer",
               "mapper_layers": 8, "feature_tokens": 40}  # fmt: skip
GPT2_TOKENS = 50_259
DECODERS = {
    "lstm": ("pooled", "LSTMDecoder", {"embed_dim": 256, "hidden_dim": 512}),
    "transformer": ("grid", "TransformerDecoder", {"width": 256, "layers": 3, "heads": 8, "ffn_dim": 1024}),
    "transformer-512": ("grid", "TransformerDecoder", {"width": 512, "layers": 3, "heads": 8, "ffn_dim": 2048}),
    "prefix-frozen": ("pooled", "PrefixLMDecoder", {**PREFIX_GPT2, "train_lm": False}),
    "prefix-trained": ("pooled", "PrefixLMDecoder", {**PREFIX_GPT2, "train_lm": True}),
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
    features_file: str, images: int, device: str, batch_size: int, steps: int, warmup: int, decoder: str = "lstm",
    per_image: bool = False, workers: int = 2, resident: bool = True,
) -> dict:  # fmt: skip
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
        model.on_after_batch_transfer = lambda batch, index: {**{k: v for k, v in batch.items() if k != "rows"},
                                                              "features": table.gather(batch["rows"])}  # fmt: skip
    return {"captions_per_s": timed_fit(model, loader, device, steps, warmup), "images": images,
            "batch_size": batch_size, "resident": resident}  # fmt: skip


def ours_train_encoder(images_dir: str, names: list[str], work: str, device: str, batch_size: int, steps: int,
                       warmup: int, trainable: str = "0", workers: int = 2) -> dict:  # fmt: skip
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
    model = CaptionModel(functools.partial(LSTMDecoder, embed_dim=256, hidden_dim=512), encoder=encoder,
                         trainable_encoder_blocks=blocks)  # fmt: skip
    vocabulary = _vocabulary()
    model.build(vocabulary)
    words = [" ".join(f"w{word}" for word in caption) for caption in make_captions(len(names) * 5)]
    captions = [words[5 * i : 5 * i + 5] for i in range(len(names))]
    if blocks:
        reader = PixelRows([Path(images_dir) / name for name in names], encoder.preprocessing, augment=True)
    else:
        cache = extract_cache(Path(work) / "cache", "finetune", images_dir, names, FeatureSpec(encoder), device, 16,
                              max(2, workers))  # fmt: skip
        reader = FeatureRows(cache.directory / "features.npy")
    dataset = ImageCaptions(reader, np.arange(len(names)), names, captions, vocabulary)
    per_step = max(1, batch_size // 5)
    sampler = ResumableSampler(dataset, num_replicas=1, rank=0, seed=0, tag_epoch=True)
    loader = DataLoader(dataset, batch_size=per_step, sampler=sampler, collate_fn=passthrough, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=device.startswith("cuda"))  # fmt: skip

    model.setup = lambda stage: None  # random weights: nothing to fetch
    return {"captions_per_s": timed_fit(model, loader, device, steps, warmup), "images_per_step": per_step,
            "trainable_blocks": trainable}  # fmt: skip


def ours_decode(
    features_file: str, count: int, device: str, beam_size: int, batch_size: int, bf16: bool = False,
    decoder: str = "lstm",
) -> dict:  # fmt: skip
    import contextlib

    import torch

    from captioner.core.hardware import CPU_BF16_REQUIREMENT, bf16_autocast_available

    if bf16 and not bf16_autocast_available(device):
        where = "GPU" if device.startswith("cuda") else f"CPU (bf16 needs {CPU_BF16_REQUIREMENT})"
        return {"unsupported": f"not supported on this {where}"}
    from captioner.models import captioning

    model = _model(decoder, beam_size).to(device).eval()
    config = model.decoding
    features = torch.from_numpy(np.asarray(np.load(features_file, mmap_mode="r")[:count], dtype=np.float32))
    # What `--trainer.precision bf16-mixed` does around test and predict steps.
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        captioning.decode_features(model, features[:batch_size].to(device), config)  # warm-up
        _sync(device)
        started, lengths = time.perf_counter(), []
        for start in range(0, count, batch_size):
            batch = features[start : start + batch_size].to(device, non_blocking=True)
            result = captioning.decode_features(model, batch, config)
            lengths.append(result.best_lengths)
        _sync(device)
    elapsed = time.perf_counter() - started
    return {"captions_per_s": count / elapsed, "mean_length": float(torch.cat(lengths).float().mean())}


def ours_prefix_decode(features_file: str, count: int, device: str, batch_size: int, words: int,
                       cached: bool) -> dict:  # fmt: skip
    """Transformer greedy decoding of `words` words, with the key/value cache or recomputing the whole prefix."""
    import torch

    from captioner.decoding import DecodingConfig, SpecialTokens
    from captioner.models.stepping import decode_with

    model = _model("transformer").to(device).eval()
    decoder, special = model.decoder, SpecialTokens.of(model.vocabulary)
    features = torch.from_numpy(np.asarray(np.load(features_file, mmap_mode="r")[:count], dtype=np.float32))

    def decode(batch: torch.Tensor) -> torch.Tensor:
        if cached:
            return decode_with(decoder, batch, DecodingConfig(num_beams=1), special, words - 1).best_tokens
        prefix = torch.full((len(batch), 1), special.start, device=batch.device)
        for _ in range(words):  # the whole prefix through the model at every step
            logits = decoder(batch, prefix).logits[:, -1].float()
            logits[:, list(special.banned)] = float("-inf")
            prefix = torch.cat([prefix, logits.argmax(-1, keepdim=True)], dim=1)
        return prefix[:, 1:]

    with torch.no_grad():
        decode(features[:batch_size].to(device))  # warm-up
        _sync(device)
        started = time.perf_counter()
        for start in range(0, count, batch_size):
            tokens = decode(features[start : start + batch_size].to(device))
        _sync(device)
    return {"captions_per_s": count / (time.perf_counter() - started), "words": int(tokens.shape[1])}


def write_checkpoint(path: str) -> dict:
    """The benchmark's LSTM model as a checkpoint file (what `serve` and `export` take)."""
    import torch

    from captioner.compat.checkpoints import meta_of

    model = _model("lstm")
    torch.save({"state_dict": model.state_dict(), "captioner": meta_of(model)}, path)
    return {"written": path}


def export_models(checkpoint: str, folder: str, calibration_dir: str) -> dict:
    """Export the checkpoint four ways: fp32; int8 decoder; int8 decoder and dynamic int8 encoder; int8 decoder and
    static int8 encoder calibrated on `calibration_dir`."""
    from captioner.export.onnx import export_onnx
    from captioner.models.module import CaptionModel

    for name, quantize, encoder, calibration in (("fp32", None, False, None), ("int8", "int8", False, None),
                                                 ("int8-all", "int8", True, None),
                                                 ("int8-static", "int8", True, calibration_dir)):  # fmt: skip
        export_onnx(CaptionModel.from_checkpoint(checkpoint), Path(folder) / name, quantize, encoder, calibration, 32)
    return {"exported": folder}


def onnx_extract(folder: str, images_dir: str, names: list[str], batch_size: int) -> dict:
    """ONNX Runtime extraction, file to features: decode and resize (NumPy), then the encoder graph."""
    from captioner.runtime import OnnxCaptioner

    runtime = OnnxCaptioner(folder)
    paths = [Path(images_dir) / name for name in names]
    runtime.features(np.stack([runtime._pixels(p) for p in paths[:2]]))  # warm-up
    started = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        runtime.features(np.stack([runtime._pixels(p) for p in paths[start : start + batch_size]]))
    return {"images_per_s": len(paths) / (time.perf_counter() - started), "images": len(paths)}


def onnx_decode(folder: str, features_file: str, count: int, beam_size: int, batch_size: int) -> dict:
    """ONNX Runtime decoding of cached features, search in NumPy."""
    from captioner.runtime import OnnxCaptioner

    runtime = OnnxCaptioner(folder, num_beams=beam_size)
    features = np.asarray(np.load(features_file, mmap_mode="r")[:count], dtype=np.float32)
    runtime.decode_features(features[:batch_size])  # warm-up
    started, lengths = time.perf_counter(), []
    for start in range(0, count, batch_size):
        lengths.append(runtime.decode_features(features[start : start + batch_size]).best_lengths)
    return {"captions_per_s": count / (time.perf_counter() - started),
            "mean_length": float(np.concatenate(lengths).mean())}  # fmt: skip


def api_throughput(checkpoint: str, images_dir: str, names: list[str], batch_size: int) -> dict:
    """The Captioner API's own batch throughput and its time for one image, on the files the server gets."""
    from captioner import Captioner

    captioner = Captioner.from_checkpoint(checkpoint, device="cpu", batch_size=batch_size)
    paths = [Path(images_dir) / name for name in names]
    captioner.predict(paths[:2])  # warm-up
    started = time.perf_counter()
    captioner.predict(paths)
    batch_rate = len(paths) / (time.perf_counter() - started)
    singles = []
    for path in paths[:20]:
        started = time.perf_counter()
        captioner.predict([path])
        singles.append(time.perf_counter() - started)
    return {"images_per_s": batch_rate, "single_ms": 1000 * float(np.median(singles))}


def server_throughput(checkpoint: str, images_dir: str, names: list[str], clients: int, batch_size: int) -> dict:
    """`python -m captioner serve` on 127.0.0.1: images/s with `clients` concurrent clients, and one-request latency."""
    import signal
    import socket
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "captioner", "serve", "--ckpt_path", checkpoint, "--port", str(port), "--device",
               "cpu", "--max_batch_size", str(batch_size), "--batch_timeout", "0.005", "--num_return", "1"]  # fmt: skip
    server = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).text == "ok":
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        bodies = [(Path(images_dir) / name).read_bytes() for name in names]
        with httpx.Client(timeout=300) as client:

            def ask(data: bytes) -> tuple[float, float]:
                """The request's latency, and the server's own time for it: decoding the image and the model."""
                started = time.perf_counter()
                response = client.post(f"{url}/predict", files={"image": ("image.jpg", data)}, data={"num_return": "1"})
                response.raise_for_status()
                times = response.json()["time_ms"]
                return time.perf_counter() - started, (times["decode"] + times["model"]) / 1000

            for data in bodies[:3]:
                ask(data)  # warm-up
            singles = [ask(data) for data in bodies[:20]]
            with ThreadPoolExecutor(clients) as pool:
                started = time.perf_counter()
                list(pool.map(ask, bodies))
                rate = len(bodies) / (time.perf_counter() - started)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    # The overhead is measured on the same requests as the model time it is set against: this machine's
    # speed drifts between phases more than the overhead is worth.
    latencies, model_times = np.array(singles).T
    return {"images_per_s": rate, "single_ms": 1000 * float(np.median(latencies)), "clients": clients,
            "model_ms": 1000 * float(np.median(model_times)),
            "overhead_ms": 1000 * float(np.median(latencies - model_times))}  # fmt: skip


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


# ------------------------------------------------------------------ main
SIZES = {
    # images generated and extracted; original_* the (slower) original side; train_* feature rows per training set
    "quick": dict(
        images=32,
        original_images=8,
        train_small=400,
        train_large=1600,
        steps=15,
        original_steps=2,
        original_images_per_batch=4,
        decode=512,
        original_decode=3,
        serve=48,
    ),
    "full": dict(
        images=256,
        original_images=48,
        train_small=4000,
        train_large=16000,
        steps=100,
        original_steps=8,
        original_images_per_batch=8,
        decode=4096,
        original_decode=10,
        serve=128,
    ),
    # A GPU finishes the full sizes in fractions of a second: rates need more work to be steady.
    "gpu": dict(
        images=8192,
        original_images=128,
        train_small=16000,
        train_large=64000,
        steps=200,
        original_steps=8,
        original_images_per_batch=8,
        decode=16384,
        original_decode=20,
        serve=128,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: about 12 minutes on a 2-core CPU")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: 5,000 on a CPU, 10,000 "
                        "on a GPU, as the GPU targets are stated)")  # fmt: skip
    parser.add_argument("--only", default=None, help="comma-separated phases to run, `name*` for all starting "
                        "so (e.g. 'greedy,beam3,orig_decode,prefix_*'); extraction always runs")  # fmt: skip
    options = parser.parse_args()
    global ONLY
    ONLY = tuple(options.only.split(",")) if options.only else None

    import torch

    device = options.device if options.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    profile = "quick" if options.quick else "gpu" if cuda else "full"
    sizes = SIZES[profile]
    workers = min(16, os.cpu_count() or 1)
    # CPU: decoding images is cheap next to the ResNet, so one worker does best on few cores.
    extract_batch, train_batch, decode_batch = (None, 1024, 1024) if cuda else (None, 128, 1024)
    workers = workers if cuda else 1
    os.environ["CAPTIONER_BENCHMARK_VOCAB"] = str(options.vocab or (10_000 if cuda else 5_000))
    from captioner.core.hardware import describe_cpu

    hardware = torch.cuda.get_device_name(0) if cuda else describe_cpu()
    print(f"captioner benchmark on {hardware} ({profile} sizes, "
          f"{os.environ['CAPTIONER_BENCHMARK_VOCAB']}-word vocabulary)", flush=True)  # fmt: skip

    from captioner.data.synthetic import write_synthetic_dataset

    with tempfile.TemporaryDirectory(prefix="captioner-bench-") as tmp:
        tmp = Path(tmp)
        root = write_synthetic_dataset(tmp / "scenes", sizes["images"], seed=0, width=640, height=480)
        names = sorted(p.name for p in (root / "Images").iterdir())
        images_dir = str(root / "Images")
        r = {}
        measure(
            r,
            "extract_half",
            "ours: extraction (half the images)",
            ours_extract,
            images_dir=images_dir,
            names=names[: len(names) // 2],
            work=str(tmp / "e1"),
            device=device,
            batch_size=extract_batch,
            workers=workers,
        )
        measure(
            r,
            "extract",
            "ours: extraction",
            ours_extract,
            images_dir=images_dir,
            names=names,
            work=str(tmp / "e2"),
            device=device,
            batch_size=extract_batch,
            workers=workers,
        )
        for name in ENCODERS:
            if name != "resnet50":  # one encoder of each family beside the default, on the same images
                measure(r, f"extract_{name}", f"ours: extraction, {name}", ours_extract, images_dir=images_dir,
                        names=names[: max(8, len(names) // 4)], work=str(tmp / f"e-{name}"), device=device,
                        batch_size=extract_batch, workers=workers, encoder=name)  # fmt: skip
        measure(r, "extract_shards", "ours: extraction from tar shards", ours_extract_shards, images_dir=images_dir,
                names=names, work=str(tmp / "e-shards"), device=device, batch_size=extract_batch,
                workers=workers)  # fmt: skip
        measure(
            r,
            "orig_extract",
            "original: extraction (batch 1)",
            original_extract,
            images_dir=images_dir,
            names=names[: sizes["original_images"]],
            work=str(tmp),
            device=device,
        )

        extracted = np.load(next((tmp / "e2" / "cache").glob("features.npy")), mmap_mode="r")
        small = make_feature_file(tmp / "small.npy", extracted, sizes["train_small"])
        large = make_feature_file(tmp / "large.npy", extracted, sizes["train_large"])
        # CPU: two loader workers leave the cores to the model; a GPU needs more to keep it fed.
        train = dict(device=device, batch_size=train_batch, steps=sizes["steps"], warmup=3, workers=8 if cuda else 2)
        measure(
            r,
            "train_small",
            "ours: training (small set)",
            ours_train,
            features_file=str(small),
            images=sizes["train_small"],
            **train,
        )
        measure(
            r,
            "train",
            "ours: training (4x the images)",
            ours_train,
            features_file=str(large),
            images=sizes["train_large"],
            **train,
        )
        measure(r, "train_disk", "ours: training, features read from disk", ours_train, features_file=str(large),
                images=sizes["train_large"], resident=False, **train)  # fmt: skip
        measure(
            r,
            "orig_train",
            "original: prefix-expansion training",
            original_train,
            features_file=str(small),
            images=sizes["train_small"],
            device=device,
            images_per_batch=sizes["original_images_per_batch"],
            steps=sizes["original_steps"],
        )
        decoding = (
            ("greedy", "ours: greedy decoding", 1, False),
            ("greedy_bf16", "ours: greedy decoding, bf16 autocast", 1, True),
            ("beam3", "ours: beam-3 decoding", 3, False),
            ("beam5", "ours: beam-5 decoding", 5, False),
        )
        for key, label, beam_size, bf16 in decoding:
            measure(r, key, label, ours_decode, features_file=str(large), count=sizes["decode"], device=device,
                    beam_size=beam_size, batch_size=decode_batch, bf16=bf16)  # fmt: skip
        if cuda:  # launch-bound on a GPU: a wider batch shows what the device itself sustains
            measure(r, "beam3_wide", "ours: beam-3 decoding, 4x batch", ours_decode, features_file=str(large),
                    count=sizes["decode"], device=device, beam_size=3, batch_size=4 * decode_batch)  # fmt: skip
        else:
            r["beam3_wide"] = {"unsupported": "measured on a GPU only"}
        measure(
            r,
            "orig_decode",
            "original: per-word decoding",
            original_decode,
            features_file=str(small),
            count=sizes["original_decode"],
            device=device,
        )

        # The Transformer on the grid of regions, against the LSTM on the same images.
        grid = make_feature_file(tmp / "grid.npy", extracted, sizes["train_small"], regions=GRID_REGIONS)
        count = min(sizes["decode"], sizes["train_small"])
        for name, share in (("transformer", 1), ("transformer-512", 4)):  # the large one on a quarter: rates only
            steps = {**train, "steps": max(5, train["steps"] // share)}
            measure(r, f"train_{name}", f"ours: training, {name}", ours_train, features_file=str(grid),
                                           images=sizes["train_small"], decoder=name, **steps)  # fmt: skip
            measure(r, f"beam3_{name}", f"ours: beam-3 decoding, {name}", ours_decode, features_file=str(grid),
                                           count=count // share, device=device, beam_size=3,
                                           batch_size=decode_batch // 4, decoder=name)  # fmt: skip
        measure(r, "train_transformer_disk", "ours: training, transformer, grid from disk", ours_train,
                features_file=str(grid), images=sizes["train_small"], decoder="transformer", resident=False,
                **train)  # fmt: skip
        measure(r, "train_transformer_per_image", "ours: training, transformer, per-image items", ours_train,
                                                     features_file=str(grid), images=sizes["train_small"],
                                                     decoder="transformer", per_image=True, **train)  # fmt: skip
        measure(r, "train_small_per_image", "ours: training, lstm, per-image items", ours_train,
                                               features_file=str(small), images=sizes["train_small"],
                                               per_image=True, **train)  # fmt: skip
        # Streamed shards against the memory-mapped cache, the same rows, one caption per item both.
        measure(r, "train_per_caption_disk", "ours: training, lstm, per-caption items from disk", ours_train,
                features_file=str(large), images=sizes["train_large"], resident=False, **train)  # fmt: skip
        measure(r, "train_streamed", "ours: training, lstm, streamed shards", ours_train_streamed,
                features_file=str(large), images=sizes["train_large"], work=str(tmp / "stream"),
                **{k: v for k, v in train.items() if k != "workers"}, workers=train["workers"])  # fmt: skip
        # The prefix LM (GPT-2 small's shape): a fraction of the steps and images, rates only.
        prefix_share = 4 if cuda else 16
        for name in ("prefix-frozen", "prefix-trained"):
            measure(r, f"train_{name}", f"ours: training, {name}", ours_train, features_file=str(small),
                    images=sizes["train_small"], decoder=name,
                    **{**train, "steps": max(3, train["steps"] // prefix_share),
                       "batch_size": max(16, train_batch // (1 if cuda else 4))})  # fmt: skip
        measure(r, "beam3_prefix", "ours: beam-3 decoding, prefix LM", ours_decode, features_file=str(small),
                count=max(32, count // prefix_share), device=device, beam_size=3, batch_size=decode_batch // 16,
                decoder="prefix-frozen")  # fmt: skip
        # The encoder fine-tuned from the images (online features) against the same encoder frozen on its cache.
        tuning = dict(images_dir=images_dir, names=names, device=device, batch_size=train_batch,
                      steps=max(5, sizes["steps"] // 3), warmup=2, workers=2)  # fmt: skip
        measure(r, "train_encoder_frozen", "ours: training, resnet18 112 px frozen", ours_train_encoder,
                work=str(tmp / "tune-frozen"), trainable="0", **tuning)  # fmt: skip
        measure(r, "train_encoder_tuned", "ours: training, resnet18 fine-tuned", ours_train_encoder,
                work=str(tmp / "tune"), trainable="all", **tuning)  # fmt: skip
        measure(r, "beam3_lstm_same", "ours: beam-3 decoding, lstm (same batches)", ours_decode,
                                         features_file=str(small), count=count, device=device, beam_size=3,
                                         batch_size=decode_batch // 4)  # fmt: skip
        for cached in (True, False):
            measure(r, f"prefix_{'cached' if cached else 'recomputed'}",
                f"ours: transformer greedy, 20 words, {'cached' if cached else 'recomputed'}", ours_prefix_decode,
                features_file=str(grid), count=min(256, count), device=device, batch_size=decode_batch // 4,
                words=20, cached=cached,
            )  # fmt: skip

        # Exported: ONNX Runtime on the CPU, fp32 and dynamic int8, against PyTorch and the original.
        if not cuda:
            checkpoint, exported = str(tmp / "model.ckpt"), tmp / "onnx"
            run_phase("write a checkpoint", write_checkpoint, path=checkpoint)
            run_phase("export to ONNX (fp32, int8)", export_models, checkpoint=checkpoint, folder=str(exported),
                      calibration_dir=images_dir)  # fmt: skip
            for precision in ("fp32", "int8", "int8-all", "int8-static"):
                measure(r, f"onnx_extract_{precision}",
                    f"onnx: extraction, {precision}", onnx_extract, folder=str(exported / precision),
                    images_dir=images_dir, names=names, batch_size=8)  # fmt: skip
            for precision in ("fp32", "int8"):
                for key, beam_size in (("greedy", 1), ("beam3", 3)):
                    measure(r, f"onnx_{key}_{precision}",
                        f"onnx: {key} decoding, {precision}", onnx_decode, folder=str(exported / precision),
                        features_file=str(large), count=sizes["decode"], beam_size=beam_size,
                        batch_size=decode_batch,
                    )  # fmt: skip
            # Serving: the server under 32 concurrent clients against the Python API's batches, same files.
            served = (names * ((sizes["serve"] + len(names) - 1) // len(names)))[: sizes["serve"]]
            measure(r, "api", "api: Captioner batches", api_throughput, checkpoint=checkpoint,
                                 images_dir=images_dir, names=served, batch_size=16)  # fmt: skip
            measure(r, "server", "server: 32 concurrent clients", server_throughput, checkpoint=checkpoint,
                                    images_dir=images_dir, names=served, clients=32, batch_size=16)  # fmt: skip

    print_report(r, sizes, len(names), hardware, options.json)


def _figure(r: dict, phase: str, metric: str) -> float | None:
    """A phase's figure, or None when the phase could not run here."""
    return r.get(phase, {}).get(metric)


def _why_missing(r: dict, phase: str) -> str:
    return r.get(phase, {}).get("unsupported", "not run")


# (title, left column, right column, rows of (label, left phase, right phase, metric))
SECTIONS = (
    ("against the original approach", "captioner", "original", (
        ("extraction (images/s)", "extract", "orig_extract", "images_per_s"),
        ("training (captions/s)", "train", "orig_train", "captions_per_s"),
        ("training, read from disk (captions/s)", "train_disk", "orig_train", "captions_per_s"),
        ("greedy decoding (captions/s)", "greedy", "orig_decode", "captions_per_s"),
        ("beam-3 decoding (captions/s)", "beam3", "orig_decode", "captions_per_s"),
        ("beam-5 decoding (captions/s)", "beam5", "orig_decode", "captions_per_s"),
        ("beam-3, 4x batch (captions/s)", "beam3_wide", "orig_decode", "captions_per_s"),
        ("greedy, bf16 autocast (captions/s)", "greedy_bf16", "orig_decode", "captions_per_s"),
    )),
    ("Transformer (grid) against the LSTM (pooled), same images", "Transformer", "LSTM", (
        ("training (captions/s)", "train_transformer", "train_small", "captions_per_s"),
        ("training, grid read from disk (c./s)", "train_transformer_disk", "train_small", "captions_per_s"),
        ("training, per-image items (capt./s)", "train_transformer_per_image", "train_small_per_image",
         "captions_per_s"),
        ("beam-3 decoding (captions/s)", "beam3_transformer", "beam3_lstm_same", "captions_per_s"),
        ("training, 512 wide (captions/s)", "train_transformer-512", "train_small", "captions_per_s"),
        ("beam-3, 512 wide (captions/s)", "beam3_transformer-512", "beam3_lstm_same", "captions_per_s"),
    )),
    ("prefix GPT-2 (12 x 768, 50,259 tokens, prefix 40) against the LSTM", "prefix LM", "LSTM", (
        ("training, LM frozen (captions/s)", "train_prefix-frozen", "train_small", "captions_per_s"),
        ("training, LM trained (captions/s)", "train_prefix-trained", "train_small", "captions_per_s"),
        ("beam-3 decoding (captions/s)", "beam3_prefix", "beam3_lstm_same", "captions_per_s"),
    )),
    ("prefix GPT-2 against the Transformer (256 wide)", "prefix LM", "Transformer", (
        ("training, LM frozen (captions/s)", "train_prefix-frozen", "train_transformer", "captions_per_s"),
        ("training, LM trained (captions/s)", "train_prefix-trained", "train_transformer", "captions_per_s"),
        ("beam-3 decoding (captions/s)", "beam3_prefix", "beam3_transformer", "captions_per_s"),
    )),
    ("streamed feature shards (LitData) against the memory-mapped cache", "streamed", "cache", (
        ("training, per-caption items (capt./s)", "train_streamed", "train_per_caption_disk", "captions_per_s"),
        ("extraction, tar shards vs folder (img/s)", "extract_shards", "extract", "images_per_s"),
    )),
    ("image encoders, extraction against the ResNet50 default", "encoder", "ResNet50", (
        ("timm convnext_tiny (images/s)", "extract_timm_convnext_tiny", "extract", "images_per_s"),
        ("OpenCLIP ViT-B-32 (images/s)", "extract_open_clip_vit_b32", "extract", "images_per_s"),
        ("HF DINOv2-small (images/s)", "extract_hf_dinov2_small", "extract", "images_per_s"),
    )),
    ("encoder fine-tuned from images, against frozen on cached features", "tuned", "frozen", (
        ("ResNet18 112 px + LSTM (captions/s)", "train_encoder_tuned", "train_encoder_frozen", "captions_per_s"),
    )),
    ("Transformer greedy decoding of 20 words", "kv cache", "recomputed", (
        ("captions/s", "prefix_cached", "prefix_recomputed", "captions_per_s"),
    )),
    ("exported, ONNX Runtime (CPU), against the original approach", "ONNX", "original", (
        ("extraction fp32 (images/s)", "onnx_extract_fp32", "orig_extract", "images_per_s"),
        ("extraction int8 dynamic (images/s)", "onnx_extract_int8-all", "orig_extract", "images_per_s"),
        ("extraction int8 static (images/s)", "onnx_extract_int8-static", "orig_extract", "images_per_s"),
        ("greedy fp32 (captions/s)", "onnx_greedy_fp32", "orig_decode", "captions_per_s"),
        ("greedy int8 (captions/s)", "onnx_greedy_int8", "orig_decode", "captions_per_s"),
        ("beam-3 fp32 (captions/s)", "onnx_beam3_fp32", "orig_decode", "captions_per_s"),
        ("beam-3 int8 (captions/s)", "onnx_beam3_int8", "orig_decode", "captions_per_s"),
    )),
    ("exported, ONNX Runtime, against PyTorch", "ONNX", "PyTorch", (
        ("extraction fp32 (images/s)", "onnx_extract_fp32", "extract", "images_per_s"),
        ("extraction int8 dynamic (images/s)", "onnx_extract_int8-all", "extract", "images_per_s"),
        ("extraction int8 static (images/s)", "onnx_extract_int8-static", "extract", "images_per_s"),
        ("greedy int8 (captions/s)", "onnx_greedy_int8", "greedy", "captions_per_s"),
        ("beam-3 int8 (captions/s)", "onnx_beam3_int8", "beam3", "captions_per_s"),
    )),
    ("serving, same images", "server", "API", (
        ("32 clients vs batches (images/s)", "server", "api", "images_per_s"),
        ("one request vs the model (ms)", "server", "api", "single_ms"),
        ("the server's own time for it (ms)", "server", "api", "model_ms"),
        ("overhead per request (ms)", "server", "-", "overhead_ms"),
    )),
)  # fmt: skip
TABLE = SECTIONS[0][3]


def print_report(r: dict, sizes: dict, images: int, hardware: str, json_path: Path | None) -> None:
    """The table, memory lines and `name: value` summary; a phase that could not run says why, the rest print."""
    summary: dict[str, object] = {"hardware": hardware}
    for title, left, right, rows in SECTIONS:
        print(f"\n{title}\n{'phase':<36}{left:>14}{right:>14}{'ratio':>10}")
        for label, ours, other, metric in rows:
            mine, theirs = _figure(r, ours, metric), _figure(r, other, metric)
            summary[f"{ours}_{metric}"] = mine
            if mine is None:
                print(f"{label:<36}  {_why_missing(r, ours)}")
                continue
            ratio = mine / theirs if theirs else None
            summary[f"{ours}_{metric}_vs_{other}"] = ratio  # a phase may be compared with several others
            shown = f"{theirs:>14,.2f}{ratio:>9.2f}x" if ratio is not None else f"{'-':>14}"
            print(f"{label:<36}{mine:>14,.1f}{shown}")
    print(f"\n{'peak memory (MB): anon / resident':<44}{'captioner':>18}{'original':>18}")
    for label, ours, original in (("extraction", "extract", "orig_extract"), ("training", "train", "orig_train"),
                                  ("decoding (greedy)", "greedy", "orig_decode")):  # fmt: skip
        cells = []
        for phase in (ours, original):
            anon, rss = _figure(r, phase, "peak_anon_mb"), _figure(r, phase, "peak_rss_mb")
            cells.append(f"{anon:>9.0f} /{rss:>6.0f}" if anon is not None else f"{'-':>16}")
        print(f"{label:<44}{cells[0]:>18}{cells[1]:>18}")
    for label, small, large, counts in (
        ("training anon memory", "train_small", "train", (sizes["train_small"], sizes["train_large"])),
        ("extraction anon memory", "extract_half", "extract", (images // 2, images)),
    ):
        a, b = _figure(r, small, "peak_anon_mb"), _figure(r, large, "peak_anon_mb")
        if a is not None and b is not None:
            print(f"{label}, {counts[0]:,} vs {counts[1]:,} images: {a:.0f} MB vs {b:.0f} MB")
            summary[f"{large}_peak_anon_mb_small"], summary[f"{large}_peak_anon_mb_large"] = a, b
    if json_path:
        json_path.write_text(json.dumps({"summary": summary, "phases": r}, indent=1))
    print()
    for key, value in summary.items():
        print(f"{key}: {value:.2f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    random.seed(0)
    main()
