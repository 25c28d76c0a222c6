"""The MLflow UI in a real browser, end to end.

The test runs what `make demo` runs (``sweep.py profile=smoke``: the eight experiments on
synthetic data) into a store of its own, serves that store with ``mlflow server``, opens the
experiment in headless Chromium and checks that the eight runs are nested under the sweep's
parent run. A screenshot of the runs table is saved in the test's tmp dir (its path is printed;
``pytest -s`` shows it).

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them). Without them
the test is skipped on a workstation, but fails in CI (``CI=true``): a skipped test proves nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import clean_env

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# The sweep with no `experiment=` override runs every conf/experiment/e*.yaml.
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("e*.yaml"))

# Chromium as root on a machine with a closed network: no sandbox, and no background traffic
# (whose refused connections otherwise slow every start).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
]

SWEEP_TIMEOUT_S = 1800
PAGE_TIMEOUT_S = 90


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"{reason}; CI must run this test (bash .ci/run installs what it needs)")
    pytest.skip(reason)


def _require_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        _unavailable(
            f"{' and '.join(missing)} not found (apt-get install chromium chromium-driver)"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        _unavailable('selenium is not installed (pip install -e ".[dev]")')


def _run_smoke_sweep(workdir: Path) -> Path:
    """`make demo`'s sweep, with `workdir` as the launch dir; returns its sqlite store."""
    log = workdir / "sweep.log"
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, str(REPO / "sweep.py"), "profile=smoke"],
            cwd=workdir,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=SWEEP_TIMEOUT_S,
        )
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        pytest.fail(f"sweep.py profile=smoke exited {proc.returncode}:\n{tail}")
    store = workdir / "mlflow.db"
    assert store.exists(), f"sweep.py profile=smoke wrote no {store}"
    return store


def _sweep_in_store(store: Path) -> tuple[str, str, dict[str, str]]:
    """(experiment id, parent run id, {child run id: run name}) of the store's one sweep."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(experiment_ids, filter_string="tags.`pnn.role` = 'sweep'")
    assert len(parents) == 1, f"expected one sweep parent run, found {len(parents)}"
    parent = parents[0]
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    names = {run.info.run_id: run.info.run_name for run in children}
    return parent.info.experiment_id, parent.info.run_id, names


def _open_browser(profile_dir: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def _check_runs_table(
    driver, url: str, experiment_id: str, parent_id: str, children: dict[str, str], shot: Path
) -> None:
    """Open the experiment's runs table and check that `children` appear under the parent."""
    from selenium.common.exceptions import TimeoutException, WebDriverException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # MLflow 3 opens an experiment on its GenAI overview; the runs table has its own route.
    driver.get(f"{url}/#/experiments/{experiment_id}/runs")
    wait = WebDriverWait(driver, PAGE_TIMEOUT_S)

    # The run-name column sits in ag-grid's pinned-left container; one row per visible run.
    rows_css = "div.ag-pinned-left-cols-container div[role='row']"
    parent_css = f"{rows_css}[row-id='{parent_id}']"

    def visible_rows() -> dict[str, tuple[int, str]]:
        rows = {}
        for row in driver.find_elements(By.CSS_SELECTOR, rows_css):
            rows[row.get_attribute("row-id")] = (int(row.get_attribute("row-index")), row.text)
        return rows

    try:
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, parent_css))
    except TimeoutException:
        driver.save_screenshot(str(shot))
        pytest.fail(f"the sweep's parent run {parent_id} never showed in the UI; see {shot}")

    # A parent with children gets an expand/collapse button beside its name; MLflow shows
    # the children only once it is expanded (a fresh browser profile starts collapsed).
    toggle = driver.find_elements(
        By.CSS_SELECTOR, f"{parent_css} div[col-id='attributes.`Run Name`'] button"
    )
    assert toggle, "the parent run has no expand button: MLflow does not see its child runs"
    if not set(children) & set(visible_rows()):
        toggle[0].click()
    try:
        wait.until(lambda d: set(children) <= set(visible_rows()))
    except TimeoutException:
        driver.save_screenshot(str(shot))
        pytest.fail(f"the child runs did not appear under the parent; see {shot}")

    rows = visible_rows()
    parent_index = rows[parent_id][0]
    child_indices = sorted(rows[run_id][0] for run_id in children)
    # Nested: the children are the rows right after their parent, not top-level runs elsewhere.
    assert child_indices == list(range(parent_index + 1, parent_index + 1 + len(children)))
    for run_id, name in children.items():
        assert name in rows[run_id][1].splitlines(), f"row {run_id} does not show {name!r}"

    # Cosmetics for the screenshot: close the assistant side panel, widen the name column.
    try:
        for button in driver.find_elements(
            By.CSS_SELECTOR, "button[data-component-id='mlflow.assistant.chat_panel.close']"
        ):
            button.click()
        handle = driver.find_element(
            By.CSS_SELECTOR,
            "div.ag-header-cell[col-id='attributes.`Run Name`'] div.ag-header-cell-resize",
        )
        ActionChains(driver).drag_and_drop_by_offset(handle, 140, 0).perform()
        time.sleep(1)
    except WebDriverException:
        pass
    driver.save_screenshot(str(shot))


@pytest.mark.slow
def test_smoke_sweep_shows_in_mlflow_ui(tmp_path: Path, mlflow_server) -> None:
    _require_browser()

    store = _run_smoke_sweep(tmp_path)
    experiment_id, parent_id, children = _sweep_in_store(store)
    names = sorted(children.values())
    # One child per experiment, named after it (e.g. e1_baseline_resnet18-seed1).
    assert len(names) == len(EXPERIMENTS) == 8, names
    for experiment, name in zip(EXPERIMENTS, names, strict=True):
        assert name.startswith(experiment), (experiment, name)

    url = mlflow_server(store).url
    driver = _open_browser(tmp_path / "chromium-profile")
    try:
        shot = tmp_path / "mlflow-ui-runs.png"
        _check_runs_table(driver, url, experiment_id, parent_id, children, shot)
    finally:
        driver.quit()

    assert shot.stat().st_size > 10_000, "the screenshot is (nearly) empty"
    print(f"screenshot: {shot}")
