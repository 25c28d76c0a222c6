"""The claims about the runs, evaluated: the README's (``conf/claims/readme.yaml``) and a user's
own (``analyze.py --claims FILE``, read by :mod:`pnn.analysis.claims_file`).

Each claim is a difference ``a − b`` of best test accuracy (percentage points) with Welch's
95% t-interval over seeds (``scipy.stats.ttest_ind(equal_var=False)``). Verdict rules:

- ``too few runs``: a side has fewer than 2 runs; for a ``comparable_only`` claim (the README's),
  fewer than 2 runs comparable with the paper (:mod:`pnn.analysis.comparability`);
- ``supported``: the whole interval lies on the claimed side;
- ``contradicted``: the whole interval lies on the other side;
- ``inconclusive``: otherwise.

A side uses its comparable runs if it has any, else all of them; ``comparable`` says which.
A claim with a group side is an intersection: every member is tested against the other side,
and the claim is supported only if every member's interval is, contradicted if any member's
is, too few runs if a member has too few (and none is contradicted), else inconclusive. Its row
shows the member that decides this verdict whose interval lies nearest the threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from pnn.analysis.claims_file import Claim, Member, short_label
from pnn.analysis.comparability import same_value
from pnn.analysis.intervals import mean_interval, welch_interval
from pnn.analysis.results import sort_experiments
from pnn.io.store import CONFIG_PREFIX

CLAIM_COLUMNS = (
    "claim",
    "statement",
    "a",
    "b",
    "diff_mean",
    "ci_low",
    "ci_high",
    "n_a",
    "n_b",
    "published_diff",
    "verdict",
    "comparable",
)


def verdict(kind: str, threshold: float, low: float, high: float, enough: bool) -> str:
    """The verdict of an interval [low, high] on a claim (rules in the module docstring)."""
    if not enough:
        return "too few runs"
    if math.isnan(low) or math.isnan(high):
        return "inconclusive"
    t = threshold
    supported, contradicted = {
        "below": (high < t, low >= t),
        "at_least": (low >= t, high < t),
        "within": (-t < low and high < t, low >= t or high <= -t),
        "above": (low > t, high <= t),
    }[kind]
    return "supported" if supported else "contradicted" if contradicted else "inconclusive"


def margin(kind: str, threshold: float, low: float, high: float) -> float:
    """How far the interval's end nearest the claimed side's boundary lies inside that side
    (negative: outside); NaN without an interval."""
    t = threshold
    return {
        "below": t - high,
        "at_least": low - t,
        "within": min(t - high, low + t),
        "above": low - t,
    }[kind]


def member_runs(runs: pd.DataFrame, member: Member) -> pd.DataFrame:
    """The runs a member stands for: its experiment's, filtered by its config values; the
    comparable ones if there are any, else all."""
    mine = runs[runs["experiment"] == member.experiment]
    for key, value in member.where:
        logged = mine[CONFIG_PREFIX + key]
        mine = mine[[isinstance(v, str) and same_value(v, value) for v in logged]]
    comparable = mine[mine["comparable"]]
    return comparable if len(comparable) else mine


@dataclass
class _Pair:
    """One member of side a against one of side b."""

    a: Member
    b: Member
    a_values: list[float]
    b_values: list[float]
    comparable: bool  # both have comparable runs (and use only those)
    low: float
    high: float
    verdict: str
    margin: float

    @property
    def has_runs(self) -> bool:
        return bool(self.a_values) and bool(self.b_values)

    @property
    def diff(self) -> float:
        if not self.has_runs:
            return math.nan
        return float(pd.Series(self.a_values).mean() - pd.Series(self.b_values).mean())


def _pair(claim: Claim, runs: pd.DataFrame, a: Member, b: Member) -> _Pair:
    used = {side: member_runs(runs, side) for side in (a, b)}
    values = {side: [float(v) for v in used[side]["best_test_acc"].dropna()] for side in (a, b)}
    counts = {side: int(used[side]["comparable"].sum()) for side in (a, b)}
    comparable = counts[a] > 0 and counts[b] > 0
    if claim.comparable_only:
        enough = counts[a] >= 2 and counts[b] >= 2
    else:
        enough = len(values[a]) >= 2 and len(values[b]) >= 2
    low, high = welch_interval(values[a], values[b])
    return _Pair(
        a,
        b,
        values[a],
        values[b],
        comparable,
        low,
        high,
        verdict(claim.kind, claim.threshold, low, high, enough),
        margin(claim.kind, claim.threshold, low, high),
    )


def _overall(verdicts: list[str]) -> str:
    if "contradicted" in verdicts:
        return "contradicted"
    if all(v == "supported" for v in verdicts):
        return "supported"
    return "too few runs" if "too few runs" in verdicts else "inconclusive"


def _claim_row(claim: Claim, runs: pd.DataFrame, published: dict[str, float]) -> dict | None:
    """The claim's row, or None when no pair of members has runs on both sides."""
    pairs = [_pair(claim, runs, a, b) for a in claim.a for b in claim.b]
    if not any(p.has_runs for p in pairs):
        return None
    overall = _overall([p.verdict for p in pairs])
    deciding = [p for p in pairs if p.verdict == overall]
    shown = min(
        deciding,
        key=lambda p: (not p.has_runs, math.inf if math.isnan(p.margin) else abs(p.margin)),
    )
    comparable = all(p.comparable for p in pairs)
    statement = claim.statement
    if len(pairs) > 1:
        statement += (
            f" [every member must hold; shown: {short_label(shown.a.label)} − "
            f"{short_label(shown.b.label)}, of the members with this verdict the one nearest the "
            "threshold]"
        )
    published_diff = math.nan
    if comparable:
        published_diff = published.get(shown.a.experiment, math.nan) - published.get(
            shown.b.experiment, math.nan
        )
    return {
        "claim": claim.id,
        "statement": statement,
        "a": shown.a.label,
        "b": shown.b.label,
        "diff_mean": shown.diff,
        "ci_low": shown.low,
        "ci_high": shown.high,
        "n_a": len(shown.a_values),
        "n_b": len(shown.b_values),
        "published_diff": published_diff,
        "verdict": overall,
        "comparable": comparable,
        "kind": claim.kind,
        "threshold": claim.threshold,
    }


def evaluate_claims(
    runs: pd.DataFrame, published: dict[str, float], claims: list[Claim]
) -> tuple[pd.DataFrame, list[str]]:
    """One row per claim with runs on both sides, then one ``gap_<experiment>`` row per
    experiment with runs (the headline: best reported − best actual, one-sample t-interval over
    its runs); and the ids of the claims left out for want of runs.

    ``runs`` must carry :func:`pnn.analysis.comparability.annotate_comparability`'s columns. Besides
    the columns of claims.csv the frame has ``kind`` and ``threshold``, for the figure.
    """
    rows: list[dict[str, Any]] = []
    without_runs: list[str] = []
    for claim in claims:
        row = _claim_row(claim, runs, published)
        if row is None:
            without_runs.append(claim.id)
        else:
            rows.append(row)
    rows += gap_rows(runs)
    return pd.DataFrame(rows, columns=[*CLAIM_COLUMNS, "kind", "threshold"]), without_runs


def gap_rows(runs: pd.DataFrame) -> list[dict[str, Any]]:
    """The headline per experiment: the original code's reported accuracy exceeds the actual."""
    rows = []
    experiments = sort_experiments(pd.DataFrame({"experiment": runs["experiment"].unique()}), [])
    for experiment in experiments["experiment"]:
        used = member_runs(runs, Member(experiment))
        gaps = (used["best_test_acc_reported"] - used["best_test_acc"]).dropna()
        if gaps.empty:
            continue
        low, high = mean_interval(gaps)  # NaN with one run
        comparable = bool(used["comparable"].all())
        enough = comparable and len(gaps) >= 2
        rows.append(
            {
                "claim": f"gap_{experiment}",
                "statement": "The original code's accuracy formula over-reports: best reported "
                "- best actual > 0 (paired per run; one-sample t-interval)",
                "a": f"{experiment} (reported)",
                "b": f"{experiment} (actual)",
                "diff_mean": float(gaps.mean()),
                "ci_low": low,
                "ci_high": high,
                "n_a": len(gaps),
                "n_b": len(gaps),
                "published_diff": math.nan,  # the paper reports no per-experiment gap
                "verdict": verdict("above", 0.0, low, high, enough),
                "comparable": comparable,
                "kind": "above",
                "threshold": 0.0,
            }
        )
    return rows
