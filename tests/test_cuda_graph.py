"""The CUDA-graphed training step (pnn/train/cuda_graph.py) against the eager step, through train().

Two epochs across an lr milestone, each with a last partial batch: the graph is captured once
per epoch (the lr and the epoch's sums are baked in), the partial batch runs eagerly, and the
run ends where the eager run ends. Needs a GPU; ``bench/device_run.sh`` runs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pnn.config import load_config
from pnn.model.models import build_model
from pnn.train import cuda_graph
from pnn.train.data import load_data
from pnn.train.engine import seed_everything, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

BATCH = 16
TRAIN_SIZE = 12 * BATCH + 8  # 12 full batches and a last one of 8
OVERRIDES = [
    # PNN layers with 64 shared masks (e7), narrow; no compiled kernels, so that the graph is
    # the only difference between the two runs.
    "experiment=e7_pnn_shared_masks",
    "profile=smoke",
    "model.nfilters=16",
    f"dataset.train_size={TRAIN_SIZE}",
    "dataset.test_size=64",
    "dataset.lr_milestones=[2]",
    "train.epochs=2",
    "train.max_steps_per_epoch=null",
    f"train.batch_size={BATCH}",
    "train.compile=false",
]


def run(fast: str, tmp_path: Path) -> tuple[list[dict[str, float]], torch.Tensor]:
    cfg = load_config([*OVERRIDES, f"train.fast={fast}"])
    device = torch.device("cuda")
    seed_everything(0)
    model = build_model(cfg)
    data = load_data(cfg, device, tmp_path / "data")
    result = train(cfg, model, data, device=device, checkpoint_path=tmp_path / f"{fast}.pt")
    weights = torch.cat([p.detach().flatten() for p in model.parameters()]).cpu()
    return result.history, weights


@pytest.fixture
def deterministic_cuda() -> Iterator[None]:
    """TF32 off, deterministic cuDNN kernels, and autotuning on for both runs (train.fast=auto
    turns it on; with it on already, the eager run picks its kernels the same way and the
    second run reuses the process's choices)."""
    flags = ("allow_tf32", "deterministic", "benchmark")
    saved = torch.backends.cuda.matmul.allow_tf32, [getattr(torch.backends.cudnn, f) for f in flags]
    torch.backends.cuda.matmul.allow_tf32 = False
    for flag, value in zip(flags, (False, True, True), strict=True):
        setattr(torch.backends.cudnn, flag, value)
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved[0]
    for flag, value in zip(flags, saved[1], strict=True):
        setattr(torch.backends.cudnn, flag, value)


def test_graphed_training_matches_eager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deterministic_cuda: None
) -> None:
    calls = {"capture": 0, "eager": 0, "sizes": []}
    capture, eager = cuda_graph.GraphedTrainStep._capture, cuda_graph.GraphedTrainStep._eager

    def counted_capture(self, inputs, labels, totals):
        calls["capture"] += 1
        return capture(self, inputs, labels, totals)

    def counted_eager(self, inputs, labels, totals):
        calls["eager"] += 1
        calls["sizes"].append(inputs.shape[0])
        return eager(self, inputs, labels, totals)

    monkeypatch.setattr(cuda_graph.GraphedTrainStep, "_capture", counted_capture)
    monkeypatch.setattr(cuda_graph.GraphedTrainStep, "_eager", counted_eager)

    eager_history, eager_weights = run("off", tmp_path)
    assert calls == {"capture": 0, "eager": 0, "sizes": []}  # off: the plain eager step
    graph_history, graph_weights = run("auto", tmp_path)

    # Epoch 1: the warm-up steps and the partial batch eager, one capture; epoch 2: a new
    # capture for the new lr and sums, the partial batch eager.
    warmup = cuda_graph.WARMUP_STEPS
    assert calls["capture"] == 2
    assert calls["sizes"] == [BATCH] * warmup + [8, 8]
    lr = load_config(OVERRIDES).optimizer.lr
    for history in (eager_history, graph_history):
        assert [m["lr"] for m in history] == pytest.approx([lr, lr * 0.2])
    for eager_m, graph_m in zip(eager_history, graph_history, strict=True):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert graph_m[key] == pytest.approx(eager_m[key], rel=1e-4, abs=1e-4), key
    diff = (graph_weights - eager_weights).norm() / eager_weights.norm()
    assert diff.item() <= 1e-4
