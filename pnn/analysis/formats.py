"""The analysis's formats: one :class:`Report` (tables, figures, notes) as Markdown, LaTeX and a
self-contained HTML page. What goes into the report is :mod:`pnn.analysis.report`'s business."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""
    level: int = 2  # of its heading: 2 for a section, 3 within one
    # Per row, a text too long for a cell (a claim's statement): a full-width line under the row
    # in HTML, a last column headed ``details_header`` in Markdown and LaTeX.
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
# Markdown
# --------------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


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
    headers, rows = _with_details(table)
    if headers:
        lines.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
        lines.append("|" + "|".join("---" for _ in headers) + "|")
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    if table.note:
        lines += ["", table.note] if headers else [table.note]
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


# --------------------------------------------------------------------------------------------
# LaTeX
# --------------------------------------------------------------------------------------------

_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#"}
_TEX_ESCAPES |= {"_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}
_TEX_ESCAPES |= {"±": r"$\pm$", "—": "---", "−": "$-$", "·": r"$\cdot$", "Δ": r"$\Delta$"}


def _tex(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)


def latex(table: Table) -> str:
    """A booktabs tabular; needs ``\\usepackage{booktabs}``. A section heading alone (no
    headers) is a comment."""
    headers, rows = _with_details(table)
    if not headers:
        return f"% {table.title}\n" + "".join(f"% {p}\n" for p in table.note.split("\n\n") if p)
    spec = "l" * 2 + "r" * (len(headers) - 2)
    lines = [f"% {table.title}", f"\\begin{{tabular}}{{{spec}}}", r"\toprule"]
    lines.append(" & ".join(_tex(h) for h in headers) + r" \\")
    lines.append(r"\midrule")
    lines += [" & ".join(_tex(c) for c in row) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% {part}" for part in table.note.split("\n\n") if part]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------


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
    body = ""
    for i, row in enumerate(table.rows):
        body += "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
        if table.details:
            body += (
                f"<tr class='detail'><td colspan='{len(row)}'>"
                f"{html.escape(table.details[i])}</td></tr>"
            )
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    grid = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>" if head else ""
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
    "tr.detail td{text-align:left;color:#333;background:#fafafa;border-top:none;"
    "font-size:0.95em;padding:2px 8px 8px 24px}"
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
