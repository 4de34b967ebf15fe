"""Confidence intervals shared by the judge's summary (compare.py) and the demo's report (showcase/report.py)."""

from __future__ import annotations

import math
from typing import Optional

from feedbackalign.errors import DataError

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[Optional[float], Optional[float]]:
    """Wilson score interval for k successes in n trials (Wilson 1927); (None, None) when n = 0 (no data: no
    interval, rather than an invented [0, 1])."""
    if n == 0:
        return None, None
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_ci(values: list[float], z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high): the mean with a normal 95% interval, mean +- z s / sqrt(n) (s: sample std)."""
    n = len(values)
    if n == 0:
        raise DataError("mean_ci: no values (the samples file has no samples)")
    mean = sum(values) / n
    if n == 1:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = z * sd / math.sqrt(n)
    return mean, mean - half, mean + half
