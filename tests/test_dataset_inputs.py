import threading
from pathlib import Path

from mlflow.tracking import MlflowClient

from pnn.config import load_config
from pnn.io import tracking


def test_parallel_jobs_log_the_same_datasets(tmp_path: Path) -> None:
    """Jobs starting together log the same (name, digest) datasets: MLflow's get-or-create of
    a dataset is not atomic, so without a retry one of them fails on a UNIQUE constraint."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(["experiment=e4_conv1x1_no_noise", "profile=smoke"])
    client = MlflowClient(uri)
    experiment_id = tracking.get_experiment_id(client, "pnn", uri)
    runs = [client.create_run(experiment_id).info.run_id for _ in range(6)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(runs))

    def log(run_id: str) -> None:
        try:
            start.wait()
            tracking.log_run_context(MlflowClient(uri), run_id, cfg)
        except BaseException as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=log, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    logged = []
    for run_id in runs:
        inputs = client.get_run(run_id).inputs.dataset_inputs
        context = [{t.key: t.value for t in i.tags}["mlflow.data.context"] for i in inputs]
        logged.append(
            {(c, i.dataset.name, i.dataset.digest) for c, i in zip(context, inputs, strict=True)}
        )
    # Every run links the same two datasets: the training and the test split, by name and digest.
    assert logged == [logged[0]] * len(runs)
    assert {context for context, _, _ in logged[0]} == {"train", "test"}
    assert {name for _, name, _ in logged[0]} == {"synthetic"}
    assert len({digest for _, _, digest in logged[0]}) == 2  # the splits are different data
