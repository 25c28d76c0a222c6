"""The store guard's faults across processes and threads, on a real SQLite store.

A job's StoreError survives pickling into the sweep's process; a store deleted during a write is
reported in one line, not as MLflow's pages of SQL about a 'readonly database'; the heartbeat
stops writing to a deleted file; an inherited pin does not refuse other stores.
"""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import cloudpickle
import pytest
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
