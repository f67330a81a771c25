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
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench import harness  # noqa: E402  (after the path: the phases live beside this script)
from bench.common import MAX_LENGTH  # noqa: E402
from bench.data import make_feature_file  # noqa: E402
from bench.decoding import LM_FAMILIES, exported_lm_decode, ours_decode, ours_prefix_decode  # noqa: E402
from bench.extraction import ENCODERS, ours_extract, ours_extract_shards  # noqa: E402
from bench.harness import measure, run_phase  # noqa: E402
from bench.original import original_decode, original_extract, original_train  # noqa: E402
from bench.report import print_report  # noqa: E402
from bench.scale import caption_files, caption_set, image_folder, records_pass  # noqa: E402
from bench.serving import (  # noqa: E402
    api_throughput,
    export_models,
    onnx_decode,
    onnx_extract,
    server_throughput,
    write_checkpoint,  # noqa: E402
)
from bench.training import GRID_REGIONS, ours_train, ours_train_encoder, ours_train_streamed  # noqa: E402

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
        records=(10_000, 100_000),
        bulk=384,
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
        records=(100_000, 1_000_000),
        bulk=2048,
    ),
    # Every phase at the least size it runs with: scripts/gpu_check.py's dry run on a CPU (figures meaningless).
    "dry": dict(
        images=8,
        original_images=2,
        train_small=64,
        train_large=128,
        steps=2,
        original_steps=1,
        original_images_per_batch=2,
        decode=16,
        original_decode=1,
        serve=4,
        records=(1_000, 2_000),
        bulk=8,
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
        records=(100_000, 1_000_000),
        bulk=8192,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: about 12 minutes on a 2-core CPU")
    parser.add_argument(
        "--sizes",
        choices=sorted(SIZES),
        default=None,
        help="the size profile (default: quick with --quick, else gpu on a GPU and full on a CPU)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--vocab",
        type=int,
        default=None,
        help="vocabulary size (default: 5,000 on a CPU, 10,000 on a GPU, as the GPU targets are stated)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated phases to run, `name*` for all starting "
        "so (e.g. 'greedy,beam3,orig_decode,prefix_*'); extraction always runs",
    )
    options = parser.parse_args()
    harness.ONLY = tuple(options.only.split(",")) if options.only else None
    harness.PARTIAL = str(options.json.with_suffix(".partial.json")) if options.json else None

    import torch

    device = options.device if options.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    profile = options.sizes or ("quick" if options.quick else "gpu" if cuda else "full")
    sizes = SIZES[profile]
    workers = min(16, os.cpu_count() or 1)
    # CPU: decoding images is cheap next to the ResNet, so one worker does best on few cores.
    extract_batch, train_batch, decode_batch = (None, 1024, 1024) if cuda else (None, 128, 1024)
    workers = workers if cuda else 1
    os.environ["CAPTIONER_BENCHMARK_VOCAB"] = str(options.vocab or (10_000 if cuda else 5_000))
    from captioner.core.hardware import describe_cpu

    hardware = torch.cuda.get_device_name(0) if cuda else describe_cpu()
    print(
        f"captioner benchmark on {hardware} ({profile} sizes, "
        f"{os.environ['CAPTIONER_BENCHMARK_VOCAB']}-word vocabulary)",
        flush=True,
    )

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
                measure(
                    r,
                    f"extract_{name}",
                    f"ours: extraction, {name}",
                    ours_extract,
                    images_dir=images_dir,
                    names=names[: max(8, len(names) // 4)],
                    work=str(tmp / f"e-{name}"),
                    device=device,
                    batch_size=extract_batch,
                    workers=workers,
                    encoder=name,
                )
        measure(
            r,
            "extract_shards",
            "ours: extraction from tar shards",
            ours_extract_shards,
            images_dir=images_dir,
            names=names,
            work=str(tmp / "e-shards"),
            device=device,
            batch_size=extract_batch,
            workers=workers,
        )
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
        measure(
            r,
            "train_disk",
            "ours: training, features read from disk",
            ours_train,
            features_file=str(large),
            images=sizes["train_large"],
            resident=False,
            **train,
        )
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
            measure(
                r,
                key,
                label,
                ours_decode,
                features_file=str(large),
                count=sizes["decode"],
                device=device,
                beam_size=beam_size,
                batch_size=decode_batch,
                bf16=bf16,
            )
        # Constraints cost what their bookkeeping costs: two forced words (one of them any of a pair), a forced
        # first word and a banned phrase, on the same batches as plain beam 3 and as long (the untrained model
        # never ends on its own; a constrained caption could end as soon as its words are in).
        measure(
            r,
            "beam3_forced",
            "ours: beam-3 decoding, constrained",
            ours_decode,
            features_file=str(large),
            count=sizes["decode"],
            device=device,
            beam_size=3,
            batch_size=decode_batch,
            overrides={
                "force_words": ["w7", ["w11", "w12"]],
                "prefix": "w3",
                "bad_words": ["w5 w6"],
                "min_length": MAX_LENGTH,
            },
        )
        if cuda:  # the step through torch.compile with CUDA graphs: a step's kernels launched as one graph
            for key, beam_size in (("greedy_compiled", 1), ("beam3_compiled", 3)):
                measure(
                    r,
                    key,
                    f"ours: {key.replace('_', ' ')} (CUDA graphs)",
                    ours_decode,
                    features_file=str(large),
                    count=sizes["decode"],
                    device=device,
                    beam_size=beam_size,
                    batch_size=decode_batch,
                    compiled=True,
                )
        if cuda:  # launch-bound on a GPU: a wider batch shows what the device itself sustains
            measure(
                r,
                "beam3_wide",
                "ours: beam-3 decoding, 4x batch",
                ours_decode,
                features_file=str(large),
                count=sizes["decode"],
                device=device,
                beam_size=3,
                batch_size=4 * decode_batch,
            )
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
            measure(
                r,
                f"train_{name}",
                f"ours: training, {name}",
                ours_train,
                features_file=str(grid),
                images=sizes["train_small"],
                decoder=name,
                **steps,
            )
            measure(
                r,
                f"beam3_{name}",
                f"ours: beam-3 decoding, {name}",
                ours_decode,
                features_file=str(grid),
                count=count // share,
                device=device,
                beam_size=3,
                batch_size=decode_batch // 4,
                decoder=name,
            )
        measure(
            r,
            "train_transformer_disk",
            "ours: training, transformer, grid from disk",
            ours_train,
            features_file=str(grid),
            images=sizes["train_small"],
            decoder="transformer",
            resident=False,
            **train,
        )
        measure(
            r,
            "train_transformer_per_image",
            "ours: training, transformer, per-image items",
            ours_train,
            features_file=str(grid),
            images=sizes["train_small"],
            decoder="transformer",
            per_image=True,
            **train,
        )
        measure(
            r,
            "train_small_per_image",
            "ours: training, lstm, per-image items",
            ours_train,
            features_file=str(small),
            images=sizes["train_small"],
            per_image=True,
            **train,
        )
        # Streamed shards against the memory-mapped cache, the same rows, one caption per item both.
        measure(
            r,
            "train_per_caption_disk",
            "ours: training, lstm, per-caption items from disk",
            ours_train,
            features_file=str(large),
            images=sizes["train_large"],
            resident=False,
            **train,
        )
        measure(
            r,
            "train_streamed",
            "ours: training, lstm, streamed shards",
            ours_train_streamed,
            features_file=str(large),
            images=sizes["train_large"],
            work=str(tmp / "stream"),
            **{k: v for k, v in train.items() if k != "workers"},
            workers=train["workers"],
        )
        # The prefix LM (GPT-2 small's shape): a fraction of the steps and images, rates only (a dry run's: tiny).
        prefix_share = 4 if cuda else 16
        dry = "-dry" if profile == "dry" else ""
        for name in ("prefix-frozen", "prefix-trained"):
            measure(
                r,
                f"train_{name}",
                f"ours: training, {name}",
                ours_train,
                features_file=str(small),
                images=sizes["train_small"],
                decoder=name + dry,
                **{
                    **train,
                    "steps": max(3, train["steps"] // prefix_share),
                    "batch_size": max(16, train_batch // (1 if cuda else 4)),
                },
            )
        measure(
            r,
            "beam3_prefix",
            "ours: beam-3 decoding, prefix LM",
            ours_decode,
            features_file=str(small),
            count=max(32, count // prefix_share),
            device=device,
            beam_size=3,
            batch_size=decode_batch // 16,
            decoder="prefix-frozen" + dry,
        )
        # The encoder fine-tuned from the images (online features) against the same encoder frozen on its cache.
        tuning = dict(
            images_dir=images_dir,
            names=names,
            device=device,
            batch_size=train_batch,
            steps=max(5, sizes["steps"] // 3),
            warmup=2,
            workers=2,
        )
        measure(
            r,
            "train_encoder_frozen",
            "ours: training, resnet18 112 px frozen",
            ours_train_encoder,
            work=str(tmp / "tune-frozen"),
            trainable="0",
            **tuning,
        )
        measure(
            r,
            "train_encoder_tuned",
            "ours: training, resnet18 fine-tuned",
            ours_train_encoder,
            work=str(tmp / "tune"),
            trainable="all",
            **tuning,
        )
        measure(
            r,
            "beam3_lstm_same",
            "ours: beam-3 decoding, lstm (same batches)",
            ours_decode,
            features_file=str(small),
            count=count,
            device=device,
            beam_size=3,
            batch_size=decode_batch // 4,
        )
        for cached in (True, False):
            measure(
                r,
                f"prefix_{'cached' if cached else 'recomputed'}",
                f"ours: transformer greedy, 20 words, {'cached' if cached else 'recomputed'}",
                ours_prefix_decode,
                features_file=str(grid),
                count=min(256, count),
                device=device,
                batch_size=decode_batch // 4,
                words=20,
                cached=cached,
            )

        # Exported: ONNX Runtime on the CPU, fp32 and dynamic int8, against PyTorch and the original.
        if not cuda:
            checkpoint, exported = str(tmp / "model.ckpt"), tmp / "onnx"
            run_phase("write a checkpoint", write_checkpoint, path=checkpoint)
            run_phase(
                "export to ONNX (fp32, int8)",
                export_models,
                checkpoint=checkpoint,
                folder=str(exported),
                calibration_dir=images_dir,
            )
            for precision in ("fp32", "int8", "int8-all", "int8-static"):
                measure(
                    r,
                    f"onnx_extract_{precision}",
                    f"onnx: extraction, {precision}",
                    onnx_extract,
                    folder=str(exported / precision),
                    images_dir=images_dir,
                    names=names,
                    batch_size=8,
                )
            for precision in ("fp32", "int8"):
                for key, beam_size in (("greedy", 1), ("beam3", 3)):
                    measure(
                        r,
                        f"onnx_{key}_{precision}",
                        f"onnx: {key} decoding, {precision}",
                        onnx_decode,
                        folder=str(exported / precision),
                        features_file=str(large),
                        count=sizes["decode"],
                        beam_size=beam_size,
                        batch_size=decode_batch,
                    )
            for family in LM_FAMILIES:  # the exported prefix decoder's step, per language model family
                measure(
                    r,
                    f"onnx_lm_{family}",
                    f"onnx: prefix LM greedy, {family}",
                    exported_lm_decode,
                    family=family,
                    work=str(tmp / "lm"),
                    count=64,
                )
            # Serving: the server under 32 concurrent clients against the Python API's batches, same files.
            served = (names * ((sizes["serve"] + len(names) - 1) // len(names)))[: sizes["serve"]]
            measure(
                r,
                "api",
                "api: Captioner batches",
                api_throughput,
                checkpoint=checkpoint,
                images_dir=images_dir,
                names=served,
                batch_size=16,
            )
            measure(
                r,
                "server",
                "server: 32 concurrent clients",
                server_throughput,
                checkpoint=checkpoint,
                images_dir=images_dir,
                names=served,
                clients=32,
                batch_size=16,
            )
            # Bulk captioning: the job, one process and two, against Captioner on the same files and batches.
            folder, many = image_folder(images_dir, names, str(tmp / "bulk-images"), sizes["bulk"])
            bulk = dict(checkpoint=checkpoint, images_dir=folder, batch_size=16, threads=4, device=device)
            measure(r, "bulk_captioner", "bulk: Captioner.predict (the engine)", caption_files, names=many, **bulk)
            for processes in (1, 2) if not cuda or torch.cuda.device_count() > 1 else (1,):
                measure(
                    r,
                    f"bulk_job_{processes}",
                    f"bulk: caption-set, {processes} process(es)",
                    caption_set,
                    work=str(tmp / "bulk"),
                    processes=processes,
                    **bulk,
                )
        # The records pass over captions-only shards: time and peak memory against the number of records.
        for count in sizes["records"]:
            measure(
                r,
                f"records_{count}",
                f"records pass, {count:,} records",
                records_pass,
                work=str(tmp / "records"),
                count=count,
            )

    print_report(r, sizes, len(names), hardware, options.json)


if __name__ == "__main__":
    random.seed(0)
    main()
