"""The test report: COCO caption metrics, BLEU, diversity and settings, in one JSON file and one table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from captioner.evaluation.beyond import extra_table_lines
from captioner.evaluation.metrics import caption_diversity, coco_caption_scores

COCO_LOG_KEYS = {
    "BLEU-1": "coco_bleu1",
    "BLEU-2": "coco_bleu2",
    "BLEU-3": "coco_bleu3",
    "BLEU-4": "coco_bleu4",
    "METEOR": "meteor",
    "ROUGE-L": "rouge_l",
    "CIDEr": "cider",
}


def unique_by_file(rows: Sequence[dict]) -> list[dict]:
    """One row per image, sorted by file name (distributed samplers may repeat images to even out ranks)."""
    return [row for _, row in sorted({row["file_name"]: row for row in rows}.items())]


def evaluate_captions(rows: Sequence[dict]) -> dict:
    """COCO caption metrics and diversity of `rows` (each with `file_name`, `caption` and its raw `references`)."""
    rows = unique_by_file(rows)
    coco = coco_caption_scores(
        {r["file_name"]: r["caption"] for r in rows}, {r["file_name"]: r["references"] for r in rows}
    )
    return {"images": len(rows), **coco, "diversity": caption_diversity([r["caption"] for r in rows])}


def coco_results(rows: Sequence[dict]) -> list[dict]:
    """The generated captions as the COCO caption evaluation server and `COCOEvalCap.loadRes` take them."""
    return [{"image_id": row["image_id"], "caption": row["caption"]} for row in unique_by_file(rows)]


def coco_references(rows: Sequence[dict]) -> dict:
    """The raw reference captions as a COCO caption annotation file, for `pycocotools.coco.COCO`."""
    rows = unique_by_file(rows)
    annotations = [
        {"image_id": row["image_id"], "id": 0, "caption": caption} for row in rows for caption in row["references"]
    ]
    for number, annotation in enumerate(annotations, 1):
        annotation["id"] = number
    return {
        "info": {"description": "captioner test references"},
        "licenses": [],
        "type": "captions",
        "images": [{"id": row["image_id"], "file_name": row["file_name"]} for row in rows],
        "annotations": annotations,
    }


def loggable(evaluation: dict, prefix: str = "test/") -> dict[str, float]:
    """Flat metric names for the logger: `test/cider`, `test/coco_bleu4`, `test/distinct_captions`, ..."""
    scores = {f"{prefix}{COCO_LOG_KEYS[name]}": value for name, value in evaluation["scores"].items()}
    scores.update({f"{prefix}{name}": float(value) for name, value in evaluation["diversity"].items()})
    return scores


def test_report(
    bleu: dict[str, float],
    evaluation: dict,
    decoding: dict,
    checkpoint: str | None,
    split_sizes: dict,
    blind: bool,
    extra: dict | None = None,
) -> dict:
    """Everything `test` measured and how, as written to `test_metrics.json`.

    Args:
        bleu: torchmetrics BLEU-1..4 (0-100), keyed `bleu1`..`bleu4`.
        evaluation: `evaluate_captions` output.
        decoding: The decoding settings used (`DecodingConfig.to_dict()`, `max_length` resolved).
        checkpoint: The checkpoint tested.
        split_sizes: Images per split.
        blind: Whether the model is the blind baseline.
        extra: `captioner.evaluation.beyond.extra_scores` output (CHAIR, CLIPScore, ...), if any.
    """
    extra = extra or {}
    return {
        "scale": "0-100 (CIDEr is CIDEr-D x 100)",
        "images": evaluation["images"],
        "metrics": {
            "pycocoevalcap": {name: round(value, 4) for name, value in evaluation["scores"].items()},
            "torchmetrics": {f"BLEU-{name[-1]}": round(value, 4) for name, value in bleu.items()},
            **{name: value for name, value in extra.items() if name != "skipped"},
        },
        "skipped_metrics": extra.get("skipped", {}),
        "tokenizer": evaluation["tokenizer"],
        "diversity": evaluation["diversity"],
        "decoding": decoding,
        "checkpoint": checkpoint,
        "split_sizes": split_sizes,
        "blind": blind,
    }


def format_table(report: dict) -> str:
    """The test report as a table a person reads at the end of a run."""
    coco, bleu = report["metrics"]["pycocoevalcap"], report["metrics"]["torchmetrics"]
    decoding = report["decoding"]
    lines = [
        f"Test set: {report['images']} images; {decoding['num_beams']} beams, "
        f"length penalty {decoding['length_penalty']}; scores on a 0-100 scale",
        f"{'metric':<22}{'score':>9}  tool",
    ]
    lines += [f"{name:<22}{value:>9.2f}  pycocoevalcap, {report['tokenizer']}" for name, value in coco.items()]
    if "METEOR" not in coco:
        lines.append(f"{'METEOR':<22}{'-':>9}  skipped: no Java")
    lines += [f"{name:<22}{value:>9.2f}  torchmetrics (same as val/)" for name, value in bleu.items()]
    lines += extra_table_lines({**report["metrics"], "skipped": report.get("skipped_metrics", {})})
    diversity = report["diversity"]
    lines += [
        f"{'distinct captions':<22}{diversity['distinct_captions']:>8.1f}%  unique / all captions (100: none alike)",
        f"{'vocabulary used':<22}{diversity['vocabulary_used']:>9d}  distinct words in all captions",
        f"{'mean caption length':<22}{diversity['mean_length']:>9.2f}  words",
    ]
    for style, scores in report.get("styles", {}).items():
        shown = {name: scores["scores"][name] for name in ("BLEU-4", "METEOR", "CIDEr") if name in scores["scores"]}
        if scores.get("chair"):
            shown["CHAIR-i"] = scores["chair"]["CHAIR-i"]
        text = ", ".join(f"{name} {value:.2f}" for name, value in shown.items())
        lines.append(f"{'style ' + style:<22}{text}  (against its own references)")
    return "\n".join(lines)


def gathered(rows: list[dict]) -> list[dict]:
    """Every rank's rows on every rank of a distributed run (one Python object per rank); the rows as they are
    otherwise."""
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    parts: list[list[dict]] = [[] for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather_object(parts, rows)
    return [row for part in parts for row in part]


def test_rows(batch: dict, captions: list[str]) -> list[dict]:
    """A test batch's rows: each image's file, id, caption and raw references (the COCO evaluation tokenises them
    itself)."""
    return [
        {"file_name": name, "image_id": image_id, "caption": caption, "references": references}
        for name, image_id, caption, references in zip(
            batch["file_names"], batch["image_ids"], captions, batch["raw_references"]
        )
    ]


def finished_test(
    rows: list[dict],
    bleu: dict[str, float],
    extra_scores: Any,
    calibrators: dict[str, Any],
    broadcast: Any,
    is_global_zero: bool,
    style_rows: Sequence[dict] = (),
    styles: Sequence[str] = (),
    **report: Any,
) -> tuple[dict, list[dict], dict[str, float]]:
    """A test's end, every rank calling it: its rows gathered (one per image), the COCO suite and the extra metrics
    computed on rank 0 and shared, the confidence measured against each caption's CIDEr-D.

    Args:
        rows: This rank's rows (`file_name`, `image_id`, `caption`, `references`, and the confidence's columns).
        bleu: torchmetrics BLEU-1..4, already reduced over ranks.
        extra_scores: `rows -> dict`: CHAIR, CLIPScore, ... (`captioner.evaluation.beyond.extra_scores`).
        calibrators: `{"confidence": calibrator, "confidence_clip": calibrator}` where fitted (None: leave out).
        broadcast: Rank 0's object to every rank (`strategy.broadcast`).
        is_global_zero: Whether this is rank 0.
        style_rows: This rank's rows of captions in the other styles of a model of several (each with its
            `style`; `captioner.models.captioning.style_test_rows`).
        styles: The model's caption styles, the default (the style of `rows`) first; none for a model of one.
        report: `test_report`'s remaining arguments (decoding, checkpoint, split_sizes, blind).

    Returns:
        The report (`test_metrics.json`), the rows, and the flat metrics to log.
    """
    from captioner.evaluation.beyond import confidence_report, loggable_extra

    rows = unique_by_file(gathered(rows))
    evaluation = broadcast(evaluate_captions(rows) if is_global_zero else None)
    extra = broadcast(extra_scores(rows) if is_global_zero else None)
    for key, calibrator in calibrators.items():
        if calibrator is not None and rows and all(key in row for row in rows):
            extra[key] = confidence_report(rows, calibrator, key=key)
    logged = {
        **loggable_extra(extra),
        **{f"test/{name}": value for name, value in bleu.items()},
        **loggable(evaluation),
    }
    result = test_report(bleu, evaluation, extra=extra, **report)
    if styles:
        by_style = style_scores(gathered(list(style_rows)), extra_scores, broadcast, is_global_zero)
        default = {"scores": evaluation["scores"], "diversity": evaluation["diversity"], "chair": extra.get("chair")}
        result["styles"] = {styles[0]: default, **by_style}
        for style, scores in result["styles"].items():
            logged.update(loggable(scores, f"test/{style}/"))
            logged.update(loggable_extra({"chair": scores["chair"]} if scores["chair"] else {}, f"test/{style}/"))
    return result, rows, logged


def style_scores(rows: Sequence[dict], extra_scores: Any, broadcast: Any, is_global_zero: bool) -> dict[str, dict]:
    """Each style's COCO caption metrics and CHAIR against its own references, computed on rank 0 and shared: the
    rows hold `style` (the captions a model of several styles wrote in it)."""
    if not is_global_zero:
        return broadcast(None)
    styles: dict[str, list[dict]] = {}
    for row in rows:
        styles.setdefault(row["style"], []).append(row)
    scores = {}
    for style, chosen in styles.items():
        evaluation = evaluate_captions(chosen)
        scores[style] = {
            "scores": evaluation["scores"],
            "diversity": evaluation["diversity"],
            "chair": extra_scores(unique_by_file(chosen)).get("chair"),
        }
    return broadcast(scores)
