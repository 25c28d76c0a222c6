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


def run(cfg: DictConfig) -> dict[str, Any]:
    name = f"{cfg.experiment}-seed{cfg.train.seed}"
    try:
        validate(cfg)
    except ConfigError as err:
        return {"status": "failed", "name": name, "reason": str(err)}
    if cfg.dry_run:
        dry_run(cfg)
        return {"status": "finished", "name": name, "reason": "dry run"}

    from mlflow.tracking import MlflowClient

    from pnn import tracking

    root = launch_dir()
    uri = tracking.resolve_uri(cfg, root)
    client = MlflowClient(uri)
    experiment_id = tracking.get_experiment_id(client, cfg.tracking.experiment_name, uri)
    chash = tracking.config_hash(cfg)
    ckpt_dir = Path(cfg.train.checkpoint_dir)
    ckpt_dir = (ckpt_dir if ckpt_dir.is_absolute() else root / ckpt_dir) / f"{name}-{chash}"
    with exclusive(ckpt_dir) as owned:
        if not owned:
            reason = f"running in another process (lock held on {ckpt_dir})"
            log.info(f"[{name}] skipped: {reason}")
            return {"status": "skipped", "name": name, "reason": reason}
        # Asked under the lock: a twin job that held it may have just finished.
        runs = tracking.find_job_runs(client, experiment_id, chash)
        finished = [r for r in runs if r.info.status == "FINISHED"]
        if finished and not cfg.sweep.rerun:
            run_id = finished[0].info.run_id
            reason = f"already FINISHED as run {run_id} (sweep.rerun=true to redo)"
            log.info(f"[{name}] skipped: {reason}")
            if not (ckpt_dir / "last.pt").exists():
                shutil.rmtree(ckpt_dir, ignore_errors=True)  # only our lock file is in it
            return {"status": "skipped", "name": name, "reason": reason}
        open_runs = {r.info.run_id for r in runs if r.info.status != "FINISHED"}
        return _train_and_log(cfg, name, client, experiment_id, chash, ckpt_dir, open_runs)


def _train_and_log(
    cfg: DictConfig,
    name: str,
    client: Any,
    experiment_id: str,
    chash: str,
    ckpt_dir: Path,
    open_runs: set[str],
) -> dict[str, Any]:
    from pnn import run_context, tracking
    from pnn.checkpoint import load_checkpoint
    from pnn.data import load_data
    from pnn.engine import NonFiniteLossError, seed_everything, train
    from pnn.models import build_model, count_parameters

    ckpt_path = ckpt_dir / "last.pt"
    state = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    run_id = (state or {}).get("extra_state", {}).get("mlflow_run_id")
    if cfg.sweep.rerun or run_id not in open_runs:
        # A fresh run: a checkpoint of a finished, deleted or forced-over run is not ours.
        ckpt_path.unlink(missing_ok=True)
        state, run_id = None, None

    seed_everything(cfg.train.seed)
    model = build_model(cfg)
    counts = count_parameters(model)
    if run_id is None:
        run_id = tracking.create_job_run(client, experiment_id, cfg, chash, _overrides())
        tracking.log_metrics(client, run_id, {k: float(v) for k, v in counts.items()}, step=0)
        _log_text(client, run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        summary = f"{model}\n\n{json.dumps(counts, indent=2)}\n"
        _log_text(client, run_id, summary, "model_summary.txt")
        log.info(f"[{name}] new MLflow run {run_id}")
    else:
        tracking.retry(lambda: client.update_run(run_id, status="RUNNING"))
        _log_missing_epochs(client, run_id, state.get("history", []))
        log.info(f"[{name}] resuming MLflow run {run_id} after epoch {len(state['history'])}")

    epochs = cfg.train.epochs
    started = time.monotonic()

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        per_epoch = {k: metrics[k] for k in tracking.EPOCH_METRICS}
        tracking.log_metrics(client, run_id, per_epoch, step=epoch)
        left = (time.monotonic() - started) / max(1, epoch - first_epoch + 1) * (epochs - epoch)
        log.info(
            f"[{name}] epoch {epoch}/{epochs}  test_acc {metrics['test_acc']:.2f}%  "
            f"reported {metrics['test_acc_reported']:.2f}%  train_loss "
            f"{metrics['train_loss']:.4f}  {metrics['epoch_time_s']:.1f}s/epoch  "
            f"ETA {_duration(left)}"
        )

    first_epoch = len((state or {}).get("history", [])) + 1
    monitor = run_context.start_system_metrics(cfg, client.tracking_uri, run_id)
    try:
        device = resolve_device(cfg.train.device)
        data = load_data(cfg, device, _absolute(cfg.dataset.root))
        result = train(
            cfg,
            model,
            data,
            device=device,
            checkpoint_path=ckpt_path,
            on_epoch=on_epoch,
            extra_state={"mlflow_run_id": run_id},
            progress=show_progress(cfg),
        )
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM/SIGINT through pnn.interrupt
        signal_name = getattr(err, "signal_name", "SIGINT")
        tracking.mark_run(client, run_id, "KILLED", {"pnn.killed_by": signal_name})
        raise
    except (NonFiniteLossError, Exception) as err:  # noqa: B014 - named for the reader
        reason = str(err) if isinstance(err, NonFiniteLossError) else f"{type(err).__name__}: {err}"
        # mark_run never raises a store error: the store may be what just failed.
        tracking.mark_run(client, run_id, "FAILED", {"pnn.failure": reason[:5000]})
        log.error(f"[{name}] FAILED: {reason}")
        return {"status": "failed", "name": name, "reason": reason, "run_id": run_id}
    finally:
        run_context.stop_system_metrics(monitor)

    final = {
        "best_test_acc": result.best_test_acc,
        "best_epoch": result.best_epoch,
        "final_test_acc": result.final_test_acc,
        "best_test_acc_reported": result.best_test_acc_reported,
    }
    tracking.log_metrics(client, run_id, final, step=0)
    if cfg.tracking.log_checkpoint and ckpt_path.exists():
        tracking.retry(lambda: client.log_artifact(run_id, str(ckpt_path), "checkpoint"))
    tracking.retry(lambda: client.set_terminated(run_id, "FINISHED"))
    if cfg.tracking.log_checkpoint:
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # the artifact store holds it now
    log.info(
        f"[{name}] finished: best test_acc {result.best_test_acc:.2f}% at epoch "
        f"{result.best_epoch}, reported {result.best_test_acc_reported:.2f}%"
    )
    return {"status": "finished", "name": name, "run_id": run_id, **final}


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
