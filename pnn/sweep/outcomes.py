"""What a job reports back, for the launcher and the sweeper (below both). A pnn-sweep job returns
an outcome dict (``status``: finished, skipped, failed, killed; on SLURM also lost or submitted);
any other Hydra task a ``JobReturn``, COMPLETED or FAILED, as Hydra's sweepers expect."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import DictConfig, OmegaConf


def is_pnn_sweep(config: DictConfig) -> bool:
    """Whether ``config``'s jobs are pnn-sweep's: launched by its sweeper, which reads outcomes."""
    target = OmegaConf.select(config, "hydra.sweeper._target_", default=None)
    return str(target).rsplit(".", 1)[-1] == "PNNSweeper"


def outcome_of(ret: JobReturn, overrides: Sequence[str]) -> dict[str, Any]:
    """What a pnn-sweep job reported, or why it reported nothing."""
    if ret.status == JobStatus.COMPLETED and isinstance(ret._return_value, dict):
        return dict(ret._return_value)
    if ret.status == JobStatus.FAILED:
        reason = f"{type(ret._return_value).__name__}: {ret._return_value}"
    else:
        reason = f"job returned {ret._return_value!r}"
    return {"status": "failed", "name": " ".join(overrides), "reason": reason}


def failed_return(overrides: list[str], error: BaseException) -> JobReturn:
    """FAILED with ``error``: a job that could not run, or whose Hydra setup failed."""
    ret = JobReturn(overrides=overrides, status=JobStatus.FAILED)
    ret._return_value = error
    return ret


def outcome_return(overrides: list[str], status: str, reason: str, **extra: Any) -> JobReturn:
    """A pnn-sweep job's outcome as the JobReturn its job would have reported."""
    ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
    name = " ".join(filter_overrides(overrides))
    ret._return_value = {"status": status, "name": name, "reason": reason, **extra}
    return ret


def stopped_return(overrides: list[str], reason: str, pnn_jobs: bool) -> JobReturn:
    """A job stopped by a signal: KILLED for pnn-sweep's sweeper, else FAILED, as Hydra expects."""
    if pnn_jobs:
        return outcome_return(overrides, "killed", reason)
    return failed_return(overrides, JobInterrupted(f"job interrupted ({reason})"))


class JobInterrupted(RuntimeError):
    """A job that a signal stopped, or kept from starting, in a generic Hydra app."""
