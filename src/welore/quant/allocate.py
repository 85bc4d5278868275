"""Quantization to any size (`target_size` in bytes): a bit width and a compensation rank per matrix.

Every matrix gets a bit width and a compensation rank so that codes + scales + offsets +
factors of all target matrices fit the budget: the error of each choice is known from the
singular values of E (or E·S) (`_error_spectrum`), and one Lagrange multiplier λ picks, for
every matrix, the choice minimising relative error + λ·bytes; λ is bisected to the budget and
the bytes left over are spent on compensation ranks where they lower the error most
(`allocate_sizes`).

That error proxy (summed relative output error) does not see what a choice costs the loss, so
with calibration text the allocation is then checked against every uniform width whose codes
fit the budget, each with the largest uniform compensation rank that keeps it within the
budget (`uniform_plans`): the calibration windows' last eighth is held back from the
statistics, every plan quantizes a copy of the model, and the plan with the lowest perplexity
on the held-back windows is kept (`welore.quant.api._best_plan`; `QuantPlan.meta["selection"]`
records the scores). So a size target is never worse, on text the statistics did not see, than
a uniform width of no more bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from welore.errors import WeloreError
from welore.lowrank.factorize import FACTORIZERS
from welore.quant.module import FACTOR_DTYPES, matrix_bytes
from welore.quant.plan import QuantPlan


def _error_spectrum(error: torch.Tensor, stats) -> torch.Tensor:
    """σ (descending) of E·S (or E): σ_j² is what component j adds to the squared output (or weight) error."""
    if stats is not None:
        return FACTORIZERS["whiten"].spectrum(error, stats)
    return FACTORIZERS["svd"].spectrum(error)


@dataclass
class _Choices:
    """One matrix's options for the target-size allocation."""

    shape: tuple[int, int]
    reference: float  # ‖W·S‖²
    tails: dict[int, torch.Tensor]  # bits -> (k+1,) float64: squared error left after rank 0..k


def allocate_sizes(
    choices: dict[str, _Choices], budget: int, group_size: int, max_rank: int, factor_bytes: int
) -> tuple[dict[str, int], dict[str, int]]:
    """Per-matrix (bits, rank) minimising Σ relative error subject to Σ bytes ≤ budget.

    For a multiplier λ every matrix takes the option of least error/reference + λ·bytes (the
    Lagrangian splits per matrix); the bytes spent fall as λ grows, so bisection finds the
    smallest λ that fits. Left-over bytes then buy compensation ranks, best error drop per byte
    first, until no rank fits.
    """

    names = list(choices)
    rows_bytes, rows_err, rows_opt = [], [], []
    for name in names:
        c = choices[name]
        m, n = c.shape
        costs, errs, opts = [], [], []
        for bits, tail in c.tails.items():
            top = min(max_rank, len(tail) - 1)
            base = matrix_bytes(c.shape, bits, group_size, 0, factor_bytes)
            costs.append(base + torch.arange(top + 1, dtype=torch.float64) * (m + n) * factor_bytes)
            errs.append(tail[: top + 1] / c.reference)
            opts += [(bits, r) for r in range(top + 1)]
        rows_bytes.append(torch.cat(costs))
        rows_err.append(torch.cat(errs))
        rows_opt.append(opts)
    width = max(len(o) for o in rows_opt)
    cost = torch.full((len(names), width), float("inf"), dtype=torch.float64)  # (matrices, options) bytes
    err = torch.zeros(len(names), width, dtype=torch.float64)  # relative squared error of each option
    for i, (c, e) in enumerate(zip(rows_bytes, rows_err, strict=True)):
        cost[i, : len(c)], err[i, : len(e)] = c, e

    def pick(lam: float) -> torch.Tensor:
        return (err + lam * cost).argmin(dim=1)  # (matrices,) chosen option of each

    def spent(sel: torch.Tensor) -> int:
        return int(cost.gather(1, sel[:, None]).sum())

    cheapest = int(cost.min(dim=1).values.sum())
    if cheapest > budget:
        raise WeloreError(
            f"The target size {budget / 1e6:.3f} MB is below the smallest reachable, {cheapest / 1e6:.3f} MB "
            f"({min(b for c in choices.values() for b in c.tails)} bits everywhere, groups of {group_size}); "
            "ask for more, or use larger groups."
        )
    dearest = int(cost.where(cost.isfinite(), 0).max(dim=1).values.sum())
    if dearest < 0.99 * budget:
        raise WeloreError(
            f"The target size {budget / 1e6:.3f} MB is more than the largest this quantization stores, "
            f"{dearest / 1e6:.3f} MB ({max(b for c in choices.values() for b in c.tails)} bits and compensation rank "
            f"{max_rank} everywhere); ask for less, or keep the model dense."
        )
    lo, hi = 0.0, 1.0 / budget
    while spent(pick(hi)) > budget:
        hi *= 4
    for _ in range(80):
        mid = (lo + hi) / 2
        if spent(pick(mid)) > budget:
            lo = mid
        else:
            hi = mid
    chosen = pick(hi).tolist()
    left = budget - spent(pick(hi))
    bits = {n: rows_opt[i][chosen[i]][0] for i, n in enumerate(names)}
    ranks = {n: rows_opt[i][chosen[i]][1] for i, n in enumerate(names)}
    # Spend what is left on single ranks, best error drop per byte first.
    while True:
        best, best_gain = None, 0.0
        for n, c in choices.items():
            r, tail = ranks[n], c.tails[bits[n]]
            cost = sum(c.shape) * factor_bytes
            if r < min(max_rank, len(tail) - 1) and cost <= left:
                gain = float(tail[r] - tail[r + 1]) / c.reference / cost
                if gain > best_gain:
                    best, best_gain = n, gain
        if best is None:
            break
        ranks[best] += 1
        left -= sum(choices[best].shape) * factor_bytes
    return bits, ranks


def uniform_plans(plan: QuantPlan, target_bits: tuple[int, ...], max_rank: int) -> dict[str, QuantPlan]:
    """{"int3+r6": plan, ...}: for every width in `target_bits` whose codes fit `plan.requested_bytes`,
    every matrix at that width with the largest compensation rank r (at most `max_rank`, capped by
    each matrix's smaller side) that keeps the whole within the budget; the bytes left over give
    rank r+1 to as many matrices as they pay for, in model order, so the budget is spent."""
    budget = plan.requested_bytes
    assert budget is not None, "uniform plans are the alternatives of a size target"
    factor_bytes = torch.tensor([], dtype=FACTOR_DTYPES[plan.factor_dtype]).element_size()

    def at(bits: int, rank: int) -> QuantPlan:
        ranks = {n: min(rank, min(shape)) for n, shape in plan.shapes.items()}
        return replace(plan, bits=dict.fromkeys(plan.shapes, bits), ranks=ranks, meta={})

    plans = {}
    for bits in sorted(target_bits, reverse=True):
        if at(bits, 0).nbytes > budget:
            continue
        low, high = 0, min(max_rank, max(min(shape) for shape in plan.shapes.values()))
        while low < high:  # the largest rank within the budget (bytes grow with the rank)
            mid = (low + high + 1) // 2
            low, high = (mid, high) if at(bits, mid).nbytes <= budget else (low, mid - 1)
        uniform = at(bits, low)
        left = budget - uniform.nbytes
        for name, (m, n) in uniform.shapes.items():
            cost = (m + n) * factor_bytes  # one more rank of factors
            if uniform.ranks[name] < min(max_rank, m, n) and cost <= left:
                uniform.ranks[name], left = uniform.ranks[name] + 1, left - cost
        plans[f"int{bits}+r{low}"] = uniform
    return plans
