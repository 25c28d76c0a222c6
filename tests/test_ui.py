"""The MLflow UI in a real browser, end to end, from the links the sweep prints.

One sweep serves every check: two experiments of ``profile=smoke`` with ``noise.level=0.05,0.3``
and two seeds, 2 epochs, in a store of its own served by ``mlflow server``. Headless Chromium must:

- from the plain runs link: show the eight runs nested under the parent run, grouped by
  experiment, and a ``test_acc`` chart;
- from the sweep's saved view (``pnn.analysis.viewstate``), with no click: the runs grouped by
  experiment and noise level with the accuracy columns, ``test_acc`` one line per group and
  ``best_test_acc`` one bar per group;
- from ``make ui``'s link: every run grouped by experiment; the results table and the view's
  link in the parent run's description.

Needs Debian's ``chromium`` and ``chromium-driver``; without them: skipped, or failed with CI=true.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    IN_PROCESS,
    TINY,
    launch_mlflow_server,
    run_ui_link,
    start_sweep,
    stop_server,
)

from pnn.analysis import viewstate

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# The results table lists every conf/experiment/e*.yaml, with or without runs.
EXPERIMENTS = ["e5_pnn_all_layers", "e7_pnn_shared_masks"]
LEVELS = ["0.05", "0.3"]
SEEDS = [1, 2]

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

# Two of `make demo`'s experiments over two noise levels and two seeds, with TINY's small models
# (the full-size smoke models cost minutes of CPU and show nothing more in the UI) and 2 epochs,
# so that the per-epoch charts have lines. The jobs run in the sweep's process: what the UI
# shows is what they logged, and job processes would cost seconds each.
SWEEP_ARGS = [
    *TINY,
    "train.epochs=2",
    "tracking.log_checkpoint=false",
    f"experiment={','.join(EXPERIMENTS)}",
    f"noise.level={','.join(LEVELS)}",
    f"train.seed={','.join(map(str, SEEDS))}",
    *IN_PROCESS,
]
PRINTED_BASE = "http://127.0.0.1:5000"  # where the printed link expects `mlflow ui`
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


@dataclass
class Child:
    name: str
    experiment: str
    level: str  # noise.level, as logged
    best_test_acc: float
    test_acc: list[float]  # per epoch

    @property
    def group(self) -> str:
        """The UI's id of the group of the sweep's view that holds this run."""
        return f"param.experiment.{self.experiment},param.noise.level.{self.level}"


@dataclass
class UISweep:
    store: Path
    link: str  # to the runs, as printed by the sweep, for `mlflow ui` on 127.0.0.1:5000
    compare_link: str  # to the sweep's saved view, as printed
    parent_link: str  # to the parent run's page, as printed
    experiment_id: str
    parent_id: str
    children: dict[str, Child]  # by run id
    workdir: Path

    def groups(self) -> dict[str, dict[str, Child]]:
        """The saved view's groups: {group id: {run id: child}}."""
        out: dict[str, dict[str, Child]] = {}
        for run_id, child in self.children.items():
            out.setdefault(child.group, {})[run_id] = child
        return out


def _run_sweep(workdir: Path) -> str:
    """The sweep, small, with `workdir` as the launch dir; returns the output."""
    log = workdir / "sweep.log"
    proc = start_sweep(SWEEP_ARGS, workdir, output=log)
    proc.wait(timeout=SWEEP_TIMEOUT_S)
    output = log.read_text()
    if proc.returncode != 0:
        pytest.fail(f"sweep.py {' '.join(SWEEP_ARGS)} exited {proc.returncode}:\n{output[-4000:]}")
    return output


def _sweep_in_store(store: Path) -> tuple[str, str, dict[str, Child]]:
    """(experiment id, parent run id, {child run id: what it logged}) of the store's one sweep."""
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
    found = {}
    for run in children:
        history = client.get_metric_history(run.info.run_id, "test_acc")
        found[run.info.run_id] = Child(
            run.info.run_name,
            run.data.params["experiment"],
            run.data.params["noise.level"],
            run.data.metrics["best_test_acc"],
            [m.value for m in sorted(history, key=lambda m: m.step)],
        )
    return parent.info.experiment_id, parent.info.run_id, found


@pytest.fixture(scope="module")
def ui_sweep(tmp_path_factory: pytest.TempPathFactory, empty_store: Path) -> UISweep:
    _require_browser()
    workdir = tmp_path_factory.mktemp("ui")
    shutil.copyfile(empty_store, workdir / "mlflow.db")  # the sweep's logs are the test here
    output = _run_sweep(workdir)
    store = workdir / "mlflow.db"
    assert store.exists(), f"the sweep wrote no {store}"
    links = re.findall(r"runs \(model-training view\): (\S+)", output)
    compare_links = re.findall(r"this sweep's runs, compared: (\S+)", output)
    parent_links = re.findall(r"this sweep's results table: (\S+)", output)
    assert links and compare_links and parent_links, (
        f"the sweep printed no link to the UI:\n{output[-3000:]}"
    )
    experiment_id, parent_id, children = _sweep_in_store(store)
    return UISweep(
        store,
        links[-1],
        compare_links[-1],
        parent_links[-1],
        experiment_id,
        parent_id,
        children,
        workdir,
    )


@pytest.fixture(scope="module")
def ui_server(ui_sweep: UISweep) -> Iterator[str]:
    """The URL of an `mlflow server` on the sweep's store, on a free port."""
    server = launch_mlflow_server(ui_sweep.store, ui_sweep.workdir / "mlflow-server.log")
    try:
        yield server.url
    finally:
        stop_server(server)


def _served(printed: str, server_url: str) -> str:
    """A printed link (for `mlflow ui` on :5000), pointed at the test's server."""
    assert printed.startswith(PRINTED_BASE + "/#/"), printed
    return server_url + printed[len(PRINTED_BASE) :]


@pytest.fixture(scope="module")
def ui_url(ui_sweep: UISweep, ui_server: str) -> str:
    """The printed link to the runs."""
    return _served(ui_sweep.link, ui_server)


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium with a fresh profile: nothing remembered from another test."""
    browser = _open_browser(tmp_path / "chromium-profile")
    try:
        yield browser
    finally:
        browser.quit()


def _open_browser(profile_dir: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


ROWS_CSS = "div.ag-pinned-left-cols-container div[role='row']"  # the run-name column's rows
NAME_CELL_CSS = "div[col-id='attributes.`Run Name`']"


def _wait(driver: Any) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # React re-renders the rows and chart cards while we read them: ask again.
    return WebDriverWait(
        driver, PAGE_TIMEOUT_S, ignored_exceptions=(StaleElementReferenceException,)
    )


def _until(driver: Any, condition: Any, shot: Path, what: str) -> Any:
    """Wait for ``condition``; on a timeout save the screenshot and fail saying ``what``."""
    from selenium.common.exceptions import TimeoutException

    try:
        return _wait(driver).until(condition)
    except TimeoutException:
        driver.save_screenshot(str(shot))
        pytest.fail(f"{what}; see {shot}")


def _visible_rows(driver: Any) -> dict[str, tuple[int, str]]:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    rows = {}
    for row in driver.find_elements(By.CSS_SELECTOR, ROWS_CSS):
        try:
            rows[row.get_attribute("row-id")] = (int(row.get_attribute("row-index")), row.text)
        except (StaleElementReferenceException, TypeError):
            continue  # re-rendered while we read it; the next poll sees the new one
    return rows


def _tidy(driver: Any) -> None:
    """Cosmetics for the screenshots: close the assistant side panel."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    try:
        for button in driver.find_elements(
            By.CSS_SELECTOR, "button[data-component-id='mlflow.assistant.chat_panel.close']"
        ):
            button.click()
        time.sleep(0.5)
    except WebDriverException:
        pass


def _open_runs(driver: Any, url: str, parent_id: str, shot: Path) -> None:
    """Open the printed link; wait for the parent's row in the model-training view."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    parent_css = f"{ROWS_CSS}[row-id='{parent_id}']"
    _until(
        driver,
        lambda d: d.find_elements(By.CSS_SELECTOR, parent_css),
        shot,
        f"the sweep's parent run {parent_id} never showed in the runs table",
    )
    _tidy(driver)
    # The side bar lists the model-training pages (Runs, Models), not the GenAI ones.
    sidebar = driver.find_element(By.CSS_SELECTOR, "aside").text.splitlines()
    assert "Models" in sidebar and "Runs" in sidebar, sidebar
    assert not {"Overview", "Judges", "Evaluation runs"} & set(sidebar), sidebar
    assert "workflowType=machine_learning" in driver.current_url


def _expand_parent(driver: Any, parent_id: str, children: Iterable[str], shot: Path) -> None:
    """Click the ⊞ beside the parent's name; wait until its children are rows of the list."""
    from selenium.webdriver.common.by import By

    # The run-name cell's own button (in the chart view that column has another col-id).
    toggle = driver.find_elements(
        By.CSS_SELECTOR,
        f"{ROWS_CSS}[row-id='{parent_id}'] button[data-component-id*='runnamecellrenderer']",
    )
    assert toggle, "the parent run has no expand button: MLflow does not see its child runs"
    if not set(children) & set(_visible_rows(driver)):
        toggle[0].click()
    _until(
        driver,
        lambda d: set(children) <= set(_visible_rows(d)),
        shot,
        "the child runs did not appear under the parent",
    )


CARD_CSS = "[data-testid='experiment-view-compare-runs-card']"


def _cards(driver: Any) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, CARD_CSS)


def _card_titled(driver: Any, title: str) -> Any:
    for card in _cards(driver):
        if card.text.splitlines()[:1] == [title]:
            return card
    return None


@pytest.mark.slow
def test_smoke_sweep_shows_in_mlflow_ui(ui_sweep: UISweep, ui_url: str, driver: Any) -> None:
    """The printed link reaches the runs table in the training view; the eight jobs' runs are
    the parent's children, nested right under it."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    names = [child.name for child in ui_sweep.children.values()]
    # One child per job, named after its experiment and seed (e.g. e5_pnn_all_layers-seed1).
    expected = {f"{e}-seed{seed}": len(LEVELS) for e in EXPERIMENTS for seed in SEEDS}
    assert Counter(names) == expected

    shot = ui_sweep.workdir / "mlflow-ui-runs.png"
    _open_runs(driver, ui_url, ui_sweep.parent_id, shot)
    _expand_parent(driver, ui_sweep.parent_id, ui_sweep.children, shot)

    rows = _visible_rows(driver)
    parent_index = rows[ui_sweep.parent_id][0]
    child_indices = sorted(rows[run_id][0] for run_id in ui_sweep.children)
    # Nested: the children are the rows right after their parent, not top-level runs elsewhere.
    assert child_indices == list(range(parent_index + 1, parent_index + 1 + len(names)))
    for run_id, child in ui_sweep.children.items():
        assert child.name in rows[run_id][1].splitlines(), f"row {run_id} lacks {child.name!r}"

    try:  # widen the name column for the screenshot
        handle = driver.find_element(
            By.CSS_SELECTOR, f"div.ag-header-cell{NAME_CELL_CSS[3:]} div.ag-header-cell-resize"
        )
        ActionChains(driver).drag_and_drop_by_offset(handle, 140, 0).perform()
        time.sleep(1)
    except WebDriverException:
        pass
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000, "the screenshot is (nearly) empty"
    print(f"screenshot: {shot}")


@pytest.mark.slow
def test_children_group_by_experiment(ui_sweep: UISweep, ui_url: str, driver: Any) -> None:
    """Group by -> the tag `experiment`: one group per experiment, holding its runs."""
    from selenium.webdriver.common.by import By

    shot = ui_sweep.workdir / "mlflow-ui-grouped.png"
    _open_runs(driver, ui_url, ui_sweep.parent_id, shot)
    driver.find_element(By.XPATH, "//button[.//text()[contains(., 'Group by')]]").click()
    tag_items = _until(
        driver,
        lambda d: [
            item
            for item in d.find_elements(
                By.CSS_SELECTOR, "[role='menuitemcheckbox'][data-component-id$='tsx_302']"
            )
            if item.text.strip() == "experiment"
        ],
        shot,
        "the Group by menu does not offer the tag `experiment`",
    )
    tag_items[0].click()  # the Tags section's `experiment` (the params have one too)

    groups = {f"tag.experiment.{e}": e for e in EXPERIMENTS}
    _until(
        driver,
        lambda d: set(groups) <= set(_visible_rows(d)),
        shot,
        "the runs were not grouped by experiment",
    )
    rows = _visible_rows(driver)
    per_experiment = str(len(LEVELS) * len(SEEDS))
    for group_id, experiment in groups.items():
        lines = rows[group_id][1].splitlines()
        assert f"Group: {experiment}" in lines, lines
        assert per_experiment in lines, f"group {experiment} does not count its runs: {lines}"
    # Each group is expanded and holds its experiment's runs.
    for run_id, child in ui_sweep.children.items():
        assert f"tag.experiment.{child.experiment}.{run_id}" in rows, (child, sorted(rows))
    driver.save_screenshot(str(shot))
    print(f"screenshot: {shot}")


@pytest.mark.slow
def test_chart_view_shows_test_acc_of_the_children(
    ui_sweep: UISweep, ui_url: str, driver: Any
) -> None:
    """The chart view, with the parent expanded, draws test_acc per epoch for each child."""
    from selenium.webdriver.common.by import By

    shot = ui_sweep.workdir / "mlflow-ui-chart.png"
    _open_runs(driver, ui_url, ui_sweep.parent_id, shot)
    # The view switch is a radio group whose inputs are hidden behind their icons.
    chart_mode = driver.find_element(By.CSS_SELECTOR, "input[value='CHART']")
    driver.execute_script("arguments[0].click()", chart_mode)
    _until(
        driver,
        lambda d: "compareRunsMode=CHART" in d.current_url,
        shot,
        "the chart view did not open",
    )
    _expand_parent(driver, ui_sweep.parent_id, ui_sweep.children, shot)

    search = driver.find_element(By.CSS_SELECTOR, "input[placeholder='Search metric charts']")
    search.send_keys("test_acc")

    def test_acc_card(d: Any) -> Any:
        return _card_titled(d, "test_acc")

    card = _until(driver, test_acc_card, shot, "no test_acc chart in the chart view")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", card)
    # One line per child run (plotly draws a trace per run).
    _until(
        driver,
        lambda d: (
            len(test_acc_card(d).find_elements(By.CSS_SELECTOR, ".scatterlayer .trace"))
            >= len(ui_sweep.children)
        ),
        shot,
        f"the test_acc chart does not draw the {len(ui_sweep.children)} child runs",
    )
    # Its x-axis is the step (= epoch).
    _until(
        driver,
        lambda d: "Step" in test_acc_card(d).text,
        shot,
        "the test_acc chart is not per step (epoch)",
    )
    driver.save_screenshot(str(shot))
    print(f"screenshot: {shot}")


@pytest.mark.slow
def test_parent_run_description_shows_the_results_table(
    ui_sweep: UISweep, ui_server: str, driver: Any
) -> None:
    """The printed link to the parent run opens its page, in the model-training view, with
    the sweep's results table (one row per experiment, the mean best test accuracy of its
    runs) as the run's description, after a link to the sweep's saved view."""
    from selenium.webdriver.common.by import By

    shot = ui_sweep.workdir / "mlflow-ui-parent.png"
    driver.get(_served(ui_sweep.parent_link, ui_server))

    def results_table(d: Any) -> Any:
        for table in d.find_elements(By.CSS_SELECTOR, "table"):
            if "Best test acc. (%)" in table.text:
                return table
        return None

    show_more = "//*[normalize-space(text())='Show more']"
    _until(
        driver,
        lambda d: results_table(d) or d.find_elements(By.XPATH, show_more),
        shot,
        "the parent run's page shows no description",
    )
    _tidy(driver)
    assert "Models" in driver.find_element(By.CSS_SELECTOR, "aside").text.splitlines()
    for more in driver.find_elements(By.XPATH, show_more):
        more.click()  # the description starts folded, the table below the fold
    table = _until(driver, results_table, shot, "the parent run's page shows no results table")
    headers = [th.text.strip() for th in table.find_elements(By.CSS_SELECTOR, "th")]
    best_col = headers.index("Best test acc. (%)")
    # One row per experiment and swept level (the analysis groups by the swept noise.level),
    # and only the experiments that ran.
    level_col = headers.index("noise.level")
    shown = {}
    for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr"):
        cells = [td.text.strip() for td in tr.find_elements(By.CSS_SELECTOR, "td")]
        shown[cells[0], cells[level_col]] = cells[best_col]
    assert sorted(shown) == [(e, level) for e in EXPERIMENTS for level in LEVELS]
    for experiment, level in shown:
        runs = [
            c for c in ui_sweep.children.values() if c.experiment == experiment and c.level == level
        ]
        assert len(runs) == len(SEEDS)
        mean = sum(c.best_test_acc for c in runs) / len(runs)
        assert shown[experiment, level].split(" ±")[0] == f"{mean:.2f}", (shown, mean)
    # The description links to the saved view, relative to wherever the UI is served.
    view_links = [
        a.get_attribute("href")
        for a in driver.find_elements(By.CSS_SELECTOR, "a")
        if viewstate.SHARE_PARAM in (a.get_attribute("href") or "")
    ]
    assert view_links == [_served(ui_sweep.compare_link, ui_server)], view_links
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", table)
    time.sleep(1)
    driver.save_screenshot(str(shot))
    print(f"screenshot: {shot}")


# --------------------------------------------------------------------------------------------
# The saved views (pnn.analysis.viewstate): the printed links land on the comparison, with no click
# --------------------------------------------------------------------------------------------


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def _open_view(driver: Any, url: str, groups: Mapping[str, Iterable[str]], shot: Path) -> dict:
    """Open a link to a saved view; wait until every group and each of its runs is a row of
    the run list (open, with no click). Returns the rows."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    wanted = set(groups) | {f"{group}.{run_id}" for group, ids in groups.items() for run_id in ids}
    _until(
        driver,
        lambda d: wanted <= set(_visible_rows(d)),
        shot,
        f"the saved view did not show the groups {sorted(groups)} and their runs",
    )
    _tidy(driver)
    assert "share key" not in driver.find_element(By.CSS_SELECTOR, "body").text  # no error
    assert "workflowType=machine_learning" in driver.current_url
    return _visible_rows(driver)


def _plot_data(driver: Any, card: Any) -> list[dict]:
    """The traces plotly draws in a chart card (x, y, mode, fill)."""
    return driver.execute_script(
        "const p = arguments[0].querySelector('.js-plotly-plot');"
        "return p && p.data ? p.data.map(t => ({x: t.x, y: t.y, mode: t.mode || null,"
        " fill: t.fill || null, type: t.type})) : [];",
        card,
    )


@pytest.mark.slow
def test_saved_view_shows_the_groups_and_their_runs(
    ui_sweep: UISweep, ui_server: str, driver: Any
) -> None:
    """The printed link to the sweep's saved view, with no click: one group per experiment
    and noise level, each open on its two seeds; no parent run; in the table, the accuracy
    columns and the swept key."""
    from selenium.webdriver.common.by import By

    shot = ui_sweep.workdir / "mlflow-ui-view-runs.png"
    url = _served(ui_sweep.compare_link, ui_server)
    assert "compareRunsMode=CHART" in url and viewstate.SHARE_PARAM in url
    groups = ui_sweep.groups()
    assert len(groups) == len(EXPERIMENTS) * len(LEVELS)
    rows = _open_view(driver, url, groups, shot)
    for group, runs in groups.items():
        child = next(iter(runs.values()))
        lines = rows[group][1].splitlines()
        assert f"Group: experiment: {child.experiment}, noise.level: {child.level}" in lines
        assert str(len(SEEDS)) in lines, f"group {group} does not count its runs: {lines}"
    # Only the sweep's job runs: no parent run, no group of runs without an experiment.
    assert ui_sweep.parent_id not in rows
    assert not [r for r in rows.values() if "Additional runs" in r[1]], rows
    assert len(rows) == len(groups) + len(ui_sweep.children), sorted(rows)
    driver.save_screenshot(str(shot))
    print(f"screenshot: {shot}")

    # The same view as a table: its columns.
    shot = ui_sweep.workdir / "mlflow-ui-view-table.png"
    _open_view(driver, url.replace("compareRunsMode=CHART", "compareRunsMode=TABLE"), groups, shot)
    header_ids = {
        h.get_attribute("col-id")
        for h in driver.find_elements(By.CSS_SELECTOR, "div.ag-header-cell")
    }
    for column in (*(f"metrics.`{m}`" for m in viewstate.COLUMNS), "params.`noise.level`"):
        assert column in header_ids, (column, sorted(filter(None, header_ids)))
    driver.save_screenshot(str(shot))
    print(f"screenshot: {shot}")


@pytest.mark.slow
def test_saved_view_charts_one_line_and_one_bar_per_group(
    ui_sweep: UISweep, ui_server: str, driver: Any
) -> None:
    """The saved view's chart view: test_acc, test_acc_reported and best_test_acc first; the
    test_acc chart draws one line per group, the mean over its seeds per epoch; the
    best_test_acc chart one bar per group, the mean of its seeds' best_test_acc."""
    shot = ui_sweep.workdir / "mlflow-ui-view-charts.png"
    groups = ui_sweep.groups()
    _open_view(driver, _served(ui_sweep.compare_link, ui_server), groups, shot)
    _until(driver, lambda d: len(_cards(d)) >= 4, shot, "the chart view shows no charts")
    titles = [card.text.splitlines()[0] for card in _cards(driver)]
    assert titles[:4] == ["test_acc", "test_acc_reported", "best_test_acc", "Parallel Coordinates"]

    def lines(d: Any) -> set[tuple[float, ...]]:
        card = _card_titled(d, "test_acc")
        traces = _plot_data(d, card) if card else []
        # Each line's points (its min-max band is a filled trace of its own).
        return {
            tuple(round(y, 4) for y in t["y"])
            for t in traces
            if t["type"] == "scatter" and not t["fill"] and t["x"] == [1, 2]
        }

    expected = {
        tuple(round(_mean(epoch), 4) for epoch in zip(*(c.test_acc for c in runs), strict=True))
        for runs in (list(g.values()) for g in groups.values())
    }
    _until(driver, lambda d: lines(d) == expected, shot, f"test_acc lines are not {expected}")
    legend = [t for t in _card_titled(driver, "test_acc").text.splitlines() if "(test_acc)" in t]
    assert len(legend) == len(groups), legend  # one line per group, none per run

    bars = _plot_data(driver, _card_titled(driver, "best_test_acc"))
    assert len(bars) == 1 and bars[0]["type"] == "bar", bars
    # A horizontal bar chart: y holds the groups, x their values.
    shown = dict(zip(bars[0]["y"], bars[0]["x"], strict=True))
    assert shown == pytest.approx(
        {group: _mean(c.best_test_acc for c in runs.values()) for group, runs in groups.items()}
    )
    driver.save_screenshot(str(shot))
    print(f"screenshot: {shot}")


@pytest.mark.slow
def test_make_ui_link_groups_every_run_by_experiment(
    ui_sweep: UISweep, ui_server: str, driver: Any
) -> None:
    """`make ui` (python -m pnn.analysis.ui) prints a link to every job run of the experiment,
    grouped by experiment, with the same charts."""
    proc = run_ui_link(ui_sweep.store, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout
    links = re.findall(r"compared by experiment: (\S+)", printed)
    assert links, printed
    shot = ui_sweep.workdir / "mlflow-ui-all-runs.png"
    groups: dict[str, list[str]] = {}
    for run_id, child in ui_sweep.children.items():
        groups.setdefault(f"param.experiment.{child.experiment}", []).append(run_id)
    rows = _open_view(driver, _served(links[0], ui_server), groups, shot)
    for group, run_ids in groups.items():
        assert str(len(run_ids)) in rows[group][1].splitlines(), rows[group]
    assert ui_sweep.parent_id not in rows
    _until(driver, lambda d: _card_titled(d, "best_test_acc"), shot, "no best_test_acc chart")
    driver.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
