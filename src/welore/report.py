"""Plots of evaluation results: perplexity against compression ratio, and the size–quality
frontier of quantization and low rank. (The figures of an analysis and of gradient spectra are
drawn beside the data they show: `welore.analyze`, `welore.gradients`.)

Figures are built with matplotlib's object API (`Figure`, not `pyplot`) and written straight
to PNG through `welore._io.save_figure`, so no global state changes (a notebook's backend and
open figures are untouched) and an interrupted run leaves no half-written image.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from welore._io import save_figure


def plot_perplexity_vs_ratio(
    points: list[tuple[str, float, float]], path: Path, dense: float | None = None, title: str = ""
) -> None:
    """Perplexity (log scale) against compression ratio, one line per method.

    `points` holds (method label, achieved ratio, perplexity); `dense` draws the uncompressed
    model's perplexity as a dashed line.
    """
    by_method: dict[str, list[tuple[float, float]]] = {}
    for label, ratio, ppl in points:
        by_method.setdefault(label, []).append((ratio, ppl))
    fig = Figure(figsize=(8.4, 4.4))
    ax = fig.subplots()
    colors = colormaps["tab10"].colors if len(by_method) <= 10 else colormaps["tab20"].colors  # one colour per method
    for i, (label, xy) in enumerate(by_method.items()):
        xy.sort()
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", lw=1.2, label=label, color=colors[i % len(colors)])
    if dense is not None:
        ax.axhline(dense, color="black", ls="--", lw=0.8, label=f"dense ({dense:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("compression ratio (fraction of target parameters removed)")
    ax.set_ylabel("perplexity")
    ax.set_title(title or "perplexity vs compression ratio", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: lines stay visible
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def plot_size_quality(
    points: dict[str, list[tuple[float, float, str]]], path: Path, dense: tuple[float, float] | None = None,
    title: str = "", dense_label: str = "dense (bfloat16)",
) -> None:
    """Size–quality frontier: perplexity (log) against stored bytes (MB) of the target matrices,
    one marker style per family (e.g. quantization alone, low rank alone, both), each point
    labelled; `dense` (MB, perplexity) is drawn as a star and a dotted line."""
    fig = Figure(figsize=(7.2, 4.6))
    ax = fig.subplots()
    for (family, rows), marker in zip(points.items(), "osD^vP", strict=False):
        rows = sorted(rows)
        ax.plot([r[0] for r in rows], [r[1] for r in rows], marker=marker, lw=1.0, label=family)
        for x, y, name in rows:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
    if dense is not None:
        ax.scatter([dense[0]], [dense[1]], marker="*", s=90, color="black", label=dense_label, zorder=3)
        ax.axhline(dense[1], color="black", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("bytes of the target matrices as stored (MB, log)")
    ax.set_ylabel("perplexity (log)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
