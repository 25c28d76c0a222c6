"""Keys a composed config holds that its schema does not define, and the nearest known key.

Hydra's own refusal of an unknown key ends with "To append to your config use +key=value", and
``+key`` (or ``++key``) then adds the key without a word: the job runs with the intended setting
silently dropped. The schema is fixed, so :mod:`pnn.config` opens its nodes for composition
(:func:`open_nodes`) and refuses every key the schema lacks in one place, after composition
(:func:`unknown_keys`), whatever brought the key in: an override with or without ``+``, an
experiment or profile file, or a sweeper ``params`` entry.

This module knows no pnn schema and imports nothing from pnn; :mod:`pnn.config` builds on it.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig

# Hydra's own node: present in the sweeper's job configs, removed before the task function.
HYDRA_NODE = "hydra"


def open_nodes(node: DictConfig) -> DictConfig:
    """Clear the struct flag of ``node`` and of every mapping below it, in place.

    An explicit ``False`` on a node survives Hydra's ``set_struct(root, True)``, so a file or an
    override can put an unknown key in; :func:`unknown_keys` then refuses it with a message of
    ours instead of Hydra's advice to add it with ``+``. Reading a missing key still raises.
    """
    from omegaconf import OmegaConf

    OmegaConf.set_struct(node, False)
    for key in node:
        child = node[key]
        if OmegaConf.is_dict(child):
            open_nodes(child)
    return node


def dotted_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """Every section and leaf of a nested dict, as dotted paths, in order."""
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.append(path)
        if isinstance(value, dict):
            out.extend(dotted_keys(value, f"{path}."))
    return out


def unknown_keys(cfg: DictConfig, schema: DictConfig) -> list[str]:
    """Dotted paths of the keys of ``cfg`` that ``schema`` does not define (outermost only:
    below an unknown key nothing more is listed)."""
    from omegaconf import OmegaConf

    # Unresolved: a bad interpolation elsewhere is another error, reported by the checks after.
    tree = OmegaConf.to_container(cfg, resolve=False)
    known = OmegaConf.to_container(schema, resolve=False)
    assert isinstance(tree, dict) and isinstance(known, dict)
    tree.pop(HYDRA_NODE, None)
    return _unknown(tree, known, "")


def _unknown(tree: dict, known: dict, prefix: str) -> list[str]:
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if key not in known:
            out.append(path)
        elif isinstance(value, dict) and isinstance(known[key], dict):
            out.extend(_unknown(value, known[key], f"{path}."))
    return out


def nearest(key: str, known: list[str]) -> str:
    """The known dotted key most like ``key``, by the whole path or by its last part, so that
    ``train.epoch`` gives ``train.epochs`` and ``lr`` gives ``optimizer.lr``."""

    def likeness(candidate: str) -> tuple[float, float]:
        whole = difflib.SequenceMatcher(None, key, candidate).ratio()
        last = difflib.SequenceMatcher(None, key.rsplit(".", 1)[-1], candidate.rsplit(".", 1)[-1])
        return max(whole, last.ratio()), whole

    return max(known, key=likeness)


def describe_unknown(keys: list[str], schema: DictConfig) -> str:
    """One line naming each unknown key and its nearest key in ``schema``."""
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(schema, resolve=False)
    assert isinstance(tree, dict)
    known = dotted_keys(tree)
    named = ", ".join(f"{key} (did you mean {nearest(key, known)}?)" for key in keys)
    noun = "key" if len(keys) == 1 else "keys"
    return (
        f"unknown config {noun} {named}: the config has a fixed schema (pnn/config.py), so "
        "'+' and '++' cannot add keys to it"
    )
