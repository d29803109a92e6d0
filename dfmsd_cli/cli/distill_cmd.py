"""``dfmsd distill``: stage-wise distillation of a student from precomputed teacher stores.

The flags are ``DistillOptions``' fields (``dfmsd_cli.distill.run``); the method flags
(``--alpha``, ``--no-sal``, ``--lambda-s``, ...) are generated from the method registry
(``dfmsd_cli.distill.methods``), so a registered method's own options are flags here."""

from __future__ import annotations

from dfmsd_cli.cli.app import app
from dfmsd_cli.cli.options import command
from dfmsd_cli.distill.run import DistillOptions
from dfmsd_cli.utils.console import console


@command(app, "distill", DistillOptions)
def distill_cmd(o: DistillOptions) -> None:
    """Distill a student stage by stage from teacher stores (never loads a teacher)."""
    from dfmsd_cli.distill.run import distill
    from dfmsd_cli.engine.distributed import is_main_process

    summary = distill(o)  # also writes OUT/summary.json
    if is_main_process():
        _print_summary(summary)


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    table = Table(title="distill")
    for col in ("stage", "teacher", "epochs", "iterations", "s/step", "mAP"):
        table.add_column(col)
    for st in summary["stages"]:
        val = st.get("val") or {}
        bbox = val.get("bbox", val) if isinstance(val, dict) else {}
        m = bbox.get("mAP") if isinstance(bbox, dict) else None
        done_before = st.get("finished_before_resume")  # skipped by --resume: no step counts
        table.add_row(
            str(st["stage"]),
            str(st["teacher"] or "-"),
            str(st["epochs_done"]),
            "done before resume" if done_before else str(st["iterations"]),
            "-" if done_before else f"{st['seconds_per_step']:.3f}",
            f"{m:.3f}" if isinstance(m, float) else "-",
        )
    console.print(table)
    if summary.get("student"):
        console.print(f"student weights: {summary['student']}")
