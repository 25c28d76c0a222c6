"""``hydra.launcher.cpu_workers=auto`` (the default): as many CPU job slots as the cores this
process may use, divided by the jobs' ``train.threads``; an explicit number still wins.

The cores are narrowed for real with ``os.sched_setaffinity`` (of this thread, restored after),
and the slots are the ones a real :class:`GpuPoolLauncher` hands its job processes.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pnn.config import ConfigError
from pnn.sweep.launcher import GpuPoolLauncher
from pnn.sweep.outcomes import outcome_return
from pnn.sweep.slots import auto_cpu_workers, check_launcher_keys, make_slots

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity"), reason="needs os.sched_setaffinity (Linux)"
)


@pytest.fixture
def one_core() -> Iterator[None]:
    """This thread (and the threads it starts) may run on one core only, then on all again."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def test_auto_divides_the_usable_cores_by_the_threads_of_a_job() -> None:
    cores = len(os.sched_getaffinity(0))
    assert auto_cpu_workers(1) == cores
    assert auto_cpu_workers(2) == max(1, cores // 2)
    assert auto_cpu_workers(cores + 1) == 1  # never fewer than one worker


def test_auto_follows_the_affinity_not_the_machine(one_core: None) -> None:
    assert len(os.sched_getaffinity(0)) == 1
    assert auto_cpu_workers(1) == 1


def test_slots_auto_and_an_explicit_number_wins() -> None:
    cores = len(os.sched_getaffinity(0))
    assert len(make_slots([], 1, "auto")) == cores
    assert len(make_slots([], 1, "auto", threads=cores)) == 1
    assert len(make_slots([], 1, 3, threads=cores)) == 3  # explicit: threads do not matter
    # GPUs visible: one slot per GPU (and jobs_per_gpu), whatever cpu_workers says.
    assert len(make_slots(["0"], 2, "auto")) == 2


def test_auto_is_accepted_and_other_words_are_refused() -> None:
    check_launcher_keys([], 1, "auto", 1)
    with pytest.raises(ConfigError, match=r"hydra\.launcher\.cpu_workers must be .* or auto"):
        check_launcher_keys([], 1, "many", 1)


class _Recording(GpuPoolLauncher):
    """The real launcher's loop; each job process a real process that only sleeps, noting its
    slot."""

    def _start(self, context, jobs, slot, workdir):  # noqa: ANN001, ANN202 - the parent's
        self.slots_used.add(slot["PNN_SLOT"])
        proc = multiprocessing.get_context("fork").Process(target=time.sleep, args=(0.2,))
        proc.start()
        return proc

    def _collect(self, proc, jobs, workdir):  # noqa: ANN001, ANN202 - the parent's
        return [outcome_return(overrides, "killed", "recorded only") for overrides, _ in jobs]


@pytest.mark.parametrize(
    ("sweep_threads", "job_overrides", "expected_threads"),
    [
        (1, [["train.seed=1"], ["train.seed=2"]], 1),
        (2, [["train.seed=1"], ["train.seed=2"]], 2),
        # A grid over train.threads: the most threads any job asks for.
        (1, [["train.threads=1"], ["train.threads=2"]], 2),
    ],
)
def test_the_launcher_starts_auto_many_slots(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sweep_threads: int,
    job_overrides: list[list[str]],
    expected_threads: int,
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    expected = max(1, len(os.sched_getaffinity(0)) // expected_threads)
    launcher = _Recording(gpus=[], cpu_workers="auto")
    launcher.config = OmegaConf.create({"train": {"threads": sweep_threads}})
    launcher.hydra_context = object()
    launcher.slots_used = set()
    launcher.launch(job_overrides * expected, initial_job_idx=0)
    assert len(launcher.slots_used) == expected
