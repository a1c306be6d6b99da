"""Small statistics helpers, pure Python so every process can import them."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Return the ``q``-th percentile of already sorted values.

    Linear interpolation between closest ranks (numpy's default method).

    Args:
        sorted_values: non-empty values in ascending order.
        q: percentile in [0, 100].

    Raises:
        ValueError: on an empty sequence or ``q`` out of range.
    """
    if not sorted_values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside [0, 100]")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return float(sorted_values[lo]) * (1.0 - frac) + float(sorted_values[hi]) * frac


def latency_summary_us(samples_ns: Sequence[int]) -> dict[str, float]:
    """Summarise per-call latencies given in nanoseconds, in microseconds.

    Returns:
        ``p50_us``, ``p90_us``, ``p99_us``, ``mean_us``, ``min_us``,
        ``max_us`` and ``n``.
    """
    us = sorted(s / 1e3 for s in samples_ns)
    return {
        "p50_us": percentile(us, 50),
        "p90_us": percentile(us, 90),
        "p99_us": percentile(us, 99),
        "mean_us": statistics.fmean(us),
        "min_us": us[0],
        "max_us": us[-1],
        "n": float(len(us)),
    }


def spread(values: Sequence[float]) -> dict[str, float]:
    """Summarise one metric across launches.

    Returns:
        ``median``, ``min``, ``max``, ``q1``, ``q3`` (interquartile bounds)
        and ``n``.
    """
    ordered = sorted(values)
    return {
        "median": percentile(ordered, 50),
        "min": ordered[0],
        "max": ordered[-1],
        "q1": percentile(ordered, 25),
        "q3": percentile(ordered, 75),
        "n": float(len(ordered)),
    }
