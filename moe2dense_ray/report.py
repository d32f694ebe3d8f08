"""Result tables and plots: one Markdown table writer and one curve plot, for the demo and benchmarks."""

from __future__ import annotations

import math
from typing import Any, Iterable


def markdown_table(rows: Iterable[dict[str, Any]], *, floats: str = "{:.2f}") -> str:
    """A Markdown table of `rows` (columns in first-seen order); numbers right-aligned, None blank."""
    rows = list(rows)
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return floats.format(v)
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def plot_curves(curves: dict[str, list[tuple[float, float]]], path: str, *, title: str, xlabel: str,
                ylabel: str = "held-out perplexity (log scale)", reference: tuple[str, float] | None = None) -> None:
    """Lines of (x, y) points per name on a log y axis, with an optional horizontal reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, ScalarFormatter

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker=".", label=name)
    if reference:
        ax.axhline(reference[1], color="#2a6", linestyle="--", label=f"{reference[0]} ({reference[1]:.1f})")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
