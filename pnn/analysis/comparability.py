"""Which runs can be compared with the paper, and which config keys count at all.

A run is *comparable* when its logged config (the flattened resolved config, ``config.<key>``
columns of :func:`pnn.analysis.runs.load_runs`) equals the full composed config of its experiment
file (``profile=full``, CIFAR-10), apart from the seed and the keys that do not change results
(:data:`pnn.io.tracking.VOLATILE_KEYS`, plus the description and published accuracy, which are
labels).

Both the results table (:mod:`pnn.analysis.results`) and the claims (:mod:`pnn.analysis.claims`)
need this, and the swept-key search (:mod:`pnn.analysis.ablations`) needs :func:`ignored_key`; it
sits below all three.
"""

from __future__ import annotations

import math
from functools import lru_cache

import pandas as pd
from hydra.initialize import get_gh_backup, restore_gh_from_backup

from pnn.analysis.runs import CONFIG_PREFIX, to_float
from pnn.config import CONF_DIR, load_config
from pnn.io.tracking import VOLATILE_KEYS, flatten

# Labels, not settings: they never change what a run computes.
LABEL_KEYS = ("description", "published_test_acc")
# Only meaningful for dataset=synthetic; "synthetic data" already says the data differ.
SYNTHETIC_KEYS = ("dataset.train_size", "dataset.test_size", "dataset.seed")


def ignored_key(key: str) -> bool:
    """Whether a config key is left out of comparisons: the seed, labels, and keys that do not
    change results."""
    keys = (*VOLATILE_KEYS, *LABEL_KEYS, "train.seed")
    return any(key == k or key.startswith(k + ".") for k in keys)


@lru_cache(maxsize=64)
def experiment_config(experiment: str) -> dict[str, str] | None:
    """The flattened full config of ``conf/experiment/<experiment>.yaml`` as ``sweep.py`` would
    compose it (``profile=full``); None if there is no such file."""
    if not (CONF_DIR / "experiment" / f"{experiment}.yaml").is_file():
        return None
    # write_report also runs at the end of a sweep, inside Hydra: leave its global state as is.
    backup = get_gh_backup()
    try:
        cfg = load_config([f"experiment={experiment}"], validate_config=False)
    finally:
        restore_gh_from_backup(backup)
    return flatten(cfg) if cfg.experiment == experiment else None


def paper_config(experiment: str) -> dict[str, str] | None:
    """:func:`experiment_config` without the ignored keys, for an experiment with a published
    accuracy; else None."""
    config = experiment_config(experiment)
    if config is None or config.get("published_test_acc", "None") == "None":
        return None
    return {k: v for k, v in config.items() if not ignored_key(k)}


def same_value(logged: str, expected: str) -> bool:
    """Equal as logged text, or as numbers (``1e-3`` and ``0.001``)."""
    if logged == expected:
        return True
    a, b = to_float(logged), to_float(expected)
    return not math.isnan(a) and a == b


def run_differences(run: pd.Series) -> list[str] | None:
    """Why ``run`` differs from its experiment's paper config, as ``key=value`` items in the
    order of the config; [] if it is comparable, None if its experiment is not a paper one."""
    expected = paper_config(str(run["experiment"]))
    if expected is None:
        return None
    logged = {
        c.removeprefix(CONFIG_PREFIX): run[c]
        for c in run.index
        if c.startswith(CONFIG_PREFIX) and isinstance(run[c], str)
    }
    logged = {k: v for k, v in logged.items() if not ignored_key(k)}
    items: list[str] = []
    synthetic = logged.get("dataset.name") == "synthetic" != expected.get("dataset.name")
    for key in [*expected, *(k for k in logged if k not in expected)]:
        if synthetic and key in SYNTHETIC_KEYS:
            continue
        if key not in logged:
            items.append(f"{key} not logged")
        elif key not in expected or not same_value(logged[key], expected[key]):
            if synthetic and key == "dataset.name":
                items.insert(0, "synthetic data")
            else:
                items.append(f"{key}={logged[key]}")
    return items


def annotate_comparability(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` plus ``comparable`` (bool) and ``not_comparable_because`` (text) per run."""
    runs = runs.copy()
    comparable, because = [], []
    for _, run in runs.iterrows():
        items = run_differences(run)
        if items is None:
            comparable.append(False)
            because.append("not one of the paper's experiments")
        else:
            comparable.append(not items)
            because.append(", ".join(items))
    runs["comparable"] = pd.Series(comparable, index=runs.index, dtype=bool)
    runs["not_comparable_because"] = because
    return runs


def row_reason(group: pd.DataFrame) -> str:
    """Why a results row (its runs) is not comparable; '' if all its runs are."""
    bad = group[~group["comparable"]]
    if bad.empty:
        return ""
    items: list[str] = []
    for text in bad["not_comparable_because"]:
        items += [i for i in text.split(", ") if i and i not in items]
    prefix = "" if len(bad) == len(group) else f"{len(bad)} of {len(group)} runs: "
    return prefix + ", ".join(items)
