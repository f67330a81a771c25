"""Train the offline demo with and without image features (and with attention) and compare on held-out images.

    python scripts/demo_check.py                   # pooled LSTM vs blind baseline, about 2 minutes on 2 CPU cores
    python scripts/demo_check.py --attention       # adds the attention decoder, about 2 minutes more

Prints the test metrics (pycocoevalcap) of each model: the captioning model,
the blind baseline (the same decoder trained with the image features zeroed)
and, with --attention, the Show-Attend-Tell decoder over the grid of regions.
Also how often the generated caption names the main object's colour
correctly, and how often the position it states (left, right, top, bottom,
middle) is right, among captions that state one. Other arguments go to every
run, e.g. `--trainer.max_epochs 20`.
"""

from __future__ import annotations

import json
import sys

from captioner.cli import main
from captioner.data.synthetic import first_colour, mentioned_position, scenes_of
from captioner.runs import run_dir


def run(extra: list[str]) -> dict:
    cli = main(["fit", "--config", "configs/demo.yaml", "--trainer.enable_progress_bar", "false", *extra])
    folder = run_dir(cli.trainer)
    metrics = json.loads((folder / "test_metrics.json").read_text())["metrics"]["pycocoevalcap"]
    truth = scenes_of(cli.datamodule.images_dir.parent / cli.datamodule.hparams.captions_file)
    rows = [json.loads(line) for line in (folder / "test_captions.jsonl").read_text().splitlines()]
    colour = sum(first_colour(r["caption"]) == truth[r["file_name"]]["colour"] for r in rows) / len(rows)
    stated = [(mentioned_position(r["caption"]), truth[r["file_name"]]["position"]) for r in rows]
    stated = [(said, true) for said, true in stated if said is not None]
    position = sum(said == true for said, true in stated) / len(stated) if stated else 0.0
    return {**metrics, "colour correct (%)": 100 * colour, "position correct (%)": 100 * position,
            "captions stating a position (%)": 100 * len(stated) / len(rows)}  # fmt: skip


if __name__ == "__main__":
    attention = "--attention" in sys.argv
    extra = [arg for arg in sys.argv[1:] if arg != "--attention"]
    results = {"model": run(extra), "blind": run([*extra, "--model.blind", "true"])}
    if attention:
        results["attention"] = run([*extra, "--model.decoder", "attention"])
    print(f"\n{'held-out test (0-100)':<32}" + "".join(f"{name:>11}" for name in results))
    for metric in results["model"]:
        print(f"{metric:<32}" + "".join(f"{r[metric]:>11.2f}" for r in results.values()))
    print(f"bleu4_gain: {results['model']['BLEU-4'] - results['blind']['BLEU-4']:.2f}")
    print(f"colour_accuracy: {results['model']['colour correct (%)']:.1f}")
    if attention:
        print(f"attention_bleu4_gain: {results['attention']['BLEU-4'] - results['model']['BLEU-4']:.2f}")
        position_gain = results["attention"]["position correct (%)"] - results["model"]["position correct (%)"]
        print(f"attention_position_gain: {position_gain:.1f}")
