"""Tests for the data-aware factorizers: `whiten` (SVD-LLM) and `asvd` (ASVD).

Inputs X (tokens, in) are synthetic: correlated channels plus a few outlier channels of large
magnitude, the structure that makes plain SVD truncation fail on real activations.
"""

from __future__ import annotations

import logging

import pytest
import torch

from welore.errors import WeloreError
from welore.lowrank.calibrate import InputStats
from welore.lowrank.factorize import (
    _WHITENINGS,
    ASVD,
    EVR_MAX_FRACTION,
    FACTORIZERS,
    GRAM_MIN_RELATIVE_SIGMA,
    Whiten,
    _top_eigenpairs,
    balance_factors,
    make_factorizer,
    svd_factors,
    top_factors,
    whitening,
)

OUT, IN, TOKENS = 24, 16, 200


def stats_of(x: torch.Tensor, names: list[str] | None = None) -> InputStats:
    stats = InputStats.zeros(x.shape[-1])
    stats.add_(x)
    stats.names.extend(names or [])
    return stats


def correlated_inputs(tokens: int = TOKENS, features: int = IN, outliers: int = 2, seed: int = 0) -> torch.Tensor:
    """X (tokens, in): channels mixed by a random matrix, a few of them 50× larger."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=generator) @ torch.randn(features, features, generator=generator)
    x[:, :outliers] *= 50.0
    return x  # (tokens, in)


def weight(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(OUT, IN, generator=generator) / IN**0.5  # (out, in)


def output_error(w: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    """‖(W − W_r)·Xᵀ‖_F², in float64."""
    return ((w.double() - approx.double()) @ x.double().T).pow(2).sum().item()


def test_registry_holds_data_aware_factorizers() -> None:
    assert FACTORIZERS["svd"].needs_stats is False
    assert isinstance(FACTORIZERS["whiten"], Whiten) and FACTORIZERS["whiten"].needs_stats
    assert isinstance(FACTORIZERS["asvd"], ASVD) and FACTORIZERS["asvd"].needs_stats
    assert not any(FACTORIZERS[name].needs_gradients for name in ("svd", "whiten", "asvd"))  # every factorizer says
    assert FACTORIZERS["asvd"].alpha == 0.5


@pytest.mark.parametrize("name", ["whiten", "asvd"])
def test_data_aware_factorizers_need_stats(name: str) -> None:
    factorizer = FACTORIZERS[name]
    with pytest.raises(WeloreError, match="calibration text.*--calib"):
        factorizer.spectrum(weight(), None)
    with pytest.raises(WeloreError, match="--calib"):
        factorizer.factors(weight(), 3, None)


@pytest.mark.parametrize("name", ["whiten", "asvd"])
def test_full_rank_reproduces_the_weight(name: str) -> None:
    w, x = weight(), correlated_inputs()
    up, down = FACTORIZERS[name].factors(w, IN, stats_of(x))
    assert up.shape == (OUT, IN) and down.shape == (IN, IN)
    assert up.dtype == down.dtype == torch.float32
    assert torch.allclose(up @ down, w, atol=1e-4)


def test_whiten_truncation_error_is_the_spectrum_tail() -> None:
    """‖(W − up·down)·Xᵀ‖_F² = Σ_{j>r} σ_j(W·S)²: the spectrum the allocation sees is exact."""
    w, x = weight(), correlated_inputs()
    stats = stats_of(x)
    spectrum = FACTORIZERS["whiten"].spectrum(w, stats)
    assert spectrum.dtype == torch.float64 and spectrum.device.type == "cpu"
    assert spectrum.shape == (IN,) and bool((spectrum[:-1] >= spectrum[1:]).all())
    s = whitening(stats).root
    assert torch.allclose(spectrum, torch.linalg.svdvals(w.double() @ s), rtol=1e-6)
    total = output_error(w, torch.zeros_like(w), x)
    for rank in (1, 4, 9, 15):
        up, down = FACTORIZERS["whiten"].factors(w, rank, stats)
        assert up.shape == (OUT, rank) and down.shape == (rank, IN)
        tail = spectrum[rank:].pow(2).sum().item()
        assert output_error(w, up @ down, x) == pytest.approx(tail, rel=1e-3, abs=1e-7 * total)


def test_whiten_beats_plain_svd_on_output_error() -> None:
    w, x = weight(), correlated_inputs(outliers=3)
    stats = stats_of(x)
    for rank in (2, 6, 10):
        whitened = output_error(w, torch.matmul(*FACTORIZERS["whiten"].factors(w, rank, stats)), x)
        plain = output_error(w, torch.matmul(*svd_factors(w, rank)), x)
        assert whitened < 0.5 * plain, (rank, whitened, plain)


def test_whiten_jitters_rank_deficient_inputs(caplog: pytest.LogCaptureFixture) -> None:
    """Fewer tokens than input channels: XᵀX is singular, Cholesky needs jitter, and says so."""
    w, x = weight(), correlated_inputs(tokens=IN // 2)  # rank(XᵀX) = 8 < 16
    stats = stats_of(x, names=["layers.0.q_proj", "layers.0.k_proj"])
    with caplog.at_level(logging.WARNING, logger="welore.lowrank.factorize"):
        spectrum = FACTORIZERS["whiten"].spectrum(w, stats)
        up, down = FACTORIZERS["whiten"].factors(w, IN, stats)
    jitter = whitening(stats).jitter
    assert jitter is not None and jitter > 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "the whitening is cached per statistics: one warning"
    assert "not positive definite" in warnings[0] and f"{jitter:g}" in warnings[0]
    assert "layers.0.q_proj, layers.0.k_proj" in warnings[0]
    assert torch.isfinite(spectrum).all() and torch.isfinite(up).all() and torch.isfinite(down).all()
    assert torch.allclose(up @ down, w, atol=1e-4)  # W·S·S⁻¹ = W for any invertible S
    # the inputs span 8 directions: 8 whitened components carry (almost) all the output
    up, down = FACTORIZERS["whiten"].factors(w, IN // 2, stats)
    assert output_error(w, up @ down, x) < 1e-4 * output_error(w, torch.zeros_like(w), x)


def test_whiten_falls_back_to_an_eigen_root(caplog: pytest.LogCaptureFixture) -> None:
    """A matrix far from positive definite (no Gram matrix is; a corrupt one could be): the
    symmetric eigen-root is used, with a warning, and still reproduces W at full rank."""
    x = correlated_inputs()
    stats = stats_of(x)
    v = torch.linalg.eigh(stats.xtx).eigenvectors[:, -1:]  # (in, 1) top direction
    stats.xtx -= 2 * (v.T @ stats.xtx @ v) * (v @ v.T)  # flip the top eigenvalue's sign
    w = weight()
    with caplog.at_level(logging.WARNING, logger="welore.lowrank.factorize"):
        up, down = FACTORIZERS["whiten"].factors(w, IN, stats)
    assert whitening(stats).jitter is None
    assert any("eigen-decomposition" in r.getMessage() for r in caplog.records)
    assert torch.allclose(up @ down, w, atol=1e-4)


def test_whitening_is_recomputed_when_the_statistics_change() -> None:
    stats = stats_of(correlated_inputs())
    first = whitening(stats)
    assert whitening(stats) is first
    stats.add_(correlated_inputs(seed=5))
    second = whitening(stats)
    assert second is not first
    assert torch.allclose(second.root @ second.root.T, stats.xtx, rtol=1e-8, atol=1e-6)


def test_whiten_rejects_non_finite_stats() -> None:
    stats = stats_of(correlated_inputs(), names=["layers.1.mlp.up_proj"])
    stats.xtx[0, 0] = float("nan")
    with pytest.raises(WeloreError, match="layers.1.mlp.up_proj contain NaN"):
        FACTORIZERS["whiten"].spectrum(weight(), stats)


def test_asvd_spectrum_is_that_of_the_scaled_weight() -> None:
    w, x = weight(), correlated_inputs()
    stats = stats_of(x)
    scales = FACTORIZERS["asvd"].scales(stats)
    assert torch.allclose(scales, x.double().abs().mean(dim=0).sqrt())
    expected = torch.linalg.svdvals(w.double() * scales)
    assert torch.allclose(FACTORIZERS["asvd"].spectrum(w, stats), expected, rtol=1e-6)
    # α = 0 is plain SVD
    plain = torch.linalg.svdvals(w.double())
    assert torch.allclose(ASVD(alpha=0.0).spectrum(w, stats), plain, rtol=1e-6)


def test_asvd_truncation_is_the_scaled_svd() -> None:
    w, x = weight(), correlated_inputs()
    stats = stats_of(x)
    scales = FACTORIZERS["asvd"].scales(stats)
    up, down = FACTORIZERS["asvd"].factors(w, 5, stats)
    up_s, down_s = svd_factors((w.double() * scales).float(), 5)
    assert torch.allclose(up @ down, (up_s @ down_s).double().div(scales).float(), atol=1e-4)
    # and it keeps the outputs better than plain SVD on inputs with outlier channels
    assert output_error(w, up @ down, x) < output_error(w, torch.matmul(*svd_factors(w, 5)), x)


def test_asvd_floors_dead_channels() -> None:
    x = correlated_inputs()
    x[:, 3] = 0.0  # a channel that never fires
    w = weight()
    stats = stats_of(x)
    scales = FACTORIZERS["asvd"].scales(stats)
    assert bool((scales > 0).all())
    up, down = FACTORIZERS["asvd"].factors(w, IN, stats)
    assert torch.isfinite(down).all()
    assert torch.allclose(up @ down, w, atol=1e-4)


def test_asvd_checks_alpha() -> None:
    assert ASVD(alpha=1.0).alpha == 1.0
    with pytest.raises(WeloreError, match="alpha"):
        ASVD(alpha=-0.5)


# --- top_factors: the top-r triplets from the Gram matrix, with a full-SVD fallback -----------


def with_spectrum(rows: int, cols: int, sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A (rows, cols) float64 matrix U·diag(σ)·Vᵀ with random orthonormal U, V."""
    generator = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=generator, dtype=torch.float64))  # (rows, k)
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=generator, dtype=torch.float64))  # (cols, k)
    return (u * sigma) @ v.T


def truncated(a: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-r truncated SVD of a, by the full float64 SVD."""
    u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


class SVDCalls:
    """Counts the full SVDs `top_factors` falls back to."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = torch.linalg.svd

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, "svd", counted)


SHAPES = [(48, 48), (72, 30), (30, 72)]  # square, tall, wide


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [1, 7, 29])
def test_top_factors_match_the_truncated_svd_on_well_conditioned_matrices(
    shape: tuple[int, int], rank: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    k = min(shape)
    a = with_spectrum(*shape, torch.logspace(0, -2, k, dtype=torch.float64))  # σ from 1 to 0.01
    calls = SVDCalls(monkeypatch)
    up, down = top_factors(a, rank)
    assert calls.count == 0  # the Gram route, no SVD
    assert up.shape == (shape[0], rank) and down.shape == (rank, shape[1]) and up.dtype == torch.float64
    reference = truncated(a, rank)
    assert (up @ down - reference).norm() / reference.norm() < 1e-12
    # balanced: the columns of up and the rows of down both have norm √σ_j
    sigma = torch.linalg.svdvals(a)[:rank]
    assert torch.allclose(up.norm(dim=0), sigma.sqrt(), rtol=1e-10)
    assert torch.allclose(down.norm(dim=1), sigma.sqrt(), rtol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_top_factors_stay_accurate_on_ill_conditioned_matrices(
    shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """σ from 1 to 1e-14: cuts above the threshold take the Gram route, cuts below the full SVD;
    both give the truncated SVD's product to a relative error far below float32 round-off."""
    k = min(shape)
    sigma = torch.logspace(0, -14, k, dtype=torch.float64)
    a = with_spectrum(*shape, sigma, seed=3)
    for rank in range(1, k + 1, 4):
        calls = SVDCalls(monkeypatch)
        up, down = top_factors(a, rank)
        assert calls.count == (0 if sigma[rank - 1] >= GRAM_MIN_RELATIVE_SIGMA else 1), rank
        reference = truncated(a, rank)
        assert (up @ down - reference).norm() / reference.norm() < 1e-9, rank


@pytest.mark.parametrize("rank", [1, 10, int(EVR_MAX_FRACTION * 60), int(EVR_MAX_FRACTION * 60) + 1, 60])
def test_top_eigenpairs_agree_on_both_sides_of_the_solver_switch(rank: int) -> None:
    """Up to r = EVR_MAX_FRACTION·k the subset solver runs, above it the full eigh: both give
    the r largest eigenpairs, descending, as a direct eigh does (vectors up to sign)."""
    a = with_spectrum(60, 80, torch.logspace(0, -2, 60, dtype=torch.float64), seed=3)
    gram = a @ a.T  # (60, 60)
    expected_values, expected_vectors = torch.linalg.eigh(gram)
    values, vectors = _top_eigenpairs(gram.clone(), rank)
    assert values.shape == (rank,) and vectors.shape == (60, rank)
    assert torch.allclose(values, expected_values[-rank:].flip(0), rtol=1e-10)
    overlap = (vectors * expected_vectors[:, -rank:].flip(1)).sum(dim=0).abs()  # |cos| per pair
    assert torch.allclose(overlap, torch.ones(rank, dtype=torch.float64), atol=1e-8)


def test_top_factors_fall_back_for_a_rank_deficient_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    a = with_spectrum(30, 20, torch.tensor([3.0, 2.0, 1.0] + [0.0] * 17, dtype=torch.float64))
    calls = SVDCalls(monkeypatch)
    up, down = top_factors(a, 3)
    assert calls.count == 0 and torch.allclose(up @ down, a, atol=1e-12)
    up, down = top_factors(a, 5)  # σ_5 = 0: nothing to divide by on the Gram route
    assert calls.count == 1 and torch.isfinite(up).all() and torch.isfinite(down).all()
    assert torch.allclose(up @ down, a, atol=1e-12)


def test_top_factors_of_a_float32_matrix_beat_float32_svd() -> None:
    """The svd factorizer used to take a float32 SVD; the float64 Gram route is closer to the
    exact truncation of the stored float32 weight."""
    a = with_spectrum(64, 40, torch.logspace(0, -3, 40, dtype=torch.float64), seed=5).float()
    reference = truncated(a, 12)
    ours = torch.matmul(*svd_factors(a, 12)).double()
    u, s, vh = torch.linalg.svd(a, full_matrices=False)  # float32
    old = ((u[:, :12] * s[:12]) @ vh[:12]).double()
    assert (ours - reference).norm() <= (old - reference).norm() * 1.01


# --- factorizers carry their own parameters (typed, checked, recorded in CompressConfig) ---------


def test_make_factorizer_sets_and_checks_parameters() -> None:
    from welore.lowrank.compress import CompressConfig
    from welore.lowrank.factorize import make_factorizer

    assert make_factorizer("whiten") is FACTORIZERS["whiten"]  # no parameters: the registered default
    assert make_factorizer("asvd", {"alpha": 1.0}).alpha == 1.0
    with pytest.raises(WeloreError, match="has no parameter beta; it takes alpha, floor"):
        make_factorizer("asvd", {"beta": 1.0})
    with pytest.raises(WeloreError, match="shrinkage -1 must be a non-negative number"):
        CompressConfig(factorizer="whiten", factorizer_params={"shrinkage": -1})
    config = CompressConfig(factorizer="whiten", factorizer_params={"shrinkage": 0.1})
    assert CompressConfig.from_dict(config.to_dict()) == config
    assert config.make_factorizer() == Whiten(shrinkage=0.1)
    typed = make_factorizer("asvd", {"alpha": 1.0, "floor": 1e-4})
    assert make_factorizer("asvd", {"alpha": "1", "floor": "1e-4"}) == typed
    with pytest.raises(WeloreError, match="The asvd factorizer's alpha must be a number, got 'big'"):
        make_factorizer("asvd", {"alpha": "big"})


def test_every_registered_factorizers_parameters_are_on_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """--factorizer-param is generated from the registry: a factorizer registered later (here a
    toy with an int and a bool field) is listed in --help and set from the command line."""
    from dataclasses import dataclass, fields

    from welore.cli import build_parser
    from welore.lowrank.compress import CompressConfig
    from welore.lowrank.factorize import PlainSVD
    from welore.options import from_args

    @dataclass(frozen=True)
    class Toy(PlainSVD):
        passes: int = 2  # how many passes
        exact: bool = False  # be exact

    monkeypatch.setitem(FACTORIZERS, "toy", Toy())
    parser = build_parser()
    text = " ".join(parser._subparsers._group_actions[0].choices["compress"].format_help().split())
    for name, factorizer in FACTORIZERS.items():
        assert f"{name}: " in text
        assert all(f.name in text for f in fields(factorizer))
    assert "toy: passes (how many passes; default 2), exact (be exact)" in text
    args = parser.parse_args(["compress", "m", "--out", "o", "--factorizer", "toy", "--factorizer-param", "passes=3",
                              "--factorizer-param", "exact=true"])
    config = from_args(CompressConfig, args)
    assert config.factorizer_params == {"passes": 3, "exact": True}
    assert config.make_factorizer() == Toy(passes=3, exact=True)


def test_whiten_shrinkage_whitens_the_ridged_gram_matrix() -> None:
    """λ = 0 is SVD-LLM exactly; λ > 0 is the whitening of XᵀX + λ·diag(XᵀX)."""
    x, w = correlated_inputs(), weight()
    stats = stats_of(x)
    plain = FACTORIZERS["whiten"].factors(w, IN // 2, stats)
    assert all(torch.equal(a, b) for a, b in zip(Whiten(shrinkage=0.0).factors(w, IN // 2, stats), plain, strict=True))
    up, down = Whiten(shrinkage=0.5).factors(w, IN // 2, stats)
    xtx = stats.xtx.double()
    ridged = xtx + 0.5 * torch.diag(xtx.diagonal())
    root = torch.linalg.cholesky(ridged)
    u, s, vh = torch.linalg.svd(w.double() @ root)
    best = (u[:, : IN // 2] * s[: IN // 2]) @ vh[: IN // 2] @ torch.linalg.inv(root)
    torch.testing.assert_close((up @ down).double(), best, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(up @ down, plain[0] @ plain[1])


def _root_route(w: torch.Tensor, rank: int, xtx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM as written: truncated SVD of W·S (S the Cholesky factor of XᵀX), then ·S⁻¹; spectrum and W_r."""
    root = torch.linalg.cholesky(xtx)
    u, s, vh = torch.linalg.svd(w.double() @ root)
    return s, (u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(root)


@pytest.mark.parametrize("shrinkage", [0.0, 0.5])
def test_whiten_of_a_wide_weight_needs_no_root_and_matches_it(shrinkage: float) -> None:
    """out ≤ in (o_proj, down_proj): spectrum and factors come from W·XᵀX·Wᵀ, with the root route's
    figures; at full rank W comes back, and the output error is the spectrum's tail."""
    x = correlated_inputs()
    w = weight()[: IN - 4]  # (12, 16): wide
    stats = stats_of(x)
    xtx = stats.xtx + shrinkage * torch.diag(stats.xtx.diagonal())
    factorizer = Whiten(shrinkage=shrinkage)
    spectrum = factorizer.spectrum(w, stats)
    reference, _ = _root_route(w, 1, xtx)
    assert spectrum.shape == (IN - 4,)
    torch.testing.assert_close(spectrum, reference, rtol=1e-6, atol=0.0)
    for rank in (1, 5, 9):
        up, down = factorizer.factors(w, rank, stats)
        assert up.shape == (IN - 4, rank) and down.shape == (rank, IN) and up.dtype == torch.float32
        _, best = _root_route(w, rank, xtx)
        torch.testing.assert_close((up @ down).double(), best, atol=1e-5, rtol=1e-4)
        if shrinkage == 0.0:
            tail = spectrum[rank:].pow(2).sum().item()
            assert output_error(w, up @ down, x) == pytest.approx(tail, rel=1e-3)
    up, down = factorizer.factors(w, IN - 4, stats)
    assert torch.allclose(up @ down, w, atol=1e-5)
    assert stats not in _WHITENINGS, "no Cholesky factor was computed for a wide weight"


@pytest.mark.parametrize("rows", [1, 5, 12, 512])
def test_whiten_output_gram_in_row_blocks(rows: int) -> None:
    """W·(XᵀX + λ·diag)·Wᵀ built a block of rows at a time: its lower triangle is the whole product's."""
    stats = stats_of(correlated_inputs())
    w = weight()[:12].to(torch.bfloat16)  # stored dtype: converted a block at a time
    xtx = stats.xtx + 0.3 * torch.diag(stats.xtx.diagonal())
    expected = w.double() @ xtx @ w.double().T
    got = Whiten(shrinkage=0.3)._output_gram(w, stats, rows=rows)
    torch.testing.assert_close(got.tril(), expected.tril(), rtol=1e-12, atol=1e-9)


def test_whiten_of_a_wide_weight_on_rank_deficient_inputs() -> None:
    """Fewer tokens than inputs: within the inputs' span the wide route is exact without jitter;
    beyond it (σ_r = 0) the factors come from the jittered root, as for a tall weight."""
    x = correlated_inputs(tokens=6)  # rank(XᵀX) = 6
    w = weight()[:10]  # (10, 16): wide
    stats = stats_of(x)
    up, down = FACTORIZERS["whiten"].factors(w, 6, stats)
    assert output_error(w, up @ down, x) < 1e-9 * output_error(w, torch.zeros_like(w), x)
    up, down = FACTORIZERS["whiten"].factors(w, 10, stats)  # beyond the span
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    assert torch.allclose(up @ down, w, atol=1e-4)


def test_balanced_factors_keep_the_product_and_even_the_norms() -> None:
    g = torch.Generator().manual_seed(3)
    up = torch.randn(40, 6, generator=g, dtype=torch.float64) * torch.logspace(2, 3, 6, dtype=torch.float64)
    down = torch.randn(6, 30, generator=g, dtype=torch.float64) * 1e-3
    up[:, 5] = 0  # a dead component stays as it is
    new_up, new_down = balance_factors(up, down)
    torch.testing.assert_close(new_up @ new_down, up @ down, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_up.norm(dim=0)[:5], new_down.norm(dim=1)[:5])
    assert torch.equal(new_down[5], down[5]) and torch.equal(new_up[:, 5], up[:, 5])


@pytest.mark.parametrize("factorizer", ["whiten", "asvd"])
def test_compressed_layers_hold_balanced_factors(factorizer: str) -> None:
    from welore.lowrank.compress import factorize_layer

    layer = torch.nn.Linear(48, 32)
    stats = InputStats.zeros(48)
    stats.add_(torch.randn(256, 48) * torch.logspace(0, 2, 48))  # large, uneven inputs: unbalanced raw factors
    raw_up, raw_down = make_factorizer(factorizer).factors(layer.weight, 8, stats)
    assert (raw_up.norm(dim=0) / raw_down.norm(dim=1)).max() > 3  # the case this guards
    low = factorize_layer(layer, "layer", 8, factorizer, stats)
    up, down = low.up.weight.detach(), low.down.weight.detach()  # (out, r), (r, in)
    torch.testing.assert_close(up.norm(dim=0), down.norm(dim=1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(up @ down, raw_up @ raw_down, rtol=1e-4, atol=1e-5)
