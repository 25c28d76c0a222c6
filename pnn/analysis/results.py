"""MLflow runs -> the reproduction's tables: results per experiment, reported versus actual.

Statistics are over seeds (runs) of one experiment (x ``--by`` values). The std is the sample
std (ddof=1); with a single run it is undefined and left blank (NaN in pandas, an empty cell in
the CSV, the mean alone in Markdown/LaTeX/HTML) rather than written as a misleading 0.

Loading lives in :mod:`pnn.analysis.runs`, rendering in :mod:`pnn.analysis.report`, figures in
:mod:`pnn.analysis.plots`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from pnn.analysis.comparability import ignored_key, row_reason
from pnn.analysis.runs import CONFIG_PREFIX, AnalysisError, to_float
from pnn.config import CONF_DIR
from pnn.io.liveness import lease_status

# The reproduction's eight experiments, in its README's order.
README_EXPERIMENTS = (
    "e1_baseline_resnet18",
    "e2_original_noiseresnet18",
    "e3_original_first3x3",
    "e4_conv1x1_no_noise",
    "e5_pnn_all_layers",
    "e6_pnn_unique_masks_mix_maps",
    "e7_pnn_shared_masks",
    "e8_pnn_trained_masks",
)
# The README's second figure: three ResNet-18-like models of ~5.5M parameters.
RESNET18_LIKE = ("e1_baseline_resnet18", "e4_conv1x1_no_noise", "e7_pnn_shared_masks")
# Columns of results.csv, in order; ``--by`` columns follow ``experiment``.
SUMMARY_COLUMNS = (
    "experiment",
    "description",
    "n_runs",
    "params_M",
    "mask_values_M",
    "final_test_acc_mean",
    "final_test_acc_std",
    "best_test_acc_mean",
    "best_test_acc_std",
    "best_test_acc_reported_mean",
    "published_test_acc",
    "diff_vs_published",
    "comparable",
    "not_comparable_because",
)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def experiment_defaults(conf_dir: Path = CONF_DIR) -> dict[str, dict[str, Any]]:
    """Description and published accuracy of each ``conf/experiment/*.yaml``."""
    defaults = {}
    for path in sorted((conf_dir / "experiment").glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path))
        assert isinstance(node, dict)
        defaults[path.stem] = {
            "description": node.get("description") or "",
            "published_test_acc": to_float(node.get("published_test_acc")),
        }
    return defaults


def parse_by(values: list[str] | None) -> list[str] | None:
    """``--by a --by b,c`` -> ``[a, b, c]``, in order, without repeats; ``--by none`` -> ``[]``
    (no grouping); no ``--by`` -> None (group by the swept keys, :mod:`pnn.analysis.ablations`)."""
    if values is None:
        return None
    keys: list[str] = []
    for value in values:
        for key in value.split(","):
            key = key.strip().removeprefix(CONFIG_PREFIX)
            if key and key not in keys:
                keys.append(key)
    if "none" in keys:
        if keys != ["none"]:
            raise AnalysisError(f"--by none turns grouping off; it takes no other key (got {keys})")
        return []
    return keys


def check_by(runs: pd.DataFrame, by: list[str]) -> None:
    missing = [k for k in by if CONFIG_PREFIX + k not in runs.columns]
    if missing:
        known = sorted(c.removeprefix(CONFIG_PREFIX) for c in runs if c.startswith(CONFIG_PREFIX))
        raise AnalysisError(
            f"--by {', '.join(missing)}: no such config key in the runs; "
            f"known keys include {', '.join(known[:12])}, ..."
        )


def experiment_key(experiment: str) -> tuple[int, str]:
    if experiment in README_EXPERIMENTS:
        return README_EXPERIMENTS.index(experiment), ""
    return len(README_EXPERIMENTS), experiment


def value_key(value: Any) -> tuple[int, float, str]:
    number = to_float(value)
    return (0, number, "") if not math.isnan(number) else (1, 0.0, str(value))


def sort_experiments(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """README order, then other experiments alphabetically; ``--by`` values numerically."""
    keys = [
        (experiment_key(row["experiment"]), *(value_key(row[k]) for k in by))
        for _, row in frame.iterrows()
    ]
    order = sorted(range(len(frame)), key=lambda i: keys[i])
    return frame.iloc[order].reset_index(drop=True)


def _first(values: pd.Series, default: Any) -> Any:
    for value in values:
        if isinstance(value, str) and value:
            return value
        if not isinstance(value, str) and value is not None and not pd.isna(value):
            return value
    return default


def _mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.mean()) if len(values) else math.nan


def _std(values: pd.Series) -> float:
    """Sample std over seeds; NaN (shown blank) for fewer than two values."""
    values = values.dropna()
    return float(values.std(ddof=1)) if len(values) >= 2 else math.nan


def summarize(runs: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """The results table: one row per experiment (x ``by`` values), the columns of results.csv.

    Only experiments with runs have rows (:func:`not_run` names the README's others). A row
    gets the published accuracy and the difference only if all its runs are comparable with the
    paper (:mod:`pnn.analysis.comparability`); else ``not_comparable_because`` says why not.
    """
    by = by or []
    check_by(runs, by)
    defaults = experiment_defaults()
    group_keys = ["experiment", *(CONFIG_PREFIX + k for k in by)]
    rows = []
    if len(runs):
        for values, group in runs.fillna({k: "—" for k in group_keys[1:]}).groupby(group_keys):
            values = values if isinstance(values, tuple) else (values,)
            experiment = values[0]
            known = defaults.get(experiment, {})
            published = _first(group["published_test_acc"], known.get("published_test_acc"))
            reason = row_reason(group)
            published = math.nan if reason else to_float(published)
            best_mean = _mean(group["best_test_acc"])
            rows.append(
                {
                    "experiment": experiment,
                    **dict(zip(by, values[1:], strict=True)),
                    "description": _first(group["description"], known.get("description", "")),
                    "n_runs": len(group),
                    "params_M": _mean(group["params"]) / 1e6,
                    "mask_values_M": _mean(group["mask_values"]) / 1e6,
                    "final_test_acc_mean": _mean(group["final_test_acc"]),
                    "final_test_acc_std": _std(group["final_test_acc"]),
                    "best_test_acc_mean": best_mean,
                    "best_test_acc_std": _std(group["best_test_acc"]),
                    "best_test_acc_reported_mean": _mean(group["best_test_acc_reported"]),
                    "published_test_acc": published,
                    "diff_vs_published": best_mean - published,
                    "comparable": not reason,
                    "not_comparable_because": reason,
                }
            )
    columns = ["experiment", *by, *SUMMARY_COLUMNS[1:]]
    return sort_experiments(pd.DataFrame(rows).reindex(columns=columns), by)


def not_run(runs: pd.DataFrame) -> list[str]:
    """The README experiments without a run in ``runs``, in the README's order."""
    present = set(runs["experiment"])
    return [e for e in README_EXPERIMENTS if e not in present]


def reported_vs_actual(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The reproduction's main finding, per experiment and per run.

    ``gap = best reported - best actual``, each the best over epochs on its own (the two bests
    may fall on different epochs, as they did in the original code's logs).
    """
    per_run = pd.DataFrame(
        {
            "run_id": runs["run_id"],
            "run_name": runs["run_name"],
            "experiment": runs["experiment"],
            "seed": runs["seed"],
            "best_test_acc_reported": runs["best_test_acc_reported"],
            "best_test_acc": runs["best_test_acc"],
            "gap": runs["best_test_acc_reported"] - runs["best_test_acc"],
            "best_epoch": runs["best_epoch"],
        }
    )
    per_run = sort_experiments(per_run, ["seed"]) if len(per_run) else per_run
    per_experiment = pd.DataFrame(
        [
            {
                "experiment": experiment,
                "n_runs": len(group),
                "best_test_acc_reported_mean": _mean(group["best_test_acc_reported"]),
                "best_test_acc_mean": _mean(group["best_test_acc"]),
                "gap_mean": _mean(group["gap"]),
                "gap_std": _std(group["gap"]),
            }
            for experiment, group in per_run.groupby("experiment")
        ],
        columns=[
            "experiment",
            "n_runs",
            "best_test_acc_reported_mean",
            "best_test_acc_mean",
            "gap_mean",
            "gap_std",
        ],
    )
    if len(per_experiment):
        per_experiment = sort_experiments(per_experiment, [])
    return per_experiment, per_run


def choose_gap_run(per_run: pd.DataFrame, run_id: str | None = None) -> pd.Series | None:
    """The run for the reported-vs-actual figure: ``run_id`` if given, else the largest gap.

    Without any gap (no reported metric logged) it falls back to the first e2 run, the model of
    the reproduction's own figure.
    """
    if run_id is not None:
        match = per_run[per_run["run_id"] == run_id]
        if match.empty:
            raise AnalysisError(f"--run {run_id}: no finished job run with that id")
        return match.iloc[0]
    with_gap = per_run.dropna(subset=["gap"])
    if len(with_gap):
        return with_gap.loc[with_gap["gap"].idxmax()]
    e2 = per_run[per_run["experiment"] == "e2_original_noiseresnet18"]
    return e2.iloc[0] if len(e2) else None


def mixed_config_notes(runs: pd.DataFrame, by: list[str]) -> list[str]:
    """Warn where a row averages runs whose configs differ in more than the seed.

    Such a row mixes settings (say two ``masks.nmasks``), and its std is not a seed spread;
    ``--by`` splits it.
    """
    config_columns = [
        c
        for c in runs.columns
        if c.startswith(CONFIG_PREFIX) and not ignored_key(c.removeprefix(CONFIG_PREFIX))
    ]
    notes = []
    group_keys = ["experiment", *(CONFIG_PREFIX + k for k in by)]
    for values, group in runs.fillna({k: "—" for k in group_keys[1:]}).groupby(group_keys):
        values = values if isinstance(values, tuple) else (values,)
        varying = [
            c.removeprefix(CONFIG_PREFIX)
            for c in config_columns
            if group[c].fillna("—").nunique() > 1
        ]
        if varying:
            row = ", ".join([values[0], *(f"{k}={v}" for k, v in zip(by, values[1:], strict=True))])
            shown = ", ".join(varying[:5]) + (", ..." if len(varying) > 5 else "")
            notes.append(
                f"Row {row} averages runs that differ in {shown} besides the seed; "
                f"split it with --by {varying[0]}."
            )
    return notes


def sweep_notes(running_sweeps: list[Any]) -> list[str]:
    """One note per dead sweep among the RUNNING parent runs in scope: its claim is stale
    (pnn.sweep.lease), so its sweep.py is gone, but no sweep has closed it yet. The analysis only
    reads: the next sweep.py on the experiment marks it KILLED (pnn.sweep.sweep_run)."""
    notes = []
    for run in running_sweeps:
        live, why = lease_status(run)
        if not live:
            notes.append(
                f"Sweep {run.info.run_name} ({run.info.run_id}) is dead, not running: its "
                f"parent run is RUNNING in the store, but {why}. analyze.py changes nothing; "
                "the next sweep.py on this experiment marks it KILLED."
            )
    return notes
