"""Correctness checks that need a GPU; ``bench/device_run.sh`` runs them before any timing.

1. The perturbation layer on CUDA (eager chunked path, and the compiled one unless
   ``--no-compile``) against the reference formulation: outputs and gradients.
2. The CUDA-graphed training step against the eager step: same model, same batches, same
   losses and weights after several steps.
3. A short training run through ``pnn.train.engine.train`` with the graphed step learns.

Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.throughput import experiment_config  # noqa: E402
from pnn.model import layers  # noqa: E402
from pnn.model.fused import FusedSettings, perturb_conv  # noqa: E402
from pnn.model.models import build_model  # noqa: E402
from pnn.train.cuda_graph import GraphedTrainStep  # noqa: E402
from pnn.train.engine import build_optimizer, seed_everything  # noqa: E402
from pnn.train.step import StepTotals, make_train_step  # noqa: E402

FAILURES: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


DEVICE = torch.device("cuda")


def check_layer(compiled: bool) -> None:
    device = DEVICE
    cases = [  # (C, out, M, shared masks, act, trained masks)
        (32, 32, 8, False, "relu", False),
        (32, 64, 8, True, "relu", True),
        (16, 16, 64, False, "prelu", False),
        (16, 32, 4, False, "tanh", True),
    ]
    for c, out, m, shared, act_name, trained in cases:
        torch.manual_seed(0)
        x = torch.randn(4, c, 8, 8, device=device, requires_grad=True)
        masks = torch.rand(1, 1 if shared else c, m, 8, 8, device=device) * 2 - 1
        masks.requires_grad_(trained)
        weight = (torch.randn(out, m, 1, 1, device=device) * 0.1).requires_grad_()
        bias = torch.randn(out, device=device).requires_grad_()
        act = layers.make_act(act_name).to(device)
        grad_out = torch.randn(4, out, 8, 8, device=device)
        results = []
        for reference in (True, False):
            settings = FusedSettings(compiled=compiled, reference=reference)
            y = perturb_conv(x, masks, 0.5, weight, bias, act, settings)
            leaves = [x, weight, bias, *act.parameters()] + ([masks] if trained else [])
            grads = torch.autograd.grad(y, leaves, grad_out)
            results.append((y.detach(), grads))
        (y_ref, g_ref), (y_ours, g_ours) = results
        err = max([rel(y_ours, y_ref)] + [rel(a, b) for a, b in zip(g_ours, g_ref, strict=True)])
        name = f"layer {'compiled' if compiled else 'eager'} C{c}->{out} M{m} {act_name}"
        name += " shared" if shared else " unique"
        report(name, err <= 1e-5, f"max relative error {err:.2e} (outputs and gradients)")


def check_graph_step(experiment: str, steps: int = 8) -> None:
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    cfg = experiment_config(experiment)
    batch = cfg.train.batch_size
    torch.manual_seed(123)
    inputs = torch.randn(steps * batch, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (steps * batch,), device=device)
    finals = []
    for graphed in (False, True):
        seed_everything(0)
        model = build_model(cfg).to(device)
        optimizer = build_optimizer(cfg, model)
        step = make_train_step(model, optimizer, "fp32", device)
        if graphed:
            step = GraphedTrainStep(step, optimizer, batch)
        totals = StepTotals.zeros(device)
        seed_everything(1)  # dropout draws
        for i in range(steps):
            step(inputs[i * batch : (i + 1) * batch], labels[i * batch : (i + 1) * batch], totals)
        torch.cuda.synchronize()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        finals.append((flat, totals.loss_sum.item(), getattr(step, "captures", 0)))
    (w_eager, loss_eager, _), (w_graph, loss_graph, captures) = finals
    err = rel(w_graph, w_eager)
    ok = err <= 1e-4 and abs(loss_graph - loss_eager) <= 1e-4 * abs(loss_eager) and captures == 1
    detail = f"weights rel diff {err:.2e}, loss sums {loss_eager:.6f} vs {loss_graph:.6f}, "
    report(f"graph step {experiment}", ok, detail + f"{captures} capture(s)")
    torch.backends.cudnn.deterministic = False


def check_training_learns(compiled: bool) -> None:
    from pnn.train.data import load_data
    from pnn.train.engine import train

    cfg = experiment_config("e4_conv1x1_no_noise")
    cfg.dataset.name, cfg.dataset.train_size, cfg.dataset.test_size = "synthetic", 2000, 500
    cfg.train.epochs, cfg.train.compile = 2, compiled
    device = DEVICE
    seed_everything(0)
    model = build_model(cfg)
    data = load_data(cfg, device, Path(tempfile.mkdtemp()))
    with tempfile.TemporaryDirectory() as tmp:
        result = train(cfg, model, data, device=device, checkpoint_path=Path(tmp) / "last.pt")
    acc = [h["test_acc"] for h in result.history]
    report(f"train() on {device.type} learns", acc[-1] > 50.0, f"test_acc per epoch {acc}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the non-graph checks")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cpu":
        check_layer(compiled=False)
        check_training_learns(compiled=False)
        return 1 if FAILURES else 0
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    check_layer(compiled=False)
    for experiment in ("e1_baseline_resnet18", "e7_pnn_shared_masks", "e8_pnn_trained_masks"):
        check_graph_step(experiment)
    check_training_learns(compiled=False)
    if not args.no_compile:
        check_layer(compiled=True)
    print(f"{len(FAILURES)} failed: {', '.join(FAILURES)}" if FAILURES else "all checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
