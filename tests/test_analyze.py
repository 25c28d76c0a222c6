"""analyze.py: MLflow store -> results tables, reported-vs-actual, figures, report.html.

Most tests read a store written here by pnn.io.tracking's own functions, as a sweep writes it
(only the numbers are made up); the slow test fills one with the real sweep.py and checks
every number against MlflowClient.
"""

from __future__ import annotations

import base64
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import conftest
import pandas as pd
import pytest

from pnn.config import load_config

PYTHON = sys.executable
# A copy on purpose: the README's order, checked independently of results.README_EXPERIMENTS.
README_ORDER = [
    "e1_baseline_resnet18",
    "e2_original_noiseresnet18",
    "e3_original_first3x3",
    "e4_conv1x1_no_noise",
    "e5_pnn_all_layers",
    "e6_pnn_unique_masks_mix_maps",
    "e7_pnn_shared_masks",
    "e8_pnn_trained_masks",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = (
    "test_acc_per_epoch.png",
    "reported_vs_actual.png",
    "resnet18_like_models.png",
    "claims.png",
)


analyze = conftest.load_analyze()


# --------------------------------------------------------------------------------------------
# A store written per the tracking contract
# --------------------------------------------------------------------------------------------


@contextmanager
def environment_restored() -> Iterator[None]:
    """``tracking.start_sweep`` hands the sweep to its jobs through ``os.environ`` (and pins
    the store there): undone afterwards, as for a sweep process that ends."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class FakeSweep:
    """A parent run and child job runs written by the sweep's own functions
    (``pnn.sweep.sweep_run``, ``pnn.io.tracking``), called as the sweeper and ``pnn/sweep/job.py``
    call them, for configs composed from the real ``conf/``; only the numbers (accuracies, parameter
    counts) are made up."""

    def __init__(self, uri: str, sweep_dir: Path) -> None:
        from pnn.io import storeguard, tracking
        from pnn.sweep import sweep_run

        cfg = load_config([f"tracking.uri={uri}"])
        sweep_run.start_sweep(cfg, sweep_dir, "(test)", 1)  # its heartbeat is not started
        self.parent_id = os.environ[tracking.ENV_PARENT]
        keys = (tracking.ENV_URI, tracking.ENV_PARENT, tracking.ENV_SWEEP)
        self.env = {key: os.environ[key] for key in keys}  # what its job processes inherit
        self.client = storeguard.client(uri)
        self.experiment_id = tracking.get_experiment_id(self.client, "pnn", uri)

    def job(
        self,
        experiment: str,
        seed: int,
        test_acc: list[float],
        gap: float = 4.0,
        status: str = "FINISHED",
        failure: str = "",
        config: dict[str, str] | None = None,
        params: float = 5.5e6,
    ) -> str:
        from pnn.io import tracking
        from pnn.sweep.lease import lease_tags, owner_id

        overrides = [
            f"experiment={'none' if experiment == 'custom' else experiment}",
            f"train.seed={seed}",
            f"train.epochs={len(test_acc)}",
            *(f"{key}={value}" for key, value in (config or {}).items()),
        ]
        cfg = load_config(overrides)
        cfg.description = f"{experiment} as logged"
        os.environ.update(self.env)
        client, chash = self.client, tracking.config_hash(cfg)
        claim = lease_tags(owner_id())
        run_id = tracking.create_job_run(
            client, self.experiment_id, cfg, chash, " ".join(overrides), claim
        )
        counts = {"params": params, "mask_values": 1.2e5, "trainable": params}
        tracking.log_metrics(client, run_id, counts, step=0)
        for epoch, acc in enumerate(test_acc, start=1):
            per_epoch = {"test_acc": acc, "test_acc_reported": acc + gap, "train_loss": 1 / epoch}
            tracking.log_metrics(client, run_id, per_epoch, step=epoch)
        if status == "FINISHED":
            final = {
                "best_test_acc": max(test_acc),
                "best_epoch": test_acc.index(max(test_acc)) + 1,
                "final_test_acc": test_acc[-1],
                "best_test_acc_reported": max(test_acc) + gap,
            }
            tracking.log_metrics(client, run_id, final, step=0)
            tracking.finish_job_run(client, run_id)
        elif status != "RUNNING":
            tags = {"pnn.failure": failure} if failure else {}
            assert tracking.mark_run(client, run_id, status, tags) is None
        return run_id

    def end(self) -> None:
        from pnn.sweep import sweep_run

        os.environ.update(self.env)
        assert sweep_run.end_sweep("FINISHED", {}) is None


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, empty_store: Path) -> dict:
    root = tmp_path_factory.mktemp("store")
    shutil.copyfile(empty_store, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with environment_restored():
        first = FakeSweep(uri, root / "multirun" / "first")
        ids = {
            "e1_s1": first.job("e1_baseline_resnet18", 1, [60.0, 70.0, 68.0]),
            "e1_s2": first.job("e1_baseline_resnet18", 2, [62.0, 71.0, 72.0]),
            "e2_s1": first.job("e2_original_noiseresnet18", 1, [50.0, 55.0, 58.0], gap=6.0),
            "e4_old": first.job("e4_conv1x1_no_noise", 1, [40.0, 41.0, 42.0]),
            "e5_failed": first.job(
                "e5_pnn_all_layers", 1, [10.0], status="FAILED", failure="loss is nan at epoch 2"
            ),
            "e6_running": first.job("e6_pnn_unique_masks_mix_maps", 1, [30.0], status="RUNNING"),
            "zz_custom": first.job("custom", 1, [20.0, 25.0, 24.0]),
        }
        first.end()
        # The latest sweep: a rerun of e4 and an --by-able e7 pair.
        second = FakeSweep(uri, root / "multirun" / "second")
        ids["e4_new"] = second.job("e4_conv1x1_no_noise", 1, [43.0, 44.0, 45.0])
        ids["e7_m64"] = second.job("e7_pnn_shared_masks", 1, [50.0, 52.0, 53.0])
        ids["e7_m8"] = second.job(
            "e7_pnn_shared_masks", 1, [45.0, 47.0, 46.0], config={"masks.nmasks": "8"}
        )
        second.end()
    return {"uri": uri, "root": root, "ids": ids, "latest": second.parent_id}


def run_analyze(store: dict, out: Path, *extra: str) -> int:
    return analyze.main(["--tracking-uri", store["uri"], "--out", str(out), *extra])


@pytest.fixture(scope="module")
def analysed(store: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("results")
    assert run_analyze(store, out) == 0
    return out


# --------------------------------------------------------------------------------------------
# The results table
# --------------------------------------------------------------------------------------------


def test_results_csv_numbers(analysed: Path) -> None:
    table = pd.read_csv(analysed / "results.csv").set_index("experiment")
    e1 = table.loc["e1_baseline_resnet18"]
    assert e1["n_runs"] == 2
    assert e1["final_test_acc_mean"] == pytest.approx(70.0)
    assert e1["final_test_acc_std"] == pytest.approx(pd.Series([68.0, 72.0]).std())
    assert e1["best_test_acc_mean"] == pytest.approx(71.0)
    assert e1["best_test_acc_std"] == pytest.approx(pd.Series([70.0, 72.0]).std())
    assert e1["best_test_acc_reported_mean"] == pytest.approx(75.0)
    # These runs' configs are not the experiment file's (tests/test_claims.py has ones that
    # are): no published figure to compare with.
    assert bool(e1["comparable"]) is False
    assert math.isnan(e1["published_test_acc"]) and math.isnan(e1["diff_vs_published"])
    assert "train.epochs=3" in e1["not_comparable_because"]
    assert e1["params_M"] == pytest.approx(5.5)
    assert e1["mask_values_M"] == pytest.approx(0.12)
    assert table.loc["e2_original_noiseresnet18", "description"].endswith("as logged")


def test_single_run_std_is_blank_everywhere(analysed: Path) -> None:
    table = pd.read_csv(analysed / "results.csv").set_index("experiment")
    assert math.isnan(table.loc["e2_original_noiseresnet18", "best_test_acc_std"])
    raw = (analysed / "results.csv").read_text()
    e2_line = next(line for line in raw.splitlines() if line.startswith("e2_"))
    assert ",," in e2_line  # an empty std cell, not 0.0
    md = (analysed / "results.md").read_text()
    e2_row = next(line for line in md.splitlines() if line.startswith("| e2_"))
    assert "58.00" in e2_row and "±" not in e2_row


def test_row_order_and_missing_experiments(analysed: Path) -> None:
    table = pd.read_csv(analysed / "results.csv")
    # Only what ran, in README order (e7 once per swept masks.nmasks value), then the others.
    ran = ["e1_baseline_resnet18", "e2_original_noiseresnet18", "e4_conv1x1_no_noise"]
    assert list(table["experiment"]) == [*ran, *["e7_pnn_shared_masks"] * 2, "custom"]
    missing = [e for e in README_ORDER if e not in ran and e != "e7_pnn_shared_masks"]
    assert f"No runs of: {', '.join(missing)}." in (analysed / "results.md").read_text()


def test_rerun_supersedes_older_run_of_same_config(analysed: Path, store: dict) -> None:
    table = pd.read_csv(analysed / "results.csv").set_index("experiment")
    assert table.loc["e4_conv1x1_no_noise", "n_runs"] == 1
    assert table.loc["e4_conv1x1_no_noise", "best_test_acc_mean"] == pytest.approx(45.0)
    md = (analysed / "results.md").read_text()
    assert f"re-run as {store['ids']['e4_new']}" in md


def test_mixed_configs_flagged(analysed: Path, store: dict, tmp_path: Path) -> None:
    # By default the swept key splits e7 and is named; --by none averages, and says so.
    md = (analysed / "results.md").read_text()
    assert "swept keys found in the runs: masks.nmasks (e7_pnn_shared_masks)" in md
    assert "averages runs that differ" not in md
    assert run_analyze(store, tmp_path, "--by", "none") == 0
    note = "e7_pnn_shared_masks averages runs that differ in masks.nmasks besides the seed"
    assert note in (tmp_path / "results.md").read_text()


def test_excluded_runs_in_footer(analysed: Path) -> None:
    md = (analysed / "results.md").read_text()
    assert "1 FAILED" in md and "1 RUNNING" in md and "1 SUPERSEDED" in md
    assert "e5_pnn_all_layers-seed1" in md and "loss is nan at epoch 2" in md
    table = pd.read_csv(analysed / "results.csv").set_index("experiment")
    assert "e5_pnn_all_layers" not in table.index


def test_reported_vs_actual(analysed: Path) -> None:
    per_run = pd.read_csv(analysed / "reported_vs_actual.csv").set_index("run_name")
    assert per_run.loc["e2_original_noiseresnet18-seed1", "gap"] == pytest.approx(6.0)
    assert per_run.loc["e1_baseline_resnet18-seed2", "best_test_acc"] == pytest.approx(72.0)
    summary = pd.read_csv(analysed / "reported_vs_actual_summary.csv").set_index("experiment")
    assert summary.loc["e1_baseline_resnet18", "gap_mean"] == pytest.approx(4.0)
    assert "## Reported versus actual, per run" in (analysed / "results.md").read_text()


def test_latex_tables(analysed: Path) -> None:
    # One float per file: results, claims, and each swept key (tests/test_latex.py compiles them).
    names = sorted(p.name for p in analysed.glob("*.tex"))
    assert names == ["ablation_masks.nmasks.tex", "claims.tex", "results.tex"]
    tex = (analysed / "results.tex").read_text()
    assert "\\label{tab:pnn-results}" in tex and "\\usepackage{booktabs}" in tex
    # A row's cells, without the wrapping of a long name (a ragged column that may break).
    rows = [
        re.sub(r"\\raggedright |\\penalty50\{\}", "", line).split(" & ")
        for line in tex.splitlines()
        if " & " in line
    ]
    by_name = {row[0]: row[1:] for row in rows}
    assert by_name["e1"][:2] == ["2", f"$71.00 \\pm {pd.Series([70.0, 72.0]).std():.2f}$"]
    e7 = [name for name in by_name if name.startswith("e7")]
    assert e7 == ["e7 (masks.nmasks=8)", "e7 (masks.nmasks=64)"]


# --------------------------------------------------------------------------------------------
# Figures and report.html
# --------------------------------------------------------------------------------------------


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000, path


def test_figures_and_html(analysed: Path) -> None:
    figures = [*FIGURES, "ablation_masks.nmasks.png"]  # e7's masks.nmasks is swept
    for name in figures:
        _check_png(analysed / name)
    page = (analysed / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) == len(figures)
    assert all(base64.b64decode(img)[:8] == PNG_SIGNATURE for img in images)
    # Default figure 2: the largest gap, e2 here.
    assert "Reported vs actual test accuracy of e2_original_noiseresnet18-seed1" in page


def test_missing_figure_data_is_skipped(store: dict, tmp_path: Path) -> None:
    # The latest sweep has e4 and e7 but no e1: figure 3 is still drawn from what exists.
    assert run_analyze(store, tmp_path, "--sweep", "latest", "--run", store["ids"]["e7_m8"]) == 0
    _check_png(tmp_path / "resnet18_like_models.png")
    assert "e7_pnn_shared_masks-seed1" in (tmp_path / "report.html").read_text()


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


def test_sweep_latest_and_by(store: dict, tmp_path: Path) -> None:
    assert run_analyze(store, tmp_path, "--sweep", "latest", "--by", "masks.nmasks") == 0
    table = pd.read_csv(tmp_path / "results.csv", dtype={"masks.nmasks": str})
    present = table[table["n_runs"] > 0]
    assert set(present["experiment"]) == {"e4_conv1x1_no_noise", "e7_pnn_shared_masks"}
    e7 = present[present["experiment"] == "e7_pnn_shared_masks"]
    assert list(e7["masks.nmasks"]) == ["8", "64"]  # numeric order
    assert list(e7["best_test_acc_mean"]) == pytest.approx([47.0, 53.0])
    assert store["latest"] in (tmp_path / "results.md").read_text()


def test_sweep_by_id_excludes_other_sweeps(store: dict, tmp_path: Path) -> None:
    assert run_analyze(store, tmp_path, "--sweep", store["latest"]) == 0
    table = pd.read_csv(tmp_path / "results.csv").set_index("experiment")
    assert "e1_baseline_resnet18" not in table.index


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--by", "masks.nmask"], "--by masks.nmask: no such config key"),
        (["--run", "0123abcd"], "--run 0123abcd: no finished job run"),
        (["--sweep", "nope"], "no sweep run 'nope'"),
        (["--experiment-name", "other"], "no MLflow experiment 'other'"),
    ],
)
def test_bad_options_exit_1(
    store: dict, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    assert run_analyze(store, tmp_path / "out", *args) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# The CLI in a subprocess: store precedence, missing store
# --------------------------------------------------------------------------------------------


def _cli(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return conftest.run_analyze(list(args), cwd, env, timeout=300)


@pytest.mark.slow  # runs analyze.py
def test_missing_store_exit_1_and_not_created(tmp_path: Path) -> None:
    result = _cli(tmp_path)
    assert result.returncode == 1
    assert "no MLflow store at" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow  # runs analyze.py
def test_zero_byte_store_exit_1(tmp_path: Path) -> None:
    (tmp_path / "mlflow.db").touch()
    result = _cli(tmp_path)
    assert result.returncode == 1 and "is empty" in result.stderr, result.stderr


@pytest.mark.slow  # runs analyze.py
def test_empty_store_exit_1(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("pnn")
    result = _cli(tmp_path)
    assert result.returncode == 1
    assert "no job runs in experiment 'pnn'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # runs analyze.py
def test_env_uri_used_and_flag_wins(store: dict, tmp_path: Path) -> None:
    env = {"MLFLOW_TRACKING_URI": store["uri"]}
    result = _cli(tmp_path, "--out", "r", env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r" / "results.csv").exists()
    result = _cli(tmp_path, "--tracking-uri", f"sqlite:///{tmp_path}/none.db", env=env)
    assert result.returncode == 1 and "none.db" in result.stderr


# --------------------------------------------------------------------------------------------
# End to end: the real sweep.py fills the store, analyze.py reads it back
# --------------------------------------------------------------------------------------------

# Narrow models on a little data, the jobs in the sweep's process: the numbers under test are
# analyze.py's.
QUICK = [
    "profile=smoke",
    "model.nfilters=8",
    "dataset.train_size=64",
    "dataset.test_size=40",
    *conftest.IN_PROCESS,
]
SWEEPS = (
    ["experiment=e1_baseline_resnet18,e7_pnn_shared_masks", "train.seed=1,2", *QUICK],
    ["experiment=e4_conv1x1_no_noise", *QUICK],
)
E2E_RUNS = {"e1_baseline_resnet18": 2, "e4_conv1x1_no_noise": 1, "e7_pnn_shared_masks": 2}


def _logged_runs(uri: str) -> dict[str, list]:
    """The finished job runs per experiment, read with MlflowClient alone."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("pnn")
    runs: dict[str, list] = {}
    for run in client.search_runs([experiment.experiment_id]):
        if run.data.tags.get("pnn.role") == "job" and run.info.status == "FINISHED":
            runs.setdefault(run.data.tags["experiment"], []).append(run)
    return runs


def _mean_std(values: list[float]) -> tuple[float, float]:
    import statistics

    std = statistics.stdev(values) if len(values) >= 2 else math.nan
    return statistics.fmean(values), std


def _same(actual: float, expected: float) -> bool:
    if math.isnan(expected):
        return math.isnan(actual)
    return actual == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.slow
@pytest.mark.usefixtures("existing_store")
def test_end_to_end_with_real_sweep(tmp_path: Path) -> None:
    for args in SWEEPS:
        done = conftest.run_sweep(args, tmp_path, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    result = _cli(tmp_path)  # the default store: ./mlflow.db
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "results"
    assert "| e1_baseline_resnet18 " in result.stdout

    runs = _logged_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert {name: len(found) for name, found in runs.items()} == E2E_RUNS
    table = pd.read_csv(out / "results.csv").set_index("experiment")
    for experiment, found in runs.items():
        row = table.loc[experiment]
        metrics = [run.data.metrics for run in found]
        assert row["n_runs"] == len(found)
        for metric in ("final_test_acc", "best_test_acc"):
            mean, std = _mean_std([m[metric] for m in metrics])
            assert _same(row[f"{metric}_mean"], mean), (experiment, metric)
            assert _same(row[f"{metric}_std"], std), (experiment, metric)
        reported, _ = _mean_std([m["best_test_acc_reported"] for m in metrics])
        assert _same(row["best_test_acc_reported_mean"], reported)
        assert _same(row["params_M"], _mean_std([m["params"] / 1e6 for m in metrics])[0])
        assert _same(row["mask_values_M"], _mean_std([m["mask_values"] / 1e6 for m in metrics])[0])
        # Smoke runs on synthetic data: nothing to compare with the paper.
        assert not row["comparable"] and "synthetic data" in row["not_comparable_because"]
        assert math.isnan(row["published_test_acc"]) and math.isnan(row["diff_vs_published"])

    per_run = pd.read_csv(out / "reported_vs_actual.csv").set_index("run_id")
    for found in runs.values():
        for run in found:
            m = run.data.metrics
            assert _same(per_run.loc[run.info.run_id, "best_test_acc"], m["best_test_acc"])
            gap = m["best_test_acc_reported"] - m["best_test_acc"]
            assert _same(per_run.loc[run.info.run_id, "gap"], gap)

    # README experiments that were not run have no row; one line names them.
    assert sorted(table.index) == sorted(E2E_RUNS)
    missing = ", ".join(e for e in README_ORDER if e not in E2E_RUNS)
    assert f"No runs of: {missing}." in (out / "results.md").read_text()

    for name in FIGURES:
        _check_png(out / name)
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert len(re.findall(r"<img [^>]*src='data:image/png;base64,", page)) == len(FIGURES)
