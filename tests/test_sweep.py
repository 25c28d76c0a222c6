"""sweep.py end to end: real subprocesses, real MLflow stores (SQLite and a local server)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    IN_PROCESS,
    REPO,
    TINY,
    checkpoints,
    epochs_logged,
    kill_group,
    run_sweep,
    runs_of,
    start_sweep,
    store,
    wait_for,
)
from mlflow.tracking import MlflowClient

from pnn.io.tracking import EPOCH_METRICS, SUMMARY_METRICS
from pnn.sweep.slots import visible_gpus

HEAD = subprocess.run(
    ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
).stdout.strip()

FINAL_METRICS = SUMMARY_METRICS
sweep = run_sweep

pytestmark = pytest.mark.slow


def test_sweep_logs_one_parent_and_a_child_per_job(tmp_path: Path) -> None:
    # The jobs in the sweep's process: this is about what is logged (job processes: below).
    args = ["experiment=e1_baseline_resnet18,e7_pnn_shared_masks", *TINY, "train.epochs=2"]
    args += IN_PROCESS
    proc = sweep(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 finished, 0 skipped, 0 failed" in proc.stdout

    client = store(tmp_path)
    (parent,) = runs_of(client, "sweep")
    children = runs_of(client, "job")
    assert sorted(r.info.run_name for r in children) == [
        "e1_baseline_resnet18-seed1",
        "e7_pnn_shared_masks-seed1",
    ]
    for run in children:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert run.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["pnn.sweep_id"] == parent.data.tags["pnn.sweep_id"]
        assert run.info.run_name == f"{tags['experiment']}-seed1"
        # Each run the published figure of its own experiment (the README's), not just one of
        # the two.
        published = {"e1_baseline_resnet18": "91.8", "e7_pnn_shared_masks": "82.4"}
        assert tags["published_test_acc"] == published[tags["experiment"]]
        assert "train.epochs=2" in tags["pnn.overrides"]
        assert tags["mlflow.source.git.commit"] == HEAD  # the tests run from a git clone
        for key in ("model.nfilters", "masks.nmasks", "optimizer.lr", "train.batch_size"):
            assert key in params
        assert params["model.nfilters"] == "8" and params["dataset.name"] == "synthetic"
        for key in EPOCH_METRICS:
            assert epochs_logged(client, run.info.run_id, key) == [1, 2], key
        for key in FINAL_METRICS:
            assert key in metrics, key
        history = [m.value for m in client.get_metric_history(run.info.run_id, "test_acc")]
        assert metrics["best_test_acc"] == max(history)
        assert metrics["final_test_acc"] == history[-1]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "model_summary.txt", "checkpoint"} <= artifacts
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == [
            "checkpoint/last.pt"
        ]
    # The default store is an absolute SQLite path in the launch directory; artifacts beside it.
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "mlartifacts").is_dir()

    # The same command again skips both jobs and says so.
    again = sweep(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 finished, 2 skipped, 0 failed" in again.stdout
    assert "already FINISHED" in again.stdout
    assert len(runs_of(client, "job")) == 2

    # sweep.rerun=true forces new runs.
    forced = sweep([*args, "sweep.rerun=true", "experiment=e1_baseline_resnet18"], tmp_path)
    assert forced.returncode == 0, forced.stderr[-3000:]
    names = sorted(r.info.run_name for r in runs_of(client, "job"))
    assert names.count("e1_baseline_resnet18-seed1") == 2


@pytest.mark.usefixtures("existing_store")
def test_parallel_jobs_on_one_sqlite_store_lose_nothing(tmp_path: Path) -> None:
    args = [
        "experiment=e1_baseline_resnet18",
        "train.seed=1,2,3,4",
        *TINY,
        "train.epochs=3",
        "hydra.launcher.cpu_workers=4",
        "tracking.log_checkpoint=false",
    ]
    proc = sweep(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 4 CPU slot(s)" in proc.stderr + proc.stdout
    client = store(tmp_path)
    children = runs_of(client, "job")
    assert sorted(r.info.run_name for r in children) == [
        f"e1_baseline_resnet18-seed{s}" for s in (1, 2, 3, 4)
    ]
    for run in children:
        assert run.info.status == "FINISHED"
        for key in EPOCH_METRICS:
            assert epochs_logged(client, run.info.run_id, key) == [1, 2, 3]


@pytest.mark.usefixtures("existing_store")
def test_a_failing_job_does_not_stop_the_others(tmp_path: Path) -> None:
    args = ["experiment=e1_baseline_resnet18", "optimizer.lr=1e-3,1e30", *TINY, "train.epochs=2"]
    # In the sweep's process; a job process that fails or dies: test_launcher_plugin and
    # test_faults_jobs.
    proc = sweep([*args, *IN_PROCESS], tmp_path)
    assert proc.returncode != 0
    assert "1 finished, 0 skipped, 1 failed" in proc.stdout
    assert "loss became" in proc.stdout and "at epoch 1 step" in proc.stdout
    client = store(tmp_path)
    by_lr = {r.data.params["optimizer.lr"]: r for r in runs_of(client, "job")}
    assert by_lr["0.001"].info.status == "FINISHED"
    failed = by_lr["1e+30"]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["pnn.failure"].startswith("loss became")
    (parent,) = runs_of(client, "sweep")
    assert parent.info.status == "FAILED"


@pytest.mark.usefixtures("existing_store")
def test_killed_sweep_resumes_into_the_same_runs(
    tmp_path: Path, launch_dir: Callable[[str], Path]
) -> None:
    epochs = 3  # epochs left to train when the first checkpoint lands: time for the kill
    args = [
        "experiment=e1_baseline_resnet18",
        "train.seed=1,2",
        *TINY,
        "dataset.train_size=400",
        f"train.epochs={epochs}",
        "train.max_steps_per_epoch=null",
        *IN_PROCESS,  # the jobs in the sweep's process, which the kill ends with them
    ]
    proc = start_sweep(args, tmp_path)
    # Kill the whole sweep right after the first epoch's checkpoint lands: the first job is
    # then mid-way, and MLflow may or may not have that epoch yet (the checkpoint is written
    # first), which the resume must reconcile.
    try:
        wait_for(lambda: checkpoints(tmp_path), proc, "the checkpoints to kill at", timeout=300)
    finally:
        kill_group(proc)
    client = store(tmp_path)
    before = {r.info.run_name: r.info.run_id for r in runs_of(client, "job")}
    assert before and all(r.info.status == "RUNNING" for r in runs_of(client, "job"))

    rerun = sweep(args, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    children = runs_of(client, "job")
    assert sorted(r.info.run_name for r in children) == [
        "e1_baseline_resnet18-seed1",
        "e1_baseline_resnet18-seed2",
    ]
    for run in children:
        assert run.info.status == "FINISHED"
        for key in EPOCH_METRICS:
            assert epochs_logged(client, run.info.run_id, key) == list(range(1, epochs + 1))
    # The killed job went on in its own run, not a new one.
    for name, run_id in before.items():
        assert {r.info.run_name: r.info.run_id for r in children}[name] == run_id

    # And it computed what an uninterrupted run computes (CPU is deterministic).
    clean = launch_dir("clean")
    assert sweep(args, clean).returncode == 0
    want = {r.info.run_name: r.data.metrics for r in runs_of(store(clean), "job")}
    for run in children:
        for key in ("best_test_acc", "final_test_acc", "best_test_acc_reported"):
            assert run.data.metrics[key] == want[run.info.run_name][key], key


def test_sweep_logs_to_an_mlflow_server(tmp_path: Path, mlflow_server) -> None:
    uri = mlflow_server(tmp_path / "server.db").url
    work = tmp_path / "work"
    work.mkdir()
    # Selected through the environment, as MLflow users expect.
    proc = sweep(
        ["experiment=e1_baseline_resnet18", *TINY, "tracking.log_checkpoint=false", *IN_PROCESS],
        work,
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (work / "mlflow.db").exists()
    client = MlflowClient(uri)
    (child,) = runs_of(client, "job")
    assert child.info.status == "FINISHED" and epochs_logged(client, child.info.run_id) == [1]
    (parent,) = runs_of(client, "sweep")
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id


@pytest.mark.usefixtures("existing_store")
def test_slurm_launcher_through_submitit_local_executor(tmp_path: Path) -> None:
    args = [
        "hydra/launcher=slurm_local",
        "experiment=e1_baseline_resnet18",
        "train.seed=1,2",
        *TINY,
        "tracking.log_checkpoint=false",
    ]
    proc = sweep(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 finished, 0 skipped, 0 failed" in proc.stdout
    client = store(tmp_path)
    (parent,) = runs_of(client, "sweep")
    children = runs_of(client, "job")
    assert len(children) == 2
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id


@pytest.mark.skipif(
    not set(visible_gpus()) >= {"0", "1"},
    reason="needs CUDA devices 0 and 1 (a GPU slot without a GPU is refused: test_preflight)",
)
@pytest.mark.usefixtures("existing_store")
def test_gpu_pool_pins_each_job_process_to_its_gpu(tmp_path: Path) -> None:
    # The pinning is checked through the tag each job records.
    args = [
        "experiment=e1_baseline_resnet18",
        "train.seed=1,2,3",
        *TINY,
        "train.device=cpu",
        "hydra.launcher.gpus=[0,1]",
        "tracking.log_checkpoint=false",
    ]
    proc = sweep(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 GPU slot(s)" in proc.stderr + proc.stdout
    visible = [r.data.tags["pnn.cuda_visible_devices"] for r in runs_of(store(tmp_path), "job")]
    assert sorted(visible) in (["0", "0", "1"], ["0", "1", "1"])
