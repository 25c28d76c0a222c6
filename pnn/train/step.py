"""One training step and how it executes: forward, backward, optimizer step and accumulation
into device tensors (:class:`StepTotals`), as one function of tensors (:func:`make_train_step`).

On CUDA :func:`build_train_step` replays that step from a CUDA graph (:mod:`pnn.train.cuda_graph`),
and
:func:`execution` sets the cuDNN autotuning and the PNN layers' compiled kernels for the length
of a run only. The loop that calls the step is :mod:`pnn.train.engine`'s.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = [
    "StepTotals",
    "TrainStep",
    "autocast",
    "build_train_step",
    "execution",
    "make_train_step",
    "use_fast_path",
]


@dataclass
class StepTotals:
    """Per-epoch sums kept on the device, so that no step has to wait for the host."""

    loss_sum: torch.Tensor  # sum over samples of the (batch-mean) loss x batch size
    correct: torch.Tensor
    steps: torch.Tensor
    first_bad_step: torch.Tensor  # 1-based step of the first non-finite loss, -1 if none
    first_bad_loss: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> StepTotals:
        def scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(value, dtype=dtype, device=device)

        return cls(
            loss_sum=scalar(0.0, torch.float32),
            correct=scalar(0, torch.int64),
            steps=scalar(0, torch.int64),
            first_bad_step=scalar(-1, torch.int64),
            first_bad_loss=scalar(0.0, torch.float32),
        )

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        # In-place updates only: a captured CUDA graph keeps pointing at the same tensors.
        loss = loss.detach().float()
        self.steps += 1
        first = ~torch.isfinite(loss) & (self.first_bad_step < 0)
        self.first_bad_step.copy_(torch.where(first, self.steps, self.first_bad_step))
        self.first_bad_loss.copy_(torch.where(first, loss, self.first_bad_loss))
        self.loss_sum += loss * labels.shape[0]
        self.correct += (logits.detach().argmax(1) == labels).sum()


# step(inputs, labels, totals): one batch, accumulated into totals on the device.
TrainStep = Callable[[torch.Tensor, torch.Tensor, StepTotals], None]


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``train.precision=bf16``; nothing for fp32."""
    if precision == "bf16":
        # No cast cache: a CUDA graph must not capture casts cached from an earlier step.
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def make_train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, precision: str, device: torch.device
) -> TrainStep:
    """Forward, backward, optimizer step and accumulation for one batch; no host sync."""

    def step(inputs: torch.Tensor, labels: torch.Tensor, totals: StepTotals) -> None:
        with autocast(precision, device):
            logits = model(inputs)
            loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals.add(loss, logits, labels)

    return step


def use_fast_path(cfg: DictConfig, device: torch.device) -> bool:
    """Whether ``train.fast`` asks for the GPU speed-ups ("auto": on CUDA only; CPU stays eager)."""
    return device.type == "cuda" and cfg.train.fast == "auto"


@contextlib.contextmanager
def execution(cfg: DictConfig, model: nn.Module, device: torch.device) -> Iterator[None]:
    """Inside the block, ``model`` runs as ``train.fast`` and ``train.compile`` ask; everything
    is as before afterwards.

    On the fast path (CUDA only) cuDNN autotunes kernels for the fixed shapes
    (``cudnn.benchmark``) and the PNN layers may use their compiled kernels
    (:class:`pnn.model.fused.FusedSettings`); otherwise the layers stay eager.
    """
    from pnn.model.fused import FusedSettings
    from pnn.model.layers import use_fused

    fast = use_fast_path(cfg, device)
    settings = FusedSettings(compiled=fast and bool(getattr(cfg.train, "compile", True)))
    benchmark = torch.backends.cudnn.benchmark
    if fast:
        torch.backends.cudnn.benchmark = True
    try:
        with use_fused(model, settings):
            yield
    finally:
        torch.backends.cudnn.benchmark = benchmark


def build_train_step(
    cfg: DictConfig, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> TrainStep:
    """The step :func:`train` runs, as ``train.fast`` and ``train.precision`` ask (the bench
    times this same function); run it inside :func:`execution`.

    On the fast path (CUDA only) the whole step is replayed from a CUDA graph
    (:mod:`pnn.train.cuda_graph`). On the CPU the step stays eager, which keeps it bit-reproducible.
    """
    from pnn.train.cuda_graph import GraphedTrainStep, graph_unsupported

    step = make_train_step(model, optimizer, cfg.train.precision, device)
    if not use_fast_path(cfg, device):
        return step
    reason = graph_unsupported(model, optimizer)
    if reason is not None:
        print(f"[pnn] training step not graph-captured: {reason}", file=sys.stderr)
        return step
    return GraphedTrainStep(step, optimizer, cfg.train.batch_size)
