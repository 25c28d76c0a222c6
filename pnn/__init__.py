"""pnn-sweep: Perturbative Neural Networks, re-run with Hydra and MLflow.

The public API is loaded lazily so that ``import pnn.config`` stays cheap (no torch) and
``import pnn.model.models`` works where Hydra and MLflow are not installed (the benchmark's GPU
image).
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_model", "count_parameters", "load_config", "ConfigError"]

_LAZY = {
    "build_model": "pnn.model.models",
    "count_parameters": "pnn.model.models",
    "load_config": "pnn.config",
    "ConfigError": "pnn.config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pnn' has no attribute {name!r}")
