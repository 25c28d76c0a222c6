"""The claims about the runs, evaluated: the README's (``conf/claims/readme.yaml``) and a user's
own (``analyze.py --claims FILE``, read by :mod:`pnn.analysis.claims_file`).

Each claim is a difference ``a − b`` of best test accuracy (percentage points) with Welch's
95% t-interval over seeds. The verdict is ``supported`` or ``contradicted`` when the whole
interval lies on the claimed or the other side, ``too few runs`` under 2 (comparable) runs a
side, ``not comparable`` when a ``comparable_only`` side has no run comparable with the paper
(:mod:`pnn.analysis.comparability`), else ``inconclusive``. Beside it: the one-sided p-value,
Holm's correction over one evaluation, the verdict at α and the seeds a side needs
(:mod:`pnn.analysis.significance`). A group side is an intersection test, member by member;
its row shows the deciding member nearest the threshold. The rules are docs/analysis.md's
"The README's claims".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pnn.analysis import significance
from pnn.analysis.claims_file import Claim, Member, short_label
from pnn.analysis.comparability import same_value
from pnn.analysis.intervals import mean_interval, welch_interval
from pnn.analysis.results import sort_experiments
from pnn.analysis.runs import CONFIG_PREFIX
from pnn.analysis.significance import ALPHA

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
    "p_value",
    "p_holm",
    "verdict_holm",
    "seeds_needed",
)
NOT_COMPARABLE = "not comparable"
SETTLED = ("supported", "contradicted")


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


def distance(kind: str, threshold: float, diff: float) -> float:
    """|(a − b) − t|, for ``within`` from the nearer of ±t: the effect a test must detect."""
    if kind == "within":
        return min(abs(diff - threshold), abs(diff + threshold))
    return abs(diff - threshold)


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
    counts: tuple[int, int]  # comparable runs of a and of b
    low: float
    high: float
    verdict: str
    margin: float
    p_value: float
    seeds_needed: int | str | None  # for an inconclusive pair, else None

    @property
    def has_runs(self) -> bool:
        return bool(self.a_values) and bool(self.b_values)

    @property
    def comparable(self) -> bool:
        """Both have comparable runs (and use only those)."""
        return self.counts[0] > 0 and self.counts[1] > 0

    @property
    def diff(self) -> float:
        if not self.has_runs:
            return math.nan
        return float(pd.Series(self.a_values).mean() - pd.Series(self.b_values).mean())


def _pair(claim: Claim, runs: pd.DataFrame, a: Member, b: Member, alpha: float) -> _Pair:
    used = {side: member_runs(runs, side) for side in (a, b)}
    values = {side: [float(v) for v in used[side]["best_test_acc"].dropna()] for side in (a, b)}
    counts = (int(used[a]["comparable"].sum()), int(used[b]["comparable"].sum()))
    has_two = len(values[a]) >= 2 and len(values[b]) >= 2
    enough = has_two and (not claim.comparable_only or min(counts) >= 2)
    low, high = welch_interval(values[a], values[b])
    said = verdict(claim.kind, claim.threshold, low, high, enough)
    if claim.comparable_only and has_two and min(counts) == 0:
        said = NOT_COMPARABLE
    p_value = math.nan
    if enough:
        p_value = significance.claim_p(claim.kind, claim.threshold, values[a], values[b])
    pair = _Pair(
        a,
        b,
        values[a],
        values[b],
        counts,
        low,
        high,
        said,
        margin(claim.kind, claim.threshold, low, high),
        p_value,
        None,
    )
    if said == "inconclusive":
        spread = significance.pooled_std(values[a], values[b])
        effect = distance(claim.kind, claim.threshold, pair.diff) / spread if spread else math.nan
        pair.seeds_needed = significance.seeds_needed(effect, alpha)
    return pair


def _overall(verdicts: list[str]) -> str:
    if "contradicted" in verdicts:
        return "contradicted"
    if all(v == "supported" for v in verdicts):
        return "supported"
    for label in (NOT_COMPARABLE, "too few runs"):
        if label in verdicts:
            return label
    return "inconclusive"


def most_seeds(candidates: list[int | str | None]) -> int | str | None:
    """The largest of several seeds_needed (:data:`significance.TOO_MANY` above all)."""
    if significance.TOO_MANY in candidates:
        return significance.TOO_MANY
    numbers = [c for c in candidates if isinstance(c, int)]
    return max(numbers) if numbers else None


@dataclass
class _Open:
    """What a row that more seeds might settle needs: seeds per side, and the sides."""

    seeds: int | str | None = None
    members: list[Member] = field(default_factory=list)


def _claim_row(
    claim: Claim, runs: pd.DataFrame, published: dict[str, float], alpha: float
) -> dict | None:
    """The claim's row, or None when no pair of members has runs on both sides."""
    pairs = [_pair(claim, runs, a, b, alpha) for a in claim.a for b in claim.b]
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
    label = overall
    if overall == NOT_COMPARABLE:
        label += f" ({shown.counts[0]} / {shown.counts[1]} comparable runs)"
    open_pairs = [p for p in pairs if p.verdict == "inconclusive"]
    members = [m for p in open_pairs for m in (p.a, p.b)]
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
        "verdict": label,
        "comparable": comparable,
        "p_value": significance.intersection_p([p.p_value for p in pairs]),
        "kind": claim.kind,
        "threshold": claim.threshold,
        "open": _Open(
            most_seeds([p.seeds_needed for p in open_pairs]), list(dict.fromkeys(members))
        ),
    }


def evaluate_claims(
    runs: pd.DataFrame, published: dict[str, float], claims: list[Claim], alpha: float = ALPHA
) -> tuple[pd.DataFrame, list[str]]:
    """One row per claim with runs on both sides, then one ``gap_<experiment>`` row per
    experiment with runs (the headline: best reported − best actual, one-sample t-interval over
    its runs); and the ids of the claims left out for want of runs. Holm's correction runs over
    every row's p-value, at ``alpha``.

    ``runs`` must carry :func:`pnn.analysis.comparability.annotate_comparability`'s columns. Besides
    the columns of claims.csv the frame has ``kind`` and ``threshold``, for the figure, and
    ``open`` (:class:`_Open`: the seeds per side and the sides that need them; for
    :mod:`pnn.analysis.next_seeds`).
    """
    rows: list[dict[str, Any]] = []
    without_runs: list[str] = []
    for claim in claims:
        row = _claim_row(claim, runs, published, alpha)
        if row is None:
            without_runs.append(claim.id)
        else:
            rows.append(row)
    rows += gap_rows(runs, alpha)
    adjusted = significance.holm([r["p_value"] for r in rows], alpha)
    for row, p_holm in zip(rows, adjusted, strict=True):
        row["p_holm"] = p_holm
        row["verdict_holm"] = (
            "" if math.isnan(p_holm) else "supported" if p_holm < alpha else "not supported"
        )
        settled = row["verdict"] in SETTLED or row["verdict_holm"] == "supported"
        if settled or row["open"].seeds is None:
            row["open"] = _Open()
        row["seeds_needed"] = row["open"].seeds
    frame = pd.DataFrame(rows, columns=[*CLAIM_COLUMNS, "kind", "threshold", "open"])
    # a count, "> 100" or blank: kept as they are, not turned into floats
    frame["seeds_needed"] = pd.Series([r["seeds_needed"] for r in rows], dtype=object)
    return frame, without_runs


def gap_rows(runs: pd.DataFrame, alpha: float = ALPHA) -> list[dict[str, Any]]:
    """The headline per experiment: the original code's reported accuracy exceeds the actual
    (a one-sample test of the paired gaps, H1 gap > 0)."""
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
        said = verdict("above", 0.0, low, high, enough)
        if len(gaps) >= 2 and not comparable:
            said = f"{NOT_COMPARABLE} ({int(used['comparable'].sum())} comparable runs)"
        values = [float(g) for g in gaps]
        found = _Open()
        if said == "inconclusive":
            std = pd.Series(values).std(ddof=1)
            effect = float(gaps.mean()) / std if std else math.nan
            seeds = significance.seeds_needed(effect, alpha, one_sample=True)
            found = _Open(seeds, [Member(experiment)])
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
                "verdict": said,
                "comparable": comparable,
                "p_value": significance.one_sample_p(values) if enough else math.nan,
                "kind": "above",
                "threshold": 0.0,
                "open": found,
            }
        )
    return rows
