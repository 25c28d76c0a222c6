"""Evaluation and the two accuracies: the honest one (correct/total over the test set) and the
original authors' "reported" one (an exponential moving average of per-batch accuracies).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pnn.train.step import autocast

__all__ = ["EVAL_BATCHES_PER_STEP", "batch_accuracies", "evaluate", "reported_accuracy"]

# Evaluation batches are this many training batches: no gradients are kept, so the peak
# memory stays near the training step's while the test pass needs ~8x fewer launches.
EVAL_BATCHES_PER_STEP = 8


@torch.no_grad()
def evaluate(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss (a device scalar) and per-sample correctness (bool, len(labels)) in eval mode.

    Keeping per-sample correctness lets the caller group it into batches of any size: eval-mode
    outputs do not depend on how the test set is batched.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float32, device=inputs.device)
    correct = torch.empty(len(labels), dtype=torch.bool, device=inputs.device)
    for start in range(0, len(labels), batch_size):
        batch_labels = labels[start : start + batch_size]
        with autocast(precision, inputs.device):
            logits = model(inputs[start : start + batch_size])
        loss_sum += F.cross_entropy(logits.float(), batch_labels, reduction="sum")
        correct[start : start + batch_size] = logits.argmax(1) == batch_labels
    model.train(was_training)
    return loss_sum, correct


def batch_accuracies(correct: torch.Tensor, batch_size: int) -> list[float]:
    """Per-batch accuracies (%) of consecutive batches of ``batch_size``; a last, smaller batch
    is left out, as the original authors' smoothing skipped it."""
    full = len(correct) // batch_size
    counts = correct[: full * batch_size].view(full, batch_size).sum(1).tolist()
    return [count * 100.0 / batch_size for count in counts]


def reported_accuracy(previous: float, accuracies: Iterable[float]) -> float:
    """The original authors' "accuracy": an EMA over per-batch accuracies, carried over from
    ``previous`` (0 before the first epoch; never reset between epochs)."""
    smoothed = previous
    for accuracy in accuracies:
        # 0.3 written out: 1 - 0.7 is 0.30000000000000004 in floating point.
        smoothed = 0.7 * smoothed + 0.3 * accuracy
    return smoothed
