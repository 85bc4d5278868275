"""Plots: spectra by matrix type, a layer × matrix-type heatmap of kept-rank fractions,
perplexity against compression ratio, gradient spectra against weight spectra, and the
size–quality frontier of quantization and low rank.

Figures are built with matplotlib's object API (`Figure`, not `pyplot`) and written straight
to PNG through `welore._io.atomic_file`, so no global state changes (a notebook's backend and
open figures are untouched) and an interrupted run leaves no half-written image.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from welore._io import atomic_file

if TYPE_CHECKING:
    from welore.analyze import Analysis
    from welore.gradients import GradientReport


def _save(fig: Figure, path: str | Path, dpi: int) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def plot_spectra(analysis: Analysis, path: Path) -> None:
    """One panel per matrix type: normalised singular values σ/σ_max against rank fraction,
    one line per layer, coloured from first (dark) to last (light) layer."""
    groups = analysis.by_type()
    cols = min(4, len(groups))
    rows = (len(groups) + cols - 1) // cols
    fig = Figure(figsize=(4 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (kind, members) in zip(axes.flat, groups.items(), strict=False):
        colors = colormaps["viridis"](np.linspace(0, 0.9, len(members)))
        for color, row in zip(colors, members, strict=True):
            s = analysis.spectra[row["name"]].numpy()
            ax.semilogy(np.arange(len(s)) / len(s), s / s[0], color=color, lw=0.8)
        ax.set_title(f"{kind} ({members[0]['out_features']}x{members[0]['in_features']})", fontsize=9)
        ax.set_xlabel("rank / full rank", fontsize=8)
        ax.set_ylabel("σ / σ_max", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle(f"Singular-value spectra of {analysis.model} (dark = first layer)", fontsize=10)
    fig.tight_layout()
    _save(fig, path, dpi=110)


def plot_kept_heatmap(analysis: Analysis, path: Path) -> None:
    """Kept rank / full rank for every (layer, matrix type) under the analysis's rank plan."""
    assert analysis.plan is not None, "a heatmap of kept ranks needs a rank plan"
    types = list(analysis.by_type())
    layers = sorted({r["layer"] for r in analysis.rows if r["layer"] is not None})
    grid = np.full((len(types), max(len(layers), 1)), np.nan)
    for row in analysis.rows:
        if row["layer"] is not None:
            grid[types.index(row["type"]), layers.index(row["layer"])] = row["kept_fraction"]
    fig = Figure(figsize=(max(6, 0.28 * len(layers) + 2), 0.45 * len(types) + 1.6))
    ax = fig.subplots()
    image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=1)
    ax.set_yticks(range(len(types)), types, fontsize=8)
    ax.set_xticks(range(len(layers)), layers, fontsize=7)
    ax.set_xlabel("layer")
    plan = analysis.plan
    ax.set_title(f"kept rank fraction — {plan.method}, ratio {plan.requested_ratio} "
                 f"(achieved {plan.achieved_ratio:.3f}); 1 = dense", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    _save(fig, path, dpi=110)


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
    _save(fig, path, dpi=120)


def plot_gradient_ranks(report: GradientReport, path: Path) -> None:
    """Gradient effective rank (fraction of full rank) against training step, one line per
    matrix type (mean over layers)."""
    by_type: dict[str, dict[int, list[float]]] = {}
    for row in report.steps:
        by_type.setdefault(row["type"], {}).setdefault(row["step"], []).append(row["effective_rank"] / row["full_rank"])
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    for kind, steps in by_type.items():
        xs = sorted(steps)
        ax.plot(xs, [sum(steps[x]) / len(steps[x]) for x in xs], marker=".", lw=1.2, label=kind)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("gradient effective rank / full rank")
    ax.set_ylim(0, None)
    ax.set_title(f"gradient effective rank during training — {report.model}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, dpi=110)


def plot_gradient_vs_weight(report: GradientReport, path: Path) -> None:
    """One point per target matrix: mean gradient effective rank vs weight effective rank
    (both as fractions of full rank), coloured by matrix type."""
    fig = Figure(figsize=(5.6, 4.4))
    ax = fig.subplots()
    for kind, rows in report.by_type().items():
        ax.scatter([r["grad_effective_fraction"] for r in rows], [r["weight_effective_fraction"] for r in rows],
                   s=14, label=kind)
    rho = report.correlations["grad_vs_weight_effective_rank"]
    ax.set_xlabel("gradient effective rank / full rank (mean over steps)")
    ax.set_ylabel("weight effective rank / full rank")
    ax.set_title(f"low-rank gradients vs low-rank weights (Spearman {rho:+.2f})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path, dpi=110)


def plot_size_quality(
    points: dict[str, list[tuple[float, float, str]]], path: Path, dense: tuple[float, float] | None = None,
    title: str = "",
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
        ax.scatter([dense[0]], [dense[1]], marker="*", s=90, color="black", label="dense (bfloat16)", zorder=3)
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
    _save(fig, path, dpi=110)
