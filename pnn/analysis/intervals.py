"""The 95% t-intervals of the analysis, all from ``scipy.stats``: of a mean over seeds, and of a
difference of two means (Welch's, unequal variances). NaN where there are too few values.

``scipy.stats`` is imported at the first interval, not with this module: its import costs CPU
(bench/RESULTS.md), and a sweep whose groups each hold one seed computes none.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

CONFIDENCE = 0.95


def interval(test: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, float]:
    """The CONFIDENCE interval of the scipy.stats t-test ``test(*args, **kwargs)``; identical
    values give a NaN interval, shown as such (scipy's RuntimeWarning about it is silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = test(*args, **kwargs).confidence_interval(CONFIDENCE)
    return float(ci.low), float(ci.high)


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """The t-interval of the mean of ``values``; NaN with fewer than 2 values."""
    if len(values) < 2:
        return math.nan, math.nan
    from scipy import stats

    return interval(stats.ttest_1samp, values, 0.0)


def welch_interval(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Welch's t-interval for mean(a) − mean(b); NaN with fewer than 2 values on a side."""
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan
    from scipy import stats

    return interval(stats.ttest_ind, a, b, equal_var=False)
