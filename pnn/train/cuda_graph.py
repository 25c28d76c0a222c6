"""The whole training step (forward, backward, optimizer, metric sums) replayed from a CUDA graph.

At small batch sizes a step is a few hundred small kernels and the GPU waits on the host that
launches them; replaying a captured graph launches them all at once (figures in
bench/RESULTS.md). The graph computes exactly what the eager step computes:

- the first steps run eagerly on a side stream, as capture requires; they are real steps;
- each replay trains on whatever batch was copied into the static input buffers;
- a graph bakes in the learning rate, so it is captured again at each epoch's first step;
- a batch of another size (the last, partial one) runs eagerly.

Where capture is not possible (rrelu's host RNG, optimizers other than SGD),
:func:`graph_unsupported` says why and the engine stays eager.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

WARMUP_STEPS = 3


def graph_unsupported(model: nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """Why this model and optimizer cannot be captured, or None when they can."""
    if any(isinstance(m, nn.RReLU) for m in model.modules()):
        return "rrelu draws its training noise from host-side RNG state"
    if type(optimizer) is not torch.optim.SGD:
        return f"{type(optimizer).__name__} keeps its step count on the host"
    return None


class GraphedTrainStep:
    """Call like the eager step: ``step(inputs, labels, totals)``; no host synchronisation."""

    def __init__(
        self,
        eager_step: Callable[[torch.Tensor, torch.Tensor, Any], None],
        optimizer: torch.optim.Optimizer,
        batch_size: int,
    ) -> None:
        self.eager_step = eager_step
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.warm_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.bound_totals: Any = None
        self.static_inputs: torch.Tensor | None = None
        self.static_labels: torch.Tensor | None = None
        self.captures = 0  # for tests and the benchmark

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor, totals: Any) -> None:
        if inputs.shape[0] != self.batch_size or self.warm_steps < WARMUP_STEPS:
            self._eager(inputs, labels, totals)
            return
        if self.graph is None or totals is not self.bound_totals:
            self._capture(inputs, labels, totals)
        assert self.graph is not None and self.static_inputs is not None
        assert self.static_labels is not None
        self.static_inputs.copy_(inputs, non_blocking=True)
        self.static_labels.copy_(labels, non_blocking=True)
        self.graph.replay()

    def _eager(self, inputs: torch.Tensor, labels: torch.Tensor, totals: Any) -> None:
        # Warm-up runs on a side stream (cuBLAS/cuDNN workspaces, optimizer state and compiled
        # kernels are then created outside any capture), as torch.cuda.graphs asks.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.eager_step(inputs, labels, totals)
        torch.cuda.current_stream().wait_stream(side)
        self.warm_steps += 1
        self.graph = None  # its grads are no longer the parameters' .grad: capture anew

    def _capture(self, inputs: torch.Tensor, labels: torch.Tensor, totals: Any) -> None:
        self.graph = None
        self.static_inputs = torch.empty_like(inputs)
        self.static_labels = torch.empty_like(labels)
        self.static_inputs.copy_(inputs)
        self.static_labels.copy_(labels)
        # Gradients are allocated inside the capture, from the graph's own memory pool.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.eager_step(self.static_inputs, self.static_labels, totals)
        self.graph, self.bound_totals = graph, totals
        self.captures += 1
