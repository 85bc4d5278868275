"""Tests for welore.lowrank.spectrum: fast singular values, spectral metrics, the on-disk cache."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_tiny

from welore._io import cache_dir
from welore.errors import WeloreError
from welore.lowrank import spectrum
from welore.lowrank.spectrum import (
    compute_spectra,
    energy_rank,
    normalized,
    power_law_alpha,
    singular_values,
    spectral_metrics,
    weights_fingerprint,
)
from welore.targets import find_targets, weight_matrix


def _matrix(m: int, n: int, rank: int | None = None, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(m, n, generator=generator)
    a = torch.randn(m, rank, generator=generator)
    b = torch.randn(rank, n, generator=generator)
    return a @ b  # (m, n) of rank `rank`


def _with_spectrum(s: torch.Tensor, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """An m×n float64 matrix whose singular values are `s` (len(s) = min(m, n))."""
    generator = torch.Generator().manual_seed(seed)
    k = len(s)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    return (u * s) @ v.T


# --- singular values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("m", "n", "rank"),
    [(96, 40, None), (40, 96, None), (64, 64, None), (80, 48, 7), (48, 80, 7), (32, 32, 1)],
    ids=["tall", "wide", "square", "rank-deficient-tall", "rank-deficient-wide", "rank-one"],
)
def test_singular_values_match_svdvals(m: int, n: int, rank: int | None) -> None:
    w = _matrix(m, n, rank)
    s = singular_values(w)
    expected = torch.linalg.svdvals(w.double())
    assert s.dtype == torch.float64
    assert s.shape == (min(m, n),)
    assert torch.all(s[:-1] >= s[1:]), "singular values must be descending"
    assert torch.all(s >= 0)
    top = expected[0]
    assert ((s - expected).abs() / top).max() < 1e-4  # relative to σ_max, zeros included
    nonzero = expected > 1e-6 * top
    assert ((s[nonzero] - expected[nonzero]).abs() / expected[nonzero]).max() < 1e-4


def test_singular_values_of_known_spectrum() -> None:
    s_true = torch.logspace(0, -4, 50, dtype=torch.float64)  # σ from 1 down to 1e-4
    w = _with_spectrum(s_true, 70, 50)
    s = singular_values(w.float())  # float32 weights, like a model's
    rel = (s - s_true).abs() / s_true
    assert rel[:30].max() < 1e-4  # σ ≥ ~4e-3·σ_max: float32 storage noise is below 1e-4 relative


def test_singular_values_accurate_far_down_the_spectrum() -> None:
    """The Gram-matrix route loses accuracy only for σ far below σ_max (its error grows like
    eps·(σ_max/σ)²): still < 1e-4 relative down to 1e-6·σ_max for float64 input."""
    s_true = torch.logspace(0, -8, 200, dtype=torch.float64)
    w = _with_spectrum(s_true, 300, 200)
    s = singular_values(w)
    rel = (s - s_true).abs() / s_true
    assert rel[s_true >= 1e-6].max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_singular_values_accept_low_precision(dtype: torch.dtype) -> None:
    w = _matrix(24, 16).to(dtype)
    s = singular_values(w)
    expected = torch.linalg.svdvals(w.double())
    assert s.dtype == torch.float64
    assert torch.allclose(s, expected, rtol=1e-6, atol=1e-8 * expected[0].item())


def test_singular_values_of_zero_matrix() -> None:
    s = singular_values(torch.zeros(5, 3))
    assert torch.equal(s, torch.zeros(3, dtype=torch.float64))


# --- metrics ---------------------------------------------------------------------------------


def test_flat_spectrum_metrics() -> None:
    n = 12
    metrics = spectral_metrics(torch.full((n,), 3.0, dtype=torch.float64))
    assert metrics.full_rank == n
    assert metrics.effective_rank == pytest.approx(n)
    assert metrics.stable_rank == pytest.approx(n)
    assert metrics.rank_99 == n
    assert metrics.mean_normalized == 1.0  # a flat spectrum normalises to all ones
    assert torch.equal(normalized(torch.full((n,), 3.0)), torch.ones(n))


def test_energy_ranks_of_handcrafted_spectrum() -> None:
    energies = torch.tensor([60.0, 25.0, 10.0, 3.5, 1.0, 0.5], dtype=torch.float64)  # Σ = 100
    s = energies.sqrt()  # cumulative energy 60, 85, 95, 98.5, 99.5, 100
    metrics = spectral_metrics(s)
    assert metrics.rank_90 == 3
    assert metrics.rank_99 == 5
    assert energy_rank(s, 0.5) == 1
    assert energy_rank(s, 0.86) == 3
    assert energy_rank(s, 1.0) == 6
    assert metrics.stable_rank == pytest.approx(100 / 60)
    p = s / s.sum()
    assert metrics.effective_rank == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert 1 <= metrics.effective_rank <= 6


def test_one_dominant_direction() -> None:
    s = torch.tensor([10.0, 1e-3, 1e-3, 1e-3], dtype=torch.float64)
    metrics = spectral_metrics(s)
    assert metrics.rank_90 == metrics.rank_99 == 1
    assert metrics.stable_rank == pytest.approx(1.0, abs=1e-6)
    assert metrics.effective_rank < 1.01


def test_alpha_is_finite_and_orders_tails() -> None:
    k = torch.arange(1, 201, dtype=torch.float64)
    heavy = k**-1.0  # σ ∝ 1/k: λ ∝ k^-2
    light = k**-0.2
    alpha_heavy, alpha_light = power_law_alpha(heavy), power_law_alpha(light)
    assert math.isfinite(alpha_heavy) and math.isfinite(alpha_light)
    assert alpha_heavy > 1 and alpha_light > 1
    assert alpha_heavy < alpha_light  # lower α = heavier tail
    assert math.isfinite(spectral_metrics(torch.linalg.svdvals(_matrix(64, 32).double())).alpha)


def test_metrics_of_random_matrix_are_in_range() -> None:
    s = singular_values(_matrix(64, 32))
    metrics = spectral_metrics(s)
    assert 1 <= metrics.rank_90 <= metrics.rank_99 <= 32
    assert 1 <= metrics.stable_rank <= 32
    assert 1 <= metrics.effective_rank <= 32
    assert 0 <= metrics.mean_normalized <= 1
    assert set(metrics.to_dict()) == {
        "full_rank", "effective_rank", "stable_rank", "rank_90", "rank_99", "alpha", "mean_normalized",
    }


def test_normalized_is_min_max() -> None:
    s = torch.tensor([5.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    assert torch.allclose(normalized(s), torch.tensor([1.0, 0.5, 0.25, 0.0], dtype=torch.float64))


# --- compute_spectra and its cache --------------------------------------------------------------


def test_compute_spectra_of_model(family: str) -> None:
    model = build_tiny(family)
    targets = find_targets(model)
    spectra = compute_spectra(targets, progress=False)
    assert list(spectra) == list(targets)
    for name, module in targets.items():
        w = weight_matrix(module)
        expected = torch.linalg.svdvals(w.double())
        assert spectra[name].shape == (min(w.shape),)
        assert ((spectra[name] - expected).abs() / expected[0]).max() < 1e-4


def test_second_call_loads_from_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_tiny("llama", seed=11)
    targets = find_targets(model)
    path = cache_dir() / "spectra" / f"{weights_fingerprint(targets)}.safetensors"
    assert not path.exists()
    first = compute_spectra(targets, progress=False)
    assert path.is_file()

    def fail(weight: torch.Tensor) -> torch.Tensor:
        raise AssertionError("singular values recomputed although they are cached")

    monkeypatch.setattr(spectrum, "singular_values", fail)
    second = compute_spectra(targets, progress=False)
    assert list(second) == list(first)
    for name in first:
        assert torch.equal(first[name], second[name])


def test_changed_weights_miss_the_cache() -> None:
    model = build_tiny("gpt2", seed=12)
    targets = find_targets(model)
    before = compute_spectra(targets, progress=False)
    name = next(iter(targets))
    with torch.no_grad():
        targets[name].weight.mul_(2.0)
    after = compute_spectra(targets, progress=False)
    assert torch.allclose(after[name], 2 * before[name])


def test_no_cache_writes_nothing() -> None:
    model = build_tiny("qwen2", seed=13)
    targets = find_targets(model)
    compute_spectra(targets, cache=False, progress=False)
    assert not (cache_dir() / "spectra" / f"{weights_fingerprint(targets)}.safetensors").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_a_user_error(bad: float) -> None:
    model = build_tiny("llama", seed=14)
    targets = find_targets(model)
    name = list(targets)[3]
    with torch.no_grad():
        targets[name].weight[0, 0] = bad
    with pytest.raises(WeloreError, match=name.replace(".", r"\.")):
        compute_spectra(targets, progress=False)
