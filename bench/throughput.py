"""Training-step throughput of the eight README experiments.

    python bench/throughput.py --steps 100 --device cuda --json bench/out.json
    python bench/throughput.py --steps 3 --warmup 1 --device cpu --experiments e1,e4

For each experiment: the README model and batch size and the production step
(``pnn.train.step.build_train_step``), fed from augmented synthetic CIFAR-shaped data on the
device; ``--warmup`` steps, then ``--steps`` timed steps, synchronised only at the two ends.
``--mode reference`` times the reference code's own loop instead (DataLoader + PIL, ``.item()``
every step, the grouped-conv perturbation), for a same-machine baseline.

Configs are composed with Hydra where it is installed; otherwise (the GPU image has no Hydra)
from ``EXPERIMENTS`` below over the schema's defaults, which ``tests/test_bench.py`` checks.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout as well

from pnn.config import DATASETS, FAST_CHOICES, PNNConfig  # noqa: E402
from pnn.train.accuracy import EVAL_BATCHES_PER_STEP, evaluate  # noqa: E402
from pnn.train.data import normalize, random_crop_flip, synthetic_split  # noqa: E402
from pnn.train.engine import build_optimizer, seed_everything  # noqa: E402
from pnn.train.step import StepTotals, build_train_step, execution  # noqa: E402

# The experiment files' overrides of the defaults (conf/experiment/*.yaml), for machines
# without Hydra. Keys are dotted paths into PNNConfig.
_PERTURB = {"model.name": "perturb_resnet18", "model.nfilters": 128, "train.batch_size": 16}
_M64 = {**_PERTURB, "model.first_filter_size": 3, "masks.nmasks": 64}
EXPERIMENTS: dict[str, dict[str, Any]] = {
    "e1_baseline_resnet18": {
        "model.name": "resnet18",
        "model.nfilters": 44,
        "train.batch_size": 10,
    },
    "e2_original_noiseresnet18": {
        "model.name": "noiseresnet18",
        "model.nfilters": 128,
        "model.first_filter_size": 7,
        "optimizer.lr": 1e-4,
        "train.batch_size": 10,
    },
    "e3_original_first3x3": {
        "model.name": "noiseresnet18",
        "model.nfilters": 128,
        "model.first_filter_size": 3,
        "optimizer.lr": 1e-4,
        "train.batch_size": 10,
    },
    "e4_conv1x1_no_noise": {**_PERTURB, "model.first_filter_size": 3, "model.filter_size": 1},
    "e5_pnn_all_layers": dict(_PERTURB),
    "e6_pnn_unique_masks_mix_maps": {**_M64, "masks.mix_maps": True},
    "e7_pnn_shared_masks": {**_M64, "masks.unique": False},
    "e8_pnn_trained_masks": {**_M64, "masks.unique": False, "masks.train": True},
}
# Batches of augmented data the timed loop cycles through (a stand-in for an epoch tensor).
DATA_BATCHES = 32


def experiment_name(short: str) -> str:
    """``e7`` or ``e7_pnn_shared_masks`` -> ``e7_pnn_shared_masks``."""
    matches = [name for name in EXPERIMENTS if name == short or name.split("_")[0] == short]
    if len(matches) != 1:
        raise SystemExit(f"unknown experiment {short!r}; choose from {', '.join(EXPERIMENTS)}")
    return matches[0]


def fallback_config(name: str) -> PNNConfig:
    """The experiment's config without Hydra: schema defaults plus the experiment's overrides."""
    cfg = PNNConfig(experiment=name)
    for dotted, value in EXPERIMENTS[name].items():
        section, key = dotted.split(".")
        setattr(getattr(cfg, section), key, copy.copy(value))
    return cfg


def experiment_config(name: str) -> Any:
    try:
        from pnn.config import load_config

        return load_config([f"experiment={name}"])
    except ImportError:  # no Hydra here
        return fallback_config(name)


def _peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process.
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the figure is the process's peak so far


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def production_steps(
    cfg: Any, model: torch.nn.Module, device: torch.device
) -> tuple[Callable[[int], None], Callable[[], float]]:
    """``train``'s inner loop: batches sliced from an augmented epoch tensor on the device."""
    batch_size = cfg.train.batch_size
    images, labels = synthetic_split(DATA_BATCHES * batch_size, seed=0, train=True)
    images, labels = images.to(device), labels.to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    mean = torch.tensor(DATASETS["cifar10"].mean, device=device)
    std = torch.tensor(DATASETS["cifar10"].std, device=device)
    inputs = normalize(random_crop_flip(images, generator), mean, std)
    step = build_train_step(cfg, model, build_optimizer(cfg, model), device)
    totals = StepTotals.zeros(device)
    done = 0

    def run(count: int) -> None:
        nonlocal done
        for i in range(done, done + count):
            begin = (i % DATA_BATCHES) * batch_size
            step(inputs[begin : begin + batch_size], labels[begin : begin + batch_size], totals)
        done += count

    run.step = step  # type: ignore[attr-defined]
    return run, lambda: totals.loss_sum.item() / (done * batch_size)


def eval_img_per_s(cfg: Any, model: torch.nn.Module, device: torch.device, batches: int) -> float:
    """The engine's test pass (eval mode, no gradients, 8 training batches at a time)."""
    size = batches * cfg.train.batch_size * EVAL_BATCHES_PER_STEP
    images, labels = synthetic_split(size, seed=1, train=False)
    mean = torch.tensor(DATASETS["cifar10"].mean, device=device)
    std = torch.tensor(DATASETS["cifar10"].std, device=device)
    inputs, labels = normalize(images.to(device), mean, std), labels.to(device)
    chunk = cfg.train.batch_size * EVAL_BATCHES_PER_STEP
    evaluate(model, inputs[:chunk], labels[:chunk], chunk, cfg.train.precision)  # warm-up
    _sync(device)
    started = time.perf_counter()
    evaluate(model, inputs, labels, chunk, cfg.train.precision)
    _sync(device)
    return size / (time.perf_counter() - started)


def reference_steps(
    cfg: Any, model: torch.nn.Module, device: torch.device, total_steps: int, workers: int
) -> tuple[Callable[[int], None], Callable[[], float]]:
    """The reference code's loop: a DataLoader with PIL transforms, ``.cpu()`` and ``.item()``
    on every step. (The model's perturbations are switched to the reference formulation by
    the caller.)"""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    batch_size = cfg.train.batch_size
    spec = DATASETS["cifar10"]
    transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )
    images, labels = synthetic_split(total_steps * batch_size, seed=0, train=True)
    hwc = images.permute(0, 2, 3, 1).numpy()

    class PILImages(Dataset):
        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return transform(Image.fromarray(hwc[i])), int(labels[i])

    # One pass covers warm-up and timed steps, so no worker restarts inside the timing.
    # pin_memory as the reference code's loaders do (pinned only where there is a GPU).
    loader = DataLoader(
        PILImages(), batch_size, shuffle=True, num_workers=workers, pin_memory=device.type == "cuda"
    )
    batches = iter(loader)
    optimizer = build_optimizer(cfg, model)
    losses: list[float] = []

    def run(count: int) -> None:
        for _ in range(count):
            inputs, targets = next(batches)
            targets, inputs = targets.to(device), inputs.to(device)
            output = model(inputs)
            loss = F.cross_entropy(output, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            pred = output.data.max(1)[1]
            _ = pred.eq(targets.data).cpu().sum() * 100.0 / batch_size
            losses.append(loss.item())

    return run, lambda: sum(losses) / len(losses)


@contextlib.contextmanager
def reference_execution(model: torch.nn.Module) -> Iterator[None]:
    """The reference's way inside the block: the materialised grouped-conv perturbation
    (``FusedSettings(reference=True)``) and no cuDNN autotuning."""
    from pnn.model.fused import FusedSettings
    from pnn.model.layers import use_fused

    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        with use_fused(model, FusedSettings(compiled=False, reference=True)):
            yield
    finally:
        torch.backends.cudnn.benchmark = benchmark


def bench_experiment(
    name: str,
    device: torch.device,
    steps: int,
    warmup: int,
    precision: str = "fp32",
    mode: str = "production",
    workers: int = 4,
    fast: str = "auto",
    compile_layers: bool = True,
) -> dict[str, Any]:
    from pnn.model.models import build_model, count_parameters

    cfg = experiment_config(name)
    cfg.train.precision = precision
    cfg.train.fast = fast
    cfg.train.compile = compile_layers
    batch_size = cfg.train.batch_size
    seed_everything(0)
    model = build_model(cfg).to(device)
    if mode == "reference":
        settings = reference_execution(model)
        run, mean_loss = reference_steps(cfg, model, device, warmup + steps, workers)
    else:
        settings = execution(cfg, model, device)
        run, mean_loss = production_steps(cfg, model, device)

    def timed(count: int) -> float:
        started = time.perf_counter()
        run(count)
        _sync(device)
        return time.perf_counter() - started

    with settings:
        _sync(device)
        _peak_memory_reset(device)
        warmup_s = timed(warmup)
        peak_warmup = _peak_memory_gib(device)
        _peak_memory_reset(device)  # then the timed steps alone: no cuDNN autotuning in it
        seconds = timed(steps)
        peak_after_warmup = _peak_memory_gib(device)
        extra: dict[str, Any] = {}
        if mode == "production":
            step = run.step  # type: ignore[attr-defined]
            extra["step"] = type(step).__name__
            extra["graph_captures"] = getattr(step, "captures", 0)
            extra["eval_img_per_s"] = eval_img_per_s(cfg, model, device, max(1, steps // 8))
    return {
        "experiment": name,
        "batch_size": batch_size,
        "img_per_s": steps * batch_size / seconds,
        "ms_per_step": seconds / steps * 1000,
        "epoch_s": 50_000 * seconds / (steps * batch_size),  # CIFAR-10, training only
        "peak_gib": max(peak_warmup, peak_after_warmup),  # warm-up included
        "peak_after_warmup_gib": peak_after_warmup,
        "warmup_s": warmup_s,
        **extra,
        "mean_loss": mean_loss(),  # a sanity check: finite, about ln(10) at the start
        **count_parameters(model),
    }


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def table_header(device: torch.device) -> str:
    memory = "peak GiB" if device.type == "cuda" else "peak RSS GiB"
    columns = f"{'batch':>5} {'img/s':>9} {'ms/step':>9} {'s/epoch':>9} {memory:>12}"
    columns += f" {'after warm-up':>13}"
    columns += f" {'eval img/s':>10} {'warm-up s':>9}  step"
    return f"{'experiment':<30} {columns}"


def table_row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['experiment']:<30} {r['batch_size']:>5} failed: {r['error']}"
    return (
        f"{r['experiment']:<30} {r['batch_size']:>5} {r['img_per_s']:>9.1f} "
        f"{r['ms_per_step']:>9.2f} {r['epoch_s']:>9.1f} {r['peak_gib']:>12.2f}"
        f" {r['peak_after_warmup_gib']:>13.2f}"
        f" {r.get('eval_img_per_s', float('nan')):>10.1f} {r['warmup_s']:>9.1f}"
        f"  {r.get('step', 'reference loop')}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per experiment")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--experiments", default="", help="comma-separated, e.g. e1,e7")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--mode",
        choices=("production", "reference"),
        default="production",
        help="reference: the reference code's loop (DataLoader + PIL, .item() every step, "
        "grouped-conv perturbation), fp32 only",
    )
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers (reference)")
    parser.add_argument(
        "--fast",
        choices=FAST_CHOICES,
        default="auto",
        help="train.fast: CUDA graph + compiled layers on CUDA (auto), or eager (off)",
    )
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="train.compile=false: keep the CUDA graph but not the compiled perturbation kernels",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.mode == "reference" and args.precision != "fp32":
        parser.error("--mode reference runs fp32, as the reference does")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")
    return args


def run_all(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Each experiment in turn, a table row printed as each finishes; out of memory is a row."""
    names = [experiment_name(s) for s in args.experiments.split(",") if s] or list(EXPERIMENTS)
    setting = (
        f"{args.mode} step, {args.precision}, {args.warmup} warm-up + {args.steps} timed steps"
    )
    if args.mode == "production":
        setting += f", train.fast={args.fast}, train.compile={not args.no_compile}"
    print(f"{device_description(device)}, torch {torch.__version__}, {setting}")
    print(table_header(device), flush=True)
    results = []
    for name in names:
        try:
            result = bench_experiment(
                name,
                device,
                args.steps,
                args.warmup,
                args.precision,
                args.mode,
                args.workers,
                args.fast,
                not args.no_compile,
            )
        except torch.cuda.OutOfMemoryError as error:
            batch = fallback_config(name).train.batch_size
            result = {"experiment": name, "batch_size": batch, "error": str(error).split("\n")[0]}
        results.append(result)
        print(table_row(result), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def write_json(path: Path, device: torch.device, results: list, **settings: Any) -> None:
    """The report: the machine, the date, the run's ``settings`` (steps, warm-up, ...), results."""
    report = {
        "device": device_description(device),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **settings,
        "results": results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    results = run_all(args, device)
    if args.json:
        write_json(
            args.json,
            device,
            results,
            steps=args.steps,
            warmup=args.warmup,
            precision=args.precision,
            mode=args.mode,
            fast=args.fast,
            compile=not args.no_compile,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
