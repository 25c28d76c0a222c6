"""The store guard's faults across processes and threads, on a real SQLite store.

A job's StoreError survives pickling into the sweep's process; a store deleted during a write is
reported in one line, not as MLflow's pages of SQL about a 'readonly database'; the heartbeat
stops writing to a deleted file; an inherited pin does not refuse other stores. The server check
sends MLflow's credentials and names a refusal, a server that is not MLflow's and one that does not
answer; the jobs give up on a dead server after a few tries; prepare refuses, before MLflow opens
them, the files MLflow would damage or cannot use, and makes an empty file a store.
"""

from __future__ import annotations

import http.server
import logging
import os
import pickle
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cloudpickle
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pnn.io import storeguard, tracking


@pytest.fixture
def pinned_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, MlflowClient, str]:
    """A new SQLite store pinned as a sweep pins it, and a run in it: (file, client, run id).
    The pin is an environment variable, undone after the test: a later test's sweep would
    inherit it."""
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    storeguard.prepare(uri)
    monkeypatch.setenv(storeguard.ENV_STORE_ID, "")
    storeguard.pin(uri)
    client = storeguard.client(uri)
    return db, client, client.create_run(client.create_experiment("x")).info.run_id


def test_a_store_error_survives_the_trip_between_processes() -> None:
    err = storeguard.StoreError("sqlite:////x/mlflow.db", "the file was deleted", "Restore it")
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        back = loads(dumps(err))
        assert type(back) is storeguard.StoreError
        assert str(back) == str(err)
        assert (back.uri, back.what, back.todo) == (err.uri, err.what, err.todo)


def test_a_store_deleted_during_a_write_is_named_as_deleted(
    pinned_run: tuple[Path, MlflowClient, str], capfd: pytest.CaptureFixture
) -> None:
    db, client, run_id = pinned_run

    def delete_then_write() -> None:  # the deletion lands between the check and the write
        db.unlink()
        client.log_metric(run_id, "test_acc", 1.0, step=1)

    with pytest.raises(storeguard.StoreError) as caught:
        tracking.retry(delete_then_write, timeout=1.0)
    assert f"the SQLite file {db} was deleted after the sweep started" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not db.exists(), "the write created a new, empty store"
    # MLflow logs each SQLite OperationalError with its traceback before raising it; the job
    # says it in one line instead.
    err = capfd.readouterr().err
    assert "Traceback" not in err, err


def test_the_heartbeat_stops_when_the_store_is_deleted(
    pinned_run: tuple[Path, MlflowClient, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pnn.io.liveness import TAG_HEARTBEAT
    from pnn.sweep.lease import Heartbeat

    db, client, run_id = pinned_run
    checks: list[BaseException | None] = []  # each beat's store check: None, or its error
    check_same = storeguard.check_same

    def recorded_check(uri: str | None = None) -> None:
        try:
            check_same(uri)
        except storeguard.StoreError as err:
            checks.append(err)
            raise
        checks.append(None)

    monkeypatch.setattr(storeguard, "check_same", recorded_check)
    beat = Heartbeat(client, run_id, interval=0.02)
    with beat:
        deadline = time.monotonic() + 30
        while TAG_HEARTBEAT not in client.get_run(run_id).data.tags:
            assert time.monotonic() < deadline, "no heartbeat was written"
            time.sleep(0.02)
        db.unlink()
        # The thread ends by itself, its store check refusing the deleted file. The timeout
        # only keeps a fault from hanging the suite; it is no claim about speed.
        beat._thread.join(timeout=60)
        assert not beat._thread.is_alive(), "the heartbeat kept writing after the deletion"
        assert not beat._stop.is_set()  # not asked to stop: the block has not ended yet
    assert checks and isinstance(checks[-1], storeguard.StoreError)
    assert not db.exists(), "a heartbeat created a new, empty store"


def test_an_inherited_pin_never_refuses_another_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pin left in the environment (a sweep started from inside another sweep's job, or a
    test that set it) must not make a sweep on another store refuse its own store."""
    gone = tmp_path / "gone.db"
    monkeypatch.setenv(storeguard.ENV_STORE_ID, f"1:2:{gone}")
    storeguard.check_same("http://127.0.0.1:5000")
    storeguard.check_same(f"sqlite:///{tmp_path / 'other.db'}")
    with pytest.raises(storeguard.StoreError, match="was deleted"):
        storeguard.check_same(f"sqlite:///{gone}")
    ours = tmp_path / "ours.db"
    storeguard.prepare(f"sqlite:///{ours}")
    storeguard.pin(f"sqlite:///{ours}")
    storeguard.check_same()
    storeguard.pin("http://127.0.0.1:5000")
    assert storeguard.ENV_STORE_ID not in os.environ


class _Answer(http.server.BaseHTTPRequestHandler):
    """A server that answers as MLflow's REST API to a request with the token ``secret`` (401
    without it), or, for ``/web``, as a web site that is no MLflow server (404 HTML)."""

    def do_GET(self) -> None:
        if self.server.base == "/web":  # type: ignore[attr-defined]
            code, body, kind = 404, b"<html>Not Found</html>", "text/html"
        elif self.headers.get("Authorization") != "Bearer secret":
            code, body, kind = 401, b"You are not authenticated.", "text/plain"
        else:
            code, body, kind = 200, b'{"experiments": []}', "application/json"
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_answer() -> Iterator[Callable[[str], str]]:
    """A factory: the URI of a local server that answers as :class:`_Answer` (``base``: '' for
    MLflow's API, '/web' for a web site); stopped when the test ends."""
    servers: list[http.server.HTTPServer] = []

    def start(base: str) -> str:
        server = http.server.HTTPServer(("127.0.0.1", 0), _Answer)
        server.base = base  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}{base}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("base", "env", "needle"),
    [
        ("", {"MLFLOW_TRACKING_TOKEN": "secret"}, None),
        ("", {}, "the server refused access. Set MLFLOW_TRACKING_TOKEN"),
        ("", {"MLFLOW_TRACKING_TOKEN": "wrong"}, "the server refused access"),
        ("/web", {}, "does not answer as an MLflow tracking server. Check tracking.uri"),
    ],
    ids=["token", "no-token", "wrong-token", "not-mlflow"],
)
def test_the_server_check_sends_mlflows_credentials_and_names_a_refusal(
    http_answer: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
    base: str,
    env: dict[str, str],
    needle: str | None,
) -> None:
    for key in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    uri = http_answer(base)
    if needle is None:
        storeguard.check_server(uri)
        return
    with pytest.raises(storeguard.StoreError) as caught:
        storeguard.check_server(uri)
    assert str(caught.value).startswith(f"MLflow store {uri}: ")
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_a_server_error_is_not_taken_for_a_server_that_is_not_mlflows() -> None:
    """An MLflow server's own failure (HTTP 500) mid-sweep is told as it is, not as a wrong URI."""
    from mlflow.exceptions import MlflowException

    uri = "http://127.0.0.1:5000"
    text = "API request to endpoint /api/2.0/mlflow/runs/get failed with error code 500 != 200"
    problem = str(storeguard.explain(uri, MlflowException(text)))
    assert "error code 500" in problem and "does not answer as" not in problem, problem


def test_a_server_that_does_not_answer_fails_within_the_timeout() -> None:
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(storeguard.StoreError, match="did not answer in time"):
            storeguard.check_server(uri, timeout=0.5)
        assert time.monotonic() - start < 30  # one try, not MLflow's minutes of retries


def _sqlite(path: Path, *statements: str) -> None:
    db = sqlite3.connect(path)
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()


def _tables(path: Path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return sorted(row[0] for row in db.execute("SELECT name FROM sqlite_master"))
    finally:
        db.close()


def test_prepare_refuses_a_file_mlflow_cannot_use_and_leaves_it_alone(tmp_path: Path) -> None:
    """Each in one line, before MLflow opens the file: MLflow would add its tables to another
    SQLite database, and a half-migrated store needs its leftover tables dropped first."""
    foreign = tmp_path / "foreign.db"
    _sqlite(foreign, "CREATE TABLE samples (x)")
    half = tmp_path / "half.db"
    storeguard.prepare(f"sqlite:///{half}")
    _sqlite(half, "CREATE TABLE _alembic_tmp_runs (x)")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database, " * 256)
    folder = tmp_path / "folder.db"
    folder.mkdir()
    for path, needle in (
        (foreign, f"{foreign} is an SQLite database but not an MLflow store"),
        (
            half,
            f"{half} is half-migrated. Its creation or migration was interrupted. Repair it "
            f"with: sqlite3 {half} 'DROP TABLE _alembic_tmp_runs' && mlflow db upgrade",
        ),
        (junk, "the file is not an SQLite database"),
        (folder, f"{folder} is a folder"),
    ):
        before = _tables(path) if path in (foreign, half) else None
        with pytest.raises(storeguard.StoreError) as caught:
            storeguard.prepare(f"sqlite:///{path}")
        assert needle in str(caught.value) and "\n" not in str(caught.value)
        if before is not None:
            assert _tables(path) == before


def test_a_sweep_on_a_server_gives_up_after_a_few_tries(monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare() sets the MLflow HTTP retries that the sweep's jobs inherit: a server that dies
    during a sweep fails a write after 3 retries, not after MLflow's default 7 (minutes)."""
    for key in storeguard.HTTP_ENV_DEFAULTS:
        monkeypatch.setenv(key, "")  # so that the test's end restores the variable's absence
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")  # count the tries, not wait
    tries = 0

    def hang_up(server: socket.socket) -> None:
        nonlocal tries
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return  # closed: the test is over
            tries += 1
            connection.close()

    with socket.socket() as server:  # a dying server: it closes each connection at once
        server.bind(("127.0.0.1", 0))
        server.listen()
        threading.Thread(target=hang_up, args=(server,), daemon=True).start()
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(storeguard.StoreError, match="cannot reach the tracking server"):
            storeguard.prepare(uri)
        assert tries == 1, "the server check tried more than once"
        with pytest.raises(MlflowException, match="Max retries exceeded"):
            MlflowClient(uri).search_experiments()
        assert tries == 1 + 1 + 3


def test_a_store_replaced_by_a_copy_is_named_as_replaced(
    pinned_run: tuple[Path, MlflowClient, str],
) -> None:
    db, _, _ = pinned_run
    copy = db.with_name("copy.db")
    copy.write_bytes(db.read_bytes())
    copy.replace(db)  # the same name and content, another file: not the sweep's store
    with pytest.raises(storeguard.StoreError, match="was replaced by another file"):
        storeguard.check_same()


def test_prepare_makes_an_empty_file_a_store(tmp_path: Path) -> None:
    """A zero-byte file is no store yet: prepare creates the store in its place, as for a missing
    file (linking the new store into place would fail on it, leaving it empty)."""
    empty = tmp_path / "mlflow.db"
    empty.touch()
    storeguard.prepare(f"sqlite:///{empty}")
    assert "experiments" in _tables(empty)


def test_mlflows_sql_tracebacks_stay_out_of_the_log(tmp_path: Path) -> None:
    """MLflow logs every SQLite error with its traceback before raising it; a client from
    ``storeguard.client`` keeps that record out (the error is retried or told in one line)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storeguard.prepare(uri)
    client = storeguard.client(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        db.execute("DROP TABLE tags")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    sql_logger = logging.getLogger(storeguard.MLFLOW_SQL_LOGGER)
    sql_logger.addHandler(handler)
    try:
        with pytest.raises(Exception) as raised:
            client.set_tag(run_id, "k", "v")
    finally:
        sql_logger.removeHandler(handler)
    assert "no such table" in str(raised.value)
    assert "not (or no longer) an MLflow store" in str(storeguard.explain(uri, raised.value))
    assert not [r for r in records if storeguard.MLFLOW_SQL_ERROR in str(r.msg)]
