"""`FiraAdamW`: GaLore plus the gradient outside the subspace, rescaled and norm-limited.

Fira (Chen et al., 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
Constraint?", arXiv:2410.01623). GaLore throws away the residual G − P·Pᵀ·G; Fira applies it too,
with two corrections. Written for a LEFT projection (R = Pᵀ·G of shape (r, n), N the
Adam-normalised, bias-corrected low-rank step of `galore.py`):

    φ_j = ‖N[:, j]‖ / (‖R[:, j]‖ + 1e-8)            # norm-based scaling, one factor per column j
                                                    #   of the low-rank space, norms taken along
                                                    #   the projected dimension (r)
    S_t = (G − P·R) · diag(φ)                        # (m, n) scaled residual
    if ‖S_t‖ / (‖S_{t−1}‖ + 1e-8) > γ:               # norm-growth limiter, γ = `limiter` ≈ 1.01
        S_t ← S_t · γ·(‖S_{t−1}‖ + 1e-8) / ‖S_t‖
    W ← W·(1 − lr·λ) − lr·scale·P·N − lr·S_t

‖S_{t−1}‖ is the norm *after* limiting (kept in the state as `residual_norm`; nothing limits the
first step). For a RIGHT projection (R = G·P, shape (m, r)) everything is transposed: one φ per
row of G, norms along dim 1 — always the dimension that is not projected, as in the authors' code.

The step is computed without forming the (m, n) residual: with c = φ·(limiter's shrink),
scale·P·N + S_t = P·(scale·N − c⊙R) + c⊙G, and before limiting
‖S_t‖² = Σ_j φ_j²·(‖G[:, j]‖² − ‖R[:, j]‖²) since PᵀP = I. So a Fira step costs GaLore's two
matrix products plus two passes over G, not a third product (exact up to float rounding; the
norm loses relative accuracy only where the residual holds less than ~1e-6 of a column's energy).

Two choices where the public code and the paper differ: the residual here is exactly
G − P·Pᵀ·G, as the paper writes it (the authors' code subtracts the *scaled* back-projection
α·P·Pᵀ·G, the same thing only at α = 1), and, as in their code, `scale` multiplies the low-rank
term only. Fira needs a one-sided projection: `proj_type="full"` is refused.

Group keys are GaLore's (`rank`, `update_proj_gap`, `scale`, `proj_type`, `proj_method`) plus
`limiter` (γ, default 1.01). Fira's code calls the scale `alpha`: a group may pass `alpha`
instead of `scale` (it is stored as `scale`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from welore.optim.galore import (
    ZERO_GUARD,
    GaLoreAdamW,
    OptimizerConfigError,
    _is_number,
    state_dtype,
)
from welore.optim.projection import ProjSide


def squared_norms(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Squared 2-norms along `dim` (kept), by the reduction that is fast for x's memory layout."""
    if x.stride(dim) == 1:  # contiguous along dim: vector_norm streams it without a temporary
        return torch.linalg.vector_norm(x, dim=dim, keepdim=True).square_()
    return (x * x).sum(dim=dim, keepdim=True)  # strided: vector_norm is ~5× slower than this


class FiraAdamW(GaLoreAdamW):
    """GaLoreAdamW plus Fira's scaled, norm-limited residual for the projected matrices."""

    name = "FiraAdamW"

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], *args: Any, limiter: float = 1.01,
                 **kwargs: Any) -> None:
        """GaLoreAdamW's arguments (lr, betas, eps, weight_decay, update_proj_gap, scale,
        proj_type, proj_method), plus `limiter`: the residual's norm may grow at most this
        factor per step (Fira's γ)."""
        super().__init__(params, *args, limiter=limiter, **kwargs)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "alpha" in param_group:  # Fira's name for the scale: store it under galore-torch's key
            param_group = dict(param_group)
            alpha = param_group.pop("alpha")
            if "scale" in param_group and param_group["scale"] != alpha:
                raise OptimizerConfigError(
                    f"FiraAdamW parameter group {len(self.param_groups)} sets both alpha={alpha!r} and "
                    f"scale={param_group['scale']!r}, which are the same setting; pass only one."
                )
            param_group["scale"] = alpha
        super().add_param_group(param_group)

    def _check_group(self, group: dict[str, Any], where: str) -> None:
        super()._check_group(group, where)
        gamma = group["limiter"]
        if not _is_number(gamma) or gamma < 1:
            raise OptimizerConfigError(
                f"{where}: limiter must be a number ≥ 1 (the largest growth of the residual's norm from one step "
                f"to the next), got {gamma!r}; pass e.g. limiter=1.01."
            )
        if "rank" in group and group["proj_type"] == "full":
            raise OptimizerConfigError(
                f"{where}: Fira scales the residual per column of a one-sided projection, so proj_type 'full' "
                f"is not supported; use 'std', 'reverse_std', 'left' or 'right'."
            )

    def _init_state(self, state: dict, p: torch.Tensor, group: dict, side, index: int) -> None:
        super()._init_state(state, p, group, side, index)
        if side is not None:
            # ‖S_{t−1}‖; infinity = no previous step, so the first step is not limited
            state["residual_norm"] = torch.tensor(float("inf"), dtype=state_dtype(p), device=p.device)

    def _step_terms(
        self, g: torch.Tensor, side: ProjSide, low: torch.Tensor, norm_step: torch.Tensor, state: dict, group: dict
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # LEFT: R (r, n), φ per column (1, n), norms over dim 0; RIGHT: R (m, r), φ per row (m, 1).
        # g (m, n) is the gradient in float32 (at least), as are R, N and the state.
        along = 0 if side is ProjSide.LEFT else 1
        low_sq = low.square().sum(dim=along, keepdim=True)  # ‖R_j‖²
        phi = norm_step.norm(dim=along, keepdim=True) / (low_sq.sqrt() + ZERO_GUARD)  # (1, n) or (m, 1)
        # ‖S_t‖ without forming G − P·R: with PᵀP = I, ‖G_j − (P·R)_j‖² = ‖G_j‖² − ‖R_j‖² (Pythagoras)
        g_sq = squared_norms(g, along)  # ‖G_j‖²
        residual_sq = (g_sq - low_sq).clamp_(min=0)
        norm = (phi.square() * residual_sq).sum().sqrt()  # ‖S_t‖ before limiting
        previous = state["residual_norm"]
        gamma = group["limiter"]
        # shrink = 1 while the norm grows by at most γ, else brings it down to γ·(‖S_{t−1}‖ + 1e-8)
        shrink = gamma / torch.clamp(norm / (previous + ZERO_GUARD), min=gamma)
        previous.copy_(norm * shrink)
        c = phi.mul_(shrink)  # the residual's multiplier per column (row)
        # scale·P·N + c⊙(G − P·R) = P·(scale·N − c⊙R) + c⊙G: one back-projection, no (m, n) residual
        # (for RIGHT read N·Pᵀ and R·Pᵀ; c⊙R scales R's columns (LEFT) or rows (RIGHT) like G's)
        return norm_step.mul_(group["scale"]).sub_(low * c), c
