"""Gradient projectors for GaLore and Fira: which side of a matrix is projected, and how the
r-dimensional subspace is found.

GaLore (Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", arXiv:2403.03507) projects a 2-D gradient G (m×n) onto the span of its top-r
singular vectors on one side and runs Adam there. The side comes from `proj_type`, spelled as
in the `galore-torch` package:

    std          project the smaller side: RIGHT if m >= n, else LEFT
    reverse_std  project the larger side:  LEFT if m >= n, else RIGHT
    left/right   always that side
    full         both sides (R = P_lᵀ·G·P_r, an r×r matrix)

Every projector is kept as a basis P (d, r) with orthonormal columns of the side being
projected: d = m for LEFT (low-rank gradient R = Pᵀ·G, shape (r, n)) and d = n for RIGHT
(R = G·P, shape (m, r), as galore-torch keeps it). A refresh method always finds a *left*
subspace, of G for LEFT and of Gᵀ for RIGHT. The optimizer state holds only P and tensors.

How P is refreshed (every `update_proj_gap` steps) is a strategy in `REFRESH_METHODS`:

- `svd`: the top-r left singular vectors from `torch.linalg.svd` of the gradient, as the paper
  and galore-torch do. Exact, and the known cost of GaLore: a full SVD per matrix per refresh.
- `subspace` (default): randomized subspace iteration (Halko, Martinsson & Tropp, 2011,
  "Finding structure with randomness", Alg. 4.4) with a Rayleigh–Ritz step, started from the
  previous projector plus a few random columns (gradient subspaces move slowly between
  refreshes, so the warm start is already close). Cost O(m·n·k) per iteration, k = r + 8,
  instead of the SVD's O(m·n·min(m, n)) with a large constant. Where k is at least half the
  projected side, the subspace is found exactly from the eigenvectors of the float64 Gram
  matrix G·Gᵀ (d×d), which is then the cheaper exact method.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import torch


class ProjType(str, Enum):
    """The user's choice of side (group key `proj_type`; groups store the plain string)."""

    STD = "std"
    REVERSE_STD = "reverse_std"
    RIGHT = "right"
    LEFT = "left"
    FULL = "full"


class ProjSide(Enum):
    """The side actually projected for one matrix, resolved from `ProjType` and its shape."""

    LEFT = "left"  # P spans columns of G (m, r); R = Pᵀ·G
    RIGHT = "right"  # P spans rows of G (n, r); R = Pᵀ·Gᵀ
    BOTH = "both"  # P_l (m, r) and P_r (n, r); R = P_lᵀ·G·P_r


def resolve_side(proj_type: str, shape: tuple[int, int]) -> ProjSide:
    m, n = shape
    kind = ProjType(proj_type)
    if kind is ProjType.STD:
        return ProjSide.RIGHT if m >= n else ProjSide.LEFT
    if kind is ProjType.REVERSE_STD:
        return ProjSide.LEFT if m >= n else ProjSide.RIGHT
    return {ProjType.LEFT: ProjSide.LEFT, ProjType.RIGHT: ProjSide.RIGHT, ProjType.FULL: ProjSide.BOTH}[kind]


# A refresh method: (M (d, e) float32, rank r, previous P (d, r) or None, generator) -> P (d, r)
# with orthonormal columns spanning (approximately) the top-r left singular subspace of M.
RefreshMethod = Callable[[torch.Tensor, int, "torch.Tensor | None", torch.Generator], torch.Tensor]

OVERSAMPLE = 8  # extra random columns in the subspace iteration's block
POWER_ITERS = 2  # subspace iterations (each applies Mᵀ then M, orthonormalising in between)


def svd_refresh(m: torch.Tensor, rank: int, previous: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Top-r left singular vectors of M by a full `torch.linalg.svd` (GaLore's own method)."""
    u, _, _ = torch.linalg.svd(m, full_matrices=False)  # (d, min(d, e))
    return u[:, :rank].contiguous()  # (d, r)


def gram_refresh(m: torch.Tensor, rank: int, previous: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Top-r eigenvectors of the float64 Gram matrix M·Mᵀ (= the top-r left singular vectors)."""
    gram = m.double() @ m.double().T  # (d, d)
    _, vectors = torch.linalg.eigh(gram)  # eigenvalues ascending
    return vectors[:, -rank:].flip(1).to(m.dtype).contiguous()  # (d, r), largest first


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x).Q


def subspace_refresh(
    m: torch.Tensor, rank: int, previous: torch.Tensor | None, generator: torch.Generator
) -> torch.Tensor:
    """Randomized subspace iteration, warm-started from `previous`, then Rayleigh–Ritz."""
    d, e = m.shape
    k = min(rank + OVERSAMPLE, d, e)
    if 2 * k >= d:  # the block is a large part of the side: the exact Gram eigenbasis is cheaper
        return gram_refresh(m, rank, previous, generator)
    if previous is None:  # cold start: the range of M applied to k Gaussian vectors
        omega = torch.randn(e, k, generator=generator, device=m.device, dtype=m.dtype)  # (e, k)
        block = m @ omega  # (d, k)
    else:  # warm start: the previous basis plus the range of a few Gaussian vectors
        omega = torch.randn(e, k - rank, generator=generator, device=m.device, dtype=m.dtype)
        block = torch.cat([previous.to(m.dtype), m @ omega], dim=1)  # (d, k)
    q = _orthonormal(block)  # (d, k)
    for _ in range(POWER_ITERS):
        z = _orthonormal(m.T @ q)  # (e, k)
        q = _orthonormal(m @ z)  # (d, k)
    # Rayleigh–Ritz: the best rank-r subspace inside span(q) from the small k×k problem.
    b = (q.T @ m).double()  # (k, e)
    _, vectors = torch.linalg.eigh(b @ b.T)  # (k, k), eigenvalues ascending
    top = vectors[:, -rank:].flip(1).to(m.dtype)  # (k, r)
    return (q @ top).contiguous()  # (d, r)


REFRESH_METHODS: dict[str, RefreshMethod] = {
    "subspace": subspace_refresh,
    "svd": svd_refresh,
}
