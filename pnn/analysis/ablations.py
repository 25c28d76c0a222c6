"""Ablations: what a sweep varied, found from its runs, and each level compared with intervals.

A *swept key* of an experiment is a config key whose logged value differs between its runs,
the seed and the keys that never change results left out
(:func:`pnn.analysis.comparability.ignored_key`). ``analyze.py`` groups the results table by
them unless ``--by`` says otherwise. :func:`ablation_table` gives, per level, n, mean, std and
the 95% t-interval, and the difference from the reference level (the experiment file's value
if swept, else the first) with Welch's interval, its p-value, Holm's correction over one key's
contrasts and the seeds needed (:mod:`pnn.analysis.significance`). With several swept keys each
is compared with the others held at each of their levels (column ``held``); keys that always
change together are not held against each other. See docs/analysis.md's "Ablations".
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from pnn.analysis import significance
from pnn.analysis.comparability import experiment_config, ignored_key, same_value
from pnn.analysis.intervals import mean_interval, welch_interval
from pnn.analysis.results import experiment_key, value_key
from pnn.analysis.runs import CONFIG_PREFIX

MISSING = "—"  # the level of a run that did not log the key
ABLATION_COLUMNS = (
    "experiment",
    "key",
    "held",
    "level",
    "reference_level",
    "n",
    "best_test_acc_mean",
    "best_test_acc_std",
    "ci_low",
    "ci_high",
    "diff_vs_reference",
    "diff_ci_low",
    "diff_ci_high",
    "p_value",
    "p_holm",
    "seeds_needed",
)


def swept_keys(runs: pd.DataFrame) -> dict[str, list[str]]:
    """Per experiment (README order), the config keys whose values differ between its runs,
    alphabetically; experiments with none are left out."""
    columns = sorted(
        c
        for c in runs.columns
        if c.startswith(CONFIG_PREFIX) and not ignored_key(c.removeprefix(CONFIG_PREFIX))
    )
    found: dict[str, list[str]] = {}
    for experiment in sorted(runs["experiment"].unique(), key=experiment_key):
        mine = runs[runs["experiment"] == experiment]
        keys = [c.removeprefix(CONFIG_PREFIX) for c in columns if _levels(mine[c]).nunique() > 1]
        if keys:
            found[experiment] = keys
    return found


def all_keys(found: dict[str, list[str]]) -> list[str]:
    """The swept keys of every experiment, each once, in order of first appearance."""
    return list(dict.fromkeys(k for keys in found.values() for k in keys))


def listed(found: dict[str, list[str]]) -> str:
    """``noise.level (e7_pnn_shared_masks); ...``: the keys found, per experiment."""
    return "; ".join(f"{', '.join(keys)} ({experiment})" for experiment, keys in found.items())


def describe(found: dict[str, list[str]]) -> str:
    """One line under the results table: what it is grouped by, and how to change that."""
    if not found:
        return "No swept keys: the runs of each experiment differ only in the seed."
    return (
        f"Grouped by the swept keys found in the runs: {listed(found)}. "
        "--by KEY chooses others, --by none turns grouping off."
    )


def _levels(column: pd.Series) -> pd.Series:
    return column.fillna(MISSING).astype(str)


def _reference(experiment: str, key: str, levels: list[str]) -> str:
    own = (experiment_config(experiment) or {}).get(key)
    if own is not None:
        for level in levels:
            if same_value(level, own):
                return level
    return levels[0]


def _coupled(runs: pd.DataFrame, key: str, other: str) -> bool:
    """Whether two keys always change together (``model=...`` sweeps several): holding one
    fixed would leave the other a single level."""
    a, b = _levels(runs[CONFIG_PREFIX + key]), _levels(runs[CONFIG_PREFIX + other])
    pairs = pd.DataFrame({"a": a, "b": b}).drop_duplicates()
    return len(pairs) == a.nunique() == b.nunique()


def _held_groups(runs: pd.DataFrame, others: list[str]) -> list[tuple[str, pd.DataFrame]]:
    """(``k=v, ...`` text, runs) for each combination of the other keys' levels, in order."""
    if not others:
        return [("", runs)]
    columns = [CONFIG_PREFIX + k for k in others]
    frame = runs.assign(**{c: _levels(runs[c]) for c in columns})
    groups = []
    for values, group in frame.groupby(columns):
        values = values if isinstance(values, tuple) else (values,)
        groups.append((list(values), group))
    groups.sort(key=lambda item: [value_key(v) for v in item[0]])
    held = [
        (", ".join(f"{k}={v}" for k, v in zip(others, values, strict=True)), group)
        for values, group in groups
    ]
    return held


def _rows(experiment: str, key: str, held: str, runs: pd.DataFrame) -> list[dict[str, Any]]:
    levels_of = _levels(runs[CONFIG_PREFIX + key])
    levels = sorted(levels_of.unique(), key=value_key)
    values = {
        level: [float(v) for v in runs.loc[levels_of == level, "best_test_acc"].dropna()]
        for level in levels
    }
    reference = _reference(experiment, key, levels)
    base = values[reference]
    rows = []
    for level in levels:
        mine = values[level]
        series = pd.Series(mine, dtype=float)
        low, high = mean_interval(mine)
        contrast = level != reference
        diff_low, diff_high = welch_interval(mine, base) if contrast else (math.nan,) * 2
        diff = series.mean() - pd.Series(base, dtype=float).mean() if mine and base else math.nan
        p_value = significance.welch_p(mine, base, 0.0, "two-sided") if contrast else math.nan
        rows.append(
            {
                "experiment": experiment,
                "key": key,
                "held": held,
                "level": level,
                "reference_level": reference,
                "n": len(mine),
                "best_test_acc_mean": series.mean() if mine else math.nan,
                "best_test_acc_std": series.std(ddof=1) if len(mine) >= 2 else math.nan,
                "ci_low": low,
                "ci_high": high,
                "diff_vs_reference": float(diff),
                "diff_ci_low": diff_low,
                "diff_ci_high": diff_high,
                "p_value": p_value,
                "effect": _effect(diff, mine, base) if contrast else math.nan,
            }
        )
    return rows


def _effect(diff: float, a: list[float], b: list[float]) -> float:
    spread = significance.pooled_std(a, b)
    return abs(diff) / spread if spread else math.nan


def _seeds(row: dict[str, Any], alpha: float) -> int | str | None:
    """seeds_needed of a contrast that neither its interval nor its Holm p-value settles."""
    if math.isnan(row["p_holm"]) or row["p_holm"] < alpha:
        return None
    if row["diff_ci_low"] > 0 or row["diff_ci_high"] < 0:
        return None
    return significance.seeds_needed(row["effect"], alpha, alternative="two-sided")


def ablation_table(
    runs: pd.DataFrame, found: dict[str, list[str]], alpha: float = significance.ALPHA
) -> pd.DataFrame:
    """The rows of ablations.csv: per swept key, experiment and held combination, each level;
    Holm's correction over each key's contrasts at ``alpha``."""
    rows: list[dict[str, Any]] = []
    for key in all_keys(found):
        mine_of_key: list[dict[str, Any]] = []
        for experiment, keys in found.items():
            if key not in keys:
                continue
            mine = runs[runs["experiment"] == experiment]
            others = [k for k in keys if k != key and not _coupled(mine, key, k)]
            for held, group in _held_groups(mine, others):
                mine_of_key += _rows(experiment, key, held, group)
        adjusted = significance.holm([r["p_value"] for r in mine_of_key], alpha)
        for row, p_holm in zip(mine_of_key, adjusted, strict=True):
            row["p_holm"] = p_holm
            row["seeds_needed"] = _seeds(row, alpha)
        rows += mine_of_key
    table = pd.DataFrame(rows, columns=list(ABLATION_COLUMNS))
    # a count, "> 100" or blank: kept as they are, not turned into floats
    table["seeds_needed"] = pd.Series([r["seeds_needed"] for r in rows], dtype=object)
    return table


def figure_name(key: str) -> str:
    """``ablation_<key>.png``, the key made safe for a file name."""
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in key)
    return f"ablation_{safe}.png"
