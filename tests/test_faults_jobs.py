"""A job's lifecycle under faults: kills, a change of store, two launch directories, corrupt
checkpoints, a missing dataset and a name that would become a path. Through the real sweep.py,
real SQLite stores and a real ``mlflow server``; every kill is triggered by a file or a store
state that the test observes, never by a sleep."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import (
    IN_PROCESS,
    SLOW_TINY,
    TINY,
    checkpoints,
    client_of,
    epochs_logged,
    kill_group,
    run_analyze,
    run_sweep,
    runs_of,
    start_sweep,
    wait_for,
    write_idx,
)
from mlflow.tracking import MlflowClient

from pnn.config import ConfigError, load_config, validate
from pnn.io import liveness, tracking
from pnn.io.tracking import EPOCH_METRICS
from pnn.train.checkpoint import UnreadableCheckpointError, read_checkpoint
from pnn.train.data import DatasetUnavailableError, check_available, load_data

WAIT_S = 600
# The tests below that are not about job processes run their jobs in the sweep's process
# (IN_PROCESS): a kill of the sweep's process group ends the job the same way, and each job
# process would cost seconds of imports.


def created_yet(store: Path) -> bool:
    """Whether a job run exists in ``store``, which a sweep may be creating right now."""
    try:
        return store.exists() and bool(runs_of(client_of(store), "job", missing_ok=True))
    except Exception:  # noqa: BLE001 - tables not all there yet
        return False


def _children(pid: int) -> list[int]:
    try:
        return [kid.pid for kid in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


def _cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []


def _state(pid: int) -> str:
    return psutil.Process(pid).status()


def _parent(pid: int) -> int:
    return psutil.Process(pid).ppid()


def job_processes(pid: int) -> list[int]:
    """The launcher's job processes: the children forked by its forkserver (they show the
    server's command line; a program the server's imports ran for a moment does not)."""
    found = []
    for kid in _children(pid):
        server = _cmdline(kid)
        if "multiprocessing.forkserver" in " ".join(server):
            found += [job for job in _children(kid) if _cmdline(job) == server]
    return found


def job_at_its_first_checkpoint(proc: object, launch_dir: Path) -> int:
    """The pid of the sweep's one job process, once its first checkpoint is written (found
    before, while the job still runs)."""
    found: list[int] = []

    def started_and_checkpointed() -> bool:
        found[:] = found or job_processes(proc.pid)
        return bool(found) and bool(checkpoints(launch_dir))

    wait_for(started_and_checkpointed, proc, "the job's first checkpoint")
    return found[0]


# --------------------------------------------------------------------------------------------
# Checkpoints survive a change of store; a killed job process leaves no zombie run
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_checkpoint_continues_into_a_new_store(tmp_path: Path) -> None:
    log = tmp_path / "first.log"
    proc = start_sweep([*SLOW_TINY, *IN_PROCESS], tmp_path, output=log)
    try:
        wait_for(lambda: checkpoints(tmp_path), proc, "a checkpoint")
    finally:
        kill_group(proc)
    (checkpoint,) = checkpoints(tmp_path)
    done = len(torch.load(checkpoint, weights_only=True)["history"])
    assert 1 <= done < 3

    other = tmp_path / "other.db"
    rerun = run_sweep([*SLOW_TINY, *IN_PROCESS, f"tracking.uri=sqlite:///{other}"], tmp_path)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-3000:]
    assert f"continues from checkpoint {checkpoint} after epoch {done}" in out
    assert f"epochs 1-{done} logged from the checkpoint's history" in out
    assert "epoch 1/3 " not in out  # epoch 1 was not trained again
    (run,) = runs_of(client_of(other), "job")
    assert run.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert epochs_logged(client_of(other), run.info.run_id, key) == [1, 2, 3], key
    # The first store still has its run (RUNNING: the whole sweep was SIGKILLed).
    (old,) = runs_of(client_of(tmp_path / "mlflow.db"), "job")
    assert old.info.run_id != run.info.run_id


@pytest.mark.slow
@pytest.mark.usefixtures("existing_store")
def test_kill_9_of_a_job_process_marks_its_run_killed_and_the_rerun_finishes_it(
    tmp_path: Path,
) -> None:
    proc = start_sweep(SLOW_TINY, tmp_path, output=tmp_path / "first.log")
    try:
        job = job_at_its_first_checkpoint(proc, tmp_path)
        # A job is forked by the stdlib forkserver that the sweep started.
        server = _parent(job)
        assert server != proc.pid and _parent(server) == proc.pid
        assert "multiprocessing.forkserver" in " ".join(_cmdline(server))
        os.kill(job, signal.SIGKILL)
        assert proc.wait(timeout=WAIT_S) == 1
    finally:
        kill_group(proc)
    assert "exited with code -9 (SIGKILL)" in (tmp_path / "first.log").read_text()
    client = client_of(tmp_path / "mlflow.db")
    (killed,) = runs_of(client, "job")
    assert killed.info.status == "KILLED"
    assert "exited with code -9 (SIGKILL)" in killed.data.tags["pnn.failure"]

    rerun = run_sweep(SLOW_TINY, tmp_path)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert "1 finished, 0 skipped, 0 failed" in rerun.stdout
    (run,) = runs_of(client, "job")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert "pnn.failure" not in run.data.tags  # cleared when the run finished
    for key in EPOCH_METRICS:
        assert epochs_logged(client, run.info.run_id, key) == [1, 2, 3], key
    assert len(run.data.tags[tracking.TAG_SWEEPS].split(",")) == 2  # created, then resumed

    # analyze.py --sweep latest counts the resumed job as the latest sweep's, and says so.
    analysis = run_analyze(["--sweep", "latest", "--out", str(tmp_path / "res")], tmp_path)
    assert analysis.returncode == 0, analysis.stderr[-3000:]
    assert "with 1 run(s) it resumed from an earlier sweep" in analysis.stdout
    assert "1 finished run(s) summarised" in analysis.stdout


@pytest.mark.slow
@pytest.mark.usefixtures("existing_store")
def test_a_signal_to_the_whole_process_group_stops_forked_jobs_cleanly(tmp_path: Path) -> None:
    """SIGTERM to the sweep's process group, as a batch system or ``kill -- -PGID`` sends it,
    reaches the sweep, its forkserver and its forked job at once: the server outlives it and
    reports the job, which marks its run KILLED; nothing of the group is left running."""
    log = tmp_path / "sweep.log"
    proc = start_sweep(SLOW_TINY, tmp_path, output=log)
    wait_for(lambda: checkpoints(tmp_path), proc, "the job's first checkpoint")
    assert len(job_processes(proc.pid)) == 1
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        assert proc.wait(timeout=WAIT_S) == 128 + signal.SIGTERM
    finally:
        kill_group(proc)
    out = log.read_text()
    assert "Traceback" not in out and "went away" not in out, out[-3000:]
    assert "0 finished, 0 skipped, 0 failed, 1 killed" in out, out[-3000:]
    (killed,) = runs_of(client_of(tmp_path / "mlflow.db"), "job")
    assert killed.info.status == "KILLED" and killed.data.tags["pnn.killed_by"] == "SIGTERM"
    deadline = time.monotonic() + 10  # the server exits within its poll interval
    while time.monotonic() < deadline and _group_members(proc.pid):
        time.sleep(0.05)
    assert not _group_members(proc.pid)


@pytest.mark.slow
@pytest.mark.usefixtures("existing_store")
def test_kill_9_of_the_sweep_alone_leaves_no_orphan_training(tmp_path: Path) -> None:
    """Only the sweep's own process is SIGKILLed (its job is not in the kill): the forkserver
    sees its parent go and exits, the kernel then SIGTERMs the job (it asked to die with its
    parent), and the job marks its run KILLED and ends instead of training on as an orphan."""
    proc = start_sweep(SLOW_TINY, tmp_path, output=tmp_path / "sweep.log")
    try:
        job = job_at_its_first_checkpoint(proc, tmp_path)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(job).wait(timeout=60)  # TimeoutExpired: it trains on
    finally:
        kill_group(proc)
    (killed,) = runs_of(client_of(tmp_path / "mlflow.db"), "job")
    assert killed.info.status == "KILLED" and killed.data.tags["pnn.killed_by"] == "SIGTERM"


@pytest.mark.slow
@pytest.mark.usefixtures("existing_store")
def test_a_second_signal_ends_the_jobs_at_once(tmp_path: Path) -> None:
    """The first SIGTERM is forwarded to the job, which is stopped (SIGSTOP) and so cannot act
    on it; the second kills the job outright, and the sweep still ends its run KILLED."""
    log = tmp_path / "sweep.log"
    proc = start_sweep(SLOW_TINY, tmp_path, output=log)
    try:
        job = job_at_its_first_checkpoint(proc, tmp_path)
        os.kill(job, signal.SIGSTOP)
        # Stopped before the SIGTERM comes, so that it stays pending, unhandled.
        wait_for(lambda: _state(job) == psutil.STATUS_STOPPED, proc, "the job stopped", 60)
        os.kill(proc.pid, signal.SIGTERM)
        wait_for(lambda: _pending(job, signal.SIGTERM), proc, "the forwarded SIGTERM", 60)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        kill_group(proc)
    assert "exited with code -9 (SIGKILL)" in log.read_text()
    (killed,) = runs_of(client_of(tmp_path / "mlflow.db"), "job")
    assert killed.info.status == "KILLED"


def _pending(pid: int, sig: int) -> bool:
    """Whether ``sig`` waits to be delivered to ``pid`` (its pending-signal masks in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    masks = [int(line.split()[1], 16) for line in status if line.startswith(("SigPnd", "ShdPnd"))]
    return any(mask & (1 << (sig - 1)) for mask in masks)


def _group_members(pgid: int) -> list[int]:
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def _small_mnist(root: Path) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("t10k", 8)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), "u1"))
        write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n, "u1"))


@pytest.mark.slow
@pytest.mark.usefixtures("existing_store")
def test_kill_before_the_first_checkpoint_leaves_one_run_per_job(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _small_mnist(data)
    args = [
        "experiment=none",
        "model=lenet",
        "dataset=mnist",
        f"dataset.root={data}",
        "dataset.download=false",
        "train.epochs=1",
        "train.batch_size=4",
        *IN_PROCESS,
    ]
    client = client_of(tmp_path / "mlflow.db")
    # Holding the dataset's download lock stops the job inside load_data: after its run is
    # created, before any epoch, whatever the machine's speed.
    with open(data / ".pnn-download.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = start_sweep(args, tmp_path, output=tmp_path / "first.log")
        try:
            wait_for(lambda: created_yet(tmp_path / "mlflow.db"), proc, "the job's run")
        finally:
            kill_group(proc)
    (first,) = runs_of(client, "job")
    assert first.info.status == "RUNNING" and not checkpoints(tmp_path)

    rerun = run_sweep(args, tmp_path)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-3000:]
    assert f"adopting MLflow run {first.info.run_id} (RUNNING, no checkpoint)" in out
    (run,) = runs_of(client, "job")
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"


# --------------------------------------------------------------------------------------------
# The claim lives in the store: two launch directories, one server
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_launch_directories_on_one_server_train_a_job_once(
    tmp_path: Path, mlflow_server
) -> None:
    uri = mlflow_server(tmp_path / "server.db").url
    client = MlflowClient(uri)
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    first_dir.mkdir()
    second_dir.mkdir()
    args = ["experiment=e4_conv1x1_no_noise", *TINY, "train.epochs=100000", *IN_PROCESS]
    env = {"MLFLOW_TRACKING_URI": uri}
    proc = start_sweep(args, first_dir, env=env, output=tmp_path / "a.log")
    try:
        wait_for(lambda: checkpoints(first_dir), proc, "training")
        second = run_sweep(args, second_dir, env=env)
        assert proc.poll() is None, "the first sweep should still be training"
    finally:
        kill_group(proc)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert "0 finished, 1 skipped, 0 failed" in second.stdout
    (run,) = runs_of(client, "job")
    assert f"running elsewhere as run {run.info.run_id}" in second.stdout
    assert f"owner {socket.gethostname()}/" in second.stdout
    assert not checkpoints(second_dir)


# --------------------------------------------------------------------------------------------
# Corrupt checkpoints, names that become paths, a missing dataset
# --------------------------------------------------------------------------------------------


class _Exploit:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.slow
@pytest.mark.usefixtures("existing_store")
def test_corrupt_checkpoints_are_moved_aside_and_the_jobs_restart(tmp_path: Path) -> None:
    args = ["experiment=e4_conv1x1_no_noise", *TINY, "train.seed=1,2", *IN_PROCESS]
    good = tmp_path / "good.pt"
    torch.save({"epoch": 1, "model": {"w": torch.zeros(1000)}}, good)
    contents = {
        1: good.read_bytes()[: good.stat().st_size // 2],  # truncated
        2: np.random.default_rng(0).bytes(5000),  # random bytes
    }
    paths = {}
    for seed, data in contents.items():
        cfg = load_config(["experiment=e4_conv1x1_no_noise", *TINY, f"train.seed={seed}"])
        name = f"e4_conv1x1_no_noise-seed{seed}-{tracking.config_hash(cfg)}"
        paths[seed] = tmp_path / "checkpoints" / name / "last.pt"
        paths[seed].parent.mkdir(parents=True)
        paths[seed].write_bytes(data)

    proc = run_sweep(args, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "2 finished, 0 skipped, 0 failed" in proc.stdout
    assert "weights_only=False" not in out  # torch's unsafe advice is not passed on
    for seed, path in paths.items():
        (moved,) = path.parent.glob("last.pt.corrupt-*")
        assert moved.read_bytes() == contents[seed]  # kept, byte for byte
        assert f"cannot read checkpoint {path}" in out
        assert f"Moved it aside to {moved}; starting the job afresh" in out
    assert len(runs_of(client_of(tmp_path / "mlflow.db"), "job")) == 2


@pytest.mark.slow
def test_an_experiment_name_with_dots_and_slashes_is_refused(tmp_path: Path) -> None:
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "pwn.yaml").write_text('# @package _global_\nexperiment: "../../x/pwn"\n')
    proc = run_sweep(["--config-dir", str(tmp_path / "conf"), "experiment=pwn", *TINY], tmp_path)
    assert proc.returncode != 0
    assert "experiment must be a plain name" in proc.stderr + proc.stdout
    assert "'../../x/pwn'" in proc.stderr + proc.stdout
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path.parent / "x").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("existing_store")
def test_a_missing_dataset_fails_before_its_run_is_created(tmp_path: Path) -> None:
    args = ["experiment=none", "model=lenet", "dataset=mnist", "dataset.download=false"]
    args += IN_PROCESS
    proc = run_sweep([*args, f"dataset.root={tmp_path / 'nowhere'}"], tmp_path)
    assert proc.returncode == 1
    assert "Dataset mnist is not available" in proc.stdout
    assert runs_of(client_of(tmp_path / "mlflow.db"), "job", missing_ok=True) == []


# --------------------------------------------------------------------------------------------
# The rules themselves, without subprocesses
# --------------------------------------------------------------------------------------------


class _Run:
    def __init__(self, tags: dict[str, str]) -> None:
        self.data = type("Data", (), {"tags": tags})()


def test_lease_status_rules() -> None:
    here, now = socket.gethostname(), time.time()
    beat = {liveness.TAG_HEARTBEAT: f"{now:.0f}"}
    alive = _Run({**beat, liveness.TAG_OWNER: f"{here}/{os.getpid()}/ab"})
    assert liveness.lease_status(alive, now)[0]
    assert not liveness.lease_status(alive, now + liveness.STALE_S + 1)[0]
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = _Run({**beat, liveness.TAG_OWNER: f"{here}/{dead.pid}/ab"})
    assert liveness.lease_status(gone, now) == (
        False,
        f"its process {dead.pid} on this host is gone",
    )
    # A process that has exited but is not collected yet (a zombie: when its parent died too,
    # until init gets to it) is gone as well, or a rerun right after `kill -9` of a whole sweep
    # would skip its jobs as "running elsewhere".
    zombie = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 30
        while _state(zombie.pid) != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _state(zombie.pid) == psutil.STATUS_ZOMBIE
        exited = _Run({**beat, liveness.TAG_OWNER: f"{here}/{zombie.pid}/ab"})
        assert liveness.lease_status(exited, now) == (
            False,
            f"its process {zombie.pid} on this host is gone",
        )
    finally:
        zombie.wait()
    # Another host's process cannot be checked: only its heartbeat counts.
    remote = _Run({**beat, liveness.TAG_OWNER: f"elsewhere.example/{dead.pid}/ab"})
    assert liveness.lease_status(remote, now)[0]
    assert not liveness.lease_status(_Run({}), now)[0]


def test_read_checkpoint_never_unpickles_unsafely(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / "last.pt"
    torch.save({"epoch": 1, "payload": _Exploit(marker)}, path)
    with pytest.raises(UnreadableCheckpointError, match=f"cannot read checkpoint {path}"):
        read_checkpoint(path)
    assert not marker.exists()
    torch.save({"epoch": 1}, path)
    with pytest.raises(UnreadableCheckpointError, match="not a pnn checkpoint"):
        read_checkpoint(path)


def test_experiment_names_must_be_plain() -> None:
    cfg = load_config(["experiment=e4_conv1x1_no_noise"])
    for bad in ("../../x/pwn", "..", "a/b", "a b", ""):
        cfg.experiment = bad
        with pytest.raises(ConfigError, match="experiment must be a plain name"):
            validate(cfg)
    cfg.experiment = "e4_conv1x1.v2-b"
    validate(cfg)


def test_check_available_looks_for_files_without_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No torchvision dataset is constructed (which would read the files) while checking;
    load_data, as the control, constructs one per split."""
    import torchvision

    constructed: list[bool] = []
    init = torchvision.datasets.MNIST.__init__

    def recording_init(self, root: str, train: bool = True, **kwargs: object) -> None:
        constructed.append(train)
        init(self, root, train=train, **kwargs)

    monkeypatch.setattr(torchvision.datasets.MNIST, "__init__", recording_init)
    cfg = load_config(["dataset=mnist", "model=lenet", "dataset.download=false"])
    with pytest.raises(DatasetUnavailableError, match="missing: .*train-images-idx3-ubyte"):
        check_available(cfg, tmp_path)
    _small_mnist(tmp_path)
    check_available(cfg, tmp_path)
    assert constructed == []
    assert len(load_data(cfg, torch.device("cpu"), tmp_path).train_labels) == 16
    assert constructed == [True, False]
