"""SIGTERM and SIGINT: end a sweep cleanly instead of with tracebacks and RUNNING runs.

The sweep's main process (:func:`install_parent`) does not die on the first signal while its
job processes run: it forwards the signal to them, lets each mark its run KILLED, then prints
the summary, ends the parent run and exits with 128 + the signal number. A second signal kills
the job processes outright. Before any job process runs, the signal raises :class:`Interrupted`.

A job process (:func:`install_child`) turns the first signal into :class:`Interrupted`, a
``KeyboardInterrupt``, which the job's ``except KeyboardInterrupt`` turns into a KILLED run;
later signals are ignored so that this clean-up is not itself interrupted (a Ctrl-C reaches
the job both from the terminal and forwarded by the sweep).

Inside :func:`shielded` (a job's calls into MLflow) the first signal is held instead of raised:
an exception raised in the middle of a SQLAlchemy query leaves its connection half-closed (it
logs a traceback), and one raised while the job's run is being created leaves that run RUNNING
with no one to end it. The job raises a held signal itself (:func:`raise_held`) once it is
between such calls, where its ``except KeyboardInterrupt`` marks the run KILLED.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.signal_name}")


_lock = threading.Lock()
_state: dict = {"signum": None, "forward": False, "procs": set(), "shield": 0, "held": False}


def received() -> int | None:
    """The first signal the sweep received, or None."""
    return _state["signum"]


def signal_name() -> str | None:
    signum = _state["signum"]
    return None if signum is None else signal.Signals(signum).name


def _parent_handler(signum: int, frame: object) -> None:
    with _lock:
        first = _state["signum"] is None
        if first:
            _state["signum"] = signum
        procs = list(_state["procs"])
    if first and not _state["forward"]:
        _raise_unless_shielded(signum)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum) if first else proc.kill()


def _raise_unless_shielded(signum: int) -> None:
    if _state["shield"]:
        _state["held"] = True
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """While the main thread is inside, a signal that would raise :class:`Interrupted` is held
    instead; :func:`raise_held` raises it later. In any other thread this does nothing: Python
    runs signal handlers, and so raises, in the main thread only (packed seeds train in threads
    of their own, while the main thread waits for them)."""
    main = threading.current_thread() is threading.main_thread()
    _state["shield"] += main
    try:
        yield
    finally:
        _state["shield"] -= main


def raise_held() -> None:
    """Raise :class:`Interrupted` now if a signal was held by :func:`shielded`."""
    if _state["held"] and not _state["shield"]:
        _state["held"] = False
        raise Interrupted(_state["signum"])


def install_parent() -> None:
    _state["signum"] = None
    _state["held"] = False
    for sig in SIGNALS:
        signal.signal(sig, _parent_handler)


@contextlib.contextmanager
def forwarding() -> Iterator[None]:
    """While inside: a signal is forwarded to the registered job processes, not raised."""
    _state["forward"] = True
    try:
        yield
    finally:
        _state["forward"] = False


class Process(Protocol):
    """What :func:`run_process` needs of a started process (:class:`subprocess.Popen` has it)."""

    returncode: int | None

    def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


def run_process(start: Callable[[], Process]) -> Process:
    """Start a process with ``start()`` and wait for it, registered meanwhile to receive
    forwarded signals; :class:`Interrupted` instead if the sweep has already been signalled."""
    with _lock:
        if _state["signum"] is not None:
            raise Interrupted(_state["signum"])
        proc = start()
        _state["procs"].add(proc)
    try:
        proc.wait()
    finally:
        with _lock:
            _state["procs"].discard(proc)
    if proc.returncode in STOPPED_CODES:
        _settle()
    return proc


# How a job process ends when a signal stopped it: killed by it, or exiting 128 + its number
# once it has reported (``pnn.sweep.launch_child``).
STOPPED_CODES = frozenset(code for sig in SIGNALS for code in (-sig, 128 + sig))
SETTLE_S = 2.0


def _settle(timeout: float = SETTLE_S) -> None:
    """A job process was stopped by a signal. Ctrl-C reaches the whole process group, and the
    job may see it before this process's handler runs: Python runs handlers in the main thread
    only, which may not get the GIL before the calling worker thread starts the next job. Sleep
    (releasing the GIL) until the handler has run, or ``timeout`` if the signal was the job's
    alone (someone stopped that one job)."""
    deadline = time.monotonic() + timeout
    while _state["signum"] is None and time.monotonic() < deadline:
        time.sleep(0.02)


def _child_handler(signum: int, frame: object) -> None:
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _state["signum"] = signum  # launch_child exits with 128 + signum once the job has reported
    _raise_unless_shielded(signum)


def install_child() -> None:
    for sig in SIGNALS:
        signal.signal(sig, _child_handler)
