"""Links into the MLflow UI that land on our runs, not on MLflow 3's GenAI overview.

MLflow 3 opens an experiment on its GenAI *Overview* page (traces, latency, tokens). The runs
are in the *Model training* view, which is the runs route with ``workflowType=machine_learning``
(the UI's ``WorkflowType.MACHINE_LEARNING``; checked against mlflow 3.17's JS bundle and in a
browser, ``tests/test_ui.py``).

``python -m pnn.ui`` prints that link for a store (``make ui`` runs it before ``mlflow ui``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

WORKFLOW_TYPE = "machine_learning"
DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` and `make ui` serve by default


def runs_url(base_url: str, experiment_id: str) -> str:
    """The experiment's runs table in the model-training view."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType={WORKFLOW_TYPE}"


def run_url(base_url: str, experiment_id: str, run_id: str) -> str:
    """One run's page (its description, metrics and artifacts), in the same view."""
    base = base_url.rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType={WORKFLOW_TYPE}"


def served_by(tracking_uri: str) -> str | None:
    """The UI's address when the store is an MLflow server; None for a local store."""
    return tracking_uri if tracking_uri.startswith(("http://", "https://")) else None


def how_to_open(tracking_uri: str, experiment_id: str, parent_run_id: str | None = None) -> str:
    """Lines for the end of a sweep: how to open its runs (and its parent) in the UI."""
    base = served_by(tracking_uri)
    lines = []
    if base is None:
        base = DEFAULT_UI
        lines.append(f"  serve the store with: mlflow ui --backend-store-uri {tracking_uri}")
    lines.append(f"  runs (model-training view): {runs_url(base, experiment_id)}")
    if parent_run_id:
        lines.append(f"  this sweep's results table: {run_url(base, experiment_id, parent_run_id)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pnn.ui", description="Print the MLflow UI link to an experiment's runs."
    )
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment-name", default="pnn")
    parser.add_argument("--base-url", default=DEFAULT_UI, help="where the UI is served")
    args = parser.parse_args(argv)

    from pnn.store import local_store_path

    path = local_store_path(args.tracking_uri)
    if path is not None and not Path(path).exists():
        # Opening it would create an empty store; say what to do instead.
        print(f"No MLflow store at {path} yet: run `make demo` or `python sweep.py` first.")
        return 0
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(args.tracking_uri).get_experiment_by_name(args.experiment_name)
    if experiment is None:
        print(f"No experiment {args.experiment_name!r} in {args.tracking_uri} yet.")
        return 0
    print(f"Runs of {args.experiment_name!r}: {runs_url(args.base_url, experiment.experiment_id)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
