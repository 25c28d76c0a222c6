"""Several seeds of one experiment in one job process (``hydra.launcher.seeds_per_process``).

At small batch sizes a step leaves the GPU mostly idle; in one process several seeds' CUDA-graph
replays can overlap on separate streams. The launcher groups jobs that differ only in
``train.seed`` (:func:`group_seeds`) and runs each group here (:func:`run_packed`).

Each seed runs the unchanged ``pnn.sweep.job.run`` in a thread of its own, one thread at a time:
a turn passes round the seeds after every training step (:func:`step_boundary`, called by the
engine) and a seed that ends leaves the rotation. What a job reads from process-wide state
(random streams, Hydra's config singleton, log handlers, working directory) is swapped with the
turn (:class:`_Globals`), so on the CPU each seed computes bitwise what it computes alone. Each
thread launches on its own CUDA stream; each CUDA graph keeps its own memory pool (the default).
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_local = threading.local()


def step_boundary() -> None:
    """Called after every training step: hand the turn to the next packed seed, if any."""
    turn = getattr(_local, "turn", None)
    if turn is not None:
        turn()


def group_seeds(job_overrides: Sequence[Sequence[str]], per_process: int) -> list[list[int]]:
    """Indices of the jobs to run together: jobs whose overrides are equal except for
    ``train.seed``, at most ``per_process`` at a time, in the sweep's order."""
    if per_process < 1:
        raise ValueError(f"hydra.launcher.seeds_per_process must be >= 1 (got {per_process})")
    groups: dict[tuple[str, ...], list[int]] = {}
    for index, overrides in enumerate(job_overrides):
        key = tuple(o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "train.seed")
        groups.setdefault(key, []).append(index)
    chunks = [
        members[start : start + per_process]
        for members in groups.values()
        for start in range(0, len(members), per_process)
    ]
    return sorted(chunks, key=lambda chunk: chunk[0])


def _hydra_config() -> Any:
    """Hydra's config singleton, or None where Hydra is not installed (the benchmark's image)."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:
        return None
    return HydraConfig.instance()


class _Globals:
    """The process-wide state one packed job owns while it holds the turn."""

    def __init__(self) -> None:
        self.saved: dict[str, Any] | None = None

    def save(self) -> None:
        hydra = _hydra_config()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "python": random.getstate(),
            "numpy": None,
            "hydra": hydra.cfg if hydra is not None else None,
            "log_handlers": list(logging.getLogger().handlers),
            "cwd": os.getcwd(),
        }
        try:
            import numpy as np

            state["numpy"] = np.random.get_state()
        except ImportError:
            pass
        self.saved = state

    def restore(self) -> None:
        """Put back what :meth:`save` kept; nothing before the job's first hand-over."""
        state = self.saved
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None:
            torch.cuda.set_rng_state_all(state["cuda"])
        random.setstate(state["python"])
        if state["numpy"] is not None:
            import numpy as np

            np.random.set_state(state["numpy"])
        hydra = _hydra_config()
        if hydra is not None:
            hydra.cfg = state["hydra"]
        logging.getLogger().handlers = list(state["log_handlers"])
        if os.getcwd() != state["cwd"]:
            os.chdir(state["cwd"])


class Rotation:
    """A turn that passes round members 0..n-1 in order; one semaphore per member.

    Only the member holding the turn changes the ring, so it needs no lock of its own.
    """

    def __init__(self, size: int) -> None:
        self.ring = list(range(size))
        self.wake = [threading.Semaphore(0) for _ in range(size)]
        self.globals = [_Globals() for _ in range(size)]

    def begin(self) -> None:
        """Give the turn to the first member (called once, by the thread that starts them)."""
        self.wake[self.ring[0]].release()

    def wait(self, member: int) -> None:
        self.wake[member].acquire()
        self.globals[member].restore()

    def pass_on(self, member: int) -> None:
        after = self._next(member)
        if after == member:
            return
        self.globals[member].save()
        self.wake[after].release()
        self.wait(member)

    def leave(self, member: int) -> None:
        after = self._next(member)
        self.ring.remove(member)
        if after != member:
            self.wake[after].release()

    def _next(self, member: int) -> int:
        return self.ring[(self.ring.index(member) + 1) % len(self.ring)]


def run_packed(run_one: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[run_one(item) for item in items]``, the calls interleaved at training-step boundaries.

    Each call runs in a thread of its own that holds the turn while it runs (see the module
    docstring); on a GPU each thread launches on a CUDA stream of its own. If a call raises,
    the others still run to their end, then the first exception is raised.
    """
    rotation = Rotation(len(items))
    results: list[Any] = [None] * len(items)
    errors: list[BaseException] = []
    on_gpu = torch.cuda.is_available()

    def body(member: int) -> None:
        rotation.wait(member)
        _local.turn = lambda: rotation.pass_on(member)
        try:
            if on_gpu:
                with torch.cuda.stream(torch.cuda.Stream()):
                    results[member] = run_one(items[member])
            else:
                results[member] = run_one(items[member])
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the others
            errors.append(err)
        finally:
            _local.turn = None
            rotation.leave(member)

    threads = [
        threading.Thread(target=body, args=(m,), name=f"pnn-seed-{m}", daemon=True)
        for m in range(len(items))
    ]
    for thread in threads:
        thread.start()
    rotation.begin()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
