"""Evaluation: batched inference and COCO metrics with the paper's columns."""

from dfmsd_cli.eval.inference import evaluate, predict
from dfmsd_cli.eval.metrics import PAPER_COLUMNS, coco_metrics, print_metrics

__all__ = ["PAPER_COLUMNS", "coco_metrics", "evaluate", "predict", "print_metrics"]
