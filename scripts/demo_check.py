"""Train the offline demo with every decoder and the blind baseline, and compare them on held-out images.

    python scripts/demo_check.py                        # pooled LSTM vs blind baseline, about 3 minutes on 2 CPU cores
    python scripts/demo_check.py --all                  # adds attention, the Transformer, the prefix LM: ~15 min
    python scripts/demo_check.py --prefix               # LSTM, blind, Transformer and the prefix LM
    python scripts/demo_check.py --shards               # the scenes as COCO, and as shards (1 and 2 processes)
    python scripts/demo_check.py --all --json out.json  # also every figure as JSON
    python scripts/demo_check.py --scst                 # adds self-critical stages (both baselines) on the LSTM
    python scripts/demo_check.py --finetune             # a random ResNet18 frozen, fine-tuned, frozen then fine-tuned
    python scripts/demo_check.py --styles               # one LSTM on scenes captioned short, long and as tags

Prints the test metrics (pycocoevalcap) of each model, how often the
generated caption names the main object's colour correctly, how often the
position it states (left, right, top, bottom, middle) is right among captions
that state one, the share of distinct captions, the share of captions that end
on a dangling word (a, an, the, of, on, with, and, in) and the training time.
The blind baseline is the pooled LSTM trained with the image features zeroed:
what the language prior alone achieves. The prefix LM is a small randomly
initialised GPT-2 (2 layers, width 128) behind an MLP prefix of 4 vectors,
trained with it, over a byte-level BPE trained on the demo's captions. With --scst, two self-critical stages
start from the pooled LSTM's best checkpoint, one per baseline (the greedy
caption, or the mean reward of the other samples). Other arguments go to every
run, e.g. `--trainer.max_epochs 20`. With --finetune, the same small random
ResNet18 (64 px) and pooled LSTM, with per-image items, so only the encoder
differs: frozen for 12 epochs (features cached once); fine-tuned end to end
from the images for 12 epochs (every block, its own learning rate); and, from
the frozen run's best checkpoint, 6 more epochs either still frozen or with
the last two blocks fine-tuned (the recipe of configs/encoders/finetune.yaml).
With --styles, configs/demo_styles.yaml as shipped: one pooled LSTM on the
scenes captioned in three styles, each style's held-out scores against its own
references, beside the same model asked for each other style against those
references (the baseline: what the style changes).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from captioner.callbacks.progress import RunSummary
from captioner.cli import main
from captioner.data.splits import image_key
from captioner.data.synthetic import (
    COLOURS,
    SHAPES,
    first_colour,
    mentioned_position,
    scenes_of,
    write_synthetic_shards,
)
from captioner.evaluation.clip_score import write_random_clip
from captioner.runs import run_dir

# The demo's decoders at the demo's size (configs/demo.yaml holds the pooled LSTM).
ATTENTION = [
    "--model.decoder",
    "captioner.models.decoders.AttentionDecoder",
    "--model.decoder.embed_dim",
    "128",
    "--model.decoder.hidden_dim",
    "256",
    "--model.decoder.attention_dim",
    "256",
    "--model.decoder.dropout",
    "0.3",
]
TRANSFORMER = [
    "--model.decoder",
    "captioner.models.decoders.TransformerDecoder",
    "--model.decoder.width",
    "128",
    "--model.decoder.layers",
    "2",
    "--model.decoder.heads",
    "4",
    "--model.decoder.ffn_dim",
    "512",
    "--model.decoder.dropout",
    "0.1",
    "--model.lr",
    "0.001",
    "--model.warmup_steps",
    "100",
]
# A small GPT-2 from a config (random weights, no download), trained with a mapped prefix, writing BPE pieces.
SMALL_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 64}
PREFIX_LM = [
    "--model.decoder",
    "captioner.models.decoders.PrefixLMDecoder",
    "--model.decoder.lm",
    "null",
    "--model.decoder.lm_config",
    json.dumps(SMALL_GPT2),
    "--model.decoder.train_lm",
    "true",
    "--model.decoder.prefix_length",
    "4",
    "--model.decoder.mapper",
    "mlp",
    "--model.decoder.dropout",
    "0.1",
    "--data.tokenizer",
    "captioner.text.Bpe",
    "--data.tokenizer.vocab_size",
    "500",
    "--model.lr",
    "0.001",
    "--model.warmup_steps",
    "100",
]
DANGLING = {"a", "an", "the", "of", "on", "with", "and", "in"}
SCST = [
    "--model.objective",
    "captioner.models.objectives.SelfCritical",
    "--model.lr",
    "0.0005",
    "--model.warmup_steps",
    "0",
    "--trainer.max_epochs",
    "4",
    "--data.loading.batch_size",
    "64",
]
RESNET18 = [
    "--model.encoder.model",
    "resnet18",
    "--model.objective",
    "captioner.models.objectives.CrossEntropy",
    "--model.objective.per_image",
    "true",
    "--data.loading.batch_size",
    "32",
]
FINETUNE = {
    "ResNet18 frozen": RESNET18,
    "ResNet18 fine-tuned": [*RESNET18, "--model.trainable_encoder_blocks", "all", "--model.encoder_lr", "0.0003"],
}
SECOND_STAGE = {  # 6 more epochs from the frozen run's best checkpoint
    "frozen +6 frozen": [*RESNET18, "--trainer.max_epochs", "6", "--model.warmup_steps", "0", "--model.lr", "0.001"],
    "frozen +6 fine-tuned": [
        *RESNET18,
        "--trainer.max_epochs",
        "6",
        "--model.warmup_steps",
        "0",
        "--model.lr",
        "0.001",
        "--model.trainable_encoder_blocks",
        "2",
        "--model.encoder_lr",
        "0.0003",
    ],
}
RUNS = {
    "pooled LSTM": [],
    "blind baseline": ["--model.blind", "true"],
    "attention": ATTENTION,
    "Transformer": TRANSFORMER,
    "prefix GPT-2 (BPE)": PREFIX_LM,
}


def random_clip() -> Path:
    """A random small CLIP (no download) for the CLIPScore column: it exercises the metric on every run; with random
    weights its numbers say nothing about the captions."""
    folder = Path("data/demo/random-clip")
    if not (folder / "config.json").exists():
        words = "a an the picture photo of depicts on in at and with left right top bottom middle".split()
        write_random_clip(folder, [*words, *COLOURS, *SHAPES, "small", "large", "circle", "striped", "background"])
    return folder


def run(extra: list[str], keep: dict | None = None) -> dict:
    clip = ["--model.extra_metrics.clip_model", str(random_clip())]
    cli = main(["fit", "--config", "configs/demo.yaml", "--trainer.enable_progress_bar", "false", *clip, *extra])
    (summary,) = [c for c in cli.trainer.callbacks if isinstance(c, RunSummary)]
    if keep is not None:
        keep["checkpoint"] = cli.trainer.checkpoint_callback.best_model_path
    return scores(run_dir(cli.trainer), cli.datamodule.images_dir.parent / "captions.json", summary.fit_seconds)


def scores(folder: Path, captions_file: Path, fit_seconds: float) -> dict:
    """A run's test figures from its folder, the scenes' truth read from the COCO captions file (an image inside a
    shard, `<shard>#<key>.jpg`, is the file whose stem is its key: `write_synthetic_shards`)."""
    report = json.loads((folder / "test_metrics.json").read_text())
    truth = {image_key(name): scene for name, scene in scenes_of(captions_file).items()}
    rows = [json.loads(line) for line in (folder / "test_captions.jsonl").read_text().splitlines()]

    def scene(name: str) -> dict:
        return truth[image_key(name)]

    colour = sum(first_colour(r["caption"]) == scene(r["file_name"])["colour"] for r in rows) / len(rows)
    stated = [(mentioned_position(r["caption"]), scene(r["file_name"])["position"]) for r in rows]
    stated = [(said, true) for said, true in stated if said is not None]
    position = sum(said == true for said, true in stated) / len(stated) if stated else 0.0
    dangling = sum(r["caption"].split()[-1:] in [[word] for word in DANGLING] for r in rows) / len(rows)
    chair, confidence = report["metrics"].get("chair", {}), report["metrics"].get("confidence", {})
    clip = report["metrics"].get("clip", {})
    beyond = {
        "CHAIR-i": chair.get("CHAIR-i", float("nan")),
        "CHAIR-s": chair.get("CHAIR-s", float("nan")),
        "CLIPScore (random CLIP)": clip.get("CLIPScore", float("nan")),
        "confidence ECE": confidence.get("ECE", float("nan")),
        "token-probability ECE": confidence.get("ECE_token_probability", float("nan")),
    }
    return {
        **report["metrics"]["pycocoevalcap"],
        **beyond,
        "colour correct (%)": 100 * colour,
        "position correct (%)": 100 * position,
        "captions stating a position (%)": 100 * len(stated) / len(rows),
        "distinct captions (%)": report["diversity"]["distinct_captions"],
        "dangling last word (%)": 100 * dangling,
        "training time (s)": fit_seconds,
    }


def styles_run(extra: list[str]) -> dict:
    """configs/demo_styles.yaml: each style's held-out scores (the test report's, against its own references), and
    the same model's captions in each other style against those references (pycocoevalcap, the same scorer)."""
    from captioner import Captioner
    from captioner.data.splits import load_splits
    from captioner.evaluation.metrics import coco_caption_scores

    cli = main(["fit", "--config", "configs/demo_styles.yaml", "--trainer.enable_progress_bar", "false", *extra])
    report = json.loads((run_dir(cli.trainer) / "test_metrics.json").read_text())
    captioner = Captioner.from_checkpoint(cli.trainer.checkpoint_callback.best_model_path)
    test = load_splits(cli.datamodule.preparation.prepared().splits_file)[0]["test"]
    images = [cli.datamodule.images_dir / record.file_name for record in test]
    styles = captioner.limits.styles
    written = {style: captioner.caption(images, style=style) for style in styles}
    results = {}
    for style in styles:
        references = {str(i): list(record.captions_in(style)) for i, record in enumerate(test)}
        others = {
            other: coco_caption_scores(dict(zip(references, written[other])), references)["scores"]["CIDEr"]
            for other in styles
            if other != style
        }
        own = report["styles"][style]
        results[f"style {style}"] = {
            **own["scores"],
            "CHAIR-i": own["chair"]["CHAIR-i"] if own.get("chair") else float("nan"),
            "CIDEr, asked for another style (best)": max(others.values()),
            "mean words": sum(len(caption.split()) for caption in written[style]) / len(images),
        }
    return results


def streamed(extra: list[str], processes: int) -> dict:
    """The demo's scenes as WebDataset shards (the COCO set rewritten), trained with configs/demo.yaml as shipped,
    only `data_dir` changed, by `processes` processes streaming their features (a separate `python -m captioner
    fit`: DDP starts its second process from the command line)."""
    coco = Path("data/demo/scenes")
    shards = Path("data/demo/shards")
    if not shards.exists():
        write_synthetic_shards(coco, shards, per_shard=100)  # no junk: the same 2,400 records, the same split
    save_dir = Path(f"runs/demo-shards-{processes}")
    started = time.perf_counter()
    distributed = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "captioner",
            "fit",
            "--config",
            "configs/demo.yaml",
            "--trainer.enable_progress_bar",
            "false",
            "--data.data_dir",
            str(shards),
            "--trainer.logger.init_args.save_dir",
            str(save_dir),
            *(distributed if processes > 1 else []),
            *extra,
        ],
        check=True,
    )
    elapsed = time.perf_counter() - started
    report = max(save_dir.rglob("test_metrics.json"), key=lambda path: path.stat().st_mtime)
    return scores(report.parent, coco / "captions.json", elapsed)


if __name__ == "__main__":
    everything, scst, finetune = "--all" in sys.argv, "--scst" in sys.argv, "--finetune" in sys.argv
    prefix, shards, styles = "--prefix" in sys.argv, "--shards" in sys.argv, "--styles" in sys.argv
    json_path = Path(sys.argv[sys.argv.index("--json") + 1]) if "--json" in sys.argv else None
    flags = ("--all", "--scst", "--json", "--finetune", "--prefix", "--shards", "--styles")
    extra = [a for i, a in enumerate(sys.argv[1:], 1) if a not in flags and sys.argv[i - 1] != "--json"]
    chosen = RUNS if everything else {name: RUNS[name] for name in ("pooled LSTM", "blind baseline")}
    if prefix:
        chosen = {name: RUNS[name] for name in ("pooled LSTM", "blind baseline", "Transformer", "prefix GPT-2 (BPE)")}
    if finetune:
        chosen = {"blind baseline": RUNS["blind baseline"], **FINETUNE}
    if shards:  # the demo config as shipped, from the COCO folder and from shards: only data_dir differs
        chosen = {"blind baseline": RUNS["blind baseline"], "COCO, 1 process": []}
    if styles:  # its baseline is the same model asked for another style (the blind one knows no styles)
        chosen = {}
    start: dict = {}
    first = "ResNet18 frozen" if finetune else "COCO, 1 process" if shards else "pooled LSTM"
    results = {name: run([*extra, *args], start if name == first else None) for name, args in chosen.items()}
    if finetune:
        for name, args in SECOND_STAGE.items():
            results[name] = run([*extra, *args, "--model.init_checkpoint", start["checkpoint"]])
    if shards:
        results["shards, 1 process"] = streamed(extra, 1)
        results["shards, 2 processes"] = streamed(extra, 2)
    if styles:
        results.update(styles_run(extra))
    if scst:
        for baseline in ("greedy", "mean"):
            results[f"SCST, {baseline}"] = run(
                [*extra, *SCST, "--model.objective.baseline", baseline, "--model.init_checkpoint", start["checkpoint"]]
            )
    print(f"\n{'held-out test (0-100)':<32}" + "".join(f"{name:>20}" for name in results))
    for metric in next(iter(results.values())):
        print(f"{metric:<32}" + "".join(f"{r[metric]:>20.2f}" for r in results.values()))
    if json_path:
        json_path.write_text(json.dumps(results, indent=1))
    blind = results.get("blind baseline")
    for name, result in results.items():
        if blind is not None and name != "blind baseline":
            print(f"{name} BLEU-4 gain over the blind baseline: {result['BLEU-4'] - blind['BLEU-4']:.2f}")
    if "prefix GPT-2 (BPE)" in results:
        print(
            f"prefix GPT-2 CIDEr minus pooled LSTM CIDEr: "
            f"{results['prefix GPT-2 (BPE)']['CIDEr'] - results['pooled LSTM']['CIDEr']:.2f}"
        )
    if "Transformer" in results:
        print(
            f"Transformer CIDEr minus pooled LSTM CIDEr: "
            f"{results['Transformer']['CIDEr'] - results['pooled LSTM']['CIDEr']:.2f}"
        )
