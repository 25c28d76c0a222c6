"""Img/s of K seeds trained together in one process, against K runs one after another.

    python bench/seeds.py --device cuda --experiments e1,e4,e7 --seeds 1,2,3,4,8 --json out.json
    python bench/seeds.py --device cpu --experiments e1 --seeds 1,2 --steps 2 --warmup 1

"Packed" is what ``hydra.launcher.seeds_per_process=K`` runs: K models (seeds 0..K-1), each
in a thread of :func:`pnn.train.packing.run_packed` (its own CUDA stream), taking turns after every
step of the production step (``pnn.train.step.build_train_step``: CUDA graph, compiled layers).
"One after another" is the same K seeds, each alone in this process, timed one by one. Both
time ``--steps`` steps per seed after ``--warmup`` untimed ones (graph capture, compilation),
training steps only (no test pass), data already on the device, as ``throughput.py`` does.
Both run in the same call on the same card, so their ratio is a same-session figure.

Needs no Hydra (the GPU image has none): configs come from ``throughput.py``'s table there.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout as well
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import (  # noqa: E402
    _peak_memory_gib,
    _peak_memory_reset,
    _sync,
    device_description,
    experiment_config,
    experiment_name,
    production_steps,
    write_json,
)

from pnn.train.engine import seed_everything  # noqa: E402
from pnn.train.packing import run_packed, step_boundary  # noqa: E402
from pnn.train.step import execution  # noqa: E402


def one_seed(
    cfg: Any, device: torch.device, seed: int, stack: contextlib.ExitStack
) -> tuple[Any, Any]:
    """One seed's production steps, run as train() runs them: inside pnn.train.step.execution (cuDNN
    autotuning, the layers' compiled kernels), which ``stack`` keeps entered."""
    from pnn.model.models import build_model

    seed_everything(seed)
    model = build_model(cfg).to(device)
    stack.enter_context(execution(cfg, model, device))
    return production_steps(cfg, model, device)


def in_turn(run: Any, count: int) -> None:
    for _ in range(count):
        run(1)
        step_boundary()  # hand the turn on, as the engine's loop does


def packed(cfg: Any, device: torch.device, k: int, steps: int, warmup: int) -> dict[str, Any]:
    def prepare(seed: int) -> tuple[Any, Any]:
        run, mean_loss = one_seed(cfg, device, seed, stack)
        in_turn(run, warmup)
        return run, mean_loss

    with contextlib.ExitStack() as stack:
        runs = run_packed(prepare, list(range(k)))
        _sync(device)
        _peak_memory_reset(device)
        started = time.perf_counter()
        run_packed(lambda pair: in_turn(pair[0], steps), runs)
        _sync(device)
        seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "img_per_s": k * steps * cfg.train.batch_size / seconds,
        "peak_after_warmup_gib": _peak_memory_gib(device),
        "mean_loss": [mean_loss() for _, mean_loss in runs],
    }


def one_after_another(
    cfg: Any, device: torch.device, k: int, steps: int, warmup: int
) -> dict[str, Any]:
    seconds = 0.0
    losses = []
    for seed in range(k):
        with contextlib.ExitStack() as stack:
            run, mean_loss = one_seed(cfg, device, seed, stack)
            run(warmup)
            _sync(device)
            started = time.perf_counter()
            run(steps)
            _sync(device)
            seconds += time.perf_counter() - started
            losses.append(mean_loss())
            del run
    return {
        "seconds": seconds,
        "img_per_s": k * steps * cfg.train.batch_size / seconds,
        "mean_loss": losses,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--experiments", default="e1,e4,e7")
    parser.add_argument("--seeds", default="1,2,3,4,8", help="the K to measure, comma-separated")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per seed")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per seed first")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.seeds.split(",") if k]
    if args.steps < 1 or args.warmup < 0 or not ks or min(ks) < 1:
        parser.error("--steps and every K in --seeds must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")
    device = torch.device(args.device)
    print(
        f"{device_description(device)}, torch {torch.__version__}, production step, "
        f"{args.warmup} warm-up + {args.steps} timed steps per seed"
    )
    print(
        f"{'experiment':<30} {'K':>2} {'packed img/s':>12} {'1-by-1 img/s':>12} {'ratio':>6} "
        f"{'K seeds / 1 seed time':>21} {'packed peak GiB':>15}",
        flush=True,
    )
    results = []
    for short in args.experiments.split(","):
        name = experiment_name(short)
        cfg = experiment_config(name)
        for k in ks:
            together = packed(cfg, device, k, args.steps, args.warmup)
            apart = one_after_another(cfg, device, k, args.steps, args.warmup)
            row = {
                "experiment": name,
                "batch_size": cfg.train.batch_size,
                "k": k,
                "packed": together,
                "one_after_another": apart,
                "ratio": together["img_per_s"] / apart["img_per_s"],
                # Wall time of K seeds packed over that of one seed alone (its mean time).
                "time_vs_one_seed": together["seconds"] / (apart["seconds"] / k),
                # Each seed's mean loss packed vs alone: 0 on the CPU, float noise on a GPU.
                "loss_max_abs_diff": max(
                    abs(a - b)
                    for a, b in zip(together["mean_loss"], apart["mean_loss"], strict=True)
                ),
            }
            results.append(row)
            print(
                f"{name:<30} {k:>2} {together['img_per_s']:>12.1f} {apart['img_per_s']:>12.1f} "
                f"{row['ratio']:>5.2f}x {row['time_vs_one_seed']:>20.2f}x "
                f"{together['peak_after_warmup_gib']:>15.2f}",
                flush=True,
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        write_json(args.json, device, results, steps=args.steps, warmup=args.warmup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
