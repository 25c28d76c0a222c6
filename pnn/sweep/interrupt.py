"""SIGTERM and SIGINT: end a sweep cleanly instead of with tracebacks and RUNNING runs.

The sweep's main process (:func:`install_parent`) does not die on the first signal while its
job processes run: it forwards the signal to them, lets each mark its run KILLED, then prints
the summary, ends the parent run and exits with 128 + the signal number. A second signal kills
the job processes outright. Before any job process runs, the signal raises :class:`Interrupted`.

A job process (:func:`install_child`) turns the first signal into :class:`Interrupted`, a
``KeyboardInterrupt``, which the job's ``except KeyboardInterrupt`` turns into a KILLED run;
later signals are ignored so that this clean-up is not itself interrupted (a Ctrl-C reaches
the job both from the terminal and forwarded by the sweep).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.signal_name}")


_lock = threading.Lock()
_state: dict = {"signum": None, "forward": False, "procs": set()}


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
        raise Interrupted(signum)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum) if first else proc.kill()


def install_parent() -> None:
    _state["signum"] = None
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


def run_process(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd)``, with the process registered to receive forwarded signals."""
    with _lock:
        if _state["signum"] is not None:
            raise Interrupted(_state["signum"])
        proc = subprocess.Popen(cmd, env=env)
        _state["procs"].add(proc)
    try:
        proc.wait()
    finally:
        with _lock:
            _state["procs"].discard(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode)


def _child_handler(signum: int, frame: object) -> None:
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


def install_child() -> None:
    for sig in SIGNALS:
        signal.signal(sig, _child_handler)
