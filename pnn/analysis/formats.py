"""The analysis's formats: one :class:`Report` (tables, figures, notes) as Markdown and a
self-contained HTML page, the grids written by pandas. What goes into the report is
:mod:`pnn.analysis.report`'s business; the LaTeX tables for a paper, :mod:`pnn.analysis.latex`'s.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""
    level: int = 2  # of its heading: 2 for a section, 3 within one
    # Per row, a longer text (a claim's statement): a last column headed ``details_header``.
    details: list[str] = field(default_factory=list)
    details_header: str = ""
    # Captions of report.figures shown with this table (before it if figures_first), not at the end.
    figures: list[str] = field(default_factory=list)
    figures_first: bool = False


@dataclass
class Report:
    tables: list[Table]
    figures: dict[str, Path | None] = field(default_factory=dict)  # title -> file, None = skipped
    notes: list[str] = field(default_factory=list)
    footer: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    # What the sweep's parent run shows in its description: the results, the ablations.
    summary_tables: list[Table] = field(default_factory=list)

    def loose_figures(self) -> dict[str, Path]:
        """The drawn figures no table shows: they go in a Figures section at the end."""
        shown = {caption for table in self.tables for caption in table.figures}
        return {c: p for c, p in self.figures.items() if p is not None and c not in shown}


def _with_details(table: Table) -> tuple[list[str], list[list[str]]]:
    if not table.details:
        return table.headers, table.rows
    rows = [[*row, detail] for row, detail in zip(table.rows, table.details, strict=True)]
    return [*table.headers, table.details_header], rows


# --------------------------------------------------------------------------------------------
# Markdown and HTML grids: pandas' writers (tabulate for Markdown)
# --------------------------------------------------------------------------------------------


def _frame(table: Table) -> pd.DataFrame:
    headers, rows = _with_details(table)
    return pd.DataFrame(rows, columns=headers, dtype=object)


def markdown(table: Table, figures: dict[str, Path | None] | None = None) -> str:
    """The table under its heading, then its note; with ``figures``, its figures as images."""
    lines = ["#" * table.level + f" {table.title}", ""]
    images = [
        f"![{caption}]({path.name})"
        for caption, path in (figures or {}).items()
        if caption in table.figures and path is not None
    ]
    if images and table.figures_first:
        lines += [*images, ""]
    if table.headers:
        # A cell's | would end it; numbers stay as written (tabulate would reformat them).
        grid = _frame(table).map(lambda text: str(text).replace("|", "\\|").replace("\n", " "))
        grid.columns = [h.replace("|", "\\|") for h in grid.columns]
        lines.append(grid.to_markdown(index=False, tablefmt="pipe", disable_numparse=True))
    if table.note:
        lines += ["", table.note] if table.headers else [table.note]
    if images and not table.figures_first:
        lines += ["", *images]
    return "\n".join(lines) + "\n"


def markdown_document(report: Report, title: str) -> tuple[str, str]:
    """(the tables and notes, as printed by analyze.py; the whole results.md)."""
    text = "\n".join(markdown(t, report.figures) for t in report.tables)
    paragraphs = [*report.notes, *report.footer]
    text += "".join(("\n" if line.startswith("- ") else "\n\n") + line for line in paragraphs)
    images = [f"![{c}]({p.name})" for c, p in report.loose_figures().items()]
    figures_md = "\n## Figures\n\n" + "\n\n".join(images) + "\n" if images else ""
    return text, f"# {title}\n\n{text}\n{figures_md}"


def _figure_html(caption: str, path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def html_table(table: Table, figures: dict[str, Path | None] | None = None) -> str:
    level = min(max(table.level, 1), 6)
    images = "".join(
        _figure_html(caption, path)
        for caption, path in (figures or {}).items()
        if caption in table.figures and path is not None
    )
    grid = ""
    if table.headers:
        classes = "details" if table.details else None
        grid = _frame(table).to_html(index=False, border=0, classes=classes, justify="center")
    note = "".join(
        f"<p class='note'>{html.escape(part)}</p>" for part in table.note.split("\n\n") if part
    )
    heading = f"<h{level}>{html.escape(table.title)}</h{level}>"
    if table.figures_first:
        return heading + images + grid + note
    return heading + grid + note + images


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
    "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
    "th,td{border:1px solid #ccc;padding:4px 8px}td{text-align:right}"
    "td:nth-child(-n+2){text-align:left}th{background:#f0f0f0}"
    "table.details td:last-child{text-align:left;min-width:24em;color:#333}"
    ".note{color:#555;font-size:0.9em}img{max-width:100%;border:1px solid #eee}"
)


def render_html(report: Report, title: str) -> str:
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts += [html_table(t, report.figures) for t in report.tables]
    loose = report.loose_figures()
    if loose:
        parts.append("<h2>Figures</h2>")
        parts += [_figure_html(caption, path) for caption, path in loose.items()]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in report.notes]
    parts.append("<hr>" + "".join(f"<p class='note'>{html.escape(n)}</p>" for n in report.footer))
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )
