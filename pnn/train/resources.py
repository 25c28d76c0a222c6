"""Will a job fit in its device's memory? An estimate made before anything is logged.

Parameter and mask bytes are exact: the model is built on the meta device, which allocates
nothing. Activations are what autograd keeps for the backward pass in one forward pass over a
batch of ``train.batch_size``, measured on the meta device through saved-tensor hooks, with the
perturbation layers in their reference formulation (every (batch, channels, masks, H, W)
fan-out kept). The eager and fused paths keep less, so this is an upper bound on them.
"""

from __future__ import annotations

import functools
import os
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pnn.config import DATASETS, ConfigError

if TYPE_CHECKING:
    from omegaconf import DictConfig

GIB = 1 << 30
# Optimizer state per trainable parameter, in parameter copies.
OPTIMIZER_STATE = {"sgd": 1, "adam": 2, "rmsprop": 1}


@dataclass
class Estimate:
    parameters: int  # weights and masks (exact)
    training_state: int  # gradients and optimizer state of the trainable ones
    activations: int  # kept for backward, upper bound
    data: int  # both splits on the device

    @property
    def total(self) -> int:
        return self.parameters + self.training_state + self.activations + self.data

    def describe(self) -> str:
        parts = (
            ("parameters and masks", self.parameters),
            ("gradients and optimizer state", self.training_state),
            ("activations", self.activations),
            ("data", self.data),
        )
        return ", ".join(f"{name} {size / GIB:.1f}" for name, size in parts)


def _split_sizes(cfg: DictConfig) -> tuple[int, int]:
    train = DATASETS[cfg.dataset.name]
    test = DATASETS[cfg.dataset.test_name or cfg.dataset.name]
    n_train, n_test = train.train_size, test.test_size
    if cfg.dataset.name == "synthetic":
        n_train = cfg.dataset.train_size or n_train
    if (cfg.dataset.test_name or cfg.dataset.name) == "synthetic":
        n_test = cfg.dataset.test_size or n_test
    return n_train, n_test


def estimate(cfg: DictConfig) -> Estimate:
    import torch

    from pnn.model.fused import FusedSettings
    from pnn.model.layers import use_fused
    from pnn.model.models import build_model

    spec = DATASETS[cfg.dataset.name]
    with torch.device("meta"):
        model = build_model(cfg, init=False)
    model.train()
    tensors = list(model.parameters()) + list(model.buffers())
    weights = sum(t.numel() * t.element_size() for t in tensors)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = trainable * (1 + OPTIMIZER_STATE.get(cfg.optimizer.name, 2))
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[id(t)] = t.numel() * t.element_size()
        return t

    size = spec.image_size
    x = torch.empty(cfg.train.batch_size, spec.in_channels, size, size, device="meta")
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with use_fused(model, FusedSettings(reference=True)), hooks:
        model(x)
    n_train, n_test = _split_sizes(cfg)
    pixels = spec.in_channels * size * size
    data = n_train * pixels + n_test * pixels * 4 + (n_train + n_test) * 8  # uint8, fp32, labels
    return Estimate(weights, state, sum(kept.values()), data)


@functools.cache
def _nvidia_smi_rows() -> tuple[tuple[str, str], ...]:
    """(index, memory MiB) of every GPU, asked once per process (a sweep checks every job)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(tuple(line.split(",")[:2]) for line in out.strip().splitlines() if "," in line)


def gpu_memory() -> int | None:
    """The smallest visible GPU's memory, from nvidia-smi (no CUDA context in this process)."""
    rows = _nvidia_smi_rows()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        wanted = {v.strip() for v in visible.split(",")}
        rows = tuple(r for r in rows if r[0].strip() in wanted)
    sizes = [int(r[1]) * (1 << 20) for r in rows if r[1].strip().isdigit()]
    return min(sizes) if sizes else None


def ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory(cfg: DictConfig, gpus_visible: bool) -> tuple[str, int | None]:
    on_gpu = cfg.train.device == "cuda" or (cfg.train.device == "auto" and gpus_visible)
    if on_gpu:
        return "the GPU's memory", gpu_memory()
    return "the machine's RAM", ram()


def check_fits(cfg: DictConfig, gpus_visible: bool) -> None:
    """ConfigError, naming the size keys and the estimate, if the job cannot fit."""
    if not cfg.train.memory_check:
        return
    where, limit = device_memory(cfg, gpus_visible)
    if limit is None:
        return
    est = estimate(cfg)
    if est.total <= limit:
        return
    raise ConfigError(
        f"this job needs about {est.total / GIB:.1f} GiB ({est.describe()} GiB) but "
        f"{where} is {limit / GIB:.1f} GiB. Lower masks.nmasks ({cfg.masks.nmasks}), "
        f"model.nfilters ({cfg.model.nfilters}) or train.batch_size ({cfg.train.batch_size}); "
        "train.memory_check=false skips this check"
    )
