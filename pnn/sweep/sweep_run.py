"""The sweep's parent run, leased like a job's (:mod:`pnn.sweep.lease`): a sweep killed outright
leaves a stale lease, and the next sweep of the experiment marks its parent run KILLED."""

from __future__ import annotations

import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pnn.io import storeguard, tracking
from pnn.io.liveness import TAG_OWNER, lease_status
from pnn.sweep.lease import Heartbeat, lease_tags, mark_killed, owner_id

log = logging.getLogger("pnn")


def start_sweep(cfg: DictConfig, sweep_dir: Path, command: str, n_jobs: int) -> Heartbeat:
    """Check (or create) the store, create the parent run leased by this process, close the
    experiment's stale sweeps; the parent's heartbeat. StoreError if the store cannot be used."""
    uri = tracking.resolve_uri(cfg, Path.cwd())
    storeguard.prepare(uri)
    storeguard.pin(uri)  # from here on, this is the store (and not one this process inherited)
    try:
        client = storeguard.client(uri)
        experiment_id = tracking.get_experiment_id(client, cfg.tracking.experiment_name, uri)
        lease = lease_tags(owner_id())
        run_id = tracking.create_sweep_run(client, experiment_id, sweep_dir, command, n_jobs, lease)
    except Exception as err:
        problem = storeguard.as_store_error(uri, err)
        if problem is None:
            raise
        raise problem from None
    try:
        close_stale_sweeps(client, experiment_id, os.environ[tracking.ENV_SWEEP])
    except Exception as err:
        problem = storeguard.as_store_error(uri, err)
        if problem is None:
            raise
        # Only housekeeping failed: the jobs still run, and report a lost store themselves.
        log.warning(f"[sweep] could not check for stale sweeps: {problem}")
    return Heartbeat(client, run_id)


def close_stale_sweeps(client: Any, experiment_id: str, closer: str) -> list[str]:
    """Mark KILLED the RUNNING parent runs of ``experiment_id`` whose lease is stale; their ids."""
    running = tracking.retry(
        lambda: client.search_runs([experiment_id], filter_string=tracking.RUNNING_SWEEPS)
    )
    closed = []
    for run in running:
        live, why = lease_status(run)
        if live:
            continue
        now = datetime.now().astimezone().isoformat(timespec="seconds")
        reason = f"stale sweep: {why}; marked KILLED at {now} by sweep {closer}"
        # Only under the same lease: never a sweep that came back.
        if mark_killed(client, run.info.run_id, reason, owner=run.data.tags.get(TAG_OWNER)):
            closed.append(run.info.run_id)
            log.warning(
                f"[sweep] marked KILLED the parent run {run.info.run_id} "
                f"({run.info.run_name}) of a sweep that is gone: {why}"
            )
    return closed


def end_sweep(status: str, tags: dict[str, str]) -> str | None:
    """End the parent run with ``status`` and ``tags``; a one-line error instead of raising when
    the store cannot be written. Each job ends its own run."""
    run_id, uri = os.environ.get(tracking.ENV_PARENT), os.environ.get(tracking.ENV_URI)
    if not (run_id and uri):
        return None
    try:
        client = storeguard.client(uri)
        tracking.set_tags(client, run_id, tags)
        tracking.retry(lambda: client.set_terminated(run_id, status))
    except Exception as err:
        problem = storeguard.as_store_error(uri, err)
        if problem is None:
            raise
        return f"the sweep's parent run {run_id} could not be ended: {problem}"
    return None
