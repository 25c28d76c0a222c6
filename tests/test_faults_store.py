"""Faults in the store and signals, through the real sweep.py and analyze.py."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import probe
import pytest
from conftest import (
    IN_PROCESS,
    SWEEP,
    TINY,
    checkpoints,
    clean_env,
    run_analyze,
    run_sweep,
    runs_of,
    start_sweep,
    wait_for,
)
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

# One short job: the cheapest sweep that still creates a store and trains.
ONE = ["experiment=e4_conv1x1_no_noise", *TINY, "train.batch_size=16", "train.epochs=1"]
ONE += ["train.max_steps_per_epoch=1", "tracking.log_checkpoint=false"]


def jobs(uri: str, role: str = "job") -> list:
    return runs_of(MlflowClient(uri), role)


def short_and_clean(proc: subprocess.CompletedProcess, *needles: str) -> str:
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    assert len(out.splitlines()) <= 10, out
    for needle in needles:
        assert needle in out, out
    return out


def test_two_sweeps_started_together_on_a_fresh_store(tmp_path: Path) -> None:
    # Two sweeps racing through MLflow's table creation: several tries, as a race may not show.
    for attempt in range(5):
        work = tmp_path / f"try{attempt}"
        work.mkdir()
        args = [*ONE, "hydra/launcher=basic"]  # in-process: the race is in the store creation
        logs = [work / f"sweep{i}.log" for i in range(2)]
        procs = [start_sweep(args, work, output=log) for log in logs]
        for proc in procs:
            proc.wait(timeout=600)
        outs = [log.read_text() for log in logs]
        for proc, out in zip(procs, outs, strict=True):
            assert proc.returncode == 0, out[-3000:]
            assert "Traceback" not in out, out[-3000:]
        uri = f"sqlite:///{work / 'mlflow.db'}"
        (run,) = jobs(uri)  # each job trained once; the other sweep skipped it
        assert run.info.status == "FINISHED"
        assert len(jobs(uri, "sweep")) == 2
        assert sum("1 finished" in out for out in outs) == 1
        assert not list(work.glob(".mlflow.db.creating-*"))


@pytest.mark.usefixtures("existing_store")
def test_sigterm_ends_the_sweep_cleanly_and_the_rerun_resumes(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    args = ["experiment=e1_baseline_resnet18", "train.seed=1,2", *TINY, "train.epochs=4"]
    args += ["dataset.train_size=400", "train.max_steps_per_epoch=null"]
    log = tmp_path / "sweep.log"
    proc = start_sweep(args, tmp_path, env={"TMPDIR": str(tmp)}, output=log)
    wait_for(lambda: checkpoints(tmp_path), proc, "a checkpoint", timeout=300)
    assert proc.poll() is None, "the sweep finished before it could be signalled"
    os.kill(proc.pid, signal.SIGTERM)  # the sweep process only, as `kill` does
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    out = log.read_text()
    assert "Traceback" not in out, out[-3000:]
    assert "[sweep] done in" in out and "KILLED" in out, out[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (parent,) = jobs(uri, "sweep")
    assert parent.info.status == "KILLED"
    killed = jobs(uri)
    assert killed and all(r.info.status == "KILLED" for r in killed)
    assert all(r.data.tags.get("pnn.killed_by") == "SIGTERM" for r in killed)
    assert not list(tmp.glob("pnn-launch-*"))

    rerun = run_sweep(args, tmp_path, env={"TMPDIR": str(tmp)})
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    done = {r.info.run_name: r for r in jobs(uri)}
    assert len(done) == 2 and all(r.info.status == "FINISHED" for r in done.values())
    for run in killed:  # resumed in its own run
        assert done[run.info.run_name].info.run_id == run.info.run_id
    assert not list(tmp.glob("pnn-launch-*"))


def test_store_failures_are_a_few_lines(tmp_path: Path) -> None:
    # sweep.py: a file: URI, a missing folder, a file that is not a database.
    for uri, needle in (
        (f"file://{tmp_path}/mlruns", "no longer supports file:"),
        (f"sqlite:///{tmp_path}/no/such/dir/mlflow.db", "does not exist"),
    ):
        short_and_clean(run_sweep([*ONE, f"tracking.uri={uri}"], tmp_path), uri, needle)
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(4096))
    short_and_clean(run_sweep([*ONE, f"tracking.uri=sqlite:///{junk}"], tmp_path), "not an SQLite")
    # analyze.py: the same, and a store that is not there.
    (tmp_path / "mlruns").mkdir()
    for uri, needle in (
        (f"file://{tmp_path}/mlruns", "no longer supports file:"),
        (f"sqlite:///{junk}", "not an SQLite"),
        (f"sqlite:///{tmp_path}/none.db", "no MLflow store at"),
        ("http://127.0.0.1:1", "connection refused"),
    ):
        short_and_clean(run_analyze(["--tracking-uri", uri], tmp_path), needle)
    assert not (tmp_path / "none.db").exists()


def _small_files() -> None:
    # A disk that is full for this process: writes past 300 kB fail (EFBIG) instead of killing.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))


def test_full_and_read_only_stores_are_a_few_lines(tmp_path: Path) -> None:
    full = subprocess.run(
        [sys.executable, str(SWEEP), *ONE, *IN_PROCESS],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_small_files,
    )
    short_and_clean(full, "disk is full")
    assert not (tmp_path / "mlflow.db").exists()  # no half-created store left behind

    ok = run_sweep([*ONE, *IN_PROCESS], tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    db = tmp_path / "mlflow.db"
    immutable = os.geteuid() == 0 and shutil.which("chattr")
    if immutable:  # root ignores permissions
        subprocess.run(["chattr", "+i", str(db)], check=True)
    else:
        db.chmod(0o444)
    try:
        proc = run_sweep([*ONE, *IN_PROCESS, "sweep.rerun=true"], tmp_path)
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(db)], check=True)
        db.chmod(0o644)
    short_and_clean(proc, "read-only", str(db))


@pytest.mark.usefixtures("existing_store")
def test_a_deleted_store_is_never_recreated(tmp_path: Path) -> None:
    args = ["experiment=e1_baseline_resnet18", "train.seed=1,2", *TINY, "train.epochs=3"]
    args += ["dataset.train_size=400", "train.max_steps_per_epoch=null", *IN_PROCESS]
    log = tmp_path / "sweep.log"
    proc = start_sweep(args, tmp_path, output=log)
    wait_for(lambda: checkpoints(tmp_path), proc, "a checkpoint", timeout=300)
    assert proc.poll() is None, "the sweep finished before the store could be deleted"
    (tmp_path / "mlflow.db").unlink()
    assert proc.wait(timeout=600) == 1
    out = log.read_text()
    assert "Traceback" not in out, out[-3000:]
    assert "2 failed" in out, out[-3000:]
    assert 1 <= sum("was deleted after the sweep started" in line for line in out.splitlines())
    assert not (tmp_path / "mlflow.db").exists(), "a new, empty store was created"


def test_thread_count_does_not_depend_on_cpu_workers(launch_dir: Callable[[str], Path]) -> None:
    """The job process trains on train.threads threads, whatever the number of workers, and so
    computes the same. OMP_NUM_THREADS=1 makes torch's own choice 1 on any machine (the sweep's
    main process, which never sets it, shows it), so 3 in the job can only be train.threads."""
    args = ["experiment=e1_baseline_resnet18", *TINY, "train.epochs=2", "train.threads=3"]
    args += ["dataset.train_size=160", "train.max_steps_per_epoch=null"]
    args += ["tracking.log_checkpoint=false"]
    metrics = []
    for workers in (1, 2):
        work = launch_dir(f"w{workers}")
        env = probe.install(work / "probe", probe.THREADS_AT_EXIT) | {"OMP_NUM_THREADS": "1"}
        proc = run_sweep([*args, f"hydra.launcher.cpu_workers={workers}"], work, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (run,) = jobs(f"sqlite:///{work / 'mlflow.db'}")
        metrics.append(run.data.metrics)
        records = probe.records(work / "probe")
        exits = [(Path(r["argv0"]).name, r["via"], r["threads"]) for r in records]
        sweep_threads = [n for name, via, n in exits if name == "sweep.py" and via == "atexit"]
        job_threads = [n for _, via, n in exits if via == "os._exit"]
        assert sweep_threads == [1] and job_threads == [3], records  # the sweep, the job process
    for key in ("best_test_acc", "final_test_acc", "best_test_acc_reported"):
        assert metrics[0][key] == metrics[1][key], key


@pytest.mark.parametrize("at", [1, 2], ids=["creating-the-run", "logging-an-epoch"])
@pytest.mark.usefixtures("existing_store")
def test_a_signal_inside_an_mlflow_call_ends_the_job_cleanly(tmp_path: Path, at: int) -> None:
    """The signal lands while SQLAlchemy is mid-query (tests/probe.py): while the new run's
    parameter counts or the first epoch's metrics are written. The job must end as a KILLED run,
    quietly: no "Error closing cursor" traceback, no run left RUNNING."""
    env = probe.install(tmp_path / "probe", probe.SIGTERM_IN_METRICS_INSERT)
    env["PNN_TEST_SIGNAL_AT"] = str(at)
    args = ["experiment=e1_baseline_resnet18", *TINY, "train.epochs=3"]  # in a job process
    proc = run_sweep([*args, "tracking.log_checkpoint=false"], tmp_path, env=env)
    out = proc.stdout + proc.stderr
    assert [r["signalled"] for r in probe.records(tmp_path / "probe")] == [at]
    assert "Traceback" not in out and "Error closing cursor" not in out, out[-3000:]
    assert "0 finished, 0 skipped, 0 failed, 1 killed" in out, out[-3000:]
    (run,) = jobs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run.info.status == "KILLED", out[-3000:]
    assert run.data.tags.get("pnn.killed_by") == "SIGTERM"
