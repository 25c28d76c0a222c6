"""The writing side of MLflow, used by the sweep: its runs, their names, params, metrics and tags,
in the layout that ``analyze.py`` and the MLflow UI read (docs/sweeps.md). Every write goes
through :func:`retry`, as many jobs share one SQLite file."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import tenacity
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from pnn.io import run_context, storeguard

T = TypeVar("T")
ENV_URI = "PNN_TRACKING_URI"
ENV_PARENT = "PNN_PARENT_RUN_ID"
ENV_SWEEP = "PNN_SWEEP_ID"
ENV_JOBS = "PNN_SWEEP_JOBS"
# This process, as no other one: pids are reused.
PROCESS_GROUP = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
EPOCH_METRICS = (
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "test_acc_reported",
    "lr",
    "epoch_time_s",
    "train_img_per_s",
)
SUMMARY_METRICS = (
    "best_test_acc",
    "best_epoch",
    "final_test_acc",
    "best_test_acc_reported",
    "params",
    "mask_values",
    "trainable",
)
# How a job runs or where it logs, not what it computes: not part of the job's identity.
VOLATILE_KEYS = (
    "tracking",
    "sweep",
    "dry_run",
    "train.device",
    "train.fast",
    "train.compile",
    "train.progress",
    "train.checkpoint_dir",
    "train.memory_check",
    "dataset.root",
    "dataset.download",
)


def _transient(err: BaseException) -> bool:
    """'database is locked' and the like, once the file is known to be the sweep's own."""
    storeguard.check_same()
    text = str(err).lower()
    return "locked" in text or "busy" in text or "connection refused" in text


def retry(fn: Callable[[], T], timeout: float = 120.0) -> T:
    """Call ``fn`` until the store stops answering 'database is locked' (or ``timeout``), checking
    first each time that the sweep's SQLite file is still its own (``storeguard.check_same``)."""
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(_transient),
        wait=tenacity.wait_random_exponential(multiplier=0.05, max=2.0),
        stop=tenacity.stop_after_delay(timeout),
        before=lambda _: storeguard.check_same(),
        reraise=True,
    )
    return retrying(fn)


def resolve_uri(cfg: DictConfig, launch_dir: Path) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``<launch dir>/mlflow.db``."""
    uri = cfg.tracking.uri or os.environ.get(ENV_URI) or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{(launch_dir / 'mlflow.db').resolve()}"
    elif uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # Relative to where the sweep was launched, for every job.
        uri = f"sqlite:///{(launch_dir / uri[len('sqlite:///') :]).resolve()}"
    return uri


def get_experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    experiment = retry(lambda: client.get_experiment_by_name(name))
    if experiment is not None:
        return experiment.experiment_id
    path = storeguard.sqlite_path(uri)  # artifacts beside it, not wherever the process started
    location = (path.parent / "mlartifacts").resolve().as_uri() if path else None
    try:
        return retry(lambda: client.create_experiment(name, artifact_location=location))
    except Exception:  # another process created it first
        experiment = retry(lambda: client.get_experiment_by_name(name))
        if experiment is None:
            raise
        return experiment.experiment_id


def flatten(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as dotted keys and string values (MLflow params)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = json.dumps(node) if isinstance(node, list) else str(node)

    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    walk(container, "")
    return out


def config_hash(cfg: DictConfig) -> str:
    """Identity of a job: the resolved config without the keys in VOLATILE_KEYS."""
    flat = flatten(cfg)
    kept = {
        k: v
        for k, v in flat.items()
        if not any(k == vk or k.startswith(vk + ".") for vk in VOLATILE_KEYS)
    }
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


# Live sweeps, and dead ones not closed yet (pnn.sweep.sweep_run).
RUNNING_SWEEPS = "attributes.status = 'RUNNING' and tags.`pnn.role` = 'sweep'"


def create_sweep_run(
    client: MlflowClient,
    experiment_id: str,
    sweep_dir: Path,
    command: str,
    n_jobs: int,
    lease: dict[str, str],
) -> str:
    """The sweep's parent run; its id, uri and sweep id go into the environment its jobs inherit."""
    sweep_id = datetime.now().strftime("%Y%m%d-%H%M%S-") + os.urandom(2).hex()
    tags = {"pnn.role": "sweep", "pnn.sweep_id": sweep_id, "pnn.sweep_dir": str(sweep_dir)}
    tags.update(lease)
    tags["pnn.command"] = command or "(no arguments)"
    tags["mlflow.note.content"] = f"sweep.py {command}".strip()
    run = retry(
        lambda: client.create_run(experiment_id, tags=tags, run_name=f"sweep-{sweep_id[:15]}")
    )
    log_run_context(client, run.info.run_id)
    os.environ.update(
        {
            ENV_URI: client.tracking_uri,
            ENV_PARENT: run.info.run_id,
            ENV_SWEEP: sweep_id,
            ENV_JOBS: str(n_jobs),
        }
    )
    return run.info.run_id


def mark_run(client: MlflowClient, run_id: str, status: str, tags: dict[str, str]) -> str | None:
    """Tag and end a job run; a store error comes back as one line, never raised."""
    try:
        if tags:
            set_tags(client, run_id, tags)
        retry(lambda: client.set_terminated(run_id, status))
    except Exception as err:
        problem = storeguard.as_store_error(client.tracking_uri, err)
        if problem is None:
            raise
        return f"run {run_id} could not be marked {status}: {problem}"
    return None


# Every sweep that worked on a job run: its creator, then those that resumed it.
TAG_SWEEPS = "pnn.sweep_ids"
# Where a job process lists the runs it leased, for the launcher to end if it dies.
ENV_RUN_ID_FILE = "PNN_RUN_ID_FILE"


def find_job_runs(client: MlflowClient, experiment_id: str, chash: str) -> list:
    """The job's runs in this store, oldest first."""
    runs = retry(
        lambda: client.search_runs(
            [experiment_id], filter_string=f"tags.`pnn.config_hash` = '{chash}'"
        )
    )
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def create_job_run(
    client: MlflowClient,
    experiment_id: str,
    cfg: DictConfig,
    chash: str,
    overrides: str,
    lease: dict[str, str] | None = None,
) -> str:
    """A new child run; ``lease`` holds the tags of the job's lease on it."""
    tags = {
        "pnn.role": "job",
        "pnn.config_hash": chash,
        "pnn.overrides": overrides,
        "experiment": str(cfg.experiment),
        "description": str(cfg.description),
        "published_test_acc": "" if cfg.published_test_acc is None else str(cfg.published_test_acc),
        "mlflow.note.content": str(cfg.description),
        **(lease or {}),
    }
    if os.environ.get(ENV_PARENT):
        tags["mlflow.parentRunId"] = os.environ[ENV_PARENT]
    if os.environ.get(ENV_SWEEP):
        tags["pnn.sweep_id"] = os.environ[ENV_SWEEP]
        tags[TAG_SWEEPS] = os.environ[ENV_SWEEP]
    tags["pnn.cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES", "(all)")
    tags["pnn.slot"] = os.environ.get("PNN_SLOT", "in-process")
    tags["pnn.process_group"] = PROCESS_GROUP
    name = f"{cfg.experiment}-seed{cfg.train.seed}"
    run = retry(lambda: client.create_run(experiment_id, tags=tags, run_name=name))
    run_id = run.info.run_id
    params = [Param(k, v[:6000]) for k, v in flatten(cfg).items()]
    retry(lambda: client.log_batch(run_id, params=params))  # MLflow sends them 100 at a time
    log_run_context(client, run_id, cfg)
    return run_id


def log_run_context(client: MlflowClient, run_id: str, cfg: DictConfig | None = None) -> None:
    """MLflow's standard tags and, for a job, its datasets as run inputs (the UI's columns)."""
    set_tags(client, run_id, run_context.standard_tags())
    if cfg is not None:
        inputs = run_context.dataset_inputs(cfg)
        # MLflow's get-or-create of a dataset is not atomic: a parallel job's insert may lose.
        lost = tenacity.retry_if_exception(
            lambda err: "UNIQUE constraint" in str(err) or "IntegrityError" in str(err)
        )
        tenacity.Retrying(
            retry=lost,
            stop=tenacity.stop_after_attempt(5),
            wait=tenacity.wait_random(0.05, 0.1),
            reraise=True,
        )(lambda: retry(lambda: client.log_inputs(run_id, datasets=inputs)))


# Tags that say why an earlier attempt of a job run ended; a run that finishes drops them.
END_TAGS = ("pnn.failure", "pnn.killed_by")


def finish_job_run(client: MlflowClient, run_id: str) -> None:
    """FINISHED, without the failure or kill tags of an earlier attempt."""
    run = retry(lambda: client.get_run(run_id))
    for key in END_TAGS:
        if key in run.data.tags:
            retry(lambda key=key: client.delete_tag(run_id, key))
    retry(lambda: client.set_terminated(run_id, "FINISHED"))


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    retry(lambda: client.log_batch(run_id, metrics=batch))


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    batch = [RunTag(k, v) for k, v in tags.items()]
    retry(lambda: client.log_batch(run_id, tags=batch))
