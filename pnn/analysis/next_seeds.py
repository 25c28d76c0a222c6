"""next_seeds.sh: the sweep.py commands that raise each open claim's sides to ``seeds_needed``.

A side's runs are grouped by their config (every key that changes results, the seed aside); each
group gets one ``python sweep.py`` line that composes that config again, so that its new runs
join the same row: ``experiment=`` the run's experiment file (``none`` for ``custom`` runs),
``key=value`` for every logged key that differs from what that file composes to (as the newest
run of the group logged it), ``tracking.uri=`` the store the analysis read, and ``train.seed=``
new seeds numbered after the side's largest. A side that mixes configs spreads its missing
seeds over them. The script runs from the folder analyze.py ran in and passes its own arguments
to every line.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pandas as pd
from hydra.initialize import get_gh_backup, restore_gh_from_backup

from pnn.analysis.claims import member_runs
from pnn.analysis.claims_file import Member
from pnn.analysis.comparability import LABEL_KEYS, ignored_key, same_value
from pnn.analysis.runs import CONFIG_PREFIX
from pnn.analysis.significance import TOO_MANY
from pnn.config import CONF_DIR, load_config
from pnn.io.tracking import flatten

SWEEP = CONF_DIR.parent / "sweep.py"
# Not copied from the runs: set here (the seed, the experiment file, the store) or meaningless
# for new runs (a rerun flag, a dry run, labels that the experiment file sets).
NOT_COPIED = ("train.seed", "experiment", "tracking", "sweep", "dry_run", *LABEL_KEYS)
_PLAIN = re.compile(r"[A-Za-z0-9_./:+-]+")


def _not_copied(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in NOT_COPIED)


@lru_cache(maxsize=64)
def composed(experiment: str) -> tuple[str, dict[str, str]] | None:
    """(the ``experiment=`` choice, the flattened config it composes to) for a run's
    experiment; None when conf/experiment/ has no file for it."""
    choice = "none" if experiment == "custom" else experiment
    if not (CONF_DIR / "experiment" / f"{choice}.yaml").is_file():
        return None
    backup = get_gh_backup()  # the sweep's end runs the analysis inside Hydra
    try:
        cfg = load_config([f"experiment={choice}"], validate_config=False)
    finally:
        restore_gh_from_backup(backup)
    return (choice, flatten(cfg)) if cfg.experiment == experiment else None


def hydra_value(logged: str) -> str:
    """A logged param as a Hydra override value: ``None`` is null, a list stays a list, text
    that Hydra would parse otherwise is quoted."""
    if logged == "None":
        return "null"
    if _PLAIN.fullmatch(logged) or (logged.startswith("[") and logged.endswith("]")):
        return logged
    return "'" + logged.replace("\\", "\\\\").replace("'", "\\'") + "'"


def overrides(run: pd.Series, base: dict[str, str]) -> list[str]:
    """``key=value`` for each logged key of ``run`` that differs from ``base``."""
    items = []
    for column, value in run.items():
        key = str(column).removeprefix(CONFIG_PREFIX)
        if not str(column).startswith(CONFIG_PREFIX) or not isinstance(value, str):
            continue
        if _not_copied(key):
            continue
        if key not in base:
            items.append(f"+{key}={hydra_value(value)}")
        elif not same_value(value, base[key]):
            items.append(f"{key}={hydra_value(value)}")
    return items


def _config_groups(side: pd.DataFrame) -> list[pd.DataFrame]:
    """The side's runs per config (the keys that change results), each newest first."""
    keys = [c for c in side.columns if c.startswith(CONFIG_PREFIX)]
    keys = [c for c in keys if not ignored_key(c.removeprefix(CONFIG_PREFIX))]
    frame = side.assign(_config=side[keys].fillna("—").astype(str).agg("\x1f".join, axis=1))
    return [
        group.sort_values("start_time", ascending=False)
        for _, group in frame.groupby("_config", sort=False)
    ]


@dataclass
class _Line:
    args: list[str]
    seeds: set[int] = field(default_factory=set)
    why: list[str] = field(default_factory=list)


def side_lines(
    runs: pd.DataFrame, member: Member, target: int, store: list[str]
) -> list[tuple[list[str], list[int]]] | str:
    """(sweep.py arguments without the seeds, new seeds) per config of the side, to bring it to
    ``target`` runs; or why none can be given."""
    side = member_runs(runs, member)
    lacking = target - len(side)
    if lacking <= 0:
        return []
    base = composed(member.experiment)
    if base is None:
        return f"no conf/experiment/ file composes {member.experiment}'s runs again"
    groups = _config_groups(side)
    per_group = math.ceil(lacking / len(groups))
    seeds = [s for s in side["seed"] if s is not None and not pd.isna(s)]
    first = int(max(seeds)) + 1 if seeds else 1
    new = list(range(first, first + per_group))
    choice, config = base
    return [
        ([f"experiment={choice}", *overrides(group.iloc[0], config), *store], new)
        for group in groups
    ]


def seed_sweep(seeds: list[int]) -> str:
    """Hydra's sweep over ``seeds`` (sorted): ``range(4,46)`` for a run of more than three."""
    if len(seeds) > 3 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"range({seeds[0]},{seeds[-1] + 1})"
    return ",".join(str(s) for s in seeds)


def _sweep_path(launch_dir: Path) -> str:
    try:
        return str(SWEEP.relative_to(launch_dir))
    except ValueError:
        return str(SWEEP)


def build(
    runs: pd.DataFrame,
    claims: pd.DataFrame,
    tracking_uri: str,
    experiment_name: str,
    launch_dir: Path,
) -> tuple[str, int]:
    """next_seeds.sh for the ``open`` column of :func:`pnn.analysis.claims.evaluate_claims`,
    and how many sweep.py lines it holds."""
    store = [f"tracking.uri={hydra_value(tracking_uri)}"]
    if experiment_name != "pnn":
        store.append(f"tracking.experiment_name={hydra_value(experiment_name)}")
    lines: dict[tuple[str, ...], _Line] = {}
    notes: list[str] = []
    for _, row in claims.iterrows():
        seeds = row["open"].seeds
        if seeds == TOO_MANY:
            notes.append(
                f"# {row['claim']}: more than {TOO_MANY[2:]} seeds per side; the difference is "
                "too small to settle with seeds."
            )
            continue
        if not isinstance(seeds, int):
            continue
        for member in row["open"].members:
            found = side_lines(runs, member, seeds, store)
            if isinstance(found, str):
                notes.append(f"# {row['claim']}: {member.label}: {found}.")
                continue
            for args, new in found:
                line = lines.setdefault(tuple(args), _Line(args))
                line.seeds.update(new)
                line.why.append(f"{row['claim']} ({member.label}: {seeds} seeds)")
    head = [
        "#!/usr/bin/env bash",
        "# The seeds per side that would settle the open claims (seeds_needed in claims.csv),",
        "# written by analyze.py. Fix n from here once and run it: seeds added after looking at",
        "# a p-value make it optimistic. Arguments go to every sweep.py (launcher settings).",
        "set -euo pipefail",
        f"cd {shlex.quote(str(launch_dir))}",
    ]
    body: list[str] = []
    for line in lines.values():
        args = [*line.args, f"train.seed={seed_sweep(sorted(line.seeds))}"]
        body.append("# " + "; ".join(dict.fromkeys(line.why)))
        quoted = " ".join(shlex.quote(a) for a in args)
        body.append(f'python {shlex.quote(_sweep_path(launch_dir))} {quoted} "$@"')
    if not lines:
        body.append("# No open claim that more seeds would settle: nothing to run.")
    return "\n".join([*head, *notes, *body]) + "\n", len(lines)
