"""A key the schema does not define is refused, however it came in: ``key=``, ``+key=``,
``++key=``, an experiment or profile file, a sweeper ``params`` entry. Hydra's own refusal of a
typo advises ``+key=``, which must not add the key silently either."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import IN_PROCESS, TINY, epochs_logged, run_sweep, runs_of, store
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError

from pnn.config import ConfigError, load_config
from pnn.schema_keys import nearest

FIXED_SCHEMA = "the config has a fixed schema (pnn/config.py), so '+' and '++' cannot add keys"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+train.epoch=5", "train.epoch (did you mean train.epochs?)"),
        ("++model.nfilter=8", "model.nfilter (did you mean model.nfilters?)"),
        ("train.epoch=5", "train.epoch (did you mean train.epochs?)"),
        ("+lr=0.1", "lr (did you mean optimizer.lr?)"),
    ],
)
def test_composing_refuses_unknown_keys(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(["experiment=e4_conv1x1_no_noise", override], validate_config=False)
    assert str(err.value) == f"unknown config key {message}: {FIXED_SCHEMA} to it"


def test_force_add_still_sets_a_known_key() -> None:
    assert load_config(["++train.epochs=2"]).train.epochs == 2


def test_open_schema_still_types_values_and_refuses_reading_missing_keys() -> None:
    cfg = load_config(["experiment=e4_conv1x1_no_noise"])
    with pytest.raises(ConfigAttributeError):
        cfg.train.epoch  # noqa: B018 (a read, not a statement without effect)
    with pytest.raises(ConfigCompositionException, match="train.epochs"):
        load_config(["train.epochs=abc"])


def test_nearest_key_by_whole_path_or_last_part() -> None:
    known = ["dataset.seed", "train.epochs", "train.seed", "optimizer.lr", "model.nfilters"]
    assert nearest("seed", known) == "train.seed"  # equal last parts: the closer whole path
    assert nearest("model.lr", known) == "optimizer.lr"
    assert nearest("train.epohcs", known) == "train.epochs"


# --- the real sweep.py --------------------------------------------------------------------


def _refused(proc, launch_dir: Path, *keys: str) -> str:
    """The one-line error of a refused sweep; nothing was logged or written."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    (line,) = [x for x in out.splitlines() if x.strip()]
    assert line.startswith("error: unknown config key") and FIXED_SCHEMA in line, line
    for key in keys:
        assert key in line, line
    assert not (launch_dir / "mlflow.db").exists()
    assert not (launch_dir / "multirun").exists()
    return line


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("+train.epoch=5", "train.epoch (did you mean train.epochs?)"),
        ("+foo=1", "foo (did you mean "),
        ("++model.nfilter=8", "model.nfilter (did you mean model.nfilters?)"),
    ],
)
def test_sweep_refuses_an_added_unknown_key(tmp_path: Path, override: str, named: str) -> None:
    proc = run_sweep(["experiment=e4_conv1x1_no_noise", *TINY, override], tmp_path)
    _refused(proc, tmp_path, named)


@pytest.mark.slow
@pytest.mark.usefixtures("existing_store")
def test_force_add_of_a_known_key_runs_with_it(tmp_path: Path) -> None:
    args = ["experiment=e4_conv1x1_no_noise", *TINY, "++train.epochs=2", *IN_PROCESS]
    proc = run_sweep(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = runs_of(store(tmp_path), "job")
    assert run.data.params["train.epochs"] == "2"
    assert epochs_logged(store(tmp_path), run.info.run_id) == [1, 2]


def _config_dir(tmp_path: Path) -> Path:
    """Extra experiment and profile files, found beside conf/ through ``--config-dir``."""
    conf = tmp_path / "extra_conf"
    (conf / "experiment").mkdir(parents=True)
    (conf / "profile").mkdir()
    head = "# @package _global_\n"
    (conf / "experiment/typo.yaml").write_text(f"{head}experiment: typo\ntrain:\n  epoch: 5\n")
    (conf / "profile/typo.yaml").write_text(f"{head}foo: 1\n")
    # A sweeper params entry becomes an override of each job: `+train.epoch=1`, `=2`.
    (conf / "experiment/sweep_typo.yaml").write_text(
        f"{head}experiment: sweep_typo\nhydra:\n  sweeper:\n    params:\n      +train.epoch: 1,2\n"
    )
    return conf


@pytest.mark.slow
def test_unknown_keys_in_experiment_and_profile_files(tmp_path: Path) -> None:
    args = ["--config-dir", str(_config_dir(tmp_path)), "experiment=typo", "profile=typo"]
    proc = run_sweep([*args, "dry_run=true"], tmp_path)
    line = _refused(proc, tmp_path, "train.epoch (did you mean train.epochs?)", "foo (did you")
    assert "unknown config keys" in line


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["experiment=sweep_typo"], "train.epoch (did you mean train.epochs?)"),
        # From the command line: a top-level key, which Hydra itself refuses in the sweeper.
        (["experiment=e4_conv1x1_no_noise", "+hydra.sweeper.params.foo=1"], "foo (did you"),
    ],
)
def test_unknown_keys_in_sweeper_params(tmp_path: Path, args: list[str], named: str) -> None:
    conf = _config_dir(tmp_path)
    proc = run_sweep(["--config-dir", str(conf), *args, *TINY], tmp_path)
    _refused(proc, tmp_path, named)
