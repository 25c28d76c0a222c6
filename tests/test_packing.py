"""Several seeds in one job process (hydra.launcher.seeds_per_process): the turn-taking
scheduler on its own, real jobs packed in-process, and real sweeps (SQLite, subprocesses)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    TINY,
    checkpoints,
    epochs_logged,
    kill_group,
    run_sweep,
    runs_of,
    start_sweep,
    wait_for,
)
from conftest import store as launch_store

from pnn.io.tracking import EPOCH_METRICS
from pnn.train.packing import group_seeds, run_packed, step_boundary

# Timings differ between any two runs; every other per-epoch metric must match exactly.
TIMING = {"epoch_time_s", "train_img_per_s"}
COMPARED = [k for k in EPOCH_METRICS if k not in TIMING]
E4 = ["experiment=e4_conv1x1_no_noise", *TINY]


# ---------------------------------------------------------------------------------------------
# The scheduler and the grouping (fast)
# ---------------------------------------------------------------------------------------------


def test_seeds_take_turns_step_by_step_and_leave_when_done_or_failed() -> None:
    trace: list[tuple[str, int]] = []
    running: list[str] = []

    def job(spec: tuple[str, int, int | None]) -> str:
        name, steps, fail_at = spec
        for step in range(1, steps + 1):
            running.append(name)
            assert len(running) == 1, f"{running} ran at once"  # one job at a time
            trace.append((name, step))
            running.remove(name)
            if step == fail_at:
                raise FloatingPointError(f"{name} failed at step {step}")
            step_boundary()
        return name

    specs = [("a", 3, None), ("b", 5, 2), ("c", 4, None)]
    with pytest.raises(FloatingPointError, match="b failed at step 2"):
        run_packed(job, specs)
    # Round robin in lockstep; b leaves after its second step, a after its third.
    assert trace == [
        ("a", 1), ("b", 1), ("c", 1),
        ("a", 2), ("b", 2), ("c", 2),
        ("a", 3), ("c", 3),
        ("c", 4),
    ]  # fmt: skip
    assert not [t for t in threading.enumerate() if t.name.startswith("pnn-seed-")]


def test_each_packed_job_keeps_its_own_random_streams() -> None:
    import random

    import torch

    def draws(seed: int) -> list[float]:
        torch.manual_seed(seed)
        random.seed(seed)
        out = []
        for _ in range(4):
            out += [torch.rand(()).item(), random.random()]
            step_boundary()
        return out

    alone = [draws(seed) for seed in (1, 2, 3)]
    assert run_packed(draws, [1, 2, 3]) == alone
    assert alone[0] != alone[1]


def test_group_seeds_packs_jobs_that_differ_only_in_the_seed() -> None:
    jobs = [
        ["experiment=e1", "train.seed=1"],
        ["experiment=e1", "train.seed=2"],
        ["experiment=e7", "train.seed=1"],
        ["experiment=e1", "train.seed=3"],
        ["experiment=e7", "train.seed=2"],
        ["experiment=e1", "++train.seed=4"],
        ["experiment=e1", "train.seed=5", "optimizer.lr=0.1"],
    ]
    assert group_seeds(jobs, 3) == [[0, 1, 3], [2, 4], [5], [6]]
    assert group_seeds(jobs, 1) == [[i] for i in range(len(jobs))]
    with pytest.raises(ValueError, match="hydra.launcher.seeds_per_process must be >= 1"):
        group_seeds(jobs, 0)


# ---------------------------------------------------------------------------------------------
# Real jobs, packed in this process: a NaN in one seed, seeds ending at different epochs
# ---------------------------------------------------------------------------------------------


def _job_config(tmp: Path, overrides: list[str]):
    from pnn.config import load_config

    return load_config(
        [
            *E4,
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
            f"train.checkpoint_dir={tmp / 'checkpoints'}",
            "tracking.log_checkpoint=false",
            *overrides,
        ]
    )


def _checkpoint_history(tmp: Path, name: str) -> list[dict[str, float]]:
    import torch

    (path,) = (tmp / "checkpoints").glob(f"{name}-*/last.pt")
    history = torch.load(path, weights_only=True)["history"]
    return [{k: epoch[k] for k in COMPARED} for epoch in history]


@pytest.mark.slow
def test_a_failing_seed_leaves_the_others_training_to_their_own_end(
    launch_dir: Callable[[str], Path],
) -> None:
    from pnn.sweep.job import run

    seeds = {
        "e4_conv1x1_no_noise-seed1": ["train.seed=1", "train.epochs=2"],
        "e4_conv1x1_no_noise-seed2": ["train.seed=2", "train.epochs=2", "optimizer.lr=1e30"],
        "e4_conv1x1_no_noise-seed3": ["train.seed=3", "train.epochs=3"],
    }
    packed, alone = launch_dir("packed"), launch_dir("alone")
    outcomes = run_packed(run, [_job_config(packed, o) for o in seeds.values()])
    assert [o["status"] for o in outcomes] == ["finished", "failed", "finished"]
    assert outcomes[1]["reason"].startswith("loss became")
    for name, overrides in seeds.items():
        if "optimizer.lr=1e30" in overrides:
            continue
        assert run(_job_config(alone, overrides))["status"] == "finished"
        want = _checkpoint_history(alone, name)
        assert len(want) == int(overrides[1].split("=")[1])
        assert _checkpoint_history(packed, name) == want, name
    client = launch_store(packed)
    runs = client.search_runs([client.get_experiment_by_name("pnn").experiment_id])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [
        ("e4_conv1x1_no_noise-seed1", "FINISHED"),
        ("e4_conv1x1_no_noise-seed2", "FAILED"),
        ("e4_conv1x1_no_noise-seed3", "FINISHED"),
    ]


# ---------------------------------------------------------------------------------------------
# Real sweeps
# ---------------------------------------------------------------------------------------------


def _jobs(store: Path) -> dict[str, object]:
    return {r.info.run_name: r for r in runs_of(launch_store(store), "job")}


def _histories(store: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    client = launch_store(store)
    return {
        name: {
            key: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, key))
            for key in COMPARED
        }
        for name, r in _jobs(store).items()
    }


@pytest.mark.slow
def test_packed_seeds_compute_what_they_compute_alone(launch_dir: Callable[[str], Path]) -> None:
    args = [*E4, "train.epochs=2", "train.seed=1,2,3", "tracking.log_checkpoint=false"]
    packed, alone = launch_dir("packed"), launch_dir("alone")
    proc = run_sweep([*args, "hydra.launcher.seeds_per_process=3"], packed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 finished, 0 skipped, 0 failed" in proc.stdout
    assert "launching 3 job(s) in 1 process(es)" in proc.stderr + proc.stdout
    proc = run_sweep(args, alone)
    assert proc.returncode == 0, proc.stderr[-3000:]

    names = [f"e4_conv1x1_no_noise-seed{s}" for s in (1, 2, 3)]
    for store in (packed, alone):
        assert sorted(_jobs(store)) == names
        assert all(r.info.status == "FINISHED" for r in _jobs(store).values())
    want = _histories(alone)
    got = _histories(packed)
    for name in names:
        for key in COMPARED:
            assert [step for step, _ in got[name][key]] == [1, 2], (name, key)
            assert got[name][key] == want[name][key], (name, key)
    assert want[names[0]] != want[names[1]]  # the seeds differ: the comparison has teeth
    # One process for the packed sweep, one per job without packing.
    groups = {r.data.tags["pnn.process_group"] for r in _jobs(packed).values()}
    assert len(groups) == 1
    assert len({r.data.tags["pnn.process_group"] for r in _jobs(alone).values()}) == 3

    # Packed, finished seeds are skipped on a rerun, as unpacked ones are.
    again = run_sweep([*args, "hydra.launcher.seeds_per_process=3"], packed)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 finished, 3 skipped, 0 failed" in again.stdout


@pytest.mark.slow
@pytest.mark.usefixtures("existing_store")
def test_a_killed_packed_sweep_resumes_every_seed(tmp_path: Path) -> None:
    epochs = 4
    args = [
        *E4,
        "dataset.train_size=400",
        "train.max_steps_per_epoch=null",
        f"train.epochs={epochs}",
        "train.seed=1,2,3",
        "hydra.launcher.seeds_per_process=3",
    ]
    proc = start_sweep(args, tmp_path)
    # The seeds step in lockstep, so all three checkpoints land within one turn of each other;
    # then every seed is in its second epoch when the whole sweep is killed.
    try:
        wait_for(
            lambda: len(checkpoints(tmp_path)) == 3, proc, "the checkpoints to kill at", timeout=300
        )
    finally:
        kill_group(proc)
    before = {name: r.info.run_id for name, r in _jobs(tmp_path).items()}
    assert len(before) == 3
    assert all(r.info.status == "RUNNING" for r in _jobs(tmp_path).values())

    rerun = run_sweep(args, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "3 finished, 0 skipped, 0 failed" in rerun.stdout, rerun.stdout[-3000:]
    assert (rerun.stdout + rerun.stderr).count("resuming MLflow run") == 3
    after = _jobs(tmp_path)
    assert {name: r.info.run_id for name, r in after.items()} == before  # the same runs
    client = launch_store(tmp_path)
    for run in after.values():
        assert run.info.status == "FINISHED"
        for key in EPOCH_METRICS:
            assert epochs_logged(client, run.info.run_id, key) == list(range(1, epochs + 1)), (
                run.info.run_name,
                key,
            )
