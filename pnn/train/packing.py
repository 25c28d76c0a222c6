"""Several seeds of one experiment in one job process (``hydra.launcher.seeds_per_process``).

At the README's batch sizes a training step leaves the GPU mostly idle, and separate processes
on one GPU only time-slice it. Inside one process, several seeds' CUDA-graph replays can run on
separate streams at once. So the gpu_pool launcher groups the jobs of a sweep that differ only
in ``train.seed`` (:func:`group_seeds`) and runs each group in one process (:func:`run_packed`).

Each seed runs the unchanged single-job code (``pnn.sweep.job.run``: skip, lock, resume, MLflow run,
checkpoint) in a thread of its own, but only one thread runs at a time. A turn passes round
the seeds in a fixed order: a thread holds it from its start, hands it on after every training
step (:func:`step_boundary`, called by the engine; a no-op outside a packed process) and leaves
the rotation when its job ends, however it ends. So the steps of the seeds interleave in
lockstep, a seed that fails or finishes early simply drops out, and nothing a job does runs
concurrently with another job's Python code.

What a job reads from process-wide state is swapped with the turn (:class:`_Globals`): every
random stream (torch CPU and CUDA, ``random``, NumPy), Hydra's config singleton (the job reads
its overrides from it), the root logger's handlers (each job logs to its own file) and the
working directory. So on the CPU every seed computes bitwise what it computes alone. The rest
of the process-wide switches (thread count, ``pnn.model.layers``' fast-path flags, cuDNN benchmark)
are set from config keys the seeds share, so they are equal for all of them.

On a GPU each thread launches on its own CUDA stream (the current stream is thread-local in
PyTorch) and the step loop does not wait for the host, so while one thread queues its next
replay the others' replays still run. Each CUDA graph keeps its own memory pool (the default):
shared pools crashed in a first probe.
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
