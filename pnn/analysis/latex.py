"""The tables a paper can ``\\input``: results, claims and each ablation, as LaTeX floats.

Each file holds one ``table`` float (per swept key for the ablations) with a ``\\caption`` and a
``\\label``, written by pandas (``Styler.to_latex``) with booktabs rules. The tables are the compact
ones a paper shows; the full detail stays in the CSV, Markdown and HTML. Each fits ``\\textwidth``
of a default 10 pt ``article``: numbers in ``r`` columns of a known width, and any text that may
be long (names, config values) in a ragged ``p`` column that wraps after ``_ = , /``. Every text
is escaped for LaTeX's default (OT1) font encoding, where ``<``, ``>``, ``|`` and ``"`` would
print as other glyphs: they go through math mode or the right macros.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from pnn.analysis.claims_file import short_id

PACKAGES = ("booktabs",)
HEADER = (
    "% Written by analyze.py, for \\input in a LaTeX document whose preamble has\n"
    "% \\usepackage{booktabs} (TeX Live's texlive-latex-recommended); nothing else is needed.\n"
)
DASH = "---"
# A default 10 pt article's \textwidth, and the widest glyph of the tables' 9 pt type (W), in
# points: a text column whose cells cannot be wider than its share of the line is a plain ``l``.
TEXTWIDTH_PT, WIDEST_PT = 345.0, 9.5

_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"$<$",
    ">": r"$>$",
    "|": r"$|$",
    "±": r"$\pm$",
    "≥": r"$\geq$",
    "≤": r"$\leq$",
    "≠": r"$\neq$",
    "−": r"$-$",
    "×": r"$\times$",
    "·": r"$\cdot$",
    "÷": r"$\div$",
    "Δ": r"$\Delta$",
    "µ": r"$\mu$",
    "°": r"$^\circ$",
    "—": "---",
    "–": "--",
    "…": r"\ldots{}",
    "“": "``",
    "”": "''",
    "‘": "`",
    "’": "'",
}
# Where a long name may wrap: after these (after "." only before a letter: not in a number),
# with a hyphen's penalty (TeX's \hyphenpenalty).
_BREAK_AFTER = "_=,/"
_BREAK = r"\penalty50{}"


def escape(text: object, breakable: bool = False) -> str:
    """``text`` as LaTeX that prints it as typed. Straight double quotes become opening and
    closing quotes; a character LaTeX's default setup cannot print (beyond ASCII, Latin-1's
    letters and the symbols mapped here) becomes ``?``. ``breakable``: a line may wrap after
    ``_ = , /`` and a ``.`` before a letter (for ragged ``p`` columns)."""
    out = []
    text = str(text)
    for i, ch in enumerate(text):
        if ch == '"':
            opening = i == 0 or text[i - 1].isspace() or text[i - 1] in "([{"
            out.append("``" if opening else "''")
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch.isspace():
            out.append(" ")
        elif not (" " <= ch <= "~" or "À" <= ch <= "ÿ") or ch in "ÐÞðþ":
            out.append("?")  # outside what OT1 and LaTeX's utf8 set up
        else:
            out.append(ch)
        if breakable and 0 < i < len(text) - 1:
            if ch in _BREAK_AFTER or (ch == "." and text[i + 1].isalpha()):
                out.append(_BREAK)
    return "".join(out)


def _number(value: float, digits: int = 2, signed: bool = False) -> str:
    if value is None or pd.isna(value):
        return DASH
    return f"${value:+.{digits}f}$" if signed else f"${value:.{digits}f}$"


def _mean_std(mean: float, std: float) -> str:
    if pd.isna(mean):
        return DASH
    return f"${mean:.2f}$" if pd.isna(std) else f"${mean:.2f} \\pm {std:.2f}$"


def _interval(low: float, high: float) -> str:
    if pd.isna(low) or pd.isna(high):
        return DASH
    return f"$[{low:+.2f}, {high:+.2f}]$"


def _p_value(p: float) -> str:
    if p is None or pd.isna(p):
        return DASH
    return "$<0.001$" if p < 0.001 else f"${p:.3f}$"


def _text_column(values: list[str], share: float) -> tuple[str, list[str]]:
    """(column spec, cells): a ragged ``p`` column ``share`` of the line wide, or ``l`` for
    texts too short to need it."""
    if all(len(v) * WIDEST_PT <= share * TEXTWIDTH_PT for v in values):
        return "l", [escape(v) for v in values]
    spec = f"p{{{share:g}\\linewidth}}"
    return spec, [r"\raggedright " + escape(v, breakable=True) for v in values]


def _once(values: list[str]) -> list[str]:
    """``values`` with each run of equal values shown on its first row only."""
    return [v if i == 0 or v != values[i - 1] else "" for i, v in enumerate(values)]


def _float(
    headers: list[str],
    specs: list[str],
    first: list[list[str]],
    rows: list[list[str]],
    caption: str,
    name: str,
    notes: list[str] | None = None,
) -> str:
    """One ``table`` float labelled ``tab:pnn-<name>``: pandas writes the booktabs tabular, its
    caption and label. Each row is its text cells ``first`` then its numbers ``rows``; the
    notes (LaTeX already) follow the tabular in small type."""
    frame = pd.DataFrame(
        [[*a, *b] for a, b in zip(first, rows, strict=True)], columns=headers, dtype=object
    )
    styler = frame.style.hide(axis="index")
    styler.set_table_styles(
        [
            {"selector": "smallskip", "props": ":;"},  # between the caption and the rule
            {"selector": "small", "props": ":;"},
            {"selector": "setlength", "props": r":{\tabcolsep}{4pt};"},
        ]
    )
    text = styler.to_latex(
        caption=caption,
        label="tab:pnn-" + re.sub(r"[^A-Za-z0-9.:-]", "-", name),
        position="htbp",
        position_float="centering",
        hrules=True,
        column_format="".join(specs),
    )
    if notes:
        block = "\\par\\smallskip\n{\\footnotesize\\raggedright\n" + "\\par\n".join(notes)
        text = text.replace("\\end{table}", block + "\\par}\n\\end{table}")
    return HEADER + text


def results_latex(summary: pd.DataFrame, by: list[str]) -> str:
    """One row per experiment (and ``by`` levels): n, best test accuracy mean ± std, the
    "reported" one, the published figure and best − published where comparable. A row names
    only the ``by`` levels that differ between its experiment's rows."""
    splits = {
        experiment: [k for k in by if group[k].astype(str).nunique() > 1]
        for experiment, group in summary.groupby("experiment", sort=False)
    }
    names, rows = [], []
    for _, r in summary.iterrows():
        levels = [f"{k}={r[k]}" for k in splits[r["experiment"]]]
        names.append(short_id(r["experiment"]) + (f" ({', '.join(levels)})" if levels else ""))
        rows.append(
            [
                str(int(r["n_runs"])),
                _mean_std(r["best_test_acc_mean"], r["best_test_acc_std"]),
                _number(r["best_test_acc_reported_mean"]),
                _number(r["published_test_acc"], 1),
                _number(r["diff_vs_published"], signed=True),
            ]
        )
    spec, cells = _text_column(names, 0.3)
    headers = ["$n$", "Best", escape('"Reported"'), "Published", "Best $-$ publ."]
    caption = (
        "PNN reproduction: best test accuracy (\\%) over $n$ seeds, mean $\\pm$ sample std; "
        "``reported'': the original code's accuracy formula, mean; published: the paper's "
        "figure, and best $-$ published (pp), for rows whose runs all have the paper's config."
    )
    first = [[cell] for cell in cells]
    return _float(["Experiment", *headers], [spec, *"rrrrr"], first, rows, caption, "results")


def claims_latex(claims: pd.DataFrame) -> str:
    """Each claim: a − b with its 95% interval, the runs, the verdict (and the Holm-adjusted p
    when the frame has ``p_holm``); the statements in notes under the table."""
    holm = "p_holm" in claims.columns
    rows = []
    by_statement: dict[str, list[str]] = {}  # the per-experiment gaps share one statement
    for _, r in claims.iterrows():
        rows.append(
            [
                _number(r["diff_mean"], signed=True),
                _interval(r["ci_low"], r["ci_high"]),
                f"{r['n_a']}/{r['n_b']}",
                *([_p_value(r["p_holm"])] if holm else []),
            ]
        )
        by_statement.setdefault(str(r["statement"]), []).append(str(r["claim"]))
    notes = [
        f"\\textit{{{', '.join(escape(c, breakable=True) for c in ids)}}}: "
        f"{escape(statement, breakable=True)}"
        for statement, ids in by_statement.items()
    ]
    spec, cells = _text_column(list(claims["claim"]), 0.17)
    verdict_spec, verdicts = _text_column([str(v) for v in claims["verdict"]], 0.15)
    headers = ["Claim", "Verdict", "$a - b$", "95\\% CI", "$n_a / n_b$"]
    specs = [spec, verdict_spec, "r", "r", "r"]
    if holm:
        headers.append("$p$ (Holm)")
        specs.append("r")
    caption = (
        "Claims about the runs: $a - b$ in best test accuracy (pp), mean, with Welch's 95\\% "
        "t-interval over seeds ($n_a$, $n_b$ runs); the verdict says whether the interval lies "
        "on the claimed side. Each claim's statement is under the table."
    )
    first = [[c, v] for c, v in zip(cells, verdicts, strict=True)]
    return _float(headers, specs, first, rows, caption, "claims", notes)


def ablation_latex(part: pd.DataFrame, key: str) -> str:
    """One swept key: per experiment (and level of the keys held), each level's n, best test
    accuracy mean ± std, and Δ from the reference level with Welch's 95% interval."""
    experiments = [short_id(e) for e in part["experiment"]]
    held = [str(h) or "—" for h in part["held"]]
    with_held = bool(part["held"].astype(bool).any())
    text: list[tuple[str, str, list[str]]] = []  # (header, spec, cells) of the text columns
    # The experiment and the held levels are written once per group of rows.
    if len(set(experiments)) > 1:
        text.append(("Exp.", *_text_column(_once(experiments), 0.08)))
    if with_held:
        groups = _once([f"{e}\0{h}" for e, h in zip(experiments, held, strict=True)])
        shown = [h if g else "" for h, g in zip(held, groups, strict=True)]
        text.append(("Held at", *_text_column(shown, 0.12)))
    # The text columns share what the four numbers leave of the line.
    share = 0.15 if with_held else 0.28
    levels, rows = [], []
    for _, r in part.iterrows():
        reference = r["level"] == r["reference_level"]
        levels.append(str(r["level"]) + (" (ref.)" if reference else ""))
        rows.append(
            [
                str(int(r["n"])),
                _mean_std(r["best_test_acc_mean"], r["best_test_acc_std"]),
                DASH if reference else _number(r["diff_vs_reference"], signed=True),
                _interval(r["diff_ci_low"], r["diff_ci_high"]),
            ]
        )
    text.append((escape(key), *_text_column(levels, share)))
    cells = [list(row) for row in zip(*(c for _, _, c in text), strict=True)]
    headers = [h for h, _, _ in text] + ["$n$", "Best", "$\\Delta$", "95\\% CI of $\\Delta$"]
    specs = [spec for _, spec, _ in text] + ["r"] * 4
    names = ", ".join(escape(e) for e in dict.fromkeys(experiments))
    caption = (
        f"Ablation of {escape(key)} ({names}): best test accuracy (\\%) per level over $n$ "
        "seeds, mean $\\pm$ sample std, and $\\Delta$, the difference from the reference level "
        "(ref.) in pp, with Welch's 95\\% t-interval."
    )
    return _float(headers, specs, cells, rows, caption, f"ablation-{key}")


def ablation_file(key: str) -> str:
    """``ablation_<key>.tex``, the key made safe for a file name (as the figure's)."""
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in key)
    return f"ablation_{safe}.tex"


def write_latex(
    out: Path, summary: pd.DataFrame, by: list[str], claims: pd.DataFrame, ablation: pd.DataFrame
) -> list[Path]:
    """results.tex, claims.tex and ablation_<key>.tex per swept key under ``out``."""
    files = {"results.tex": results_latex(summary, by)}
    if len(claims):
        files["claims.tex"] = claims_latex(claims)
    for key, part in ablation.groupby("key", sort=False):
        files[ablation_file(str(key))] = ablation_latex(part, str(key))
    for name, text in files.items():
        (out / name).write_text(text)
    return [out / name for name in files]
