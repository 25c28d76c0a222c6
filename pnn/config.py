"""Typed configuration schema, dataset facts and cross-field validation.

The dataclasses below are registered in Hydra's ConfigStore as ``pnn_schema``; ``conf/config.yaml``
puts that schema first in its defaults list, so a wrong type is rejected at compose time. A key
the schema lacks (``model.nfilter``), however it came in (``+key``, ``++key``, a file), is refused
by :func:`check_known_keys` with the nearest known key (see :mod:`pnn.schema_keys`). Everything
Hydra's types cannot say (allowed names, ranges, rules between fields) lives in :func:`validate`,
which runs before any data is loaded or any run is logged.

This module imports neither torch nor mlflow, so configs can be checked cheaply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pnn.schema_keys import describe_unknown, open_nodes, unknown_keys

if TYPE_CHECKING:  # omegaconf is absent on the benchmark's GPU image
    from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A configuration that cannot describe a valid run. The message is meant for people."""


# --------------------------------------------------------------------------------------------
# Facts about the datasets (shape, classes, normalisation, reference lr schedule)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    in_channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int
    test_size: int


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(3, 32, 10, CIFAR_MEAN, CIFAR_STD, 50_000, 10_000),
    # The reference used 10 classes for every "CIFAR*" dataset; CIFAR-100 has 100.
    "cifar100": DatasetSpec(3, 32, 100, CIFAR_MEAN, CIFAR_STD, 50_000, 10_000),
    "mnist": DatasetSpec(1, 28, 10, (0.1307,), (0.3081,), 60_000, 10_000),
    # CIFAR-shaped and CIFAR-normalised; sizes come from dataset.train_size / test_size.
    "synthetic": DatasetSpec(3, 32, 10, CIFAR_MEAN, CIFAR_STD, 5_000, 1_000),
}

MODELS = ("resnet18", "noiseresnet18", "perturb_resnet18", "cifarnet", "lenet")
ACTS = ("relu", "lrelu", "prelu", "rrelu", "elu", "selu", "tanh", "sigmoid")
POOL_TYPES = ("max", "avg")
NOISE_TYPES = ("uniform", "normal")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
FILTER_SIZES = (0, 1, 3, 5, 7)
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
FAST_CHOICES = ("auto", "off")  # train.fast


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    name: str = "perturb_resnet18"
    nfilters: int = 64
    first_filter_size: int = 0
    filter_size: int = 0
    act: str = "relu"
    use_act: bool = False
    pool_type: str = "max"
    dropout: float = 0.5
    debug: bool = False


@dataclass
class NoiseConfig:
    type: str = "uniform"
    level: float = 0.5
    scale: float = 1.0


@dataclass
class MasksConfig:
    nmasks: int = 1
    unique: bool = True
    train: bool = False
    mix_maps: bool = False


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = True
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class DatasetConfig:
    name: str = "cifar10"
    root: str = "data"
    download: bool = True
    # Evaluate on another dataset than the one trained on (the reference's --dataset-test).
    test_name: str | None = None
    # Synthetic data only: sizes and the seed it is generated from.
    train_size: int | None = None
    test_size: int | None = None
    seed: int = 0
    # The reference's per-dataset learning-rate schedule: lr * gamma^(milestones reached).
    lr_milestones: list[int] = field(default_factory=lambda: [60, 90, 120, 160])
    lr_gamma: float = 0.2


@dataclass
class TrainConfig:
    epochs: int = 150
    batch_size: int = 64
    seed: int = 1
    device: str = "auto"
    precision: str = "fp32"
    # Cap on optimizer steps per epoch (smoke runs); null means the whole training set.
    max_steps_per_epoch: int | None = None
    # "auto": on CUDA the CUDA-graphed step, cuDNN autotuning and (with compile) the compiled
    # PNN kernels; on the CPU eager. "off": eager everywhere.
    fast: str = "auto"
    # On the fast path, torch.compile the fused perturbation kernels: a warm-up per model, then
    # faster PNN layers (bench/RESULTS.md).
    compile: bool = True
    checkpoint_dir: str = "checkpoints"
    progress: str = "auto"
    # CPU threads of the job (torch.set_num_threads). Part of the job's identity: on the CPU
    # another thread count gives other numbers. Never derived from the launcher's cpu_workers.
    threads: int = 1
    # Refuse, before anything is logged, a job whose memory estimate exceeds its device's.
    memory_check: bool = True


@dataclass
class TrackingConfig:
    # null: $MLFLOW_TRACKING_URI if set, else sqlite:///<launch dir>/mlflow.db
    uri: str | None = None
    experiment_name: str = "pnn"
    log_checkpoint: bool = True
    # MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) per job run
    system_metrics: bool = False


@dataclass
class SweepConfig:
    rerun: bool = False
    # hydra/launcher=slurm only: submit the jobs, print their ids and links, and exit at once.
    detach: bool = False


@dataclass
class PNNConfig:
    experiment: str = "custom"
    description: str = ""
    published_test_acc: float | None = None
    dry_run: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    masks: MasksConfig = field(default_factory=MasksConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def schema() -> DictConfig:
    """The schema as a config: its keys are the only ones a composed config may hold."""
    from omegaconf import OmegaConf

    return OmegaConf.structured(PNNConfig)


def register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    # Open, so that an unknown key reaches check_known_keys (one message, with the nearest key)
    # whether it comes from a file, `key=`, `+key=` or `++key=`; types are still enforced.
    ConfigStore.instance().store(name="pnn_schema", node=open_nodes(schema()))


def check_known_keys(cfg: DictConfig) -> None:
    """Refuse a config holding a key the schema does not define."""
    known = schema()
    unknown = unknown_keys(cfg, known)
    if unknown:
        raise ConfigError(describe_unknown(unknown, known))


# --------------------------------------------------------------------------------------------
# Cross-field validation
# --------------------------------------------------------------------------------------------


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        shown = ", ".join(str(a) for a in allowed)
        raise ConfigError(f"{key} must be one of {{{shown}}} (got {value!r})")


# Values that become a file or folder name (the checkpoint folder, Hydra's job folder).
PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _plain_name(key: str, value: Any) -> None:
    if not isinstance(value, str) or not PLAIN_NAME.fullmatch(value) or set(value) == {"."}:
        raise ConfigError(
            f"{key} must be a plain name of letters, digits, '_', '-' and '.' (it names the "
            f"job's checkpoint folder) (got {value!r})"
        )


def _at_least(key: str, value: float, bound: float) -> None:
    if value < bound:
        raise ConfigError(f"{key} must be >= {bound} (got {value})")


def validate_model_options(
    name: str,
    first_filter_size: int,
    filter_size: int,
    nmasks: int,
    nfilters: int,
    in_channels: int,
    act: str,
    pool_type: str,
    noise_type: str,
) -> None:
    """The model rules, shared by :func:`validate` and ``pnn.build_model``."""
    _choice("model.name", name, MODELS)
    _choice("model.first_filter_size", first_filter_size, FILTER_SIZES)
    _choice("model.filter_size", filter_size, FILTER_SIZES)
    _choice("model.act", act, ACTS)
    _choice("model.pool_type", pool_type, POOL_TYPES)
    _choice("noise.type", noise_type, NOISE_TYPES)
    _at_least("masks.nmasks", nmasks, 1)
    _at_least("model.nfilters", nfilters, 1)
    if name == "noiseresnet18" and first_filter_size not in (3, 7):
        raise ConfigError(
            "model.first_filter_size must be one of {3, 7} for model.name=noiseresnet18 "
            f"(got {first_filter_size}); it has no perturbation stem"
        )
    if nmasks > 1 and name in ("perturb_resnet18", "cifarnet", "lenet"):
        # Grouped 1x1 conv over in*M channels with groups=in needs out % in == 0.
        if first_filter_size == 0 and nfilters % in_channels != 0:
            raise ConfigError(
                f"masks.nmasks={nmasks} > 1 needs each perturbation layer's output width to be a "
                f"multiple of its input width, but the first layer maps {in_channels} -> "
                f"{nfilters} channels (model.first_filter_size=0). Use masks.nmasks=1, a "
                f"model.first_filter_size in {{1, 3, 5, 7}}, or model.nfilters divisible by "
                f"{in_channels}"
            )


def validate(cfg: DictConfig) -> None:
    """Reject impossible configurations with a short message that names the key."""
    check_known_keys(cfg)
    _plain_name("experiment", cfg.experiment)
    _choice("dataset.name", cfg.dataset.name, tuple(DATASETS))
    if cfg.dataset.test_name is not None:
        _choice("dataset.test_name", cfg.dataset.test_name, tuple(DATASETS))
        train_spec, test_spec = DATASETS[cfg.dataset.name], DATASETS[cfg.dataset.test_name]
        if (train_spec.in_channels, train_spec.image_size, train_spec.num_classes) != (
            test_spec.in_channels,
            test_spec.image_size,
            test_spec.num_classes,
        ):
            raise ConfigError(
                f"dataset.test_name={cfg.dataset.test_name} has other images or classes than "
                f"dataset.name={cfg.dataset.name}; a model trained on one cannot be tested on "
                "the other"
            )
    spec = DATASETS[cfg.dataset.name]
    validate_model_options(
        name=cfg.model.name,
        first_filter_size=cfg.model.first_filter_size,
        filter_size=cfg.model.filter_size,
        nmasks=cfg.masks.nmasks,
        nfilters=cfg.model.nfilters,
        in_channels=spec.in_channels,
        act=cfg.model.act,
        pool_type=cfg.model.pool_type,
        noise_type=cfg.noise.type,
    )
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1) (got {cfg.model.dropout})")
    resnets = ("resnet18", "perturb_resnet18", "noiseresnet18")
    if cfg.model.name in resnets and spec.image_size != 32:
        raise ConfigError(
            f"model.name={cfg.model.name} needs 32x32 inputs; dataset.name={cfg.dataset.name} "
            f"has {spec.image_size}x{spec.image_size}. Use model=cifarnet or model=lenet"
        )
    _choice("optimizer.name", cfg.optimizer.name, OPTIMIZERS)
    if not cfg.optimizer.lr > 0:
        raise ConfigError(f"optimizer.lr must be > 0 (got {cfg.optimizer.lr})")
    _at_least("optimizer.weight_decay", cfg.optimizer.weight_decay, 0.0)
    _at_least("optimizer.momentum", cfg.optimizer.momentum, 0.0)
    if len(cfg.optimizer.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optimizer.betas):
        raise ConfigError(
            f"optimizer.betas must be two numbers in [0, 1) (got {list(cfg.optimizer.betas)})"
        )
    if cfg.optimizer.name == "sgd" and cfg.optimizer.nesterov and cfg.optimizer.momentum <= 0:
        raise ConfigError("optimizer.nesterov=true needs optimizer.momentum > 0")
    if not cfg.dataset.lr_gamma > 0:
        raise ConfigError(f"dataset.lr_gamma must be > 0 (got {cfg.dataset.lr_gamma})")
    if any(m < 1 for m in cfg.dataset.lr_milestones):
        raise ConfigError(
            f"dataset.lr_milestones must be epochs >= 1 (got {list(cfg.dataset.lr_milestones)})"
        )
    for key in ("train_size", "test_size"):
        value = cfg.dataset[key]
        if value is not None:
            _at_least(f"dataset.{key}", value, 1)
    _at_least("train.epochs", cfg.train.epochs, 0)
    _at_least("train.batch_size", cfg.train.batch_size, 1)
    _at_least("train.threads", cfg.train.threads, 1)
    if cfg.train.max_steps_per_epoch is not None:
        _at_least("train.max_steps_per_epoch", cfg.train.max_steps_per_epoch, 1)
    _choice("train.device", cfg.train.device, DEVICES)
    _choice("train.precision", cfg.train.precision, PRECISIONS)
    _choice("train.fast", cfg.train.fast, FAST_CHOICES)
    _choice("train.progress", cfg.train.progress, ("auto", "on", "off"))


def n_test_images(cfg: DictConfig) -> int:
    """Images in the test split this config evaluates on."""
    name = cfg.dataset.test_name or cfg.dataset.name
    if name == "synthetic" and cfg.dataset.test_size is not None:
        return int(cfg.dataset.test_size)
    return DATASETS[name].test_size


def warnings_for(cfg: DictConfig) -> list[str]:
    """Valid but probably unintended settings, for a warning before the sweep starts."""
    out = []
    n_test = n_test_images(cfg)
    if cfg.train.batch_size > n_test:
        out.append(
            f"train.batch_size={cfg.train.batch_size} exceeds the {n_test} test images: there "
            "is no full test batch, so test_acc_reported (the original per-batch formula) stays "
            "0. Lower train.batch_size or use a larger test set"
        )
    return out


# --------------------------------------------------------------------------------------------
# Composition outside Hydra's CLI
# --------------------------------------------------------------------------------------------


def load_config(overrides: list[str] | None = None, validate_config: bool = True) -> DictConfig:
    """Compose ``conf/`` with ``overrides`` exactly as ``sweep.py`` would, for notebooks and tests.

    Unlike ``sweep.py`` with no arguments, no experiment is selected unless an override names
    one (``experiment=e7_pnn_shared_masks``).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schema()
    overrides = list(overrides or [])
    # compose() cannot take a glob sweep; experiment stays unset unless asked for.
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    check_known_keys(cfg)  # even unvalidated: no config with a key the schema lacks
    if validate_config:
        validate(cfg)
    return cfg
