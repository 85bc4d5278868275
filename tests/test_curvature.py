"""Curvature-aware factorization: `kfac` (Kronecker-factored Fisher) and `fisher` (FWSVD).

The statistics (`welore.lowrank.curvature.gradient_stats`, a block-major backward with recomputation)
are checked against a direct computation: one ordinary forward and backward of the whole model
per calibration window, with the gradients at every target's output read from the autograd
graph and the weight's gradient from `.grad`. The factorizations are checked against the
quantity they promise to minimise, computed here from those direct statistics: the K-FAC
estimate of the loss increase ½·tr(ΔW·A·ΔWᵀ·G).

On tiny models the true loss increase of a truncation is too small and noisy for kfac to beat
svd on it reliably (measured on trained tiny LLaMA/GPT-2/Qwen2 models, kfac < svd for only
30–75% of single-matrix cuts), so the tests hold the estimate kfac minimises exactly.

The statistics and the full-rank factors are also checked on the other architectures of
`conftest.OTHER_FAMILIES`, calibrated on windows that start with BOS (`every_family`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny, every_family, logits_of, token_ids
from test_cli import assert_user_error, nothing_left, run
from test_data_aware import CALIB, calibration_windows, input_statistics, plan_at
from torch import nn

from welore import CompressConfig, compress_
from welore.errors import WeloreError
from welore.gradients import _gradient_matrix
from welore.io.checkpoint import load, read_record
from welore.lowrank.calibrate import iter_block_stats
from welore.lowrank.compress import calibrated_spectra
from welore.lowrank.curvature import CurvatureStats, GradientStats, gradient_stats
from welore.lowrank.factorize import FACTORIZERS, KFAC, Fisher, make_factorizer
from welore.lowrank.module import LowRankLinear
from welore.lowrank.plan import allocate
from welore.targets import find_targets, matrix_shape, weight_matrix

CURVATURE = ("kfac", "fisher")




def direct_gradients(model: nn.Module, windows: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """name -> (Σ g·gᵀ (out, out), Σ_b rowsum((∂loss_b/∂W)²) (out,), predicted tokens), float64,
    from one plain forward and backward of the summed next-token loss per window b."""
    model = copy.deepcopy(model)
    targets = find_targets(model)
    ggt: dict[str, torch.Tensor] = {}
    fisher: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            output.retain_grad()
            outputs[name] = output

        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in targets.items()]
    try:
        for window in windows:
            model.zero_grad()
            ids = window[None]  # (1, T)
            logits = model(ids, use_cache=False).logits  # (1, T, V)
            F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").backward()
            for name, module in targets.items():
                g = outputs[name].grad.reshape(-1, outputs[name].shape[-1]).double()  # (T, out)
                ggt[name] = ggt.get(name, 0) + g.T @ g
                fisher[name] = fisher.get(name, 0) + _gradient_matrix(module).double().pow(2).sum(dim=1)
    finally:
        for handle in handles:
            handle.remove()
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    return {name: (ggt[name], fisher[name], predicted) for name in targets}


def curvature_stats(model: nn.Module, windows: torch.Tensor) -> dict[str, CurvatureStats]:
    """name -> CurvatureStats from welore's own gathering (input statistics of the dense model)."""
    targets = find_targets(model)
    grads = gradient_stats(model, targets, windows, progress=False)
    result = {}
    for _, block_stats in iter_block_stats(model, targets, windows, progress=False, sequential=False):
        for name, stats in block_stats.items():
            result[name] = CurvatureStats(inputs=stats, grads=grads[name])
    return result


def kfac_estimate(w: torch.Tensor, approx: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> float:
    """½·tr(ΔW·A·ΔWᵀ·G), ΔW = W − W_r (out, in)."""
    d = w.detach().double() - approx.detach().double()
    return 0.5 * torch.trace(d @ a @ d.T @ g).item()


def damped(g: torch.Tensor, damping: float) -> torch.Tensor:
    return g + damping * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)


# --- the statistics ----------------------------------------------------------------------------


@every_family
def test_gradient_stats_equal_a_direct_computation(family: str) -> None:
    """G = Σ g·gᵀ and the per-window row Fisher from the block-major backward (batches of 3
    windows, the last one short) equal those of plain backward passes, window by window."""
    model = build_tiny(family)
    windows = calibration_windows(family)  # (8, 64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = gradient_stats(model, find_targets(model), windows, batch_size=3, progress=False)
    expected = direct_gradients(model, windows)
    assert set(stats) == set(expected)
    for name, (ggt, fisher, predicted) in expected.items():
        got = stats[name]
        assert got.loss_tokens == predicted == 8 * 63
        assert got.ggt.dtype == torch.float32  # stored compactly once complete
        assert torch.allclose(got.ggt.double(), ggt, rtol=1e-4, atol=1e-6 * ggt.abs().max().item()), name
        assert torch.allclose(got.row_fisher, fisher, rtol=1e-4, atol=1e-8 * fisher.abs().max().item()), name
        assert ggt.abs().max() > 0 and fisher.max() > 0, name
    # nothing of the model changed: no gradients kept, weights and eval mode intact
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not model.training


def test_an_outlier_token_is_scaled_down_to_the_bound_and_the_rest_is_untouched() -> None:
    """One token with a gradient 10⁵ times the others' norm (10¹⁰ in ‖g‖², like the spike that
    broke kfac at 131K tokens) enters G with ‖g‖² = OUTLIER_FACTOR × the batch median; a batch
    without one is accumulated exactly."""
    from welore.lowrank.curvature import OUTLIER_FACTOR

    gen = torch.Generator().manual_seed(0)
    g = torch.randn(2, 16, 6, generator=gen, dtype=torch.float64)  # (B, T, out)
    x = torch.randn(2, 16, 5, generator=gen, dtype=torch.float64)  # (B, T, in)
    plain = GradientStats.zeros(6, 5)
    plain.add_(g, x)
    assert plain.clipped == 0
    assert torch.allclose(plain.ggt, g.flatten(0, 1).T @ g.flatten(0, 1))

    spiked = g.clone()
    spiked[1, 3] *= 1e5
    stats = GradientStats.zeros(6, 5)
    stats.add_(spiked, x)
    assert stats.clipped == 1
    bound = OUTLIER_FACTOR * spiked.pow(2).sum(-1).median()
    expected = g.clone()
    expected[1, 3] *= (bound / g[1, 3].pow(2).sum()).sqrt()
    assert torch.allclose(stats.ggt, expected.flatten(0, 1).T @ expected.flatten(0, 1))
    assert stats.ggt.trace() < 1e-2 * (spiked.flatten(0, 1).T @ spiked.flatten(0, 1)).trace()


def test_gradient_stats_reject_one_token_windows() -> None:
    model = build_tiny("llama")
    with pytest.raises(WeloreError, match="seq_len ≥ 2"):
        gradient_stats(model, find_targets(model), token_ids(batch=2, length=1), progress=False)


# --- the factorizers -------------------------------------------------------------------------------


def test_registry_holds_the_curvature_factorizers() -> None:
    for name, cls in (("kfac", KFAC), ("fisher", Fisher)):
        assert isinstance(FACTORIZERS[name], cls)
        assert FACTORIZERS[name].needs_stats and FACTORIZERS[name].needs_gradients
    assert make_factorizer("kfac", {"damping": 0.1}).damping == 0.1
    with pytest.raises(WeloreError, match="damping"):
        make_factorizer("kfac", {"damping": 0.0})
    with pytest.raises(WeloreError, match="floor"):
        make_factorizer("fisher", {"floor": 2.0})


@pytest.mark.parametrize("name", CURVATURE)
def test_curvature_factorizers_need_gradients(name: str) -> None:
    model = build_tiny("llama")
    w = weight_matrix(model.model.layers[0].self_attn.q_proj)
    with pytest.raises(WeloreError, match="calibration text.*--calib"):
        FACTORIZERS[name].factors(w, 3, None)
    inputs = next(iter_block_stats(model, find_targets(model), calibration_windows(), progress=False))[1]
    with pytest.raises(WeloreError, match="output-gradient statistics"):
        FACTORIZERS[name].spectrum(w, inputs["model.layers.0.self_attn.q_proj"])


@every_family
@pytest.mark.parametrize("name", CURVATURE)
def test_full_rank_curvature_factors_keep_the_logits(family: str, name: str) -> None:
    model = build_tiny(family)
    ids = token_ids()
    expected = logits_of(model, ids)
    replacements = {}
    for target, stats in curvature_stats(model, calibration_windows(family)).items():
        module = model.get_submodule(target)
        w = weight_matrix(module)
        up, down = FACTORIZERS[name].factors(w, min(w.shape), stats)
        assert up.dtype == down.dtype == torch.float32
        assert torch.allclose((up @ down).double(), w.double(), atol=1e-4 * w.abs().max().item()), target
        bias = module.bias.detach() if module.bias is not None else None
        replacements[target] = LowRankLinear.from_factors(up, down, bias, w.dtype)
    for target, module in replacements.items():
        parent, _, child = target.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    assert torch.allclose(logits_of(model, ids), expected, atol=1e-4)


def test_kfac_minimises_the_kfac_loss_estimate(family: str) -> None:
    """At a third of every matrix's rank, through compress_: kfac's truncation is the one
    computed directly (L_G⁻ᵀ·[L_Gᵀ·W·L_A]_r·L_A⁻¹ from directly computed A and G), its estimated
    loss increase ½·tr(ΔW·A·ΔWᵀ·G) is half the tail of its spectrum (the allocation's loss
    units), and no other factorizer's truncation has a smaller estimate, for every matrix."""
    dense = build_tiny(family)
    windows = calibration_windows(family)
    plan = plan_at(dense, lambda m, n: min(m, n) // 3)
    inputs = input_statistics(dense, windows)
    grads = direct_gradients(dense, windows)
    damping = FACTORIZERS["kfac"].damping
    a = {n: inputs[n][0] / windows.numel() for n in plan.factorized}  # A = XᵀX / N
    g = {n: damped(grads[n][0] / grads[n][2], damping) for n in plan.factorized}  # G + λ·mean diag·I

    truncated = {}
    for factorizer in ("svd", "whiten", "asvd", "fisher", "kfac"):
        model = copy.deepcopy(dense)
        calibration = windows if FACTORIZERS[factorizer].needs_stats else None
        compress_(model, CompressConfig(factorizer=factorizer), plan=plan, calibration=calibration, progress=False)
        truncated[factorizer] = {n: model.get_submodule(n).dense_weight() for n in plan.factorized}
    spectra = calibrated_spectra(dense, CompressConfig(factorizer="kfac"), windows)

    for name in plan.factorized:
        w, rank = weight_matrix(dense.get_submodule(name)).double(), plan.ranks[name]
        root_a, root_g = torch.linalg.cholesky(a[name]), torch.linalg.cholesky(g[name])
        u, s, vh = torch.linalg.svd(root_g.T @ w @ root_a)
        assert torch.allclose(spectra[name], s, rtol=1e-4), name
        best = (torch.linalg.solve_triangular(root_g.T, u[:, :rank] * s[:rank], upper=True)  # (out, r) L_G⁻ᵀ·U_r·Σ_r
                @ torch.linalg.solve_triangular(root_a, vh[:rank], upper=False, left=False))  # (r, in) V_rᵀ·L_A⁻¹
        scale = best.abs().max().item()
        assert torch.allclose(truncated["kfac"][name].double(), best, rtol=1e-3, atol=1e-4 * scale), name
        estimates = {f: kfac_estimate(w, t[name], a[name], g[name]) for f, t in truncated.items()}
        assert estimates["kfac"] == pytest.approx(0.5 * (s[rank:] ** 2).sum().item(), rel=1e-3), name
        for other in ("svd", "whiten", "asvd", "fisher"):
            assert estimates["kfac"] <= estimates[other] * (1 + 1e-4), (name, estimates)


@pytest.mark.parametrize("name", CURVATURE)
def test_allocation_on_curvature_spectra(name: str) -> None:
    """compress_ with a ratio allocates on the factorizer's spectra (loss units): the plan is
    the `loss` policy's on `calibrated_spectra`, and it differs from the one on whitened spectra."""
    dense = build_tiny("llama")
    windows = calibration_windows()
    shapes = {n: matrix_shape(m) for n, m in find_targets(dense).items()}
    spectra = calibrated_spectra(dense, CompressConfig(factorizer=name), windows)
    expected = allocate("loss", spectra, shapes, 0.3)
    model = copy.deepcopy(dense)
    report = compress_(model, CompressConfig(ratio=0.3, method="loss", factorizer=name), calibration=windows,
                       progress=False)
    assert report.plan.ranks == expected.ranks
    whitened = allocate("loss", calibrated_spectra(dense, CompressConfig(factorizer="whiten"), windows), shapes, 0.3)
    assert report.plan.ranks != whitened.ranks


def test_sequential_kfac_takes_gradients_from_the_dense_model() -> None:
    """With --sequential, block 0 is factorized exactly as without it (its A and G both come
    from the dense model); block 1 sees the compressed block 0's inputs."""
    dense = build_tiny("llama")
    windows = calibration_windows()
    plan = plan_at(dense, lambda m, n: min(m, n) // 3)
    results = {}
    for sequential in (False, True):
        results[sequential] = copy.deepcopy(dense)
        compress_(results[sequential], CompressConfig(factorizer="kfac", sequential=sequential), plan=plan,
                  calibration=windows, progress=False)
    for name in plan.factorized:
        plain, sequential = (results[s].get_submodule(name).dense_weight() for s in (False, True))
        same = torch.allclose(sequential, plain, rtol=1e-5, atol=1e-7)
        assert same == name.startswith("model.layers.0."), name


def test_compress_uses_gradients_it_is_given() -> None:
    """Gradients gathered beforehand (as the frontier benchmark shares one pass among settings) give
    the factors compress_ computes when it gathers them itself; other gradients give other factors."""
    dense = build_tiny("llama")
    windows = calibration_windows()
    plan = plan_at(dense, lambda m, n: min(m, n) // 3)
    targets = find_targets(dense)
    given = gradient_stats(dense, targets, windows, progress=False)
    skewed = {n: copy.deepcopy(g) for n, g in given.items()}
    for g in skewed.values():  # D·GGᵀ·D stays a covariance, with other directions weighted up
        scale = torch.linspace(0.1, 10.0, g.ggt.shape[0], dtype=g.ggt.dtype)
        g.ggt.mul_(scale[:, None] * scale[None, :])
    config = CompressConfig(factorizer="kfac", sequential=True)
    results = {}
    for label, gradients in (("own", None), ("given", given), ("skewed", skewed)):
        results[label] = copy.deepcopy(dense)
        compress_(results[label], config, plan=plan, calibration=windows, progress=False, gradients=gradients)
    for name in plan.factorized:
        own, same, other = (results[k].get_submodule(name).dense_weight() for k in ("own", "given", "skewed"))
        assert torch.equal(own, same), name
        assert not torch.allclose(own, other, rtol=1e-3, atol=1e-6), name
    with pytest.raises(ValueError, match="the whiten factorizer uses none"):
        compress_(copy.deepcopy(dense), CompressConfig(factorizer="whiten"), plan=plan, calibration=windows,
                  progress=False, gradients=given)


# --- the CLI -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CURVATURE)
def test_cli_compresses_with_curvature(capsys, tmp_path: Path, cli_model_dir: Path, english_text_file: Path,
                                       name: str) -> None:
    out = tmp_path / "ckpt"
    code, stdout, err = run(capsys, "compress", cli_model_dir, "--ratio", "0.3", "--method", "loss",
                            "--factorizer", name, "--calib", english_text_file, *CALIB, "--out", out)
    assert code == 0, err
    assert f"factorizer {name}, calibrated on 256 tokens" in stdout
    saved, record = load(out), read_record(out)
    assert record.compress_config.factorizer == name
    assert record.plan.method == "loss" and record.plan.factorized
    assert any(isinstance(m, LowRankLinear) for m in saved.modules())


@pytest.mark.parametrize(
    ("options", "match"),
    [(["--factorizer", "kfac"], "--calib"), (["--factorizer", "fisher", "--sequential"], "--calib")],
    ids=["kfac-without-calib", "fisher-sequential-without-calib"],
)
def test_cli_curvature_without_calibration(capsys, tmp_path: Path, cli_model_dir: Path, options: list[str],
                                           match: str) -> None:
    code, out, err = run(capsys, "compress", cli_model_dir, "--ratio", "0.2", *options, "--out", tmp_path / "out")
    assert_user_error(code, out, err, match=match)
    assert nothing_left(tmp_path, "out")


def test_gradient_stats_check_rejects_empty_or_non_finite() -> None:
    stats = GradientStats.zeros(3, 2)
    with pytest.raises(WeloreError, match="no tokens"):
        stats.check("x")
    stats.loss_tokens = 4
    stats.ggt[0, 0] = float("nan")
    with pytest.raises(WeloreError, match="NaN or Inf"):
        stats.check("x")


@pytest.mark.parametrize("refit", ["up", "both"])
def test_kfac_with_refit(refit: str) -> None:
    """The refit re-truncates (mode both) with kfac and the target's own gradient statistics."""
    model = build_tiny("llama")
    report = compress_(model, CompressConfig(ratio=0.3, method="loss", factorizer="kfac", refit=refit),
                       calibration=calibration_windows(), progress=False)
    assert report.replaced == report.plan.factorized
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in report.replaced)
