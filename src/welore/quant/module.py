"""The packed layer: `QuantizedLinear`, and the bit packing of its codes.

Every quantized matrix W (out, in) becomes a `QuantizedLinear` holding

    codes   (out·in·bits/8,) uint8  b-bit codes, bit-packed: 8 codes in `bits` bytes (little-endian)
    scale   (groups,) float16       step of each group of `group_size` consecutive weights of a row
    offset  (groups,) float16       the value code 0 stands for (the group's zero point, as GGUF Q4_1's min)
    up, down (out, r), (r, in)      optional compensation factors, float16 by default

and computes y = x·Ŵᵀ + (x·downᵀ)·upᵀ + b with Ŵ = scale·q + offset dequantized on the fly.
Groups are runs of `group_size` consecutive weights in row-major order: along each row when
the row length is a multiple of the group size (otherwise a group continues on the next row).

**Why welore packs the codes itself** — measured by `benchmarks/quant_backends.py` on four
SmolLM2 matrices with their real inputs (docs/benchmarks.md, "Quantization backends"):
torchao 0.18's `IntxWeightOnlyConfig` on CPU keeps every 2/3/4-bit code in an int8 (9.25 stored
bits per parameter at any width); HQQ 0.2.8 packs 3-bit codes 10 to an int32 (3.2 bits per
code) and keeps scales in the compute dtype (float32). Here 8 codes go into exactly `bits` bytes
and scales into float16, so the stored bytes are bits·params/8 + 4 bytes per group
(`matrix_bytes`). No backend had a CPU kernel faster than dequantize-then-matmul (all 1.5–5× a
dense float32 matmul), so the forward dequantizes (`_PackedLinear`, which also keeps no float
copy of Ŵ for the backward).

This is the bottom of `welore.quant`: it imports no compression code, so loading a quantized
checkpoint needs only this module's layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from welore.errors import WeloreError

BITS = (8, 4, 3, 2)  # supported code widths
FORMATS = {f"int{b}": b for b in BITS}  # the names users write: --quantize int4
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


# --- the quantized matrix ------------------------------------------------------------------


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
