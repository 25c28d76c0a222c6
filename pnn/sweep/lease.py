"""A job's lease on its MLflow run, held in the tracking store, so across folders and machines:
a live RUNNING run of the job means "running elsewhere"; a stale, KILLED or FAILED one is
adopted; else a run is created, and of two created at once the oldest wins. A checkpoint is never
deleted: it is resumed, or moved aside (unreadable, or ``sweep.rerun=true``)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pnn.io import storeguard, tracking
from pnn.io.liveness import HEARTBEAT_S, TAG_HEARTBEAT, TAG_OWNER, lease_status

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


def owner_id() -> str:
    """Who leases a run: this host, this process and a token (several jobs per process)."""
    return f"{socket.gethostname()}/{os.getpid()}/{os.urandom(4).hex()}"


def lease_tags(owner: str) -> dict[str, str]:
    return {TAG_OWNER: owner, TAG_HEARTBEAT: f"{time.time():.0f}"}


def adopt_job_run(client: Any, run: Any, owner: str) -> bool:
    """Lease an open run for ``owner`` and add this sweep to its TAG_SWEEPS; False if another
    process leased it at the same time."""
    sweeps = [s for s in run.data.tags.get(tracking.TAG_SWEEPS, "").split(",") if s]
    sweep = os.environ.get(tracking.ENV_SWEEP)
    if sweep and sweep not in sweeps:
        sweeps.append(sweep)
    run_id = run.info.run_id
    tracking.set_tags(client, run_id, {**lease_tags(owner), tracking.TAG_SWEEPS: ",".join(sweeps)})
    tracking.retry(lambda: client.update_run(run_id, status="RUNNING"))
    # Of two processes that adopted it at once, the last writer owns it.
    now = tracking.retry(lambda: client.get_run(run_id))
    return now.data.tags.get(TAG_OWNER) == owner


def mark_killed(client: Any, run_id: str, reason: str, owner: str | None = None) -> bool:
    """Mark a RUNNING run KILLED with ``reason`` if it still is, and still ``owner``'s if given."""
    run = tracking.retry(lambda: client.get_run(run_id))
    if run.info.status != "RUNNING":
        return False
    if owner is not None and run.data.tags.get(TAG_OWNER) != owner:
        return False
    tracking.set_tags(client, run_id, {"pnn.failure": reason[:5000]})
    tracking.retry(lambda: client.set_terminated(run_id, "KILLED"))
    return True


class Heartbeat:
    """Renews a run's heartbeat every HEARTBEAT_S from a thread; a missed beat is tried again."""

    def __init__(self, client: Any, run_id: str, interval: float = HEARTBEAT_S):
        self.client, self.run_id, self.interval = client, run_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="pnn-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        from mlflow.entities import RunTag

        while not self._stop.wait(self.interval):
            try:  # never write into a new store in place of a deleted one
                storeguard.check_same()
            except storeguard.StoreError:
                return  # the job's own next write reports it
            try:
                tag = RunTag(TAG_HEARTBEAT, f"{time.time():.0f}")
                self.client.log_batch(self.run_id, tags=[tag])
            except Exception:  # noqa: BLE001 - the next beat tries again
                continue


def decide(job: Job) -> tuple[dict[str, Any] | None, list[Any]]:
    """Skip a job FINISHED here or live elsewhere (the outcome), else None and its open runs."""
    runs = tracking.find_job_runs(job.client, job.experiment_id, job.chash)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if finished and not job.cfg.sweep.rerun:
        return job.skip(
            f"already FINISHED as run {finished[-1].info.run_id} (sweep.rerun=true to redo)"
        ), []
    open_runs = [r for r in runs if r.info.status != "FINISHED"]
    for r in open_runs:
        live, why = lease_status(r) if r.info.status == "RUNNING" else (False, "")
        if live:
            return job.skip(f"running elsewhere as run {r.info.run_id} ({why})"), []
    return None, open_runs


def open_run(job: Job, open_runs: list[Any]) -> tuple[str, dict[str, Any] | None] | dict[str, Any]:
    """Lease the job's run: adopt an open one (the checkpoint's, else the newest) or create one.
    (run id, checkpoint state or None), or a skip outcome if another process got it first."""
    state = _usable_checkpoint(job)
    if job.cfg.sweep.rerun:
        for r in open_runs:  # stale runs of the old attempt must not stay RUNNING
            reason = "superseded: sweep.rerun=true started this job again in a new run"
            mark_killed(job.client, r.info.run_id, reason)
        open_runs = []
    ckpt_run = (state or {}).get("extra_state", {}).get("mlflow_run_id")
    mine = [r for r in open_runs if r.info.run_id == ckpt_run]
    target = (mine or open_runs or [None])[-1]
    done = len((state or {}).get("history", []))
    if target is None:
        run_id = _create_run(job)
        runs = tracking.find_job_runs(job.client, job.experiment_id, job.chash)
        first = next((r for r in runs if r.info.status == "RUNNING" and lease_status(r)[0]), None)
        if first is not None and first.info.run_id != run_id:  # two created at once: oldest wins
            tracking.retry(lambda: job.client.delete_run(run_id))
            return job.skip(f"running elsewhere as run {first.info.run_id} (leased first)")
        fresh = f"new MLflow run {run_id}"
        resumed = (
            f"{fresh} continues from checkpoint {job.ckpt_path} after epoch {done} (its run "
            f"{ckpt_run} is not open in this store); epochs 1-{done} logged from the checkpoint's "
            "history"
        )
    else:
        run_id, was = target.info.run_id, target.info.status
        if not adopt_job_run(job.client, target, job.owner):
            return job.skip(f"running elsewhere as run {run_id} (leased at the same moment)")
        fresh = f"adopting MLflow run {run_id} ({was}, no checkpoint): from epoch 1"
        source = "" if ckpt_run == run_id else f" (the checkpoint was written for run {ckpt_run})"
        resumed = f"resuming MLflow run {run_id} ({was}) after epoch {done}{source}"
    if state is not None:
        _log_missing_epochs(job.client, run_id, state["history"])
    log.info(f"[{job.name}] {resumed if state is not None else fresh}")
    return run_id, state


def _usable_checkpoint(job: Job) -> dict[str, Any] | None:
    """The job's checkpoint, or None: absent, or moved aside (``sweep.rerun=true``, unreadable)."""
    from pnn.train.checkpoint import UnreadableCheckpointError, move_aside, read_checkpoint

    path = job.ckpt_path
    if not path.exists():
        return None
    if job.cfg.sweep.rerun:
        moved = move_aside(path, "rerun")
        log.warning(f"[{job.name}] sweep.rerun=true: the old checkpoint {path} is now {moved}")
        return None
    try:
        return read_checkpoint(path)
    except UnreadableCheckpointError as err:
        moved = move_aside(path, "corrupt")
        log.warning(f"[{job.name}] {err}. Moved it aside to {moved}; starting the job afresh")
        return None


def report_run_id(run_id: str, owner: str) -> None:
    """List the run in this job process's run file, for whoever outlives the process to end it
    (:func:`end_leases`): the launcher if the process dies, SLURM's job before a requeue."""
    path = os.environ.get(tracking.ENV_RUN_ID_FILE)
    if path:
        with open(path, "a") as file:
            file.write(f"{run_id} {owner}\n")


def end_leases(run_file: Path, end: Callable[[Any, str, str], bool]) -> list[str]:
    """``end(client, run id, owner)`` for each run listed in ``run_file``; the ids it returned
    True for. An error is logged, not raised: the store may be what failed."""
    uri = os.environ.get(tracking.ENV_URI)
    if not uri or not run_file.exists():
        return []
    ended = []
    for line in run_file.read_text().splitlines():
        run_id, _, owner = line.partition(" ")
        try:
            if end(storeguard.client(uri), run_id, owner):
                ended.append(run_id)
        except Exception as err:  # noqa: BLE001
            log.warning(f"could not end the lease on run {run_id}: {err}")
    return ended


def _create_run(job: Job) -> str:
    """A new child run with the job's config, parameter counts and model summary."""
    from hydra.core.hydra_config import HydraConfig

    from pnn.model.models import build_model, count_parameters
    from pnn.train.engine import seed_everything

    cfg = job.cfg
    seed_everything(cfg.train.seed)
    model = build_model(cfg)
    counts = count_parameters(model)
    overrides = " ".join(HydraConfig.get().overrides.task) if HydraConfig.initialized() else ""
    run_id = tracking.create_job_run(
        job.client, job.experiment_id, cfg, job.chash, overrides, lease_tags(job.owner)
    )
    tracking.log_metrics(job.client, run_id, {k: float(v) for k, v in counts.items()}, step=0)
    config = OmegaConf.to_yaml(cfg, resolve=True)
    tracking.retry(lambda: job.client.log_text(run_id, config, "config.yaml"))
    summary = f"{model}\n\n{json.dumps(counts, indent=2)}\n"
    tracking.retry(lambda: job.client.log_text(run_id, summary, "model_summary.txt"))
    return run_id


def remove_empty_folder(job: Job) -> None:
    """Remove the job's checkpoint folder if it is empty (only inside ``train.checkpoint_dir``)."""
    folder = job.ckpt_dir.resolve()
    if folder.parent == job.ckpt_root.resolve():
        with contextlib.suppress(OSError):  # absent, or it holds other files
            folder.rmdir()


def _log_missing_epochs(client: Any, run_id: str, history: list[dict[str, float]]) -> None:
    """Log the epochs a checkpoint holds but MLflow missed (killed between the two writes)."""

    def steps(key: str) -> set[int]:
        return {m.step for m in tracking.retry(lambda: client.get_metric_history(run_id, key))}

    logged = {key: steps(key) for key in tracking.EPOCH_METRICS}
    for epoch, metrics in enumerate(history, start=1):
        missing = {k: metrics[k] for k in tracking.EPOCH_METRICS if epoch not in logged[k]}
        if missing:
            tracking.log_metrics(client, run_id, missing, step=epoch)


def release(client: Any, run_id: str, owner: str) -> bool:
    """Give up ``owner``'s lease on a RUNNING run without ending it (its job is requeued): without
    its heartbeat tag, the next job to ask adopts it at once. False if no longer that lease."""
    run = tracking.retry(lambda: client.get_run(run_id))
    if run.info.status != "RUNNING" or run.data.tags.get(TAG_OWNER) != owner:
        return False
    if TAG_HEARTBEAT in run.data.tags:
        tracking.retry(lambda: client.delete_tag(run_id, TAG_HEARTBEAT))
    return True
