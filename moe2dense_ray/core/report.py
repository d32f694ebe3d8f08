"""Result tables and plots, for the demo and benchmarks: one Markdown table writer, the demo's
perplexity table, one bar chart of perplexities and one curve plot (lines of points per name)."""

from __future__ import annotations

import math
from typing import Any, Iterable


def markdown_table(rows: Iterable[dict[str, Any]], *, floats: str = "{:.2f}", right: Iterable[str] = ()) -> str:
    """A Markdown table of `rows` (columns in first-seen order); numbers right-aligned (not
    booleans, nor a column with no value at all, such as a leaderboard's errors), None blank.

    `right` names columns to right-align although they hold text (numbers already formatted with
    an annotation, such as "12.3 (10.1-15.0)" or "0.95x")."""
    rows = list(rows)
    right = set(right)
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return floats.format(v)
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    numeric = [c in right or (all(number(r.get(c)) or r.get(c) is None for r in rows)
                              and any(r.get(c) is not None for r in rows)) for c in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def perplexity_table(rows: Iterable[dict[str, Any]]) -> str:
    """The table of models by held-out perplexity: rows with `model`, `params_M` and `ppl`."""
    return markdown_table({"model": r["model"], "params (M)": r["params_M"], "held-out perplexity": r["ppl"]}
                          for r in rows)


def plot_bars(bars: list[tuple[str, float]], path: str, *, title: str,
              xlabel: str = "held-out perplexity, log scale (lower is better)", highlight: int | None = 0) -> None:
    """Horizontal bars of (name, perplexity), listed top to bottom, on a log x axis with each value
    written at its bar's end; the bar at index `highlight` (the reference, such as the teacher) in
    green, the others grey."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, max(3.5, 1.2 + 0.24 * len(bars))))  # a row per bar, however many
    names = [name for name, _ in bars][::-1]
    vals = [v for _, v in bars][::-1]
    colors = ["#888"] * len(bars)
    if highlight is not None:
        colors[len(bars) - 1 - highlight % len(bars)] = "#2a6"
    ax.barh(names, vals, color=colors)
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:.1f}", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(min(vals) / 1.5, max(vals) * 1.6)
    _log_ticks(ax.xaxis)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    _save(fig, path)


def plot_curves(curves: dict[str, list[tuple[float, float]]], path: str, *, title: str, xlabel: str,
                ylabel: str = "held-out perplexity (log scale)", reference: tuple[str, float] | None = None,
                bands: dict[str, list[tuple[float, float, float]]] | None = None,
                colors: dict[str, str] | None = None, xlog: int | None = None) -> None:
    """Lines of (x, y) points per name on a log y axis, with an optional horizontal reference line.

    `bands`: shaded (x, low, high) ranges per name, drawn under the lines (the spread of a random
    baseline, say); `colors`: a matplotlib color per curve or band name (others take the cycle);
    `xlog`: a log x axis of that base, ticked at the points' x values (numbers of experts K)."""
    plt = _pyplot()
    colors = colors or {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in (bands or {}).items():
        if points:
            xs, lo, hi = zip(*points)
            ax.fill_between(xs, lo, hi, color=colors.get(name, "0.8"), label=name)
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker=".", label=name, **({"color": colors[name]} if name in colors else {}))
    if reference:
        ax.axhline(reference[1], color="#2a6", linestyle="--", label=f"{reference[0]} ({reference[1]:.1f})")
    if xlog:
        ticks = sorted({x for points in curves.values() for x, _ in points})
        ax.set_xscale("log", base=xlog)
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_yscale("log")
    _log_ticks(ax.yaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    entries = len(curves) + len(bands or {}) + bool(reference)
    longest = max([len(n) for n in list(curves) + list(bands or {})] or [0])
    if entries <= 6 and longest <= 32:
        ax.legend(fontsize=8)
    else:  # below the axes, which keep their size: a legend inside would cover the lines or squeeze them
        ncol = 1 if longest > 40 else 2
        rows = -(-entries // ncol)
        fig.set_size_inches(7, 4 + 0.18 * rows)
        ax.legend(fontsize=8, ncol=ncol, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_ticks(axis) -> None:
    """Plain-number ticks at 1, 2 and 5 times powers of ten on a log axis."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, ScalarFormatter

    axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_formatter(plt.NullFormatter())


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # a legend placed below the axes is kept
    plt.close(fig)
