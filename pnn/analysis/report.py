"""Render the analysis: results.md / .csv, the LaTeX tables, reported_vs_actual*.csv, figures,
report.html.

:func:`write_report` is everything ``analyze.py`` does after parsing its options.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from pnn.analysis import ablations, next_seeds, plots
from pnn.analysis.claims import CLAIM_COLUMNS, evaluate_claims
from pnn.analysis.claims_file import load_all, short_id, short_label
from pnn.analysis.comparability import annotate_comparability
from pnn.analysis.formats import Report, Table, markdown_document, render_html
from pnn.analysis.latex import write_latex
from pnn.analysis.results import (
    choose_gap_run,
    experiment_defaults,
    mixed_config_notes,
    not_run,
    reported_vs_actual,
    sort_experiments,
    summarize,
    sweep_notes,
)
from pnn.analysis.runs import AnalysisError, RunSet, load_curves, load_runs
from pnn.analysis.significance import ALPHA, MAX_SEEDS

DASH = "—"
TITLE = "PNN reproduction: results"
STD_NOTE = (
    "Mean ± sample std (ddof=1) over seeds; with one run the std is undefined and left out "
    "(blank in the CSV). Accuracies in %, differences in percentage points (pp)."
)
COMPARABLE_NOTE = (
    "Comparable: every run of the row has its experiment file's full config (profile=full, "
    "CIFAR-10) apart from the seed and keys that do not change results (tracking, device, "
    "checkpoint dir, data root...). Published and Best − published are shown for comparable "
    "rows only."
)
CLAIMS_NOTE = (
    "a − b in best test accuracy (pp), mean over runs, with Welch's 95% t-interval over seeds "
    "(scipy.stats.ttest_ind, equal_var=False); gap rows: best reported − best actual per run, "
    "one-sample 95% t-interval. Each experiment contributes its comparable runs if it has any, "
    "else all its runs. Verdict: supported if the whole interval lies on the claimed side, "
    "contradicted if it lies wholly on the other side, inconclusive otherwise; too few runs "
    "when a side has fewer than 2 runs (2 comparable runs for the README's claims); not "
    "comparable when a README claim's side has runs, none comparable with the paper. A claim "
    "with a group side holds only if every member does, and fails if any member's interval "
    "does; its row shows the member that decides the verdict, nearest the threshold. "
    "Published a − b from the published accuracies, shown for comparable rows only."
)
SIGNIFICANCE_NOTE = (
    "p: Welch's one-sided test of the claimed side against the threshold (scipy.stats.ttest_ind, "
    "equal_var=False); within: two one-sided tests, the larger p; a group: its largest member "
    "p; gap rows: one-sample test of gap > 0. p (Holm): Holm's correction over every p of this "
    "table (statsmodels multipletests); verdict (Holm): supported when p (Holm) < α = {alpha:g}. "
    "Seeds needed: for a row neither verdict settles, the seeds per side that give a one-sided "
    "t-test 80% power at α for the observed |(a − b) − t| over the pooled sample std "
    "(statsmodels TTestIndPower; one sample for gaps); > {most} when the difference is too "
    "small to settle. next_seeds.sh runs them. Fix n from it once: seeds added after looking "
    "at a p-value make it optimistic."
)
ABLATIONS_NOTE = (
    "For each swept key: best test accuracy per level, mean ± sample std over seeds with the "
    "95% t-interval of the mean (scipy.stats.ttest_1samp), and the difference from the "
    "reference level with Welch's 95% t-interval (scipy.stats.ttest_ind, equal_var=False). The "
    "reference is the experiment file's own value when it is among the levels, else the first "
    "level. With several swept keys, each key's levels are compared with the others held at "
    "each of their levels. All the runs count, comparable with the paper or not. p: that Welch "
    "test, two-sided; p (Holm): Holm's correction over the contrasts of the key's table; seeds "
    "needed: per level, for a contrast that neither its interval nor p (Holm) < α = {alpha:g} "
    "settles, the seeds that give the two-sided test 80% power for the observed difference "
    "(statsmodels TTestIndPower); > {most} when it is too small to settle."
)
CLAIMS_CAPTION = (
    "Claims: a − b with its 95% interval, the claimed side shaded, the published difference marked"
)
GAP_NOTE = (
    '"Reported" is the original code\'s test accuracy (per-batch accuracy smoothed as '
    "0.7·previous + 0.3·current); actual is correct / total over the test set. "
    "Gap = best reported − best actual, each the best over epochs."
)


def _num(value: float, digits: int = 2, signed: bool = False) -> str:
    if value is None or pd.isna(value):
        return DASH
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _p(value: float) -> str:
    if pd.isna(value):
        return DASH
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _seeds(value: object) -> str:
    return DASH if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def _mean_std(mean: float, std: float) -> str:
    if pd.isna(mean):
        return DASH
    return _num(mean) if pd.isna(std) else f"{mean:.2f} ± {std:.2f}"


def results_table(summary: pd.DataFrame, by: list[str]) -> Table:
    headers = [
        "Experiment",
        *by,
        "Description",
        "Params (M)",
        "Mask values (M)",
        "Runs",
        "Final test acc. (%)",
        "Best test acc. (%)",
        'Best "reported" acc. (%)',
        "Published (%)",
        "Best − published (pp)",
        "Comparable",
    ]
    reasons: list[str] = []

    def comparable(row: pd.Series) -> str:
        if not row["n_runs"]:
            return DASH
        if row["comparable"]:
            return "yes"
        reason = row["not_comparable_because"]
        if reason not in reasons:
            reasons.append(reason)
        return f"no [{reasons.index(reason) + 1}]"

    rows = [
        [
            r["experiment"],
            *(str(r[k]) for k in by),
            r["description"] or "",
            _num(r["params_M"]),
            _num(r["mask_values_M"]),
            str(int(r["n_runs"])) if r["n_runs"] else DASH,
            _mean_std(r["final_test_acc_mean"], r["final_test_acc_std"]),
            _mean_std(r["best_test_acc_mean"], r["best_test_acc_std"]),
            _num(r["best_test_acc_reported_mean"]),
            _num(r["published_test_acc"], 1),
            _num(r["diff_vs_published"], signed=True),
            comparable(r),
        ]
        for _, r in summary.iterrows()
    ]
    notes = [STD_NOTE, COMPARABLE_NOTE]
    notes += [f"[{i}] Not comparable: {reason}." for i, reason in enumerate(reasons, start=1)]
    return Table("Results", headers, rows, "\n\n".join(notes))


def claims_table(claims: pd.DataFrame, without_runs: list[str], alpha: float = ALPHA) -> Table:
    rows = []
    for _, r in claims.iterrows():
        ci = DASH
        if not pd.isna(r["ci_low"]):
            ci = f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"
        rows.append(
            [
                r["claim"],
                short_label(r["a"]),
                short_label(r["b"]),
                _num(r["diff_mean"], signed=True),
                ci,
                f"{r['n_a']} / {r['n_b']}",
                _num(r["published_diff"], 1, signed=True),
                r["verdict"],
                "yes" if r["comparable"] else "no",
                _p(r["p_value"]),
                _p(r["p_holm"]),
                r["verdict_holm"] or DASH,
                _seeds(r["seeds_needed"]),
            ]
        )
    headers = ["Claim", "a", "b", "a − b (pp)", "95% CI (pp)", "Runs a / b"]
    headers += ["Published a − b (pp)", "Verdict", "Comparable", "p", "p (Holm)"]
    headers += ["Verdict (Holm)", "Seeds needed"]
    note = CLAIMS_NOTE + "\n\n" + SIGNIFICANCE_NOTE.format(alpha=alpha, most=MAX_SEEDS)
    if without_runs:
        note += f"\n\nNot evaluated, no runs on a side: {', '.join(without_runs)}."
    return Table(
        "Claims",
        headers,
        rows,
        note,
        details=list(claims["statement"]),
        details_header="Statement",
        figures=[CLAIMS_CAPTION],
        figures_first=True,
    )


def ablation_tables(
    table: pd.DataFrame, found: dict[str, list[str]], alpha: float = ALPHA
) -> list[Table]:
    """A section heading with the note, then one table per swept key (its figure after it)."""
    if table.empty:
        return []
    note = ABLATIONS_NOTE.format(alpha=alpha, most=MAX_SEEDS)
    tables = [Table("Ablations", [], [], f"Swept keys: {ablations.listed(found)}.\n\n{note}")]
    for key, part in table.groupby("key", sort=False):
        held = bool(part["held"].astype(bool).any())
        rows = []
        for _, r in part.iterrows():
            ci = DASH if pd.isna(r["ci_low"]) else f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
            reference = r["level"] == r["reference_level"]
            diff_ci = DASH
            if not pd.isna(r["diff_ci_low"]):
                diff_ci = f"[{r['diff_ci_low']:+.2f}, {r['diff_ci_high']:+.2f}]"
            rows.append(
                [
                    short_id(r["experiment"]),
                    *([r["held"] or DASH] if held else []),
                    str(r["level"]) + (" (reference)" if reference else ""),
                    str(int(r["n"])),
                    _mean_std(r["best_test_acc_mean"], r["best_test_acc_std"]),
                    ci,
                    DASH if reference else _num(r["diff_vs_reference"], signed=True),
                    diff_ci,
                    _p(r["p_value"]),
                    _p(r["p_holm"]),
                    _seeds(r["seeds_needed"]),
                ]
            )
        headers = ["Experiment", *(["Held at"] if held else []), str(key), "Runs"]
        headers += ["Best test acc. (%)", "95% CI (%)", "Δ vs reference (pp)", "Welch 95% CI (pp)"]
        headers += ["p", "p (Holm)", "Seeds needed"]
        caption = ablation_caption(str(key))
        tables.append(Table(str(key), headers, rows, level=3, figures=[caption]))
    return tables


def ablation_caption(key: str) -> str:
    return f"Best test accuracy against {key}: mean with its 95% t-interval"


def gap_tables(per_experiment: pd.DataFrame, per_run: pd.DataFrame) -> list[Table]:
    by_experiment = Table(
        "Reported versus actual, per experiment",
        ["Experiment", "Runs", "Best reported (%)", "Best actual (%)", "Gap (pp)"],
        [
            [
                r["experiment"],
                str(int(r["n_runs"])),
                _num(r["best_test_acc_reported_mean"]),
                _num(r["best_test_acc_mean"]),
                _mean_std(r["gap_mean"], r["gap_std"]),
            ]
            for _, r in per_experiment.iterrows()
        ],
        GAP_NOTE,
    )
    by_run = Table(
        "Reported versus actual, per run",
        ["Run", "Experiment", "Seed", "Best reported (%)", "Best actual (%)", "Gap (pp)"]
        + ["Best epoch"],
        [
            [
                r["run_name"],
                r["experiment"],
                DASH if pd.isna(r["seed"]) else str(int(r["seed"])),
                _num(r["best_test_acc_reported"]),
                _num(r["best_test_acc"]),
                _num(r["gap"], signed=True),
                DASH if pd.isna(r["best_epoch"]) else str(int(r["best_epoch"])),
            ]
            for _, r in per_run.iterrows()
        ],
    )
    return [by_experiment, by_run]


def _counts(excluded: pd.DataFrame) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in excluded["excluded_as"].value_counts().items())


def footer(runs: RunSet) -> list[str]:
    scope = f"sweep {runs.sweep_name} ({runs.sweep_run_id})" if runs.sweep_run_id else "all sweeps"
    if runs.resumed:
        scope += f", with {runs.resumed} run(s) it resumed from an earlier sweep"
    lines = [
        f"Source: {runs.tracking_uri}, experiment {runs.experiment_name!r}, {scope}; "
        f"{len(runs.finished)} finished run(s) summarised."
    ]
    excluded = runs.excluded
    if len(excluded):
        lines.append(f"Excluded {len(excluded)} runs ({_counts(excluded)}):")
        for r in excluded.itertuples():
            lines.append(f"- {r.run_name} ({r.run_id}): {r.reason}")
    return lines + sweep_notes(runs.running_sweeps)


# --------------------------------------------------------------------------------------------
# Everything
# --------------------------------------------------------------------------------------------


def _figures(
    runs: RunSet,
    curves: pd.DataFrame,
    by: list[str],
    gap_run: pd.Series | None,
    claims: pd.DataFrame,
    ablation: pd.DataFrame,
) -> tuple[list[tuple[str, str, Figure | None]], list[str]]:
    """(file name, caption, Figure or None when skipped) for each figure, and skip notes."""
    table_order = sort_experiments(runs.finished, [*(f"config.{k}" for k in by), "seed"])

    def gap_figure() -> Figure:
        if gap_run is None:
            raise plots.SkipFigure("no finished run to show")
        return plots.plot_reported_vs_actual(curves, gap_run)

    gap_caption = "Reported vs actual test accuracy"
    if gap_run is not None:
        gap_caption += f" of {gap_run['run_name']} (run {gap_run['run_id']})"
    attempts = [
        (
            "test_acc_per_epoch.png",
            "Test accuracy per epoch, mean ± std over seeds",
            lambda: plots.plot_accuracy_curves(curves, table_order, by),
        ),
        ("reported_vs_actual.png", gap_caption, gap_figure),
        (
            "resnet18_like_models.png",
            "ResNet-18-like models e1, e4, e7: test accuracy per epoch",
            lambda: plots.plot_resnet18_like(curves, table_order),
        ),
        ("claims.png", CLAIMS_CAPTION, lambda: plots.plot_claims(claims)),
    ]
    for key in ablation["key"].unique():
        attempts.append(
            (
                ablations.figure_name(key),
                ablation_caption(key),
                lambda key=key: plots.plot_ablation(ablation, key),
            )
        )
    figures, notes = [], []
    for name, caption, draw in attempts:
        try:
            figures.append((name, caption, draw()))
        except plots.SkipFigure as skipped:
            figures.append((name, caption, None))
            notes.append(f"Skipped {name}: {skipped}.")
    return figures, notes


def write_report(
    tracking_uri: str,
    experiment_name: str = "pnn",
    sweep: str | None = None,
    by: list[str] | None = None,
    run_id: str | None = None,
    out: Path = Path("results"),
    claims_files: list[Path] | None = None,
    alpha: float = ALPHA,
) -> tuple[Report, str]:
    """Load the runs, write every output under ``out``; returns the report and the text that
    analyze.py prints. ``by`` None groups by the swept keys found in the runs; ``[]`` not at
    all. ``claims_files`` are added to the README's claims (conf/claims/readme.yaml). ``alpha``:
    the level of the Holm-corrected verdicts and of the seeds needed (next_seeds.sh)."""
    runs = load_runs(tracking_uri, experiment_name, sweep)
    if runs.finished.empty:
        first = runs.excluded.iloc[0]
        raise AnalysisError(
            f"no finished job runs to summarise ({_counts(runs.excluded)}); e.g. "
            f"{first['run_name']}: "
            f"{first['reason']}" + "".join(f". {n}" for n in sweep_notes(runs.running_sweeps))
        )
    # Everything a person may have got wrong is checked before anything is written.
    claim_list = load_all(list(claims_files or []), runs.finished)
    found = ablations.swept_keys(runs.finished)
    grouped_by_found = by is None
    by = ablations.all_keys(found) if by is None else by
    runs.finished = annotate_comparability(runs.finished)
    summary = summarize(runs.finished, by)  # checks --by
    published = {k: v["published_test_acc"] for k, v in experiment_defaults().items()}
    claims, without_runs = evaluate_claims(runs.finished, published, claim_list, alpha)
    ablation = ablations.ablation_table(runs.finished, found, alpha)
    per_experiment, per_run = reported_vs_actual(runs.finished)
    gap_run = choose_gap_run(per_run, run_id)  # checks --run
    curves = load_curves(tracking_uri, runs.finished)

    out.mkdir(parents=True, exist_ok=True)
    results = results_table(summary, by)
    missing = not_run(runs.finished)
    if missing:
        results.note += f"\n\nNo runs of: {', '.join(missing)}."
    if grouped_by_found:
        results.note += "\n\n" + ablations.describe(found)
    for mixed in mixed_config_notes(runs.finished, by):
        results.note += f"\n\nNote: {mixed}"
    ablation_part = ablation_tables(ablation, found, alpha)
    report = Report(
        tables=[
            results,
            *ablation_part,
            claims_table(claims, without_runs, alpha),
            *gap_tables(per_experiment, per_run),
        ],
        summary_tables=[results, *ablation_part],
    )
    report.footer = footer(runs)
    frames = {
        "results.csv": summary,
        "claims.csv": claims[list(CLAIM_COLUMNS)],
        "reported_vs_actual.csv": per_run,
        "reported_vs_actual_summary.csv": per_experiment,
        "curves.csv": curves,
    }
    if len(ablation):
        frames["ablations.csv"] = ablation
    for name, frame in frames.items():
        frame.to_csv(out / name, index=False)
        report.written.append(out / name)

    figures, report.notes = _figures(runs, curves, by, gap_run, claims, ablation)
    for name, caption, fig in figures:
        report.figures[caption] = plots.save(fig, out / name) if fig is not None else None
        if fig is not None:
            report.written.append(out / name)

    text, document = markdown_document(report, TITLE)
    (out / "results.md").write_text(document)
    (out / "report.html").write_text(render_html(report, TITLE))
    report.written += [out / "results.md", out / "report.html"]
    report.written += write_latex(out, summary, by, claims, ablation)
    script, commands = next_seeds.build(
        runs.finished, claims, tracking_uri, experiment_name, Path.cwd()
    )
    (out / "next_seeds.sh").write_text(script)
    (out / "next_seeds.sh").chmod(0o755)
    report.written.append(out / "next_seeds.sh")
    if commands:
        text += f"\n\nThe seeds that would settle the open claims ({out / 'next_seeds.sh'}):\n"
        text += "\n" + script
    return report, text
