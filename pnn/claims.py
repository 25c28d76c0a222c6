"""Which runs can be compared with the paper, and what they say about the README's claims.

A run is *comparable* when its logged config (the flattened resolved config, ``config.<key>``
columns of :func:`pnn.store.load_runs`) equals the full composed config of its experiment file
(``profile=full``, CIFAR-10), apart from the seed and the keys that do not change results
(:data:`pnn.tracking.VOLATILE_KEYS`, plus the description and published accuracy, which are
labels).

Each claim is a difference ``a − b`` of best test accuracy (percentage points) with Welch's
95% t-interval over seeds (``scipy.stats.ttest_ind(equal_var=False)``). Verdict rules:

- ``too few runs``: an experiment the row involves has fewer than 2 comparable runs;
- ``supported``: the whole interval lies on the claimed side;
- ``contradicted``: the whole interval lies on the other side;
- ``inconclusive``: otherwise.

The differences are shown for whatever runs exist (a demo's too): per experiment its comparable
runs if it has any, else all of them; ``comparable`` says which it was.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pandas as pd
from scipy import stats

from pnn.config import CONF_DIR
from pnn.results import README_EXPERIMENTS, sort_experiments
from pnn.store import CONFIG_PREFIX, to_float

# Labels, not settings: they never change what a run computes.
LABEL_KEYS = ("description", "published_test_acc")
# Only meaningful for dataset=synthetic; "synthetic data" already says the data differ.
SYNTHETIC_KEYS = ("dataset.train_size", "dataset.test_size", "dataset.seed")
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
CONFIDENCE = 0.95


# --------------------------------------------------------------------------------------------
# Comparability
# --------------------------------------------------------------------------------------------


def ignored_key(key: str) -> bool:
    """Whether a config key is left out of comparisons: the seed, labels, and keys that do not
    change results."""
    from pnn.tracking import VOLATILE_KEYS  # another module may extend it; read it late

    keys = (*VOLATILE_KEYS, *LABEL_KEYS, "train.seed")
    return any(key == k or key.startswith(k + ".") for k in keys)


@lru_cache(maxsize=64)
def paper_config(experiment: str) -> dict[str, str] | None:
    """The flattened full config of ``conf/experiment/<experiment>.yaml`` as ``sweep.py`` would
    compose it, without the ignored keys; None if no such file or it has no published accuracy."""
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    from pnn.config import load_config
    from pnn.tracking import flatten

    if not (CONF_DIR / "experiment" / f"{experiment}.yaml").is_file():
        return None
    # write_report also runs at the end of a sweep, inside Hydra: leave its global state as is.
    backup = get_gh_backup()
    try:
        cfg = load_config([f"experiment={experiment}"], validate_config=False)
    finally:
        restore_gh_from_backup(backup)
    if cfg.published_test_acc is None or cfg.experiment != experiment:
        return None
    return {k: v for k, v in flatten(cfg).items() if not ignored_key(k)}


def _same(logged: str, expected: str) -> bool:
    if logged == expected:
        return True
    a, b = to_float(logged), to_float(expected)
    return not math.isnan(a) and a == b


def run_differences(run: pd.Series) -> list[str] | None:
    """Why ``run`` differs from its experiment's paper config, as ``key=value`` items in the
    order of the config; [] if it is comparable, None if its experiment is not a paper one."""
    expected = paper_config(str(run["experiment"]))
    if expected is None:
        return None
    logged = {
        c.removeprefix(CONFIG_PREFIX): run[c]
        for c in run.index
        if c.startswith(CONFIG_PREFIX) and isinstance(run[c], str)
    }
    logged = {k: v for k, v in logged.items() if not ignored_key(k)}
    items: list[str] = []
    synthetic = logged.get("dataset.name") == "synthetic" != expected.get("dataset.name")
    for key in [*expected, *(k for k in logged if k not in expected)]:
        if synthetic and key in SYNTHETIC_KEYS:
            continue
        if key not in logged:
            items.append(f"{key} not logged")
        elif key not in expected or not _same(logged[key], expected[key]):
            if synthetic and key == "dataset.name":
                items.insert(0, "synthetic data")
            else:
                items.append(f"{key}={logged[key]}")
    return items


def annotate_comparability(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` plus ``comparable`` (bool) and ``not_comparable_because`` (text) per run."""
    runs = runs.copy()
    comparable, because = [], []
    for _, run in runs.iterrows():
        items = run_differences(run)
        if items is None:
            comparable.append(False)
            because.append("not one of the paper's experiments")
        else:
            comparable.append(not items)
            because.append(", ".join(items))
    runs["comparable"] = pd.Series(comparable, index=runs.index, dtype=bool)
    runs["not_comparable_because"] = because
    return runs


def row_reason(group: pd.DataFrame) -> str:
    """Why a results row (its runs) is not comparable; '' if all its runs are."""
    bad = group[~group["comparable"]]
    if bad.empty:
        return ""
    items: list[str] = []
    for text in bad["not_comparable_because"]:
        items += [i for i in text.split(", ") if i and i not in items]
    prefix = "" if len(bad) == len(group) else f"{len(bad)} of {len(group)} runs: "
    return prefix + ", ".join(items)


# --------------------------------------------------------------------------------------------
# Claims
# --------------------------------------------------------------------------------------------

E = {f"e{i}": name for i, name in enumerate(README_EXPERIMENTS, 1)}


@dataclass(frozen=True)
class Claim:
    """``a − b`` (best test accuracy, pp) lies on the claimed side of ``threshold``.

    ``kind``: ``below`` (diff < t), ``at_least`` (diff >= t), ``within`` (|diff| < t) or
    ``above`` (diff > t). A side with several experiments stands for the one with the highest
    mean best test accuracy (the best of the group).
    """

    id: str
    a: tuple[str, ...]
    b: tuple[str, ...]
    kind: str
    threshold: float
    statement: str


# The README's "What the published numbers show", in its order.
CLAIMS = (
    Claim(
        "noise_worth_under_1pt",
        (E["e3"],),
        (E["e4"],),
        "below",
        1.0,
        "Noise on a network of 1x1 convolutions is worth less than a point: e3 - e4 < 1",
    ),
    Claim(
        "e6_e7_below_e4",
        (E["e6"], E["e7"]),
        (E["e4"],),
        "below",
        0.0,
        "The variants closest to the paper do worse than the plain 1x1 network: "
        "a - e4 < 0, a = whichever of e6, e7 has the higher mean (so both are below)",
    ),
    Claim(
        "trained_masks_match_e4",
        (E["e8"],),
        (E["e4"],),
        "within",
        1.0,
        "Training the masks brings them back to about the plain network's level: |e8 - e4| < 1",
    ),
    Claim(
        "all_5pt_below_baseline",
        (E["e1"],),
        tuple(E[f"e{i}"] for i in range(2, 9)),
        "at_least",
        5.0,
        "All variants stay at least 5 points below the baseline: e1 - b >= 5, "
        "b = whichever of e2-e8 has the highest mean",
    ),
    Claim(
        "first_layer_noise_costs_10pt",
        (E["e3"],),
        (E["e5"],),
        "at_least",
        10.0,
        "Noise in the first layer too costs 10 points or more: e3 (noise after a 3x3 first "
        "layer, 1 mask) - e5 (noise in every layer, 1 mask) >= 10",
    ),
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


@dataclass
class _Side:
    experiment: str  # the chosen member ("" if none has runs)
    values: list[float]
    comparable: bool  # every member has runs, all of them comparable
    enough: bool  # every member has at least 2 comparable runs


def _used_runs(runs: pd.DataFrame, experiment: str) -> pd.DataFrame:
    mine = runs[runs["experiment"] == experiment]
    comparable = mine[mine["comparable"]]
    return comparable if len(comparable) else mine


def _side(runs: pd.DataFrame, members: Sequence[str]) -> _Side:
    frames = {m: _used_runs(runs, m) for m in members}
    used = {m: frame["best_test_acc"].dropna() for m, frame in frames.items()}
    present = {m: v for m, v in used.items() if len(v)}
    counts = {m: int(frame["comparable"].sum()) for m, frame in frames.items()}
    comparable = all(counts[m] > 0 for m in members)
    enough = all(counts[m] >= 2 for m in members)
    if not present:
        return _Side("", [], comparable, enough)
    chosen = max(present, key=lambda m: present[m].mean())
    return _Side(chosen, [float(v) for v in present[chosen]], comparable, enough)


def welch_interval(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Welch's t-interval for mean(a) − mean(b); NaN with fewer than 2 values on a side."""
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan
    return _interval(stats.ttest_ind, a, b, equal_var=False)


def _interval(test: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, float]:
    """The CONFIDENCE interval of the scipy.stats t-test ``test(*args, **kwargs)``; identical
    values give a NaN interval, shown as such (scipy's RuntimeWarning about it is silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = test(*args, **kwargs).confidence_interval(CONFIDENCE)
    return float(ci.low), float(ci.high)


def _published_diff(claim: Claim, published: dict[str, float]) -> float:
    def best(members: tuple[str, ...]) -> float:
        values = [published.get(m, math.nan) for m in members]
        values = [v for v in values if not math.isnan(v)]
        return max(values) if len(values) == len(members) else math.nan

    return best(claim.a) - best(claim.b)


def _name(side: _Side, members: tuple[str, ...]) -> str:
    return side.experiment or " | ".join(members)


def evaluate_claims(runs: pd.DataFrame, published: dict[str, float]) -> pd.DataFrame:
    """One row per claim, then one ``gap_<experiment>`` row per experiment with runs (the
    headline: best reported − best actual, one-sample t-interval over its runs).

    ``runs`` must carry :func:`annotate_comparability`'s columns. Besides the columns of
    claims.csv the frame has ``kind`` and ``threshold``, for the figure.
    """
    rows: list[dict[str, Any]] = []
    for claim in CLAIMS:
        a, b = _side(runs, claim.a), _side(runs, claim.b)
        low, high = welch_interval(a.values, b.values)
        comparable = a.comparable and b.comparable
        mean = (
            float(pd.Series(a.values).mean() - pd.Series(b.values).mean())
            if a.values and b.values
            else math.nan
        )
        rows.append(
            {
                "claim": claim.id,
                "statement": claim.statement,
                "a": _name(a, claim.a),
                "b": _name(b, claim.b),
                "diff_mean": mean,
                "ci_low": low,
                "ci_high": high,
                "n_a": len(a.values),
                "n_b": len(b.values),
                "published_diff": _published_diff(claim, published) if comparable else math.nan,
                "verdict": verdict(
                    claim.kind, claim.threshold, low, high, comparable and a.enough and b.enough
                ),
                "comparable": comparable,
                "kind": claim.kind,
                "threshold": claim.threshold,
            }
        )
    rows += gap_rows(runs)
    return pd.DataFrame(rows, columns=[*CLAIM_COLUMNS, "kind", "threshold"])


def gap_rows(runs: pd.DataFrame) -> list[dict[str, Any]]:
    """The headline per experiment: the original code's reported accuracy exceeds the actual."""
    rows = []
    experiments = sort_experiments(pd.DataFrame({"experiment": runs["experiment"].unique()}), [])
    for experiment in experiments["experiment"]:
        used = _used_runs(runs, experiment)
        gaps = (used["best_test_acc_reported"] - used["best_test_acc"]).dropna()
        if gaps.empty:
            continue
        low = high = math.nan
        if len(gaps) >= 2:
            low, high = _interval(stats.ttest_1samp, gaps, 0.0)
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
