"""gpu_pool as a Hydra launcher plugin for any app: registered and discovered as plugins are,
light to discover, and running a tiny Hydra app of the test's own (written in the test's
temporary folder, with its own config; nothing of pnn-sweep's ``conf/``) the Hydra way.

Hydra's own launcher suites run on it in test_hydra_suites.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import clean_env, wait_for

from pnn.sweep.slots import visible_gpus

APP = """
import os
import signal
import time
from pathlib import Path

import hydra

from helper import record  # beside app.py, not where the app is launched from


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    start = time.time()
    running = Path(cfg.records) / "running"
    marker = running / str(cfg.x)
    marker.touch()
    # Stay until another job is seen running, or long enough to show that none runs beside
    # this one: the overlap the test measures is then the launcher's, not the machine's speed.
    while True:
        waited = time.time() - start
        if waited > 5 or (waited > 1 and len(list(running.iterdir())) >= 2):
            break
        time.sleep(0.05)
    time.sleep(cfg.hold_s)
    marker.unlink()
    record(cfg, start, time.time())
    if cfg.x == cfg.fail_x:
        raise ValueError(f"x={cfg.x} is not accepted")
    if cfg.x == cfg.kill_x:
        os.kill(os.getpid(), signal.SIGKILL)
    if cfg.x == cfg.term_x:
        os.kill(os.getpid(), signal.SIGTERM)
    return f"{cfg.x}:{os.getpid()}"


if __name__ == "__main__":
    main()
"""

HELPER = """
import json
import os
from pathlib import Path


def record(cfg, start, end):
    out = {"x": cfg.x, "pid": os.getpid(), "start": start, "end": end}
    for key in ("PNN_SLOT", "CUDA_VISIBLE_DEVICES"):
        out[key] = os.environ.get(key)
    (Path(cfg.records) / f"job{cfg.x}.json").write_text(json.dumps(out))
"""

CONFIG = """
x: 0
records: ???
fail_x: null
kill_x: null
term_x: null
hold_s: 0
"""


def write_app(tmp_path: Path, *args: str, gpus_env: str | None = "") -> dict:
    """The app, its config and a folder to launch it from, in ``tmp_path``; the arguments of
    ``subprocess`` that run ``python app.py -m hydra/launcher=gpu_pool *args`` there."""
    app = tmp_path / "app"
    (app / "conf").mkdir(parents=True)
    (app / "app.py").write_text(textwrap.dedent(APP))
    (app / "helper.py").write_text(textwrap.dedent(HELPER))
    (app / "conf" / "config.yaml").write_text(CONFIG)
    (tmp_path / "records" / "running").mkdir(parents=True)
    launch = tmp_path / "launch"
    launch.mkdir()
    # CUDA_VISIBLE_DEVICES="": a machine without GPUs, whatever this one has.
    env = clean_env({} if gpus_env is None else {"CUDA_VISIBLE_DEVICES": gpus_env})
    records = f"records={tmp_path / 'records'}"
    cmd = [sys.executable, str(app / "app.py"), "-m", "hydra/launcher=gpu_pool", records, *args]
    return {"args": cmd, "cwd": launch, "env": env}


def records_of(tmp_path: Path) -> list[dict]:
    """What each job recorded, sorted by x."""
    found = (json.loads(p.read_text()) for p in (tmp_path / "records").glob("job*.json"))
    return sorted(found, key=lambda r: r["x"])


def run_app(tmp_path: Path, *args: str, gpus_env: str | None = "") -> tuple[int, str, list]:
    """Run the app to its end, launched from a folder other than the app's: its exit status,
    output and the jobs' records."""
    app = write_app(tmp_path, *args, gpus_env=gpus_env)
    proc = subprocess.run(**app, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr, records_of(tmp_path)


def most_at_once(jobs: list[dict]) -> int:
    """The most jobs whose [start, end] intervals overlap at one instant."""
    edges = sorted([(j["start"], 1) for j in jobs] + [(j["end"], -1) for j in jobs])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def test_plugin_discovered_once_with_its_config_registered() -> None:
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher
    from hydra.plugins.sweeper import Sweeper

    launchers = [
        c for c in Plugins.instance().discover(Launcher) if c.__name__ == "GpuPoolLauncher"
    ]
    sweepers = [c for c in Plugins.instance().discover(Sweeper) if c.__name__ == "PNNSweeper"]
    assert [f"{c.__module__}.{c.__name__}" for c in launchers + sweepers] == [
        "hydra_plugins.pnn_plugins.GpuPoolLauncher",
        "hydra_plugins.pnn_plugins.PNNSweeper",
    ]
    entry = ConfigStore.instance().load("hydra/launcher/gpu_pool.yaml")
    assert entry.provider == "pnn-sweep"
    assert entry.node._target_ == "hydra_plugins.pnn_plugins.GpuPoolLauncher"
    assert dict(entry.node) == {
        "_target_": "hydra_plugins.pnn_plugins.GpuPoolLauncher",
        "gpus": None,
        "jobs_per_gpu": 1,
        "cpu_workers": "auto",
        "seeds_per_process": 1,
    }


def test_discovering_the_plugin_imports_neither_torch_nor_mlflow() -> None:
    """Hydra imports every installed plugin in every app, used or not."""
    code = "import sys, hydra_plugins.pnn_plugins; print({'torch', 'mlflow'} & set(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "set()"


@pytest.mark.parametrize(
    "overrides, pnn_jobs", [([], True), (["hydra/sweeper=basic"], False)], ids=["pnn", "basic"]
)
def test_pnn_parts_apply_to_the_jobs_of_pnn_sweeps_only(overrides: list[str], pnn_jobs: bool):
    """sweep.py's own config (conf/) launches pnn-sweep's jobs; with another sweeper the jobs
    report the Hydra way: a stopped job is FAILED, and the sweeper raises its error."""
    from hydra import compose, initialize_config_dir
    from hydra.core.utils import JobStatus

    from pnn.config import CONF_DIR, register_schema
    from pnn.sweep.outcomes import JobInterrupted, is_pnn_sweep, stopped_return

    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    assert is_pnn_sweep(cfg) is pnn_jobs
    ret = stopped_return(["x=1"], "by SIGTERM", pnn_jobs=is_pnn_sweep(cfg))
    if pnn_jobs:
        assert ret.status == JobStatus.COMPLETED
        assert ret.return_value == {"status": "killed", "name": "x=1", "reason": "by SIGTERM"}
    else:
        assert ret.status == JobStatus.FAILED
        with pytest.raises(JobInterrupted, match=r"job interrupted \(by SIGTERM\)"):
            ret.return_value  # noqa: B018 - reading it raises, as Hydra's sweepers do


def test_jobs_run_under_a_tmpdir_too_long_for_a_socket(tmp_path: Path) -> None:
    """multiprocessing puts the forkserver's socket in the temp folder, and a socket path has at
    most 107 bytes: under a long TMPDIR (a cluster job's, say) no job could start."""
    tmpdir = tmp_path / ("t" * 90)
    tmpdir.mkdir()
    app = write_app(tmp_path, "hydra.launcher.cpu_workers=1", "x=1,2")
    app["env"]["TMPDIR"] = str(tmpdir)
    proc = subprocess.run(**app, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [j["x"] for j in records_of(tmp_path)] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize(
    "workers, slot_key, slot_values",
    [
        (["hydra.launcher.cpu_workers=2"], "PNN_SLOT", {"cpu0", "cpu1"}),
        pytest.param(
            ["hydra.launcher.gpus=[0,1]"],
            "CUDA_VISIBLE_DEVICES",
            {"0", "1"},
            marks=pytest.mark.skipif(
                len(visible_gpus()) < 2,
                reason="needs two visible CUDA devices",
            ),
        ),
    ],
    ids=["cpu_workers", "gpus"],
)
def test_any_hydra_app_runs_its_jobs_two_at_a_time(
    tmp_path: Path, workers: list[str], slot_key: str, slot_values: set[str]
) -> None:
    code, out, jobs = run_app(tmp_path, *workers, "x=1,2,3")
    assert code == 0, out
    assert [j["x"] for j in jobs] == [1, 2, 3], out
    assert len({j["pid"] for j in jobs}) == 3, "each job in a process of its own"
    assert most_at_once(jobs) == 2, jobs
    assert {j[slot_key] for j in jobs} <= slot_values, jobs
    for a in jobs:  # jobs that ran at the same time held different slots
        for b in jobs:
            if a["x"] < b["x"] and a["start"] < b["end"] and b["start"] < a["end"]:
                assert a[slot_key] != b[slot_key], jobs
    if slot_key == "PNN_SLOT":
        assert all(j["CUDA_VISIBLE_DEVICES"] == "" for j in jobs), "no GPU for a CPU worker"
    # The launcher collected each job's return value from that job's process.
    returned = dict(re.findall(r"completed, returned '(\d):(\d+)'", out))
    assert returned == {str(j["x"]): str(j["pid"]) for j in jobs}, out
    assert "[sweep]" not in out and not list(tmp_path.rglob("mlflow.db")), "nothing of pnn-sweep"


@pytest.mark.skipif(bool(visible_gpus()), reason="a GPU is visible here")
def test_a_gpu_slot_with_no_visible_gpu_is_refused_before_any_job(tmp_path: Path) -> None:
    code, out, jobs = run_app(tmp_path, "hydra.launcher.gpus=[0,1]", "x=1,2")
    assert code != 0 and not jobs, out
    assert "hydra.launcher.gpus=[0,1] but the CUDA devices visible here are: none" in out, out


@pytest.mark.slow
def test_failures_signals_and_dead_jobs_reported_the_hydra_way(tmp_path: Path) -> None:
    args = ["hydra.launcher.cpu_workers=2", "fail_x=2", "kill_x=3", "term_x=4", "x=1,2,3,4"]
    code, out, jobs = run_app(tmp_path, *args)
    assert code != 0, out
    assert [j["x"] for j in jobs] == [1, 2, 3, 4], "one job's failure stops no other"
    # Hydra's sweeper raises the first failed job's own error; the launcher logs each.
    assert "ValueError: x=2 is not accepted" in out, out
    assert re.search(
        r"job #2 FAILED \(RuntimeError: job process exited with code -9 \(SIGKILL\)", out
    ), out
    assert "job #3 FAILED (JobInterrupted: job interrupted (by SIGTERM))" in out, out
    assert "job #0 completed, returned '1:" in out, out


@pytest.mark.slow
def test_ctrl_c_ends_the_app_and_every_job_process(tmp_path: Path) -> None:
    """Ctrl-C reaches the app and its job processes (one process group): the app stops as
    Hydra apps do, with KeyboardInterrupt, and no job process outlives it."""
    app = write_app(tmp_path, "hydra.launcher.cpu_workers=2", "hold_s=600", "x=1,2,3")
    out = tmp_path / "out.txt"
    with open(out, "w") as sink:
        proc = subprocess.Popen(
            **app,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_terminal_signals,
        )
    try:
        running = tmp_path / "records" / "running"
        wait_for(lambda: len(list(running.iterdir())) == 2, proc, "two jobs running", 120)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) != 0
        deadline = time.monotonic() + 30
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_alive(proc.pid), "a job process outlived the app"
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = out.read_text()
    assert "KeyboardInterrupt" in text, text
    assert "job #2 starting" not in text, "no job starts after Ctrl-C"
    assert "FileNotFoundError" not in text, text


def _terminal_signals() -> None:
    """The app starts as from a shell: SIGINT and SIGTERM neither ignored nor blocked. An
    ignored SIGINT survives exec, and Python then keeps ignoring it, so a pytest-xdist worker
    that left SIGINT ignored or blocked would make the app ignore Ctrl-C."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
