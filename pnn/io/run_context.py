"""What MLflow's own UI reads on a run: its standard tags (Source, User, git), its datasets (name
and digest of each split, never the data) and its system metrics. MLflow adds these only for
``mlflow.start_run``; our runs are created with ``MlflowClient``, so they are added here."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pnn.config import DATASETS

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE_NAME = str(REPO_ROOT / "sweep.py")


def standard_tags() -> dict[str, str]:
    """MLflow's source, git and user tags, as ``mlflow.start_run`` would set them."""
    from mlflow.entities import SourceType
    from mlflow.tracking.context.default_context import DefaultRunContext
    from mlflow.utils import mlflow_tags
    from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url

    tags = DefaultRunContext().tags()  # mlflow.user (from MLflow's credentials or the OS)
    tags[mlflow_tags.MLFLOW_SOURCE_NAME] = SOURCE_NAME
    tags[mlflow_tags.MLFLOW_SOURCE_TYPE] = SourceType.to_string(SourceType.LOCAL)
    git = {
        mlflow_tags.MLFLOW_GIT_COMMIT: get_git_commit(str(REPO_ROOT)),
        mlflow_tags.MLFLOW_GIT_BRANCH: get_git_branch(str(REPO_ROOT)),
        mlflow_tags.MLFLOW_GIT_REPO_URL: get_git_repo_url(str(REPO_ROOT)),
    }
    tags.update({key: value for key, value in git.items() if value})  # none outside a checkout
    return tags


def dataset_identity(cfg: DictConfig, train: bool) -> dict[str, Any]:
    """What determines one split's data: a synthetic set's seed and size, a torchvision set's name,
    split and files' md5 sums."""
    name = cfg.dataset.name if train else (cfg.dataset.test_name or cfg.dataset.name)
    split = "train" if train else "test"
    if name == "synthetic":
        spec = DATASETS[name]
        size = cfg.dataset.train_size if train else cfg.dataset.test_size
        default = spec.train_size if train else spec.test_size
        # As pnn.train.data.synthetic_split makes it.
        return {
            "name": name,
            "split": split,
            "seed": int(cfg.dataset.seed),
            "size": int(default if size is None else size),
        }
    from torchvision import datasets

    if name == "mnist":
        files = [list(f) for f in datasets.MNIST.resources if ("train" in f[0]) == train]
        return {"name": name, "split": split, "files": files}
    dataset_class = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    files = dataset_class.train_list if train else dataset_class.test_list
    return {"name": name, "split": split, "files": [list(f) for f in files]}


def dataset_digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _source(identity: dict[str, Any]) -> Any:
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    if identity["name"] == "synthetic":
        return CodeDatasetSource({"generator": "pnn.train.data.synthetic_split", **identity})
    from torchvision import datasets

    url = {
        "cifar10": datasets.CIFAR10.url,
        "cifar100": datasets.CIFAR100.url,
        "mnist": datasets.MNIST.mirrors[0],
    }[identity["name"]]
    return HTTPDatasetSource(url)


def _schema(name: str) -> Any:
    import numpy as np
    from mlflow.types import Schema, TensorSpec

    spec = DATASETS[name]
    return Schema(
        [
            TensorSpec(
                np.dtype("uint8"), (-1, spec.in_channels, spec.image_size, spec.image_size), "image"
            ),
            TensorSpec(np.dtype("int64"), (-1,), "label"),
        ]
    )


def dataset_inputs(cfg: DictConfig) -> list[Any]:
    """The training and the test split as ``DatasetInput`` s with context train / test."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = []
    for train in (True, False):
        identity = dataset_identity(cfg, train)
        dataset = MetaDataset(
            _source(identity),
            name=identity["name"],
            digest=dataset_digest(identity),
            schema=_schema(identity["name"]),
        )
        context = InputTag(MLFLOW_DATASET_CONTEXT, identity["split"])
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), [context]))
    return inputs


def start_system_metrics(cfg: DictConfig, tracking_uri: str, run_id: str) -> Any | None:
    """MLflow's system-metrics monitor on ``run_id`` if ``tracking.system_metrics``, else None."""
    if not cfg.tracking.get("system_metrics", False):
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=tracking_uri)
    monitor.start()
    return monitor


def stop_system_metrics(monitor: Any | None) -> None:
    """Stop the monitor and log the last, partial interval, which MLflow's ``finish`` drops."""
    if monitor is None:
        return
    monitor.finish()
    try:
        last = monitor.aggregate_metrics()
        if last:
            monitor.publish_metrics(last)
            monitor.mlflow_logger.flush()
    except Exception as err:  # system metrics are a diagnostic; never fail the job for them
        log.warning(f"could not log the last system metrics sample: {err}")
