"""How many seeds would settle an open claim, and next_seeds.sh, the command that runs them.

The unit tests check the power analysis against statsmodels and that the overrides read back
from a run's logged config compose that config again (the real conf/). The slow test runs the
real sweep.py, analyze.py with a claim of the user's, then ``bash next_seeds.sh`` itself, and
analyze.py again.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import IN_PROCESS, TINY, clean_env, run_analyze, run_sweep, runs_of, store

from pnn.analysis.next_seeds import composed, hydra_value, overrides, seed_sweep
from pnn.analysis.significance import MAX_SEEDS, TOO_MANY, seeds_needed
from pnn.config import load_config
from pnn.io.tracking import flatten

E4, E7 = "e4_conv1x1_no_noise", "e7_pnn_shared_masks"


@pytest.mark.parametrize("effect", [0.5, 1.0, 1.7, 2.8])
@pytest.mark.parametrize("alternative", ["larger", "two-sided"])
def test_seeds_needed_is_statsmodels_solve_power_rounded_up(effect: float, alternative: str):
    from statsmodels.stats.power import TTestIndPower

    n = TTestIndPower().solve_power(effect, None, 0.05, 0.8, alternative=alternative)
    assert 2 < n <= MAX_SEEDS
    assert seeds_needed(effect, 0.05, alternative) == math.ceil(n)
    assert seeds_needed(-effect, 0.05, alternative) == math.ceil(n)  # the distance counts


def test_seeds_needed_at_the_ends() -> None:
    from statsmodels.stats.power import TTestIndPower

    # Too small a difference: more than MAX_SEEDS ("> 100"), also for none at all.
    assert TTestIndPower().solve_power(0.2, None, 0.05, 0.8, alternative="larger") > MAX_SEEDS
    assert seeds_needed(0.2, 0.05) == seeds_needed(0.0, 0.05) == TOO_MANY == "> 100"
    # So large that 2 already give 80% power (solve_power does not converge there): 2.
    assert TTestIndPower().power(8.0, 2, 0.05, alternative="larger") > 0.8
    assert seeds_needed(8.0, 0.05) == 2
    # No spread to measure the effect by: nothing to say.
    assert seeds_needed(math.inf, 0.05) is None and seeds_needed(math.nan, 0.05) is None


def test_the_logged_config_composes_again_from_its_overrides() -> None:
    given = [
        f"experiment={E7}",
        "profile=demo",
        "masks.nmasks=8",
        "optimizer.betas=[0.8, 0.99]",
        "dataset.root='/data/a b,c'",  # a path Hydra would read as a sweep unless quoted
        "train.device=cpu",
        "train.seed=7",
    ]
    logged = flatten(load_config(given, validate_config=False))
    run = pd.Series({f"config.{k}": v for k, v in logged.items()})
    choice, base = composed(E7)
    args = overrides(run, base)
    assert choice == E7 and "masks.nmasks=8" in args and "train.device=cpu" in args
    assert not any(a.startswith(("train.seed=", "tracking.", "description=")) for a in args)
    again = flatten(load_config([f"experiment={choice}", *args, "train.seed=7"]))
    assert again == logged
    assert hydra_value("None") == "null" and hydra_value("sqlite:////a/b.db") == "sqlite:////a/b.db"
    assert seed_sweep([3]) == "3" and seed_sweep([3, 5]) == "3,5"
    assert seed_sweep(list(range(4, 46))) == "range(4,46)"  # 42 seeds, as Hydra sweeps them


# --------------------------------------------------------------------------------------------
# End to end: a sweep, an open claim, bash next_seeds.sh, and the analysis again
# --------------------------------------------------------------------------------------------

# a − b lies this many pooled sample stds above the threshold: with 2 seeds per side Welch's
# interval (t > 4.3 at df <= 2) and its one-sided p (> 0.05) leave it open, and 3 seeds per
# side give the one-sided test 80% power.
EFFECT = 2.8
SIDE_A = f"{{experiment: {E7}, noise.level: 0.5}}"


def _best(client: object) -> dict[str, dict[int, float]]:
    best: dict[str, dict[int, float]] = {E4: {}, E7: {}}
    for run in runs_of(client, "job"):
        assert run.info.status == "FINISHED"
        seed = int(run.data.params["train.seed"])
        best[run.data.tags["experiment"]][seed] = run.data.metrics["best_test_acc"]
    return best


@pytest.mark.slow
@pytest.mark.usefixtures("existing_store")
def test_next_seeds_raise_each_side_to_seeds_needed(tmp_path: Path) -> None:
    from statsmodels.stats.power import TTestIndPower

    done = run_sweep(
        [f"experiment={E4},{E7}", "train.seed=1,2", *TINY, "train.device=cpu", *IN_PROCESS],
        tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = store(tmp_path)
    best = _best(client)
    a, b = list(best[E7].values()), list(best[E4].values())
    spread = math.sqrt((statistics.variance(a) + statistics.variance(b)) / 2)
    assert spread > 0, best  # the seeds must differ for a t-test
    threshold = statistics.fmean(a) - statistics.fmean(b) - EFFECT * spread
    claims = tmp_path / "mine.yaml"
    claims.write_text(
        "claims:\n  - id: e7_above_e4\n"
        f"    a: {SIDE_A}\n    b: {E4}\n    kind: above\n    threshold: {threshold!r}\n"
    )

    result = run_analyze(["--claims", str(claims)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "results"
    row = pd.read_csv(out / "claims.csv").set_index("claim").loc["e7_above_e4"]
    assert (row["n_a"], row["n_b"], row["verdict"]) == (2, 2, "inconclusive")
    assert row["verdict_holm"] == "not supported"
    n = TTestIndPower().solve_power(EFFECT, None, 0.05, 0.8, alternative="larger")
    assert int(row["seeds_needed"]) == math.ceil(n) == 3
    script = (out / "next_seeds.sh").read_text()
    assert script in result.stdout  # printed too
    commands = [line for line in script.splitlines() if line.startswith("python ")]
    assert len(commands) == 2, script  # one per side
    assert all("train.seed=3 " in c and f"tracking.uri=sqlite:///{tmp_path}" in c for c in commands)
    rows_before = pd.read_csv(out / "results.csv")[["experiment", "n_runs"]]
    before = {r.info.run_id: r for r in runs_of(client, "job")}

    # The script as a user runs it, with `python` on the PATH; the launcher setting passes through.
    env = clean_env({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    ran = subprocess.run(
        ["bash", str(out / "next_seeds.sh"), *IN_PROCESS],
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]

    # Exactly the new seeds ran, each with its side's config: only the seed differs.
    new = [r for r in runs_of(client, "job") if r.info.run_id not in before]
    assert sorted((r.data.tags["experiment"], r.data.params["train.seed"]) for r in new) == [
        (E4, "3"),
        (E7, "3"),
    ]
    for run in new:
        old = next(
            r for r in before.values() if r.data.tags["experiment"] == run.data.tags["experiment"]
        )
        differs = {
            k
            for k in old.data.params.keys() | run.data.params.keys()
            if old.data.params.get(k) != run.data.params.get(k)
        }
        assert differs <= {"train.seed", "tracking.uri"}, differs

    again = run_analyze(["--claims", str(claims)], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    claims_after = pd.read_csv(out / "claims.csv").set_index("claim")
    row = claims_after.loc["e7_above_e4"]
    assert (row["n_a"], row["n_b"]) == (3, 3)  # n = seeds_needed on each side, in the same row
    rows_after = pd.read_csv(out / "results.csv")[["experiment", "n_runs"]]
    assert list(rows_after["experiment"]) == list(rows_before["experiment"]) == [E4, E7]
    assert list(rows_after["n_runs"]) == [3, 3]
