"""The saved MLflow UI views a sweep writes (``pnn.analysis.viewstate``, ``pnn.analysis.ui``).

On a real SQLite store, with configs composed from the real ``conf/``: each sweep's view is an
experiment tag of plain JSON whose search filter finds exactly the runs that sweep created or
adopted, grouped by experiment and by the keys it swept; a second sweep writes its own and
leaves the first one's alone. A dry run writes none, and neither does a sweep that fails before
its first job (``sweep.py`` in a subprocess). ``tests/test_ui.py`` opens the view in a browser.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_sweep, store
from mlflow.tracking import MlflowClient

from pnn.analysis import ui, viewstate
from pnn.config import load_config
from pnn.io import storeguard, tracking
from pnn.sweep import sweep_run

BASE = ["profile=smoke", "model.nfilters=8"]
SEEDS_AND_LEVELS = [
    [f"experiment={experiment}", f"noise.level={level}", f"train.seed={seed}"]
    for experiment in ("e5_pnn_all_layers", "e7_pnn_shared_masks")
    for level in ("0.05", "0.3")
    for seed in (1, 2)
]


def test_swept_params_are_the_varied_keys_besides_seed_and_experiment() -> None:
    jobs = [
        ["experiment=e5", "train.seed=1", "noise.level=0.05", "train.epochs=2", "model=lenet"],
        ["experiment=e7", "train.seed=2", "noise.level=0.3", "train.epochs=2", "model=cifarnet"],
    ]
    params = [
        {"experiment": "e5", "train.seed": "1", "noise.level": "0.05", "model.name": "lenet"},
        {"experiment": "e7", "train.seed": "2", "noise.level": "0.3", "model.name": "cifarnet"},
    ]
    for p, width in zip(params, ("4", "8"), strict=True):
        p.update({"train.epochs": "2", "model.nfilters": width})
    # A config group is its name param; train.epochs has one value, so it was not swept.
    assert viewstate.swept_params(jobs, params) == ["noise.level", "model.name"]
    # A group without a name: the params under it that differ between the jobs.
    masks = [["masks=shared"], ["masks=unique"]]
    flags = [{"masks.unique": unique, "masks.nmasks": "1"} for unique in ("False", "True")]
    assert viewstate.swept_params(masks, flags) == ["masks.unique"]
    assert viewstate.swept_params([["train.seed=1"], ["train.seed=2"]], [{}, {}]) == []


@pytest.fixture
def sweep_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowClient]:
    """A store of the test's own; what a sweep puts in the environment and in ``pnn.analysis.ui`` is
    undone after the test."""
    for name in (
        tracking.ENV_URI,
        tracking.ENV_PARENT,
        tracking.ENV_SWEEP,
        tracking.ENV_JOBS,
        storeguard.ENV_STORE_ID,
    ):
        monkeypatch.setenv(name, "")
    monkeypatch.setattr(ui, "_sweep_view", {})
    monkeypatch.chdir(tmp_path)
    yield MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _start(jobs: list[list[str]], tmp_path: Path) -> tuple[str, str, str]:
    """What the sweeper does before launching: (parent run id, sweep id, experiment id)."""
    ui._sweep_view.clear()  # a new sweep.py process
    configs = [load_config([*BASE, *job]) for job in jobs]
    sweep_run.start_sweep(configs[0], tmp_path / "multirun", "(test)", len(jobs))
    parent = os.environ[tracking.ENV_PARENT]
    ui.open_sweep_view(jobs, configs)
    client = MlflowClient(os.environ[tracking.ENV_URI])
    return parent, os.environ[tracking.ENV_SWEEP], client.get_run(parent).info.experiment_id


def _job_run(client: MlflowClient, experiment_id: str, parent: str, sweeps: str) -> str:
    tags = {"pnn.role": "job", "mlflow.parentRunId": parent, tracking.TAG_SWEEPS: sweeps}
    return client.create_run(experiment_id, tags=tags).info.run_id


def _views(client: MlflowClient, experiment_id: str) -> dict[str, str]:
    tags = client.get_experiment(experiment_id).tags
    prefix = viewstate.TAG_PREFIX
    return {k[len(prefix) :]: v for k, v in tags.items() if k.startswith(prefix)}


def test_each_sweep_writes_its_own_view_of_its_own_runs(
    sweep_env: MlflowClient, tmp_path: Path
) -> None:
    client = sweep_env
    first_parent, first, experiment_id = _start(SEEDS_AND_LEVELS, tmp_path)
    first_runs = {_job_run(client, experiment_id, first_parent, first) for _ in range(2)}
    killed = _job_run(client, experiment_id, first_parent, first)
    ui.close_sweep_view()

    views = _views(client, experiment_id)
    assert set(views) == {f"pnn-sweep-{first}", "pnn-all-runs"}
    state = json.loads(views[f"pnn-sweep-{first}"])
    assert state["groupBy"] == {
        "aggregateFunction": "average",
        "groupByKeys": [
            {"mode": "param", "groupByData": "experiment"},
            {"mode": "param", "groupByData": "noise.level"},
        ],
    }
    assert "metrics.`best_test_acc`" in state["selectedColumns"]
    assert "params.`noise.level`" in state["selectedColumns"]
    assert [c["metricKey"] for c in state["compareRunCharts"][:3]] == [
        "test_acc",
        "test_acc_reported",
        "best_test_acc",
    ]
    assert state["compareRunCharts"][3]["selectedParams"] == ["noise.level"]
    assert ui.sweep_view_key() == f"pnn-sweep-{first}"
    note = client.get_run(first_parent).data.tags["mlflow.note.content"]
    assert (
        f"viewStateShareKey=pnn-sweep-{first}" in note and "workflowType=machine_learning" in note
    )

    # A second sweep, over other keys, resumes the first one's killed run (adopts it).
    second_jobs = [["experiment=e5_pnn_all_layers", f"optimizer.lr={lr}"] for lr in (0.1, 0.01)]
    second_parent, second, _ = _start(second_jobs, tmp_path)
    client.set_tag(killed, tracking.TAG_SWEEPS, f"{first},{second}")
    created = _job_run(client, experiment_id, second_parent, second)
    ui.close_sweep_view()

    after = _views(client, experiment_id)
    assert after[f"pnn-sweep-{first}"] == views[f"pnn-sweep-{first}"]  # left alone
    second_state = json.loads(after[f"pnn-sweep-{second}"])
    assert [k["groupByData"] for k in second_state["groupBy"]["groupByKeys"]] == [
        "experiment",
        "optimizer.lr",
    ]

    def found(view_state: dict) -> set[str]:
        runs = client.search_runs([experiment_id], view_state["searchFilter"])
        return {run.info.run_id for run in runs}

    # Each view's filter: the runs its sweep created or adopted, and no parent run.
    assert found(state) == first_runs | {killed}
    assert found(second_state) == {created, killed}
    assert found(json.loads(after["pnn-all-runs"])) == first_runs | {killed, created}


@pytest.mark.slow
def test_no_view_from_a_dry_run_nor_a_sweep_that_fails_before_its_first_job(
    tmp_path: Path,
) -> None:
    launch = tmp_path / "launch"
    launch.mkdir()
    grid = ["experiment=e5_pnn_all_layers", "noise.level=0.05,0.3"]
    dry = run_sweep(["dry_run=true", *grid], launch)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert not (launch / "mlflow.db").exists(), "a dry run touched MLflow"

    # The SLURM launcher fails on a machine without srun: after the parent run, before a job.
    failed = run_sweep([*BASE, "hydra/launcher=slurm", *grid], launch)
    output = failed.stdout + failed.stderr
    assert failed.returncode == 1 and "the launcher failed" in output, output[-3000:]
    client = store(launch)
    experiment = client.get_experiment_by_name("pnn")
    assert experiment is not None and not _views(client, experiment.experiment_id)
    parent = client.search_runs([experiment.experiment_id], "tags.`pnn.role` = 'sweep'")[0]
    assert viewstate.SHARE_PARAM not in parent.data.tags["mlflow.note.content"]
    assert viewstate.SHARE_PARAM not in output
