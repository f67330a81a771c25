"""`python -m captioner evaluate RESULTS --references CAPTIONS`: any model's captions scored as `test` scores ours.

RESULTS is the COCO results format (`[{"image_id": 42, "caption": "..."}]`, what `test` writes as
`captions_test_results.json` and the COCO server takes) or JSON Lines with `file_name` (or `path`, or `image`) and
`caption` (`test_captions.jsonl`, `predictions.jsonl`), or a folder of JSON Lines files (`caption-set --format jsonl`'s
output, its parts read together). CAPTIONS is a COCO captions file
(`captions_val2014.json`, a Karpathy split's, the demo's `captions.json`). Scores: the COCO metrics (pycocoevalcap,
as `test`), diversity, CHAIR with `--objects`, CLIPScore and RefCLIPScore with `--images` (and `--clip_model`),
BERTScore with `--bertscore_model`, SPICE with `--spice`; printed as a table and written with `--output`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from captioner.core.errors import CaptionerError
from captioner.core.files import write_json
from captioner.evaluation.beyond import ExtraMetrics, extra_scores, extra_table_lines
from captioner.evaluation.clip_score import PAPER_MODEL
from captioner.evaluation.metrics import caption_diversity, coco_caption_scores


def read_references(path: str | Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """A COCO captions file: file name -> raw references, and image id (as text) -> file name.

    Raises:
        CaptionerError: When it cannot be read or is not a COCO captions file.
    """
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
        names = {str(image["id"]): image["file_name"] for image in payload["images"]}
        references: dict[str, list[str]] = {name: [] for name in names.values()}
        for annotation in payload["annotations"]:
            references[names[str(annotation["image_id"])]].append(annotation["caption"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CaptionerError(
            f"{path} is not a COCO captions file (images with id and file_name, annotations with "
            f"image_id and caption): {type(error).__name__}: {error}."
        ) from error
    return references, names


def read_results(path: str | Path, names: dict[str, str]) -> tuple[dict[str, str], int]:
    """Generated captions by file name from either results format, and how many rows named no known image.

    Raises:
        CaptionerError: When the file cannot be read as either format.
    """
    path = Path(path)
    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]  # a folder: caption-set's JSON Lines parts
    if not files:
        raise CaptionerError(
            f"{path} is a folder without JSON Lines files (*.jsonl): give a results file, or the "
            "--output folder of `caption-set --format jsonl`."
        )
    rows = [row for file in files for row in _result_rows(file)]
    captions, unknown, known = {}, 0, set(names.values())
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("caption"), str):
            unknown += 1
            continue
        if "image_id" in row and str(row["image_id"]) in names:
            name = names[str(row["image_id"])]
        else:
            # caption-set names a shard's image `shard.tar#member`, a folder's by its path under the input
            named = str(row.get("file_name") or row.get("path") or row.get("image") or "")
            name = Path(named.rsplit("#", 1)[-1]).name
        if name in known:
            captions[name] = row["caption"]
        else:
            unknown += 1
    if not captions:
        raise CaptionerError(
            f"No caption of {path} names an image of the references (by image_id, file_name or "
            "path): are they of the same set?"
        )
    return captions, unknown


def _result_rows(path: Path) -> list[Any]:
    """The rows of one results file: a JSON list (the COCO results format), one JSON object, or JSON Lines."""
    text = path.read_text(encoding="utf-8")
    try:
        payload = json.loads(text)
        return payload if isinstance(payload, list) else [payload]
    except ValueError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as error:
            raise CaptionerError(f"{path} is neither a JSON list of results nor JSON Lines: {error}.") from error


def evaluate_results(
    results: str | Path,
    references_file: str | Path,
    settings: ExtraMetrics,
    images: str | Path | None = None,
    objects: str | Path | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Every score of a results file against a COCO captions file (see the module docstring)."""
    references, names = read_references(references_file)
    captions, unknown = read_results(results, names)
    scored_references = {name: references[name] for name in captions}
    coco = coco_caption_scores(captions, scored_references)

    def image_file(name: str) -> Path | None:
        path = Path(images) / name if images is not None else None
        return path if path is not None and path.is_file() else None

    settings.clip_model = settings.clip_model if images is not None else None
    extra = extra_scores(settings, captions, scored_references, image_file, Path(objects) if objects else None, device)
    return {
        "scale": "0-100 (CIDEr is CIDEr-D x 100)",
        "results": str(results),
        "references": str(references_file),
        "images": len(captions),
        "not_matched": unknown,
        "tokenizer": coco["tokenizer"],
        "metrics": {
            "pycocoevalcap": {k: round(v, 4) for k, v in coco["scores"].items()},
            **{k: v for k, v in extra.items() if k != "skipped"},
        },
        "skipped_metrics": extra["skipped"],
        "diversity": caption_diversity(list(captions.values())),
    }


def evaluate_parser() -> argparse.ArgumentParser:
    """The options of `python -m captioner evaluate`."""
    parser = argparse.ArgumentParser(prog="python -m captioner evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "results",
        help="COCO results JSON ([{image_id, caption}]), JSON Lines (file_name, caption), "
        "or a folder of JSON Lines (caption-set --format jsonl --output FOLDER)",
    )
    parser.add_argument("--references", required=True, help="a COCO captions file (images and annotations)")
    parser.add_argument("--images", default=None, help="the images' folder: CLIPScore and RefCLIPScore")
    parser.add_argument(
        "--clip_model",
        default=PAPER_MODEL,
        help=f"OpenCLIP name:tag or a Hugging Face CLIP id or folder (default: the paper's, {PAPER_MODEL})",
    )
    parser.add_argument(
        "--objects",
        default=None,
        help="object annotations: CHAIR (COCO instances_*.json, a JSON "
        "mapping file names to object lists, or a captions file whose images list them)",
    )
    parser.add_argument("--object_vocabulary", default=None, help="coco, or a JSON file of classes and synonyms")
    parser.add_argument("--bertscore_model", default=None, help="BERTScore with this model (e.g. roberta-large)")
    parser.add_argument("--spice", action="store_true", help="SPICE, where Java and Stanford CoreNLP are there")
    parser.add_argument("--cache_dir", default=None, help="keep CLIP image embeddings here between evaluations")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=None, help="write the report here as JSON")
    return parser


def evaluate_command(argv: list[str]) -> None:
    """`python -m captioner evaluate ...` (see the module docstring)."""
    options = evaluate_parser().parse_args(argv)
    settings = ExtraMetrics(
        clip_model=options.clip_model,
        chair=options.objects is not None,
        object_vocabulary=options.object_vocabulary,
        bertscore_model=options.bertscore_model,
        spice=options.spice,
        cache_dir=options.cache_dir,
    )
    report = evaluate_results(
        options.results, options.references, settings, options.images, options.objects, options.device
    )
    print(
        f"{report['images']} captions scored ({report['not_matched']} rows naming no image of the references); "
        "scores on a 0-100 scale"
    )
    for name, value in report["metrics"]["pycocoevalcap"].items():
        print(f"{name:<22}{value:>9.2f}  pycocoevalcap, {report['tokenizer']}")
    for line in extra_table_lines({**report["metrics"], "skipped": report["skipped_metrics"]}):
        print(line)
    print(f"{'distinct captions':<22}{report['diversity']['distinct_captions']:>8.1f}%")
    if options.output:
        write_json(options.output, report)
        print(f"report: {options.output}")
