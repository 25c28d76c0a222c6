"""Links into the MLflow UI that land on our runs, not on MLflow 3's GenAI overview.

MLflow 3 opens an experiment on its GenAI *Overview* page (traces, latency, tokens). The runs
are in the *Model training* view, which is the runs route with ``workflowType=machine_learning``
(the UI's ``WorkflowType.MACHINE_LEARNING``; checked against mlflow 3.17's JS bundle and in a
browser, ``tests/test_ui.py``).

A saved view (:mod:`pnn.analysis.viewstate`) opens the runs already compared: a sweep writes one for
its own runs when it starts (:func:`open_sweep_view`), and every link we print to it also has the
plain runs link beside it, in case the UI cannot load the view.

``python -m pnn.analysis.ui`` prints the links for a store (``make ui`` runs it before ``mlflow
ui``).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from omegaconf import DictConfig, open_dict

from pnn.analysis import viewstate
from pnn.io import storeguard, tracking

log = logging.getLogger(__name__)

WORKFLOW_TYPE = "machine_learning"
DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` and `make ui` serve by default


def _route(experiment_id: str, run_id: str | None = None, query: str = "") -> str:
    """The UI's route, after its address, to the experiment's runs (or to one run) in the
    model-training view, with ``query`` appended."""
    runs = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{runs}?workflowType={WORKFLOW_TYPE}{query}"


def _at(base_url: str, route: str) -> str:
    return f"{base_url.rstrip('/')}/{route}"


def runs_url(base_url: str, experiment_id: str) -> str:
    """The experiment's runs table in the model-training view."""
    return _at(base_url, _route(experiment_id))


def compare_path(experiment_id: str, view_key: str) -> str:
    """The saved view ``view_key`` of the experiment's runs, in the chart view; relative to
    the UI's address (a link in a run's description works wherever the UI is served)."""
    return _route(experiment_id, query=f"&{viewstate.share_query(view_key)}")


def compare_url(base_url: str, experiment_id: str, view_key: str) -> str:
    return _at(base_url, compare_path(experiment_id, view_key))


def run_url(base_url: str, experiment_id: str, run_id: str) -> str:
    """One run's page (its description, metrics and artifacts), in the same view."""
    return _at(base_url, _route(experiment_id, run_id))


def served_by(tracking_uri: str) -> str | None:
    """The UI's address when the store is an MLflow server; None for a local store."""
    return tracking_uri if tracking_uri.startswith(("http://", "https://")) else None


def how_to_open(
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str | None = None,
    view_key: str | None = None,
) -> str:
    """Lines for the end of a sweep: how to open its runs, compared in the saved view
    ``view_key`` when there is one, and its parent, in the UI."""
    base = served_by(tracking_uri)
    lines = []
    if base is None:
        base = DEFAULT_UI
        lines.append(f"  serve the store with: mlflow ui --backend-store-uri {tracking_uri}")
    if view_key:
        lines.append(f"  this sweep's runs, compared: {compare_url(base, experiment_id, view_key)}")
    lines.append(f"  runs (model-training view): {runs_url(base, experiment_id)}")
    if parent_run_id:
        lines.append(f"  this sweep's results table: {run_url(base, experiment_id, parent_run_id)}")
    return "\n".join(lines)


def sweep_links() -> str:
    """:func:`how_to_open` for this process's sweep, whose parent run is in the environment."""
    uri, parent = os.environ[tracking.ENV_URI], os.environ[tracking.ENV_PARENT]
    experiment_id = tracking.retry(
        lambda: storeguard.client(uri).get_run(parent)
    ).info.experiment_id
    return how_to_open(uri, experiment_id, parent, sweep_view_key())


# --------------------------------------------------------------------------------------------
# A sweep's saved view: written when it starts, kept or removed when it ends
# --------------------------------------------------------------------------------------------

_sweep_view: dict[str, Any] = {}  # this process's sweep: experiment id, key, state, note link


def open_sweep_view(jobs: Sequence[Sequence[str]], configs: Sequence[DictConfig]) -> None:
    """At the start of a sweep (after ``sweep_run.start_sweep``): write its saved view, and link
    it from the parent run's description. Never raises: a sweep without a view still has the
    plain runs link."""
    uri, parent = os.environ.get(tracking.ENV_URI), os.environ.get(tracking.ENV_PARENT)
    sweep_id = os.environ.get(tracking.ENV_SWEEP)
    if not (uri and parent and sweep_id):
        return
    try:
        client = storeguard.client(uri)
        run = tracking.retry(lambda: client.get_run(parent))
        experiment_id = run.info.experiment_id
        swept = viewstate.swept_params(jobs, [_params(cfg) for cfg in configs])
        key, state = viewstate.sweep_key(sweep_id), viewstate.sweep_view(sweep_id, swept)
        viewstate.write(client, experiment_id, key, state)
        link = f"[Compare this sweep's runs]({compare_path(experiment_id, key)}) in the MLflow UI."
        note = run.data.tags.get(MLFLOW_RUN_NOTE, "")
        tracking.set_tags(client, parent, {MLFLOW_RUN_NOTE: f"{note}\n\n{link}".strip()})
    except Exception as err:  # a saved view is a convenience
        log.warning(f"[sweep] no saved view of this sweep in the MLflow UI: {err}")
        return
    _sweep_view.update(experiment_id=experiment_id, key=key, state=state, link=link)


def _params(cfg: DictConfig) -> dict[str, str]:
    """A job's MLflow params, from its config as the sweeper composed it: without the hydra
    node, whose job-time keys (hydra.runtime.output_dir) are not set yet."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return tracking.flatten(cfg)


def sweep_view_key() -> str | None:
    """The key of this sweep's saved view, while it has one."""
    return _sweep_view.get("key")


def sweep_view_link() -> str:
    """The Markdown link to this sweep's saved view, for its parent's description ('' if none)."""
    return _sweep_view.get("link", "")


def close_sweep_view() -> None:
    """At the end of a sweep: write its view again (so that it is there, and this version's),
    and the view of every run of the experiment; or, when the sweep has no run (it failed
    before its first job), remove its view and the link to it. Never raises."""
    uri, parent = os.environ.get(tracking.ENV_URI), os.environ.get(tracking.ENV_PARENT)
    sweep_id = os.environ.get(tracking.ENV_SWEEP)
    if not (uri and parent and sweep_id and _sweep_view):
        return
    experiment_id, key = _sweep_view["experiment_id"], _sweep_view["key"]
    try:
        client = storeguard.client(uri)
        runs = tracking.retry(
            lambda: client.search_runs(
                [experiment_id], viewstate.sweep_filter(sweep_id), max_results=1
            )
        )
        if runs:
            viewstate.write(client, experiment_id, key, _sweep_view["state"])
            experiment_view = viewstate.experiment_view()
            viewstate.write(client, experiment_id, viewstate.EXPERIMENT_KEY, experiment_view)
            return
        viewstate.remove(client, experiment_id, key)
        note = tracking.retry(lambda: client.get_run(parent)).data.tags.get(MLFLOW_RUN_NOTE, "")
        unlinked = note.replace(_sweep_view["link"], "").strip()
        tracking.set_tags(client, parent, {MLFLOW_RUN_NOTE: unlinked})
        _sweep_view.clear()
    except Exception as err:
        log.warning(f"[sweep] could not update this sweep's saved view: {err}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pnn.analysis.ui",
        description="Print the MLflow UI link to an experiment's runs.",
    )
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment-name", default="pnn")
    parser.add_argument("--base-url", default=DEFAULT_UI, help="where the UI is served")
    args = parser.parse_args(argv)

    try:  # opening a missing store would create an empty one; say what to do instead
        storeguard.prepare(args.tracking_uri, create=False)
    except storeguard.StoreError as err:
        print(f"{err} (`make demo` writes one in a minute)")
        return 0
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(args.tracking_uri).get_experiment_by_name(args.experiment_name)
    if experiment is None:
        print(f"No experiment {args.experiment_name!r} in {args.tracking_uri} yet.")
        return 0
    experiment_id = experiment.experiment_id
    try:  # a store that no sweep of this version wrote to has no view yet
        client = storeguard.client(args.tracking_uri)
        viewstate.write(
            client, experiment_id, viewstate.EXPERIMENT_KEY, viewstate.experiment_view()
        )
        compared = compare_url(args.base_url, experiment_id, viewstate.EXPERIMENT_KEY)
        print(f"Runs of {args.experiment_name!r}, compared by experiment: {compared}")
    except Exception as err:
        print(f"(no saved view: {err})")
    print(f"Runs of {args.experiment_name!r}: {runs_url(args.base_url, experiment_id)}")
    return 0


if __name__ == "__main__":
    from pnn.shutdown import skip_exit_collection

    skip_exit_collection()
    sys.exit(main())
