"""Low-rank compensation of the quantization error: EoRA, and its alternation with the codes.

    module, errors = quantize_layer(linear, name, bits=3, group_size=64, rank=32, stats=stats)

With `compensate_rank` r (EoRA, Liu et al. 2024) the quantization error E = W − Ŵ is
approximated by a rank-r product up·down. Without calibration it is the truncated SVD of E
(best in weight space, Eckart–Young); with calibration statistics XᵀX = S·Sᵀ it is the truncated
SVD of E·S mapped back by S⁻¹ — `welore.lowrank.factorize`'s `whiten` factorizer applied to E — which
minimises the error of the layer's outputs on the calibration text, ‖(E − up·down)·Xᵀ‖_F, so
compensation never increases it. With `compensate_iters` k > 1 the codes and the factors
alternate (LQ-LoRA, Guo et al. 2023; CALDERA, Saha et al. 2024): Ŵ ← Q(W − up·down), then
up·down refitted to W − Ŵ, k rounds in all; the round with the least (output, else weight)
error is kept, so it is never worse than EoRA's single round.
"""

from __future__ import annotations

import torch
from torch import nn

from welore.errors import WeloreError
from welore.lowrank.factorize import FACTORIZERS, balance_factors, svd_factors, whitening
from welore.lowrank.spectrum import check_finite
from welore.quant.module import FACTOR_DTYPES, QuantizedLinear, QuantizedWeight
from welore.quant.quantizers import quantize_weight
from welore.targets import weight_matrix


def _error_matrix(weight: torch.Tensor, q: QuantizedWeight) -> torch.Tensor:
    """E = W − Ŵ (out, in) float64."""
    return weight.detach().to(torch.float64).cpu() - q.dequantize(torch.float64)


def _compensation(error: torch.Tensor, rank: int, stats) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors (up (out, r), down (r, in), float32) of E: the truncated SVD of E·S mapped
    back by S⁻¹ with the calibration statistics' whitening S (EoRA: `welore.lowrank.factorize`'s
    `whiten` factorizer applied to E), else the truncated SVD of E itself; balanced as
    `welore.lowrank.compress` stores its factors, so fine-tuning moves both sides alike."""
    if stats is not None:
        return balance_factors(*FACTORIZERS["whiten"].factors(error, rank, stats))
    return svd_factors(error, rank)


def _reference_energy(weight: torch.Tensor, stats) -> float:
    """‖W·S‖² (or ‖W‖²): the scale relative errors are measured against."""
    if stats is None:
        return float(weight.detach().to(torch.float64).pow(2).sum())
    root = whitening(stats).root
    return float((weight.detach().to(root.device, torch.float64) @ root).pow(2).sum())


def _product(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """up·down (out, in) in float64 on the CPU, where the quantization errors live."""
    return up.to("cpu", torch.float64) @ down.to("cpu", torch.float64)


def _output_norm(error: torch.Tensor, stats) -> float:
    """‖E·S‖ with the calibration statistics (the layer's output error on them), else ‖E‖."""
    if stats is None:
        return float(error.norm())
    root = whitening(stats).root  # (in, in)
    return float((error.to(root.device) @ root).norm())


def _compensate(
    name: str, weight: torch.Tensor, q: QuantizedWeight, error: torch.Tensor, rank: int, stats, dtype: torch.dtype,
    quantizer: str, iters: int,
) -> tuple[float, QuantizedWeight, torch.Tensor, torch.Tensor]:
    """‖W − Ŵ − up·down‖ (as `_output_norm` measures it), the codes and the rank-r factors
    (stored dtype). Round 1 is EoRA: Ŵ = Q(W), up·down fitted to W − Ŵ. Each further round
    (LQ-LoRA / CALDERA's alternation) quantizes what the factors leave, Ŵ = Q(W − up·down), and
    refits the factors to W − Ŵ; the round with the least error (on the calibration outputs with
    `stats`, else on the weights) is kept, so more rounds never do worse than EoRA."""
    def fit(q: QuantizedWeight, error: torch.Tensor) -> tuple[float, QuantizedWeight, torch.Tensor, torch.Tensor]:
        up, down = (f.to(dtype) for f in _compensation(error, rank, stats))
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise WeloreError(f"The compensation factors of {name} overflow {dtype}; use --factor-dtype float32.")
        residual = _output_norm(error - _product(up, down), stats) if iters > 1 or stats is not None else 0.0
        return residual, q, up, down

    best = latest = fit(q, error)
    for _ in range(iters - 1):
        _, q, up, down = latest
        q = quantize_weight((weight.detach().to(torch.float64).cpu() - _product(up, down)).to(torch.float32),
                            q.bits, q.group_size, quantizer, stats)
        latest = fit(q, _error_matrix(weight, q))
        best = min(best, latest, key=lambda candidate: candidate[0])
    return best


def quantize_layer(
    dense: nn.Module, name: str, bits: int, group_size: int, rank: int = 0, quantizer: str = "rtn",
    stats=None, factor_dtype: str = "float16", iters: int = 1,
) -> tuple[QuantizedLinear, tuple[float, float] | None]:
    """Quantize one dense layer (and compensate its error at `rank`, alternating `iters` rounds);
    with `stats`, also return its relative calibration output error before and after compensation."""
    weight = weight_matrix(dense)
    check_finite(name, weight)
    q = quantize_weight(weight, bits, group_size, quantizer, stats)
    up = down = None
    errors = None
    dtype = FACTOR_DTYPES[factor_dtype]
    if rank or stats is not None:
        error = _error_matrix(weight, q)  # (out, in)
    if rank:
        residual, q, up, down = _compensate(name, weight, q, error, rank, stats, dtype, quantizer, iters)
    if stats is not None:
        reference = _reference_energy(weight, stats) ** 0.5
        before = _output_norm(error, stats) / reference
        errors = (before, residual / reference if rank else before)
    bias = dense.bias.detach() if dense.bias is not None else None
    module = QuantizedLinear.from_quantized(q, bias, up, down, factor_dtype=dtype, dtype=weight.dtype)
    return module.to(weight.device), errors
