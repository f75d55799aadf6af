"""The summary every engine measurement reports: the median and the range of repeated runs."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def spread(values: Sequence[float]) -> dict[str, float | int]:
    """``{"median", "min", "max", "runs"}`` of ``values`` (one per timed run)."""
    if not values:
        raise ValueError("values: no timed runs")
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values)),
            "runs": len(values)}


def format_spread(value: dict[str, float | int], unit: str, digits: int = 1) -> str:
    """``"123.4 tok/s (120.1-125.0, 5 runs)"``."""
    return (f"{value['median']:.{digits}f} {unit} ({value['min']:.{digits}f}-{value['max']:.{digits}f}, "
            f"{value['runs']} runs)")
