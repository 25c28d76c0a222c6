"""Training-step throughput of the eight README experiments.

    python bench/throughput.py --steps 100 --device cuda --json bench/out.json
    python bench/throughput.py --steps 3 --warmup 1 --device cpu --experiments e1,e4

For each experiment: the README model and batch size, the production step
(``pnn.engine.build_train_step``: forward, backward, optimizer step, on-device accumulation),
fed from augmented synthetic CIFAR-shaped data already on the device. ``--warmup`` steps, then
``--steps`` timed steps, synchronised only at the two ends; the step slices its batch from an
epoch tensor exactly as ``train`` does.

Configs: composed with Hydra (``pnn.config.load_config``) where it is installed; otherwise
(the GPU image has no Hydra) from ``EXPERIMENTS`` below applied to the schema's defaults,
which ``tests/test_bench.py`` checks against the composed configs.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout as well

from pnn.config import DATASETS, PNNConfig  # noqa: E402
from pnn.data import normalize, random_crop_flip, synthetic_split  # noqa: E402
from pnn.engine import StepTotals, build_optimizer, build_train_step, seed_everything  # noqa: E402

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


def bench_experiment(
    name: str, device: torch.device, steps: int, warmup: int, precision: str
) -> dict[str, Any]:
    from pnn.models import build_model, count_parameters

    cfg = experiment_config(name)
    cfg.train.precision = precision
    batch_size = cfg.train.batch_size
    seed_everything(0)
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(cfg, model)

    images, labels = synthetic_split(DATA_BATCHES * batch_size, seed=0, train=True)
    images, labels = images.to(device), labels.to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    mean = torch.tensor(DATASETS["cifar10"].mean, device=device)
    std = torch.tensor(DATASETS["cifar10"].std, device=device)
    inputs = normalize(random_crop_flip(images, generator), mean, std)

    _sync(device)
    _peak_memory_reset(device)
    step = build_train_step(cfg, model, optimizer, device)
    totals = StepTotals.zeros(device)

    def run(count: int, offset: int) -> float:
        started = time.perf_counter()
        for i in range(offset, offset + count):
            begin = (i % DATA_BATCHES) * batch_size
            step(inputs[begin : begin + batch_size], labels[begin : begin + batch_size], totals)
        _sync(device)
        return time.perf_counter() - started

    warmup_s = run(warmup, 0)
    seconds = run(steps, warmup)
    loss = totals.loss_sum.item() / max(1, (warmup + steps) * batch_size)
    return {
        "experiment": name,
        "batch_size": batch_size,
        "img_per_s": steps * batch_size / seconds,
        "ms_per_step": seconds / steps * 1000,
        "epoch_s": 50_000 * seconds / (steps * batch_size),  # CIFAR-10, training only
        "peak_gib": _peak_memory_gib(device),
        "warmup_s": warmup_s,
        "mean_loss": loss,  # a sanity check: finite, about ln(10) at the start
        **count_parameters(model),
    }


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def table_header(device: torch.device) -> str:
    memory = "peak GiB" if device.type == "cuda" else "peak RSS GiB"
    columns = f"{'batch':>5} {'img/s':>9} {'ms/step':>9} {'s/epoch':>9} {memory:>12}"
    return f"{'experiment':<30} {columns}"


def table_row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['experiment']:<30} {r['batch_size']:>5} failed: {r['error']}"
    return (
        f"{r['experiment']:<30} {r['batch_size']:>5} {r['img_per_s']:>9.1f} "
        f"{r['ms_per_step']:>9.2f} {r['epoch_s']:>9.1f} {r['peak_gib']:>12.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per experiment")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--experiments", default="", help="comma-separated, e.g. e1,e7")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")

    device = torch.device(args.device)
    names = [experiment_name(s) for s in args.experiments.split(",") if s] or list(EXPERIMENTS)
    setting = f"{args.precision}, {args.warmup} warm-up + {args.steps} timed steps"
    print(f"{device_description(device)}, torch {torch.__version__}, {setting}")
    print(table_header(device), flush=True)
    results = []
    for name in names:
        try:
            result = bench_experiment(name, device, args.steps, args.warmup, args.precision)
        except torch.cuda.OutOfMemoryError as error:
            batch = fallback_config(name).train.batch_size
            result = {"experiment": name, "batch_size": batch, "error": str(error).split("\n")[0]}
        results.append(result)
        print(table_row(result), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.json:
        report = {
            "device": device_description(device),
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "steps": args.steps,
            "warmup": args.warmup,
            "precision": args.precision,
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
