"""A look inside the processes a test starts (``sweep.py`` and its job processes), without a
hook in the code under test: a ``sitecustomize`` module on ``PYTHONPATH``, which every Python
process of the tree runs at start-up, records what the test asks into a JSON-lines file.

    env = probe.install(tmp_path / "probe", probe.THREADS_AT_EXIT)
    run_sweep([...], tmp_path, env=env)
    probe.records(tmp_path / "probe")  # [{"pid": ..., "argv0": ..., "threads": 1}, ...]
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV_OUT = "PNN_TEST_PROBE_OUT"

_WRITE = """
import json as _json
import os as _os
import sys as _sys


def _probe_write(**record):
    record.update(pid=_os.getpid(), argv0=_sys.argv[0] if _sys.argv else "")
    with open(_os.environ["PNN_TEST_PROBE_OUT"], "a") as _out:
        _out.write(_json.dumps(record) + "\\n")
"""

# Each process that imported torch, at its exit: the intra-op thread count it was using, and
# how it exited: "atexit" as an interpreter does, or "os._exit" as a multiprocessing child does.
THREADS_AT_EXIT = """
import atexit as _atexit


def _probe_threads(via):
    torch = _sys.modules.get("torch")
    if torch is not None:
        _probe_write(threads=torch.get_num_threads(), via=via)


_real_exit = _os._exit


def _probe_os_exit(code):
    _probe_threads("os._exit")
    _real_exit(code)


_os._exit = _probe_os_exit
_atexit.register(_probe_threads, "atexit")
"""

# Every TCP connection attempt of every process, with its outcome.
CONNECTIONS = """
import socket as _socket

_connect = _socket.socket.connect


def _probe_connect(self, address):
    try:
        _connect(self, address)
    except OSError as err:
        _probe_write(address=list(address)[:2], error=type(err).__name__)
        raise
    _probe_write(address=list(address)[:2], error=None)


_socket.socket.connect = _probe_connect
"""


# A SIGTERM that lands inside an MLflow call: once, in the process that runs the job, right after
# the SQLite store executed the Nth INSERT into the metrics table (N from PNN_TEST_SIGNAL_AT:
# 1 is the parameter counts logged as the run is created, 2 the first epoch's metrics). The
# handler then runs in the middle of SQLAlchemy's code, as a signal from outside sometimes does.
SIGTERM_IN_METRICS_INSERT = """
import signal as _signal

from sqlalchemy import event as _event
from sqlalchemy.engine import Engine as _Engine

_inserts = []


def _probe_after_execute(conn, cursor, statement, parameters, context, executemany):
    if not statement.lstrip().upper().startswith("INSERT INTO METRICS"):
        return
    _inserts.append(statement)
    if len(_inserts) == int(_os.environ["PNN_TEST_SIGNAL_AT"]):
        _probe_write(signalled=len(_inserts))
        _os.kill(_os.getpid(), _signal.SIGTERM)


_event.listen(_Engine, "after_cursor_execute", _probe_after_execute)
"""


def install(directory: Path, code: str) -> dict[str, str]:
    """Write the probe into ``directory``; the environment (for ``conftest.run_sweep``'s
    ``env``) that makes the subprocess tree run it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(_WRITE + code)
    path = [str(directory), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {
        "PYTHONPATH": os.pathsep.join(p for p in path if p),
        ENV_OUT: str(directory / "records.jsonl"),
    }


def records(directory: Path) -> list[dict]:
    """What the probed processes recorded, in order."""
    out = directory / "records.jsonl"
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines()]
