"""A job's identity and where its things live, below both :mod:`pnn.sweep.job` and
:mod:`pnn.sweep.lease`, which both need it and may not import each other."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger("pnn")


@dataclass
class Job:
    """One job's identity and where its things live: its store, its hash, its checkpoint."""

    cfg: DictConfig
    name: str
    client: Any
    experiment_id: str
    chash: str
    ckpt_root: Path  # train.checkpoint_dir: nothing outside it is ever removed
    ckpt_dir: Path
    owner: str  # this job's lease on its run

    @property
    def ckpt_path(self) -> Path:
        return self.ckpt_dir / "last.pt"

    def skip(self, reason: str) -> dict[str, Any]:
        log.info(f"[{self.name}] skipped: {reason}")
        return self.outcome("skipped", reason)

    def outcome(self, status: str, reason: str | None = None, **extra: Any) -> dict[str, Any]:
        """What the job reports to the sweeper (:mod:`pnn.sweep.outcomes`)."""
        out: dict[str, Any] = {"status": status, "name": self.name}
        if reason is not None:
            out["reason"] = reason
        return {**out, **extra}
