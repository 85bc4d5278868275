"""The closed-form refit after truncation (`welore.lowrank.refit`, `compress --refit`) on the tiny models.

References are computed here from first principles: the inputs X̂ every target sees with the
compressed blocks before it (its own block dense, as `--sequential` calibrates) and the dense
model's inputs X of the same tokens, both from plain forward hooks; the calibration output error
of a matrix M is ‖X̂·Mᵀ − X·Wᵀ‖².
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, logits_of, token_ids
from test_cli import assert_user_error, nothing_left, run
from test_data_aware import a_third, calibration_windows, plan_at, reference_truncation, target_inputs
from torch import nn

from welore import CompressConfig, compress_
from welore.errors import WeloreError
from welore.io.checkpoint import load, read_record
from welore.lowrank.calibrate import iter_block_stats
from welore.lowrank.compress import factorize_layer
from welore.lowrank.module import LowRankLinear
from welore.lowrank.refit import REFITS, Refit
from welore.modules import swap_module
from welore.targets import find_targets, layer_index, weight_matrix

MODES = sorted(REFITS)


def prefix_inputs(
    compressed: nn.Module, dense: nn.Module, windows: torch.Tensor, names: list[str]
) -> dict[str, torch.Tensor]:
    """name -> X̂: the inputs of `name` when the blocks before its own come from `compressed` and
    its own block is dense."""
    result = {}
    for k in sorted({layer_index(n) for n in names}):
        hybrid = copy.deepcopy(dense)
        for name, module in compressed.named_modules():
            if isinstance(module, LowRankLinear) and layer_index(name) < k:
                swap_module(hybrid, name, copy.deepcopy(module))
        result.update(target_inputs(hybrid, windows, [n for n in names if layer_index(n) == k]))
    return result


def calibration_error(m: torch.Tensor, w: torch.Tensor, x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """‖X̂·Mᵀ − X·Wᵀ‖_F²."""
    return (x_hat @ m.double().T - x @ w.double().T).square().sum().item()


@pytest.mark.parametrize("mode", MODES)
def test_refit_never_increases_the_calibration_output_error(family: str, mode: str) -> None:
    """For every matrix, on the inputs the compressed prefix produces, the refitted factors are at
    least as close to the dense outputs as the factorizer's own truncation on those inputs; and
    in the blocks after the first (where X̂ ≠ X) strictly closer in total."""
    dense = build_tiny(family)
    windows = calibration_windows()
    plan = plan_at(dense, a_third)
    model = copy.deepcopy(dense)
    config = CompressConfig(factorizer="whiten", refit=mode)
    assert config.sequential  # the refit implies the sequential pass
    compress_(model, config, plan=plan, calibration=windows, progress=False)

    names = list(plan.factorized)
    x_hat = prefix_inputs(model, dense, windows, names)
    x = target_inputs(dense, windows, names)
    later = {"refit": 0.0, "plain": 0.0}
    for name in names:
        w = weight_matrix(dense.get_submodule(name))
        plain = reference_truncation("whiten", w, x_hat[name].T @ x_hat[name], None, plan.ranks[name])
        refit = calibration_error(model.get_submodule(name).dense_weight(), w, x_hat[name], x[name])
        before = calibration_error(plain, w, x_hat[name], x[name])
        assert refit <= before * (1 + 1e-5), (name, refit, before)
        if layer_index(name) > 0:
            later["refit"] += refit
            later["plain"] += before
    assert later["refit"] < 0.99 * later["plain"], later


@pytest.mark.parametrize("mode", MODES)
def test_refit_at_full_rank_gives_the_dense_logits(family: str, mode: str) -> None:
    """Every target factorized at rank min(m, n) and refitted (ridge 0) block by block on paired
    statistics ⇒ the dense logits."""
    model = build_tiny(family)
    ids = token_ids()
    expected = logits_of(model, ids)
    targets = find_targets(model)
    refit = Refit(mode, ridge=0.0)
    for _, block_stats in iter_block_stats(model, targets, calibration_windows(), progress=False, paired=True):
        for name, stats in block_stats.items():
            assert stats.cross is not None
            w = weight_matrix(targets[name])
            swap_module(model, name, factorize_layer(targets[name], name, min(w.shape), "whiten", stats, refit))
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in targets)
    assert torch.allclose(logits_of(model, ids), expected, atol=1e-4)


def test_paired_statistics_pair_the_dense_inputs(family: str) -> None:
    """`cross` is Σ x̂ xᵀ with x̂ the compressed prefix's inputs and x the dense model's."""
    dense = build_tiny(family)
    windows = calibration_windows()
    plan = plan_at(dense, a_third)
    model = copy.deepcopy(dense)
    targets = {n: model.get_submodule(n) for n in plan.factorized}
    seen = {}
    for _, block_stats in iter_block_stats(model, targets, windows, progress=False, paired=True):
        for name, stats in block_stats.items():
            seen[name] = (stats.xtx.clone(), stats.cross.clone())
            swap_module(model, name, factorize_layer(targets[name], name, plan.ranks[name], "whiten", stats))
    x_hat = prefix_inputs(model, dense, windows, list(seen))
    x = target_inputs(dense, windows, list(seen))
    for name, (xtx, cross) in seen.items():
        assert torch.allclose(xtx, x_hat[name].T @ x_hat[name], rtol=1e-6, atol=1e-8), name
        assert torch.allclose(cross, x_hat[name].T @ x[name], rtol=1e-6, atol=1e-8), name


def test_refit_config_errors() -> None:
    windows = calibration_windows()
    with pytest.raises(WeloreError, match="Unknown refit mode"):
        CompressConfig(factorizer="whiten", refit="down")
    with pytest.raises(WeloreError, match="--refit-ridge"):
        CompressConfig(factorizer="whiten", refit="up", refit_ridge=-1.0)
    with pytest.raises(WeloreError, match="without --refit"):
        CompressConfig(factorizer="whiten", refit_ridge=0.5)
    with pytest.raises(WeloreError, match="needs calibration text"):
        compress_(build_tiny("llama"), CompressConfig(ratio=0.2, factorizer="whiten", refit="up"), progress=False)
    model = build_tiny("llama")
    with pytest.raises(WeloreError, match="--refit"):
        compress_(model, CompressConfig(ratio=0.2, refit="up"), calibration=windows, progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    with pytest.raises(WeloreError, match="sequential"):
        next(iter_block_stats(model, find_targets(model), windows, sequential=False, paired=True))


# --- the CLI ---------------------------------------------------------------------------------------

CALIB = ["--calib-tokens", "256", "--calib-seq-len", "32"]


def test_cli_refit_is_recorded_and_changes_the_later_blocks(capsys, tmp_path: Path, cli_model_dir: Path,
                                                            english_text_file: Path) -> None:
    common = ["--ratio", "0.3", "--method", "minimax", "--factorizer", "whiten", "--calib", english_text_file, *CALIB]
    code, out, err = run(capsys, "compress", cli_model_dir, *common, "--sequential", "--out", tmp_path / "seq")
    assert code == 0, err
    code, out, err = run(capsys, "compress", cli_model_dir, *common, "--refit", "both", "--refit-ridge", "0.01",
                         "--out", tmp_path / "refit")
    assert code == 0, err
    assert "refit both" in out
    config = json.loads((tmp_path / "refit" / "welore.json").read_text())["recipe"]["stages"][0]["lowrank"]
    assert (config["refit"], config["refit_ridge"], config["sequential"]) == ("both", 0.01, True)
    sequential, refitted = load(tmp_path / "seq"), load(tmp_path / "refit")
    record = read_record(tmp_path / "refit")
    assert record.compress_config.refit == "both"
    changed = set()
    for name in record.plan.factorized:
        a, b = sequential.get_submodule(name).dense_weight(), refitted.get_submodule(name).dense_weight()
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-6):
            changed.add(layer_index(name))
    assert 1 in changed


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (["--data-free", "--refit", "up"], "--refit"),
        (["--factorizer", "whiten", "--refit", "up"], "--calib"),
        (["--factorizer", "whiten", "--calib", "TEXT", "--refit", "up", "--refit-ridge", "-1"], "--refit-ridge"),
        (["--factorizer", "whiten", "--calib", "TEXT", "--refit-ridge", "0.1"], "without --refit"),
    ],
    ids=["refit-with-svd", "refit-without-calib", "negative-ridge", "ridge-without-refit"],
)
def test_cli_bad_refit_options(capsys, tmp_path: Path, cli_model_dir: Path, english_text_file: Path,
                               options: list[str], match: str) -> None:
    code, out, err = run(capsys, "compress", cli_model_dir, "--ratio", "0.2",
                         *[str(english_text_file) if o == "TEXT" else o for o in options], "--out", tmp_path / "out")
    assert_user_error(code, out, err, match=match)
    assert nothing_left(tmp_path, "out")
