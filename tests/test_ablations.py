"""Ablations: the swept keys found in the runs, each level against a reference with Welch's
interval, and a figure per key.

The unit tests hand pnn.analysis.ablations a table of runs shaped as
pnn.analysis.runs.load_runs gives it; the slow test runs the real sweep.py (profile=demo, made
smaller) and analyze.py, and checks the numbers against what MlflowClient reads back.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pandas as pd
import pytest
from conftest import IN_PROCESS, run_analyze, run_sweep, runs_of, store
from scipy import stats

from pnn.analysis.ablations import ablation_table, figure_name, swept_keys
from pnn.analysis.plots import plot_ablation

E4, E7 = "e4_conv1x1_no_noise", "e7_pnn_shared_masks"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _welch(a: list[float], b: list[float]) -> tuple[float, float]:
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return ci.low, ci.high


def _runs(rows: list[tuple[str, str, str, int, str, float]]) -> pd.DataFrame:
    """(experiment, masks.nmasks, noise.level, seed, train.device, best) per run."""
    return pd.DataFrame(
        [
            {
                "experiment": experiment,
                "config.experiment": experiment,
                "config.masks.nmasks": nmasks,
                "config.noise.level": level,
                "config.train.seed": str(seed),
                "config.train.device": device,
                "best_test_acc": best,
            }
            for experiment, nmasks, level, seed, device, best in rows
        ]
    )


# e7: nmasks 1 and 64 crossed with noise.level 0.1 and 0.5, two seeds each; e4: seeds only
# (on two devices, which never changes results).
GRID = {
    ("1", "0.1"): [40.0, 42.0],
    ("64", "0.1"): [50.0, 51.0],
    ("1", "0.5"): [45.0, 47.5],
    ("64", "0.5"): [55.0, 54.0],
}
RUNS = _runs(
    [
        (E7, nmasks, level, seed, "cpu", best)
        for (nmasks, level), values in GRID.items()
        for seed, best in enumerate(values, start=1)
    ]
    + [(E4, "1", "0.5", 1, "cpu", 60.0), (E4, "1", "0.5", 2, "cuda", 61.0)]
)


def test_swept_keys_leave_out_the_seed_and_keys_that_change_nothing() -> None:
    assert swept_keys(RUNS) == {E7: ["masks.nmasks", "noise.level"]}


def test_each_key_with_the_others_held_at_each_level() -> None:
    table = ablation_table(RUNS, swept_keys(RUNS))
    nmasks = table[table["key"] == "masks.nmasks"].set_index(["held", "level"])
    # Nothing averaged over noise.level: one comparison per level of it.
    assert sorted(set(nmasks.index.get_level_values("held"))) == [
        "noise.level=0.1",
        "noise.level=0.5",
    ]
    # e7's own file has 64 masks: the reference, though 1 sorts first.
    assert set(nmasks["reference_level"]) == {"64"}
    row = nmasks.loc[("noise.level=0.1", "1")]
    a, b = GRID[("1", "0.1")], GRID[("64", "0.1")]
    assert row["n"] == 2
    assert row["best_test_acc_mean"] == pytest.approx(statistics.fmean(a))
    assert row["best_test_acc_std"] == pytest.approx(statistics.stdev(a))
    ci = stats.ttest_1samp(a, 0.0).confidence_interval(0.95)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert row["diff_vs_reference"] == pytest.approx(statistics.fmean(a) - statistics.fmean(b))
    assert (row["diff_ci_low"], row["diff_ci_high"]) == pytest.approx(_welch(a, b))
    # noise.level: e7's file value (0.5) is among the levels, so it is the reference.
    level = table[table["key"] == "noise.level"].set_index(["held", "level"])
    assert set(level["reference_level"]) == {"0.5"}
    row = level.loc[("masks.nmasks=64", "0.1")]
    a, b = GRID[("64", "0.1")], GRID[("64", "0.5")]
    assert row["diff_vs_reference"] == pytest.approx(statistics.fmean(a) - statistics.fmean(b))
    assert (row["diff_ci_low"], row["diff_ci_high"]) == pytest.approx(_welch(a, b))


def test_p_values_holm_per_key_and_seeds_needed() -> None:
    from statsmodels.stats.multitest import multipletests
    from statsmodels.stats.power import TTestIndPower

    table = ablation_table(RUNS, swept_keys(RUNS))
    for key, part in table.groupby("key"):
        contrasts = part[part["level"] != part["reference_level"]]
        assert part.loc[part["level"] == part["reference_level"], "p_value"].isna().all()
        for _, row in contrasts.iterrows():
            (other, value), *_ = (item.split("=") for item in row["held"].split(", "))
            same = (RUNS["experiment"] == E7) & (RUNS[f"config.{other}"] == value)
            level, reference = (
                same & (RUNS[f"config.{key}"] == v) for v in row[["level", "reference_level"]]
            )
            a, b = (list(RUNS.loc[m, "best_test_acc"]) for m in (level, reference))
            expected = stats.ttest_ind(a, b, equal_var=False).pvalue  # two-sided
            assert row["p_value"] == pytest.approx(expected, rel=1e-12)
        # Holm over the contrasts of one key's table, every held level together.
        assert len(contrasts) == 2
        adjusted = multipletests(contrasts["p_value"], method="holm")[1]
        assert list(contrasts["p_holm"]) == pytest.approx(list(adjusted), rel=1e-12)

    # A contrast that neither its interval nor its p-value settles: the seeds per level for
    # 80% power of the two-sided test at 0.05.
    runs = _runs(
        [(E7, "1", "0.5", seed, "cpu", best) for seed, best in ((1, 50.0), (2, 52.0))]
        + [(E7, "64", "0.5", seed, "cpu", best) for seed, best in ((1, 53.0), (2, 55.0))]
    )
    row = ablation_table(runs, swept_keys(runs)).set_index("level").loc["1"]
    assert row["diff_ci_low"] < 0 < row["diff_ci_high"] and row["p_holm"] > 0.05
    pooled = math.sqrt((statistics.variance([50, 52]) + statistics.variance([53, 55])) / 2)
    n = TTestIndPower().solve_power(3.0 / pooled, None, 0.05, 0.8)  # two-sided
    assert row["seeds_needed"] == math.ceil(n) == 5
    # Settled contrasts have none.
    settled = ablation_table(RUNS, swept_keys(RUNS))
    settled = settled[settled["diff_ci_high"] < 0]
    assert len(settled) and settled["seeds_needed"].isna().all()


def test_keys_that_change_together_are_not_held_against_each_other() -> None:
    # noise.level moves with masks.nmasks here (one override set both): each key's table has
    # both its levels, nothing held.
    runs = _runs(
        [(E7, "1", "0.1", seed, "cpu", 40.0 + seed) for seed in (1, 2)]
        + [(E7, "64", "0.5", seed, "cpu", 50.0 + seed) for seed in (1, 2)]
    )
    table = ablation_table(runs, swept_keys(runs))
    assert list(table["key"]) == ["masks.nmasks"] * 2 + ["noise.level"] * 2
    assert set(table["held"]) == {""}
    assert table["diff_vs_reference"].abs().max() == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("levels", "scale", "ticks"),
    [
        (["1", "8", "64", "512"], "log", None),  # two decades or more
        (["0.05", "0.3"], "linear", None),
        (["normal", "uniform"], "linear", ["normal", "uniform"]),  # categories
    ],
)
def test_figure_axis(levels: list[str], scale: str, ticks: list[str] | None) -> None:
    runs = _runs(
        [(E7, level, "0.5", 1, "cpu", 40.0 + i) for i, level in enumerate(levels)]
        + [(E7, level, "0.5", 2, "cpu", 42.5 + i) for i, level in enumerate(levels)]
    )
    table = ablation_table(runs, swept_keys(runs))
    ax = plot_ablation(table, "masks.nmasks").axes[0]
    assert ax.get_xscale() == scale
    if ticks is not None:
        assert [t.get_text() for t in ax.get_xticklabels()] == ticks
    else:
        assert sorted(float(x) for x in ax.get_xticks()) == sorted(float(v) for v in levels)
    assert figure_name("masks.nmasks") == "ablation_masks.nmasks.png"


# --------------------------------------------------------------------------------------------
# End to end: a researcher's own grid, then analyze.py with no --by
# --------------------------------------------------------------------------------------------

# The demo profile, smaller: one epoch on 32 images, the jobs in the sweep's process (what is
# under test is analyze.py's reading of the store, not job processes).
SMALL = [
    "dataset.train_size=32",
    "dataset.test_size=64",
    "train.epochs=1",
    *IN_PROCESS,
]


@pytest.mark.slow
@pytest.mark.usefixtures("existing_store")
def test_own_grid_found_compared_and_drawn(tmp_path: Path) -> None:
    grid = [f"experiment={E7}", "noise.level=0.05,0.3", "train.seed=1,2", "profile=demo"]
    done = run_sweep([*grid, *SMALL], tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = run_analyze([], tmp_path)  # no --by
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Grouped by the swept keys found in the runs: noise.level (e7_pnn_shared_masks)" in (
        result.stdout
    )

    client = store(tmp_path)
    best: dict[str, list[float]] = {"0.05": [], "0.3": []}
    for run in runs_of(client, "job"):
        assert run.info.status == "FINISHED"
        best[run.data.params["noise.level"]].append(run.data.metrics["best_test_acc"])
    assert [len(v) for v in best.values()] == [2, 2]

    out = tmp_path / "results"
    table = pd.read_csv(out / "results.csv", dtype={"noise.level": str})
    assert list(table["experiment"]) == [E7, E7]
    assert list(table["noise.level"]) == ["0.05", "0.3"]
    for level, values in best.items():
        row = table[table["noise.level"] == level].iloc[0]
        assert row["n_runs"] == 2
        assert row["best_test_acc_mean"] == pytest.approx(statistics.fmean(values), abs=1e-9)

    ablation = pd.read_csv(out / "ablations.csv", dtype={"level": str, "reference_level": str})
    row = ablation[ablation["level"] == "0.3"].iloc[0]
    # e7's file has noise.level 0.5, not among the levels: the first level is the reference.
    assert (row["key"], row["reference_level"]) == ("noise.level", "0.05")
    diff = statistics.fmean(best["0.3"]) - statistics.fmean(best["0.05"])
    assert row["diff_vs_reference"] == pytest.approx(diff, abs=1e-9)
    low, high = _welch(best["0.3"], best["0.05"])
    assert (row["diff_ci_low"], row["diff_ci_high"]) == pytest.approx((low, high), abs=1e-9)
    figure = (out / "ablation_noise.level.png").read_bytes()
    assert figure[:8] == PNG_SIGNATURE and len(figure) > 10_000
    md = (out / "results.md").read_text()
    assert "## Ablations" in md and "![" in md and "(ablation_noise.level.png)" in md

    # The sweep's own analysis put the same section on its parent run, the dashboard.
    (parent,) = runs_of(client, "sweep")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"ablations.csv", "ablation_noise.level.png"} <= artifacts
    note = parent.data.tags["mlflow.note.content"]
    assert "## Ablations" in note and "### noise.level" in note
