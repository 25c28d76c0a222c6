"""The tracking store before and during a sweep: there, usable, reachable and the same one; and
what MLflow, SQLAlchemy or SQLite raised, in one line. Imports no torch or MLflow at import time."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

ENV_STORE_ID = "PNN_STORE_ID"
# An unreachable server fails in seconds, not after MLflow's minutes of HTTP retries.
REACH_TIMEOUT_S = 5.0
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class StoreError(RuntimeError):
    """The tracking store cannot be used: the URI, what failed, what to do."""

    def __init__(self, uri: str, what: str, todo: str) -> None:
        super().__init__(f"MLflow store {uri}: {what}. {todo}")
        self.uri, self.what, self.todo = uri, what, todo

    def __reduce__(self) -> tuple[type[StoreError], tuple[str, str, str]]:
        # It is unpickled in the sweep's process, where StoreError(message) would fail.
        return type(self), (self.uri, self.what, self.todo)


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:`` URI, else None."""
    if not uri.startswith("sqlite:"):
        return None
    path = uri.split("://", 1)[-1].split("?", 1)[0]
    path = path[1:] if path.startswith("/") else path
    return Path(unquote(path)) if path and path != ":memory:" else None


def check_sqlite_file(uri: str, path: Path) -> None:
    """An existing SQLite file, before MLflow opens it: MLflow would add its tables to any other
    database, and cannot use a half-migrated store. SQLite's errors go through :func:`explain`."""
    if path.is_dir():  # SQLite would call it a disk I/O error
        raise StoreError(uri, f"{path} is a folder, not an SQLite file", "Name a .db file")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
            tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master")]
    except sqlite3.Error as err:
        raise explain(uri, err) from None
    leftovers = "; ".join(
        f"DROP TABLE {t}" for t in sorted(tables) if t.startswith("_alembic_tmp_")
    )
    if leftovers:
        raise StoreError(
            uri,
            f"{path} is half-migrated",
            f"Its creation or migration was interrupted. Repair it with: sqlite3 {path} "
            f"'{leftovers}' && mlflow db upgrade sqlite:///{path} (or move the file aside to start "
            "a new store)",
        )
    if tables and "experiments" not in tables:
        raise StoreError(
            uri, f"{path} is an SQLite database but not an MLflow store", "Name another file"
        )


def _create_sqlite(uri: str, path: Path) -> None:
    """Create the store in a private file, then link it into place: a crash leaves no half-created
    store, and of two sweeps creating it at once, one wins and both use it."""
    from mlflow.tracking import MlflowClient

    scratch = path.with_name(f".{path.name}.creating-{os.getpid()}-{os.urandom(3).hex()}")
    try:
        MlflowClient(f"sqlite:///{scratch}").search_experiments(max_results=1)
        try:
            os.link(scratch, path)
        except FileExistsError:
            pass  # another sweep created it first; use theirs
    except Exception as err:
        raise explain(uri, err) from None
    finally:
        for leftover in scratch.parent.glob(f"{scratch.name}*"):  # and its -journal
            leftover.unlink(missing_ok=True)


def check_server(uri: str, timeout: float = REACH_TIMEOUT_S) -> None:
    """Is an MLflow server answering at ``uri``? One call through MLflow's REST client, with its
    credentials (MLFLOW_TRACKING_TOKEN, or _USERNAME and _PASSWORD), no retries, a short timeout."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request_safe

    try:
        http_request_safe(
            get_default_host_creds(uri),
            "/api/2.0/mlflow/experiments/search",
            "GET",
            params={"max_results": 1},
            max_retries=0,
            timeout=timeout,
        )
    except MlflowException as err:
        raise explain(uri, err) from None


def prepare(uri: str, create: bool = True) -> None:
    """Refuse a store MLflow cannot use; create a missing SQLite store (if ``create``)."""
    scheme = urlparse(uri).scheme
    if scheme in ("file", "") or len(scheme) == 1:  # a file: URI, a bare path, a Windows drive
        raise StoreError(
            uri,
            "MLflow 3 no longer supports file: (folder) stores",
            "Use an SQLite file, e.g. tracking.uri=sqlite:///mlflow.db, or a server, "
            "tracking.uri=http://HOST:PORT",
        )
    if uri.startswith(("http://", "https://")):
        for key, value in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)  # the job processes inherit them
        check_server(uri)
        return
    path = sqlite_path(uri)
    if path is None:
        return  # another database or scheme: MLflow's own errors, through explain()
    if not path.parent.is_dir():
        raise StoreError(
            uri, f"the folder {path.parent} does not exist", "Create it, or fix tracking.uri"
        )
    if path.exists() and path.stat().st_size > 0:
        check_sqlite_file(uri, path)
    elif create:
        path.unlink(missing_ok=True)  # an empty file is no store yet
        _create_sqlite(uri, path)
    else:
        raise StoreError(
            uri,
            f"the MLflow store {path} is empty" if path.exists() else f"no MLflow store at {path}",
            "Run sweep.py first, or pass --tracking-uri / set MLFLOW_TRACKING_URI",
        )


def pin(uri: str) -> None:
    """Pin this sweep's SQLite file for its jobs; any other store clears an inherited pin."""
    path = sqlite_path(uri)
    if path is not None and path.exists():
        st = path.stat()
        os.environ[ENV_STORE_ID] = f"{st.st_dev}:{st.st_ino}:{path}"
    else:
        os.environ.pop(ENV_STORE_ID, None)


def check_same(uri: str | None = None) -> None:
    """Raise if the pinned SQLite file is gone or was replaced."""
    pinned = os.environ.get(ENV_STORE_ID)
    if not pinned:
        return
    dev, ino, name = pinned.split(":", 2)
    path = Path(name)
    if uri is not None and sqlite_path(uri) != path:
        return  # this call is about another store (another file, or a server)
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    if st is None or (str(st.st_dev), str(st.st_ino)) != (dev, ino):
        what = "was deleted" if st is None else "was replaced by another file"
        raise StoreError(
            uri or f"sqlite:///{path}",
            f"the SQLite file {path} {what} after the sweep started",
            "Nothing more is written, so that no run lands in a new empty store; restore the "
            "file, or rerun the sweep to start a new store",
        )


# MLflow logs each SQLite error with its traceback before raising it; ours are retried or
# explained in one line, so that record is only noise.
MLFLOW_SQL_LOGGER = "mlflow.store.db.utils"
MLFLOW_SQL_ERROR = "SQLAlchemy database error"


def _drop_mlflow_sql_traceback(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(MLFLOW_SQL_ERROR)


def client(uri: str) -> MlflowClient:
    """``MlflowClient(uri)``, after :func:`check_same`: opening a store creates an empty SQLite file
    where a deleted one was. MLflow's SQL tracebacks stay out of the log."""
    from mlflow.tracking import MlflowClient

    check_same(uri)
    sql_logger = logging.getLogger(MLFLOW_SQL_LOGGER)
    if _drop_mlflow_sql_traceback not in sql_logger.filters:
        sql_logger.addFilter(_drop_mlflow_sql_traceback)
    return MlflowClient(uri)


_KNOWN = (
    (("readonly database", "read-only"), "the database is read-only",
     "Make the file and its folder writable, or point tracking.uri at another store"),
    (("database or disk is full", "no space left", "disk i/o error", "file too large"),
     "the disk is full, or the file cannot grow",
     "Free space where the store is, or move the store"),
    (("file is not a database",), "the file is not an SQLite database",
     "Point tracking.uri at the sweep's mlflow.db"),
    (("unable to open database file",), "the database file cannot be opened",
     "Check that its folder exists and is writable"),
    (("no such table",), "the file is not (or no longer) an MLflow store",
     "Point tracking.uri at the sweep's mlflow.db"),
    (("database is locked",), "the database stayed locked for minutes",
     "Too many writers on one SQLite file: use an mlflow server (README)"),
    (("connection refused",), "cannot reach the tracking server (connection refused)",
     "Start it (mlflow server --host HOST --port PORT), or fix tracking.uri"),
    (("timed out", "timeout exception"), "the tracking server did not answer in time",
     "Start it, or fix tracking.uri"),
    (("max retries exceeded", "failed to establish"), "cannot reach the tracking server",
     "Start it, or fix tracking.uri"),
    (("error code 401", "error code 403", "unauthenticated", "permission_denied"),
     "the server refused access",
     "Set MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and _PASSWORD"),
    (("error code 404", "not in a valid json format"),
     "the server does not answer as an MLflow tracking server", "Check tracking.uri"),
)  # fmt: skip


def as_store_error(uri: str, err: BaseException) -> StoreError | None:
    """``err`` in one line if the store (MLflow, SQLAlchemy, SQLite, HTTP) raised it, else None:
    our own code's error is a bug, which the caller raises."""
    library = (type(err).__module__ or "").split(".")[0]
    store = ("mlflow", "sqlalchemy", "sqlite3", "requests", "urllib3")
    return explain(uri, err) if isinstance(err, StoreError) or library in store else None


def explain(uri: str, err: BaseException) -> StoreError:
    if isinstance(err, StoreError):
        return err
    text = str(err)
    lower = text.lower()
    for needles, what, todo in _KNOWN:
        if any(n in lower for n in needles):
            return StoreError(uri, what, todo)
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return StoreError(uri, f"{type(err).__name__}: {first[:300]}", "See the MLflow docs")
