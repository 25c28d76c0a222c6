"""No zombie sweep: a sweep killed outright (``kill -9`` of its process group, a lost machine)
cannot end its parent run; the parent's lease goes stale, and the next sweep on the experiment
marks it KILLED, while a live sweep on another host is left alone. Through the real sweep.py and
analyze.py, on a real SQLite store and on a real ``mlflow server``.
"""

from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path

import pytest
from conftest import (
    IN_PROCESS,
    SLOW_TINY,
    checkpoints,
    epochs_logged,
    kill_group,
    run_analyze,
    run_sweep,
    runs_of,
    start_sweep,
    wait_for,
)
from mlflow.tracking import MlflowClient

from pnn.io import liveness, storeguard, tracking
from pnn.sweep import lease

pytestmark = pytest.mark.slow

# SLOW_TINY in the sweep's process: the kill -9 of the process group ends it all the same, and
# what is tested is the sweep's parent run.
ONE_JOB = [*SLOW_TINY, *IN_PROCESS]


def parent_runs(client: MlflowClient) -> dict[str, object]:
    return {r.info.run_id: r for r in runs_of(client, "sweep")}


def running(client: MlflowClient) -> list[str]:
    experiment = client.get_experiment_by_name("pnn")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
    return [r.info.run_name for r in runs]


def kill_9_after_first_checkpoint(launch_dir: Path, client: MlflowClient, env: dict) -> object:
    """Start the sweep, SIGKILL its whole process group once a checkpoint exists; returns its
    parent run, left RUNNING and leased by the sweep's own, dead, process."""
    proc = start_sweep(ONE_JOB, launch_dir, env=env, output=launch_dir / "first.log")
    try:
        wait_for(lambda: checkpoints(launch_dir), proc, "the job's first checkpoint")
    finally:
        kill_group(proc)
    (zombie,) = runs_of(client, "sweep")
    assert zombie.info.status == "RUNNING"
    owner = zombie.data.tags[liveness.TAG_OWNER]
    assert liveness.parse_owner(owner) == (socket.gethostname(), proc.pid)
    assert liveness.lease_status(zombie) == (
        False,
        f"its process {proc.pid} on this host is gone",
    )
    return zombie


def rerun_and_check(launch_dir: Path, client: MlflowClient, env: dict, zombie) -> None:
    """The rerun resumes the job, marks the dead sweep's parent KILLED with its reason, and
    leaves nothing RUNNING; every epoch is logged once."""
    rerun = run_sweep(ONE_JOB, launch_dir, env=env)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-3000:]
    assert "1 finished, 0 skipped, 0 failed" in rerun.stdout
    zombie_id = zombie.info.run_id
    assert f"marked KILLED the parent run {zombie_id}" in out

    parents = parent_runs(client)
    old = parents.pop(zombie_id)
    (new,) = parents.values()
    assert old.info.status == "KILLED"
    reason = old.data.tags["pnn.failure"]
    pid = liveness.parse_owner(zombie.data.tags[liveness.TAG_OWNER])[1]
    assert reason.startswith(f"stale sweep: its process {pid} on this host is gone")
    assert f"by sweep {new.data.tags['pnn.sweep_id']}" in reason
    assert " marked KILLED at 20" in reason  # the ISO time it was closed
    assert new.info.status == "FINISHED"
    assert running(client) == []

    (job,) = runs_of(client, "job")
    assert job.info.status == "FINISHED"
    for key in tracking.EPOCH_METRICS:
        assert epochs_logged(client, job.info.run_id, key) == [1, 2, 3], key


@pytest.mark.usefixtures("existing_store")
def test_a_sweep_killed_with_kill_9_is_closed_by_the_next_one(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    zombie = kill_9_after_first_checkpoint(tmp_path, client, {})

    # analyze.py reads the zombie as a dead sweep, and writes nothing: the store is unchanged
    # byte for byte, the parent still RUNNING.
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    analysis = run_analyze(["--sweep", "latest", "--out", str(tmp_path / "res")], tmp_path)
    assert analysis.returncode == 1  # nothing finished yet
    assert f"({zombie.info.run_id}) is dead, not running" in analysis.stderr
    assert "on this host is gone" in analysis.stderr
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert client.get_run(zombie.info.run_id).info.status == "RUNNING"

    rerun_and_check(tmp_path, client, {}, zombie)


def test_a_killed_sweep_on_a_server_is_closed_by_the_next_one(
    tmp_path: Path, mlflow_server
) -> None:
    uri = mlflow_server(tmp_path / "server.db").url
    client = MlflowClient(uri)
    env = {"MLFLOW_TRACKING_URI": uri}
    zombie = kill_9_after_first_checkpoint(tmp_path, client, env)
    rerun_and_check(tmp_path, client, env, zombie)


@pytest.mark.usefixtures("existing_store")
def test_a_live_sweep_on_another_host_is_left_running(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storeguard.prepare(uri)
    client = MlflowClient(uri)
    experiment_id = tracking.get_experiment_id(client, "pnn", uri)

    def parent(name: str, heartbeat_age: float) -> str:
        tags = {"pnn.role": "sweep", **lease.lease_tags("elsewhere.example/4242/0a0b")}
        tags[liveness.TAG_HEARTBEAT] = f"{time.time() - heartbeat_age:.0f}"
        return client.create_run(experiment_id, tags=tags, run_name=name).info.run_id

    live = parent("live-elsewhere", heartbeat_age=0)
    lost = parent("lost-machine", heartbeat_age=liveness.STALE_S + 60)

    # The cheapest real sweep: its one job fails at once (no dataset), after the parent run
    # is made and the stale sweeps are closed.
    nowhere = ["dataset=mnist", f"dataset.root={tmp_path / 'nowhere'}", "dataset.download=false"]
    proc = run_sweep(["experiment=none", "model=lenet", *nowhere, *IN_PROCESS], tmp_path)
    assert "Dataset mnist is not available" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]

    assert client.get_run(live).info.status == "RUNNING"
    gone = client.get_run(lost)
    assert gone.info.status == "KILLED"
    reason = gone.data.tags["pnn.failure"]
    assert reason.startswith("stale sweep: its heartbeat is ")
    assert f"s old (stale after {liveness.STALE_S:.0f}s)" in reason
