"""The ``metrics.jsonl`` log and the smoothed losses of the training progress bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSON-lines log; each record gets a wall-clock timestamp."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from dfmsd_cli.errors import io_path

        rec = {"time": round(time.time(), 3), **record}
        with io_path(self.path), self.path.open("a") as f:
            f.write(json.dumps(rec, default=_json_default) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return str(obj)


class RunningMean:
    """Smoothed loss values for the progress bar (mean over the last ``window`` updates)."""

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self.values: dict[str, list[float]] = {}

    def update(self, values: dict[str, float]) -> dict[str, float]:
        for k, v in values.items():
            buf = self.values.setdefault(k, [])
            buf.append(v)
            del buf[: -self.window]
        return {k: sum(v) / len(v) for k, v in self.values.items()}
