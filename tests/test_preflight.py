"""Checks made before the parent run exists: launcher keys, memory, the tracking server,
the batch size; and a launcher thread that fails never loses its job."""

from __future__ import annotations

from pathlib import Path

import probe
import pytest
from conftest import REPO, TINY, run_python, run_sweep

from pnn.config import load_config, warnings_for
from pnn.sweep.slots import visible_gpus
from pnn.train.resources import GIB, estimate

README = [f"experiment={p.stem}" for p in sorted((REPO / "conf/experiment").glob("e*.yaml"))]


@pytest.mark.parametrize("experiment", README)
def test_readme_experiments_fit_a_16_gib_gpu(experiment: str) -> None:
    est = estimate(load_config([experiment]))
    assert 0 < est.total < 16 * GIB, est.describe()


@pytest.mark.parametrize(
    "overrides",
    [["experiment=e7_pnn_shared_masks", "masks.nmasks=100000"], ["model.nfilters=100000"]],
)
def test_impossible_sizes_exceed_any_machine(overrides: list[str]) -> None:
    assert estimate(load_config(overrides)).total > 1024 * GIB


def test_batch_larger_than_test_set_warns() -> None:
    (warning,) = warnings_for(load_config([*TINY, "train.batch_size=64"]))
    assert "train.batch_size=64 exceeds the 40 test images" in warning
    assert warnings_for(load_config([*TINY, "train.batch_size=16"])) == []


def test_launcher_keys() -> None:
    from pnn.config import ConfigError
    from pnn.sweep.slots import check_launcher_keys

    for gpus, per_gpu, workers, per_process, key in (
        (None, 0, 1, 1, "jobs_per_gpu"),
        (None, 1, 0, 1, "cpu_workers"),
        (None, 1, 1, 0, "seeds_per_process"),
        ([-1], 1, 1, 1, "gpus"),
        (["x"], 1, 1, 1, "gpus"),
    ):
        with pytest.raises(ConfigError, match=f"hydra.launcher.{key} must be"):
            check_launcher_keys(gpus, per_gpu, workers, per_process)
    check_launcher_keys([], 1, 1, 1)  # no GPU: CPU workers


def test_a_failing_launcher_thread_gives_a_failed_job(tmp_path: Path, monkeypatch) -> None:
    from hydra.core.utils import JobStatus

    from pnn.sweep.launcher import GpuPoolLauncher
    from pnn.sweep.sweeper import outcome_of, print_summary

    class Broken(GpuPoolLauncher):
        def _start(self, context, jobs, slot, workdir):  # fails before any process starts
            raise OSError(28, "No space left on device")

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    launcher = Broken(gpus=None, cpu_workers=2)
    launcher.config, launcher.hydra_context = object(), object()
    jobs = [["train.seed=1"], ["train.seed=2"], ["train.seed=3"]]
    returns = launcher.launch(jobs, initial_job_idx=0)
    assert [r.status for r in returns] == [JobStatus.FAILED] * 3
    outcomes = [outcome_of(r, o) for r, o in zip(returns, jobs, strict=True)]
    assert print_summary(outcomes, 0.0) == 3
    assert "No space left on device" in outcomes[0]["reason"]
    assert not list(tmp_path.glob("pnn-launch-*"))


def _refused(proc, tmp_path: Path, *needles: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in out, out
    assert not (tmp_path / "mlflow.db").exists(), "nothing may be logged"


@pytest.mark.slow
@pytest.mark.skipif(bool(visible_gpus()), reason="a GPU is visible here")
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["hydra.launcher.gpus=[0]"], "hydra.launcher.gpus=[0] but the CUDA devices visible here"),
        (["train.device=cuda"], "train.device=cuda but the jobs run on CPU slots"),
    ],
    ids=["gpus", "device"],
)
def test_a_gpu_slot_needs_a_gpu(tmp_path: Path, args: list[str], needle: str) -> None:
    proc = run_sweep(["experiment=e4_conv1x1_no_noise", *TINY, *args], tmp_path)
    _refused(proc, tmp_path, needle)
    assert len((proc.stdout + proc.stderr).strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["hydra.launcher.cpu_workers=0"], "hydra.launcher.cpu_workers must be >= 1"),
        (["hydra.sweeper.max_batch_size=0"], "hydra.sweeper.max_batch_size must be null"),
        (
            ["hydra/launcher=slurm", "hydra.launcher.timeout_min=0"],
            "hydra.launcher.timeout_min must be a whole number >= 1 (got 0)",
        ),
        (
            ["hydra/launcher=slurm_local", "hydra.launcher.cpus_per_task=0"],
            "hydra.launcher.cpus_per_task must be a whole number >= 1 (got 0)",
        ),
    ],
    ids=["gpu_pool", "sweeper", "slurm", "slurm_local"],
)
def test_bad_launcher_key_refused_before_the_parent_run(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    proc = run_sweep(["experiment=e4_conv1x1_no_noise", *TINY, *args], tmp_path)
    _refused(proc, tmp_path, needle)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, key",
    [
        (["experiment=e7_pnn_shared_masks", "masks.nmasks=100000"], "masks.nmasks (100000)"),
        (["experiment=e4_conv1x1_no_noise", "model.nfilters=100000"], "model.nfilters (100000)"),
    ],
)
def test_impossible_sizes_refused_before_any_run(tmp_path: Path, overrides, key) -> None:
    proc = run_sweep([*overrides, "profile=smoke"], tmp_path)
    _refused(proc, tmp_path, key, "GiB")


@pytest.mark.slow
def test_unreachable_server_fails_fast(tmp_path: Path) -> None:
    """One refused connection, not MLflow's minutes of retries: every connection attempt of
    the sweep's processes is recorded (tests/probe.py), not timed."""
    env = probe.install(tmp_path / "probe", probe.CONNECTIONS)
    proc = run_sweep(
        ["experiment=e4_conv1x1_no_noise", *TINY, "tracking.uri=http://127.0.0.1:1"],
        tmp_path,
        env=env,
    )
    _refused(proc, tmp_path, "http://127.0.0.1:1", "connection refused")
    assert len((proc.stdout + proc.stderr).strip().splitlines()) <= 10
    attempts = [r for r in probe.records(tmp_path / "probe") if r["address"][1] == 1]
    assert [(r["address"], r["error"]) for r in attempts] == [
        (["127.0.0.1", 1], "ConnectionRefusedError")
    ]


def test_the_shape_check_initialises_no_meta_weights() -> None:
    """The sweep's shape check builds each model on the meta device without the reference's
    init: initialising meta tensors imports torch._dynamo (seconds in every dry run, which has
    no other use for it), and gives them no values anyway. The control: with the init."""
    code = (
        "import sys, torch\n"
        "from pnn.config import load_config\n"
        "from pnn.model.models import build_model\n"
        "from pnn.sweep.sweeper import check_model_builds\n"
        "cfg = load_config(['experiment=e7_pnn_shared_masks'])\n"
        "check_model_builds(cfg)\n"
        "print('torch._dynamo' in sys.modules)\n"
        "with torch.device('meta'):\n"
        "    build_model(cfg)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "True"]
