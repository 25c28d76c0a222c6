"""Start ``sweep.py`` and ``analyze.py`` for the tests without paying their imports each time.

Each of those programs spends about 4 to 5 s of CPU importing torch, torch._dynamo, MLflow's
SQL store, Hydra and matplotlib before it does anything, and the suite starts about a hundred of
them. This server (one per xdist worker, started by ``conftest``) imports those third-party
packages once, then forks a child per request. The child takes the request's standard streams,
working directory and environment, becomes a session leader if asked, and runs the script as
``__main__`` with :func:`runpy.run_path`; when the script returns or raises, the interpreter
exits as ``python script`` would (atexit handlers, the exit status, a signal's death).

It imports nothing of ``pnn``: the program imports its own modules, in its own order, in the
child. The server tells the client the child's pid at once and its wait status when it ends
(it reaps it at once, so that a finished program never lingers as a zombie whose pid looks
alive). What a fresh interpreter reads only at its start (``PYTHON*``, the OpenMP and MKL
variables, ``LD_*``) cannot change here: ``conftest`` starts a fresh process when a request
would change those.

    python tests/forkserver.py SOCKET
"""

from __future__ import annotations

import json
import os
import runpy
import selectors
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

# What every program of the suite imports before its first line of work (sweep.py, analyze.py).
PRELOAD = (
    "torch",
    "torch._dynamo",
    "torch.optim",
    "mlflow",
    "mlflow.tracking",
    "mlflow.store.tracking.sqlalchemy_store",
    "sqlalchemy",
    "hydra",
    "hydra.main",
    "omegaconf",
    "cloudpickle",
    "matplotlib",
    "matplotlib.figure",
    "matplotlib.font_manager",
    "matplotlib.backends.backend_agg",
)
# Environment variables read when an interpreter or a native library starts, not later.
STARTUP_ENV = ("PYTHON", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "LD_", "MALLOC")


def preload() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    # A fork copies only the calling thread: no Python thread may run here. (numpy's OpenBLAS
    # and pyarrow's jemalloc start native threads of their own, and mend them at a fork.)
    if threading.active_count() != 1:
        raise SystemExit(f"forkserver: threads after the imports: {threading.enumerate()}")


def _send(conn: socket.socket, message: dict) -> None:
    try:
        conn.sendall(json.dumps(message).encode() + b"\n")
    except OSError:  # the client is gone; the child still runs to its end
        pass


def serve(path: str) -> dict:
    """Answer requests until the client (the xdist worker) goes; returns only in a forked
    child, with the child's request, its streams, directory and environment already in place."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    clients: dict[int, socket.socket] = {}  # child pid -> the connection that asked for it
    parent = os.getppid()
    while os.getppid() == parent:  # until the worker that started it is gone
        if sel.select(timeout=0.02):
            conn, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            if not message:  # a client that only checked that this server answers
                conn.close()
                continue
            request = json.loads(message)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                sel.close()
                listener.close()
                conn.close()
                for other in clients.values():
                    other.close()
                _become(request, fds)
                return request
            for fd in fds:
                os.close(fd)
            clients[pid] = conn
            _send(conn, {"pid": pid})
        while clients:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = clients.pop(pid, None)
            if conn is not None:
                _send(conn, {"status": status})
                conn.close()
    raise SystemExit(0)


def _become(request: dict, fds: list[int]) -> None:
    """In the child: what ``subprocess.Popen(argv, cwd=, env=, stdin=, stdout=, stderr=,
    start_new_session=)`` would have set up, and the signal dispositions of a new interpreter."""
    if request["new_session"]:
        os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    tempfile.tempdir = None  # chosen again from this environment's TMPDIR


def run(request: dict) -> None:
    """Run the request's script as ``python script args`` would."""
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    sys.path[0] = str(Path(script).resolve().parent)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    preload()
    run(serve(sys.argv[1]))
