"""One job of a sweep: decide whether to skip, resume or start; train; log to MLflow.

The job never raises for a failed run: it marks the MLflow run FAILED with the reason and
returns ``{"status": "failed", ...}``, so the sweep goes on and reports it at the end.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pnn.config import ConfigError, validate

log = logging.getLogger("pnn")


def dry_run(cfg: DictConfig) -> dict[str, Any]:
    """Compose, validate and build the model; print one JSON line. Loads no data, logs nothing."""
    from pnn.models import build_model, count_parameters

    counts = count_parameters(build_model(cfg))
    line = {"experiment": cfg.experiment, "model": cfg.model.name, **counts}
    print(json.dumps(line), flush=True)
    return line


def launch_dir() -> Path:
    """Where the sweep was started: relative paths in the config are relative to it."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.cwd)
    return Path.cwd()


def _overrides() -> str:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return " ".join(HydraConfig.get().overrides.task)
    return ""


@contextmanager
def exclusive(directory: Path) -> Iterator[bool]:
    """A lock per job identity: the same job started twice at once runs only once."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


@dataclass
class Job:
    """One job's identity and where its things live: its store, its hash, its checkpoint."""

    cfg: DictConfig
    name: str
    client: Any
    experiment_id: str
    chash: str
    ckpt_dir: Path

    @property
    def ckpt_path(self) -> Path:
        return self.ckpt_dir / "last.pt"

    def outcome(self, status: str, reason: str | None = None, **extra: Any) -> dict[str, Any]:
        """What the job reports to the sweeper (see ``pnn.sweeper.outcome_of``)."""
        out: dict[str, Any] = {"status": status, "name": self.name}
        if reason is not None:
            out["reason"] = reason
        return {**out, **extra}


def job_name(cfg: DictConfig) -> str:
    return f"{cfg.experiment}-seed{cfg.train.seed}"


def run(cfg: DictConfig) -> dict[str, Any]:
    """One job, in phases: check -> decide (skip or go) -> open its run -> train -> finish."""
    name = job_name(cfg)
    try:
        validate(cfg)
    except ConfigError as err:
        return {"status": "failed", "name": name, "reason": str(err)}
    if cfg.dry_run:
        dry_run(cfg)
        return {"status": "finished", "name": name, "reason": "dry run"}

    job = locate(cfg, name)
    with exclusive(job.ckpt_dir) as owned:
        if not owned:
            reason = f"running in another process (lock held on {job.ckpt_dir})"
            log.info(f"[{name}] skipped: {reason}")
            return job.outcome("skipped", reason)
        skipped, open_runs = decide(job)
        if skipped is not None:
            return skipped
        run_id, state = open_run(job, open_runs)
        return train_and_finish(job, run_id, state)


def locate(cfg: DictConfig, name: str) -> Job:
    """The job's store, experiment, identity and checkpoint folder."""
    from mlflow.tracking import MlflowClient

    from pnn import tracking

    root = launch_dir()
    uri = tracking.resolve_uri(cfg, root)
    client = MlflowClient(uri)
    experiment_id = tracking.get_experiment_id(client, cfg.tracking.experiment_name, uri)
    chash = tracking.config_hash(cfg)
    ckpt_dir = Path(cfg.train.checkpoint_dir)
    ckpt_dir = (ckpt_dir if ckpt_dir.is_absolute() else root / ckpt_dir) / f"{name}-{chash}"
    return Job(cfg, name, client, experiment_id, chash, ckpt_dir)


def decide(job: Job) -> tuple[dict[str, Any] | None, set[str]]:
    """Skip a job that has FINISHED in this store (the outcome), else go on (None) with the
    ids of the job's runs that are not finished. Asked under the job's lock: a twin job that
    held it may have just finished."""
    from pnn import tracking

    runs = tracking.find_job_runs(job.client, job.experiment_id, job.chash)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if finished and not job.cfg.sweep.rerun:
        run_id = finished[0].info.run_id
        reason = f"already FINISHED as run {run_id} (sweep.rerun=true to redo)"
        log.info(f"[{job.name}] skipped: {reason}")
        if not job.ckpt_path.exists():
            shutil.rmtree(job.ckpt_dir, ignore_errors=True)  # only our lock file is in it
        return job.outcome("skipped", reason), set()
    return None, {r.info.run_id for r in runs if r.info.status != "FINISHED"}


def open_run(job: Job, open_runs: set[str]) -> tuple[str, dict[str, Any] | None]:
    """Resume the open run the checkpoint belongs to, or create a new one: (run id, state)."""
    from pnn import tracking
    from pnn.checkpoint import load_checkpoint

    cfg = job.cfg
    state = load_checkpoint(job.ckpt_path) if job.ckpt_path.exists() else None
    run_id = (state or {}).get("extra_state", {}).get("mlflow_run_id")
    if cfg.sweep.rerun or run_id not in open_runs:
        # A fresh run: a checkpoint of a finished, deleted or forced-over run is not ours.
        job.ckpt_path.unlink(missing_ok=True)
        state, run_id = None, None

    if run_id is None:
        run_id = _create_run(job)
        log.info(f"[{job.name}] new MLflow run {run_id}")
    else:
        tracking.retry(lambda: job.client.update_run(run_id, status="RUNNING"))
        _log_missing_epochs(job.client, run_id, state.get("history", []))
        log.info(f"[{job.name}] resuming MLflow run {run_id} after epoch {len(state['history'])}")
    return run_id, state


def _create_run(job: Job) -> str:
    """A new child run with the job's config, parameter counts and model summary."""
    from pnn import tracking
    from pnn.engine import seed_everything
    from pnn.models import build_model, count_parameters

    cfg = job.cfg
    seed_everything(cfg.train.seed)
    model = build_model(cfg)
    counts = count_parameters(model)
    run_id = tracking.create_job_run(job.client, job.experiment_id, cfg, job.chash, _overrides())
    tracking.log_metrics(job.client, run_id, {k: float(v) for k, v in counts.items()}, step=0)
    _log_text(job.client, run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    summary = f"{model}\n\n{json.dumps(counts, indent=2)}\n"
    _log_text(job.client, run_id, summary, "model_summary.txt")
    return run_id


def train_and_finish(job: Job, run_id: str, state: dict[str, Any] | None) -> dict[str, Any]:
    """Train in ``run_id`` (from ``state``'s epoch on); mark the run FINISHED or FAILED."""
    from pnn.engine import NonFiniteLossError

    try:
        result = _train(job, run_id, state)
    except KeyboardInterrupt:
        from pnn import tracking

        tracking.retry(lambda: job.client.set_terminated(run_id, "KILLED"))
        raise
    except (NonFiniteLossError, Exception) as err:  # noqa: B014 - named for the reader
        reason = str(err) if isinstance(err, NonFiniteLossError) else f"{type(err).__name__}: {err}"
        return _mark_failed(job, run_id, reason)
    return _finish(job, run_id, result)


def _train(job: Job, run_id: str, state: dict[str, Any] | None) -> Any:
    """The training loop, logging each epoch to ``run_id``; the engine's TrainResult."""
    from pnn import tracking
    from pnn.data import load_data
    from pnn.engine import seed_everything, train
    from pnn.models import build_model

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
            f"ETA {_duration(left)}"
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
    )


def _mark_failed(job: Job, run_id: str, reason: str) -> dict[str, Any]:
    from pnn import tracking

    tracking.set_tags(job.client, run_id, {"pnn.failure": reason[:5000]})
    tracking.retry(lambda: job.client.set_terminated(run_id, "FAILED"))
    log.error(f"[{job.name}] FAILED: {reason}")
    return job.outcome("failed", reason, run_id=run_id)


def _finish(job: Job, run_id: str, result: Any) -> dict[str, Any]:
    """Final metrics, the checkpoint as an artifact, and the run FINISHED."""
    from pnn import tracking

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
    tracking.retry(lambda: client.set_terminated(run_id, "FINISHED"))
    if cfg.tracking.log_checkpoint:
        shutil.rmtree(job.ckpt_dir, ignore_errors=True)  # the artifact store holds it now
    log.info(
        f"[{job.name}] finished: best test_acc {result.best_test_acc:.2f}% at epoch "
        f"{result.best_epoch}, reported {result.best_test_acc_reported:.2f}%"
    )
    return job.outcome("finished", run_id=run_id, **final)


def _absolute(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else launch_dir() / p


def _log_missing_epochs(client: Any, run_id: str, history: list[dict[str, float]]) -> None:
    """Log the epochs a checkpoint holds but MLflow missed (killed between the two writes)."""
    from pnn import tracking

    logged = tracking.logged_steps(client, run_id, tracking.EPOCH_METRICS)
    for epoch, metrics in enumerate(history, start=1):
        missing = {k: metrics[k] for k in tracking.EPOCH_METRICS if epoch not in logged[k]}
        if missing:
            tracking.log_metrics(client, run_id, missing, step=epoch)


def _log_text(client: Any, run_id: str, text: str, filename: str) -> None:
    from pnn import tracking

    tracking.retry(lambda: client.log_text(run_id, text, filename))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
