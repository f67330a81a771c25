"""Evaluation: the COCO caption protocol and diversity (`metrics`), CIDEr-D on token ids (`cider`), and the test
report and result files (`report`)."""

from captioner.evaluation.report import evaluate_captions, gathered, loggable, test_report, unique_by_file

__all__ = ["evaluate_captions", "gathered", "loggable", "test_report", "unique_by_file"]
