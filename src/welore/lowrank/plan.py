"""Rank plans and the allocation policies that produce them.

A *rank plan* is data: for every target matrix (by module name) its (out, in) shape and the
rank it keeps, or `None` when it stays dense. It is saved as JSON and can be replayed on the
same model without recomputing anything. A matrix of shape m×n kept at rank r costs r·(m+n)
parameters instead of m·n; a plan never factorizes a matrix at a rank where r·(m+n) ≥ m·n.

Allocation policies live in a registry (`POLICIES`) and share one signature:
`policy(spectra, shapes, ratio) -> {name: rank or None}`, where `ratio` is the fraction of
the target matrices' parameters to remove.

- `uniform`: every matrix at r ≈ (1 − ratio)·m·n/(m+n) (the plain SVD baseline).
- `welore`: Jaiswal et al. 2024 ("From GaLore to WeLore"): min–max normalise each spectrum
  and drop the components below ONE global threshold, found here by search for any model.
- `energy`: minimise Σ_i (truncated energy of matrix i / its total energy) for the budget:
  each component is worth σ²/(E·(m+n)) per parameter and ranks decrease in σ, so keeping
  every component above one global value of that score is the optimal greedy allocation.
- `loss`: the same greedy rule on absolute σ² instead of relative energy; on whitened spectra
  it minimises the summed output error of all layers (data-aware allocation), on `kfac` or
  `fisher` spectra the estimated increase of the LM loss.
- `minimax`: minimise the *largest* relative truncation error of any matrix: every matrix keeps
  the smallest rank whose dropped energy fraction is below one global bound, searched for the
  budget. On whitened spectra that bound is each layer's relative output error on the
  calibration text, so no layer is left much worse than the others.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from welore._io import write_json
from welore.errors import WeloreError
from welore.lowrank.spectrum import normalized
from welore.versioned import check_version, report_unknown

PLAN_FORMAT_VERSION = 1
PLAN_KEYS = ("format", "version", "method", "requested_ratio", "achieved_ratio", "meta", "matrices")  # to_dict's

Shape = tuple[int, int]  # (out_features, in_features)
Policy = Callable[[dict[str, torch.Tensor], dict[str, Shape], float], dict[str, "int | None"]]


def factorized_cost(shape: Shape, rank: int | None) -> int:
    """Parameters of a matrix kept at `rank` (None = dense)."""
    m, n = shape
    return m * n if rank is None else rank * (m + n)


def settle(shape: Shape, rank: int) -> int | None:
    """`rank`, or None where factorizing at that rank would not save parameters."""
    m, n = shape
    return None if rank * (m + n) >= m * n else max(1, rank)


def plan_cost(shapes: dict[str, Shape], ranks: dict[str, int | None]) -> int:
    """Parameters of all the matrices at these ranks (None = dense)."""
    return sum(factorized_cost(shapes[name], rank) for name, rank in ranks.items())


def max_ratio(shapes: dict[str, Shape]) -> float:
    """The largest reachable ratio: every matrix at rank 1."""
    total = sum(m * n for m, n in shapes.values())
    return 1 - sum(min(m + n, m * n) for m, n in shapes.values()) / total


@dataclass
class RankPlan:
    ranks: dict[str, int | None]  # module name -> kept rank; None = stays dense
    shapes: dict[str, Shape]  # module name -> (out_features, in_features)
    method: str = "manual"  # the policy that made the plan
    requested_ratio: float | None = None  # the ratio asked for, if any
    meta: dict = field(default_factory=dict)  # free-form provenance (model, threshold, ...)
    version: int = PLAN_FORMAT_VERSION

    def __post_init__(self) -> None:
        if set(self.ranks) != set(self.shapes):
            raise WeloreError("The rank plan's ranks and shapes name different matrices; regenerate the plan.")
        for name, rank in self.ranks.items():
            m, n = self.shapes[name]
            if rank is not None and not (1 <= rank and rank * (m + n) < m * n):
                raise WeloreError(
                    f"The rank plan keeps {name} ({m}x{n}) at rank {rank}, which saves no parameters "
                    f"(use a rank between 1 and {(m * n - 1) // (m + n)} or null for dense)."
                )

    @property
    def total_params(self) -> int:
        return sum(m * n for m, n in self.shapes.values())

    @property
    def kept_params(self) -> int:
        return plan_cost(self.shapes, self.ranks)

    @property
    def achieved_ratio(self) -> float:
        """Fraction of the target matrices' parameters removed."""
        return 1 - self.kept_params / self.total_params

    @property
    def factorized(self) -> list[str]:
        return [n for n, r in self.ranks.items() if r is not None]

    def kept_fraction(self, name: str) -> float:
        """Kept rank / full rank (1.0 for a dense matrix)."""
        rank, full = self.ranks[name], min(self.shapes[name])
        return 1.0 if rank is None else rank / full

    def lrc(self, min_cut: float = 0.5) -> list[str]:
        """WeLore's low-rank components: matrices whose rank is cut by at least `min_cut`."""
        return [n for n in self.ranks if 1 - self.kept_fraction(n) >= min_cut]

    def to_dict(self) -> dict:
        return {
            "format": "welore-rank-plan",
            "version": self.version,
            "method": self.method,
            "requested_ratio": self.requested_ratio,
            "achieved_ratio": self.achieved_ratio,
            "meta": self.meta,
            "matrices": {
                n: {"shape": list(self.shapes[n]), "rank": r} for n, r in self.ranks.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict) -> RankPlan:
        if not isinstance(data, dict) or data.get("format") != "welore-rank-plan":
            raise WeloreError("This JSON is not a welore rank plan (no \"format\": \"welore-rank-plan\"); "
                              "pass a plan written by welore.")
        check_version(data, "version", PLAN_FORMAT_VERSION, "The rank plan")
        data = report_unknown(data, PLAN_KEYS, "The rank plan")
        matrices = data.get("matrices")
        if not isinstance(matrices, dict) or not matrices:
            raise WeloreError("The rank plan has no \"matrices\" object naming modules; regenerate it with welore.")
        ranks: dict[str, int | None] = {}
        shapes: dict[str, Shape] = {}
        for name, entry in matrices.items():
            rank = entry.get("rank") if isinstance(entry, dict) else None
            shape = entry.get("shape") if isinstance(entry, dict) else None
            valid_rank = rank is None or (isinstance(rank, int) and not isinstance(rank, bool))
            valid_shape = (isinstance(shape, list) and len(shape) == 2
                           and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape))
            if not isinstance(entry, dict) or "rank" not in entry or not valid_rank or not valid_shape:
                raise WeloreError(
                    f"The rank plan's entry for {name} must be {{\"shape\": [out, in], \"rank\": integer or null}}, "
                    f"got {entry!r}; fix or regenerate the plan."
                )
            ranks[name], shapes[name] = rank, (shape[0], shape[1])
        return cls(ranks=ranks, shapes=shapes, method=data.get("method", "manual"),
                   requested_ratio=data.get("requested_ratio"), meta=data.get("meta", {}))

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> RankPlan:
        path = Path(path)
        if not path.is_file():
            raise WeloreError(f"Rank plan file {path} does not exist; check the path.")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise WeloreError(f"Cannot read rank plan {path} as JSON ({err}); pass a plan written by welore.") from None
        return cls.from_dict(data)


POLICIES: dict[str, Policy] = {}
SHAPE_ONLY: set[str] = set()  # policies whose ranks follow from the shapes alone (no spectra needed)


def register_policy(name: str, needs_spectra: bool = True) -> Callable[[Policy], Policy]:
    """Register an allocation policy as `name`; `needs_spectra=False` for one that reads only the
    shapes, so callers can skip computing spectra for it (`needs_spectra`)."""
    def register(fn: Policy) -> Policy:
        POLICIES[name] = fn
        if not needs_spectra:
            SHAPE_ONLY.add(name)
        return fn

    return register


def needs_spectra(method: str) -> bool:
    """Whether the allocation policy `method` reads the spectra (all but the shape-only ones)."""
    return method not in SHAPE_ONLY


def check_ratio(ratio: float, shapes: dict[str, Shape]) -> None:
    if not 0 < ratio < 1:
        raise WeloreError(f"Ratio {ratio} is outside (0, 1); it is the fraction of target parameters to remove, "
                          "e.g. 0.2.")
    reachable = max_ratio(shapes)
    if reachable <= 0:
        raise WeloreError("None of the target matrices can be factorized at a rank that saves parameters (each is too "
                          "small or too thin); choose other targets.")
    if ratio > reachable:
        raise WeloreError(f"Ratio {ratio} is unreachable: even rank 1 everywhere removes only {reachable:.4f} of the "
                          "target parameters; ask for less.")


@register_policy("uniform", needs_spectra=False)
def uniform_policy(spectra: dict[str, torch.Tensor], shapes: dict[str, Shape], ratio: float) -> dict[str, int | None]:
    """Every matrix at the rank r* = keep·m·n/(m+n), keep = 1 − ratio, rounded to fit the budget.

    Every matrix is counted at what it really costs: one that cannot be cut below rank 1, or must
    stay dense (a 1×N matrix), costs more than its share, so where that overdraws the budget
    `keep` is lowered (by bisection) until the plan fits: the other matrices pay for it.
    Flooring every r* alone overshoots the ratio by up to (m+n)/Σm·n per matrix; the parameters
    that flooring frees are handed back one rank at a time, largest fractional part first. A
    matrix that one more rank would leave dense costs only its m·n then, and what that leaves
    of its step is re-spent on the matrices after it.
    """
    budget = (1 - ratio) * sum(m * n for m, n in shapes.values())

    def floors(keep: float) -> dict[str, int | None]:
        return {name: settle((m, n), max(1, int(keep * m * n / (m + n)))) for name, (m, n) in shapes.items()}

    keep = 1 - ratio
    if plan_cost(shapes, floors(keep)) > budget:  # rank-1 or dense matrices overdraw: the others give it up
        low, high = 0.0, keep  # floors(0) keeps rank 1 or dense everywhere, which check_ratio found to fit
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if plan_cost(shapes, floors(mid)) <= budget else (low, mid)
        keep = low
    ranks = floors(keep)
    spent = plan_cost(shapes, ranks)
    ideal = {name: keep * m * n / (m + n) for name, (m, n) in shapes.items()}
    for name in sorted(ideal, key=lambda k: ideal[k] - int(ideal[k]), reverse=True):
        rank = ranks[name]
        if rank is None or ideal[name] <= rank:
            continue
        grown = settle(shapes[name], rank + 1)  # None: one more rank would save nothing, so dense
        extra = factorized_cost(shapes[name], grown) - factorized_cost(shapes[name], rank)
        if spent + extra <= budget:
            ranks[name] = grown
            spent += extra
    return ranks


def threshold_allocation(
    scores: dict[str, torch.Tensor], shapes: dict[str, Shape], ratio: float
) -> tuple[dict[str, int | None], float]:
    """Keep, in every matrix, the components whose score is ≥ one global threshold t.

    Scores must be non-increasing along each spectrum so that "score ≥ t" keeps a top-r
    prefix. The total cost is non-increasing in t, so bisection over the sorted scores finds
    the smallest t whose plan removes at least `ratio` of the parameters. Returns the ranks
    and t.
    """
    budget = (1 - ratio) * sum(m * n for m, n in shapes.values())
    ascending = {n: s.flip(0).contiguous() for n, s in scores.items()}

    def ranks_at(t: float) -> dict[str, int | None]:
        ranks = {}
        for n, s in ascending.items():
            kept = len(s) - int(torch.searchsorted(s, torch.tensor([t], dtype=s.dtype)).item())
            ranks[n] = settle(shapes[n], max(1, kept))
        return ranks

    def cost(t: float) -> int:
        return plan_cost(shapes, ranks_at(t))

    candidates = torch.unique(torch.cat([s for s in scores.values()]))  # ascending
    lo, hi = 0, len(candidates) - 1
    if cost(candidates[hi].item()) > budget:  # even the strictest threshold keeps too much
        hi_t = float("inf")
        return ranks_at(hi_t), hi_t
    while lo < hi:  # smallest index whose cost fits the budget
        mid = (lo + hi) // 2
        if cost(candidates[mid].item()) <= budget:
            hi = mid
        else:
            lo = mid + 1
    t = candidates[lo].item()
    return ranks_at(t), t


@register_policy("welore")
def welore_policy(spectra: dict[str, torch.Tensor], shapes: dict[str, Shape], ratio: float) -> dict[str, int | None]:
    ranks, _ = threshold_allocation({n: normalized(s) for n, s in spectra.items()}, shapes, ratio)
    return ranks


@register_policy("energy")
def energy_policy(spectra: dict[str, torch.Tensor], shapes: dict[str, Shape], ratio: float) -> dict[str, int | None]:
    scores = {}
    for n, s in spectra.items():
        m, k = shapes[n]
        energy = (s**2).sum().clamp_min(torch.finfo(s.dtype).tiny)
        scores[n] = s**2 / energy / (m + k)  # relative energy kept per parameter spent
    ranks, _ = threshold_allocation(scores, shapes, ratio)
    return ranks


@register_policy("loss")
def loss_policy(spectra: dict[str, torch.Tensor], shapes: dict[str, Shape], ratio: float) -> dict[str, int | None]:
    """Minimise the total absolute truncation loss Σ_i Σ_{j>r_i} σ_ij² for the budget.

    With whitened spectra (`whiten` factorizer) σ_ij² is exactly what dropping component j adds
    to the squared output error of layer i on the calibration text (SVD-LLM), so this is the
    data-aware global allocation; with plain spectra it minimises the summed Frobenius error.
    With curvature spectra (`kfac`: singular values of L_Gᵀ·W·L_A; `fisher`: of diag(√f)·W)
    ½·σ_ij² is the estimated increase of the mean LM loss from dropping it, so the allocation
    minimises the estimated loss increase of the whole model (the same estimate that shapes
    each matrix's truncation).
    """
    scores = {n: s**2 / sum(shapes[n]) for n, s in spectra.items()}  # loss avoided per parameter
    ranks, _ = threshold_allocation(scores, shapes, ratio)
    return ranks


@register_policy("minimax")
def minimax_policy(spectra: dict[str, torch.Tensor], shapes: dict[str, Shape], ratio: float) -> dict[str, int | None]:
    """Minimise max_i (Σ_{j>r_i} σ_ij² / Σ_j σ_ij²) for the budget.

    Component j of a matrix is scored by the energy fraction from j to the end of its spectrum,
    the relative error the matrix would have if it kept only j−1 components. That score falls
    along the spectrum, so keeping every component scored ≥ t leaves each matrix a relative
    error below t, and the smallest t that fits the budget is the smallest achievable bound.
    """
    scores = {}
    for n, s in spectra.items():
        energy = s.double() ** 2
        tail = energy.flip(0).cumsum(0).flip(0)  # tail[j] = Σ_{k≥j} σ_k²
        scores[n] = tail / tail[0].clamp_min(torch.finfo(torch.float64).tiny)
    ranks, _ = threshold_allocation(scores, shapes, ratio)
    return ranks


def allocate(
    method: str, spectra: dict[str, torch.Tensor], shapes: dict[str, Shape], ratio: float
) -> RankPlan:
    """Run the allocation policy `method` and return its rank plan."""
    if method not in POLICIES:
        raise WeloreError(f"Unknown method {method!r}; choose one of {', '.join(sorted(POLICIES))}.")
    check_ratio(ratio, shapes)
    ranks = POLICIES[method](spectra, shapes, ratio)
    return RankPlan(ranks=ranks, shapes=dict(shapes), method=method, requested_ratio=ratio)
