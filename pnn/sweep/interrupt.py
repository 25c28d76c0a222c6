"""SIGTERM and SIGINT as a flag: the handler only records the first signal (:func:`received`);
nothing is raised into the code it lands in (an MLflow or SQLAlchemy call, say). The engine
checks it at each step, the job between its store calls and the launcher before each start; the
run ends KILLED and the process exits with 128 + the signal. The sweep forwards the first signal
to its job processes (:data:`job_pids`); a second kills them, or ends the sweep if none runs. A
job ignores later signals: a Ctrl-C reaches it from the terminal and from the sweep."""

from __future__ import annotations

import contextlib
import os
import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_state: dict = {"signum": None, "role": "sweep"}
job_pids: set[int] = set()  # the sweep's running job processes: signals are forwarded to them


def received() -> int | None:
    """The first SIGTERM or SIGINT this process received, or None."""
    return _state["signum"]


def signal_name() -> str | None:
    signum = _state["signum"]
    return None if signum is None else signal.Signals(signum).name


def _handler(signum: int, frame: object) -> None:
    first = _state["signum"] is None
    if first:
        _state["signum"] = signum
    elif _state["role"] == "job":
        return
    pids = list(job_pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum if first else signal.SIGKILL)
    if not first and not pids:  # a second signal with no job process to stop: end now
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def install(role: str = "sweep") -> None:
    """Record SIGTERM and SIGINT in this process from now on."""
    _state.update(signum=None, role=role)
    job_pids.clear()
    for sig in SIGNALS:
        signal.signal(sig, _handler)
