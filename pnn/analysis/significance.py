"""p-values, Holm's correction and the seeds a test needs: pure functions over lists of values.

- Welch's t-test (Welch 1947), one-sided against a threshold: ``scipy.stats.ttest_ind(a − t, b,
  equal_var=False, alternative=...)``, the statistic of the claims' intervals;
- two one-sided tests for ``|a − b| < t`` (TOST, Schuirmann 1987): the larger p-value;
- an intersection of claims (a group side, Berger 1982): the largest p-value;
- Holm's step-down correction over a family of p-values (Holm 1979):
  ``statsmodels.stats.multitest.multipletests(method="holm")``;
- the seeds per side for 80% power at α (Cohen 1988; as Colas et al. 2018 ask of pilot runs):
  ``statsmodels.stats.power.TTestIndPower().solve_power`` with the effect |(a − b) − t| over
  the pooled sample std sqrt((s_a² + s_b²) / 2); ``TTestPower`` for one sample.

scipy and statsmodels are imported when first used, as in :mod:`pnn.analysis.intervals`.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence

ALPHA = 0.05  # analyze.py --alpha
POWER = 0.8
MAX_SEEDS = 100  # beyond this a difference is too small to settle by seeds
TOO_MANY = f"> {MAX_SEEDS}"


def welch_p(a: Sequence[float], b: Sequence[float], threshold: float, alternative: str) -> float:
    """p of Welch's test of mean(a) − mean(b) against ``threshold``; ``alternative`` "less" or
    "greater" is H1. NaN with fewer than 2 values on a side, or no spread at all."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    from scipy import stats

    shifted = [x - threshold for x in a]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(shifted, b, equal_var=False, alternative=alternative)
    return float(result.pvalue)


def claim_p(kind: str, threshold: float, a: Sequence[float], b: Sequence[float]) -> float:
    """p of a claim's H1 on a − b: ``below`` a − b < t, ``above`` and ``at_least`` a − b > t,
    ``within`` −t < a − b < t (TOST: the larger of the two one-sided p-values)."""
    t = threshold
    if kind == "below":
        return welch_p(a, b, t, "less")
    if kind in ("above", "at_least"):
        return welch_p(a, b, t, "greater")
    if kind == "within":
        return max(welch_p(a, b, -t, "greater"), welch_p(a, b, t, "less"))
    raise ValueError(f"kind must be one of below, at_least, within, above (got {kind!r})")


def one_sample_p(values: Sequence[float], alternative: str = "greater") -> float:
    """p of the one-sample t-test of mean(values) against 0; NaN with fewer than 2 values."""
    if len(values) < 2:
        return math.nan
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_1samp(values, 0.0, alternative=alternative).pvalue)


def intersection_p(pvalues: Sequence[float]) -> float:
    """p of "every member holds": the largest member p-value; NaN if any is NaN."""
    if not pvalues or any(math.isnan(p) for p in pvalues):
        return math.nan
    return max(pvalues)


def holm(pvalues: Sequence[float], alpha: float) -> list[float]:
    """Holm-adjusted p-values of the family of the non-NaN ``pvalues``; NaN stays NaN."""
    present = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    adjusted = [math.nan] * len(pvalues)
    if not present:
        return adjusted
    from statsmodels.stats.multitest import multipletests

    corrected = multipletests([pvalues[i] for i in present], alpha=alpha, method="holm")[1]
    for i, p in zip(present, corrected, strict=True):
        adjusted[i] = float(p)
    return adjusted


def pooled_std(a: Sequence[float], b: Sequence[float]) -> float:
    """sqrt((s_a² + s_b²) / 2) with sample variances; NaN with fewer than 2 values on a side."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    return math.sqrt((statistics.variance(a) + statistics.variance(b)) / 2)


def seeds_needed(
    effect: float, alpha: float, alternative: str = "larger", one_sample: bool = False
) -> int | str | None:
    """The smallest n per side (at least 2) giving ``POWER`` to the t-test at ``alpha`` for the
    standardised ``effect``; :data:`TOO_MANY` beyond :data:`MAX_SEEDS`; None without an effect
    (NaN or infinite: no spread to measure it by)."""
    if not math.isfinite(effect):
        return None
    from statsmodels.stats.power import TTestIndPower, TTestPower

    analysis = TTestPower() if one_sample else TTestIndPower()
    effect = abs(effect)

    def power(n: int) -> float:
        return analysis.power(effect, n, alpha, alternative=alternative)

    # solve_power fails to converge where 2 already suffice and says little beyond MAX_SEEDS.
    if effect == 0 or power(MAX_SEEDS) < POWER:
        return TOO_MANY
    if power(2) >= POWER:
        return 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = analysis.solve_power(effect, None, alpha, POWER, alternative=alternative)
    n = float(n)
    return max(2, math.ceil(n)) if math.isfinite(n) else None
