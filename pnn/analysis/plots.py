"""The reproduction's figures, drawn from the per-epoch curves of
:func:`pnn.analysis.results.load_curves`.

Uses matplotlib's object-oriented API (``Figure`` + Agg canvas), never pyplot, so no display
or global backend is involved. Each ``plot_*`` returns a Figure, or raises :class:`SkipFigure`
with a one-line reason when its data is absent.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pnn.analysis.claims_file import short_id
from pnn.analysis.results import RESNET18_LIKE, value_key

DPI = 120


class SkipFigure(Exception):
    """A figure that cannot be drawn from the data at hand; the message says why."""


def _band(ax: Axes, curves: pd.DataFrame, label: str, color: str | None = None) -> None:
    """Mean test accuracy per epoch over the runs in ``curves``, with a ±1 std band."""
    stats = curves.groupby("epoch")["test_acc"].agg(["mean", "std", "count"]).reset_index()
    (line,) = ax.plot(
        stats["epoch"],
        stats["mean"],
        marker="o" if len(stats) <= 20 else None,
        markersize=4,
        label=label,
        color=color,
    )
    spread = stats[stats["count"] >= 2]
    if len(spread):
        ax.fill_between(
            spread["epoch"],
            spread["mean"] - spread["std"],
            spread["mean"] + spread["std"],
            color=line.get_color(),
            alpha=0.2,
            linewidth=0,
        )


def _epoch_axis(ax: Axes, curves: pd.DataFrame) -> None:
    ax.set_xlabel("Epoch")
    ax.set_ylabel("Test accuracy (%)")
    ax.grid(True, alpha=0.3)
    if curves["epoch"].max() <= 10:
        ax.set_xticks(range(1, int(curves["epoch"].max()) + 1))


def _group_labels(runs: pd.DataFrame, by: list[str]) -> pd.Series:
    labels = runs["experiment"].astype(str)
    for key in by:
        labels = labels + f", {key}=" + runs[f"config.{key}"].fillna("—").astype(str)
    return labels


def plot_accuracy_curves(curves: pd.DataFrame, runs: pd.DataFrame, by: list[str]) -> Figure:
    """Figure 1: test accuracy per epoch of every experiment, mean ± std over seeds."""
    curves = curves.dropna(subset=["test_acc"])
    if curves.empty:
        raise SkipFigure("no per-epoch test_acc logged")
    groups = pd.Series(_group_labels(runs, by).values, index=runs["run_id"])
    curves = curves.assign(group=curves["run_id"].map(groups))
    order = list(dict.fromkeys(_group_labels(runs, by)))  # runs arrive in table order
    fig = Figure(figsize=(10, 6), dpi=DPI)
    ax = fig.add_subplot()
    for group in order:
        part = curves[curves["group"] == group]
        if len(part):
            _band(ax, part, f"{group} (n={part['run_id'].nunique()})")
    _epoch_axis(ax, curves)
    ax.set_title("Actual test accuracy per epoch (mean ± std over seeds)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title="experiment")
    fig.tight_layout()
    return fig


def plot_reported_vs_actual(curves: pd.DataFrame, run: pd.Series) -> Figure:
    """Figure 2: one run's accuracy as the original code reported it, and as it is."""
    own = curves[curves["run_id"] == run["run_id"]].sort_values("epoch")
    if own["test_acc"].isna().all() or own["test_acc_reported"].isna().all():
        raise SkipFigure(f"run {run['run_id']} has no per-epoch test_acc and test_acc_reported")
    fig = Figure(figsize=(8, 5), dpi=DPI)
    ax = fig.add_subplot()
    marker = "o" if len(own) <= 20 else None
    ax.plot(
        own["epoch"],
        own["test_acc_reported"],
        marker=marker,
        markersize=4,
        color="tab:red",
        label="reported (original code: smoothed per batch), "
        f"best {run['best_test_acc_reported']:.2f}%",
    )
    ax.plot(
        own["epoch"],
        own["test_acc"],
        marker=marker,
        markersize=4,
        color="tab:blue",
        label=f"actual (correct / total), best {run['best_test_acc']:.2f}%",
    )
    _epoch_axis(ax, own)
    ax.set_title(f"Reported vs actual test accuracy: {run['run_name']}")
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    return fig


def plot_resnet18_like(curves: pd.DataFrame, runs: pd.DataFrame) -> Figure:
    """Figure 3: baseline ResNet-18 (e1), 1x1 convs without noise (e4), PNN (e7)."""
    present = [e for e in RESNET18_LIKE if (curves["experiment"] == e).any()]
    if not present:
        raise SkipFigure(f"none of {', '.join(RESNET18_LIKE)} has per-epoch test_acc")
    fig = Figure(figsize=(8, 5), dpi=DPI)
    ax = fig.add_subplot()
    for experiment in present:
        mine = runs[runs["experiment"] == experiment]
        size = mine["params"].mean() / 1e6
        label = f"{experiment} ({size:.2f}M params, n={len(mine)})"
        _band(ax, curves[curves["experiment"] == experiment].dropna(subset=["test_acc"]), label)
    _epoch_axis(ax, curves[curves["experiment"].isin(present)])
    missing = [e for e in RESNET18_LIKE if e not in present]
    title = "ResNet-18-like models: actual test accuracy (mean ± std over seeds)"
    ax.set_title(title + (f"\nnot in the store: {', '.join(missing)}" if missing else ""))
    ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _claimed_span(kind: str, threshold: float, low: float, high: float) -> tuple[float, float]:
    """The x-range of the claimed side, clipped to the axis limits [low, high]."""
    if kind == "below":
        return low, threshold
    if kind == "within":
        return -threshold, threshold
    return threshold, high  # at_least, above


def plot_claims(claims: pd.DataFrame) -> Figure:
    """Each claim's a − b with its 95% interval (one row each), the claimed side shaded green
    and the published difference marked; the reported − actual gaps below, on their own axis."""
    drawn = claims.dropna(subset=["diff_mean"])
    if drawn.empty:
        raise SkipFigure("no claim has runs on both sides")
    parts = [
        drawn[~drawn["claim"].str.startswith("gap_")],
        drawn[drawn["claim"].str.startswith("gap_")],
    ]
    parts = [p for p in parts if len(p)]
    fig = Figure(figsize=(10, 1.2 + 0.55 * len(drawn) + 0.8 * len(parts)), dpi=DPI)
    axes = fig.subplots(len(parts), 1, squeeze=False, height_ratios=[len(p) + 1 for p in parts])
    for ax, part in zip(axes[:, 0], parts, strict=True):
        values = pd.concat(
            [part["diff_mean"], part["ci_low"], part["ci_high"], part["published_diff"]]
            + [part["threshold"]]
        ).dropna()
        pad = max(1.0, 0.15 * (values.max() - values.min()))
        low, high = values.min() - pad, values.max() + pad
        for y, (_, row) in enumerate(part.iloc[::-1].iterrows()):
            start, end = _claimed_span(row["kind"], row["threshold"], low, high)
            ax.fill_betweenx([y - 0.4, y + 0.4], start, end, color="tab:green", alpha=0.15, lw=0)
            ax.axvline(row["threshold"], ymin=0, ymax=1, color="0.85", lw=0.8, zorder=0)
            has_ci = not pd.isna(row["ci_low"])
            xerr = (
                [[row["diff_mean"] - row["ci_low"]], [row["ci_high"] - row["diff_mean"]]]
                if has_ci
                else None
            )
            ax.errorbar(
                row["diff_mean"],
                y,
                xerr=xerr,
                fmt="o",
                color="tab:blue",
                capsize=4,
                label="measured a − b, 95% CI" if y == 0 else None,
            )
            if not pd.isna(row["published_diff"]):
                ax.plot(
                    row["published_diff"],
                    y,
                    "D",
                    color="tab:red",
                    markersize=6,
                    label="published a − b" if y == 0 else None,
                )
        labels = [f"{r['claim']}\n{r['verdict']}" for _, r in part.iloc[::-1].iterrows()]
        ax.set_yticks(range(len(part)), labels, fontsize=8)
        ax.set_xlim(low, high)
        ax.set_ylim(-0.6, len(part) - 0.4)
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_xlabel("difference in best test accuracy (pp)")
    for ax, part in zip(axes[:, 0], parts, strict=True):
        headline = part["claim"].str.startswith("gap_").all()
        ax.set_title(
            "Best reported − best actual, per experiment (95% interval)"
            if headline
            else "Claims: a − b with 95% interval; green = the claimed side"
        )
    handles, names = [], []
    for ax in axes[:, 0]:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            if name not in names:
                handles.append(handle)
                names.append(name)
    axes[0, 0].legend(handles, names, loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def _numeric_levels(levels: pd.Series) -> pd.Series | None:
    numbers = pd.to_numeric(levels, errors="coerce")
    return None if numbers.isna().any() else numbers


def plot_ablation(table: pd.DataFrame, key: str) -> Figure:
    """Best test accuracy against the levels of ``key`` (rows of ablations.csv), mean with its
    95% t-interval, one line per experiment (and per level of the other keys held). Numeric
    levels get a numeric axis, log-scaled when they span two decades or more; others are
    categories in sort order."""
    mine = table[table["key"] == key]
    if mine.empty:
        raise SkipFigure(f"{key} is not a swept key")
    numbers = _numeric_levels(mine["level"])
    if numbers is None:
        categories = sorted(mine["level"].unique(), key=value_key)
        position = mine["level"].map({c: i for i, c in enumerate(categories)}).astype(float)
    else:
        position = numbers.astype(float)
    fig = Figure(figsize=(8, 5), dpi=DPI)
    ax = fig.add_subplot()
    for (experiment, held), group in mine.groupby(["experiment", "held"], sort=False):
        x = position.loc[group.index]
        order = x.sort_values().index
        y = group.loc[order, "best_test_acc_mean"]
        low = (y - group.loc[order, "ci_low"]).fillna(0.0)
        high = (group.loc[order, "ci_high"] - y).fillna(0.0)
        label = short_id(str(experiment)) + (f", {held}" if held else "")
        ax.errorbar(x.loc[order], y, yerr=[low, high], marker="o", capsize=4, label=label)
    if numbers is None:
        ax.set_xticks(range(len(categories)), categories)
    else:
        if (numbers > 0).all() and numbers.max() / numbers.min() >= 100:
            ax.set_xscale("log")
        ticks = dict(zip(numbers, mine["level"], strict=True))  # the levels as logged
        ax.set_xticks(sorted(ticks), [ticks[t] for t in sorted(ticks)])
    ax.set_xlabel(key)
    ax.set_ylabel("Best test accuracy (%)")
    ax.set_title(f"Best test accuracy against {key} (mean, 95% t-interval over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8, title="experiment")
    fig.tight_layout()
    return fig
