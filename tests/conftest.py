"""Fixtures and helpers shared by the tests that run the real programs.

- :func:`clean_env`: a subprocess environment that cannot point MLflow at a developer's store;
- :func:`run_sweep`, :func:`run_analyze`, :func:`start_sweep`, :func:`run_python`: the real
  programs in a subprocess, forked by this worker's forkserver (tests/forkserver.py);
- ``mlflow_server``: a real ``mlflow server`` on 127.0.0.1, stopped when the test ends;
- :func:`store`, :func:`runs_of`, :func:`epochs_logged`: what a launch directory's store holds;
- ``existing_store`` / ``launch_dir``: a copy of a migrated ``empty_store``, for tests of what
  sweeps log rather than of how a store comes to exist (MLflow's migrations cost CPU);
- ``IN_PROCESS``: Hydra's basic launcher, for tests of what a sweep logs, not of its processes.

``make test`` runs under pytest-xdist, one worker per usable core; the slow tests start first,
and a module's tests that share a module-scoped fixture stay on one worker.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from forkserver import ForkedProcess, ForkServer, startup_differences
from mlflow.tracking import MlflowClient

from pnn.sweep.launcher import JOB_PRELOAD

REPO = Path(__file__).resolve().parent.parent
SWEEP = REPO / "sweep.py"
ANALYZE = REPO / "analyze.py"
# Small and quick on CPU: for tests of the sweep's logic, not of the model's.
TINY = ["profile=smoke", "model.nfilters=8", "dataset.train_size=64", "dataset.test_size=40"]
# One job of a small model that takes a few seconds per epoch here, so that a kill triggered by
# its first checkpoint lands before it ends.
SLOW_TINY = [
    "experiment=e4_conv1x1_no_noise",
    *TINY,
    "dataset.train_size=400",
    "train.max_steps_per_epoch=null",
    "train.epochs=3",
]
# The jobs in the sweep's process (Hydra's basic launcher), one after another.
IN_PROCESS = ["hydra/launcher=basic"]
SERVER_START_TIMEOUT_S = 120
# MLflow 3's server also starts a job runner with eight huey consumer processes, for its GenAI
# jobs: seconds of CPU at each start, for a feature no test (and pnn-sweep) uses.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def pytest_configure(config: pytest.Config) -> None:
    """An xdist worker computes on one thread: there is one worker per core, and torch's
    default (a thread per core in each worker) only has the OpenMP threads of the workers
    spin against each other. Subprocesses keep their own choice (a job sets train.threads)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: the cores this process may use (psutil would count the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups into node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first (a stable sort: the order within each kind is kept); a test that uses
    a fixture with module scope, defined in its own module, joins that module's xdist group."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        module = getattr(item, "module", None)
        if info is None or module is None:
            continue
        shared = any(
            fixturedef.scope == "module" and fixturedef.baseid == item.nodeid.split("::")[0]
            for defs in info.name2fixturedefs.values()
            for fixturedef in defs
        )
        if shared:
            item.add_marker(pytest.mark.xdist_group(module.__name__))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Under ``--dist loadgroup`` a grouped test's node id must carry its group (pytest-xdist
    sends a group to one worker by that suffix): fail, rather than run every shared fixture
    once per worker, if a pytest or pytest-xdist release stops doing so."""
    if (
        item.config.getoption("loadgroup", default=False)
        and item.get_closest_marker("xdist_group")
        and "@" not in item.nodeid
    ):
        pytest.fail(
            "--dist loadgroup lost this test's xdist group (pytest-dev/pytest-xdist#1386: "
            "pytest>=9.2 with pytest-xdist<=3.8); pyproject.toml holds pytest below 9.2"
        )


def load_analyze() -> Any:
    """analyze.py as a module (it is a script, not in a package), for in-process ``main()``."""
    spec = importlib.util.spec_from_file_location("analyze_cli", REPO / "analyze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` without MLflow's selection variables and pnn's own (a sweep's jobs
    inherit those), unbuffered, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PNN_")}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        env.pop(key, None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


# ---------------------------------------------------------------------------------------------
# The forkserver: sweep.py and analyze.py without paying their imports each time
# ---------------------------------------------------------------------------------------------

# The forkserver's imports for the programs of the tests: a job's, and sweep.py's and analyze.py's
# own (Hydra's entry point, matplotlib for the figures).
TEST_PRELOAD = (
    *JOB_PRELOAD,
    "hydra.main",
    "matplotlib.figure",
    "matplotlib.font_manager",
    "matplotlib.backends.backend_agg",
)
_FORKSERVER: list[ForkServer] = []
_FORKSERVER_LOCK = threading.Lock()


def needs_fresh_interpreter(env: dict[str, str]) -> bool:
    """Whether ``env`` differs from the forkserver's in what only a new interpreter reads
    (``PYTHONPATH`` for a probe's ``sitecustomize``, ``OMP_NUM_THREADS``...)."""
    return bool(startup_differences(env, clean_env()))


def forkserver() -> ForkServer:
    """This process's forkserver (tests/forkserver.py), started on first use and ended
    when this process exits."""
    with _FORKSERVER_LOCK:
        if not _FORKSERVER:
            _FORKSERVER.append(ForkServer(TEST_PRELOAD, clean_env()))
            atexit.register(_FORKSERVER[0].close)
        return _FORKSERVER[0]


def fork_program(
    argv: list[str], cwd: Path, env: dict[str, str], out: int, err: int, **kw: Any
) -> ForkedProcess:
    """``python *argv`` forked by :func:`forkserver`, with /dev/null as stdin."""
    with open(os.devnull) as stdin:
        return forkserver().start(argv, env, cwd, (stdin.fileno(), out, err), **kw)


def run_program(
    argv: list[str], cwd: Path, env: dict[str, str] | None, timeout: float
) -> subprocess.CompletedProcess:
    """``python *argv`` (a script, or ``-m module``) run from ``cwd`` in :func:`clean_env`;
    output captured as text. Forked by this worker's forkserver unless the environment asks for
    a new interpreter."""
    cmd = [sys.executable, *argv]
    full_env = clean_env(env)
    if needs_fresh_interpreter(full_env):
        return subprocess.run(
            cmd,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = fork_program(argv, cwd, full_env, out.fileno(), err.fileno())
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            cmd, proc.returncode, out.read().decode(), err.read().decode()
        )


def run_script(
    script: Path, args: list[str], cwd: Path, env: dict[str, str] | None, timeout: int
) -> subprocess.CompletedProcess:
    """``python script *args``, as :func:`run_program` runs it."""
    return run_program([str(script), *args], cwd, env, timeout)


def run_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -c code`` run from the repository in :func:`clean_env`; output captured as text:
    for what only a fresh interpreter shows (what it imports, what it does at exit)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_sweep(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """``python sweep.py *args`` launched from ``cwd``; output captured as text."""
    return run_script(SWEEP, args, cwd, env, timeout)


def start_sweep(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, output: Path | None = None
) -> subprocess.Popen | ForkedProcess:
    """``sweep.py *args`` in the background, in a session of its own, so that
    ``os.killpg(proc.pid, sig)`` reaches the launcher and every job process. Output goes to
    ``output`` (a file) or is discarded. Started by the forkserver, as :func:`run_script`."""
    full_env = clean_env(env)
    with open(output or os.devnull, "w") as out:
        if not needs_fresh_interpreter(full_env):
            fd = out.fileno()
            return fork_program([str(SWEEP), *args], cwd, full_env, fd, fd, new_session=True)
        return subprocess.Popen(
            [sys.executable, str(SWEEP), *args],
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def run_analyze(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """``python analyze.py *args`` run from ``cwd``; output captured as text."""
    return run_script(ANALYZE, args, cwd, env, timeout)


def run_ui_link(store: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """What `make ui` prints before it starts the server (``python -m pnn.analysis.ui``) for
    the SQLite file ``store``; output captured as text."""
    argv = ["-m", "pnn.analysis.ui", "--tracking-uri", f"sqlite:///{store}"]
    return run_program(argv, REPO, None, timeout)


def store(launch_dir: Path) -> MlflowClient:
    """A client of the SQLite store a sweep launched from ``launch_dir`` writes."""
    return client_of(launch_dir / "mlflow.db")


def client_of(path: Path) -> MlflowClient:
    """A client of the SQLite file ``path``."""
    return MlflowClient(f"sqlite:///{path}")


def runs_of(client: MlflowClient, role: str, missing_ok: bool = False) -> list:
    """The runs tagged ``pnn.role=<role>`` ("job" or "sweep") of the "pnn" experiment, which
    must exist unless ``missing_ok`` (then: none)."""
    experiment = client.get_experiment_by_name("pnn")
    if experiment is None and missing_ok:
        return []
    assert experiment is not None
    return client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`pnn.role` = '{role}'"
    )


def epochs_logged(client: MlflowClient, run_id: str, key: str = "test_acc") -> list[int]:
    """Every logged step of a metric, sorted, duplicates included."""
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def checkpoints(launch_dir: Path) -> list[Path]:
    """The job checkpoints a sweep launched from ``launch_dir`` has written so far."""
    return list(launch_dir.glob("checkpoints/*/last.pt"))


def wait_for(
    condition: Callable[[], object],
    proc: subprocess.Popen | None,
    what: str,
    timeout: float = 600,
) -> None:
    """Poll ``condition`` until it holds; fail if the sweep ``proc`` (if any) ends first or time
    runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert proc is None or proc.poll() is None, f"the sweep ended before {what}"
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a sweep started by :func:`start_sweep`: the launcher and every job process."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def write_idx(path: Path, array: Any) -> None:
    """An MNIST IDX file: zero, zero, type 0x08 (uint8), the number of dimensions, then
    big-endian sizes and the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class MlflowServer:
    url: str
    process: ForkedProcess
    log: Path


def _wait_until_up(server: MlflowServer) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = server.log.read_text()[-4000:]
            pytest.fail(f"mlflow server exited {server.process.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    tail = server.log.read_text()[-4000:]
    pytest.fail(f"mlflow server did not answer in {SERVER_START_TIMEOUT_S}s:\n{tail}")


def _stop(process: ForkedProcess) -> None:
    """Stop the server's whole process group: its uvicorn and huey workers too."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 20)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    process.wait(timeout=20)


def launch_mlflow_server(store: Path, log: Path, artifacts: Path | None = None) -> MlflowServer:
    """``mlflow server`` on the SQLite file ``store`` (artifacts beside it, in
    ``<store dir>/server-artifacts``), started and answering; stop it with :func:`stop_server`."""
    port = free_port()
    artifacts = artifacts or store.parent / "server-artifacts"
    cmd = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--backend-store-uri", f"sqlite:///{store}"),
        *("--default-artifact-root", artifacts.as_uri()),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    with log.open("w") as out:
        # A session of its own, so that stopping it also stops its worker processes.
        fd = out.fileno()
        env = clean_env(SERVER_ENV)
        process = fork_program(cmd[1:], store.parent, env, fd, fd, new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", process, log)
    try:
        _wait_until_up(server)
    except BaseException:
        stop_server(server)
        raise
    return server


def stop_server(server: MlflowServer) -> None:
    _stop(server.process)


@pytest.fixture
def mlflow_server(tmp_path: Path, empty_store: Path) -> Iterator[Callable[..., MlflowServer]]:
    """A factory: ``mlflow_server(store)`` starts ``mlflow server`` on the SQLite file ``store``
    (artifacts beside it, in ``<store dir>/server-artifacts``) and waits until it answers. A
    missing ``store`` starts as a copy of ``empty_store``: no test is about the server's own
    migrations."""
    started: list[MlflowServer] = []

    def start(store: Path, artifacts: Path | None = None) -> MlflowServer:
        if not store.exists():
            shutil.copyfile(empty_store, store)
        server = launch_mlflow_server(
            store, tmp_path / f"mlflow-server-{len(started)}.log", artifacts
        )
        started.append(server)
        return server

    yield start
    for server in started:
        stop_server(server)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new, empty MLflow store, made once per worker the way sweep.py makes one
    (:func:`pnn.io.storeguard.prepare`). Copy it; never write to it."""
    from pnn.io import storeguard

    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    storeguard.prepare(f"sqlite:///{path}")
    return path


@pytest.fixture
def existing_store(tmp_path: Path, empty_store: Path) -> Path:
    """``tmp_path/mlflow.db``, already made: what a launch directory holds after its first
    sweep created the store and before it logged anything."""
    path = tmp_path / "mlflow.db"
    shutil.copyfile(empty_store, path)
    return path


@pytest.fixture
def launch_dir(tmp_path: Path, empty_store: Path) -> Callable[[str], Path]:
    """A factory: ``launch_dir(name)`` makes the folder ``tmp_path/name`` with its mlflow.db
    already made, as ``existing_store`` does for ``tmp_path``."""

    def make(name: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        shutil.copyfile(empty_store, path / "mlflow.db")
        return path

    return make
