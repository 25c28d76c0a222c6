"""Whether a leased MLflow run (a job's, :mod:`pnn.sweep.lease`, or a sweep's parent) is live:
``TAG_OWNER`` names its process (``<host>/<pid>/<token>``), ``TAG_HEARTBEAT`` holds its last
beat. A RUNNING run is live while its heartbeat is younger than ``STALE_S``, unless its owner is
on this host and gone. Nothing here writes."""

from __future__ import annotations

import socket
import time
from typing import Any

import psutil

TAG_OWNER, TAG_HEARTBEAT = "pnn.owner", "pnn.heartbeat"
HEARTBEAT_S = 30.0
STALE_S = 180.0


def parse_owner(owner: str) -> tuple[str, int | None]:
    """(host, pid) of an owner id; pid None if it cannot be read."""
    host, _, rest = owner.partition("/")
    pid = rest.partition("/")[0]
    return host, int(pid) if pid.isdigit() else None


def lease_status(run: Any, now: float | None = None) -> tuple[bool, str]:
    """Whether a RUNNING run is live, i.e. some process is training it, and why."""
    tags = run.data.tags
    owner = tags.get(TAG_OWNER, "")
    try:
        age = (now or time.time()) - float(tags[TAG_HEARTBEAT])
    except (KeyError, ValueError):
        return False, "it has no heartbeat"
    host, pid = parse_owner(owner)
    if host == socket.gethostname() and pid is not None and not _pid_alive(pid):
        return False, f"its process {pid} on this host is gone"
    if age > STALE_S:
        return False, f"its heartbeat is {age:.0f}s old (stale after {STALE_S:.0f}s)"
    return True, f"owner {owner}, heartbeat {max(age, 0):.0f}s ago (stale after {STALE_S:.0f}s)"


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (exited, not collected: a killed sweep's jobs) does not."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # someone else's process
        return True
