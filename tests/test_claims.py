"""Comparability with the paper and the README's claims, on a real SQLite store.

The job runs are logged by pnn.io.tracking.create_job_run itself from configs composed with the real
conf/ (load_config), so their params are exactly what sweep.py logs; only the metrics are set
by hand, so that every expected number can be worked out here.
"""

from __future__ import annotations

import math
import shutil
import statistics
from pathlib import Path

import pandas as pd
import pytest
from conftest import IN_PROCESS, run_analyze, run_sweep
from scipy import stats

from pnn.analysis.claims import CLAIM_COLUMNS, verdict

E1, E2, E3, E4 = (
    "e1_baseline_resnet18",
    "e2_original_noiseresnet18",
    "e3_original_first3x3",
    "e4_conv1x1_no_noise",
)
E5, E6, E7, E8 = (
    "e5_pnn_all_layers",
    "e6_pnn_unique_masks_mix_maps",
    "e7_pnn_shared_masks",
    "e8_pnn_trained_masks",
)
# Best test accuracy of each comparable run (one per seed, seeds 1, 2, ...).
BEST = {
    E1: [91.0, 92.0, 91.5],
    E2: [85.0, 85.5],
    E3: [85.9, 86.0, 86.1],
    E4: [85.5, 85.4, 85.3],
    E5: [80.0, 80.2],
    E6: [82.0, 82.2],
    E7: [82.5, 82.3],
    E8: [85.6],  # one run: claims involving e8 have too few runs
}


def _log(uri: str, experiment_name: str, overrides: list[str], best: float, gap: float) -> str:
    from mlflow.tracking import MlflowClient

    from pnn.config import load_config
    from pnn.io.tracking import config_hash, create_job_run, get_experiment_id, log_metrics

    cfg = load_config(overrides)
    client = MlflowClient(uri)
    experiment_id = get_experiment_id(client, experiment_name, uri)
    run_id = create_job_run(client, experiment_id, cfg, config_hash(cfg), " ".join(overrides))
    log_metrics(client, run_id, {"test_acc": best - 1.0, "test_acc_reported": best}, 1)
    log_metrics(client, run_id, {"test_acc": best, "test_acc_reported": best + gap}, 2)
    summary = {
        "best_test_acc": best,
        "best_epoch": 2,
        "final_test_acc": best,
        "best_test_acc_reported": best + gap,
        "params": 1e6,
        "mask_values": 0,
        "trainable": 1e6,
    }
    log_metrics(client, run_id, summary, 0)
    client.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, empty_store: Path) -> dict:
    root = tmp_path_factory.mktemp("claims")
    shutil.copyfile(empty_store, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    for experiment, values in BEST.items():
        for seed, best in enumerate(values, start=1):
            # Keys that do not change results may differ: still comparable.
            volatile = ["train.device=cpu", "dataset.root=elsewhere"] if seed == 2 else []
            overrides = [f"experiment={experiment}", f"train.seed={seed}", *volatile]
            _log(uri, "pnn", overrides, best, gap=4.0 + 0.5 * seed)
    # Not comparable: an override (kept out of the claims, which have comparable e7 runs) ...
    noisy = [f"experiment={E7}", "train.seed=3", "noise.level=0.1"]
    _log(uri, "pnn", noisy, 99.0, gap=1.0)
    # ... and, in an MLflow experiment of its own, smoke runs of e4 on synthetic data.
    for seed in (1, 2):
        smoke = [f"experiment={E4}", f"train.seed={seed}", "profile=smoke"]
        _log(uri, "smoke", smoke, 20.0 + seed, gap=2.0)
    return {"uri": uri, "root": root}


def _analyze(store: dict, out: Path, **options: object) -> None:
    from pnn.analysis.report import write_report

    report, _ = write_report(store["uri"], out=out, **options)
    assert out / "claims.csv" in report.written and out / "claims.png" in report.written


@pytest.fixture(scope="module")
def analysed(store: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("claims-out")
    _analyze(store, out)
    return out


def _claims(out: Path) -> pd.DataFrame:
    frame = pd.read_csv(out / "claims.csv")
    assert tuple(frame.columns) == CLAIM_COLUMNS
    return frame.set_index("claim")


def _welch(a: list[float], b: list[float]) -> tuple[float, float]:
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return ci.low, ci.high


# --------------------------------------------------------------------------------------------
# Comparability in results.csv
# --------------------------------------------------------------------------------------------


def test_comparable_rows_get_published_figures(analysed: Path) -> None:
    table = pd.read_csv(analysed / "results.csv").set_index("experiment")
    for experiment, published in ((E1, 91.8), (E3, 86.2), (E8, 85.9)):
        row = table.loc[experiment]
        assert bool(row["comparable"]) is True
        assert row["published_test_acc"] == pytest.approx(published)
        mean = statistics.fmean(BEST[experiment])
        assert row["diff_vs_published"] == pytest.approx(mean - published)


def test_row_with_an_override_is_not_comparable(
    analysed: Path, store: dict, tmp_path: Path
) -> None:
    # noise.level is swept within e7, so it splits e7 by default: the paper's own setting is
    # comparable, the override is not.
    split = pd.read_csv(analysed / "results.csv", dtype={"noise.level": str})
    e7_rows = split[split["experiment"] == E7].set_index("noise.level")
    assert bool(e7_rows.loc["0.5", "comparable"]) is True
    assert e7_rows.loc["0.5", "published_test_acc"] == pytest.approx(82.4)
    assert bool(e7_rows.loc["0.1", "comparable"]) is False
    assert math.isnan(e7_rows.loc["0.1", "published_test_acc"])
    assert e7_rows.loc["0.1", "not_comparable_because"] == "noise.level=0.1"

    # --by none: one e7 row, which is not comparable.
    _analyze(store, tmp_path, by=[])
    table = pd.read_csv(tmp_path / "results.csv").set_index("experiment")
    assert list(table.index) == [E1, E2, E3, E4, E5, E6, E7, E8]  # all eight ran: all eight rows
    assert "No runs of" not in (tmp_path / "results.md").read_text()
    e7 = table.loc[E7]
    assert bool(e7["comparable"]) is False and e7["n_runs"] == 3
    assert math.isnan(e7["published_test_acc"]) and math.isnan(e7["diff_vs_published"])
    assert e7["not_comparable_because"] == "1 of 3 runs: noise.level=0.1"
    md = (tmp_path / "results.md").read_text()
    e7_row = next(line for line in md.splitlines() if line.startswith(f"| {E7} "))
    assert [cell.strip() for cell in e7_row.strip(" |").split("|")][-3:] == ["—", "—", "no [1]"]
    assert "[1] Not comparable: 1 of 3 runs: noise.level=0.1." in md


def test_smoke_runs_are_not_comparable(store: dict, tmp_path: Path) -> None:
    _analyze(store, tmp_path, experiment_name="smoke")
    table = pd.read_csv(tmp_path / "results.csv").set_index("experiment")
    e4 = table.loc[E4]
    assert bool(e4["comparable"]) is False
    assert math.isnan(e4["published_test_acc"]) and math.isnan(e4["diff_vs_published"])
    because = "synthetic data, train.epochs=1, train.max_steps_per_epoch=3"
    assert e4["not_comparable_because"] == because
    assert f"[1] Not comparable: {because}." in (tmp_path / "results.md").read_text()
    # Only what ran has a row; one line names the README experiments without runs.
    assert list(table.index) == [E4]
    others = ", ".join(e for e in (E1, E2, E3, E5, E6, E7, E8))
    assert f"No runs of: {others}." in (tmp_path / "results.md").read_text()
    # The claims still show the smoke runs' difference, but no verdict and no published diff:
    # the label says why, and there is no p-value to test the paper's claim with.
    gap = _claims(tmp_path).loc[f"gap_{E4}"]
    assert gap["diff_mean"] == pytest.approx(2.0) and gap["n_a"] == 2
    assert gap["verdict"] == "not comparable (0 comparable runs)" and not gap["comparable"]
    assert math.isnan(gap["published_diff"]) and math.isnan(gap["p_value"])
    assert math.isnan(gap["p_holm"]) and math.isnan(gap["seeds_needed"])


# --------------------------------------------------------------------------------------------
# claims.csv
# --------------------------------------------------------------------------------------------


def test_claim_e3_minus_e4_with_welch_interval(analysed: Path) -> None:
    row = _claims(analysed).loc["noise_worth_under_1pt"]
    assert (row["a"], row["b"], row["n_a"], row["n_b"]) == (E3, E4, 3, 3)
    expected = statistics.fmean(BEST[E3]) - statistics.fmean(BEST[E4])
    assert row["diff_mean"] == pytest.approx(expected, abs=1e-12)
    low, high = _welch(BEST[E3], BEST[E4])
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high), abs=1e-12)
    assert high < 1.0  # the whole interval below a point
    assert row["verdict"] == "supported" and bool(row["comparable"]) is True
    assert row["published_diff"] == pytest.approx(86.2 - 85.5)


def test_group_claims_test_every_member(analysed: Path) -> None:
    claims = _claims(analysed)
    # Both e6 and e7 lie below e4; the row shows e7, whose interval comes nearer 0 (its mean
    # 82.4 is above e6's 82.1, with the same spread). The noise.level=0.1 e7 run (99) is not
    # comparable, so unused.
    e6_e7 = claims.loc["e6_e7_below_e4"]
    assert (e6_e7["a"], e6_e7["n_a"]) == (E7, 2)
    assert e6_e7["diff_mean"] == pytest.approx(82.4 - 85.4)
    assert (e6_e7["ci_low"], e6_e7["ci_high"]) == pytest.approx(_welch(BEST[E7], BEST[E4]))
    assert _welch(BEST[E6], BEST[E4])[1] < e6_e7["ci_high"] < 0
    assert e6_e7["verdict"] == "supported"
    assert e6_e7["published_diff"] == pytest.approx(82.4 - 85.5)
    assert "shown: e7 − e4" in e6_e7["statement"]
    # e1 against each of e2-e8: none is contradicted, but e8 has a single run, so the claim
    # has too few runs, and the row shows that member.
    baseline = claims.loc["all_5pt_below_baseline"]
    for member in (E2, E3, E4, E5, E6, E7):
        assert _welch(BEST[E1], BEST[member])[1] >= 5.0  # not contradicted
    assert (baseline["b"], baseline["n_b"]) == (E8, 1)
    assert baseline["diff_mean"] == pytest.approx(91.5 - 85.6)
    assert baseline["verdict"] == "too few runs" and bool(baseline["comparable"]) is True
    assert baseline["published_diff"] == pytest.approx(91.8 - 85.9)


def test_contradicted_and_too_few_runs(analysed: Path) -> None:
    claims = _claims(analysed)
    first_layer = claims.loc["first_layer_noise_costs_10pt"]
    assert (first_layer["a"], first_layer["b"]) == (E3, E5)
    assert first_layer["ci_high"] < 10 and first_layer["verdict"] == "contradicted"
    assert first_layer["published_diff"] == pytest.approx(86.2 - 72.6)
    trained = claims.loc["trained_masks_match_e4"]
    assert trained["n_a"] == 1 and math.isnan(trained["ci_low"])
    assert trained["verdict"] == "too few runs"
    assert trained["diff_mean"] == pytest.approx(85.6 - 85.4)


def test_headline_gap_per_experiment(analysed: Path) -> None:
    claims = _claims(analysed)
    gap = claims.loc[f"gap_{E1}"]
    gaps = [4.5, 5.0, 5.5]  # 4 + 0.5 * seed
    assert gap["diff_mean"] == pytest.approx(5.0)
    ci = stats.ttest_1samp(gaps, 0.0).confidence_interval(0.95)
    assert (gap["ci_low"], gap["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert gap["verdict"] == "supported" and gap["n_a"] == 3
    assert claims.loc[f"gap_{E8}", "verdict"] == "too few runs"


def test_p_values_are_scipys_welch_tests_of_the_claimed_side(analysed: Path) -> None:
    claims = _claims(analysed)

    def welch_p(a: list[float], b: list[float], t: float, alternative: str) -> float:
        shifted = [x - t for x in a]
        return stats.ttest_ind(shifted, b, equal_var=False, alternative=alternative).pvalue

    # below: H1 a − b < t
    row = claims.loc["noise_worth_under_1pt"]
    assert row["p_value"] == pytest.approx(welch_p(BEST[E3], BEST[E4], 1.0, "less"), rel=1e-12)
    # above / at_least: H1 a − b > t
    row = claims.loc["first_layer_noise_costs_10pt"]
    expected = welch_p(BEST[E3], BEST[E5], 10.0, "greater")
    assert row["p_value"] == pytest.approx(expected, rel=1e-12) and expected > 0.5
    # a group: the largest of its members' p-values (e6 and e7 each below e4)
    row = claims.loc["e6_e7_below_e4"]
    members = [welch_p(BEST[m], BEST[E4], 0.0, "less") for m in (E6, E7)]
    assert row["p_value"] == pytest.approx(max(members), rel=1e-12)
    # a gap row: one-sample test of gap > 0
    gaps = [4.5, 5.0, 5.5]
    one_sample = stats.ttest_1samp(gaps, 0.0, alternative="greater").pvalue
    assert claims.loc[f"gap_{E1}", "p_value"] == pytest.approx(one_sample, rel=1e-12)
    # too few runs: no p-value (e8 has one run), and the group with e8 has none either
    assert math.isnan(claims.loc["trained_masks_match_e4", "p_value"])
    assert math.isnan(claims.loc["all_5pt_below_baseline", "p_value"])


def test_holm_over_every_row_with_a_p_value(analysed: Path) -> None:
    from statsmodels.stats.multitest import multipletests

    claims = _claims(analysed)
    tested = claims[claims["p_value"].notna()]
    assert len(tested) >= 9  # claims and gap rows together
    reject, adjusted, _, _ = multipletests(tested["p_value"], alpha=0.05, method="holm")
    assert list(tested["p_holm"]) == pytest.approx(list(adjusted), rel=1e-12)
    expected = ["supported" if r else "not supported" for r in reject]
    assert list(tested["verdict_holm"]) == expected
    assert "supported" in expected and "not supported" in expected
    assert claims.loc[claims["p_value"].isna(), "p_holm"].isna().all()
    # The interval verdict stays beside it.
    assert claims.loc["noise_worth_under_1pt", "verdict"] == "supported"


def test_alpha_sets_the_level_of_the_holm_verdicts(store: dict, analysed: Path, tmp_path: Path):
    claims = _claims(analysed)
    p_holm = claims.loc["noise_worth_under_1pt", "p_holm"]
    assert claims.loc["noise_worth_under_1pt", "verdict_holm"] == "supported"
    _analyze(store, tmp_path, alpha=p_holm / 2)  # any α below it
    strict = _claims(tmp_path)
    assert strict.loc["noise_worth_under_1pt", "p_holm"] == pytest.approx(p_holm)
    assert strict.loc["noise_worth_under_1pt", "verdict_holm"] == "not supported"
    assert f"α = {p_holm / 2:g}" in (tmp_path / "results.md").read_text()


def test_claims_in_markdown_and_html(analysed: Path) -> None:
    md = (analysed / "results.md").read_text()
    assert "## Claims" in md and "Welch" in md
    row = next(line for line in md.splitlines() if line.startswith("| noise_worth_under_1pt "))
    assert "supported" in row and "+0.7" in row
    page = (analysed / "report.html").read_text()
    assert "<h2>Claims</h2>" in page and "first_layer_noise_costs_10pt" in page
    assert "claims.png" in (analysed / "results.md").read_text()
    assert (analysed / "claims.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("kind", "low", "high", "expected"),
    [
        ("below", -2.0, 0.5, "supported"),
        ("below", 1.0, 3.0, "contradicted"),
        ("below", 0.5, 1.5, "inconclusive"),
        ("at_least", 1.0, 2.0, "supported"),
        ("at_least", -1.0, 0.9, "contradicted"),
        ("within", -0.5, 0.5, "supported"),
        ("within", -3.0, -1.0, "contradicted"),
        ("within", 0.5, 1.5, "inconclusive"),
    ],
)
def test_verdict_rules(kind: str, low: float, high: float, expected: str) -> None:
    assert verdict(kind, 1.0, low, high, enough=True) == expected
    assert verdict(kind, 1.0, low, high, enough=False) == "too few runs"


# --------------------------------------------------------------------------------------------
# End to end: the real sweep.py with profile=demo, then analyze.py
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("existing_store")
def test_demo_sweep_then_claims(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    # profile=demo itself sweeps two seeds of each experiment.
    args = [f"experiment={E3},{E4}", "profile=demo", *IN_PROCESS]
    done = run_sweep(args, tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = run_analyze([], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("pnn").experiment_id
    best: dict[str, dict[int, float]] = {E3: {}, E4: {}}
    curves = 0
    for run in client.search_runs([experiment_id], "tags.`pnn.role` = 'job'"):
        assert run.info.status == "FINISHED"
        seed = int(run.data.params["train.seed"])
        best[run.data.tags["experiment"]][seed] = run.data.metrics["best_test_acc"]
        curves = max(curves, len(client.get_metric_history(run.info.run_id, "test_acc")))
    assert {e: sorted(v) for e, v in best.items()} == {E3: [1, 2], E4: [1, 2]}
    assert curves >= 5  # several points per curve

    row = _claims(tmp_path / "results").loc["noise_worth_under_1pt"]
    a, b = list(best[E3].values()), list(best[E4].values())
    assert (row["a"], row["b"], row["n_a"], row["n_b"]) == (E3, E4, 2, 2)
    assert row["diff_mean"] == pytest.approx(statistics.fmean(a) - statistics.fmean(b), abs=1e-9)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(_welch(a, b), abs=1e-9)
    # Demo runs are not the paper's: no published difference, no verdict, and the label says so.
    assert not row["comparable"] and math.isnan(row["published_diff"])
    assert row["verdict"] == "not comparable (0 / 0 comparable runs)"
    assert math.isnan(row["p_value"]) and math.isnan(row["seeds_needed"])
    table = pd.read_csv(tmp_path / "results" / "results.csv").set_index("experiment")
    assert math.isnan(table.loc[E3, "published_test_acc"])
    assert table.loc[E3, "not_comparable_because"].startswith("synthetic data, model.nfilters=4")
