"""Human-readable numbers for tables and one-line messages."""

from __future__ import annotations

import math


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KB"`` (powers of 1024, up to TB); NaN -> ``"-"``."""
    if isinstance(n, float) and math.isnan(n):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
