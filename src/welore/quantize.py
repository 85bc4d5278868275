"""Weight-only quantization of the target matrices, with low-rank compensation of its error.

    report = welore.quantize_(model, QuantConfig(bits=3, group_size=64, compensate_rank=32), calibration=windows)

Every target matrix W (out, in) becomes a `QuantizedLinear` holding

    codes   (out·in·bits/8,) uint8  b-bit codes, bit-packed: 8 codes in `bits` bytes (little-endian)
    scale   (groups,) float16       step of each group of `group_size` consecutive weights of a row
    offset  (groups,) float16       the value code 0 stands for (the group's zero point, as GGUF Q4_1's min)
    up, down (out, r), (r, in)      optional compensation factors, float16 by default

and computes y = x·Ŵᵀ + (x·downᵀ)·upᵀ + b with Ŵ = scale·q + offset dequantized on the fly.
Groups are runs of `group_size` consecutive weights in row-major order: along each row when
the row length is a multiple of the group size (otherwise a group continues on the next row).

**Quantizers** (`QUANTIZERS`): `rtn` is asymmetric round-to-nearest on each group's min/max
grid; `hqq` adds HQQ's half-quadratic optimisation of the zero points (Badri & Shaji 2023),
calibration-free. Both run through the HQQ library's `Quantizer.quantize`. `gptq` is data-aware:
GPTQ's column-by-column rounding with the error spread through the calibration inputs' inverse
Hessian, on the same min/max grid (`_gptq_quantize` says why it is written here).

**Why HQQ, and why welore packs the codes itself** — measured by `benchmarks/quant_backends.py`
on four SmolLM2 matrices with their real inputs (docs/benchmarks.md, "Quantization backends"):
torchao 0.18's `IntxWeightOnlyConfig` on CPU keeps every 2/3/4-bit code in an int8 (9.25 stored
bits per parameter at any width) and cannot use a group of 128 on 576-wide rows; optimum-quanto
0.2.7 has no 3-bit type, only symmetric per-channel int8 and group sizes that divide the row;
HQQ 0.2.8 quantizes 8/4/3/2 bits at any group size on CPU, its RTN matches a plain reference
to 1e-7, and its optimiser lowers the output error further (3-bit, groups of 64: 0.228 → 0.222).
HQQ packs 3-bit codes 10 to an int32 (3.2 bits per code) and keeps scales in the compute dtype
(float32); here 8 codes go into exactly `bits` bytes and scales into float16, so the stored
bytes are bits·params/8 + 4 bytes per group. No backend had a CPU kernel faster than
dequantize-then-matmul (all 1.5–5× a dense float32 matmul), so the forward dequantizes.

**Compensation** (`compensate_rank` r, EoRA, Liu et al. 2024): the quantization error
E = W − Ŵ is approximated by a rank-r product up·down. Without calibration it is the truncated
SVD of E (best in weight space, Eckart–Young); with calibration statistics XᵀX = S·Sᵀ it is the
truncated SVD of E·S mapped back by S⁻¹ — `welore.factorize`'s `whiten` factorizer applied to E
— which minimises the error of the layer's outputs on the calibration text,
‖(E − up·down)·Xᵀ‖_F, so compensation never increases it. With `compensate_iters` k > 1 the
codes and the factors alternate (LQ-LoRA, Guo et al. 2023; CALDERA, Saha et al. 2024):
Ŵ ← Q(W − up·down), then up·down refitted to W − Ŵ, k rounds in all; the round with the least
(output, else weight) error is kept, so it is never worse than EoRA's single round.

**With low rank** (`quant_targets`): on a model already compressed by `welore.compress_`, the
layers quantized are the two factors of every `LowRankLinear` (each an ordinary dense layer of
shape (out, r) or (r, in)) and the target matrices its rank plan kept dense, so W ≈ Q(up)·Q(down):
the parameters removed by low rank and the bits removed by quantization multiply. The rank plan
and the quantization plan are both saved; loading applies the first, then the second.

**Any size** (`target_size` in bytes): every matrix gets a bit width and a compensation rank
so that codes + scales + offsets + factors of all target matrices fit the budget: the error of
each choice is known from the singular values of E (or E·S), and one Lagrange multiplier λ
picks, for every matrix, the choice minimising relative error + λ·bytes; λ is bisected to the
budget and the bytes left over are spent on compensation ranks where they lower the error most.
That error proxy (summed relative output error) does not see what a choice costs the loss, so
with calibration text the allocation is then checked against every uniform width whose codes
fit the budget, each with the largest uniform compensation rank that keeps it within the
budget (`uniform_plans`): the calibration windows' last eighth is held back from the
statistics, every plan quantizes a copy of the model, and the plan with the lowest perplexity
on the held-back windows is kept (`QuantPlan.meta["selection"]` records the scores). So a size
target is never worse, on text the statistics did not see, than a uniform width of no more bytes.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from welore._io import parse_bytes, write_json
from welore.errors import WeloreError
from welore.factorize import FACTORIZERS, balance_factors, svd_factors, whitening
from welore.modules import LowRankLinear, swap_module
from welore.spectrum import _one_thread_per_op, check_finite
from welore.targets import DENSE_TYPES, _matches, find_targets, matrix_shape, weight_matrix

log = logging.getLogger(__name__)

BITS = (8, 4, 3, 2)  # supported code widths
FORMATS = {f"int{b}": b for b in BITS}  # the names users write: --quantize int4
QUANT_PLAN_VERSION = 1
CONFIG_VERSION = 1
SCALE_DTYPE = torch.float16  # scales and offsets are stored in float16 (as GGUF's Q4_1)
FACTOR_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# --- bit packing ---------------------------------------------------------------------------


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes of `numel` b-bit codes packed 8 codes to `bits` bytes."""
    return math.ceil(numel / 8) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) into uint8: each run of 8 codes becomes `bits` bytes,
    code i of the run at bits [i·b, (i+1)·b) of the little-endian word (for 4 and 2 bits, the
    usual nibble/crumb order). (N,) -> (ceil(N/8)·bits,)."""
    assert bits in BITS, f"bits {bits} not in {BITS}"
    flat = codes.reshape(-1)
    pad = (-flat.numel()) % 8
    if bits == 8:
        return F.pad(flat.to(torch.uint8), (0, pad))
    runs = F.pad(flat.to(torch.int64), (0, pad)).view(-1, 8)  # (N/8, 8)
    shifts = torch.arange(8, device=flat.device, dtype=torch.int64) * bits
    words = (runs << shifts).sum(dim=1)  # (N/8,) < 2^(8·bits) ≤ 2^32
    byte_shifts = torch.arange(bits, device=flat.device, dtype=torch.int64) * 8
    return ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)  # (N/8·bits,)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_codes`: (ceil(N/8)·bits,) uint8 -> (N,) uint8 codes."""
    if bits == 8:
        return packed[:numel]
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (packed.view(-1, bits).to(torch.int64) << byte_shifts).sum(dim=1)  # (N/8,)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (words[:, None] >> shifts) & ((1 << bits) - 1)  # (N/8, 8)
    return codes.reshape(-1)[:numel].to(torch.uint8)


# --- quantizers ----------------------------------------------------------------------------


@dataclass
class QuantizedWeight:
    """A matrix's packed codes and its groups' float16 scales and offsets."""

    codes: torch.Tensor  # (packed_bytes(out·in, bits),) uint8
    scale: torch.Tensor  # (groups,) float16
    offset: torch.Tensor  # (groups,) float16
    bits: int
    group_size: int
    shape: tuple[int, int]  # (out, in)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.offset, self.bits, self.group_size, self.shape, dtype)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, group_size: int,
    shape: tuple[int, int], dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Ŵ = scale·q + offset per group, as an (out, in) matrix in `dtype`."""
    numel = shape[0] * shape[1]
    q = unpack_codes(codes, bits, numel).view(-1, group_size).to(dtype)  # (groups, g)
    return (q * scale.to(dtype)[:, None] + offset.to(dtype)[:, None]).view(shape)


def check_group_size(shape: tuple[int, int], group_size: int, name: str = "a target matrix") -> None:
    numel = shape[0] * shape[1]
    if group_size < 1 or numel % group_size:
        divisors = [g for g in (32, 64, 128, 256, 16, 8, 4, 2) if numel % g == 0]
        raise WeloreError(
            f"Group size {group_size} does not divide the {shape[0]}x{shape[1]} weights of {name}; "
            f"use one that does, e.g. {divisors[0] if divisors else 1}."
        )


def _hqq_quantize(weight: torch.Tensor, bits: int, group_size: int, optimize: bool) -> QuantizedWeight:
    from hqq.core.quantize import Quantizer

    w = weight.detach().to(torch.float32).cpu()  # (out, in)
    codes, meta = Quantizer.quantize(
        w, nbits=bits, group_size=group_size, optimize=optimize, axis=1, bitpack=False,
        compute_dtype=torch.float32, device="cpu",
    )  # codes (groups, g) float in [0, 2^b); Ŵ = (q − zero)·scale per group
    scale = meta["scale"].reshape(-1)  # (groups,)
    offset = -meta["zero"].reshape(-1) * scale  # (groups,): Ŵ = q·scale + offset
    return QuantizedWeight(
        codes=pack_codes(codes.reshape(-1).to(torch.uint8), bits),
        scale=scale.to(SCALE_DTYPE), offset=offset.to(SCALE_DTYPE),
        bits=bits, group_size=group_size, shape=(w.shape[0], w.shape[1]),
    )


GPTQ_DAMPING = 0.01  # λ: GPTQ inverts XᵀX/N + λ·mean(diag)·I (the GPTQ paper's 1% dampening)
GPTQ_BLOCK = 128  # columns updated together before the rest of the matrix gets their error (lazy batch updates)


def _gptq_quantize(weight: torch.Tensor, bits: int, group_size: int, stats) -> QuantizedWeight:
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
        raise WeloreError(f"GPTQ keeps each group within a row, and group size {group_size} does not divide the "
                          f"{in_features}-long rows of a {out_features}x{in_features} matrix; use a group size that "
                          "does, e.g. 64.")
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


Quantizer = Callable[[torch.Tensor, int, int, object], QuantizedWeight]
QUANTIZERS: dict[str, Quantizer] = {
    "rtn": lambda w, bits, g, stats: _hqq_quantize(w, bits, g, optimize=False),  # min/max grid, round to nearest
    "hqq": lambda w, bits, g, stats: _hqq_quantize(w, bits, g, optimize=True),  # + HQQ zero-point optimisation
    "gptq": _gptq_quantize,  # min/max grid, errors spread by the calibration inputs' inverse Hessian
}
NEEDS_STATS = frozenset({"gptq"})  # quantizers that need calibration statistics (XᵀX)


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
    return QUANTIZERS[quantizer](weight, bits, group_size, stats)


def matrix_bytes(shape: tuple[int, int], bits: int, group_size: int, rank: int = 0, factor_bytes: int = 2) -> int:
    """Stored bytes of one quantized matrix: codes + float16 scale and offset per group + factors."""
    m, n = shape
    return packed_bytes(m * n, bits) + 2 * 2 * (m * n // group_size) + rank * (m + n) * factor_bytes


# --- the module ----------------------------------------------------------------------------


class _PackedLinear(torch.autograd.Function):
    """y = x·Ŵᵀ + b with Ŵ = scale·q + offset dequantized from a `QuantizedLinear`'s packed codes q.
    The backward dequantizes Ŵ again instead of keeping it from the forward, so a training step holds
    no float copy of a frozen quantized matrix beyond the one being multiplied (QLoRA's memory):
    autograd saves the packed codes (already in the module), not the (out, in) float weight.

    When the scales and offsets train (`--train-scales`, PEQA's recovery: the codes stay frozen),
    their gradients are the weight gradient G = gradᵀ·x summed over each group, weighted by the
    codes for the scale: ∂L/∂scale_k = Σ_j G_kj·q_kj and ∂L/∂offset_k = Σ_j G_kj over group k."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, offset: torch.Tensor,
                module: QuantizedLinear) -> torch.Tensor:
        ctx.module, ctx.dtype, ctx.has_bias = module, x.dtype, bias is not None
        if scale.requires_grad or offset.requires_grad:
            ctx.save_for_backward(x)
        return F.linear(x, module.quantized_weight().to(x.dtype), bias)  # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad (..., out)
        module = ctx.module
        grad_x = grad_bias = grad_scale = grad_offset = None
        if ctx.needs_input_grad[0]:
            w = module.quantized_weight().to(grad.dtype)  # (out, in), recomputed
            grad_x = (grad @ w).to(ctx.dtype)  # (..., in)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)  # (out,)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            (x,) = ctx.saved_tensors
            g = grad.reshape(-1, module.out_features).float()  # (N, out)
            weight_grad = (g.T @ x.reshape(-1, module.in_features).float()).view(-1, module.group_size)  # (groups, g)
            if ctx.needs_input_grad[2]:
                numel = module.out_features * module.in_features
                q = unpack_codes(module.codes, module.bits, numel).view(-1, module.group_size).float()
                grad_scale = (weight_grad * q).sum(1).to(module.scale.dtype)  # (groups,)
            if ctx.needs_input_grad[3]:
                grad_offset = weight_grad.sum(1).to(module.offset.dtype)  # (groups,)
        return grad_x, grad_bias, grad_scale, grad_offset, None


def set_factor_dtype_(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Cast the compensation factors of every `QuantizedLinear` to `dtype` (e.g. float32 to
    train them: AdamW's updates underflow in float16), or back to their storage dtype with
    None; returns the names of the modules cast. The stored format never changes (see
    `QuantizedLinear._save_to_state_dict`)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear) and module.rank:
            target = dtype or module.factor_dtype
            if module.up.dtype != target:
                module.up.data = module.up.data.to(target)
                module.down.data = module.down.data.to(target)
                names.append(name)
    return names


def set_scales_trainable_(model: nn.Module, trainable: bool) -> list[str]:
    """Make the scales and offsets of every `QuantizedLinear` float32 parameters (to train them,
    the codes frozen), or float16 buffers again; returns the names of the modules changed. Their
    names in the state dict, and the stored format, stay the same."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear) and module.scales_train != trainable:
            for part in ("scale", "offset"):
                value = getattr(module, part).detach()
                delattr(module, part)
                if trainable:
                    module.register_parameter(part, nn.Parameter(value.float()))
                else:
                    module.register_buffer(part, value.to(SCALE_DTYPE))
            names.append(name)
    return names


class QuantizedLinear(nn.Module):
    """A dense layer stored as packed codes (+ a rank-r compensation), dequantized on forward."""

    def __init__(
        self, in_features: int, out_features: int, bits: int, group_size: int, rank: int = 0, bias: bool = False,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
        factor_dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        assert bits in BITS, f"bits {bits} not in {BITS}"
        numel = out_features * in_features
        assert numel % group_size == 0, f"group size {group_size} does not divide {out_features}x{in_features}"
        assert 0 <= rank <= min(in_features, out_features), f"rank {rank} outside [0, {min(in_features, out_features)}]"
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.rank = bits, group_size, rank
        self.factor_dtype = factor_dtype
        self.weight_dtype = dtype or torch.get_default_dtype()  # the dense weight's dtype, for export
        groups = numel // group_size
        self.register_buffer("codes", torch.empty(packed_bytes(numel, bits), dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.empty(groups, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("offset", torch.empty(groups, dtype=SCALE_DTYPE, device=device))
        if rank:
            self.up = nn.Parameter(torch.empty(out_features, rank, dtype=factor_dtype, device=device))
            self.down = nn.Parameter(torch.empty(rank, in_features, dtype=factor_dtype, device=device))
        else:
            self.up = self.down = None
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def quantized_weight(self) -> torch.Tensor:
        """Ŵ (out, in) float32, without the compensation."""
        return dequantize(self.codes, self.scale, self.offset, self.bits, self.group_size,
                          (self.out_features, self.in_features))

    @property
    def packed_parameters(self) -> int:
        """The weights the packed codes stand for (out·in): `count_parameters` counts them, as
        buffers they are not in `parameters()`."""
        return self.out_features * self.in_features

    @property
    def scales_train(self) -> bool:
        """Whether the scales and offsets are parameters (`set_scales_trainable_`), not buffers."""
        return isinstance(self.scale, nn.Parameter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        needs_grad = x.requires_grad or self.scale.requires_grad or self.offset.requires_grad
        if torch.is_grad_enabled() and (needs_grad or (bias is not None and bias.requires_grad)):
            y = _PackedLinear.apply(x, bias, self.scale, self.offset, self)  # no float copy of Ŵ kept for backward
        else:
            y = F.linear(x, self.quantized_weight().to(x.dtype), bias)
        if self.rank:
            y = y + F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))  # (..., r) -> (..., out)
        return y

    def dense_weight(self) -> torch.Tensor:
        """Ŵ + up·down, (out, in) float32."""
        w = self.quantized_weight()
        if self.rank:
            w = w + self.up.float() @ self.down.float()
        return w

    @property
    def nbytes(self) -> int:
        """Stored bytes of the matrix: codes, scales, offsets and factors (bias excluded)."""
        factor_bytes = torch.tensor([], dtype=self.factor_dtype).element_size()
        return matrix_bytes((self.out_features, self.in_features), self.bits, self.group_size, self.rank, factor_bytes)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        # The stored format does not follow `model.to(dtype)`: scales, offsets and factors are
        # always written in their storage dtypes, so the bytes on disk match the plan.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        dtypes = {"scale": SCALE_DTYPE, "offset": SCALE_DTYPE, "up": self.factor_dtype, "down": self.factor_dtype}
        for name, dtype in dtypes.items():
            key = prefix + name
            if key in destination and destination[key].dtype != dtype:
                destination[key] = destination[key].to(dtype)

    @classmethod
    def from_quantized(
        cls, q: QuantizedWeight, bias: torch.Tensor | None, up: torch.Tensor | None = None,
        down: torch.Tensor | None = None, factor_dtype: torch.dtype = torch.float16,
        dtype: torch.dtype | None = None,
    ) -> QuantizedLinear:
        """Build from a quantized weight, its bias and compensation factors; `dtype` is the
        dense weight's (the bias is kept in it)."""
        out_features, in_features = q.shape
        rank = 0 if up is None else up.shape[1]
        module = cls(in_features, out_features, q.bits, q.group_size, rank, bias=bias is not None,
                     device=q.codes.device, dtype=dtype, factor_dtype=factor_dtype)
        with torch.no_grad():
            module.codes.copy_(q.codes)
            module.scale.copy_(q.scale)
            module.offset.copy_(q.offset)
            if rank:
                module.up.copy_(up)
                module.down.copy_(down)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, rank={self.rank}, bias={self.bias is not None}")


# --- plan and config ---------------------------------------------------------------------


@dataclass
class QuantPlan:
    """Per target matrix: its (out, in) shape, code width, group size and compensation rank."""

    shapes: dict[str, tuple[int, int]]  # module name -> (out_features, in_features)
    bits: dict[str, int]  # module name -> code width
    group_size: dict[str, int]  # module name -> weights per scale/offset pair
    ranks: dict[str, int]  # module name -> compensation rank (0 = none)
    quantizer: str = "rtn"  # how the codes were chosen (provenance)
    factor_dtype: str = "float16"  # storage dtype of the compensation factors
    compensate_iters: int = 1  # rounds of quantization/compensation alternation (1 = EoRA; provenance)
    requested_bytes: int | None = None  # the target size asked for, if any
    meta: dict = field(default_factory=dict)  # free-form provenance
    version: int = QUANT_PLAN_VERSION

    def __post_init__(self) -> None:
        names = set(self.shapes)
        if not (set(self.bits) == set(self.group_size) == set(self.ranks) == names):
            raise WeloreError("The quantization plan's entries name different matrices; regenerate it.")
        for name, shape in self.shapes.items():
            if self.bits[name] not in BITS:
                raise WeloreError(f"The quantization plan gives {name} {self.bits[name]} bits; "
                                  f"use one of {', '.join(map(str, BITS))}.")
            check_group_size(shape, self.group_size[name], name)
            if not 0 <= self.ranks[name] <= min(shape):
                raise WeloreError(f"The quantization plan gives {name} ({shape[0]}x{shape[1]}) compensation rank "
                                  f"{self.ranks[name]}; use 0 to {min(shape)}.")
        if self.factor_dtype not in FACTOR_DTYPES:
            raise WeloreError(f"Unknown factor dtype {self.factor_dtype!r}; choose one of {', '.join(FACTOR_DTYPES)}.")

    def matrix_bytes(self, name: str) -> int:
        factor_bytes = torch.tensor([], dtype=FACTOR_DTYPES[self.factor_dtype]).element_size()
        return matrix_bytes(self.shapes[name], self.bits[name], self.group_size[name], self.ranks[name], factor_bytes)

    @property
    def nbytes(self) -> int:
        """Stored bytes of all target matrices (codes, scales, offsets, factors)."""
        return sum(self.matrix_bytes(n) for n in self.shapes)

    @property
    def params(self) -> int:
        return sum(m * n for m, n in self.shapes.values())

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.params

    def to_dict(self) -> dict:
        return {
            "format": "welore-quant-plan", "version": self.version, "quantizer": self.quantizer,
            "factor_dtype": self.factor_dtype, "compensate_iters": self.compensate_iters,
            "requested_bytes": self.requested_bytes, "bytes": self.nbytes,
            "meta": self.meta,
            "matrices": {
                n: {"shape": list(s), "bits": self.bits[n], "group_size": self.group_size[n], "rank": self.ranks[n]}
                for n, s in self.shapes.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict) -> QuantPlan:
        from welore.versioned import check_version

        if not isinstance(data, dict) or data.get("format") != "welore-quant-plan":
            raise WeloreError("This JSON is not a welore quantization plan; pass a plan written by welore.")
        check_version(data, "version", QUANT_PLAN_VERSION, "The quantization plan")
        matrices = data.get("matrices") or {}
        try:
            return cls(
                shapes={n: (int(e["shape"][0]), int(e["shape"][1])) for n, e in matrices.items()},
                bits={n: int(e["bits"]) for n, e in matrices.items()},
                group_size={n: int(e["group_size"]) for n, e in matrices.items()},
                ranks={n: int(e["rank"]) for n, e in matrices.items()},
                quantizer=data.get("quantizer", "rtn"), factor_dtype=data.get("factor_dtype", "float16"),
                compensate_iters=int(data.get("compensate_iters", 1)), requested_bytes=data.get("requested_bytes"),
                meta=data.get("meta", {}),
            )
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise WeloreError(f"A matrix entry of the quantization plan is malformed ({err!r}); "
                              "regenerate the plan.") from None

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> QuantPlan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise WeloreError(f"Cannot read quantization plan {path} ({err}); re-create the checkpoint.") from None


@dataclass
class QuantConfig:
    bits: int | None = 4  # code width (8, 4, 3, 2); None when target_size chooses it per matrix
    group_size: int = 64  # consecutive weights of a row sharing one scale and offset
    quantizer: str = "rtn"  # rtn (round to nearest) | hqq (HQQ's optimised zero points) | gptq (needs calibration)
    compensate_rank: int = 0  # rank r of the low-rank correction of W − Q(W); 0 = none
    compensate_iters: int = 1  # rounds alternating Q ← Q(W − up·down) and up·down ← fit(W − Q); 1 = EoRA alone
    target_size: int | None = None  # bytes of all target matrices (codes, scales, offsets, factors)
    target_bits: tuple[int, ...] = BITS  # widths target_size may choose from
    max_compensate_rank: int = 256  # largest compensation rank target_size may choose
    factor_dtype: str = "float16"  # storage dtype of the compensation factors
    targets: list[str] | None = None  # module-name patterns; None = decoder-block Linears
    calib: str | None = None  # calibration text spec (provenance); with it, compensation is EoRA's
    calib_tokens: int | None = None  # calibration tokens used
    bos: str | None = None  # whether the calibration windows started with BOS (yes/no; welore.data.resolve_bos)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.target_size is None:
            if self.bits not in BITS:
                raise WeloreError(f"Cannot quantize to {self.bits} bits; choose one of "
                                  f"{', '.join(f'int{b}' for b in BITS)}.")
        elif self.target_size <= 0:
            raise WeloreError(f"Target size {self.target_size} bytes is not positive; ask for e.g. 60MB.")
        if self.group_size < 1:
            raise WeloreError(f"Group size {self.group_size} must be a positive integer, e.g. 64.")
        if self.quantizer not in QUANTIZERS:
            raise WeloreError(f"Unknown quantizer {self.quantizer!r}; choose one of {', '.join(QUANTIZERS)}.")
        if self.compensate_rank < 0:
            raise WeloreError(f"Compensation rank {self.compensate_rank} is negative; use 0 (none) or e.g. 32.")
        if self.max_compensate_rank < 0:
            raise WeloreError(f"Largest compensation rank {self.max_compensate_rank} is negative; use 0 (bits only) "
                              "or e.g. 256.")
        if self.compensate_iters < 1:
            raise WeloreError(f"Compensation rounds {self.compensate_iters} must be at least 1, e.g. 4.")
        if self.compensate_iters > 1 and not self.compensate_rank and self.target_size is None:
            raise WeloreError("Alternating rounds need a compensation to alternate with; add --compensate-rank, "
                              "e.g. 8.")
        if self.factor_dtype not in FACTOR_DTYPES:
            raise WeloreError(f"Unknown factor dtype {self.factor_dtype!r}; choose one of {', '.join(FACTOR_DTYPES)}.")
        if not self.target_bits or any(b not in BITS for b in self.target_bits):
            raise WeloreError(f"Target bit widths {self.target_bits} must be among {', '.join(map(str, BITS))}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, what: str = "The quantization config") -> QuantConfig:
        from welore.data import LEGACY_BOS
        from welore.versioned import config_from_dict

        data = dict(data)
        if data.get("calib") and "bos" not in data:  # earlier versions: windows never started with BOS
            data["bos"] = LEGACY_BOS
        if "target_bits" in data and isinstance(data["target_bits"], list):
            data["target_bits"] = tuple(data["target_bits"])
        return config_from_dict(cls, data, what, CONFIG_VERSION)


@dataclass
class QuantOptions:
    """The `welore compress` options of quantization; `config()` turns them into a QuantConfig."""

    quantize: str | None = field(default=None, metadata={"choices": list(FORMATS)})  # store every target matrix as
        # packed codes of this width (weight-only, asymmetric, in groups)
    target_size: str | None = field(default=None, metadata={"metavar": "SIZE"})  # choose per-matrix widths and
        # compensation ranks so the target matrices (codes, scales, zero points, factors) take SIZE,
        # e.g. 60MB (10^6 bytes) or 57MiB (2^20 bytes)
    group_size: int = 64  # consecutive weights of a row sharing one scale and zero point
    quantizer: str = field(default="rtn", metadata={"choices": list(QUANTIZERS)})  # rtn: round to nearest on each
        # group's min/max grid; hqq: HQQ's optimised zero points; gptq: GPTQ's error feedback on the
        # calibration inputs (needs --calib)
    compensate_rank: int = 0  # rank of a correction of the quantization error:
        # EoRA with --calib, weight-space SVD without
    compensate_iters: int = 1  # rounds alternating quantization of W − up·down and refitting the
        # compensation to what it leaves (LQ-LoRA/CALDERA); the best round is kept; 1 = EoRA alone
    max_compensate_rank: int = 256  # largest compensation rank --target-size may give a matrix
    factor_dtype: str = field(default="float16", metadata={"choices": list(FACTOR_DTYPES)})  # storage dtype of the
        # compensation factors

    def config(self, compress=None) -> QuantConfig:
        """The QuantConfig, with targets and calibration provenance from a CompressConfig."""
        if self.quantize and self.target_size:
            raise WeloreError("Give --quantize (one width for every matrix) or --target-size (widths chosen per "
                              "matrix), not both.")
        calib = getattr(compress, "calib", None)
        if self.quantizer in NEEDS_STATS and calib is None:
            raise WeloreError(f"The {self.quantizer} quantizer needs calibration text; add --calib (e.g. --calib wiki) "
                              "or use --quantizer rtn.")
        return QuantConfig(
            bits=FORMATS[self.quantize] if self.quantize else None, group_size=self.group_size,
            quantizer=self.quantizer, compensate_rank=self.compensate_rank, compensate_iters=self.compensate_iters,
            target_size=parse_bytes(self.target_size, "size", "60MB") if self.target_size else None,
            max_compensate_rank=self.max_compensate_rank, factor_dtype=self.factor_dtype,
            targets=getattr(compress, "targets", None), calib=calib,
            calib_tokens=getattr(compress, "calib_tokens", None) if calib else None,
            bos=getattr(compress, "bos", None) if calib else None,
        )


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


# --- error of each choice, and the allocation -------------------------------------------------


def _error_matrix(weight: torch.Tensor, q: QuantizedWeight) -> torch.Tensor:
    """E = W − Ŵ (out, in) float64."""
    return weight.detach().to(torch.float64).cpu() - q.dequantize(torch.float64)


def _compensation(error: torch.Tensor, rank: int, stats) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors (up (out, r), down (r, in), float32) of E: the truncated SVD of E·S mapped
    back by S⁻¹ with the calibration statistics' whitening S (EoRA: `welore.factorize`'s
    `whiten` factorizer applied to E), else the truncated SVD of E itself; balanced as
    `welore.compress` stores its factors, so fine-tuning moves both sides alike."""
    if stats is not None:
        return balance_factors(*FACTORIZERS["whiten"].factors(error, rank, stats))
    return svd_factors(error, rank)


def _error_spectrum(error: torch.Tensor, stats) -> torch.Tensor:
    """σ (descending) of E·S (or E): σ_j² is what component j adds to the squared output (or weight) error."""
    if stats is not None:
        return FACTORIZERS["whiten"].spectrum(error, stats)
    return FACTORIZERS["svd"].spectrum(error)


def _reference_energy(weight: torch.Tensor, stats) -> float:
    """‖W·S‖² (or ‖W‖²): the scale relative errors are measured against."""
    if stats is None:
        return float(weight.detach().to(torch.float64).pow(2).sum())
    root = whitening(stats).root
    return float((weight.detach().to(root.device, torch.float64) @ root).pow(2).sum())


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


# --- the entry point -----------------------------------------------------------------------


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


def quant_targets(model: nn.Module, patterns: list[str] | None = None) -> dict[str, nn.Module]:
    """The dense layers to quantize, name -> layer: the target matrices (`find_targets`), or, on
    a model compressed by low rank, the two factors (`up`, `down`) of every `LowRankLinear` and
    the target matrices its rank plan kept dense — with `patterns`, those of the plan's matrices
    that match one."""
    plan = getattr(model, "welore_plan", None)
    if plan is None or not any(isinstance(m, LowRankLinear) for m in model.modules()):
        return find_targets(model, patterns)
    names = [n for n in plan.ranks if not patterns or any(_matches(n, p) for p in patterns)]
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
    from welore.calibrate import iter_block_stats

    stats = {}
    for _, block_stats in iter_block_stats(model, targets, calibration, batch_size=batch_size, progress=progress):
        for name, s in block_stats.items():
            s.check(name)
            stats[name] = s
    return stats


def plan_quantization(
    model: nn.Module, config: QuantConfig, stats: dict | None = None, progress: bool = True
) -> QuantPlan:
    """The per-matrix bits and ranks: uniform from the config, or allocated to `target_size`."""
    targets = quant_targets(model, config.targets)
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


def _best_plan(model: nn.Module, plans: dict[str, QuantPlan], stats: dict, held: torch.Tensor, batch_size: int,
               progress: bool) -> tuple[QuantPlan, dict[str, nn.Module], dict[str, tuple[float, float]]]:
    """The plan whose quantized copy of `model` has the lowest perplexity on `held` (every plan's
    score recorded in its meta["selection"]), with that copy's quantized modules and their output
    errors, so the model takes them without quantizing again."""
    from welore.evaluate import perplexity

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
    progress: bool = True,
) -> QuantReport:
    """Quantize the target matrices of `model` in place (with compensation and/or a target size).

    With `calibration` (a LongTensor (N, T) of token windows, disjoint from evaluation text),
    compensation and the target-size allocation work on the layers' output error on those
    tokens (EoRA); without it, on the weights. The statistics of all targets are held at once
    (one (in, in) float64 matrix per distinct input). With a target size and calibration, the last
    eighth of the windows is held back to choose between the allocation and the uniform widths
    that fit (module docstring); the statistics come from the other windows.
    """
    from welore.select import hold_back

    targets = quant_targets(model, config.targets)
    if not targets:
        raise WeloreError("No target matrices to quantize; check --targets.")
    dense_bytes = sum(weight_matrix(m).numel() * weight_matrix(m).element_size() for m in targets.values())
    from welore.stream import is_streamed

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
            plan = plan_quantization(model, config, stats, progress)
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
    if not hasattr(model, "welore_plan"):  # save() needs a rank plan: every target stays full rank
        from welore.plan import RankPlan

        model.welore_plan = RankPlan(ranks=dict.fromkeys(plan.shapes), shapes=dict(plan.shapes), method="quantize")
    model.welore_quant_plan = plan
    model.welore_quant_config = config
    return QuantReport(plan=plan, replaced=replaced, dense_bytes=dense_bytes, output_error=errors)
