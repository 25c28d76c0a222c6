"""Saved views of the MLflow UI: a link that opens a sweep's runs already compared.

MLflow's UI opens the runs page in a saved state when its link carries
``viewStateShareKey=<key>``: it reads the experiment tag ``mlflow.sharedViewState.<key>``, takes
the search facets (``searchFilter``, ...) and the view (columns, grouping, charts) from it, and
fills in its defaults for the rest. A value that fails to parse shows "share key is invalid" and
falls back to the plain runs page.

That format is MLflow UI internals, not a public API, so all of it is here. It was read from
mlflow 3.17.2's JS bundle (``mlflow/server/js/build/static/js``: the shared-view hook, the
``ExperimentPageUIState`` keys, ``RunsChartsCardConfig`` and its subclasses) and is checked in a
real browser by ``tests/test_ui.py``. What the UI ignores on load: ``runsExpanded``,
``runsPinned``, ``runsHidden``, ``runsVisibilityMap`` and ``autoRefreshEnabled``; and the
whole tag when the link already has a search facet such as ``searchFilter``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from pnn.io import tracking

TAG_PREFIX = "mlflow.sharedViewState."
EXPERIMENT_KEY = "pnn-all-runs"  # every job run of the experiment (`make ui`)
# The query that makes a runs link open a saved view, in the chart view.
SHARE_PARAM, CHART_MODE = "viewStateShareKey", "compareRunsMode=CHART"

# Always a group (experiment) or never one (a seed is what the groups average over).
NOT_SWEPT = ("experiment", "train.seed")
GROUP_ID_KEYS = ("name", "type")  # the key that names a config group's choice, e.g. model.name
COLUMNS = ("best_test_acc", "best_test_acc_reported", "final_test_acc")
EPOCH_CHARTS = ("test_acc", "test_acc_reported")  # per epoch, one line per group
BAR_CHART = "best_test_acc"  # one bar per group: the mean over its seeds
MODEL_SECTION, SYSTEM_SECTION = "Model metrics", "System metrics"  # the UI's own section names


def sweep_key(sweep_id: str) -> str:
    return f"pnn-sweep-{sweep_id}"


def share_query(key: str) -> str:
    """What a runs link (``...runs?workflowType=...``) adds to open the view ``key``."""
    return f"{CHART_MODE}&{SHARE_PARAM}={key}"


def sweep_filter(sweep_id: str) -> str:
    """The runs this sweep created or adopted: both carry its id in ``pnn.sweep_ids``."""
    return f"tags.`{tracking.TAG_SWEEPS}` LIKE '%{sweep_id}%'"


JOBS_FILTER = "tags.`pnn.role` = 'job'"  # every job run, and no sweep's parent run


def swept_params(jobs: Sequence[Sequence[str]], params: Sequence[Mapping[str, str]]) -> list[str]:
    """The MLflow params a sweep varied besides the seed and the experiment.

    ``jobs`` holds each job's overrides (``key=value``), ``params`` each job's flattened config
    (``tracking.flatten``). A swept leaf key is its own param; a swept config group
    (``model=lenet,cifarnet``) is its ``name`` or ``type`` param, else the params under it that
    differ between the jobs."""
    values: dict[str, set[str]] = {}
    for overrides in jobs:
        for override in overrides:
            key, _, value = override.partition("=")
            key = key.lstrip("+~").split("@")[0]
            values.setdefault(key, set()).add(value)
    if not params:
        return []
    swept: list[str] = []
    for key, seen in values.items():
        if len(seen) < 2 or key in NOT_SWEPT:
            continue
        if key in params[0]:
            swept.append(key)
            continue
        varying = [
            name
            for name in params[0]
            if name.startswith(key + ".") and len({p.get(name) for p in params}) > 1
        ]
        named = [f"{key}.{k}" for k in GROUP_ID_KEYS if f"{key}.{k}" in varying]
        swept.extend(named[:1] or varying)
    return list(dict.fromkeys(swept))


def _column(kind: str, name: str) -> str:
    return f"{kind}.`{name}`"  # the runs table's column ids, e.g. metrics.`best_test_acc`


RUN_NAME_COLUMN = _column("attributes", "Run Name")


def _card(uuid: str, chart_type: str, **fields: Any) -> dict[str, Any]:
    base = {
        "uuid": uuid,
        "type": chart_type,
        "runsCountToCompare": 100,
        "metricSectionId": "pnn-model-metrics",
        "deleted": False,
        "isGenerated": False,
    }
    return {**base, **fields}


def _line(metric: str) -> dict[str, Any]:
    return _card(
        f"pnn-line-{metric}",
        "LINE",
        displayName=metric,
        metricKey=metric,
        lineSmoothness=0,
        xAxisScaleType="linear",
        scaleType="linear",
        range={},  # no fixed axis range
        xAxisKey="step",
        selectedXAxisMetricKey="",
        yAxisKey="metric",
        yAxisExpressions=[],
        ignoreOutliers=False,
        useGlobalXaxisKey=True,
        useGlobalLineSmoothing=True,
    )


def charts(swept: Sequence[str]) -> list[dict[str, Any]]:
    """Ours first, in this order; the UI adds a chart for each other metric after them."""
    cards = [_line(metric) for metric in EPOCH_CHARTS]
    cards.append(_card(f"pnn-bar-{BAR_CHART}", "BAR", displayName=BAR_CHART, metricKey=BAR_CHART))
    if swept:
        cards.append(
            _card(
                "pnn-parallel",
                "PARALLEL",
                displayName=f"{', '.join(swept)} -> {BAR_CHART}",
                selectedParams=list(swept),
                selectedMetrics=[BAR_CHART],
                showAllRuns=True,
            )
        )
    return cards


def view_state(search_filter: str, swept: Sequence[str]) -> dict[str, Any]:
    """The runs matching ``search_filter``, grouped by experiment and ``swept`` (averaged,
    expanded), with the accuracy columns and our charts."""
    group_keys = [{"mode": "param", "groupByData": name} for name in ("experiment", *swept)]
    columns = [_column("metrics", m) for m in COLUMNS] + [_column("params", p) for p in swept]
    sections = [
        # isReordered: the UI appends its generated charts after ours instead of sorting them in
        {"uuid": "pnn-model-metrics", "name": MODEL_SECTION, "display": True, "isReordered": True},
        {"uuid": "pnn-system-metrics", "name": SYSTEM_SECTION, "display": True},
    ]
    for section in sections:
        section.setdefault("isReordered", False)
        section.update(deleted=False, isGenerated=False)
    return {
        "searchFilter": search_filter,
        # Sorted by anything but the start time, the UI does not add the parent run of the
        # runs it found (its "fetch parents"): that run has no params, and its "Unassigned"
        # group would make the parallel-coordinates chart refuse to draw.
        "orderByKey": _column("params", "experiment"),
        "orderByAsc": True,
        "selectedColumns": columns,
        # The UI sizes only the columns it orders; the name column needs room for group names.
        "columnOrder": [RUN_NAME_COLUMN, *columns],
        "columnWidths": {RUN_NAME_COLUMN: 460, **{column: 180 for column in columns}},
        "groupBy": {"aggregateFunction": "average", "groupByKeys": group_keys},
        "groupsExpanded": {},  # a group not listed is open: every run shows under its group
        "runsHiddenMode": "SHOW_ALL",  # the UI's default charts only the first 10 rows
        "useGroupedValuesInCharts": True,  # a chart draws a group, not each of its runs
        "hideEmptyCharts": True,
        "isAccordionReordered": False,
        "compareRunCharts": charts(swept),
        "compareRunSections": sections,
    }


def sweep_view(sweep_id: str, swept: Sequence[str]) -> dict[str, Any]:
    return view_state(sweep_filter(sweep_id), swept)


def experiment_view() -> dict[str, Any]:
    return view_state(JOBS_FILTER, [])


def write(client: Any, experiment_id: str, key: str, state: Mapping[str, Any]) -> None:
    value = json.dumps(state, separators=(",", ":"))
    tracking.retry(lambda: client.set_experiment_tag(experiment_id, TAG_PREFIX + key, value))


def read(client: Any, experiment_id: str, key: str) -> dict[str, Any] | None:
    experiment = tracking.retry(lambda: client.get_experiment(experiment_id))
    value = experiment.tags.get(TAG_PREFIX + key)
    return None if value is None else json.loads(value)


def remove(client: Any, experiment_id: str, key: str) -> None:
    if read(client, experiment_id, key) is not None:
        tracking.retry(lambda: client.delete_experiment_tag(experiment_id, TAG_PREFIX + key))
