"""The quantizers: how the b-bit codes of one matrix are chosen, on a min/max grid per group.

    q = quantize_weight(weight, bits=3, group_size=64, quantizer="gptq", stats=stats)  # a QuantizedWeight

Each quantizer is a small strategy object in the registry `QUANTIZERS` (name -> `Quantizer`),
which says whether it needs the layer's calibration statistics (`needs_stats`):

- `rtn`: asymmetric round-to-nearest on each group's min/max grid;
- `hqq`: adds HQQ's half-quadratic optimisation of the zero points (Badri & Shaji 2023),
  calibration-free. Both run through the HQQ library's `Quantizer.quantize`;
- `gptq`: data-aware, GPTQ's column-by-column rounding with the error spread through the
  calibration inputs' inverse Hessian, on the same min/max grid (`GPTQ.quantize` says why it is
  written here).

**Why HQQ** — measured by `benchmarks/quant_backends.py` on four SmolLM2 matrices with their
real inputs (docs/benchmarks.md, "Quantization backends"): torchao 0.18's
`IntxWeightOnlyConfig` on CPU keeps every 2/3/4-bit code in an int8 (9.25 stored bits per
parameter at any width) and cannot use a group of 128 on 576-wide rows; optimum-quanto 0.2.7
has no 3-bit type, only symmetric per-channel int8 and group sizes that divide the row; HQQ
0.2.8 quantizes 8/4/3/2 bits at any group size on CPU, its RTN matches a plain reference to
1e-7, and its optimiser lowers the output error further (3-bit, groups of 64: 0.228 → 0.222).
HQQ's own packing and float32 scales are not kept: the codes are repacked by
`welore.quant.module` (its docstring says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from welore.errors import WeloreError
from welore.quant.module import BITS, SCALE_DTYPE, QuantizedWeight, check_group_size, pack_codes

GPTQ_DAMPING = 0.01  # λ: GPTQ inverts XᵀX/N + λ·mean(diag)·I (the GPTQ paper's 1% dampening)
GPTQ_BLOCK = 128  # columns updated together before the rest of the matrix gets their error (lazy batch updates)


class Quantizer(Protocol):
    """How the codes of one (out, in) matrix are chosen."""

    needs_stats: bool  # whether `quantize` needs the layer's calibration statistics (XᵀX)

    def quantize(self, weight: torch.Tensor, bits: int, group_size: int, stats) -> QuantizedWeight:
        """Packed `bits`-bit codes of `weight` in groups of `group_size`; `stats` is the layer's
        InputStats, or None without calibration."""
        ...


@dataclass(frozen=True)
class HQQGrid:
    """Each group's min/max grid through HQQ's `Quantizer.quantize`: round to nearest, or with
    `optimize` HQQ's half-quadratic optimisation of the zero points. Calibration-free."""

    optimize: bool  # False: round to nearest on the min/max grid; True: + HQQ's zero-point optimisation
    needs_stats: bool = field(default=False, init=False)

    def quantize(self, weight: torch.Tensor, bits: int, group_size: int, stats=None) -> QuantizedWeight:
        from hqq.core import quantize as hqq

        w = weight.detach().to(torch.float32).cpu()  # (out, in)
        codes, meta = hqq.Quantizer.quantize(
            w, nbits=bits, group_size=group_size, optimize=self.optimize, axis=1, bitpack=False,
            compute_dtype=torch.float32, device="cpu",
        )  # codes (groups, g) float in [0, 2^b); Ŵ = (q − zero)·scale per group
        scale = meta["scale"].reshape(-1)  # (groups,)
        offset = -meta["zero"].reshape(-1) * scale  # (groups,): Ŵ = q·scale + offset
        return QuantizedWeight(
            codes=pack_codes(codes.reshape(-1).to(torch.uint8), bits),
            scale=scale.to(SCALE_DTYPE), offset=offset.to(SCALE_DTYPE),
            bits=bits, group_size=group_size, shape=(w.shape[0], w.shape[1]),
        )


@dataclass(frozen=True)
class GPTQ:
    """GPTQ's error feedback through the calibration inputs' inverse Hessian, on the min/max grid."""

    needs_stats: bool = field(default=True, init=False)

    def quantize(self, weight: torch.Tensor, bits: int, group_size: int, stats) -> QuantizedWeight:
        """GPTQ (Frantar et al., ICLR 2023) on welore's grid: the columns of W are quantized one at a
        time, left to right, and each column's rounding error is spread over the columns not yet
        quantized through the inverse Hessian H⁻¹ of the layer's output error, H = XᵀX/N, so the
        calibration outputs, not the weights, stay close. Each group's min/max grid is set when its
        first column is reached, from the weights as the earlier errors have updated them, and its
        float16 scale and offset are the ones stored (codes and stored grid agree exactly). With a
        diagonal H no error crosses columns and the result is round-to-nearest on that grid.

        Written here rather than taken from GPTQModel or llm-compressor: both run GPTQ only as their
        own whole-model pipeline into their own packed formats (llm-compressor 0.14 also pins
        transformers ≤ 5.17 and pulls auto-round and datasets), while welore needs it as a function of
        one matrix and its statistics, inside the compensation rounds and the target-size allocation."""
        if stats is None:
            raise WeloreError("The gptq quantizer needs calibration text; add --calib (e.g. --calib wiki) or "
                              "use --quantizer rtn.")
        out_features, in_features = weight.shape
        if in_features % group_size:
            raise WeloreError(f"GPTQ keeps each group within a row, and group size {group_size} does not divide "
                              f"the {in_features}-long rows of a {out_features}x{in_features} matrix; use a group size "
                              "that does, e.g. 64.")
        levels = 2**bits - 1
        w = weight.detach().to("cpu", torch.float64).clone()  # (out, in), updated as columns are quantized
        h = stats.xtx.to("cpu", torch.float64) / max(stats.tokens, 1)  # (in, in)
        dead = h.diagonal() == 0  # inputs that never fire: any value there is free; quantize zeros
        h.diagonal()[dead] = 1.0
        w[:, dead] = 0.0
        h.diagonal().add_(GPTQ_DAMPING * h.diagonal().mean())
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # H⁻¹ = Uᵀ·U
        codes = torch.empty(out_features, in_features, dtype=torch.uint8)
        scale = torch.empty(out_features, in_features // group_size, dtype=SCALE_DTYPE)
        offset = torch.empty_like(scale)
        block = group_size * max(1, GPTQ_BLOCK // group_size)  # whole groups, so a group's grid sees updated weights
        for start in range(0, in_features, block):
            end = min(start + block, in_features)
            w1, u1 = w[:, start:end], u[start:end, start:end]  # (out, B), (B, B)
            errors = torch.empty_like(w1)  # (out, B): each column's scaled rounding error
            for j in range(end - start):
                column = start + j
                if column % group_size == 0:
                    group = w1[:, j : j + group_size]  # (out, g)
                    lo, hi = group.min(dim=1).values, group.max(dim=1).values  # (out,)
                    k = column // group_size
                    stored = ((hi - lo) / levels).to(SCALE_DTYPE)
                    scale[:, k] = torch.where(stored > 0, stored, torch.ones_like(stored))  # a constant group: codes 0
                    offset[:, k] = lo.to(SCALE_DTYPE)
                    step, base = scale[:, k].to(torch.float64), offset[:, k].to(torch.float64)  # the stored grid
                q = ((w1[:, j] - base) / step).round_().clamp_(0, levels)  # (out,)
                codes[:, column] = q.to(torch.uint8)
                errors[:, j] = (w1[:, j] - (q * step + base)) / u1[j, j]
                w1[:, j + 1 :] -= errors[:, j : j + 1] * u1[j : j + 1, j + 1 :]
            w[:, end:] -= errors @ u[start:end, end:]
        return QuantizedWeight(codes=pack_codes(codes.reshape(-1), bits), scale=scale.reshape(-1),
                               offset=offset.reshape(-1), bits=bits, group_size=group_size,
                               shape=(out_features, in_features))


QUANTIZERS: dict[str, Quantizer] = {
    "rtn": HQQGrid(optimize=False),  # min/max grid, round to nearest
    "hqq": HQQGrid(optimize=True),  # + HQQ zero-point optimisation
    "gptq": GPTQ(),  # min/max grid, errors spread by the calibration inputs' inverse Hessian
}


def quantize_weight(
    weight: torch.Tensor, bits: int, group_size: int, quantizer: str = "rtn", stats=None,
) -> QuantizedWeight:
    """Quantize an (out, in) matrix to packed `bits`-bit codes in groups of `group_size`; `stats`
    (the layer's InputStats) is what a data-aware quantizer (gptq) minimises the output error on."""
    if bits not in BITS:
        raise WeloreError(f"Cannot quantize to {bits} bits; choose one of {', '.join(map(str, BITS))}.")
    if quantizer not in QUANTIZERS:
        raise WeloreError(f"Unknown quantizer {quantizer!r}; choose one of {', '.join(QUANTIZERS)}.")
    check_group_size(tuple(weight.shape), group_size)
    return QUANTIZERS[quantizer].quantize(weight, bits, group_size, stats)

