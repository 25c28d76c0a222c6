"""Render the analysis: results.md / .csv / .tex, reported_vs_actual*.csv, figures, report.html.

:func:`write_report` is everything ``analyze.py`` does after parsing its options.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from pnn import plots
from pnn.claims import CLAIM_COLUMNS, annotate_comparability, evaluate_claims
from pnn.results import (
    choose_gap_run,
    experiment_defaults,
    mixed_config_notes,
    reported_vs_actual,
    sort_experiments,
    summarize,
    sweep_notes,
)
from pnn.store import AnalysisError, RunSet, load_curves, load_runs

DASH = "—"
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
    "when an experiment of the row has fewer than 2 comparable runs. Published a − b from the "
    "published accuracies, shown for comparable rows only."
)
GAP_NOTE = (
    '"Reported" is the original code\'s test accuracy (per-batch accuracy smoothed as '
    "0.7·previous + 0.3·current); actual is correct / total over the test set. "
    "Gap = best reported − best actual, each the best over epochs."
)


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Report:
    tables: list[Table]
    figures: dict[str, Path | None] = field(default_factory=dict)  # title -> file, None = skipped
    notes: list[str] = field(default_factory=list)
    footer: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)


def _num(value: float, digits: int = 2, signed: bool = False) -> str:
    if value is None or pd.isna(value):
        return DASH
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


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


def claims_table(claims: pd.DataFrame) -> Table:
    rows = []
    for _, r in claims.iterrows():
        ci = DASH
        if not pd.isna(r["ci_low"]):
            ci = f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"
        rows.append(
            [
                r["claim"],
                r["statement"],
                r["a"],
                r["b"],
                _num(r["diff_mean"], signed=True),
                ci,
                f"{r['n_a']} / {r['n_b']}",
                _num(r["published_diff"], 1, signed=True),
                r["verdict"],
                "yes" if r["comparable"] else "no",
            ]
        )
    headers = ["Claim", "Statement", "a", "b", "a − b (pp)", "95% CI (pp)", "Runs a / b"]
    headers += ["Published a − b (pp)", "Verdict", "Comparable"]
    return Table("Claims", headers, rows, CLAIMS_NOTE)


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
# Formats
# --------------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(table: Table) -> str:
    lines = [f"## {table.title}", ""]
    lines.append("| " + " | ".join(_md_cell(h) for h in table.headers) + " |")
    lines.append("|" + "|".join("---" for _ in table.headers) + "|")
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines) + "\n"


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#"}
_TEX_ESCAPES |= {"_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}
_TEX_ESCAPES |= {"±": r"$\pm$", "—": "---", "−": "$-$", "·": r"$\cdot$"}


def _tex(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)


def latex(table: Table) -> str:
    """A booktabs tabular; needs ``\\usepackage{booktabs}``."""
    spec = "l" * 2 + "r" * (len(table.headers) - 2)
    lines = [f"% {table.title}", f"\\begin{{tabular}}{{{spec}}}", r"\toprule"]
    lines.append(" & ".join(_tex(h) for h in table.headers) + r" \\")
    lines.append(r"\midrule")
    lines += [" & ".join(_tex(c) for c in row) + r" \\" for row in table.rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% {part}" for part in table.note.split("\n\n") if part]
    return "\n".join(lines) + "\n"


def html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows
    )
    note = "".join(
        f"<p class='note'>{html.escape(part)}</p>" for part in table.note.split("\n\n") if part
    )
    return (
        f"<h2>{html.escape(table.title)}</h2>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"
    )


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
    "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
    "th,td{border:1px solid #ccc;padding:4px 8px}td{text-align:right}"
    "td:nth-child(-n+2){text-align:left}th{background:#f0f0f0}"
    ".note{color:#555;font-size:0.9em}img{max-width:100%;border:1px solid #eee}"
)


def render_html(report: Report, title: str) -> str:
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts += [html_table(t) for t in report.tables]
    parts.append("<h2>Figures</h2>")
    for caption, path in report.figures.items():
        if path is None:
            continue
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(
            f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in report.notes]
    parts.append("<hr>" + "".join(f"<p class='note'>{html.escape(n)}</p>" for n in report.footer))
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )


# --------------------------------------------------------------------------------------------
# Everything
# --------------------------------------------------------------------------------------------


def _figures(
    runs: RunSet,
    curves: pd.DataFrame,
    by: list[str],
    gap_run: pd.Series | None,
    claims: pd.DataFrame,
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
        (
            "claims.png",
            "Claims: a − b with its 95% interval, the claimed side shaded, the published "
            "difference marked",
            lambda: plots.plot_claims(claims),
        ),
    ]
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
) -> tuple[Report, str]:
    """Load the runs, write every output under ``out``; returns the report and results.md."""
    by = by or []
    runs = load_runs(tracking_uri, experiment_name, sweep)
    if runs.finished.empty:
        first = runs.excluded.iloc[0]
        raise AnalysisError(
            f"no finished job runs to summarise ({_counts(runs.excluded)}); e.g. "
            f"{first['run_name']}: "
            f"{first['reason']}" + "".join(f". {n}" for n in sweep_notes(runs.running_sweeps))
        )
    runs.finished = annotate_comparability(runs.finished)
    summary = summarize(runs.finished, by)  # checks --by before anything is written
    published = {k: v["published_test_acc"] for k, v in experiment_defaults().items()}
    claims = evaluate_claims(runs.finished, published)
    per_experiment, per_run = reported_vs_actual(runs.finished)
    gap_run = choose_gap_run(per_run, run_id)  # checks --run
    curves = load_curves(tracking_uri, runs.finished)

    out.mkdir(parents=True, exist_ok=True)
    report = Report(
        tables=[
            results_table(summary, by),
            claims_table(claims),
            *gap_tables(per_experiment, per_run),
        ]
    )
    mixed = mixed_config_notes(runs.finished, by)
    if mixed:
        report.tables[0].note += "".join(f"\n\nNote: {n}" for n in mixed)
    report.footer = footer(runs)
    frames = {
        "results.csv": summary,
        "claims.csv": claims[list(CLAIM_COLUMNS)],
        "reported_vs_actual.csv": per_run,
        "reported_vs_actual_summary.csv": per_experiment,
        "curves.csv": curves,
    }
    for name, frame in frames.items():
        frame.to_csv(out / name, index=False)
        report.written.append(out / name)

    figures, report.notes = _figures(runs, curves, by, gap_run, claims)
    for name, caption, fig in figures:
        report.figures[caption] = plots.save(fig, out / name) if fig is not None else None
        if fig is not None:
            report.written.append(out / name)

    text = "\n".join(markdown(t) for t in report.tables)
    paragraphs = [*report.notes, *report.footer]
    text += "".join(("\n" if line.startswith("- ") else "\n\n") + line for line in paragraphs)
    images = [f"![{c}]({p.name})" for c, p in report.figures.items() if p is not None]
    figures_md = "\n## Figures\n\n" + "\n\n".join(images) + "\n" if images else ""
    (out / "results.md").write_text(f"# PNN reproduction: results\n\n{text}\n{figures_md}")
    tex = "\n".join(latex(t) for t in report.tables)
    (out / "results.tex").write_text(tex)
    (out / "report.html").write_text(render_html(report, "PNN reproduction: results"))
    report.written += [out / "results.md", out / "results.tex", out / "report.html"]
    return report, text
