"""The metrics beyond n-grams in one place, for `test` and `python -m captioner evaluate`: CHAIR (when the images'
objects are known), CLIPScore and RefCLIPScore (when a CLIP model is named), BERTScore (when a model is named) and
SPICE (when Java and Stanford CoreNLP are there). Each one that cannot run says why in one line and the rest run."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.core.errors import CaptionerError

log = logging.getLogger("captioner")


@dataclass
class ExtraMetrics:
    """Which metrics beyond the COCO ones to compute.

    Attributes:
        clip_model: CLIPScore and RefCLIPScore with this CLIP (`ViT-B-32:openai`, the paper's; another OpenCLIP
            `name:tag`; a Hugging Face id or folder); null: none.
        chair: CHAIR-i and CHAIR-s where the images' objects are known.
        objects: The test images' objects, for CHAIR: COCO `instances_*.json`, a JSON file mapping file names to
            object lists, or "auto" (the data's captions file, when its images list their objects: the demo's
            scenes); null: no CHAIR.
        object_vocabulary: The object classes and synonyms CHAIR reads captions with: "coco", a JSON file (class ->
            synonyms), or null (COCO's for COCO instances, else the annotations' own names).
        bertscore_model: BERTScore (torchmetrics) with this model (e.g. roberta-large); null: none.
        spice: SPICE when Java and pycocoevalcap's Stanford CoreNLP jars are present.
        cache_dir: Where CLIP image embeddings are kept between evaluations (null: not kept).
    """

    clip_model: str | None = None
    chair: bool = True
    objects: str | None = "auto"
    object_vocabulary: str | None = None
    bertscore_model: str | None = None
    spice: bool = False
    cache_dir: str | None = None


def extra_scores(
    settings: ExtraMetrics,
    captions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    image_file: Callable[[str], Path | None],
    objects_file: Path | None,
    device: str = "cpu",
    clip: Any = None,
) -> dict[str, Any]:
    """The metrics `settings` asks for that can run, by group (`chair`, `clip`, `bertscore`, `spice`), and one
    `skipped` line for each that cannot.

    Args:
        settings: What to compute.
        captions: Image (file name) -> generated caption.
        references: Image -> raw reference captions.
        image_file: Image -> its file (None when not on disk).
        objects_file: The images' object annotations (None: no CHAIR).
        device: Where CLIP and BERTScore run.
        clip: `settings.clip_model` already loaded (a `ClipModel`; None: loaded here).
    """
    scores: dict[str, Any] = {"skipped": {}}
    if settings.chair:
        if objects_file is None:
            scores["skipped"]["CHAIR"] = "no object annotations (--model.extra_metrics.objects)"
        else:
            from captioner.evaluation.chair import chair_scores, read_objects, vocabulary_for

            objects, coco = read_objects(objects_file)
            vocabulary = vocabulary_for(objects, coco, settings.object_vocabulary)
            result = chair_scores(captions, objects, vocabulary, references)
            scores["chair"] = {**result, "objects": str(objects_file)}
    if settings.clip_model:
        from captioner.evaluation.clip_score import ClipModel, score_captions

        files = {name: path for name in captions if (path := image_file(name)) is not None}
        if not files:
            scores["skipped"]["CLIPScore"] = "no image files (images inside shards are not read back)"
        else:
            model = clip if clip is not None else ClipModel(settings.clip_model, device)
            scores["clip"] = score_captions(model, captions, files, references, settings.cache_dir)
    if settings.bertscore_model:
        scores["bertscore"] = bert_scores(captions, references, settings.bertscore_model, device)
    if settings.spice:
        spice = spice_score(captions, references)
        if isinstance(spice, str):
            scores["skipped"]["SPICE"] = spice
        else:
            scores["spice"] = spice
    for name, reason in scores["skipped"].items():
        log.info("%s not computed: %s.", name, reason)
    return scores


def extra_scores_of(
    settings: ExtraMetrics, rows: Sequence[Mapping[str, Any]], data: Any, device: str, clip: Any = None
) -> dict[str, Any]:
    """`extra_scores` of test rows (`file_name`, `caption`, `references`) on a datamodule's images and objects:
    its `image_file(name)` (CLIPScore) and, with `settings.objects` "auto", its `objects_file()` (CHAIR); `clip`: a
    CLIP already loaded (the confidence's)."""
    captions = {row["file_name"]: row["caption"] for row in rows}
    references = {row["file_name"]: row["references"] for row in rows}
    image_file = getattr(data, "image_file", lambda name: None)
    objects = settings.objects
    if objects == "auto":
        objects_file = data.objects_file() if hasattr(data, "objects_file") else None
    else:
        objects_file = Path(objects) if objects is not None else None
    return extra_scores(settings, captions, references, image_file, objects_file, device, clip)


def bert_scores(
    captions: Mapping[str, str], references: Mapping[str, Sequence[str]], model: str, device: str = "cpu"
) -> dict[str, float]:
    """BERTScore F1, precision and recall (x 100) of each caption against its references (the best reference per
    caption, as the BERTScore paper does for several references), through torchmetrics."""
    from captioner.core.hub import hub_error
    from captioner.core.parts import require_library

    require_library("transformers", "hf", "BERTScore")
    from torchmetrics.text.bert import BERTScore

    keys = [key for key in captions if references.get(key)]
    try:
        metric = BERTScore(model_name_or_path=model, device=device, idf=False)
    except Exception as error:  # the hub client raises many types when offline
        raise hub_error(model, error) from error
    best = {"f1": [], "precision": [], "recall": []}
    for key in keys:
        refs = list(references[key])
        result = {
            name: value.reshape(-1) for name, value in metric([captions[key]] * len(refs), refs).items() if name in best
        }  # one reference gives 0-dim values
        index = int(result["f1"].argmax())
        for name in best:
            best[name].append(float(result[name][index]))
    return {name: 100 * sum(values) / len(values) if values else 0.0 for name, values in best.items()} | {
        "model": model,
        "captions": len(keys),
    }


def spice_score(captions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float] | str:
    """SPICE (x 100) through pycocoevalcap, or the one line saying what it needs."""
    from captioner.evaluation.metrics import java_available

    if not java_available():
        return "needs Java (java on the PATH, CAPTIONER_JAVA not 0)"
    try:
        from pycocoevalcap.spice.spice import Spice
    except ImportError as error:
        return f"needs pycocoevalcap's SPICE ({error})"
    import pycocoevalcap.spice

    lib = Path(pycocoevalcap.spice.__file__).parent / "lib"
    if not list(lib.glob("stanford-corenlp-*.jar")):
        return (
            f"needs Stanford CoreNLP 3.6.0 in {lib} (pycocoevalcap's get_stanford_models downloads it; recent "
            "JDKs may also need it rebuilt)"
        )
    keys = [key for key in captions if references.get(key)]
    try:
        score, _ = Spice().compute_score({k: list(references[k]) for k in keys}, {k: [captions[k]] for k in keys})
    except Exception as error:  # its Java process fails in many ways; the rest of the report still stands
        return f"failed ({type(error).__name__}: {error})"
    return {"SPICE": 100 * float(score), "captions": len(keys)}


def confidence_report(
    rows: Sequence[Mapping[str, Any]], calibrator: Any, bins: int = 10, key: str = "confidence"
) -> dict[str, Any]:
    """How reliable the calibrated confidence is on test captions (`key`, `token_probability` and `cider_d` in each
    row): the expected calibration error against being good (CIDEr-D at or above the calibrator's threshold),
    beside that of the uncalibrated geometric mean token probability, and the reliability bins."""
    import numpy as np

    from captioner.decoding.confidence import expected_calibration_error, reliability

    confidence = np.array([row[key] for row in rows])
    naive = np.array([row["token_probability"] for row in rows])
    good = np.array([row["cider_d"] >= calibrator.threshold for row in rows])
    return {
        "ECE": 100 * expected_calibration_error(confidence, good, bins),
        "ECE_token_probability": 100 * expected_calibration_error(naive, good, bins),
        "threshold_cider_d": calibrator.threshold,
        "good_share": 100 * float(good.mean()),
        "mean_confidence": 100 * float(confidence.mean()),
        "captions": len(rows),
        "fitted_on": calibrator.fitted_on,
        "reliability": reliability(confidence, good, bins),
    }


def loggable_extra(scores: Mapping[str, Any], prefix: str = "test/") -> dict[str, float]:
    """Flat names for the logger: `test/chair_i`, `test/chair_s`, `test/clipscore`, `test/refclipscore`, ..."""
    flat: dict[str, float] = {}
    if "chair" in scores:
        flat[f"{prefix}chair_i"], flat[f"{prefix}chair_s"] = scores["chair"]["CHAIR-i"], scores["chair"]["CHAIR-s"]
    if "clip" in scores:
        flat[f"{prefix}clipscore"] = scores["clip"]["CLIPScore"]
        if "RefCLIPScore" in scores["clip"]:
            flat[f"{prefix}refclipscore"] = scores["clip"]["RefCLIPScore"]
    if "bertscore" in scores:
        flat[f"{prefix}bertscore_f1"] = scores["bertscore"]["f1"]
    if "spice" in scores:
        flat[f"{prefix}spice"] = scores["spice"]["SPICE"]
    if "confidence" in scores:
        flat[f"{prefix}confidence_ece"] = scores["confidence"]["ECE"]
    if "confidence_clip" in scores:
        flat[f"{prefix}confidence_clip_ece"] = scores["confidence_clip"]["ECE"]
    return flat


def extra_table_lines(scores: Mapping[str, Any]) -> list[str]:
    """The extra metrics as rows of the test table."""
    lines = []
    if "chair" in scores:
        chair = scores["chair"]
        lines.append(
            f"{'CHAIR-i':<22}{chair['CHAIR-i']:>9.2f}  objects named that are not in the image (lower is better)"
        )
        lines.append(f"{'CHAIR-s':<22}{chair['CHAIR-s']:>9.2f}  captions naming one or more of them")
    if "clip" in scores:
        clip = scores["clip"]
        lines.append(f"{'CLIPScore':<22}{clip['CLIPScore']:>9.2f}  {clip['model']}, w = 2.5 (x 100)")
        if "RefCLIPScore" in clip:
            lines.append(f"{'RefCLIPScore':<22}{clip['RefCLIPScore']:>9.2f}  with the references")
    if "bertscore" in scores:
        lines.append(f"{'BERTScore F1':<22}{scores['bertscore']['f1']:>9.2f}  {scores['bertscore']['model']}")
    if "spice" in scores:
        lines.append(f"{'SPICE':<22}{scores['spice']['SPICE']:>9.2f}  pycocoevalcap")
    if "confidence" in scores:
        confidence = scores["confidence"]
        lines.append(
            f"{'confidence ECE':<22}{confidence['ECE']:>9.2f}  calibrated; good = CIDEr-D >= "
            f"{confidence['threshold_cider_d']:.1f} ({confidence['good_share']:.0f}% of test captions)"
        )
        lines.append(
            f"{'token-probability ECE':<22}{confidence['ECE_token_probability']:>9.2f}  uncalibrated "
            "(geometric mean token probability)"
        )
    if "confidence_clip" in scores:
        lines.append(
            f"{'confidence ECE, CLIP':<22}{scores['confidence_clip']['ECE']:>9.2f}  calibrated with the "
            "CLIP cosine as a fourth feature"
        )
    lines += [f"{name:<22}{'-':>9}  skipped: {reason}" for name, reason in scores.get("skipped", {}).items()]
    return lines


def require_known(settings: ExtraMetrics) -> None:
    """Refuse settings that cannot mean anything before a run starts."""
    if settings.object_vocabulary not in (None, "coco") and not Path(settings.object_vocabulary).is_file():
        raise CaptionerError(f"object_vocabulary {settings.object_vocabulary} is neither 'coco' nor a file.")
