"""The training engine: schedule, optimizer, both accuracies, determinism, NaN, resume."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import clean_env, fork_program
from forkserver import ForkedProcess
from torch import nn

from pnn.config import load_config
from pnn.model import models
from pnn.model.layers import PerturbLayer
from pnn.train.accuracy import batch_accuracies, reported_accuracy
from pnn.train.checkpoint import load_checkpoint
from pnn.train.data import load_data
from pnn.train.engine import (
    NonFiniteLossError,
    TrainResult,
    build_optimizer,
    lr_for_epoch,
    seed_everything,
    train,
)
from pnn.train.step import build_train_step, execution

CPU = torch.device("cpu")
TIMING = ("epoch_time_s", "train_img_per_s")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a busy 2-core machine punishes two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyNet(nn.Module):
    """A few thousand parameters, with what matters to the engine: a fixed (or trained)
    perturbation mask as a parameter, BatchNorm state, and dropout (random in training)."""

    def __init__(self, train_mask: bool = False) -> None:
        super().__init__()
        self.mask = nn.Parameter(torch.rand(1, 3, 32, 32) * 2 - 1, requires_grad=train_mask)
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x + 0.1 * self.mask)))
        return self.fc(self.drop(F.adaptive_avg_pool2d(x, 4).flatten(1)))


def small_config(*overrides: str):
    """Synthetic data whose test set (40) ends in a partial batch of 16."""
    return load_config(
        [
            "profile=smoke",
            "dataset.train_size=96",
            "dataset.test_size=40",
            "train.batch_size=16",
            "train.max_steps_per_epoch=null",
            "train.epochs=3",
            "optimizer.lr=0.05",
            *overrides,
        ]
    )


def run_tiny(cfg, checkpoint: Path, **kwargs) -> tuple[TrainResult, TinyNet]:
    seed_everything(cfg.train.seed)
    model = TinyNet(train_mask=cfg.masks.train)
    data = load_data(cfg, CPU, Path("."))
    return train(cfg, model, data, device=CPU, checkpoint_path=checkpoint, **kwargs), model


def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in metrics.items() if k not in TIMING} for metrics in history]


# --------------------------------------------------------------------------------------------
# Schedule and optimizer
# --------------------------------------------------------------------------------------------


def reference_learning_rate(dataset: str, lr: float, epoch: int) -> float:
    """The reference's ``Model.learning_rate``, as written there."""
    if dataset == "cifar10":
        return lr * (
            (0.2 ** int(epoch >= 60))
            * (0.2 ** int(epoch >= 90))
            * (0.2 ** int(epoch >= 120))
            * (0.2 ** int(epoch >= 160))
        )
    if dataset == "cifar100":
        return lr * (
            (0.1 ** int(epoch >= 80)) * (0.1 ** int(epoch >= 120)) * (0.1 ** int(epoch >= 160))
        )
    return lr * ((0.2 ** int(epoch >= 30)) * (0.2 ** int(epoch >= 60)) * (0.2 ** int(epoch >= 90)))


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "mnist"])
def test_lr_schedule_matches_the_reference(dataset: str) -> None:
    model = "model=lenet" if dataset == "mnist" else "model=resnet18"
    cfg = load_config([f"dataset={dataset}", model])
    for e in range(200):  # the reference's 0-based epoch; it trains epoch e at lr(e + 1)
        expected = reference_learning_rate(dataset, cfg.optimizer.lr, e + 1)
        assert lr_for_epoch(cfg, e + 1) == pytest.approx(expected, rel=1e-12), e


def test_lr_schedule_boundaries() -> None:
    cfg = load_config(["optimizer.lr=1.0"])  # cifar10: x0.2 at 60, 90, 120, 160
    lrs = {epoch: lr_for_epoch(cfg, epoch) for epoch in (1, 59, 60, 61, 89, 90, 150, 160)}
    assert lrs[1] == lrs[59] == 1.0
    assert lrs[60] == lrs[61] == lrs[89] == pytest.approx(0.2)  # the 60th epoch is already lower
    assert lrs[90] == pytest.approx(0.04)
    assert lrs[150] == pytest.approx(0.2**3)
    assert lrs[160] == pytest.approx(0.2**4)


def test_optimizers_follow_the_config() -> None:
    model = TinyNet()
    sgd = build_optimizer(load_config(["optimizer.lr=0.01"]), model)
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (0.01, 0.9, True)
    assert group["weight_decay"] == 1e-4

    adam = build_optimizer(load_config(["optimizer=adam", "optimizer.betas=[0.8,0.99]"]), model)
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["betas"] == (0.8, 0.99)
    rmsprop = build_optimizer(load_config(["optimizer=rmsprop"]), model)
    assert isinstance(rmsprop, torch.optim.RMSprop)
    assert rmsprop.param_groups[0]["momentum"] == 0.9


def test_optimizer_leaves_out_fixed_masks() -> None:
    cfg = load_config([])
    fixed, trained = TinyNet(train_mask=False), TinyNet(train_mask=True)
    fixed_params = build_optimizer(cfg, fixed).param_groups[0]["params"]
    trained_params = build_optimizer(cfg, trained).param_groups[0]["params"]
    assert not any(p is fixed.mask for p in fixed_params)
    assert len(fixed_params) == len(list(fixed.parameters())) - 1
    assert any(p is trained.mask for p in trained_params)
    assert len(trained_params) == len(list(trained.parameters()))


# --------------------------------------------------------------------------------------------
# The two accuracies
# --------------------------------------------------------------------------------------------


def reference_reported(epochs_of_correct: list[torch.Tensor], batch_size: int) -> list[float]:
    """The original authors' loop: batches in order, partial ones skipped, r never reset."""
    r, per_epoch = 0.0, []
    for correct in epochs_of_correct:
        for start in range(0, len(correct), batch_size):
            batch = correct[start : start + batch_size]
            if len(batch) < batch_size:
                continue
            acc = int(batch.sum()) * 100.0 / batch_size
            r = 0.7 * r + 0.3 * acc
        per_epoch.append(r)
    return per_epoch


@pytest.mark.parametrize(("size", "batch_size"), [(100, 10), (103, 10), (7, 16), (1000, 64)])
def test_reported_accuracy_matches_the_reference_loop(size: int, batch_size: int) -> None:
    rng = torch.Generator().manual_seed(size)
    epochs = [torch.rand(size, generator=rng) < p for p in (0.3, 0.6, 0.9)]
    ours, r = [], 0.0
    for correct in epochs:
        r = reported_accuracy(r, batch_accuracies(correct, batch_size))
        ours.append(r)
    assert ours == reference_reported(epochs, batch_size)


def test_reported_accuracy_exceeds_actual_early_and_lags_later() -> None:
    # The EMA starts at 0, so after one pass over 100 batches it is within 0.7^100 of the
    # last batches' accuracy, not the mean: with accuracy rising through the pass, it is high.
    correct = torch.cat([torch.zeros(500, dtype=torch.bool), torch.ones(500, dtype=torch.bool)])
    reported = reported_accuracy(0.0, batch_accuracies(correct, 10))
    assert reported == pytest.approx(100.0) and correct.float().mean() * 100 == 50.0
    # Later the EMA, never reset between epochs, trails the actual accuracy when a pass has
    # few batches (here two): 0.7^2 = 0.49 of the previous value stays.
    half = torch.tensor([True, False] * 10)  # two batches of 10 at 50%
    reported = reported_accuracy(reported, batch_accuracies(half, 10))
    assert reported == pytest.approx(0.49 * 100 + 0.51 * 50) and reported > 50  # lags a drop
    most = torch.tensor([True] * 9 + [False]).repeat(2)  # two batches at 90%
    reported = reported_accuracy(reported, batch_accuracies(most, 10))
    assert reported == pytest.approx(0.49 * 74.5 + 0.51 * 90) and reported < 90  # lags a rise


def test_epoch_metrics_match_a_straightforward_evaluation(tmp_path: Path) -> None:
    """Honest and reported accuracy per epoch, against the test set batched at batch_size."""
    cfg = small_config()
    data = load_data(cfg, CPU, Path("."))
    seed_everything(0)
    model = TinyNet()
    corrects: list[torch.Tensor] = []

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(data.test_inputs[s : s + 16]) for s in range(0, 40, 16)])
        model.train()
        corrects.append(logits.argmax(1) == data.test_labels)
        honest = corrects[-1].sum().item() * 100.0 / 40  # the last batch, of 8, counts
        assert metrics["test_acc"] == pytest.approx(honest)
        assert metrics["test_acc_reported"] == pytest.approx(reference_reported(corrects, 16)[-1])
        assert metrics["lr"] == lr_for_epoch(cfg, epoch)

    checkpoint = tmp_path / "run.pt"
    result = train(cfg, model, data, device=CPU, checkpoint_path=checkpoint, on_epoch=on_epoch)
    assert len(corrects) == 3
    history = result.history
    assert result.best_test_acc == max(m["test_acc"] for m in history)
    assert history[result.best_epoch - 1]["test_acc"] == result.best_test_acc
    assert result.best_test_acc_reported == max(m["test_acc_reported"] for m in history)
    assert result.final_test_acc == history[-1]["test_acc"]
    for metrics in history:
        assert all(math.isfinite(v) for v in metrics.values())
        assert metrics["train_img_per_s"] > 0 and metrics["epoch_time_s"] > 0


def test_a_small_model_learns_the_synthetic_data(tmp_path: Path) -> None:
    cfg = small_config("dataset.train_size=512", "dataset.test_size=200", "train.epochs=4")
    result, _ = run_tiny(cfg, tmp_path / "run.pt")
    assert result.final_test_acc > 50.0  # chance is 10%
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


# --------------------------------------------------------------------------------------------
# Determinism, NaN, precision, progress
# --------------------------------------------------------------------------------------------


def test_same_seed_same_metrics_and_seed_zero_is_a_seed(tmp_path: Path) -> None:
    first, model_a = run_tiny(small_config("train.seed=0"), tmp_path / "a.pt")
    second, model_b = run_tiny(small_config("train.seed=0"), tmp_path / "b.pt")
    other, _ = run_tiny(small_config("train.seed=1"), tmp_path / "c.pt")
    assert without_timing(first.history) == without_timing(second.history)
    for name, tensor in model_a.state_dict().items():
        assert torch.equal(tensor, model_b.state_dict()[name]), name
    assert without_timing(first.history) != without_timing(other.history)


def test_non_finite_loss_stops_the_run(tmp_path: Path) -> None:
    checkpoint = tmp_path / "run.pt"
    with pytest.raises(NonFiniteLossError) as caught:
        run_tiny(small_config("optimizer.lr=1e30", "optimizer.weight_decay=0"), checkpoint)
    assert re.fullmatch(r"loss became (NaN|inf) at epoch 1 step [2-6]", str(caught.value))
    assert not checkpoint.exists()  # no checkpoint of a diverged epoch


def test_bf16_autocast_trains(tmp_path: Path) -> None:
    """bf16 is in effect where it should be: the conv's activations are bf16 in training and
    in evaluation (fp32 with train.precision=fp32), while the weights stay fp32."""
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        cfg = small_config(f"train.precision={precision}", "train.epochs=1")
        seed_everything(cfg.train.seed)
        model = TinyNet()
        seen: set[tuple[bool, torch.dtype]] = set()
        model.conv.register_forward_hook(
            lambda mod, _, out, seen=seen: seen.add((mod.training, out.dtype))
        )
        data = load_data(cfg, CPU, Path("."))
        result = train(cfg, model, data, device=CPU, checkpoint_path=tmp_path / f"{precision}.pt")
        assert seen == {(True, dtype), (False, dtype)}, precision
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert all(math.isfinite(v) for v in result.history[0].values())


def test_progress_goes_to_stderr_only_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_tiny(small_config("train.epochs=1"), tmp_path / "quiet.pt")
    assert capsys.readouterr() == ("", "")
    run_tiny(small_config("train.epochs=2"), tmp_path / "loud.pt", progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert "epoch 1/2 [" in err and "\repoch 2/2  loss " in err and err.endswith("img/s\n")


# --------------------------------------------------------------------------------------------
# Checkpoints and resume
# --------------------------------------------------------------------------------------------


def test_resume_continues_exactly(tmp_path: Path) -> None:
    whole, whole_model = run_tiny(small_config("train.epochs=4"), tmp_path / "whole.pt")

    checkpoint = tmp_path / "parts.pt"
    first, _ = run_tiny(small_config("train.epochs=2"), checkpoint, extra_state={"run_id": "abc"})
    state = load_checkpoint(checkpoint)
    assert state["epoch"] == 2 and state["extra_state"] == {"run_id": "abc"}
    assert without_timing(state["history"]) == without_timing(first.history)
    assert "mask" in state["model"]  # a fixed mask is part of the model's state

    seen: list[int] = []
    rest, rest_model = run_tiny(
        small_config("train.epochs=4"), checkpoint, on_epoch=lambda e, m: seen.append(e)
    )
    assert seen == [3, 4] and rest.resumed_from_epoch == 2
    assert without_timing(rest.history) == without_timing(whole.history)
    for name, tensor in whole_model.state_dict().items():
        assert torch.equal(tensor, rest_model.state_dict()[name]), name
    assert load_checkpoint(checkpoint)["extra_state"] == {"run_id": "abc"}  # kept on resume

    # A finished run resumed again trains nothing and reports the same.
    again, _ = run_tiny(
        small_config("train.epochs=4"), checkpoint, on_epoch=lambda e, m: seen.append(e)
    )
    assert seen == [3, 4] and again.best_test_acc == whole.best_test_acc


def test_load_checkpoint_without_a_file(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / "none.pt") is None


KILLED_RUN = """
import json, sys, time
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_engine import run_tiny, small_config

checkpoint, output, pause = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
# The pause after each epoch's checkpoint gives the parent time to kill us mid-run.
config = small_config("train.epochs=5")
result, _ = run_tiny(config, checkpoint, on_epoch=lambda e, m: time.sleep(pause))
output.write_text(json.dumps(result.history))
"""


@pytest.mark.slow  # two training subprocesses
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN.format(tests=str(Path(__file__).parent)))

    def launch(checkpoint: str, output: str, pause: str) -> ForkedProcess:
        # A process of its own, forked with torch already imported (conftest.fork_program).
        return fork_program([str(script), checkpoint, output, pause], tmp_path, clean_env(), 1, 2)

    checkpoint = tmp_path / "killed.pt"
    victim = launch(str(checkpoint), str(tmp_path / "never.json"), "30")
    deadline = time.monotonic() + 120
    while not checkpoint.exists():
        assert victim.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert load_checkpoint(checkpoint)["epoch"] == 1

    resumed = launch(str(checkpoint), str(tmp_path / "resumed.json"), "0")
    whole = launch(str(tmp_path / "whole.pt"), str(tmp_path / "whole.json"), "0")
    assert resumed.wait(timeout=120) == 0 and whole.wait(timeout=120) == 0
    resumed_history = json.loads((tmp_path / "resumed.json").read_text())
    whole_history = json.loads((tmp_path / "whole.json").read_text())
    assert len(resumed_history) == 5
    assert without_timing(resumed_history) == without_timing(whole_history)


# --------------------------------------------------------------------------------------------
# With the real models
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("experiment", "masks_trained"),
    [("e7_pnn_shared_masks", False), ("e8_pnn_trained_masks", True)],
)
def test_real_pnn_trains_and_resumes_exactly(
    experiment: str, masks_trained: bool, tmp_path: Path
) -> None:
    cfg = small_config(
        f"experiment={experiment}",
        "model.nfilters=8",
        "masks.nmasks=4",
        "dataset.train_size=48",
        "dataset.test_size=20",
        "train.epochs=2",
    )
    data = load_data(cfg, CPU, Path("."))

    def fresh_model() -> nn.Module:
        seed_everything(cfg.train.seed)
        return models.build_model(cfg)

    model = fresh_model()
    # Masks trained exactly when masks.train, read from the mask parameters themselves: they
    # take gradients, the optimizer holds them, and training moves them.
    assert cfg.masks.train is masks_trained
    masks = [m.masks for m in model.modules() if isinstance(m, PerturbLayer) and m.filter_size == 0]
    assert len(masks) == 16  # every layer of the four stages; the 3x3 stem has none
    assert [p.requires_grad for p in masks] == [masks_trained] * len(masks)
    optimized = {id(p) for p in build_optimizer(cfg, model).param_groups[0]["params"]}
    assert [id(p) in optimized for p in masks] == [masks_trained] * len(masks)
    before = [p.detach().clone() for p in masks]

    whole = train(cfg, model, data, device=CPU, checkpoint_path=tmp_path / "whole.pt")
    assert all(math.isfinite(v) for m in whole.history for v in m.values())
    moved = [not torch.equal(b, p.detach()) for b, p in zip(before, masks, strict=True)]
    assert moved == [masks_trained] * len(masks)

    cfg.train.epochs = 1
    train(cfg, fresh_model(), data, device=CPU, checkpoint_path=tmp_path / "parts.pt")
    cfg.train.epochs = 2
    resumed_model = fresh_model()
    rest = train(cfg, resumed_model, data, device=CPU, checkpoint_path=tmp_path / "parts.pt")
    assert without_timing(rest.history) == without_timing(whole.history)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, resumed_model.state_dict()[name]), name


@pytest.mark.parametrize(
    ("fast", "compile_layers", "device", "compiled", "autotune"),
    [
        ("auto", True, "cuda", True, True),  # only flags are set: no CUDA device is needed
        ("auto", False, "cuda", False, True),
        ("off", True, "cuda", False, False),
        ("auto", True, "cpu", False, False),
    ],
)
def test_execution_sets_the_choices_for_the_block_only(
    fast: str, compile_layers: bool, device: str, compiled: bool, autotune: bool
) -> None:
    """train.fast / train.compile reach cuDNN autotuning and every PNN layer inside the block
    only; building the step changes neither."""
    from pnn.model.fused import FusedSettings

    cfg = small_config(f"train.fast={fast}", f"train.compile={str(compile_layers).lower()}")
    model = nn.Sequential(
        PerturbLayer(3, 6, input_size=8, nmasks=2), PerturbLayer(6, 6, input_size=8)
    )
    saved, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    try:
        build_train_step(cfg, model, build_optimizer(cfg, model), CPU)
        assert [m.fused for m in model] == [FusedSettings()] * 2
        assert torch.backends.cudnn.benchmark is False
        with execution(cfg, model, torch.device(device)):
            assert [m.fused for m in model] == [FusedSettings(compiled=compiled)] * 2
            assert torch.backends.cudnn.benchmark is autotune
        assert [m.fused for m in model] == [FusedSettings()] * 2
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = saved
