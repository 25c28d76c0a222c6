"""The gpu_pool launcher's slots (GPUs or CPU workers) and its keys. Light on purpose: Hydra imports
the launcher in every app, so torch is imported only where a GPU driver is loaded."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pnn.config import ConfigError

# Present where a GPU driver is loaded: NVIDIA's, WSL2's, AMD's (ROCm).
GPU_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def visible_gpus() -> list[str]:
    """GPU ids this process may hand out, without creating a CUDA context here; none unless torch
    can use CUDA (a driver, a device, a CUDA build of torch)."""
    if not any(Path(p).exists() for p in GPU_DRIVER_FILES):
        return []  # no GPU driver: no need to import torch to learn it
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable torch/CUDA: CPU only
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    return [str(i) for i in range(count)]


def check_gpus_visible(gpus: Sequence[int | str]) -> None:
    """Each of ``hydra.launcher.gpus`` must be a visible CUDA device, or jobs train on the CPU."""
    wanted = [str(g) for g in gpus]
    if not wanted:
        return
    visible = visible_gpus()
    if all(g in visible for g in wanted):
        return
    listed = ",".join(visible) if visible else "none"
    raise ConfigError(
        f"hydra.launcher.gpus=[{','.join(wanted)}] but the CUDA devices visible here are: "
        f"{listed}; name visible ones, or use hydra.launcher.gpus=[] for CPU workers"
    )


def auto_cpu_workers(threads: int) -> int:
    """``cpu_workers=auto``: usable cores (this process's affinity) over ``train.threads``, >= 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // threads)


def make_slots(
    gpus: Sequence[int | str] | None,
    jobs_per_gpu: int,
    cpu_workers: int | str,
    threads: int = 1,
) -> list[dict]:
    """Each slot's job process environment; ``threads`` matters only for ``cpu_workers=auto``."""
    check_launcher_keys(gpus, jobs_per_gpu, cpu_workers)
    ids = [str(g) for g in gpus] if gpus is not None else visible_gpus()
    if ids:
        return [
            {"CUDA_VISIBLE_DEVICES": gpu, "PNN_SLOT": f"gpu{gpu}.{k}"}
            for k in range(jobs_per_gpu)
            for gpu in ids
        ]
    workers = auto_cpu_workers(threads) if cpu_workers == "auto" else int(cpu_workers)
    return [{"CUDA_VISIBLE_DEVICES": "", "PNN_SLOT": f"cpu{k}"} for k in range(workers)]


def check_launcher_keys(
    gpus: object, jobs_per_gpu: object, cpu_workers: object, seeds_per_process: object = 1
) -> None:
    """The gpu_pool keys, checked as the launcher is built (in a sweep, before its parent run)."""
    counts = (
        ("jobs_per_gpu", jobs_per_gpu),
        ("cpu_workers", cpu_workers),
        ("seeds_per_process", seeds_per_process),
    )
    for key, value in counts:
        if key == "cpu_workers" and value == "auto":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            auto = " or auto (cores / train.threads)" if key == "cpu_workers" else ""
            raise ConfigError(
                f"hydra.launcher.{key} must be >= 1, a whole number{auto} (got {value!r})"
            )
    if gpus is None:
        return
    ids = [gpus] if isinstance(gpus, int | str) else gpus
    try:
        ok = all(int(str(g)) >= 0 for g in ids)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(
            "hydra.launcher.gpus must be null (every visible GPU), [] (none: CPU workers) or a "
            f"list of GPU indices >= 0, e.g. '[0,1]' (got {gpus!r})"
        )
