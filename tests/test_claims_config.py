"""Claims as config: a user's claims file (analyze.py --claims), its errors, and the group rule.

The store's job runs are logged by pnn.io.tracking from configs composed with the real conf/
(tests/test_claims.py's ``_log``); only their metrics are set here, so that every expected
number can be worked out with scipy.
"""

from __future__ import annotations

import math
import re
import shutil
import statistics
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import load_analyze
from scipy import stats
from test_claims import _log

from pnn.analysis.claims_file import load_claims
from pnn.analysis.runs import AnalysisError, load_runs

E4, E7 = "e4_conv1x1_no_noise", "e7_pnn_shared_masks"
# Best test accuracy per seed: e7 with its own 64 masks, e7 with one mask (a wider spread), e4.
BEST = {
    ("e7", "64"): [60.0, 61.0, 62.0],
    ("e7", "1"): [59.0, 61.5, 57.0],
    ("e4", ""): [50.0, 50.5, 51.0],
}


analyze = load_analyze()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, empty_store: Path) -> str:
    path = tmp_path_factory.mktemp("user-claims") / "mlflow.db"
    shutil.copyfile(empty_store, path)
    uri = f"sqlite:///{path}"
    for (short, nmasks), values in BEST.items():
        experiment = E7 if short == "e7" else E4
        extra = [f"masks.nmasks={nmasks}"] if nmasks else []
        for seed, best in enumerate(values, start=1):
            _log(uri, "pnn", [f"experiment={experiment}", f"train.seed={seed}", *extra], best, 3.0)
    return uri


def _welch(a: list[float], b: list[float]) -> tuple[float, float]:
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return ci.low, ci.high


def _run(store: str, out: Path, *claims_files: Path) -> int:
    args = ["--tracking-uri", store, "--out", str(out)]
    for path in claims_files:
        args += ["--claims", str(path)]
    return analyze.main(args)


def _claims(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "claims.csv").set_index("claim")


USER_CLAIMS = """
claims:
  - id: nmasks_64_matches_1
    statement: 64 masks are within 2 points of one mask
    a: {experiment: e7_pnn_shared_masks, masks.nmasks: 64}
    b: {experiment: e7, masks.nmasks: 1}
    kind: within
    threshold: 2
  - id: masks_8pt_above_e4
    a:
      - {experiment: e7_pnn_shared_masks, masks.nmasks: 64}
      - {experiment: e7_pnn_shared_masks, masks.nmasks: 1}
    b: e4_conv1x1_no_noise
    kind: at_least
    threshold: 8
  - id: one_mask_below_e7_as_published
    a: {experiment: e7_pnn_shared_masks, masks.nmasks: 1}
    b: e7_pnn_shared_masks
    kind: below
    threshold: 0
    comparable_only: true
"""


@pytest.fixture(scope="module")
def analysed(store: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("user-claims-out")
    (root / "mine.yaml").write_text(USER_CLAIMS)
    assert _run(store, root / "results", root / "mine.yaml") == 0
    return root / "results"


def test_a_filtered_side_gives_the_welch_row(analysed: Path) -> None:
    row = _claims(analysed).loc["nmasks_64_matches_1"]
    a, b = BEST[("e7", "64")], BEST[("e7", "1")]
    assert (row["a"], row["b"]) == (f"{E7} (masks.nmasks=64)", f"{E7} (masks.nmasks=1)")
    assert (row["n_a"], row["n_b"]) == (3, 3)
    assert row["diff_mean"] == pytest.approx(statistics.fmean(a) - statistics.fmean(b))
    low, high = _welch(a, b)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high), abs=1e-12)
    # |a − b| < 2 claimed; this interval reaches past 2, but not wholly: inconclusive.
    assert low < 2 < high and row["verdict"] == "inconclusive"
    assert row["statement"] == "64 masks are within 2 points of one mask"
    # The README's claims are still there, those without runs named under the table.
    md = (analysed / "results.md").read_text()
    skipped = "noise_worth_under_1pt, trained_masks_match_e4, all_5pt_below_baseline, "
    assert f"Not evaluated, no runs on a side: {skipped}first_layer_noise_costs_10pt." in md
    assert "nmasks_64_matches_1" in md


def test_a_group_holds_only_if_every_member_does(analysed: Path) -> None:
    row = _claims(analysed).loc["masks_8pt_above_e4"]
    e4 = BEST[("e4", "")]
    best_by_mean, other = BEST[("e7", "64")], BEST[("e7", "1")]
    assert statistics.fmean(best_by_mean) > statistics.fmean(other)
    # The member with the higher mean is wholly above 8 (judged by the mean alone: supported) ...
    assert _welch(best_by_mean, e4)[0] >= 8
    # ... but the other member's interval crosses 8: the claim is not supported.
    low, high = _welch(other, e4)
    assert low < 8 <= high
    assert row["verdict"] == "inconclusive"
    assert row["a"] == f"{E7} (masks.nmasks=1)" and row["b"] == E4
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high), abs=1e-12)
    assert "every member must hold; shown: e7 (masks.nmasks=1) − e4" in row["statement"]


def test_report_html_gives_each_statement_its_cell(analysed: Path) -> None:
    page = (analysed / "report.html").read_text()
    claims = page[page.index("<h2>Claims</h2>") :]
    # The claims figure comes first, then the table; cells name experiments by short ids, and
    # the statement is the row's last cell.
    assert claims.index("<img") < claims.index("<table")
    cells = re.sub(r">\s+<", "><", claims)
    assert "<td>e7 (masks.nmasks=64)</td><td>e7 (masks.nmasks=1)</td>" in cells
    assert "<td>64 masks are within 2 points of one mask</td></tr>" in cells


def test_within_is_two_one_sided_tests_and_too_close_to_settle(analysed: Path) -> None:
    from statsmodels.stats.power import TTestIndPower

    row = _claims(analysed).loc["nmasks_64_matches_1"]
    a, b = BEST[("e7", "64")], BEST[("e7", "1")]
    above = stats.ttest_ind([x + 2 for x in a], b, equal_var=False, alternative="greater")
    below = stats.ttest_ind([x - 2 for x in a], b, equal_var=False, alternative="less")
    assert row["p_value"] == pytest.approx(max(above.pvalue, below.pvalue), rel=1e-12)
    # Neither the interval nor Holm settles it: the seeds per side for 80% power at 0.05, for
    # the distance to the nearer bound over the pooled sample std.
    assert row["verdict"] == "inconclusive" and row["verdict_holm"] == "not supported"
    diff = statistics.fmean(a) - statistics.fmean(b)
    effect = min(abs(diff - 2), abs(diff + 2)) / math.sqrt(
        (statistics.variance(a) + statistics.variance(b)) / 2
    )
    n = TTestIndPower().solve_power(effect, None, 0.05, 0.8, alternative="larger")
    # 1.83 points against a bound of 2, with a spread of 1.7: too close to settle by seeds.
    assert n > 100 and row["seeds_needed"] == "> 100"
    assert (
        "> 100 when the difference is too small to settle" in (analysed / "results.md").read_text()
    )


def test_a_group_p_value_is_its_largest_members(analysed: Path) -> None:
    row = _claims(analysed).loc["masks_8pt_above_e4"]
    e4 = BEST[("e4", "")]
    members = [
        stats.ttest_ind([x - 8 for x in BEST[m]], e4, equal_var=False, alternative="greater")
        for m in (("e7", "64"), ("e7", "1"))
    ]
    assert members[0].pvalue < 0.05 < members[1].pvalue
    assert row["p_value"] == pytest.approx(max(m.pvalue for m in members), rel=1e-12)


def test_runs_that_exist_but_are_not_comparable_say_so(analysed: Path) -> None:
    # e7 with one mask differs from e7's file (64 masks): none of its 3 runs is comparable.
    row = _claims(analysed).loc["one_mask_below_e7_as_published"]
    assert (row["n_a"], row["n_b"]) == (3, 3)
    assert row["verdict"] == "not comparable (0 / 3 comparable runs)"
    assert math.isnan(row["p_value"]) and math.isnan(row["seeds_needed"])


BAD_CLAIM = """
claims:
  - id: my_claim
    a: {a}
    b: e4_conv1x1_no_noise
    kind: {kind}
{threshold}
"""


@pytest.mark.parametrize(
    ("a", "kind", "threshold", "message"),
    [
        ("e9_nothing", "below", "    threshold: 1", "field a: unknown experiment 'e9_nothing'"),
        (
            "{experiment: e7, masks.nmask: 64}",
            "below",
            "    threshold: 1",
            "field a: no run has the config key 'masks.nmask'",
        ),
        ("e7", "smaller", "    threshold: 1", "field kind: unknown kind 'smaller'; allowed: below"),
        ("e7", "below", "", "field threshold: a number of percentage points is needed (got "),
    ],
)
def test_a_bad_claims_file_is_one_line_and_writes_nothing(
    store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    a: str,
    kind: str,
    threshold: str,
    message: str,
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_CLAIM.format(a=a, kind=kind, threshold=threshold))
    out = tmp_path / "results"
    out.mkdir()
    (out / "results.md").write_text("from before")
    assert _run(store, out, bad) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"analyze.py: claims file {bad}, claim my_claim, {message}"), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["results.md"]
    assert (out / "results.md").read_text() == "from before"


GOOD_CLAIM = {"id": "my_claim", "a": "e7", "b": E4, "kind": "below", "threshold": 1}
FIELDS = "id, statement, a, b, kind, threshold, comparable_only"
SIDE = "a side is an experiment, {experiment: NAME, KEY: VALUE, ...} or a non-empty list of these"
POINTS = "a number of percentage points is needed"


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ("a_name", "id", f"each claim is a mapping of {FIELDS} (got 'a_name')"),
        ({"id": None}, "id", "a non-empty string is needed (got missing)"),
        ({"id": ""}, "id", "a non-empty string is needed (got '')"),
        ({"colour": "red"}, "colour", f"unknown field; allowed: {FIELDS}"),
        ({"statement": [1]}, "statement", "a line of text (got [1])"),
        ({"a": None}, "a", f"{SIDE} (got missing)"),
        ({"a": []}, "a", f"{SIDE} (got [])"),
        ({"a": {"masks.nmasks": 64}}, "a", f"{SIDE} (got {{'masks.nmasks': 64}})"),
        ({"b": [E4, 3]}, "b", f"{SIDE} (got ['{E4}', 3])"),
        ({"kind": None}, "kind", "one of below, at_least, within, above (got missing)"),
        ({"kind": "less"}, "kind", "unknown kind 'less'; allowed: below, at_least, within, above"),
        ({"threshold": None}, "threshold", f"{POINTS} (got missing)"),
        ({"threshold": True}, "threshold", f"{POINTS} (got True)"),
        ({"threshold": "1"}, "threshold", f"{POINTS} (got '1')"),
        ({"threshold": float("nan")}, "threshold", f"{POINTS} (got nan)"),
        ({"comparable_only": 1}, "comparable_only", "true or false (got 1)"),
        ({"comparable_only": "no"}, "comparable_only", "true or false (got 'no')"),
    ],
)
def test_a_claim_the_schema_refuses_is_one_line_naming_its_field(
    store: str, tmp_path: Path, change: dict | str, field: str, message: str
) -> None:
    # A change to None drops the field; a string stands for the whole claim.
    claim = change if isinstance(change, str) else {**GOOD_CLAIM, **change}
    if isinstance(claim, dict):
        claim = {k: v for k, v in claim.items() if v is not None}
    named = "my_claim" if isinstance(claim, dict) and claim.get("id") else "#1"
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump({"claims": [claim]}))
    runs = load_runs(store).finished
    with pytest.raises(AnalysisError) as refused:
        load_claims(path, runs)
    assert str(refused.value) == f"claims file {path}, claim {named}, field {field}: {message}"
    # Without the change, the same file is read.
    path.write_text(yaml.safe_dump({"claims": [GOOD_CLAIM]}))
    assert [c.id for c in load_claims(path, runs)] == ["my_claim"]
