"""The analysis's view of the store: the job runs of an experiment or a sweep and their per-epoch
curves, as pandas, split into the runs that count and those excluded (and why). Nothing here
writes; the layout is :mod:`pnn.io.tracking`'s."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pnn.io.tracking import (
    RUNNING_SWEEPS,
    SUMMARY_METRICS,
    TAG_SWEEPS,
)

CURVE_METRICS = ("test_acc", "test_acc_reported")
# Run params (the flattened config) are columns ``config.<dotted key>``.
CONFIG_PREFIX = "config."


class AnalysisError(RuntimeError):
    """Something a person must fix (no store, no runs, a bad option), in one line."""


def resolve_tracking_uri(flag: str | None, cwd: Path | None = None) -> str:
    """``--tracking-uri`` if given, else ``$MLFLOW_TRACKING_URI``, else ``./mlflow.db``."""
    if flag:
        return flag
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(cwd or Path.cwd()).resolve() / 'mlflow.db'}"


def check_store(uri: str) -> None:
    """Fail in one line if the store cannot be read, where MLflow would create an empty SQLite file,
    print a traceback or retry a dead server for minutes."""
    from pnn.io.storeguard import StoreError, prepare

    try:
        prepare(uri, create=False)
    except StoreError as err:
        raise AnalysisError(str(err)) from None


@dataclass
class RunSet:
    """The job runs of one analysis: ``finished`` ones are summarised, ``excluded`` counted."""

    tracking_uri: str
    experiment_name: str
    finished: pd.DataFrame
    excluded: pd.DataFrame
    sweep_run_id: str | None = None
    sweep_name: str | None = None
    # With a sweep: how many runs it resumed (column ``in_sweep``: "resumed" or "created").
    resumed: int = 0
    # The parent runs in scope still RUNNING: live sweeps or dead ones (pnn.analysis.results).
    running_sweeps: list[Any] = field(default_factory=list)


def _client(uri: str) -> Any:
    from pnn.io.storeguard import as_store_error, client

    try:
        return client(uri)
    except Exception as err:
        problem = as_store_error(uri, err)
        if problem is None:
            raise
        raise AnalysisError(str(problem)) from None


def _search_all(client: Any, experiment_id: str, filter_string: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=filter_string, max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _run_record(run: Any) -> dict[str, Any]:
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    seed = params.get("train.seed")
    record: dict[str, Any] = {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name or tags.get("mlflow.runName", ""),
        "status": run.info.status,
        "start_time": run.info.start_time,
        "parent_run_id": tags.get("mlflow.parentRunId", ""),
        "sweep_id": tags.get("pnn.sweep_id", ""),
        "sweep_ids": tags.get(TAG_SWEEPS, ""),
        "experiment": tags.get("experiment") or params.get("experiment") or "custom",
        "description": tags.get("description", ""),
        "published_test_acc": to_float(tags.get("published_test_acc")),
        "seed": int(seed) if seed is not None and seed.lstrip("-").isdigit() else None,
        "failure": tags.get("pnn.failure", ""),
        "config_hash": tags.get("pnn.config_hash", ""),
    }
    for key in SUMMARY_METRICS:
        record[key] = metrics.get(key, math.nan)
    for key, value in params.items():
        record[CONFIG_PREFIX + key] = value
    return record


def _pick_sweep(client: Any, experiment_id: str, sweep: str) -> tuple[list[Any], Any]:
    parents = sorted(
        _search_all(client, experiment_id, "tags.`pnn.role` = 'sweep'"),
        key=lambda r: r.info.start_time or 0,
        reverse=True,
    )
    if not parents:
        raise AnalysisError("--sweep given, but the store has no sweep (parent) runs")
    if sweep == "latest":
        return [parents[0]], parents[0]
    # A parent run id, or a pnn.sweep_id that several invocations share.
    chosen = [p for p in parents if sweep in (p.info.run_id, p.data.tags.get("pnn.sweep_id"))]
    if not chosen:
        recent = ", ".join(f"{p.info.run_id} ({p.info.run_name})" for p in parents[:3])
        raise AnalysisError(f"no sweep run {sweep!r}; the most recent are: {recent}")
    return chosen, chosen[0]


def load_runs(uri: str, experiment_name: str = "pnn", sweep: str | None = None) -> RunSet:
    """All job runs of ``experiment_name`` (or of one sweep), split into finished and excluded."""
    check_store(uri)
    client = _client(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments())
        raise AnalysisError(
            f"no MLflow experiment {experiment_name!r} in {uri} (it has: {', '.join(names)}); "
            "pass --experiment-name"
        )
    records = [
        _run_record(r)
        for r in _search_all(client, experiment.experiment_id, "tags.`pnn.role` = 'job'")
    ]
    sweep_run_id = sweep_name = None
    resumed = 0
    running_sweeps = _search_all(client, experiment.experiment_id, RUNNING_SWEEPS)
    if sweep is not None:
        parents, newest = _pick_sweep(client, experiment.experiment_id, sweep)
        parent_ids = {p.info.run_id for p in parents}
        sweep_ids = {p.data.tags.get("pnn.sweep_id") for p in parents} - {None}
        for r in records:
            r["in_sweep"] = "created" if r["parent_run_id"] in parent_ids else "resumed"
        records = [
            r
            for r in records
            if r["in_sweep"] == "created" or sweep_ids.intersection(r["sweep_ids"].split(","))
        ]
        resumed = sum(r["in_sweep"] == "resumed" for r in records)
        sweep_run_id, sweep_name = newest.info.run_id, newest.info.run_name
        running_sweeps = [p for p in running_sweeps if p.info.run_id in parent_ids]
    if not records:
        if sweep is not None:
            raise AnalysisError(
                f"no job runs in sweep {sweep_name} ({sweep_run_id}); jobs it skipped as "
                "already finished belong to the sweep that ran them (drop --sweep to see all)"
            )
        raise AnalysisError(f"no job runs in experiment {experiment_name!r} of {uri}")

    frame = pd.DataFrame.from_records(records)
    finished_mask = (frame["status"] == "FINISHED") & frame["best_test_acc"].notna()
    excluded = frame.loc[~finished_mask].copy()
    excluded["excluded_as"] = excluded["status"]
    excluded["reason"] = excluded["failure"].where(excluded["failure"] != "", excluded["status"])
    no_metrics = excluded["status"] == "FINISHED"
    excluded.loc[no_metrics, "excluded_as"] = "FINISHED without metrics"
    excluded.loc[no_metrics, "reason"] = "no best_test_acc metric logged"

    # sweep.rerun=true trains a finished job again as a new run: the newest one of a config
    # counts, so that a rerun does not pass for an extra seed.
    finished = frame.loc[finished_mask].sort_values("start_time", ascending=False)
    superseded = finished["config_hash"].ne("") & finished.duplicated("config_hash")
    newest = finished.loc[~superseded].set_index("config_hash")["run_id"]
    old = finished.loc[superseded].copy()
    old["excluded_as"] = "SUPERSEDED"
    old["reason"] = [f"re-run as {newest[h]}, which is used" for h in old["config_hash"]]
    excluded = pd.concat([excluded, old]) if len(old) else excluded
    finished = finished.loc[~superseded].sort_values("start_time")
    return RunSet(
        tracking_uri=uri,
        experiment_name=experiment_name,
        finished=finished.reset_index(drop=True),
        excluded=excluded.reset_index(drop=True),
        sweep_run_id=sweep_run_id,
        sweep_name=sweep_name,
        resumed=resumed,
        running_sweeps=running_sweeps,
    )


def load_curves(
    uri: str, runs: pd.DataFrame, metrics: tuple[str, ...] = CURVE_METRICS
) -> pd.DataFrame:
    """Per-epoch metrics of ``runs``: one row per (run, epoch), one column per metric."""
    client = _client(uri)
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for run in runs.itertuples():
        for key in metrics:
            # A resumed run may log an epoch twice; the later value wins.
            history = sorted(client.get_metric_history(run.run_id, key), key=lambda m: m.timestamp)
            for point in history:
                if point.step < 1:
                    continue
                row = rows.setdefault(
                    (run.run_id, point.step),
                    {"run_id": run.run_id, "experiment": run.experiment, "epoch": point.step},
                )
                row[key] = point.value
    columns = ["run_id", "experiment", "epoch", *metrics]
    if not rows:
        return pd.DataFrame(columns=columns)
    curves = pd.DataFrame(list(rows.values())).reindex(columns=columns)
    return curves.sort_values(["run_id", "epoch"]).reset_index(drop=True)
