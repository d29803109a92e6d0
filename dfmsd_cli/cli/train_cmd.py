"""``dfmsd train``: a baseline detector (student or teacher), no distillation."""

from __future__ import annotations

from dfmsd_cli.cli.app import app
from dfmsd_cli.cli.options import command
from dfmsd_cli.engine.train import TrainOptions
from dfmsd_cli.utils.console import console


@command(app, "train", TrainOptions)
def train_cmd(o: TrainOptions) -> None:
    """Train a detector on COCO-format data (SGD, warm-up + step decay, AMP on CUDA, DDP)."""
    from dfmsd_cli.engine.distributed import is_main_process
    from dfmsd_cli.engine.train import train

    summary = train(o)
    if is_main_process():
        _print_summary(summary)


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    table = Table(title="train")
    table.add_column("key")
    table.add_column("value")
    for k, v in summary.items():
        if k not in ("val", "split_seconds_per_step"):
            table.add_row(k, str(v))
    console.print(table)
    if summary.get("val"):
        from dfmsd_cli.eval.metrics import print_metrics

        print_metrics(summary["val"], title="val")
