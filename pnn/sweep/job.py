"""One job of a sweep: skip, adopt or start its run (:mod:`pnn.sweep.lease`), train, log to MLflow.
A failed job never raises: its run is marked FAILED with the reason and the outcome says so."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from pnn.config import ConfigError, validate
from pnn.sweep import interrupt

if TYPE_CHECKING:
    from pnn.sweep.lease import Job

log = logging.getLogger("pnn")


def dry_run(cfg: DictConfig) -> dict[str, Any]:
    """Build the model and print its parameter counts as one JSON line; no data, no logging."""
    from pnn.model.models import build_model, count_parameters

    counts = count_parameters(build_model(cfg))
    line = {"experiment": cfg.experiment, "model": cfg.model.name, **counts}
    print(json.dumps(line), flush=True)
    return line


def launch_dir() -> Path:
    """Where the sweep was started: the config's relative paths are relative to it."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.cwd)
    return Path.cwd()


def resolve_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use auto or cpu")
    return torch.device(name)


def show_progress(cfg: DictConfig) -> bool:
    if cfg.train.progress != "auto":
        return cfg.train.progress == "on"
    # A live bar only when one job owns the terminal; parallel jobs log one line per epoch.
    return sys.stderr.isatty() and os.environ.get("PNN_SWEEP_JOBS", "1") == "1"


def run(cfg: DictConfig) -> dict[str, Any]:
    """One job: check, decide, open its run, train, finish."""
    name = f"{cfg.experiment}-seed{cfg.train.seed}"
    try:
        validate(cfg)
    except ConfigError as err:
        return {"status": "failed", "name": name, "reason": str(err)}
    if cfg.dry_run:
        dry_run(cfg)
        return {"status": "finished", "name": name, "reason": "dry run"}

    from pnn.sweep import lease

    if interrupt.received():  # a signal came during the previous job of this process
        reason = f"not started: got {interrupt.signal_name()}"
        return {"status": "killed", "name": name, "reason": reason}
    job = locate(cfg, name)
    # The same job started twice at once, here or on another machine, runs once: the lease.
    opened = _open(job)
    if isinstance(opened, dict):
        return opened  # skipped, failed to set up, or leased by another process first
    run_id, state = opened
    with lease.Heartbeat(job.client, run_id):
        return train_and_finish(job, run_id, state)


def _open(job: Job) -> dict[str, Any] | tuple[str, dict[str, Any] | None]:
    """Skip the job, or open its run: (run id, checkpoint state), or the outcome."""
    from pnn.sweep import lease
    from pnn.train.data import DatasetUnavailableError, check_available

    skipped, open_runs = lease.decide(job)
    if skipped is not None:
        return skipped
    try:  # before any run is created or adopted
        check_available(job.cfg, _absolute(job.cfg.dataset.root))
    except DatasetUnavailableError as err:
        log.error(f"[{job.name}] FAILED: {err}")
        return job.outcome("failed", str(err))
    opened = lease.open_run(job, open_runs)
    if isinstance(opened, dict):
        return opened
    lease.report_run_id(opened[0], job.owner)
    return opened


def locate(cfg: DictConfig, name: str) -> Job:
    """The job's store, experiment, identity and checkpoint folder."""
    from pnn.io import storeguard, tracking
    from pnn.sweep import lease

    root = launch_dir()
    uri = tracking.resolve_uri(cfg, root)
    client = storeguard.client(uri)
    experiment_id = tracking.get_experiment_id(client, cfg.tracking.experiment_name, uri)
    chash = tracking.config_hash(cfg)
    ckpt_root = Path(cfg.train.checkpoint_dir)
    ckpt_root = ckpt_root if ckpt_root.is_absolute() else root / ckpt_root
    owner = lease.owner_id()
    return lease.Job(
        cfg, name, client, experiment_id, chash, ckpt_root, ckpt_root / f"{name}-{chash}", owner
    )


def train_and_finish(job: Job, run_id: str, state: dict[str, Any] | None) -> dict[str, Any]:
    """Train in ``run_id``, then mark it FINISHED, FAILED or KILLED."""
    from pnn.io import run_context, storeguard
    from pnn.train.engine import NonFiniteLossError, TrainingStopped

    monitor = run_context.start_system_metrics(job.cfg, job.client.tracking_uri, run_id)
    try:
        result = _train(job, run_id, state)
    except TrainingStopped:  # SIGTERM or SIGINT (pnn.sweep.interrupt); the run opened meanwhile
        signal_name = interrupt.signal_name() or "SIGINT"
        return _end(job, run_id, "KILLED", f"by {signal_name}", {"pnn.killed_by": signal_name})
    except (NonFiniteLossError, Exception) as err:  # noqa: B014 - named for the reader
        if isinstance(err, NonFiniteLossError):
            reason = str(err)
        else:  # a store error in one line, not MLflow's pages of SQL
            problem = storeguard.as_store_error(job.client.tracking_uri, err)
            reason = str(problem) if problem else f"{type(err).__name__}: {err}"
        return _end(job, run_id, "FAILED", reason, {"pnn.failure": reason[:5000]})
    finally:
        run_context.stop_system_metrics(monitor)
    return _finish(job, run_id, result)  # trained: a signal now leaves the run FINISHED


def _end(job: Job, run_id: str, status: str, reason: str, tags: dict[str, str]) -> dict[str, Any]:
    """Mark the run KILLED or FAILED with ``tags`` (a store error is logged, never raised)."""
    from pnn.io import tracking

    problem = tracking.mark_run(job.client, run_id, status, tags)
    level = logging.INFO if status == "KILLED" else logging.ERROR
    log.log(level, f"[{job.name}] {status}: {reason}")
    if problem:
        log.warning(f"[{job.name}] {problem}")
    return job.outcome(status.lower(), reason, run_id=run_id)


def _train(job: Job, run_id: str, state: dict[str, Any] | None) -> Any:
    """The training loop, logging each epoch to ``run_id``; the engine's TrainResult."""
    from pnn.io import tracking
    from pnn.model.models import build_model
    from pnn.train.data import load_data
    from pnn.train.engine import seed_everything, train

    cfg, name, epochs = job.cfg, job.name, job.cfg.train.epochs
    first_epoch = len((state or {}).get("history", [])) + 1
    started = time.monotonic()

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        per_epoch = {k: metrics[k] for k in tracking.EPOCH_METRICS}
        tracking.log_metrics(job.client, run_id, per_epoch, step=epoch)
        left = (time.monotonic() - started) / max(1, epoch - first_epoch + 1) * (epochs - epoch)
        log.info(
            f"[{name}] epoch {epoch}/{epochs}  test_acc {metrics['test_acc']:.2f}%  "
            f"reported {metrics['test_acc_reported']:.2f}%  train_loss "
            f"{metrics['train_loss']:.4f}  {metrics['epoch_time_s']:.1f}s/epoch  "
            f"ETA {timedelta(seconds=round(left))}"
        )

    seed_everything(cfg.train.seed)
    model = build_model(cfg)
    device = resolve_device(cfg.train.device)
    data = load_data(cfg, device, _absolute(cfg.dataset.root))
    return train(
        cfg,
        model,
        data,
        device=device,
        checkpoint_path=job.ckpt_path,
        on_epoch=on_epoch,
        extra_state={"mlflow_run_id": run_id},
        progress=show_progress(cfg),
        should_stop=lambda: interrupt.received() is not None,
    )


def _finish(job: Job, run_id: str, result: Any) -> dict[str, Any]:
    """Final metrics, the checkpoint as an artifact, and the run FINISHED."""
    from pnn.io import tracking
    from pnn.sweep import lease

    cfg, client = job.cfg, job.client
    final = {
        "best_test_acc": result.best_test_acc,
        "best_epoch": result.best_epoch,
        "final_test_acc": result.final_test_acc,
        "best_test_acc_reported": result.best_test_acc_reported,
    }
    tracking.log_metrics(client, run_id, final, step=0)
    if cfg.tracking.log_checkpoint and job.ckpt_path.exists():
        tracking.retry(lambda: client.log_artifact(run_id, str(job.ckpt_path), "checkpoint"))
    tracking.finish_job_run(client, run_id)
    if cfg.tracking.log_checkpoint:  # the artifact store holds it now
        job.ckpt_path.unlink(missing_ok=True)
        lease.remove_empty_folder(job)
    log.info(
        f"[{job.name}] finished: best test_acc {result.best_test_acc:.2f}% at epoch "
        f"{result.best_epoch}, reported {result.best_test_acc_reported:.2f}%"
    )
    return job.outcome("finished", run_id=run_id, **final)


def _absolute(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else launch_dir() / p
