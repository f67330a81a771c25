"""Decode the demo's held-out test images at several beam widths and compare captions, quality and diversity.

    python scripts/beam_check.py runs/demo/captioner-demo/<run>/checkpoints/<best>.ckpt [--beams 1 3 5 10]
        [--length_penalty 0.0]
    python scripts/beam_check.py <checkpoint> --constraints    # what each kind of constraint costs, at beam 3

For each width it prints the COCO caption metrics (pycocoevalcap, raw
references), the share of distinct captions, and, against greedy decoding, how
often the beam's caption scores below the greedy one (the search keeps `num_beams`
live hypotheses and no separate greedy candidate) and what CIDEr would be with
the greedy caption kept wherever it scores higher (the guarantee an earlier
search gave). With --constraints: beam 3 unconstrained, then with a forced
prefix, a forced word, a forced word out of a set, a banned phrase and an
exact length (words the demo's captions use), each with its scores and the
share of captions that meet it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from export_check import demo_test_set  # noqa: E402

from captioner import Captioner  # noqa: E402
from captioner.evaluation.report import evaluate_captions  # noqa: E402


def scores_of(paths: list[Path], captions: list[str], references: list[list[str]]) -> dict[str, float]:
    rows = [{"file_name": str(p), "caption": c, "references": refs} for p, c, refs in zip(paths, captions, references)]
    scores = evaluate_captions(rows)["scores"]
    return {
        "CIDEr": scores["CIDEr"],
        "BLEU-4": scores["BLEU-4"],
        "distinct (%)": 100 * len(set(captions)) / len(captions),
    }


# Constraints in the demo's own words, and how to tell a caption meets each.
CONSTRAINTS = [
    ("prefix 'there is'", {"prefix": "there is"}, lambda words: words[:2] == ["there", "is"]),
    ("forced 'picture'", {"force_words": ["picture"]}, lambda words: "picture" in words),
    (
        "forced 'small' or 'large'",
        {"force_words": [["small", "large"]]},
        lambda words: "small" in words or "large" in words,
    ),
    ("banned 'on a'", {"bad_words": ["on a"]}, lambda words: "on a" not in " ".join(words)),
    ("exactly 6 words", {"min_length": 6, "max_length": 6}, lambda words: len(words) == 6),
]


def constraint_table(captioner: Captioner, paths: list[Path], references: list[list[str]]) -> None:
    """Beam 3 without and with each constraint: scores, and the share of captions that meet it."""
    from captioner.text.words import normalize

    print(
        f"\n{'beam 3, held-out (200 images)':<30}{'CIDEr':>8}{'BLEU-4':>8}{'distinct':>10}{'met, without':>14}"
        f"{'met, with':>11}"
    )
    plain = [p.caption for p in captioner.predict(paths, num_beams=3)]
    row = scores_of(paths, plain, references)
    print(f"{'unconstrained':<30}{row['CIDEr']:>8.1f}{row['BLEU-4']:>8.1f}{row['distinct (%)']:>9.1f}%")
    for name, settings, holds in CONSTRAINTS:
        captions = [p.caption for p in captioner.predict(paths, num_beams=3, **settings)]
        row = scores_of(paths, captions, references)
        before = 100 * sum(holds(normalize(c)) for c in plain) / len(plain)
        after = 100 * sum(holds(normalize(c)) for c in captions) / len(captions)
        print(
            f"{name:<30}{row['CIDEr']:>8.1f}{row['BLEU-4']:>8.1f}{row['distinct (%)']:>9.1f}%{before:>13.1f}%"
            f"{after:>10.1f}%"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 3, 5, 10])
    parser.add_argument("--length_penalty", type=float, default=0.0)
    parser.add_argument("--constraints", action="store_true", help="beam 3 with each kind of constraint")
    options = parser.parse_args()
    paths, references = demo_test_set()
    captioner = Captioner.from_checkpoint(options.checkpoint, device="cpu", batch_size=50)
    if options.constraints:
        constraint_table(captioner, paths, references)
        return
    greedy = captioner.predict(paths, num_beams=1, length_penalty=options.length_penalty)
    print(
        f"\n{'held-out demo test (200 images)':<26}{'CIDEr':>8}{'BLEU-4':>8}{'distinct':>10}"
        f"{'below greedy':>14}{'CIDEr, greedy kept':>20}"
    )
    for beams in options.beams:
        found = (
            greedy if beams == 1 else captioner.predict(paths, num_beams=beams, length_penalty=options.length_penalty)
        )
        row = scores_of(paths, [p.caption for p in found], references)
        below = [b.score < g.score - 1e-6 for b, g in zip(found, greedy)]
        kept = [g.caption if low else b.caption for b, g, low in zip(found, greedy, below)]
        guaranteed = scores_of(paths, kept, references)["CIDEr"] if beams > 1 else row["CIDEr"]
        print(
            f"{'greedy' if beams == 1 else f'{beams} beams':<26}{row['CIDEr']:>8.1f}{row['BLEU-4']:>8.1f}"
            f"{row['distinct (%)']:>9.1f}%{100 * sum(below) / len(below):>13.1f}%{guaranteed:>20.1f}"
        )


if __name__ == "__main__":
    main()
