"""`LowRankLinear`: a dense layer replaced by two factors, W ≈ up · down.

    y = up(down(x)) = (U_r·√Σ_r) · (√Σ_r·V_rᵀ) · x + b   (for plain SVD; every factorization is
    stored balanced: column j of up and row j of down of equal norm, `welore.lowrank.factorize.balance_factors`)
    down: (r, in) — the first factor, applied to the input
    up:   (out, r) — the second factor, carries the original bias

Both factors are plain `nn.Linear` modules so that optimizers, PEFT and hooks see ordinary
layers. A `Conv1D` (GPT-2) replaced by this module computes the same function.
"""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        assert 1 <= rank <= min(in_features, out_features), f"rank {rank} outside [1, {min(in_features, out_features)}]"
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))  # (..., in) -> (..., r) -> (..., out)

    @classmethod
    def from_factors(
        cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> LowRankLinear:
        """Build from factors up (out, r) and down (r, in), stored in `dtype` on their device."""
        out_features, rank = up.shape
        module = cls(down.shape[1], out_features, rank, bias=bias is not None, device=up.device, dtype=dtype)
        with torch.no_grad():
            module.up.weight.copy_(up)
            module.down.weight.copy_(down)
            if bias is not None:
                module.up.bias.copy_(bias)
        return module

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) product up·down, in float32 then cast back to the factors' dtype (a
        factor stored as packed codes, `QuantizedLinear`, contributes its dequantized weight)."""
        up, down = (f.dense_weight() if hasattr(f, "dense_weight") else f.weight.float() for f in (self.up, self.down))
        dtype = getattr(self.up, "weight_dtype", None) or self.up.weight.dtype
        return (up @ down).to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.up.bias is not None}")
