"""``dfmsd viz run``: training curves of one or more run folders on shared axes.

Reads ``RUN/metrics.jsonl`` as ``dfmsd train`` and ``dfmsd distill`` write it (every version:
``train`` rows with ``iteration``, ``lr``, ``loss`` and its components (every other number),
``stage`` for distill runs; ``val`` rows with the COCO metrics flat or under ``bbox``). The x
axis is the optimizer step counted across stages (each stage's ``iteration`` restarts at 1, so
a stage is offset by the steps before it); stage boundaries are dotted vertical lines. Panels:
every loss component (one colour per component, one line style per run), the learning rate,
and the evaluation metrics per stage.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from dfmsd_cli.errors import UserError
from dfmsd_cli.viz.common import PALETTE, new_figure

METRICS = ("mAP", "APs", "APm", "APl", "mAR")
STYLES = ("-", "--", ":", "-.")
# every other numeric key of a train row is a loss: "loss" (the total), the detector's own
# terms (e.g. "classification", "bbox_regression", "loss_rpn_cls") and "loss_kd"/"loss_me"/...
NOT_LOSSES = frozenset({"time", "epoch", "step", "iteration", "lr", "stage"})


@dataclass
class RunLog:
    """Series of one run: ``losses[name] = [(x, y)]``, ``lr``, ``boundaries`` (x of each new
    stage), ``evals = [("stage k" or "epoch k", {metric: value})]``."""

    name: str
    losses: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    lr: list[tuple[float, float]] = field(default_factory=list)
    boundaries: list[float] = field(default_factory=list)
    evals: list[tuple[str, dict[str, float]]] = field(default_factory=list)


def detection_loss(
    log: RunLog, terms=("loss_kd", "loss_sfa", "loss_me")
) -> list[tuple[float, float]]:
    """``loss`` minus the distillation ``terms`` logged with it: the detection loss alone."""
    extra: dict[float, float] = {}
    for k in terms:
        for x, y in log.losses.get(k, []):
            extra[x] = extra.get(x, 0.0) + y
    return [(x, y - extra.get(x, 0.0)) for x, y in log.losses.get("loss", [])]


def read_run(run: str | Path, name: str | None = None) -> RunLog:
    """Parse ``run/metrics.jsonl`` (bad lines skipped: a killed run may end mid-line)."""
    run = Path(run)
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise UserError(
            f"{run} has no metrics.jsonl: pass a 'dfmsd train' or 'dfmsd distill' --out"
        )
    log = RunLog(name or run.name)
    offset, last_x, stage = 0.0, 0.0, None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("phase") == "val":
            m = rec.get("bbox", rec)
            vals = {k: float(m[k]) for k in METRICS if isinstance(m.get(k), (int, float))}
            if vals:
                at = f"stage {rec['stage']}" if "stage" in rec else f"epoch {rec.get('epoch', '?')}"
                log.evals.append((at, vals))
            continue
        if rec.get("phase") != "train" or "iteration" not in rec:
            continue
        if rec.get("stage") != stage:
            if stage is not None:
                offset = last_x
                log.boundaries.append(offset)
            stage = rec.get("stage")
        x = offset + float(rec["iteration"])
        last_x = x
        for k, v in rec.items():
            if k not in NOT_LOSSES and isinstance(v, (int, float)) and not isinstance(v, bool):
                log.losses.setdefault(k, []).append((x, float(v)))
        if isinstance(rec.get("lr"), (int, float)):
            log.lr.append((x, float(rec["lr"])))
    if not log.losses and not log.evals:
        raise UserError(f"{path} holds no training or evaluation rows yet: let the run log a step")
    return log


def _plot(ax, pts, log_y: bool, **kw) -> None:
    pts = [(x, y) for x, y in pts if math.isfinite(y) and (y > 0 or not log_y)]
    if pts:  # a lone point (a run that logged once) gets a marker, a line would be invisible
        marker = "o" if len(pts) == 1 else None
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, marker=marker, ms=4, **kw)


def loss_axes(ax, runs: list[RunLog], log_y: bool = False, keys=None) -> None:
    """Loss series of ``runs`` on ``ax``: one colour per component, one line style per run,
    dotted stage boundaries. ``keys`` restricts the components (default: all)."""
    names = sorted({k for r in runs for k in r.losses}, key=lambda k: (k != "loss", k))
    names = [k for k in names if keys is None or k in keys]
    colour = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(names)}
    for i, r in enumerate(runs):
        ls = STYLES[i % len(STYLES)]
        prefix = f"{r.name}: " if len(runs) > 1 else ""
        for k in names:
            if k in r.losses:
                _plot(ax, r.losses[k], log_y, color=colour[k], ls=ls, label=prefix + k)
        for b in r.boundaries:
            ax.axvline(b, color="grey", ls=":", lw=1)
    if log_y:
        ax.set_yscale("log")
    ax.set(title="loss components (dotted: stage boundary)", xlabel="optimizer step")
    ax.legend(fontsize=6, ncol=2)


def run_figure(runs: list[RunLog], log_y: bool = False, title: str = ""):
    """Losses, learning rate and per-stage metrics of ``runs`` (see the module doc)."""
    has_eval = any(r.evals for r in runs)
    fig, axes = new_figure(2 + int(has_eval), 1, panel=(5.0, 3.6))
    ax_loss, ax_lr = axes[0, 0], axes[0, 1]
    loss_axes(ax_loss, runs, log_y)
    for i, r in enumerate(runs):
        ls = STYLES[i % len(STYLES)]
        _plot(ax_lr, r.lr, False, color=PALETTE[i % len(PALETTE)], ls=ls, label=r.name)
        for b in r.boundaries:
            ax_lr.axvline(b, color="grey", ls=":", lw=1)
    ax_lr.set(title="learning rate", xlabel="optimizer step")
    ax_lr.legend(fontsize=6)
    if has_eval:
        from dfmsd_cli.viz.compare_bars import bar_axes

        series = {
            f"{r.name} {at}": [
                (100 * v[m] if v.get(m, -1) >= 0 else math.nan, 0.0) for m in METRICS
            ]
            for r in runs
            for at, v in r.evals
        }
        bar_axes(axes[0, 2], METRICS, series, "x100")
        axes[0, 2].set_title("evaluation per stage")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig
