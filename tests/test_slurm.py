"""``hydra/launcher=slurm`` on a real single-node SLURM (:mod:`slurm_cluster`), without accounting.

Without accounting ``sacct`` fails, so submitit cannot tell that a job has ended: the harder case,
where a job that died without a result must still be found, through ``squeue``. With accounting
the same code reads the same ``squeue``. The jobs are tiny models of a few seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import (
    TINY,
    checkpoints,
    epochs_logged,
    run_sweep,
    runs_of,
    start_sweep,
    store,
    wait_for,
)
from slurm_cluster import SlurmCluster, missing

from pnn.io.liveness import TAG_HEARTBEAT, TAG_OWNER

SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_task=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.poll_s=0.5",
    "hydra.launcher.result_wait_s=2",
]
# About 0.4 s an epoch here: a job is still training when the test acts on its first checkpoint.
JOB = [
    "experiment=e4_conv1x1_no_noise",
    *TINY,
    "dataset.train_size=400",
    "train.max_steps_per_epoch=null",
    "tracking.log_checkpoint=false",
]
WAIT_S = 120


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    why = missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"SLURM tests need slurm-wlm and munge (.ci/run installs them): {why}")
        pytest.skip(why)
    cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


def stop(proc: object) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


def job_ids(cluster: SlurmCluster) -> list[str]:
    out = cluster.run("squeue", "--noheader", "--array", "--format=%i|%T").stdout
    return [line.split("|")[0] for line in out.split() if line.endswith("|RUNNING")]


def queue(cluster: SlurmCluster) -> str:
    return cluster.run("squeue", "--noheader", "--array", "--format=%i %T").stdout.strip()


def job_run(launch: Path, seed: int | None = None) -> object:
    runs = runs_of(store(launch), "job")
    if seed is not None:
        runs = [r for r in runs if r.data.params["train.seed"] == str(seed)]
    (run,) = runs
    return run


def parent(launch: Path) -> object:
    (run,) = runs_of(store(launch), "sweep")
    return run


def sweep_env(cluster: SlurmCluster) -> dict[str, str]:
    return {**cluster.env(), "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin"}


@pytest.mark.slow
@pytest.mark.usefixtures("existing_store")
def test_scancel_of_one_job_kills_its_run_and_the_sweep_reports_each_job(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    args = [*SLURM, *JOB, "train.seed=1,2", "train.epochs=10"]
    log = tmp_path / "sweep.log"
    proc = start_sweep(args, tmp_path, env=sweep_env(slurm), output=log)
    try:
        both = "both jobs' first checkpoint"
        wait_for(lambda: len(checkpoints(tmp_path)) == 2, proc, both, WAIT_S)
        first = sorted(job_ids(slurm))[0]
        slurm.run("scancel", first)
        assert proc.wait(timeout=WAIT_S) == 1  # a job was killed: the command did not do it all
    finally:
        stop(proc)
    out = log.read_text()
    assert "1 finished, 0 skipped, 0 failed, 1 killed" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert parent(tmp_path).info.status == "FINISHED"
    statuses = {r.data.params["train.seed"]: r for r in runs_of(store(tmp_path), "job")}
    killed = [r for r in statuses.values() if r.info.status == "KILLED"]
    assert len(killed) == 1 and killed[0].data.tags["pnn.killed_by"] == "SIGTERM"
    assert [r.info.status for r in statuses.values()].count("FINISHED") == 1
    wait_for(lambda: not queue(slurm), None, "SLURM to see both jobs end", WAIT_S)

    # The rerun resumes the killed run; FINISHED, it keeps no tag of the kill.
    rerun = run_sweep(args, tmp_path, env=sweep_env(slurm), timeout=WAIT_S)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert "1 finished, 1 skipped, 0 failed" in rerun.stdout
    run = store(tmp_path).get_run(killed[0].info.run_id)
    assert run.info.status == "FINISHED"
    assert "pnn.killed_by" not in run.data.tags and "pnn.failure" not in run.data.tags
    assert epochs_logged(store(tmp_path), run.info.run_id) == list(range(1, 11))


@pytest.mark.slow
@pytest.mark.usefixtures("existing_store")
def test_sigterm_to_the_sweep_cancels_its_slurm_jobs(slurm: SlurmCluster, tmp_path: Path) -> None:
    log = tmp_path / "sweep.log"
    # One job at a time: the second is still pending when the sweep gets the signal.
    args = [*SLURM, *JOB, "train.epochs=30", "train.seed=1,2", "hydra.launcher.array_parallelism=1"]
    proc = start_sweep(args, tmp_path, sweep_env(slurm), log)
    try:
        wait_for(lambda: checkpoints(tmp_path), proc, "the job's first checkpoint", WAIT_S)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=WAIT_S) == 128 + signal.SIGTERM
    finally:
        stop(proc)
    out = log.read_text()
    assert "0 finished, 0 skipped, 0 failed, 2 killed" in out, out[-3000:]
    assert "not started" not in out, out[-3000:]
    assert "cancelled by the sweep (SIGTERM) before it started" in out, out[-3000:]
    run = job_run(tmp_path)
    assert run.info.status == "KILLED" and run.data.tags["pnn.killed_by"] == "SIGTERM"
    assert parent(tmp_path).info.status == "KILLED"
    wait_for(lambda: not queue(slurm), None, "nothing left queued or running", WAIT_S)


@pytest.mark.slow
@pytest.mark.usefixtures("existing_store")
def test_a_job_killed_outright_is_lost_not_waited_for_and_the_rerun_adopts_its_run(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    log = tmp_path / "sweep.log"
    args = [*SLURM, *JOB, "train.epochs=12"]
    proc = start_sweep(args, tmp_path, sweep_env(slurm), log)
    try:
        wait_for(lambda: checkpoints(tmp_path), proc, "the job's first checkpoint", WAIT_S)
        (job,) = [
            p
            for p in psutil.process_iter(["cmdline"])
            if (p.info["cmdline"] or ["srun"])[0] != "srun"
            and "submitit.core._submit" in " ".join(p.info["cmdline"])
            and p.environ().get("SLURM_CONF") == str(slurm.conf)
        ]
        job.kill()
        assert proc.wait(timeout=WAIT_S) == 1
    finally:
        stop(proc)
    out = log.read_text()
    assert "0 finished, 0 skipped, 0 failed, 1 lost" in out, out[-3000:]
    run = job_run(tmp_path)
    assert run.info.status == "KILLED" and "lost: SLURM job" in run.data.tags["pnn.failure"]
    assert f"run {run.info.run_id} marked KILLED" in out
    assert parent(tmp_path).info.status == "FINISHED"

    rerun = run_sweep(args, tmp_path, env=sweep_env(slurm), timeout=WAIT_S)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    resumed = job_run(tmp_path)  # the same run, adopted: no second one
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.usefixtures("existing_store")
def test_a_running_job_is_not_lost_when_squeue_fails(slurm: SlurmCluster, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"  # an squeue that fails, first on the sweep's PATH
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\necho 'slurm_load_jobs error' >&2\nexit 1\n")
    (bin_dir / "squeue").chmod(0o755)
    env = sweep_env(slurm)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    proc = run_sweep([*SLURM, *JOB, "train.epochs=2"], tmp_path, env=env, timeout=WAIT_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "1 finished, 0 skipped, 0 failed" in proc.stdout
    assert job_run(tmp_path).info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.usefixtures("existing_store")
def test_usr2_requeues_the_job_which_releases_its_lease_and_resumes_its_run(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    log = tmp_path / "sweep.log"
    proc = start_sweep([*SLURM, *JOB, "train.epochs=12"], tmp_path, sweep_env(slurm), log)
    try:
        wait_for(lambda: checkpoints(tmp_path), proc, "the job's first checkpoint", WAIT_S)
        owner = job_run(tmp_path).data.tags[TAG_OWNER]
        (job,) = job_ids(slurm)
        slurm.run("scancel", "--signal=USR2", job)
        # Before the requeued job adopts the run, the run is open with no heartbeat: no host
        # takes it for live. (The requeued job waits cred_expire, 10 s, before it may start.)
        released = []

        def released_or_adopted() -> bool:
            tags = job_run(tmp_path).data.tags
            if tags[TAG_OWNER] == owner and TAG_HEARTBEAT not in tags:
                released.append(True)
            return tags[TAG_OWNER] != owner

        wait_for(released_or_adopted, proc, "the requeued job's adoption", WAIT_S)
        assert released, "the preempted job left its heartbeat on the run"
        assert proc.wait(timeout=WAIT_S) == 0
    finally:
        stop(proc)
    out = log.read_text()
    assert "1 finished, 0 skipped, 0 failed" in out, out[-3000:]
    run = job_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert epochs_logged(store(tmp_path), run.info.run_id) == list(range(1, 13))


@pytest.mark.slow
@pytest.mark.usefixtures("existing_store")
def test_detach_submits_and_exits_and_the_job_logs_on_its_own(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    args = [*SLURM, *JOB, "train.epochs=2", "sweep.detach=true"]
    proc = run_sweep(args, tmp_path, env=sweep_env(slurm), timeout=WAIT_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    top = parent(tmp_path)
    assert top.info.status == "FINISHED" and top.data.tags["pnn.detached"]
    assert "detached: 1 job(s) submitted to SLURM" in proc.stdout
    assert f"python analyze.py --sweep {top.info.run_id}" in proc.stdout

    def finished() -> bool:
        runs = runs_of(store(tmp_path), "job")
        return bool(runs) and runs[0].info.status == "FINISHED"

    wait_for(finished, None, "the detached job's run to finish", WAIT_S)
    assert job_run(tmp_path).data.tags["mlflow.parentRunId"] == top.info.run_id


def test_detach_needs_the_slurm_launcher(tmp_path: Path) -> None:
    proc = run_sweep([*JOB, "sweep.detach=true"], tmp_path, timeout=WAIT_S)
    assert proc.returncode == 1
    assert "sweep.detach=true needs hydra/launcher=slurm (got GpuPoolLauncher)" in proc.stderr
