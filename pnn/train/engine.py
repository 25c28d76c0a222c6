"""Training: seeding, optimizer, lr schedule, the epoch loop, checkpoint and resume.

The step loop (:func:`run_steps`) never waits for the host: the step (:mod:`pnn.train.step`)
accumulates losses, correct counts and the first non-finite loss in device tensors, read once
per epoch. Each epoch ends with the test pass and both accuracies (:mod:`pnn.train.accuracy`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm import tqdm

from pnn.train.accuracy import EVAL_BATCHES_PER_STEP, batch_accuracies, evaluate, reported_accuracy
from pnn.train.checkpoint import load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from pnn.train.data import DeviceData
from pnn.train.packing import step_boundary
from pnn.train.step import StepTotals, TrainStep, build_train_step, execution

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = [
    "NonFiniteLossError",
    "TrainingStopped",
    "TrainResult",
    "build_optimizer",
    "lr_for_epoch",
    "run_steps",
    "seed_everything",
    "train",
]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run cannot go on."""


class TrainingStopped(Exception):
    """``should_stop()`` answered true at a step boundary: the caller asked training to end."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy (if present) and torch (CPU and every CUDA device).

    Call it before ``build_model`` so that the initial weights and masks follow from the seed.
    Seed 0 is a seed like any other.
    """
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)


# --------------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------------


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The reference's optimizers, over only the parameters that require gradients.

    Fixed masks are parameters with ``requires_grad=False``: leaving them out keeps weight
    decay and momentum off them, as in the reference.
    """
    opt = cfg.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if opt.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=opt.lr,
            momentum=opt.momentum,
            weight_decay=opt.weight_decay,
            nesterov=opt.nesterov,
        )
    if opt.name == "adam":
        return torch.optim.Adam(
            params, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay
        )
    if opt.name == "rmsprop":
        return torch.optim.RMSprop(
            params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay
        )
    raise ValueError(f"optimizer.name must be one of {{sgd, adam, rmsprop}} (got {opt.name!r})")


def lr_for_epoch(cfg: DictConfig, epoch: int) -> float:
    """Learning rate for the 1-based ``epoch``: base x gamma^(milestones m with epoch >= m).

    The reference calls ``learning_rate(e + 1)`` with the 0-based epoch ``e`` and decays when
    that argument is ``>= m``; ``e + 1`` is our 1-based epoch, so with milestone 60 the 60th
    epoch (not the 61st) is the first at the lower rate.
    """
    reached = sum(1 for milestone in cfg.dataset.lr_milestones if epoch >= milestone)
    return cfg.optimizer.lr * cfg.dataset.lr_gamma**reached


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_test_acc: float = math.nan  # honest accuracy, %
    best_epoch: int = 0  # 1-based; 0 when no epoch ran
    best_test_acc_reported: float = math.nan
    final_test_acc: float = math.nan
    resumed_from_epoch: int = 0  # the checkpoint's last finished epoch; 0 for a fresh run

    @classmethod
    def from_history(cls, history: list[dict[str, float]], resumed_from_epoch: int) -> TrainResult:
        if not history:
            return cls(resumed_from_epoch=resumed_from_epoch)
        # max() keeps the first of equal values: the earliest epoch that reached the best.
        best = max(range(len(history)), key=lambda i: history[i]["test_acc"])
        return cls(
            history=history,
            best_test_acc=history[best]["test_acc"],
            best_epoch=best + 1,
            best_test_acc_reported=max(m["test_acc_reported"] for m in history),
            final_test_acc=history[-1]["test_acc"],
            resumed_from_epoch=resumed_from_epoch,
        )


@dataclass
class _Resumed:
    """Where :func:`train` starts: the checkpoint's history, EMA and next epoch, or a fresh run."""

    history: list[dict[str, float]] = field(default_factory=list)
    reported: float = 0.0
    start_epoch: int = 1
    extra_state: dict[str, Any] = field(default_factory=dict)


def train(
    cfg: DictConfig,
    model: nn.Module,
    data: DeviceData,
    *,
    device: torch.device,
    checkpoint_path: Path,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    extra_state: dict[str, Any] | None = None,
    progress: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train ``cfg.train.epochs`` epochs, resuming from ``checkpoint_path`` if it exists.

    After every epoch a checkpoint is written atomically, then ``on_epoch(epoch, metrics)`` is
    called. ``extra_state`` is stored in each checkpoint; when resuming with ``extra_state``
    None, the checkpoint's is kept. ``should_stop`` is asked after every step: true raises
    :class:`TrainingStopped` (the last checkpoint is that of the last whole epoch).
    """
    checkpoint_path = Path(checkpoint_path)
    model.to(device)
    model.train()
    optimizer = build_optimizer(cfg, model)
    generator = torch.Generator(device=data.device)
    generator.manual_seed(cfg.train.seed)
    run = _resume(checkpoint_path, model, optimizer, generator, extra_state)

    step = build_train_step(cfg, model, optimizer, device)
    steps_per_epoch = data.steps_per_epoch(cfg.train.batch_size, cfg.train.max_steps_per_epoch)
    show = _Progress(cfg.train.epochs, steps_per_epoch) if progress else None

    with execution(cfg, model, device):
        for epoch in range(run.start_epoch, cfg.train.epochs + 1):
            metrics = _train_epoch(
                cfg, model, optimizer, step, data, generator, device, epoch, run, show, should_stop
            )
            run.history.append(metrics)
            _save(checkpoint_path, epoch, model, optimizer, generator, run)
            if show is not None:  # before on_epoch, so that the caller's log starts a fresh line
                show.epoch_done(epoch, metrics)
            if on_epoch is not None:
                on_epoch(epoch, metrics)

    return TrainResult.from_history(run.history, run.start_epoch - 1)


def _save(
    checkpoint_path: Path,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    run: _Resumed,
) -> None:
    save_checkpoint(
        checkpoint_path,
        {
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": rng_states(generator),
            "reported_ema": run.reported,
            "history": run.history,
            "extra_state": run.extra_state,
        },
    )


def _resume(
    checkpoint_path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    extra_state: dict[str, Any] | None,
) -> _Resumed:
    """Load the checkpoint into model, optimizer and generator, if there is one."""
    run = _Resumed()
    checkpoint = load_checkpoint(checkpoint_path)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        restore_rng_states(checkpoint["rng"], generator)
        run.history = list(checkpoint["history"])
        run.reported = checkpoint["reported_ema"]
        run.start_epoch = checkpoint["epoch"] + 1
        if extra_state is None:
            extra_state = checkpoint["extra_state"]
    run.extra_state = dict(extra_state or {})  # always a dict in the checkpoint, for .get
    return run


def _train_epoch(
    cfg: DictConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: TrainStep,
    data: DeviceData,
    generator: torch.Generator,
    device: torch.device,
    epoch: int,
    run: _Resumed,
    show: _Progress | None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """One epoch: set its lr, run its steps, test; returns the epoch's metrics and updates the
    reported EMA in ``run``."""
    # A Python float in param_group["lr"] (set between epochs): the eager optimizers read it
    # without a host sync. The CUDA-graphed step (pnn.train.cuda_graph) bakes it in and is captured
    # again at the first full batch of every epoch.
    lr = lr_for_epoch(cfg, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr

    batch_size = cfg.train.batch_size
    started = time.perf_counter()
    inputs, labels = data.training_epoch(batch_size, generator, cfg.train.max_steps_per_epoch)
    totals = StepTotals.zeros(device)
    on_step = None if show is None else functools.partial(show.step, epoch)
    run_steps(step, inputs, labels, batch_size, totals, on_step, should_stop)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - started
    _raise_if_non_finite(totals, epoch)

    test_loss_sum, correct = evaluate(
        model,
        data.test_inputs,
        data.test_labels,
        batch_size * EVAL_BATCHES_PER_STEP,
        cfg.train.precision,
    )
    run.reported = reported_accuracy(run.reported, batch_accuracies(correct, batch_size))
    seen = len(labels)
    return {
        "train_loss": totals.loss_sum.item() / seen,
        "train_acc": totals.correct.item() * 100.0 / seen,
        "test_loss": test_loss_sum.item() / len(correct),
        "test_acc": correct.sum().item() * 100.0 / len(correct),
        "test_acc_reported": run.reported,
        "lr": lr,
        # Train + test pass; the checkpoint is written after, so that it can hold this.
        "epoch_time_s": time.perf_counter() - started,
        "train_img_per_s": seen / train_seconds,
    }


def run_steps(
    step: TrainStep,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    totals: StepTotals,
    on_step: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> None:
    """The step loop: one ``step`` per batch of the epoch tensors, no host sync;
    ``on_step(done)`` after each (the progress bar), then :class:`TrainingStopped` if
    ``should_stop()``."""
    for index, begin in enumerate(range(0, len(labels), batch_size)):
        step(inputs[begin : begin + batch_size], labels[begin : begin + batch_size], totals)
        step_boundary()  # packed seeds (pnn.train.packing) take turns here; else a no-op
        if on_step is not None:
            on_step(index + 1)
        if should_stop is not None and should_stop():
            raise TrainingStopped


def _raise_if_non_finite(totals: StepTotals, epoch: int) -> None:
    bad_step = int(totals.first_bad_step.item())
    if bad_step >= 0:
        value = totals.first_bad_loss.item()
        kind = "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        raise NonFiniteLossError(f"loss became {kind} at epoch {epoch} step {bad_step}")


class _Progress:
    """A tqdm bar per epoch on stderr, replaced by the epoch's summary line when it ends."""

    def __init__(self, epochs: int, steps: int) -> None:
        self.epochs, self.steps = epochs, steps
        self.bar: tqdm | None = None

    def step(self, epoch: int, done: int) -> None:
        if self.bar is None:
            self.bar = tqdm(
                total=self.steps,
                desc=f"epoch {epoch}/{self.epochs}",
                bar_format="{desc} [{bar:20}] {n_fmt}/{total_fmt} {rate_fmt}",
                ascii=".#",
                unit="step",
                leave=False,  # the summary line takes its place
                file=sys.stderr,
            )
        self.bar.update(done - self.bar.n)

    def epoch_done(self, epoch: int, m: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        tqdm.write(
            f"epoch {epoch}/{self.epochs}  loss {m['train_loss']:.4f}  "
            f"train {m['train_acc']:.2f}%  test {m['test_acc']:.2f}%  "
            f"(reported {m['test_acc_reported']:.2f}%)  lr {m['lr']:.2e}  "
            f"{m['epoch_time_s']:.1f}s  {m['train_img_per_s']:.0f} img/s",
            file=sys.stderr,
        )
