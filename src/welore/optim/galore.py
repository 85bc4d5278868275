"""`GaLoreAdamW`: AdamW whose 2-D parameters are updated in a low-rank gradient subspace.

GaLore (Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", arXiv:2403.03507). For a weight W (m×n) with gradient G in a group with `rank` r,
written for the LEFT side (RIGHT is the transpose: R = G·P, ΔW = N·Pᵀ, see `projection.py`):

    every T steps:  P ← top-r left singular subspace of G        # (m, r), PᵀP = I
    R = Pᵀ·G                                                      # (r, n) low-rank gradient
    M ← β₁·M + (1 − β₁)·R,   V ← β₂·V + (1 − β₂)·R²              # Adam moments, (r, n) each
    N = (M / (1 − β₁ᵗ)) / (√(V / (1 − β₂ᵗ)) + ε)                  # normalised low-rank step
    W ← W·(1 − lr·λ) − lr·scale·P·N                                # decoupled weight decay

so the state costs m·r + 2·n·r numbers instead of AdamW's 2·m·n. The moments are kept across a
projector refresh, as the paper and `galore-torch` do. A matrix whose rank is ≥ min(m, n) would
save nothing and gets plain AdamW, as do all groups without `rank`; the AdamW arithmetic
follows `torch.optim.AdamW` operation by operation, so at full rank and scale 1 the two agree
to float rounding.

Parameter groups take galore-torch's keys, so code written for that package ports by changing
the import:

    rank             r, an integer ≥ 1 (required to project; groups without it get AdamW)
    update_proj_gap  T, steps between projector refreshes (default 200)
    scale            α, multiplies the projected-back update (default 1.0; the paper uses 0.25
                     with a larger lr)
    proj_type        "std" (default: project the smaller side), "reverse_std", "left",
                     "right", "full" — see `ProjType`
    proj_method      how P is refreshed: "subspace" (default, warm-started randomized subspace
                     iteration) or "svd" (a full SVD, as the paper) — see `REFRESH_METHODS`

The projectors, the low-rank moments and the low-rank arithmetic are float32 whatever the
parameter's dtype (a bfloat16 basis is orthonormal only to ~1e-2, and Fira's residual norm
subtracts nearly equal squared norms): a bfloat16 matrix is updated in float32 and rounded once
per step. Matrices trained with plain AdamW keep their moments in the parameter's dtype, as
`torch.optim.AdamW` does.

The optimizer's state holds tensors only (`torch.load(weights_only=True)` works), and the
random vectors of the subspace iteration come from a `torch.Generator` seeded from a per-matrix
seed stored in that state and the step number: results never depend on the global RNG, and a
run resumed from `state_dict()` continues exactly.

Defaults are `torch.optim.AdamW`'s (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01),
so swapping it for `GaLoreAdamW` changes only the projection. galore-torch's own AdamW defaults
to eps 1e-6 and weight_decay 0.0: pass those to reproduce its runs exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch.optim import Optimizer

from welore.errors import WeloreError
from welore.optim.projection import REFRESH_METHODS, ProjSide, ProjType, resolve_side

SEED_STRIDE = 1_000_003  # per-matrix seed × stride + step → the refresh's generator seed
ZERO_GUARD = 1e-8  # keeps norm ratios finite when a norm is zero (Fira's constant)


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype of a projected matrix's state and low-rank arithmetic: at least float32."""
    return torch.promote_types(p.dtype, torch.float32)


class OptimizerConfigError(WeloreError, ValueError):
    """A bad optimizer hyperparameter or parameter group, in one sentence that names the fix.

    A `ValueError`, as torch optimizers raise for bad hyperparameters, and a `WeloreError`, so
    the CLI shows it as one line.
    """


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_adam_hyperparameters(group: dict, where: str) -> None:
    lr, betas, eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if isinstance(lr, torch.Tensor):
        lr = lr.item()
    if not _is_number(lr) or lr < 0:
        raise OptimizerConfigError(f"{where}: lr must be a number ≥ 0, got {lr!r}; pass a non-negative learning rate.")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)):
        raise OptimizerConfigError(f"{where}: betas must be two numbers in [0, 1), got {betas!r}; "
                                   "pass e.g. betas=(0.9, 0.999).")
    if not _is_number(eps) or eps < 0:
        raise OptimizerConfigError(f"{where}: eps must be a number ≥ 0, got {eps!r}; pass e.g. eps=1e-8.")
    if not _is_number(weight_decay) or weight_decay < 0:
        raise OptimizerConfigError(f"{where}: weight_decay must be a number ≥ 0, got {weight_decay!r}; "
                                   "pass 0.0 for none.")


def check_lowrank_group(group: dict, where: str, name: str) -> None:
    """Validate a group that has `rank` (`name` is the optimizer's name, for the messages)."""
    rank, gap, scale = group["rank"], group["update_proj_gap"], group["scale"]
    if not _is_int(rank) or rank < 1:
        raise OptimizerConfigError(
            f"{where}: rank must be an integer ≥ 1, got {rank!r}; pass a positive rank, or leave `rank` out "
            f"of the group to train it with plain AdamW."
        )
    if not _is_int(gap) or gap < 1:
        raise OptimizerConfigError(
            f"{where}: update_proj_gap must be an integer ≥ 1 (steps between projector refreshes), got {gap!r}; "
            f"pass e.g. update_proj_gap=200."
        )
    if not _is_number(scale) or scale <= 0:
        raise OptimizerConfigError(f"{where}: scale must be a number > 0, got {scale!r}; "
                                   "pass e.g. scale=0.25 (or 1.0).")
    proj_type = group["proj_type"]
    if proj_type not in {p.value for p in ProjType}:
        choices = ", ".join(repr(p.value) for p in ProjType)
        raise OptimizerConfigError(f"{where}: unknown proj_type {proj_type!r}; use one of {choices}.")
    method = group["proj_method"]
    if method not in REFRESH_METHODS:
        choices = ", ".join(repr(m) for m in REFRESH_METHODS)
        raise OptimizerConfigError(f"{where}: unknown proj_method {method!r}; use one of {choices}.")
    for j, p in enumerate(group["params"]):
        if p.dim() != 2:
            raise OptimizerConfigError(
                f"{where}: parameter {j} has shape {tuple(p.shape)}, but {name} projects only 2-D matrices; "
                f"put it in a parameter group without `rank` (it will get plain AdamW)."
            )


class GaLoreAdamW(Optimizer):
    """AdamW with GaLore's low-rank gradient projection for the groups that have `rank`."""

    name = "GaLoreAdamW"

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        proj_method: str = "subspace",
        **extra_defaults: Any,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, update_proj_gap=update_proj_gap,
            scale=scale, proj_type=proj_type, proj_method=proj_method, **extra_defaults,
        )
        super().__init__(params, defaults)

    # --- parameter groups -------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (also used by `__init__`), then check its hyperparameters."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"{self.name} parameter group {len(self.param_groups) - 1}"
        try:
            self._check_group(group, where)
        except OptimizerConfigError:  # leave the optimizer as it was
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict[str, Any], where: str) -> None:
        if isinstance(group.get("proj_type"), ProjType):
            group["proj_type"] = group["proj_type"].value  # a plain str keeps state_dict() loadable
        check_adam_hyperparameters(group, where)
        if "rank" in group:
            check_lowrank_group(group, where, self.name)

    @staticmethod
    def side_of(group: dict[str, Any], p: torch.Tensor) -> ProjSide | None:
        """The side projected for `p` in `group`, or None where it gets plain AdamW."""
        if "rank" not in group or p.dim() != 2 or group["rank"] >= min(p.shape):
            return None
        return resolve_side(group["proj_type"], tuple(p.shape))

    # --- state --------------------------------------------------------------------------------

    def _init_state(self, state: dict, p: torch.Tensor, group: dict, side: ProjSide | None, index: int) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)  # on the CPU, as torch.optim.AdamW
        if side is None:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return
        m, n = p.shape
        r = group["rank"]
        moments = {ProjSide.LEFT: (r, n), ProjSide.RIGHT: (m, r), ProjSide.BOTH: (r, r)}[side]  # shaped like R
        state["exp_avg"] = torch.zeros(moments, dtype=state_dtype(p), device=p.device)
        state["exp_avg_sq"] = torch.zeros(moments, dtype=state_dtype(p), device=p.device)
        state["seed"] = torch.tensor(index, dtype=torch.int64)  # the refresh generator's seed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """`Optimizer.load_state_dict`, except that a projected matrix's state keeps its float32.

        torch casts every floating-point state tensor to its parameter's dtype, which would turn
        the float32 projectors and moments of a bfloat16 matrix into bfloat16; they are taken
        again from `state_dict` instead.
        """
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        current = ((g, p) for g in self.param_groups for p in g["params"])
        for saved_id, (group, p) in zip(saved_ids, current, strict=True):
            saved = state_dict["state"].get(saved_id, {})
            if self.side_of(group, p) is None or not saved:
                continue
            state = self.state[p]
            for key, value in saved.items():
                if key != "step" and isinstance(value, torch.Tensor) and value.is_floating_point():
                    state[key] = value.to(device=p.device, dtype=state_dtype(p), copy=True)

    # --- the step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{self.name} does not support sparse gradients; use torch.optim.SparseAdam.")
                state = self.state[p]
                side = self.side_of(group, p)
                if len(state) == 0:
                    self._init_state(state, p, group, side, index)
                state["step"] += 1
                if side is None:
                    self._adamw(p, state, group)
                else:
                    self._lowrank(p, state, group, side)
        return loss

    @staticmethod
    def _moments(state: dict, group: dict, grad: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Update Adam's moments with `grad`; return (m / √v̂ + ε denominator, bias correction 1)."""
        beta1, beta2 = group["betas"]
        t = state["step"].item()
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
        return denom, 1 - beta1**t

    def _adamw(self, p: torch.Tensor, state: dict, group: dict) -> None:
        """Plain AdamW, the same operations as `torch.optim.AdamW`'s single-tensor path."""
        lr = group["lr"]
        if group["weight_decay"] != 0:
            p.mul_(1 - lr * group["weight_decay"])
        denom, bias1 = self._moments(state, group, p.grad)
        p.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)

    def _refresh(self, state: dict, group: dict, key: str, m: torch.Tensor, p: torch.Tensor) -> None:
        """Recompute the projector `state[key]` for the (d, e) matrix `m` (G or Gᵀ)."""
        step = int(state["step"].item())
        generator = torch.Generator(device=m.device)
        generator.manual_seed(int(state["seed"].item()) * SEED_STRIDE + step)
        previous = state.get(key)
        method = REFRESH_METHODS[group["proj_method"]]
        basis = method(m, group["rank"], previous, generator)
        state[key] = basis.to(state_dtype(p))  # (d, r), float32 at least (m is G or Gᵀ in that dtype)

    def _lowrank(self, p: torch.Tensor, state: dict, group: dict, side: ProjSide) -> None:
        decay = 1 - group["lr"] * group["weight_decay"]
        g = p.grad.to(state_dtype(p))  # (m, n), a float32 copy for a bfloat16 matrix
        if (int(state["step"].item()) - 1) % group["update_proj_gap"] == 0:
            # refresh in the left frame: the projected side first (Gᵀ for RIGHT)
            self._refresh(state, group, "proj", g.T if side is ProjSide.RIGHT else g, p)
            if side is ProjSide.BOTH:
                self._refresh(state, group, "proj_right", g.T, p)
        proj = state["proj"]  # (d, r)
        # The low-rank gradient, its Adam step N and W's update, in the matrix's own layout:
        # LEFT R = Pᵀ·G (r, n), ΔW = P·N; RIGHT R = G·P (m, r), ΔW = N·Pᵀ; BOTH R = P_lᵀ·G·P_r (r, r).
        if side is ProjSide.LEFT:
            low = proj.T @ g  # (r, n)
        elif side is ProjSide.RIGHT:
            low = g @ proj  # (m, r)
        else:
            low = proj.T @ g @ state["proj_right"]  # (r, r)
        denom, bias1 = self._moments(state, group, low)
        norm_step = state["exp_avg"].div(denom).div_(bias1)  # Adam-normalised, shaped like `low`
        step, full = self._step_terms(g, side, low, norm_step, state, group)
        # W ← (1 − lr·λ)·W − lr·(back-projected step) in one pass over W (addmm's beta decays W);
        # a bfloat16 W is updated in a float32 copy and rounded once
        lr = group["lr"]
        w = p if p.dtype == g.dtype else p.to(g.dtype)  # (m, n)
        if side is ProjSide.LEFT:
            w.addmm_(proj, step, beta=decay, alpha=-lr)  # (m, r)·(r, n)
        elif side is ProjSide.RIGHT:
            w.addmm_(step, proj.T, beta=decay, alpha=-lr)  # (m, r)·(r, n)
        else:
            w.addmm_(proj @ step, state["proj_right"].T, beta=decay, alpha=-lr)  # (m, r)·(r, n)
        if full is not None:
            w.addcmul_(g, full, value=-lr)  # a per-column or per-row multiple of G itself
        if w is not p:
            p.copy_(w)

    def _step_terms(
        self, g: torch.Tensor, side: ProjSide, low: torch.Tensor, norm_step: torch.Tensor, state: dict, group: dict
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What W moves by (g: the gradient, in the state's dtype), as (low-rank step X, multiplier c or None):
        ΔW = P·X (back-projected like the gradient was projected) + c⊙G. GaLore: X = scale·N, no c. Fira
        overrides this."""
        return norm_step.mul_(group["scale"]), None
