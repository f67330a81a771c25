"""Train the offline demo twice, with and without image features, and compare on held-out images.

    python scripts/demo_check.py            # about 2 minutes on a 2-core CPU

Prints the test metrics (pycocoevalcap) of the captioning model and of the blind baseline (the
same decoder trained with the image features zeroed), and how often the
generated caption names the main object's colour correctly. Extra arguments
go to both runs, e.g. `--trainer.max_epochs 20`.
"""

from __future__ import annotations

import json
import sys

from captioner.cli import main
from captioner.data.synthetic import first_colour, scene_colours
from captioner.runs import run_dir


def run(extra: list[str]) -> tuple[dict, float]:
    cli = main(["fit", "--config", "configs/demo.yaml", "--trainer.enable_progress_bar", "false", *extra])
    folder = run_dir(cli.trainer)
    metrics = json.loads((folder / "test_metrics.json").read_text())["metrics"]["pycocoevalcap"]
    truth = scene_colours(cli.datamodule.images_dir.parent / cli.datamodule.hparams.captions_file)
    rows = [json.loads(line) for line in (folder / "test_captions.jsonl").read_text().splitlines()]
    colour_accuracy = sum(first_colour(r["caption"]) == truth[r["file_name"]] for r in rows) / len(rows)
    return metrics, colour_accuracy


if __name__ == "__main__":
    extra = sys.argv[1:]
    model_metrics, model_colour = run(extra)
    blind_metrics, blind_colour = run([*extra, "--model.blind", "true"])
    print(f"\n{'held-out test (0-100)':<24}{'model':>10}{'blind':>10}{'gain':>10}")
    for name in model_metrics:
        model, blind = model_metrics[name], blind_metrics[name]
        print(f"{name:<24}{model:>10.2f}{blind:>10.2f}{model - blind:>10.2f}")
    print(f"{'main colour correct (%)':<24}{100 * model_colour:>10.1f}{100 * blind_colour:>10.1f}")
    print(f"bleu4_gain: {model_metrics['BLEU-4'] - blind_metrics['BLEU-4']:.2f}")
    print(f"colour_accuracy: {100 * model_colour:.1f}")
