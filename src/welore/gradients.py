"""Gradient spectra during training, and how they relate to the weights' spectra.

WeLore (Jaiswal et al., 2024, "From GaLore to WeLore: How Low-Rank Weights Non-uniformly Emerge
from Low-Rank Gradients") observes that the matrices whose gradients stay low-rank through
training are the ones whose weights become low-rank (heavy-tailed spectra, many components
cut by a global threshold), while matrices with high-rank gradients keep high-rank weights.
`GradientSpectra` makes that measurable on any model:

    recorder = GradientSpectra(model)                      # dense target matrices
    welore.finetune(model, tokenizer, config, on_gradients=recorder)
    report = recorder.report(weight_spectra)               # gradients vs weights, per matrix
    report.write("out/gradients")                          # CSV, JSON, summary, plots

It is called once per optimizer step with the full (accumulated) gradients in `.grad`, and
records each target matrix's gradient spectrum metrics: effective rank, stable rank and the
rank keeping 90% of the gradient energy, as fractions of the full rank where that helps
comparison across shapes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from welore._io import atomic_dir, save_figure, write_csv, write_json, write_text
from welore.errors import WeloreError
from welore.finetune.config import FinetuneConfig
from welore.lowrank.plan import RankPlan
from welore.lowrank.spectrum import singular_values_many, spectral_metrics
from welore.options import check_positive
from welore.tables import format_table
from welore.targets import find_targets, layer_index, matrix_type

log = logging.getLogger(__name__)

STEP_COLUMNS = ["step", "name", "layer", "type", "full_rank", "effective_rank", "stable_rank", "rank_90"]
SUMMARY_COLUMNS = [
    "name", "layer", "type", "full_rank", "steps",
    "grad_effective_fraction", "grad_stable_rank", "grad_rank90_fraction",  # means over recorded steps
    "weight_effective_fraction", "weight_stable_rank", "weight_kept_fraction",
]


def _recording_run() -> FinetuneConfig:
    """Full fine-tuning with AdamW, short: what `welore analyze --gradients` trains by default."""
    return FinetuneConfig(mode="full", optimizer="adamw", steps=20, lr=3e-5, val_tokens=2048)


# The recording run's fields that are options of `welore analyze --gradients`, under these names
# (--data, --grad-steps, ...); their help and checks are FinetuneConfig's.
RUN_OPTIONS = {"data": "data", "steps": "grad_steps", "lr": "grad_lr", "seq_len": "grad_seq_len",
               "batch_size": "grad_batch_size", "val_tokens": "grad_val_tokens"}


@dataclass
class GradientRunConfig:
    """The short full fine-tuning run during which `welore analyze --gradients` records the
    gradients' spectra (`welore.options`); `finetune_config()` is the run itself."""

    run: FinetuneConfig = field(default_factory=_recording_run, metadata={"options": RUN_OPTIONS})  # what trains
    grad_every: int = 1  # record every k-th step

    def __post_init__(self) -> None:
        check_positive(self, ("grad_every",))

    def finetune_config(self) -> FinetuneConfig:
        """The run, on exactly steps × batch_size blocks."""
        return replace(self.run, max_train_tokens=self.run.steps * self.run.batch_size * self.run.seq_len)


def _gradient_matrix(module: nn.Module) -> torch.Tensor | None:
    """The weight gradient as an (out, in) matrix, or None before any backward pass."""
    grad = module.weight.grad
    if grad is None:
        return None
    return grad.t() if isinstance(module, Conv1D) else grad  # Conv1D stores (in, out)


class GradientSpectra:
    """A training callback `(step, model) -> None` recording gradient spectra of target matrices.

    `every`: record every k-th optimizer step (a full spectrum of every matrix per step costs
    about as much as `welore analyze` on the weights).
    """

    def __init__(self, model: nn.Module, targets: list[str] | None = None, every: int = 1) -> None:
        if every < 1:
            raise WeloreError(f"Gradient recording interval {every} must be a positive integer; use e.g. 1.")
        self.targets = find_targets(model, targets)  # raises on a compressed model
        self.every = every
        self.steps: list[dict] = []  # one row per (recorded step, matrix), keys = STEP_COLUMNS

    def __call__(self, step: int, model: nn.Module) -> None:
        if step % self.every:
            return
        grads = {}
        for name, module in self.targets.items():
            grad = _gradient_matrix(module)
            if grad is not None:
                grads[name] = grad.detach().float()
        if not grads:
            log.warning("step %d: no target matrix has a gradient (are they frozen?); nothing recorded", step)
            return
        for name, s in singular_values_many(grads, progress=False).items():
            metrics = spectral_metrics(s)
            self.steps.append({
                "step": step, "name": name, "layer": layer_index(name), "type": matrix_type(name),
                "full_rank": metrics.full_rank, "effective_rank": metrics.effective_rank,
                "stable_rank": metrics.stable_rank, "rank_90": metrics.rank_90,
            })

    def report(
        self, weight_spectra: dict[str, torch.Tensor], plan: RankPlan | None = None, model: str = "model"
    ) -> GradientReport:
        """Relate the recorded gradients to the weights' spectra (and a rank plan's kept ranks)."""
        if not self.steps:
            raise WeloreError("No gradient was recorded; train for at least one step with the target matrices "
                              "trainable.")
        by_name: dict[str, list[dict]] = defaultdict(list)
        for row in self.steps:
            by_name[row["name"]].append(row)
        rows = []
        for name, records in by_name.items():
            full = records[0]["full_rank"]
            weight = spectral_metrics(weight_spectra[name])
            rows.append({
                "name": name, "layer": layer_index(name), "type": matrix_type(name), "full_rank": full,
                "steps": len(records),
                "grad_effective_fraction": _mean(r["effective_rank"] for r in records) / full,
                "grad_stable_rank": _mean(r["stable_rank"] for r in records),
                "grad_rank90_fraction": _mean(r["rank_90"] for r in records) / full,
                "weight_effective_fraction": weight.effective_rank / full,
                "weight_stable_rank": weight.stable_rank,
                "weight_kept_fraction": plan.kept_fraction(name) if plan is not None else None,
            })
        return GradientReport(model=model, rows=rows, steps=list(self.steps), plan=plan)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (ties get their mean rank); nan for fewer than 3 points."""
    if len(x) < 3:
        return float("nan")

    def ranks(v: list[float]) -> torch.Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(t), dtype=torch.float64)
        for value in t.unique():  # average the ranks of ties
            tied = t == value
            r[tied] = r[tied].mean()
        return r

    a, b = ranks(x), ranks(y)
    a, b = a - a.mean(), b - b.mean()
    denominator = (a.norm() * b.norm()).item()
    return float((a @ b).item() / denominator) if denominator > 0 else float("nan")


@dataclass
class GradientReport:
    model: str  # what was trained (the user's spec)
    rows: list[dict]  # one per target matrix, keys = SUMMARY_COLUMNS
    steps: list[dict]  # one per (recorded step, matrix), keys = STEP_COLUMNS
    plan: RankPlan | None = None  # a weight rank plan to compare with, if any
    correlations: dict[str, float] = field(init=False)  # across matrices, see `_correlations`

    def __post_init__(self) -> None:
        self.correlations = self._correlations()

    def _correlations(self) -> dict[str, float]:
        """Spearman correlations across matrices between how low-rank the gradients were and
        how low-rank the weights are (positive = WeLore's observation holds)."""
        grad = [r["grad_effective_fraction"] for r in self.rows]
        result = {"grad_vs_weight_effective_rank": spearman(grad, [r["weight_effective_fraction"] for r in self.rows])}
        if self.plan is not None:
            result["grad_vs_weight_kept_rank"] = spearman(grad, [r["weight_kept_fraction"] for r in self.rows])
        return result

    def by_type(self) -> dict[str, list[dict]]:
        groups: dict[str, list[dict]] = defaultdict(list)
        for row in self.rows:
            groups[row["type"]].append(row)
        return dict(groups)

    def summary(self) -> str:
        steps = sorted({r["step"] for r in self.steps})
        lines = [f"gradient spectra of {len(self.rows)} target matrices in {self.model}, "
                 f"{len(steps)} recorded steps ({steps[0]}..{steps[-1]})", ""]
        header = ["matrix type", "count", "grad eff.rank", "grad stable", "grad r90", "weight eff.rank"]
        header += ["kept"] if self.plan else []
        table = []
        for kind, rows in self.by_type().items():
            cells = [kind, f"{len(rows)}", f"{_mean(r['grad_effective_fraction'] for r in rows):.1%}",
                     f"{_mean(r['grad_stable_rank'] for r in rows):.1f}",
                     f"{_mean(r['grad_rank90_fraction'] for r in rows):.1%}",
                     f"{_mean(r['weight_effective_fraction'] for r in rows):.1%}"]
            if self.plan:
                cells.append(f"{_mean(r['weight_kept_fraction'] for r in rows):.0%}")
            table.append(cells)
        lines.append(format_table(header, table))
        lines.append("(eff.rank and r90 as fractions of full rank, means over layers and recorded steps)")
        lines.append("")
        for key, value in self.correlations.items():
            lines.append(f"Spearman correlation across matrices, {key.replace('_', ' ')}: {value:+.2f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"model": self.model, "correlations": self.correlations, "matrices": self.rows, "steps": self.steps,
                "plan": self.plan.to_dict() if self.plan else None}

    def write(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write per-step and per-matrix tables (CSV, JSON), the summary and plots, atomically."""
        with atomic_dir(out, overwrite=overwrite) as tmp:
            self.write_files(tmp)
        return Path(out)

    def write_files(self, folder: Path) -> None:
        """The files of `write`, into an existing folder (the caller makes it atomic)."""
        folder.mkdir(parents=True, exist_ok=True)
        for path, columns, rows in ((folder / "gradient_steps.csv", STEP_COLUMNS, self.steps),
                                    (folder / "gradient_summary.csv", SUMMARY_COLUMNS, self.rows)):
            write_csv(path, columns, rows)
        write_json(folder / "gradients.json", self.to_dict(), indent=1)
        write_text(folder / "gradient_summary.txt", self.summary() + "\n")
        plot_gradient_ranks(self, folder / "gradient_ranks.png")
        plot_gradient_vs_weight(self, folder / "gradient_vs_weight.png")


# --- figures (matplotlib imported where one is drawn, as in welore.analyze) ----------------------------


def plot_gradient_ranks(report: GradientReport, path: Path) -> None:
    """Gradient effective rank (fraction of full rank) against training step, one line per
    matrix type (mean over layers)."""
    from matplotlib.figure import Figure

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
    save_figure(fig, path)


def plot_gradient_vs_weight(report: GradientReport, path: Path) -> None:
    """One point per target matrix: mean gradient effective rank vs weight effective rank
    (both as fractions of full rank), coloured by matrix type."""
    from matplotlib.figure import Figure

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
    save_figure(fig, path)
