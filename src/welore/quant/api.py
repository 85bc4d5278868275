"""The entry point: quantize a model's target matrices in place, from a `QuantConfig`.

    report = welore.quantize_(model, QuantConfig(bits=3, group_size=64, compensate_rank=32), calibration=windows)

`quantize_` finds the layers (`quant_targets`), collects their calibration statistics when
given text (`_collect_stats`), decides the per-matrix plan (`plan_quantization`: uniform from
the config, or allocated to `target_size` by `welore.quant.allocate`, then checked against the
uniform widths on held-back windows by `_best_plan`), and swaps every planned matrix for a
`QuantizedLinear` (`apply_quant_plan_`, which loading also uses, on empty modules).

**With low rank** (`quant_targets`): on a model already compressed by `welore.compress_`, the
layers quantized are the two factors of every `LowRankLinear` (each an ordinary dense layer of
shape (out, r) or (r, in)) and the target matrices its rank plan kept dense, so W ≈ Q(up)·Q(down):
the parameters removed by low rank and the bits removed by quantization multiply. The rank plan
and the quantization plan are both saved; loading applies the first, then the second.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from welore.errors import WeloreError
from welore.lowrank.module import LowRankLinear
from welore.lowrank.plan import RankPlan
from welore.lowrank.spectrum import _one_thread_per_op
from welore.modules import swap_module
from welore.quant.allocate import _Choices, _error_spectrum, allocate_sizes, uniform_plans
from welore.quant.compensate import _error_matrix, _reference_energy, quantize_layer
from welore.quant.module import FACTOR_DTYPES, QuantizedLinear, check_group_size
from welore.quant.plan import QuantConfig, QuantPlan
from welore.quant.quantizers import quantize_weight
from welore.targets import DENSE_TYPES, _matches, find_targets, kept_dense, matrix_shape, weight_matrix

log = logging.getLogger(__name__)


@dataclass
class QuantReport:
    plan: QuantPlan  # what was decided
    replaced: list[str]  # modules swapped for QuantizedLinear
    dense_bytes: int  # bytes of the target matrices before, in their dtype
    output_error: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> relative calibration output
        # error (quantized, compensated)

    @property
    def nbytes(self) -> int:
        return self.plan.nbytes


def apply_quant_plan_(
    model: nn.Module, plan: QuantPlan, stats: dict | None = None, progress: bool = True, empty: bool = False,
) -> tuple[list[str], dict[str, tuple[float, float]]]:
    """Swap every matrix of the plan for a `QuantizedLinear`; return the names and (with
    `stats`) their relative calibration output errors. `empty=True` builds the modules on the
    meta device without computing anything (to load a saved model's weights into)."""
    modules = dict(model.named_modules())
    errors: dict[str, tuple[float, float]] = {}
    factor_dtype = FACTOR_DTYPES[plan.factor_dtype]
    for name in tqdm(list(plan.shapes), desc="quantizing", disable=not progress or empty):
        dense = modules.get(name)
        if dense is None or not isinstance(dense, DENSE_TYPES) or matrix_shape(dense) != tuple(plan.shapes[name]):
            raise WeloreError(f"The quantization plan expects {name} to be a "
                              f"{plan.shapes[name][0]}x{plan.shapes[name][1]} Linear layer, which it is not here; "
                              "use a plan made for this model.")
        if empty:
            out_features, in_features = plan.shapes[name]
            module = QuantizedLinear(in_features, out_features, plan.bits[name], plan.group_size[name],
                                     plan.ranks[name], bias=dense.bias is not None, device="meta",
                                     dtype=weight_matrix(dense).dtype, factor_dtype=factor_dtype)
        else:
            module, err = quantize_layer(dense, name, plan.bits[name], plan.group_size[name], plan.ranks[name],
                                         plan.quantizer, (stats or {}).get(name), plan.factor_dtype,
                                         plan.compensate_iters)
            if err is not None:
                errors[name] = err
        swap_module(model, name, module)
    log.info("quantized %d target matrices: %.2f MB (%.3f bits per parameter)",
             len(plan.shapes), plan.nbytes / 1e6, plan.bits_per_param)
    return list(plan.shapes), errors


def quant_targets(
    model: nn.Module, patterns: list[str] | None = None, rank_plan: RankPlan | None = None
) -> dict[str, nn.Module]:
    """The dense layers to quantize, name -> layer: the target matrices (`find_targets`), or, on
    a model compressed by low rank, the two factors (`up`, `down`) of every `LowRankLinear` and
    the target matrices its rank plan (`rank_plan`; without one, the decoder blocks' other Linear
    layers) kept dense — with `patterns`, those of the matrices that match one."""
    low_rank = {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    if not low_rank:
        return find_targets(model, patterns)
    if rank_plan is not None:
        matrices = list(rank_plan.ranks)
    else:
        dense = kept_dense(model)
        matrices = [n for n, _ in model.named_modules() if n in low_rank or n in dense]
    names = [n for n in matrices if not patterns or any(_matches(n, p) for p in patterns)]
    if not names:
        raise WeloreError(f"No target matrix of the rank plan matches {patterns}; check --targets.")
    targets = {}
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LowRankLinear):
            targets |= {f"{name}.down": module.down, f"{name}.up": module.up}
        else:
            targets[name] = module
    for name, module in targets.items():
        if not isinstance(module, DENSE_TYPES):
            raise WeloreError(f"{name} is already quantized; quantize the low-rank model before quantizing it again.")
    return targets


def _collect_stats(
    model: nn.Module, targets: dict[str, nn.Module], calibration: torch.Tensor, batch_size: int, progress: bool
) -> dict:
    from welore.lowrank.calibrate import iter_block_stats

    stats = {}
    for _, block_stats in iter_block_stats(model, targets, calibration, batch_size=batch_size, progress=progress):
        for name, s in block_stats.items():
            s.check(name)
            stats[name] = s
    return stats


def plan_quantization(
    model: nn.Module, config: QuantConfig, stats: dict | None = None, progress: bool = True,
    rank_plan: RankPlan | None = None,
) -> QuantPlan:
    """The per-matrix bits and ranks: uniform from the config, or allocated to `target_size`."""
    targets = quant_targets(model, config.targets, rank_plan)
    shapes = {n: matrix_shape(m) for n, m in targets.items()}
    for name, shape in shapes.items():
        check_group_size(shape, config.group_size, name)
    common = dict(shapes=shapes, group_size=dict.fromkeys(shapes, config.group_size), quantizer=config.quantizer,
                  factor_dtype=config.factor_dtype, compensate_iters=config.compensate_iters)
    if config.target_size is None:
        ranks = {n: min(config.compensate_rank, min(s)) for n, s in shapes.items()}
        return QuantPlan(bits=dict.fromkeys(shapes, config.bits), ranks=ranks, **common)
    factor_bytes = torch.tensor([], dtype=FACTOR_DTYPES[config.factor_dtype]).element_size()
    choices = {}
    for name, module in tqdm(targets.items(), desc="error spectra", disable=not progress):
        weight = weight_matrix(module)
        s = (stats or {}).get(name)
        tails = {}
        for bits in config.target_bits:
            q = quantize_weight(weight, bits, config.group_size, config.quantizer, s)
            sigma = _error_spectrum(_error_matrix(weight, q), s)
            energy = sigma.to(torch.float64) ** 2
            tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])  # tail[r] = Σ_{j≥r} σ_j²
            tails[bits] = tail
        choices[name] = _Choices(shape=shapes[name], reference=max(_reference_energy(weight, s), 1e-30), tails=tails)
    bits, ranks = allocate_sizes(choices, config.target_size, config.group_size, config.max_compensate_rank,
                                 factor_bytes)
    return QuantPlan(bits=bits, ranks=ranks, requested_bytes=config.target_size, **common)


def _best_plan(model: nn.Module, plans: dict[str, QuantPlan], stats: dict, held: torch.Tensor, batch_size: int,
               progress: bool) -> tuple[QuantPlan, dict[str, nn.Module], dict[str, tuple[float, float]]]:
    """The plan whose quantized copy of `model` has the lowest perplexity on `held` (every plan's
    score recorded in its meta["selection"]), with that copy's quantized modules and their output
    errors, so the model takes them without quantizing again."""
    from welore.eval.evaluate import perplexity

    scores: dict[str, float] = {}
    best: tuple[str, dict[str, nn.Module], dict] | None = None
    for label, plan in tqdm(plans.items(), desc="size plans", disable=not progress):
        trial = copy.deepcopy(model)
        with _one_thread_per_op():
            _, errors = apply_quant_plan_(trial, plan, stats, progress=False)
        try:
            scores[label], _ = perplexity(trial, held, batch_size=batch_size, progress=False)
        except WeloreError:  # non-finite logits: this plan broke the model
            scores[label] = float("inf")
        log.info("%s (%.3f bits per parameter): held-back perplexity %.3f", label, plan.bits_per_param, scores[label])
        if best is None or scores[label] < scores[best[0]]:
            best = (label, {name: trial.get_submodule(name) for name in plan.shapes}, errors)
        del trial
    assert best is not None, "there is always the allocation to choose"
    chosen, modules, errors = best
    plan = plans[chosen]
    plan.meta["selection"] = {"chosen": chosen, "perplexity": scores, "held_tokens": held.numel(),
                              "bits_per_param": {label: p.bits_per_param for label, p in plans.items()}}
    return plan, modules, errors


def quantize_(
    model: nn.Module, config: QuantConfig, calibration: torch.Tensor | None = None, batch_size: int = 4,
    progress: bool = True, rank_plan: RankPlan | None = None,
) -> QuantReport:
    """The quantize stage (`welore.compress_` runs it from a recipe): quantize the target matrices
    of `model` in place (with compensation and/or a target size); after low rank, `rank_plan`
    says which matrices its plan kept dense (`quant_targets`).

    With `calibration` (a LongTensor (N, T) of token windows, disjoint from evaluation text),
    compensation and the target-size allocation work on the layers' output error on those
    tokens (EoRA); without it, on the weights. The statistics of all targets are held at once
    (one (in, in) float64 matrix per distinct input). With a target size and calibration, the last
    eighth of the windows is held back to choose between the allocation and the uniform widths
    that fit (`welore.quant.allocate`); the statistics come from the other windows.
    """
    from welore.lowrank.select import hold_back

    if calibration is None and (what := config.needs_calibration) is not None:
        raise WeloreError(f"{what} needs calibration text; pass --calib (e.g. --calib wiki) or use --quantizer rtn.")
    targets = quant_targets(model, config.targets, rank_plan)
    if not targets:
        raise WeloreError("No target matrices to quantize; check --targets.")
    dense_bytes = sum(weight_matrix(m).numel() * weight_matrix(m).element_size() for m in targets.values())
    from welore.io.stream import is_streamed

    held = None
    if calibration is not None and config.target_size is not None:
        if is_streamed(model):
            log.warning("The model reads its decoder blocks from disk, so --target-size's allocation is not checked "
                        "against uniform widths (that quantizes copies of the model).")
        else:
            calibration, held = hold_back(calibration, "--target-size")
    with torch.no_grad():
        stats = _collect_stats(model, targets, calibration, batch_size, progress) if calibration is not None else None
        with _one_thread_per_op():  # per-matrix linear algebra: measured far faster on one thread on a shared CPU
            plan = plan_quantization(model, config, stats, progress, rank_plan)
        if held is not None:  # the best of the allocation and the uniform widths, already quantized
            plans = {"allocated": plan, **uniform_plans(plan, config.target_bits, config.max_compensate_rank)}
            plan, modules, errors = _best_plan(model, plans, stats, held, batch_size, progress)
            for name, module in modules.items():
                swap_module(model, name, module)
            replaced = list(plan.shapes)
        else:
            with _one_thread_per_op():
                replaced, errors = apply_quant_plan_(model, plan, stats, progress)
        if calibration is not None:
            plan.meta["calib"] = config.calib
    return QuantReport(plan=plan, replaced=replaced, dense_bytes=dense_bytes, output_error=errors)
