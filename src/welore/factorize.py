"""Per-matrix factorizations: turn an (out, in) matrix into rank-r factors (up, down).

Factorizers sit in a registry (`FACTORIZERS`) and share one signature:
`factorizer(weight, rank) -> (up (out, r), down (r, in))`, computed in float32.
`svd` is the truncated SVD — by Eckart–Young the best rank-r approximation in the Frobenius
and spectral norms — with WeLore's balanced split up = U·√S, down = √S·Vᵀ.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Factorizer = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]

FACTORIZERS: dict[str, Factorizer] = {}


def register_factorizer(name: str) -> Callable[[Factorizer], Factorizer]:
    def register(fn: Factorizer) -> Factorizer:
        FACTORIZERS[name] = fn
        return fn

    return register


@register_factorizer("svd")
def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.detach().to(torch.float32)  # (out, in)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root  # (out, r)
    down = root[:, None] * vh[:rank]  # (r, in)
    return up, down
