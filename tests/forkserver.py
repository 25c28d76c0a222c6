"""The tests' forkserver: ``sweep.py``, ``analyze.py`` and ``mlflow server`` forked from a process
that has imported torch, MLflow, Hydra and matplotlib once, instead of a new interpreter paying
for those imports each time (bench/RESULTS.md).

A test harness, not part of pnn-sweep. The server (``python tests/forkserver.py SOCKET MODULE...``)
forks a child per request; the child takes the request's standard streams, working directory,
environment and session and runs the program as ``python argv...`` would (:mod:`runpy`).
:class:`ForkedProcess` answers as :class:`subprocess.Popen` does. What an interpreter reads only
when it starts (``PYTHONPATH``, OpenMP and BLAS variables) is the server's: a request that would
change it is refused (:func:`startup_differences`), and the caller starts a new interpreter.
The server ignores SIGTERM and SIGINT, and exits when its stdin closes or its parent changes.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import runpy
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

# Environment variables read when an interpreter or a native library starts, not later.
STARTUP_ENV = ("PYTHON", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "LD_", "MALLOC")
POLL_S = 0.02
START_TIMEOUT_S = 120.0


def startup_differences(env: Mapping[str, str], server_env: Mapping[str, str]) -> list[str]:
    """The variables of :data:`STARTUP_ENV` on which ``env`` and the server's differ."""
    keys = sorted(set(env) | set(server_env))
    return [k for k in keys if k.startswith(STARTUP_ENV) and env.get(k) != server_env.get(k)]


# ---------------------------------------------------------------------------------------------
# The server (python tests/forkserver.py SOCKET MODULE...)
# ---------------------------------------------------------------------------------------------


def _preload(names: Sequence[str]) -> None:
    for name in names:
        importlib.import_module(name)
    # A fork copies only the calling thread: no Python thread may be running. (numpy's OpenBLAS
    # and pyarrow's jemalloc start native threads of their own and mend them at a fork.)
    if threading.active_count() != 1:
        raise SystemExit(f"forkserver: threads after the imports: {threading.enumerate()}")


def _send(conn: socket.socket, message: dict) -> None:
    try:
        conn.sendall(json.dumps(message).encode() + b"\n")
    except OSError:  # the client is gone; its child still runs to its end
        pass


def _listen(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    return listener


def _serve(listener: socket.socket) -> dict:
    """Answer requests until stdin closes or the parent changes; returns only in a forked
    child, with its request, once its streams, directory and environment are in place."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ)
    clients: dict[int, socket.socket] = {}  # child pid -> the connection that asked for it
    parent = os.getppid()
    while os.getppid() == parent:
        for key, _ in sel.select(timeout=POLL_S):
            if key.fileobj != listener:
                if not os.read(sys.stdin.fileno(), 4096):
                    _leave(listener)  # the launcher is done
                continue
            conn, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            if not message:  # a client that only checked that the server answers
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
    _leave(listener)  # the launcher is gone


def _leave(listener: socket.socket) -> NoReturn:
    """Exit the server, without this process's exit handlers, and remove its folder (also when
    the launcher was killed and could not)."""
    shutil.rmtree(Path(listener.getsockname()).parent, ignore_errors=True)
    os._exit(0)


def _become(request: dict, fds: list[int]) -> None:
    """In the child: what ``subprocess.Popen(argv, cwd=, env=, stdin=, stdout=, stderr=,
    start_new_session=)`` sets up, and a new interpreter's signal handlers."""
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
    tempfile.tempdir = None  # chosen again, from this environment's TMPDIR


def _run(request: dict) -> None:
    """Run the request's program as ``python script args`` or ``python -m module args``."""
    argv = request["argv"]
    if argv[0] == "-m":
        spec = importlib.util.find_spec(argv[1])
        if spec is not None and spec.submodule_search_locations is not None:  # a package
            spec = importlib.util.find_spec(f"{argv[1]}.__main__")
        sys.argv = [spec.origin if spec and spec.origin else argv[1], *argv[2:]]  # as -m has it
        sys.path[0] = os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path[0] = str(Path(argv[0]).resolve().parent)
        runpy.run_path(argv[0], run_name="__main__")


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------


class ForkedProcess:
    """A program the server forked: what the tests use of
    :class:`subprocess.Popen` (``pid``, ``poll``, ``wait``, ``returncode``, ``send_signal``,
    ``kill``). ``returncode`` is Popen's: the exit status, or minus the signal that ended it."""

    def __init__(self, path: str, request: dict, fds: Sequence[int]) -> None:
        self.args = request["argv"]
        self.returncode: int | None = None
        self._lock = threading.Lock()
        self._buffer = b""
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.connect(path)
        socket.send_fds(self._conn, [json.dumps(request).encode()], list(fds))
        self.pid: int = self._message(None)["pid"]

    def _message(self, timeout: float | None) -> dict:
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self._conn], [], [], timeout)
            if not ready:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            chunk = self._conn.recv(4096)
            if not chunk:
                raise OSError(f"the forkserver went away while {self.args} ran")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def _collect(self, timeout: float | None) -> None:
        """Read the wait status (TimeoutExpired if it has not come); call with the lock held."""
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(self._message(timeout)["status"])
            self._conn.close()

    def wait(self, timeout: float | None = None) -> int:
        with self._lock:
            self._collect(timeout)
        return self.returncode

    def poll(self) -> int | None:
        if self.returncode is None and self._lock.acquire(blocking=False):
            try:  # (while another thread waits, it is still running)
                self._collect(0)
            except subprocess.TimeoutExpired:
                pass
            finally:
                self._lock.release()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Signal the process unless it has been reported ended. Never waits, so a signal
        handler may call it while another thread waits for the process."""
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """A forkserver that has imported ``preload``, started with ``env`` (``os.environ`` if
    None); :meth:`start` forks a program from it; :meth:`close` ends it."""

    def __init__(self, preload: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self._setup(os.environ if env is None else env)
        log = self._folder / "server.log"
        with log.open("w") as out:
            self._proc = subprocess.Popen(
                [sys.executable, __file__, self.socket, *preload],
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                why = log.read_text()[-2000:]
                self.close()
                raise OSError(f"the forkserver did not start: {why}")
            time.sleep(POLL_S)

    def _setup(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self._proc: subprocess.Popen | None = None
        self._folder = Path(tempfile.mkdtemp(prefix="pnn-forkserver-"))
        self.socket = str(self._folder / "socket")

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            try:
                conn.connect(self.socket)
            except (FileNotFoundError, ConnectionRefusedError):
                return False
        return True

    def start(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str | os.PathLike[str] | None = None,
        fds: Sequence[int] = (0, 1, 2),
        new_session: bool = False,
    ) -> ForkedProcess:
        """``python *argv`` (a script, or ``-m module``) forked from the server, with ``fds``
        as its stdin, stdout and stderr. ValueError if ``env`` changes what only a new
        interpreter reads."""
        differ = self.startup_differences(env)
        if differ:
            raise ValueError(f"a forked process cannot change {', '.join(differ)}")
        request = {
            "argv": list(argv),
            "cwd": str(cwd or os.getcwd()),
            "env": dict(env),
            "new_session": new_session,
        }
        return ForkedProcess(self.socket, request, fds)

    def startup_differences(self, env: Mapping[str, str]) -> list[str]:
        """What of :data:`STARTUP_ENV` a program with ``env`` would need changed here."""
        return startup_differences(env, self.env)

    def close(self) -> None:
        """End the server (its children run on) and remove its folder."""
        if self._proc is not None:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._folder, ignore_errors=True)


if __name__ == "__main__":
    _preload(sys.argv[2:])
    _run(_serve(_listen(sys.argv[1])))
