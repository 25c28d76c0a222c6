"""The end of a sweep's parent run, and of the job runs it leaves RUNNING after a signal.

Which of those runs are still this sweep's to end is the claim's rule (:mod:`pnn.claim`), so
this lives above the claim, not in the MLflow writers (:mod:`pnn.tracking`).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from pnn import storeguard, tracking
from pnn.claim import TAG_OWNER, claim_status, parse_owner


def end_sweep(status: str, signal_name: str | None = None) -> str | None:
    """End the parent run with ``status``; after a signal, also mark KILLED the job runs this
    sweep was training that are still RUNNING (:func:`_left_running`). Returns a one-line error
    instead of raising when the store cannot be written."""
    run_id, uri = os.environ.get(tracking.ENV_PARENT), os.environ.get(tracking.ENV_URI)
    if not (run_id and uri):
        return None
    try:
        client = storeguard.client(uri)
        if signal_name:
            tag = {"pnn.killed_by": signal_name}
            for child in _left_running(client, run_id):
                tracking.set_tags(client, child.info.run_id, tag)
                tracking.retry(lambda c=child: client.set_terminated(c.info.run_id, "KILLED"))
            tracking.set_tags(client, run_id, tag)
        tracking.retry(lambda: client.set_terminated(run_id, status))
    except Exception as err:
        problem = storeguard.as_store_error(uri, err)
        if problem is None:
            raise
        return f"the sweep's parent run {run_id} could not be ended: {problem}"
    return None


def _left_running(client: Any, parent_id: str) -> list:
    """The RUNNING job runs this sweep worked on (created or adopted: TAG_SWEEPS), except those
    another process has claimed since and still trains: those are not ours to end. One trained
    in this very process is ours, though its claim looks live."""
    sweep = os.environ.get(tracking.ENV_SWEEP)
    if sweep:
        mine = f"tags.`{tracking.TAG_SWEEPS}` LIKE '%{sweep}%'"
    else:
        mine = f"tags.`mlflow.parentRunId` = '{parent_id}'"
    experiment_id = tracking.retry(lambda: client.get_run(parent_id)).info.experiment_id
    runs = tracking.retry(
        lambda: client.search_runs(
            [experiment_id], filter_string=f"attributes.status = 'RUNNING' and {mine}"
        )
    )
    here = (socket.gethostname(), os.getpid())
    return [
        r
        for r in runs
        if parse_owner(r.data.tags.get(TAG_OWNER, "")) == here or not claim_status(r)[0]
    ]
