"""TestReport: the test metrics and captions written into the run folder, and a table for people."""

from __future__ import annotations

import logging

from lightning.pytorch import Callback, LightningModule, Trainer

from captioner.core.files import atomic_open, write_json
from captioner.evaluation.report import coco_references, coco_results, format_table
from captioner.render import reliability_diagram
from captioner.runs import run_dir, write_jsonl

log = logging.getLogger("captioner")


class TestReport(Callback):
    """After `test`, write the report to the run folder and print the table.

    Files: `test_metrics.json` (every score and how it was measured),
    `test_captions.jsonl` (each caption with its raw references),
    `captions_test_results.json` (the captions in the COCO results format the
    evaluation server and `COCOEvalCap.loadRes` take) and
    `captions_test_references.json` (the raw references as a COCO caption
    annotation file), so `COCOEvalCap` can check the numbers independently; with a confidence calibrator,
    `reliability.png` (the reliability diagram, also logged to W&B as `test/reliability`).

    The model measures (`CaptionModel.test_results`); this callback only writes, on the first process.
    `python -m captioner` adds it to every run.
    """

    __test__ = False  # not a pytest test class, whatever its name says

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        results = getattr(pl_module, "test_results", None)
        if not trainer.is_global_zero or results is None:
            return
        folder = run_dir(trainer)
        write_json(folder / "test_metrics.json", results["report"])
        write_jsonl(folder / "test_captions.jsonl", results["rows"])
        write_json(folder / "captions_test_results.json", coco_results(results["rows"]))
        write_json(folder / "captions_test_references.json", coco_references(results["rows"]))
        confidence = results["report"]["metrics"].get("confidence")
        if confidence and confidence["reliability"]:
            picture = reliability_diagram(
                confidence["reliability"], confidence["ECE"], confidence["ECE_token_probability"]
            )
            with atomic_open(folder / "reliability.png", "wb") as handle:
                picture.save(handle, format="PNG")
            log_image = getattr(trainer.logger, "log_image", None)  # W&B's, among others
            if callable(log_image):
                log_image(key="test/reliability", images=[picture])
        print(format_table(results["report"]))
        log.info(
            "Test metrics written to %s, captions to %s", folder / "test_metrics.json", folder / "test_captions.jsonl"
        )
