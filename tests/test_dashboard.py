"""The end of a sweep, on a real SQLite store: its analysis on the parent run, MLflow's own
tags and dataset inputs on every run, system metrics, and the printed link to the UI."""

from __future__ import annotations

import getpass
import subprocess
from pathlib import Path

import pytest
from conftest import IN_PROCESS, REPO, TINY, epochs_logged, run_sweep, run_ui_link
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pnn.analysis.dashboard import NOTE_LIMIT, description
from pnn.io.run_context import dataset_digest, dataset_inputs


def _git_head() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def test_make_ui_on_a_missing_store_says_so_and_creates_none(tmp_path: Path) -> None:
    proc = run_ui_link(tmp_path / "mlflow.db")
    assert proc.returncode == 0, proc.stderr
    assert "no MLflow store at" in proc.stdout and "make demo" in proc.stdout
    assert not (tmp_path / "mlflow.db").exists()


def test_datasets_of_a_torchvision_set_are_named_and_told_apart() -> None:
    cfg = OmegaConf.create({"dataset": {"name": "cifar10", "test_name": None}})
    train, test = dataset_inputs(cfg)
    assert [train.dataset.name, test.dataset.name] == ["cifar10", "cifar10"]
    assert [[t.value for t in i.tags] for i in (train, test)] == [["train"], ["test"]]
    assert train.dataset.digest != test.dataset.digest  # five batch files against one
    assert train.dataset.source_type == "http"
    assert "cifar-10-python.tar.gz" in train.dataset.source


def test_the_parent_description_stays_within_mlflow_tag_limit() -> None:
    table = "## Results\n\n" + "".join(f"| e{i} | {'x' * 80} |\n" for i in range(200))
    text = description("experiment=e1", table, "abc")
    assert len(text) <= NOTE_LIMIT
    assert text.startswith("`sweep.py experiment=e1`") and text.endswith("is results.md)")
    assert description("(no arguments)", "t", "abc").startswith("`sweep.py`\n\nt")


@pytest.mark.slow
@pytest.mark.usefixtures("existing_store")
def test_sweep_end_puts_its_analysis_on_the_parent_run(tmp_path: Path) -> None:
    # One job finishes, one fails (its loss overflows): the analysis still runs.
    args = [
        "experiment=e4_conv1x1_no_noise",
        "optimizer.lr=1e-3,1e30",
        *TINY,
        "train.epochs=2",
        "tracking.system_metrics=true",
        *IN_PROCESS,  # what the sweep's end logs, not job processes
    ]
    proc = run_sweep(args, tmp_path, env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]  # the failed job, not the analysis
    assert "1 finished, 0 skipped, 1 failed" in proc.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pnn")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`pnn.role` = 'sweep'")
    parent_id = parent.info.run_id
    children = client.search_runs([experiment.experiment_id], "tags.`pnn.role` = 'job'")
    assert len(children) == 2

    # The printed link opens the runs in the model-training view.
    link = (
        f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs"
        "?workflowType=machine_learning"
    )
    assert link in proc.stdout
    view = f"{link}&compareRunsMode=CHART&viewStateShareKey=pnn-all-runs"
    assert run_ui_link(tmp_path / "mlflow.db").stdout.strip().splitlines() == [
        f"Runs of 'pnn', compared by experiment: {view}",
        f"Runs of 'pnn': {link}",
    ]

    # The parent holds what `analyze.py --sweep <parent>` writes, and the run is its dashboard.
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"results.md", "results.csv", "report.html", "test_acc_per_epoch.png"} <= artifacts
    results_dir = Path(parent.data.tags["pnn.sweep_dir"]) / "results"
    logged_md = Path(client.download_artifacts(parent_id, "results.md", str(tmp_path / "dl")))
    assert logged_md.read_text() == (results_dir / "results.md").read_text()
    note = parent.data.tags["mlflow.note.content"]
    finished = next(r for r in children if r.info.status == "FINISHED")
    best = f"{finished.data.metrics['best_test_acc']:.2f}"
    row = next(line for line in note.splitlines() if line.startswith("| e4_conv1x1_no_noise |"))
    # Runs = 1 (the failed job is left out), final = best = the finished run's own figures.
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4:7] == ["1", f"{finished.data.metrics['final_test_acc']:.2f}", best], row
    assert "pnn.analysis_error" not in parent.data.tags

    # Every run: MLflow's source, git and user tags; every job: its datasets as inputs.
    head = _git_head()
    for run in [parent, *children]:
        tags = run.data.tags
        assert tags["mlflow.source.name"].endswith("sweep.py")
        assert tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.user"] == getpass.getuser()
        if head:
            assert tags["mlflow.source.git.commit"] == head
    for run in children:
        inputs = {
            tuple(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
            for i in run.inputs.dataset_inputs
        }
        assert set(inputs) == {("train",), ("test",)}
        for (split,), dataset in inputs.items():
            size = 64 if split == "train" else 40
            identity = {"name": "synthetic", "split": split, "seed": 0, "size": size}
            assert dataset.name == "synthetic"
            assert dataset.digest == dataset_digest(identity)
            assert dataset.source_type == "code"
        # System metrics were on: CPU and memory, sampled while the job ran.
        history = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
        assert history, run.info.run_name
        assert "system/system_memory_usage_megabytes" in run.data.metrics
        # Per-epoch metrics keep step = epoch.
        assert epochs_logged(client, run.info.run_id) == (
            [1, 2] if run.info.status == "FINISHED" else []
        )

    # A sweep whose jobs were all done before has nothing to analyse: a warning and a tag on
    # its parent, and the sweep still succeeds.
    again_args = ["experiment=e4_conv1x1_no_noise", *TINY, "train.epochs=2", *IN_PROCESS]
    again = run_sweep(again_args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 finished, 1 skipped, 0 failed" in again.stdout
    assert "no results on the parent run: the analysis failed" in again.stderr + again.stdout
    parents = client.search_runs(
        [experiment.experiment_id], "tags.`pnn.role` = 'sweep'", order_by=["start_time DESC"]
    )
    second = parents[0]
    assert second.info.run_id != parent_id and second.info.status == "FINISHED"
    assert second.data.tags["pnn.analysis_error"].startswith("AnalysisError: no job runs in sweep")
