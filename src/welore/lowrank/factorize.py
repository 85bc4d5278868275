"""Per-matrix factorizations: turn an (out, in) matrix into rank-r factors (up, down).

A factorizer is a small strategy object in a registry (`FACTORIZERS`) with two methods:

    spectrum(weight, stats) -> singular values the rank allocation should see (descending)
    factors(weight, rank, stats) -> (up (out, r), down (r, in)), float32

`stats` is the `InputStats` of the matrix's inputs on calibration text for data-aware
factorizers (`needs_stats = True`) and None for data-free ones.

`svd` is the truncated SVD — by Eckart–Young the best rank-r approximation in the Frobenius
and spectral norms — with WeLore's balanced split up = U·√S, down = √S·Vᵀ.

`whiten` (SVD-LLM, Wang et al., ICLR 2025) minimises the error of the layer's *outputs* on
the calibration inputs X (tokens, in) instead: with XᵀX = S·Sᵀ (Cholesky),
‖(W − W_r)·Xᵀ‖_F = ‖(W − W_r)·S‖_F, so the truncated SVD of W·S, mapped back by S⁻¹, is the
best rank-r matrix for those outputs, and the squared singular values of W·S are exactly the
output error each component adds when cut. `asvd` (ASVD, Yuan et al., 2023) scales input
channel j by (mean |x_j|)^α before the SVD and unscales after, a cheap diagonal stand-in for S.

`kfac` and `fisher` minimise an estimate of the LM *loss* increase instead, from gradients of
the loss at each layer's outputs (`welore.lowrank.curvature`; their stats are `CurvatureStats`): `kfac`
truncates L_Gᵀ·W·L_A (K-FAC: input covariance A = L_A·L_Aᵀ, output-gradient covariance
G = L_G·L_Gᵀ), `fisher` (FWSVD) weights W's rows by their diagonal Fisher information.

All of them need only the top r singular triplets of one matrix (W, W·S, W·diag(s), …);
`top_factors` gets them from the eigenvectors of its smaller Gram matrix instead of a full SVD
(benchmarks/factorize_speed.py measures the difference).
"""

from __future__ import annotations

import logging
import typing
import weakref
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import scipy.linalg
import torch

from welore.devices import float64_device
from welore.errors import WeloreError
from welore.lowrank.spectrum import gram_singular_values, singular_values
from welore.options import describe_fields, parse_value

if TYPE_CHECKING:
    from welore.lowrank.calibrate import InputStats
    from welore.lowrank.curvature import CurvatureStats, GradientStats

log = logging.getLogger(__name__)


class Factorizer(Protocol):
    needs_stats: ClassVar[bool]  # True when spectrum/factors need calibration statistics
    needs_gradients: ClassVar[bool]  # True when those statistics also hold the loss's output gradients
        # (welore.lowrank.curvature.CurvatureStats)

    def spectrum(self, weight: torch.Tensor, stats: Any | None) -> torch.Tensor: ...

    def factors(self, weight: torch.Tensor, rank: int, stats: Any | None) -> tuple[torch.Tensor, torch.Tensor]: ...


FACTORIZERS: dict[str, Factorizer] = {}


def make_factorizer(name: str, params: dict[str, Any] | None = None) -> Factorizer:
    """The registered factorizer `name` with its own parameters set (each factorizer is a frozen
    dataclass, so they are typed and checked): make_factorizer("asvd", {"alpha": 1.0}). A value
    given as text (the command line's `--factorizer-param alpha=1`) is read as the field's type."""
    if name not in FACTORIZERS:
        raise WeloreError(f"Unknown factorizer {name!r}; choose one of {', '.join(sorted(FACTORIZERS))}.")
    default = FACTORIZERS[name]
    if not params:
        return default
    known = {f.name for f in fields(default)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise WeloreError(f"The {name} factorizer has no parameter {', '.join(unknown)}; "
                          f"it takes {', '.join(sorted(known)) or 'none'}.")
    hints = typing.get_type_hints(type(default))
    return replace(default, **{key: parse_value(hints[key], value, f"The {name} factorizer's {key}")
                               if isinstance(value, str) else value for key, value in params.items()})


def describe_factorizer_params() -> str:
    """Every registered factorizer's parameters with their comments and defaults, for --help."""
    return "; ".join(f"{name}: {describe_fields(type(factorizer))}" for name, factorizer in sorted(FACTORIZERS.items()))


def register_factorizer(name: str) -> Callable[[type], type]:
    def register(cls: type) -> type:
        FACTORIZERS[name] = cls()
        return cls

    return register


def _balanced(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U_r·√Σ_r (out, r) and √Σ_r·V_rᵀ (r, in) of an SVD."""
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


EVR_MAX_FRACTION = 0.2  # the subset solver wins only up to r = this × k (benchmarks/eigen_solvers.py)


def _top_eigenpairs(gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The r largest eigenvalues (r,), descending, and their eigenvectors (k, r) of a symmetric
    float64 matrix (k, k), destroyed on the CPU.

    On the CPU, for r ≤ EVR_MAX_FRACTION·k, LAPACK's MRRR solver (scipy's
    `eigh(subset_by_index=...)`, driver evr) computes only those r eigenvectors. Its cost grows
    with r, and torch's full `eigh` (divide and conquer, all k) is faster beyond about a fifth of
    them (benchmarks/eigen_solvers.py, 2 cores): at k = 4096 3.0 s for r = 0.1·k, 3.8 s for 0.2·k
    and 14.3 s for 0.6·k, against 4.6 s for all k; at k = 2048 the two are even at r = 0.2·k.
    """
    k = gram.shape[0]
    if gram.device.type == "cpu" and rank <= EVR_MAX_FRACTION * k:
        values, vectors = scipy.linalg.eigh(
            gram.numpy(), subset_by_index=(k - rank, k - 1), driver="evr", overwrite_a=True, check_finite=False
        )  # ascending, (r,), (k, r)
        return torch.from_numpy(values).flip(0), torch.from_numpy(vectors).flip(1)
    values, vectors = torch.linalg.eigh(gram)  # ascending, (k,), (k, k)
    return values[-rank:].flip(0), vectors[:, -rank:].flip(1)


ROWS = 512  # rows of a weight converted to float64 at a time where a Gram matrix is built from it
GRAM_MIN_RELATIVE_SIGMA = 1e-5  # the Gram route needs σ_r ≥ this × σ_1; below it, the full SVD


def top_factors(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced truncated-SVD factors of `a` (m, n): U_r·√Σ_r (m, r) and √Σ_r·V_rᵀ (r, n), float64.

    Only the top r singular triplets are computed, from the eigen-decomposition of the smaller
    Gram matrix in float64 (A·Aᵀ when m ≤ n, else Aᵀ·A; the route `spectrum.singular_values`
    takes): its top r eigenvectors are one side's singular vectors and its eigenvalues the σ²;
    the other side is one product, √Σ_r·V_rᵀ = Σ_r^(-1/2)·U_rᵀ·A (or U_r·√Σ_r = A·V_r·Σ_r^(-1/2)).
    So up·down = U_r·U_rᵀ·A, the projection of A on the computed subspace.

    Squaring costs precision at the bottom of the spectrum: the eigenvalues carry an absolute
    error ~ε·σ_1² (ε = 2.2e-16), i.e. σ_r a relative one ~ε·(σ_1/σ_r)², ~1e-6 at the threshold.
    So when σ_r < GRAM_MIN_RELATIVE_SIGMA·σ_1 (an ill-conditioned cut, or a rank-deficient A
    with σ_r = 0) the full float64 SVD is used instead.
    """
    assert 1 <= rank <= min(a.shape), f"rank {rank} outside [1, {min(a.shape)}] for a {tuple(a.shape)} matrix"
    a = a.detach().to(float64_device(a.device), torch.float64)  # (m, n); MPS: on the CPU
    wide = a.shape[0] <= a.shape[1]
    top = _gram_top(a @ a.T if wide else a.T @ a, rank)  # Gram (k, k), k = min(m, n)
    if top is None:
        log.debug("σ_r/σ_1 below %g for a %s matrix at rank %d: full SVD",
                  GRAM_MIN_RELATIVE_SIGMA, tuple(a.shape), rank)
        u, s, vh = torch.linalg.svd(a, full_matrices=False)  # (m, k), (k,), (k, n)
        return _balanced(u, s, vh, rank)
    vectors, root = top
    if wide:  # vectors = U_r
        return vectors * root, (vectors / root).T @ a  # (m, r), (r, n)
    return a @ (vectors / root), (vectors * root).T  # vectors = V_r: (m, r), (r, n)


def _gram_top(gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """From the Gram matrix (k, k) of some A (destroyed on the CPU): its top r eigenvectors (k, r),
    one side's singular vectors of A, and √σ_1 ≥ … ≥ √σ_r (r,); None when σ_r is below
    GRAM_MIN_RELATIVE_SIGMA·σ_1 and the route is not precise enough (see `top_factors`)."""
    top, vectors = _top_eigenpairs(gram, rank)  # (r,) σ_1² ≥ … ≥ σ_r², (k, r)
    if not top[-1].item() >= GRAM_MIN_RELATIVE_SIGMA**2 * top[0].item() > 0:
        return None
    return vectors, top.sqrt().sqrt()


def balance_factors(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product up·down with every component j rescaled so ‖up[:, j]‖ = ‖down[j, :]‖.

    Whitened and curvature-aware factors put S⁻¹ (or L_G⁻ᵀ) on one side only, so one factor's
    entries can be 10²–10³ times the other's; a per-element optimizer (Adam) fine-tuning them
    then moves the small factor by far more, relative to its size, than the large one.
    Balanced, both sides of a component carry √(‖up_j‖·‖down_j‖), as plain SVD's U√Σ and √ΣVᵀ do.
    A component with a zero side is left alone."""
    up_norm, down_norm = up.norm(dim=0), down.norm(dim=1)  # (r,), (r,)
    live = (up_norm > 0) & (down_norm > 0)
    scale = torch.where(live, (down_norm / torch.where(live, up_norm, 1.0)).sqrt(), 1.0)
    return up * scale, down / scale[:, None]


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced truncated-SVD factors, float32: up = U_r·√S_r (out, r), down = √S_r·V_rᵀ (r, in)."""
    up, down = top_factors(weight, rank)  # (out, r), (r, in)
    return up.to(torch.float32), down.to(torch.float32)


@register_factorizer("svd")
@dataclass(frozen=True)
class PlainSVD:
    """Data-free truncated SVD of the weight itself."""

    needs_stats: ClassVar[bool] = False
    needs_gradients: ClassVar[bool] = False

    def spectrum(self, weight: torch.Tensor, stats: Any | None = None) -> torch.Tensor:
        return singular_values(weight)

    def factors(self, weight: torch.Tensor, rank: int, stats: Any | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return svd_factors(weight, rank)


# --- data-aware factorizers ----------------------------------------------------------------

JITTERS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)  # tried in turn, × mean(diag(XᵀX)), when Cholesky fails
EIGEN_FLOOR = 1e-6  # × mean(diag(XᵀX)): eigenvalue floor of the last-resort square root


def _label(stats: InputStats) -> str:
    return ", ".join(stats.names) if stats.names else "this layer"


def _require_stats(method: str, weight: torch.Tensor, stats: InputStats | None) -> InputStats:
    if stats is None:
        raise WeloreError(
            f"The {method} factorizer needs statistics of each layer's inputs on calibration text; "
            "give calibration text (--calib), or use the data-free svd factorizer."
        )
    in_features = weight.shape[1]
    assert stats.xtx.shape == (in_features, in_features), (
        f"input statistics of shape {tuple(stats.xtx.shape)} do not fit a weight of shape {tuple(weight.shape)}"
    )
    stats.check(_label(stats))
    return stats


@dataclass(frozen=True)
class Whitening:
    """A square root S (in, in) of XᵀX = S·Sᵀ, float64.

    Normally the lower-triangular Cholesky factor; when XᵀX is too far from positive definite,
    the symmetric root Q·diag(√λ)·Qᵀ of its eigen-decomposition, eigenvalues clamped at a floor.
    """

    root: torch.Tensor  # (in, in) S
    jitter: float | None  # λ: S·Sᵀ = XᵀX + λ·mean(diag(XᵀX))·I; 0 if none was needed, None for the eigen root
    eigvecs: torch.Tensor | None = None  # (in, in) Q, only for the eigen-decomposition root
    root_eigs: torch.Tensor | None = None  # (in,) √λ clamped, only for the eigen-decomposition root

    def right_solve(self, a: torch.Tensor) -> torch.Tensor:
        """a·S⁻¹ for a (r, in), without forming S⁻¹."""
        if self.eigvecs is None:
            return torch.linalg.solve_triangular(self.root, a, upper=False, left=False)  # X·S = a
        return ((a @ self.eigvecs) / self.root_eigs) @ self.eigvecs.T  # a·Q·diag(1/√λ)·Qᵀ


# stats object -> (xtx version, Whitening): q/k/v share one InputStats, and the rank allocation
# (spectrum) and the factorization (factors) both need S; compute it, and warn, once.
_WHITENINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def whitening(stats: InputStats, shrinkage: float = 0.0) -> Whitening:
    """S with S·Sᵀ = XᵀX + shrinkage·diag(XᵀX) (+ jitter if needed), float64 on the statistics'
    device, cached per stats."""
    key = (stats.xtx._version, stats.xtx.data_ptr(), shrinkage)
    cached = _WHITENINGS.get(stats)
    if cached is not None and cached[0] == key:
        return cached[1]
    xtx = stats.xtx.to(torch.float64)
    if shrinkage:
        xtx = xtx + torch.diag(shrinkage * xtx.diagonal())
    result = _whitening(xtx, _label(stats))
    _WHITENINGS[stats] = (key, result)
    return result


def _whitening(xtx: torch.Tensor, label: str) -> Whitening:
    root, info = torch.linalg.cholesky_ex(xtx)
    if info.item() == 0:
        return Whitening(root=root, jitter=0.0)
    scale = xtx.diagonal().mean().item()
    eye = torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
    for jitter in JITTERS:
        root, info = torch.linalg.cholesky_ex(xtx + (jitter * scale) * eye)
        if info.item() == 0:
            log.warning(
                "XᵀX of %s is not positive definite; whitening with jitter %g × mean diagonal added",
                label, jitter,
            )
            return Whitening(root=root, jitter=jitter)
    floor = EIGEN_FLOOR * scale if scale > 0 else 1.0
    eigs, eigvecs = torch.linalg.eigh(xtx)  # ascending, (in,), (in, in)
    root_eigs = eigs.clamp_min(floor).sqrt()
    log.warning(
        "XᵀX of %s is not positive definite even with jitter %g × mean diagonal; whitening with "
        "the symmetric square root of its eigen-decomposition instead, eigenvalues clamped at %.3g",
        label, JITTERS[-1], floor,
    )
    return Whitening(root=(eigvecs * root_eigs) @ eigvecs.T, jitter=None, eigvecs=eigvecs, root_eigs=root_eigs)


@register_factorizer("whiten")
@dataclass(frozen=True)
class Whiten:
    """SVD-LLM: truncated SVD of W·S, S the Cholesky factor of the inputs' XᵀX; output-optimal.

    With `shrinkage` λ > 0, S·Sᵀ = XᵀX + λ·diag(XᵀX): a ridge towards per-channel scaling
    that trusts few calibration tokens less (λ = 0, the default, is SVD-LLM exactly)."""

    shrinkage: float = 0.0  # λ ≥ 0: whiten with XᵀX + λ·diag(XᵀX)
    needs_stats: ClassVar[bool] = True
    needs_gradients: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not 0 <= self.shrinkage < float("inf"):
            raise WeloreError(f"Whitening shrinkage {self.shrinkage} must be a non-negative number; "
                              "0 is SVD-LLM's whitening.")

    def spectrum(self, weight: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
        """Singular values of W·S: σ_j² is the output error (on the calibration tokens) of cutting j."""
        stats = _require_stats("whiten", weight, stats)
        if weight.shape[0] <= weight.shape[1]:  # (W·S)·(W·S)ᵀ = W·XᵀX·Wᵀ: no root needed
            return gram_singular_values(self._output_gram(weight, stats))
        root = whitening(stats, self.shrinkage).root
        return gram_singular_values(root.T @ _row_gram(weight, root.device) @ root)  # (W·S)ᵀ·(W·S) = Sᵀ·WᵀW·S

    def factors(self, weight: torch.Tensor, rank: int, stats: InputStats | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-r factors of W·S, mapped back: up·down = W_r minimises ‖(W − W_r)·Xᵀ‖_F.

        Both orientations work from the smaller Gram matrix of W·S, formed without W·S itself and
        with W in float64 a block of rows at a time (`_output_gram`, `_row_gram`): down_proj and
        gate_proj of a 1.1B model then need 0.1–0.15 GB beyond their statistics instead of 0.3."""
        stats = _require_stats("whiten", weight, stats)
        wide = weight.shape[0] <= weight.shape[1]
        if wide:  # U_r of W·S from W·XᵀX·Wᵀ; W_r = U_r·U_rᵀ·W, so √Σ_r·V_rᵀ·S⁻¹ = Σ_r^(-1/2)·U_rᵀ·W
            top = _gram_top(self._output_gram(weight, stats), rank)
            if top is not None:
                vectors, root = top  # (out, r), (r,)
                up, down = vectors * root, _left_product((vectors / root).T, weight)  # (out, r), (r, in)
                return up.to(weight.device, torch.float32), down.to(weight.device, torch.float32)
        white = whitening(stats, self.shrinkage)
        if not wide:  # V_r of W·S from Sᵀ·WᵀW·S; up = W·S·V_r·Σ_r^(-1/2), down = √Σ_r·V_rᵀ·S⁻¹
            top = _gram_top(white.root.T @ _row_gram(weight, white.root.device) @ white.root, rank)
            if top is not None:
                vectors, root = top  # (in, r), (r,)
                up = _right_product(weight, white.root @ (vectors / root))  # (out, r)
                down = white.right_solve((vectors * root).T)  # (r, in)
                return up.to(weight.device, torch.float32), down.to(weight.device, torch.float32)
        w = weight.detach().to(white.root.device, torch.float64)  # (out, in); σ_r too small for a Gram route
        up, down = top_factors(w @ white.root, rank)  # (out, r), (r, in) in the whitened space
        down = white.right_solve(down)  # (r, in): √Σ_r·V_rᵀ·S⁻¹
        return up.to(weight.device, torch.float32), down.to(weight.device, torch.float32)

    def _output_gram(self, weight: torch.Tensor, stats: InputStats, rows: int = ROWS) -> torch.Tensor:
        """W·(XᵀX + λ·diag(XᵀX))·Wᵀ (out, out), float64, `rows` rows of W at a time.

        For a weight with no more outputs than inputs (o_proj, down_proj, k/v) this is the small
        Gram matrix of W·S, so its spectrum and top factors need no Cholesky factor S (in, in)
        nor a solve with it. Where XᵀX is singular this is exact, with no jitter."""
        xtx = stats.xtx
        w = weight.detach().to(xtx.device)  # (out, in), in its own dtype
        shrink = self.shrinkage * xtx.diagonal() if self.shrinkage else None  # (in,)
        out = w.shape[0]
        gram = torch.zeros(out, out, dtype=torch.float64, device=xtx.device)  # (out, out)
        for i in range(0, out, rows):
            part = w[i:i + rows].to(torch.float64)  # (rows, in)
            left = part @ xtx  # (rows, in)
            if shrink is not None:
                left += part * shrink
            for j in range(0, i + rows, rows):  # the lower triangle and diagonal blocks: all eigh reads
                torch.matmul(left, w[j:j + rows].to(torch.float64).T, out=gram[i:i + rows, j:j + rows])
        return gram  # the lower triangle (and diagonal blocks), all that the symmetric eigen-solvers read


def _row_gram(weight: torch.Tensor, device: torch.device, rows: int = ROWS) -> torch.Tensor:
    """WᵀW (in, in), float64 on `device`, summed over blocks of `rows` rows of W."""
    w = weight.detach().to(device)
    gram = torch.zeros(w.shape[1], w.shape[1], dtype=torch.float64, device=device)
    for i in range(0, w.shape[0], rows):
        part = w[i:i + rows].to(torch.float64)  # (rows, in)
        gram.addmm_(part.T, part)
    return gram


def _right_product(weight: torch.Tensor, right: torch.Tensor, rows: int = ROWS) -> torch.Tensor:
    """W·right (out, r), float64, with W in float64 `rows` rows at a time."""
    w = weight.detach().to(right.device)
    return torch.cat([w[i:i + rows].to(torch.float64) @ right for i in range(0, w.shape[0], rows)])


def _left_product(left: torch.Tensor, weight: torch.Tensor, rows: int = ROWS) -> torch.Tensor:
    """left·W (r, in), float64, with W in float64 `rows` rows at a time (left: (r, out))."""
    w = weight.detach().to(left.device)
    result = torch.zeros(left.shape[0], w.shape[1], dtype=torch.float64, device=left.device)
    for i in range(0, w.shape[0], rows):
        result.addmm_(left[:, i:i + rows], w[i:i + rows].to(torch.float64))
    return result


@register_factorizer("asvd")
@dataclass(frozen=True)
class ASVD:
    """ASVD: truncated SVD of W·diag(s), s_j = (mean |x_j|)^α, unscaled by diag(1/s) after."""

    alpha: float = 0.5  # exponent of the channel scales; 0 gives plain SVD
    floor: float = 1e-6  # mean |x_j| below floor × max_j mean |x_j| is raised to it (dead channels)
    needs_stats: ClassVar[bool] = True
    needs_gradients: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not 0 <= self.alpha < float("inf"):
            raise WeloreError(f"ASVD alpha {self.alpha} must be a non-negative number; the paper uses 0.5.")
        if not 0 < self.floor < 1:
            raise WeloreError(f"ASVD floor {self.floor} is outside (0, 1); use e.g. 1e-6.")

    def scales(self, stats: InputStats) -> torch.Tensor:
        """s (in,) float64: the input channels' mean |x|, floored, to the power α."""
        mean = stats.mean_abs.to(torch.float64)  # (in,)
        low = max(self.floor * mean.max().item(), torch.finfo(torch.float64).tiny)
        return mean.clamp_min(low).pow(self.alpha)

    def spectrum(self, weight: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
        """Singular values of W·diag(s)."""
        scale = self.scales(_require_stats("asvd", weight, stats))
        return singular_values(weight.detach().to(scale.device, torch.float64) * scale)

    def factors(self, weight: torch.Tensor, rank: int, stats: InputStats | None) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.scales(_require_stats("asvd", weight, stats))  # (in,)
        w = weight.detach().to(scale.device, torch.float64)  # (out, in)
        up, down = top_factors(w * scale, rank)  # truncated SVD of W·diag(s)
        down = down / scale  # (r, in): √Σ_r·V_rᵀ·diag(1/s)
        return up.to(weight.device, torch.float32), down.to(weight.device, torch.float32)


# --- curvature-aware factorizers -------------------------------------------------------------


def _require_curvature(method: str, weight: torch.Tensor, stats: Any | None) -> CurvatureStats:
    from welore.lowrank.curvature import CurvatureStats

    if stats is None:
        raise WeloreError(
            f"The {method} factorizer needs the gradients of the LM loss on calibration text; "
            "give calibration text (--calib), or use the data-free svd factorizer."
        )
    if not isinstance(stats, CurvatureStats):
        raise WeloreError(
            f"The {method} factorizer needs output-gradient statistics besides the input statistics; "
            "compress through compress_ (or welore compress) with calibration text, which gathers both."
        )
    out_features, in_features = weight.shape
    assert stats.grads.ggt.shape == (out_features, out_features) and stats.grads.in_features == in_features, (
        f"gradient statistics of shape {tuple(stats.grads.ggt.shape)} do not fit a weight of shape "
        f"{tuple(weight.shape)}"
    )
    _require_stats(method, weight, stats.inputs)
    stats.grads.check(", ".join(stats.grads.names) or "this layer")
    return stats


def output_whitening(grads: GradientStats, damping: float) -> Whitening:
    """L_G (out, out) with L_G·L_Gᵀ = G + damping·mean(diag(G))·I, G = Σ g·gᵀ / loss_tokens,
    float64, cached per statistics (the allocation and the factorization both need it)."""
    key = (grads.ggt._version, grads.ggt.data_ptr(), grads.loss_tokens, damping)
    cached = _WHITENINGS.get(grads)
    if cached is not None and cached[0] == key:
        return cached[1]
    g = grads.covariance  # (out, out) float64
    scale = g.diagonal().mean().item()
    g = g + (damping * scale) * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    result = _whitening(g, f"the output gradients of {', '.join(grads.names) or 'this layer'}")
    _WHITENINGS[grads] = (key, result)
    return result


@register_factorizer("kfac")
@dataclass(frozen=True)
class KFAC:
    """Kronecker-factored curvature (K-FAC; KFAC-SVD): truncated SVD of L_Gᵀ·W·L_A, mapped back.

    The empirical Fisher of W (out, in) is approximated by A ⊗ G, A = XᵀX/N the covariance of
    the layer's inputs and G = E[g·gᵀ] that of the LM loss's gradients at its outputs
    (`welore.lowrank.curvature`). The second-order estimate of the mean loss increase of a change ΔW
    is then ½·tr(ΔW·A·ΔWᵀ·G) = ½·‖L_Gᵀ·ΔW·L_A‖²_F with A = L_A·L_Aᵀ, G = L_G·L_Gᵀ, so the best
    rank-r W_r for that estimate is L_G⁻ᵀ·[L_Gᵀ·W·L_A]_r·L_A⁻¹ (Eckart–Young in the doubly
    whitened space) and cutting component j adds ½·σ_j² of L_Gᵀ·W·L_A to the loss (nats per
    token): the spectra are in loss units, comparable across matrices, so the `loss` policy's
    global greedy on σ² per parameter allocates ranks by the same estimate. `whiten` is the
    special case G = I: every output direction matters equally, whatever the loss does with it.
    """

    damping: float = 1e-2  # λ > 0: L_G·L_Gᵀ = G + λ·mean(diag(G))·I (output directions the few calibration gradients
        # never excite still count a little)
    shrinkage: float = 0.0  # input side as whiten's: L_A·L_Aᵀ ∝ XᵀX + shrinkage·diag(XᵀX)
    needs_stats: ClassVar[bool] = True
    needs_gradients: ClassVar[bool] = True  # stats are CurvatureStats (welore.lowrank.curvature.gradient_stats)

    def __post_init__(self) -> None:
        if not 0 < self.damping < float("inf"):
            raise WeloreError(f"K-FAC damping {self.damping} must be a positive number; use e.g. 0.01.")
        if not 0 <= self.shrinkage < float("inf"):
            raise WeloreError(f"K-FAC shrinkage {self.shrinkage} must be a non-negative number; "
                              "0 whitens with XᵀX itself.")

    def _whitened(self, weight: torch.Tensor, stats: Any | None) -> tuple[torch.Tensor, Whitening, Whitening, int]:
        """L_Gᵀ·W·S (out, in) float64 with S·Sᵀ = XᵀX (so L_A = S/√N), both roots, and N."""
        stats = _require_curvature("kfac", weight, stats)
        inputs, outputs = whitening(stats.inputs, self.shrinkage), output_whitening(stats.grads, self.damping)
        w = weight.detach().to(inputs.root.device, torch.float64)  # (out, in)
        return outputs.root.T @ w @ inputs.root, inputs, outputs, stats.inputs.tokens

    def spectrum(self, weight: torch.Tensor, stats: Any | None) -> torch.Tensor:
        """Singular values of L_Gᵀ·W·L_A: ½·σ_j² is the estimated mean loss increase of cutting j."""
        whitened, _, _, tokens = self._whitened(weight, stats)
        return singular_values(whitened) / tokens**0.5

    def factors(self, weight: torch.Tensor, rank: int, stats: Any | None) -> tuple[torch.Tensor, torch.Tensor]:
        whitened, inputs, outputs = self._whitened(weight, stats)[:3]
        up, down = top_factors(whitened, rank)  # (out, r), (r, in) in the doubly whitened space
        up = outputs.right_solve(up.T).T  # (out, r): L_G⁻ᵀ·U_r·√Σ_r
        down = inputs.right_solve(down)  # (r, in): √Σ_r·V_rᵀ·S⁻¹
        return up.to(weight.device, torch.float32), down.to(weight.device, torch.float32)


@register_factorizer("fisher")
@dataclass(frozen=True)
class Fisher:
    """FWSVD (Hsu et al., ICLR 2022): truncated SVD of diag(d)·W, d_i² the row's mean Fisher, unscaled after.

    The Fisher information of W_ij, Σ_b (∂loss_b/∂W_ij)² over calibration windows b, is taken
    constant along each row (its mean f_i); the loss estimate ½·Σ_i f_i·‖ΔW_i‖² is then
    ‖diag(√f)·ΔW‖²_F / 2, minimised by the truncated SVD of diag(√f)·W. Cheaper than `kfac`
    to apply (no out×out or in×in root), blind to correlations between rows and between inputs.
    """

    floor: float = 1e-6  # f_i below floor × max_i f_i is raised to it (rows the loss never reached)
    needs_stats: ClassVar[bool] = True
    needs_gradients: ClassVar[bool] = True  # stats are CurvatureStats (welore.lowrank.curvature.gradient_stats)

    def __post_init__(self) -> None:
        if not 0 < self.floor < 1:
            raise WeloreError(f"Fisher floor {self.floor} is outside (0, 1); use e.g. 1e-6.")

    def row_weights(self, weight: torch.Tensor, stats: Any | None) -> torch.Tensor:
        """d (out,) float64: √f_i, the floored root mean Fisher of every row."""
        fisher = _require_curvature("fisher", weight, stats).grads.mean_row_fisher  # (out,)
        low = max(self.floor * fisher.max().item(), torch.finfo(torch.float64).tiny)
        return fisher.clamp_min(low).sqrt()

    def spectrum(self, weight: torch.Tensor, stats: Any | None) -> torch.Tensor:
        """Singular values of diag(d)·W: ½·σ_j² is the estimated mean loss increase of cutting j."""
        rows = self.row_weights(weight, stats)
        return singular_values(rows[:, None] * weight.detach().to(rows.device, torch.float64))

    def factors(self, weight: torch.Tensor, rank: int, stats: Any | None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.row_weights(weight, stats)  # (out,)
        up, down = top_factors(rows[:, None] * weight.detach().to(rows.device, torch.float64), rank)
        up = up / rows[:, None]  # (out, r): diag(1/d)·U_r·√Σ_r
        return up.to(weight.device, torch.float32), down.to(weight.device, torch.float32)
