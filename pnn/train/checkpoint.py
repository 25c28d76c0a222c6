"""Checkpoints: atomic writes, loading, and every random stream a run draws from.

A checkpoint is a plain dict written with ``torch.save`` and read back with
``weights_only=True``; :func:`pnn.train.engine.train` decides what goes in it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import time
import warnings
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` so that ``path`` always holds a whole checkpoint: a temporary file in
    the same directory, flushed to disk, then renamed over the old one (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (tensors on the CPU), or None if there is none.

    Keys: ``epoch`` (last finished, 1-based), ``model``, ``optimizer``, ``rng``,
    ``reported_ema``, ``history`` (one metrics dict per finished epoch), ``extra_state``.
    """
    path = Path(path)
    if not path.exists():
        return None
    # weights_only: a checkpoint is plain containers, numbers, strings and tensors.
    return torch.load(path, map_location="cpu", weights_only=True)


# What :func:`pnn.train.engine.train` writes; a file without these is not one of our checkpoints.
CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "rng", "reported_ema", "history", "extra_state")


class UnreadableCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read back (truncated, not ours, or unsafe to load)."""


def read_checkpoint(path: Path) -> dict[str, Any] | None:
    """:func:`load_checkpoint`, but any failure (a truncated file, random bytes, a pickle that
    ``weights_only`` refuses, a dict without our keys) is one UnreadableCheckpointError that
    names the file. Nothing is ever unpickled with ``weights_only=False``."""
    try:
        state = load_checkpoint(path)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file
        text = str(err).strip()
        if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in text:
            # Not torch's advice to retry with weights_only=False: this file is not trusted.
            why = "torch's safe (weights-only) loader refused it: corrupted, or not ours"
        else:
            why = f"{type(err).__name__}: {text.split('. ')[0][:200]}"
        raise UnreadableCheckpointError(f"cannot read checkpoint {path}: {why}") from err
    if state is None:
        return None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise UnreadableCheckpointError(
            f"cannot read checkpoint {path}: not a pnn checkpoint (missing {', '.join(missing)})"
        )
    return state


def move_aside(path: Path, why: str) -> Path:
    """Rename ``path`` to ``<path>.<why>-<time>`` beside it (never deleted) and return that."""
    target = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while target.exists():
        target = target.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}.{n}")
        n += 1
    os.replace(path, target)
    return target


def rng_states(generator: torch.Generator) -> dict[str, Any]:
    """Every random stream a run draws from, so that a resumed run continues it exactly."""
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "python": random.getstate(),
        "numpy": None,
        "data": generator.get_state(),
        "data_device": generator.device.type,
    }
    with contextlib.suppress(ImportError):
        import numpy as np

        kind, keys, position, has_gauss, cached = np.random.get_state()
        keys = torch.from_numpy(keys.astype("int64"))
        states["numpy"] = (kind, keys, position, has_gauss, cached)
    return states


def restore_rng_states(states: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])
    if states["numpy"] is not None:
        import numpy as np

        kind, keys, position, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), position, has_gauss, cached))
    if states["data_device"] == generator.device.type:
        generator.set_state(states["data"])
    else:
        # CPU and CUDA generators keep different states and cannot take each other's.
        warnings.warn(
            f"checkpoint's data generator was on {states['data_device']}, this run's is on "
            f"{generator.device.type}: shuffling and augmentation restart from the seed, so "
            "the data order differs from an uninterrupted run",
            stacklevel=2,
        )
