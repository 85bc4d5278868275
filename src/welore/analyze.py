"""`analyze(model)`: the spectrum of every target matrix, its metrics, and a rank plan.

For each target matrix: singular values (cached), effective rank, stable rank, the ranks
keeping 90%/99% of the energy, the heavy-tail exponent α, the mean of WeLore's min–max
normalised spectrum; and, when a ratio is given, the rank plan of an allocation policy and
which matrices are LRCs (rank cut by ≥ `lrc_min_cut`) or N-LRCs. Spectra are computed one
decoder block at a time, so a model loaded with its blocks on disk (`welore.io.stream`) is
analysed without ever being whole in memory. `Analysis.write` draws its figures (`plot_spectra`,
`plot_kept_heatmap`) with matplotlib's object API, as `welore.report` does.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from welore._io import atomic_dir, save_figure, write_csv, write_json, write_text
from welore.lowrank.plan import RankPlan, allocate
from welore.lowrank.spectrum import spectral_metrics
from welore.tables import format_table
from welore.targets import find_targets, layer_index, matrix_shape, matrix_type

COLUMNS = [
    "name", "layer", "type", "out_features", "in_features", "full_rank", "effective_rank",
    "stable_rank", "rank_90", "rank_99", "alpha", "mean_normalized", "kept_rank", "kept_fraction", "lrc",
]


@dataclass
class Analysis:
    model: str  # what was analysed (the user's spec)
    rows: list[dict]  # one dict per target matrix, keys = COLUMNS
    spectra: dict[str, torch.Tensor]  # name -> singular values, descending
    plan: RankPlan | None = None  # the rank plan for the requested ratio, if any
    lrc_min_cut: float = 0.5  # LRC = rank cut by at least this fraction
    params: dict = field(default_factory=dict)  # whole-model parameter counts

    def by_type(self) -> dict[str, list[dict]]:
        groups: dict[str, list[dict]] = defaultdict(list)
        for row in self.rows:
            groups[row["type"]].append(row)
        return dict(groups)

    def write_csv(self, path: Path) -> None:
        write_csv(path, COLUMNS, self.rows)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "lrc_min_cut": self.lrc_min_cut,
            "plan": self.plan.to_dict() if self.plan else None,
            "matrices": [
                {**row, "singular_values": [round(v, 6) for v in self.spectra[row["name"]].tolist()]}
                for row in self.rows
            ],
        }

    def summary(self) -> str:
        """A readable per-matrix-type summary, and the plan's headline numbers."""
        lines = [f"{len(self.rows)} target matrices in {self.model}", ""]
        header = ["matrix type", "count", "shape", "eff.rank", "stable", "r99", "alpha"]
        if self.plan:
            header += ["kept", "LRC"]
        table = []
        for kind, rows in self.by_type().items():
            n = len(rows)
            full = rows[0]["full_rank"]
            cells = [kind, f"{n}", f"{rows[0]['out_features']}x{rows[0]['in_features']}",
                     f"{sum(r['effective_rank'] for r in rows) / n / full:.0%}",
                     f"{sum(r['stable_rank'] for r in rows) / n:.1f}",
                     f"{sum(r['rank_99'] for r in rows) / n / full:.0%}",
                     f"{sum(r['alpha'] for r in rows) / n:.2f}"]
            if self.plan:
                cells += [f"{sum(r['kept_fraction'] for r in rows) / n:.0%}", f"{sum(r['lrc'] for r in rows)}"]
            table.append(cells)
        lines.append(format_table(header, table))
        lines.append("(eff.rank and r99 as a fraction of full rank; kept = mean kept-rank fraction)")
        if self.plan:
            lrc = sum(r["lrc"] for r in self.rows)
            lines += [
                "",
                f"plan: {self.plan.method} at ratio {self.plan.requested_ratio}: "
                f"{self.plan.achieved_ratio:.2%} of target parameters removed, "
                f"{len(self.plan.factorized)} of {len(self.rows)} matrices factorized",
                f"LRC (rank cut >= {self.lrc_min_cut:.0%}): {lrc}   N-LRC: {len(self.rows) - lrc}",
            ]
        return "\n".join(lines)

    def write(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write table (CSV, JSON), summary, rank plan and plots to folder `out`, atomically."""
        with atomic_dir(out, overwrite=overwrite) as tmp:
            self.write_files(tmp)
        return Path(out)

    def write_files(self, folder: Path) -> None:
        """The files of `write`, into an existing folder (the caller makes it atomic)."""
        self.write_csv(folder / "spectra.csv")
        write_json(folder / "spectra.json", self.to_dict(), indent=None)
        write_text(folder / "summary.txt", self.summary() + "\n")
        plot_spectra(self, folder / "spectra.png")
        if self.plan:
            self.plan.save(folder / "rank_plan.json")
            plot_kept_heatmap(self, folder / "kept_rank.png")


def analyze(
    model: nn.Module,
    ratio: float | None = None,
    method: str = "welore",
    targets: list[str] | None = None,
    lrc_min_cut: float = 0.5,
    name: str = "model",
    progress: bool = True,
) -> Analysis:
    """Measure every target matrix's spectrum; with `ratio`, also plan its rank with `method`."""
    from welore.lowrank.compress import block_spectra

    modules = find_targets(model, targets)
    spectra = block_spectra(model, modules, progress=progress)
    shapes = {n: matrix_shape(m) for n, m in modules.items()}
    plan = allocate(method, spectra, shapes, ratio) if ratio is not None else None
    rows = []
    for n, s in spectra.items():
        out_features, in_features = shapes[n]
        row = {"name": n, "layer": layer_index(n), "type": matrix_type(n),
               "out_features": out_features, "in_features": in_features}
        row.update(spectral_metrics(s).to_dict())
        if plan:
            kept = plan.kept_fraction(n)
            row.update(kept_rank=plan.ranks[n] if plan.ranks[n] is not None else len(s),
                       kept_fraction=kept, lrc=1 - kept >= lrc_min_cut)
        else:
            row.update(kept_rank=None, kept_fraction=None, lrc=None)
        rows.append(row)
    return Analysis(model=name, rows=rows, spectra=spectra, plan=plan, lrc_min_cut=lrc_min_cut)


# --- figures (matplotlib imported where one is drawn, so that importing welore stays light) ----------


def plot_spectra(analysis: Analysis, path: Path) -> None:
    """One panel per matrix type: normalised singular values σ/σ_max against rank fraction,
    one line per layer, coloured from first (dark) to last (light) layer."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.figure import Figure

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
    save_figure(fig, path)


def plot_kept_heatmap(analysis: Analysis, path: Path) -> None:
    """Kept rank / full rank for every (layer, matrix type) under the analysis's rank plan."""
    import numpy as np
    from matplotlib.figure import Figure

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
    save_figure(fig, path)
