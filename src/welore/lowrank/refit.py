"""Closed-form refit after truncation: fit the factors to the dense layer's outputs on the inputs
the compressed prefix really produces.

A factorizer truncates W (out, in) to up·down from statistics of the inputs the layer sees. Once
the blocks before it are compressed, the layer sees X̂ (tokens, in) instead of the dense model's
X; the error each block adds reaches the next through the residual stream. The refit
(SVD-LLM's paper corrects it with training) asks the compressed layer to reproduce the *dense*
outputs W·xₜ from x̂ₜ, by regularised least squares:

    E(M) = Σₜ ‖M·x̂ₜ − W·xₜ‖² = tr(M·G·Mᵀ) − 2·tr(W·Kᵀ·Mᵀ) + const,
    G = Σₜ x̂ₜ x̂ₜᵀ (in, in),  K = Σₜ x̂ₜ xₜᵀ (in, in)

(`InputStats.xtx` and `InputStats.cross`, accumulated in float64 block by block, no activation
stored). Two modes (`REFITS`):

- `up`: keep `down` (the factorizer's subspace), up = argmin E(up·down) + λ‖up‖²
       = W·Kᵀ·downᵀ·(down·G·downᵀ + λ·I)⁻¹.
- `both`: the regression target M* = W·Kᵀ·(G + λ·I)⁻¹ (the unconstrained minimiser of E, ridge
  λ) is factorized by the same factorizer on the X̂ statistics. With `whiten` and λ = 0 this is
  the exact rank-r minimiser of E (reduced-rank regression: E(M) = ‖(M − M*)·S‖² + const with
  G = S·Sᵀ, Eckart–Young in the whitened norm).

λ is `ridge` × the mean diagonal of the Gram matrix it regularises. Either way the refit is
kept only if it lowers E (the ridge could in principle raise it), so it never increases the
calibration output error. The bias is unchanged: it cancels in M·x̂ + b − (W·x + b).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from welore.errors import WeloreError

if TYPE_CHECKING:
    from welore.lowrank.calibrate import InputStats
    from welore.lowrank.factorize import Factorizer

log = logging.getLogger(__name__)


def output_error(up: torch.Tensor, down: torch.Tensor, weight: torch.Tensor, stats: InputStats) -> float:
    """E(up·down) minus its constant, tr(M·G·Mᵀ) − 2·tr(W·Kᵀ·Mᵀ), float64 (M never formed)."""
    g = down @ stats.xtx @ down.T  # (r, r)
    cross = weight @ stats.cross.T @ down.T  # (out, r): W·Kᵀ·downᵀ
    return ((up @ g) * up).sum().item() - 2 * (cross * up).sum().item()


def _ridge(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """gram + ridge·mean(diag(gram))·I."""
    scale = ridge * gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)
    return gram + scale * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


def _solve_right(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """b·a⁻¹ for a symmetric positive (semi-)definite a (k, k) and b (m, k)."""
    factor, info = torch.linalg.cholesky_ex(a)
    if info.item() == 0:
        return torch.cholesky_solve(b.T, factor).T
    return torch.linalg.lstsq(a, b.T).solution.T  # singular (ridge 0, dead channels): least norm


def _refit_up(weight, up, down, stats, factorizer, ridge):
    """up = W·Kᵀ·downᵀ·(down·G·downᵀ + λI)⁻¹, down kept."""
    g = down @ stats.xtx @ down.T  # (r, r)
    cross = weight @ stats.cross.T @ down.T  # (out, r)
    return _solve_right(cross, _ridge(g, ridge)), down


def _refit_both(weight, up, down, stats, factorizer, ridge):
    """The factorizer's truncation of M* = W·Kᵀ·(G + λI)⁻¹ on the same statistics."""
    target = _solve_right(weight @ stats.cross.T, _ridge(stats.xtx, ridge))  # (out, in)
    new_up, new_down = factorizer.factors(target, up.shape[1], stats)
    return new_up.to(torch.float64), new_down.to(torch.float64)


REFITS: dict[str, Callable] = {"up": _refit_up, "both": _refit_both}


@dataclass(frozen=True)
class Refit:
    """How the factors are refitted after truncation (`compress --refit MODE`)."""

    mode: str  # up: refit the up factor only; both: refactorize the least-squares target (up and down)
    ridge: float = 1e-3  # λ = ridge × mean diagonal of the Gram matrix being inverted

    def __post_init__(self) -> None:
        if self.mode not in REFITS:
            raise WeloreError(f"Unknown refit mode {self.mode!r}; choose one of {', '.join(sorted(REFITS))}.")
        if not 0 <= self.ridge < float("inf"):
            raise WeloreError(f"--refit-ridge {self.ridge} must be a non-negative number; use e.g. 1e-3.")

    def __call__(
        self, weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, stats: InputStats, factorizer: Factorizer,
        name: str = "",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Refitted (up (out, r), down (r, in)) float32, or the given factors if the refit does not
        lower the calibration output error."""
        if stats.cross is None:
            raise WeloreError(f"The refit of {name} needs the dense model's inputs beside the compressed ones; "
                              "gather the statistics with iter_block_stats(..., paired=True).")
        device = stats.xtx.device
        w = weight.detach().to(device, torch.float64)  # (out, in)
        up64, down64 = up.to(device, torch.float64), down.to(device, torch.float64)  # (out, r), (r, in)
        new_up, new_down = REFITS[self.mode](w, up64, down64, stats, factorizer, self.ridge)
        before = output_error(up64, down64, w, stats)
        after = output_error(new_up, new_down, w, stats)
        if not after < before:
            log.info("refit of %s kept the factorizer's factors (output error %.4g -> %.4g)", name, before, after)
            return up, down
        log.debug("refit of %s: output error (less its constant) %.4g -> %.4g", name, before, after)
        return new_up.to(up.device, torch.float32), new_down.to(down.device, torch.float32)
