"""The perturbation layer alone on a GPU, three ways: equivalence and timing.

For each case (a layer shape, its masks and activation), forward and backward run as the
reference formulation, the eager fused path and the compiled fused path (:mod:`pnn.model.fused`);
each row gives the largest relative error against the reference, milliseconds per step and
peak extra MiB. ``bench/device_run.sh`` runs the README shapes; ``tests/test_layers.py`` runs
them on a CUDA machine.

    python bench/layer_paths.py            # README_CASES
    python bench/layer_paths.py --all      # and every other activation (compiles for minutes)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout as well

from throughput import _sync  # noqa: E402

from pnn.model.fused import FusedSettings, perturb_conv  # noqa: E402
from pnn.model.layers import ACTIVATIONS, make_act  # noqa: E402

# (in_channels, out_channels, size, nmasks, unique_masks, train_masks, act).
README_CASES = [
    (128, 128, 32, 64, True, False, "relu"),  # e6, stage 1
    (128, 256, 32, 64, True, False, "relu"),  # e6, first layer of stage 2 (out = 2 * in)
    (128, 128, 32, 64, False, False, "relu"),  # e7
    (128, 128, 32, 64, False, True, "relu"),  # e8
]
# Then every other activation on a smaller layer (each compiles its own kernels: minutes).
FAST_PATH_CASES = README_CASES + [
    (64, 128, 16, 8, True, True, act) for act in ACTIVATIONS if act != "relu"
]


def check_fast_path(
    device: str = "cuda", batch: int = 16, rtol: float = 1e-4, cases: list[tuple] | None = None
) -> list[dict]:
    """Run each case (default FAST_PATH_CASES) three ways on ``device``, forward and backward:
    the reference formulation, the eager fused path and the fast path (compiled on CUDA).
    Returns one row per case and way: the largest relative error of output and gradients
    against the reference (TF32 off), milliseconds per step and peak extra MiB. Raises
    AssertionError past ``rtol``. rrelu runs in eval mode (each way draws training noise in
    its own order)."""
    rows = []
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for case in FAST_PATH_CASES if cases is None else cases:
            rows += _check_case(torch.device(device), batch, *case)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    bad = [row for row in rows if row["max_rel_error"] > rtol]
    assert not bad, f"fast path differs from the reference formulation: {bad}"
    return rows


def _check_case(device, batch, cin, cout, size, nmasks, unique, train, act_name) -> list[dict]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, cin, size, size, generator=gen).to(device).requires_grad_()
    masks = torch.rand(1, cin if unique else 1, nmasks, size, size, generator=gen) * 2 - 1
    masks = nn.Parameter(masks.to(device), requires_grad=train)
    conv = nn.Conv2d(cin * nmasks, cout, 1, groups=cin).to(device)
    act = make_act(act_name).to(device).eval()
    grad_out = torch.randn(batch, cout, size, size, generator=gen).to(device)
    leaves = [x, conv.weight, conv.bias, *([masks] if train else []), *act.parameters()]

    def step(settings: FusedSettings) -> list[Tensor]:
        y = perturb_conv(x, masks, 0.5, conv.weight, conv.bias, act, settings)
        return [y.detach(), *torch.autograd.grad(y, leaves, grad_out)]

    rows, reference = [], None
    for way in ("reference", "eager", "fast"):
        settings = FusedSettings(compiled=way == "fast", reference=way == "reference")
        results = step(settings)  # on the fast path, this call compiles
        reference = reference or results
        _sync(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start, repeats = time.perf_counter(), 5
        for _ in range(repeats):
            step(settings)
        _sync(device)
        ms = (time.perf_counter() - start) / repeats * 1e3
        peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0
        error = max(
            ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
            for a, b in zip(results, reference, strict=True)
        )
        case = f"{cin}->{cout} {size}x{size} M{nmasks} {'unique' if unique else 'shared'}"
        case += f"{' trained' if train else ''} {act_name}"
        rows.append(
            {"case": case, "way": way, "max_rel_error": error, "ms": ms, "peak_mib": peak / 2**20}
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--all", action="store_true", help="FAST_PATH_CASES, not README_CASES")
    args = parser.parse_args(argv)
    try:
        rows = check_fast_path(args.device, cases=None if args.all else README_CASES)
    except AssertionError as error:
        print(f"FAIL {error}")
        return 1
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
