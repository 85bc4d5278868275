"""Tests for welore.quant: bit packing, RTN error bounds, packed sizes, compensation
(weight space and EoRA), target-size allocation, and save -> load without re-quantizing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny, logits_of, token_ids
from safetensors import safe_open

from welore import compress_
from welore._io import parse_bytes
from welore.errors import WeloreError
from welore.io import checkpoint
from welore.io.checkpoint import WEIGHTS, export_dense, load, load_checkpoint, read_record, save
from welore.lowrank.calibrate import InputStats
from welore.lowrank.factorize import whitening
from welore.quant import (
    BITS,
    QuantConfig,
    QuantizedLinear,
    QuantPlan,
    matrix_bytes,
    pack_codes,
    quantize_,
    quantize_layer,
    quantize_weight,
    uniform_plans,
    unpack_codes,
)
from welore.targets import find_targets, weight_matrix


@pytest.mark.parametrize("bits", BITS)
def test_pack_round_trip_and_size(bits: int) -> None:
    generator = torch.Generator().manual_seed(bits)
    for numel in (8, 64, 1000, 1003):
        codes = torch.randint(0, 2**bits, (numel,), generator=generator).to(torch.uint8)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8
        assert packed.numel() == -(-numel // 8) * bits  # exactly bits/8 bytes per code (per run of 8)
        assert torch.equal(unpack_codes(packed, bits, numel), codes)


def test_four_bit_packing_is_nibbles_low_first() -> None:
    packed = pack_codes(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8], dtype=torch.uint8), 4)
    assert packed.tolist() == [0x21, 0x43, 0x65, 0x87]


def _weight(out: int = 48, inp: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("group_size", [16, 32, 64])
def test_int8_round_trip_error_bound(group_size: int) -> None:
    w = _weight()
    q = quantize_weight(w, 8, group_size)
    groups = w.reshape(-1, group_size)
    step = (groups.amax(1) - groups.amin(1)) / 255  # (groups,) the grid step of each group
    err = (q.dequantize() - w).reshape(-1, group_size).abs().amax(1)
    # half a step of rounding, plus the float16 rounding of scale (×255 codes) and offset
    bound = step / 2 + 255 * step * 2**-11 + groups.abs().amax(1) * 2**-11
    assert (err <= bound + 1e-7).all()
    assert (q.dequantize() - w).norm() / w.norm() < 0.01


def test_fewer_bits_more_error() -> None:
    w = _weight()
    errors = [float((quantize_weight(w, b, 32).dequantize() - w).norm()) for b in BITS]
    assert errors == sorted(errors)


def test_rtn_reproduces_a_grid_exactly() -> None:
    """A weight that already lies on a 4-bit grid (as the default model's, from Q4_1) is
    re-quantized at 4 bits with its groups without loss (up to float16 scales)."""
    g = 32
    codes = torch.randint(0, 16, (16, 64), generator=torch.Generator().manual_seed(0)).float()
    codes.view(-1, g)[:, 0], codes.view(-1, g)[:, 1] = 0, 15  # every group spans the full grid
    scale = torch.rand(16 * 64 // g, 1, generator=torch.Generator().manual_seed(1)).half().float() * 0.01 + 0.001
    w = (codes.view(-1, g) * scale).view(16, 64)
    q = quantize_weight(w, 4, g)
    assert (q.dequantize() - w).norm() / w.norm() < 1e-3
    assert (quantize_weight(w, 4, 64).dequantize() - w).norm() / w.norm() > 0.01


def test_group_size_must_divide() -> None:
    with pytest.raises(WeloreError, match="Group size 7"):
        quantize_weight(_weight(), 4, 7)
    with pytest.raises(WeloreError, match="bits"):
        quantize_weight(_weight(), 5, 32)


def test_hqq_quantizer_not_worse_in_output() -> None:
    w = _weight(64, 128)
    rtn = (quantize_weight(w, 3, 64, "rtn").dequantize() - w).norm()
    hqq = (quantize_weight(w, 3, 64, "hqq").dequantize() - w).norm()
    assert hqq < 1.05 * rtn  # HQQ minimises an l_p (p<1) error, so its l2 error is close, rarely worse


def _stats(inp: int, tokens: int = 512, seed: int = 0) -> tuple[InputStats, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g) * torch.logspace(0, -2, inp)  # correlated, uneven channels
    x = torch.randn(tokens, inp, generator=g) @ mix  # (tokens, in)
    stats = InputStats.zeros(inp)
    stats.add_(x)
    return stats, x


def _grid_round(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round-to-nearest on each group's min/max grid, with float16 scale and offset: the reference
    GPTQ must reduce to when no error can cross columns."""
    groups = w.double().reshape(-1, group_size)
    lo = groups.amin(1).half().double()
    step = ((groups.amax(1) - groups.amin(1)) / (2**bits - 1)).half().double()
    q = ((groups - lo[:, None]) / step[:, None]).round().clamp(0, 2**bits - 1)
    return (q * step[:, None] + lo[:, None]).view_as(w).float()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_with_uncorrelated_inputs_is_round_to_nearest(bits: int) -> None:
    """With a diagonal XᵀX no column's error reaches another, so GPTQ rounds each weight to its group's grid."""
    w = _weight(32, 128)
    stats = InputStats.zeros(128)
    stats.add_(torch.randn(256, 128, generator=torch.Generator().manual_seed(3)))
    stats.xtx = torch.diag(stats.xtx.diagonal())
    q = quantize_weight(w, bits, 32, "gptq", stats)
    assert torch.allclose(q.dequantize(), _grid_round(w, bits, 32), atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3])
def test_gptq_lowers_the_calibration_output_error_below_round_to_nearest(bits: int) -> None:
    w = _weight(64, 128)
    stats, x = _stats(128)
    gptq = quantize_weight(w, bits, 32, "gptq", stats).dequantize()
    rtn = _grid_round(w, bits, 32)
    error = {name: float((x @ (w - wq).T).norm()) for name, wq in (("gptq", gptq), ("rtn", rtn))}
    assert error["gptq"] < 0.8 * error["rtn"], error


def test_gptq_codes_lie_on_the_stored_grid() -> None:
    """What GPTQ rounded is what loading dequantizes: every weight is code·scale + offset of the
    stored float16 values, with codes within the width."""
    w = _weight(48, 64)
    stats, _ = _stats(64)
    q = quantize_weight(w, 3, 16, "gptq", stats)
    codes = unpack_codes(q.codes, 3, w.numel()).view(-1, 16).float()
    assert int(codes.max()) <= 7
    rebuilt = codes * q.scale.float()[:, None] + q.offset.float()[:, None]
    assert torch.equal(rebuilt.view_as(w), q.dequantize())


def test_gptq_needs_calibration_and_whole_groups_per_row() -> None:
    with pytest.raises(WeloreError, match="--calib"):
        quantize_weight(_weight(), 4, 32, "gptq")
    stats, _ = _stats(64)
    with pytest.raises(WeloreError, match="rows"):
        quantize_weight(_weight(48, 64), 4, 96, "gptq", stats)  # 96 divides 48·64 but not a row of 64


def _output_error(module: torch.nn.Module, w: torch.Tensor, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((module(x) - x @ w.T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("rank", [1, 4, 16])
@pytest.mark.parametrize("bits", [4, 3, 2])
def test_compensation_never_increases_calibration_error(bits: int, rank: int) -> None:
    dense = torch.nn.Linear(64, 48, bias=False)
    dense.weight.data = _weight()
    stats, x = _stats(64)
    plain, (before, _) = quantize_layer(dense, "layer", bits, 32, rank=0, stats=stats)
    comp, (before2, after) = quantize_layer(dense, "layer", bits, 32, rank=rank, stats=stats)
    assert before == pytest.approx(before2)
    assert after < before
    assert _output_error(comp, dense.weight, x) < _output_error(plain, dense.weight, x)
    assert _output_error(plain, dense.weight, x) == pytest.approx(before, rel=1e-3)


def test_eora_beats_weight_space_on_the_calibration_outputs() -> None:
    dense = torch.nn.Linear(64, 48, bias=False)
    dense.weight.data = _weight()
    stats, x = _stats(64)
    eora, _ = quantize_layer(dense, "layer", 2, 32, rank=8, stats=stats)
    plain, _ = quantize_layer(dense, "layer", 2, 32, rank=8)
    assert _output_error(eora, dense.weight, x) < _output_error(plain, dense.weight, x)
    # ... and the weight-space one is better on the weights
    assert (plain.dense_weight() - dense.weight).norm() < (eora.dense_weight() - dense.weight).norm()


@pytest.mark.parametrize("calibrated", [False, True])
def test_full_rank_compensation_recovers_the_weight(calibrated: bool) -> None:
    dense = torch.nn.Linear(64, 48, bias=True)
    dense.weight.data = _weight()
    stats = _stats(64)[0] if calibrated else None
    module, _ = quantize_layer(dense, "layer", 2, 32, rank=48, stats=stats, factor_dtype="float32")
    w = dense.weight.detach()
    assert (module.dense_weight() - w).norm() / w.norm() < 1e-5
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(module(x), dense(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("calibrated", [False, True])
def test_alternating_rounds_never_lose_to_eora_and_can_win(calibrated: bool) -> None:
    dense = torch.nn.Linear(64, 48, bias=False)
    dense.weight.data = _weight()
    stats, x = _stats(64)
    stats = stats if calibrated else None

    def error(module) -> float:  # what the rounds minimise: output error with statistics, weight error without
        residual = (module.dense_weight() - dense.weight).detach().to(torch.float64)
        return float((residual @ whitening(stats).root).norm()) if calibrated else float(residual.norm())

    eora, errors = quantize_layer(dense, "layer", 2, 32, rank=4, stats=stats, factor_dtype="float32")
    alternated, errors4 = quantize_layer(dense, "layer", 2, 32, rank=4, stats=stats, factor_dtype="float32", iters=4)
    assert error(alternated) < 0.99 * error(eora)  # the rounds found better codes for what the factors leave
    if calibrated:
        assert errors4[0] == pytest.approx(errors[0]) and errors4[1] < errors[1]
    # one round is EoRA exactly
    same, _ = quantize_layer(dense, "layer", 2, 32, rank=4, stats=stats, factor_dtype="float32", iters=1)
    torch.testing.assert_close(same.dense_weight(), eora.dense_weight(), rtol=0, atol=0)


def test_alternating_rounds_keep_the_best_round() -> None:
    dense = torch.nn.Linear(64, 48, bias=False)
    dense.weight.data = _weight()
    for bits in (8, 4, 3, 2):  # at 8 bits a later round rarely helps; whatever happens, no round makes it worse
        eora, _ = quantize_layer(dense, "layer", bits, 32, rank=2, factor_dtype="float32")
        alternated, _ = quantize_layer(dense, "layer", bits, 32, rank=2, factor_dtype="float32", iters=3)
        w = dense.weight.detach()
        assert (alternated.dense_weight() - w).norm() <= (eora.dense_weight() - w).norm() + 1e-7


def test_whitening_is_shared_not_copied() -> None:
    stats, _ = _stats(64)
    assert whitening(stats) is whitening(stats)  # EoRA reuses welore.lowrank.factorize's cached root


# --- whole models --------------------------------------------------------------------------


def test_quantize_replaces_targets_and_counts_bytes(family: str) -> None:
    model = build_tiny(family)
    targets = find_targets(model)
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in targets.items()}
    report = quantize_(model, QuantConfig(bits=3, group_size=32, compensate_rank=4), progress=False)
    assert set(report.replaced) == set(targets)
    expected = 0
    for name, shape in shapes.items():
        module = model.get_submodule(name)
        assert isinstance(module, QuantizedLinear) and module.bits == 3 and module.rank == 4
        m, n = shape
        # codes + float16 scale and offset per group + float16 factors
        assert module.nbytes == m * n * 3 // 8 + 4 * (m * n // 32) + 4 * (m + n) * 2
        expected += module.nbytes
    assert report.nbytes == expected == report.plan.nbytes


def test_quantized_model_close_to_dense(family: str) -> None:
    model = build_tiny(family)
    ids = token_ids()
    dense = logits_of(model, ids)
    quantize_(model, QuantConfig(bits=8, group_size=32), progress=False)
    assert (logits_of(model, ids) - dense).abs().max() < 0.05 * dense.abs().max()


def test_calibrated_quantization_reports_errors() -> None:
    model = build_tiny("llama")
    windows = token_ids(batch=4, length=32)
    report = quantize_(model, QuantConfig(bits=2, group_size=32, compensate_rank=8), calibration=windows,
                       progress=False)
    assert set(report.output_error) == set(report.replaced)
    assert all(after <= before for before, after in report.output_error.values())


@pytest.mark.parametrize("rank, iters", [(0, 1), (8, 3)])
def test_gptq_quantization_of_a_model_beats_rtn_on_the_calibration_outputs(rank: int, iters: int) -> None:
    """Through quantize_ (the CLI's path, alternation rounds included), GPTQ's codes leave less
    calibration output error than RTN's in total, and compensation still never adds to it."""
    windows = token_ids(batch=4, length=32)
    totals = {}
    for quantizer in ("rtn", "gptq"):
        config = QuantConfig(bits=2, group_size=32, compensate_rank=rank, compensate_iters=iters, quantizer=quantizer)
        report = quantize_(build_tiny("llama"), config, calibration=windows, progress=False)
        assert all(after <= before + 1e-9 for before, after in report.output_error.values())
        totals[quantizer] = sum(after for _, after in report.output_error.values())
    assert totals["gptq"] < totals["rtn"], totals


def _saved(tmp_path: Path, family: str = "llama", **config):
    """(quantized model, its checkpoint folder, compress_'s report)."""
    model = build_tiny(family)
    report = compress_(model, QuantConfig(**{"bits": 3, "group_size": 32, "compensate_rank": 4, **config}),
                       progress=False)
    return model, save(model, tmp_path / "q", record=report.record), report


@pytest.mark.parametrize("iters", [1, 3])
def test_save_load_identical_logits_without_requantizing(tmp_path: Path, family: str, monkeypatch, iters) -> None:
    model, path, report = _saved(tmp_path, family, compensate_iters=iters)
    ids = token_ids()
    expected = logits_of(model, ids)
    from welore.quant import api, compensate

    def no_quantizing(*args, **kwargs):
        raise AssertionError("load must not quantize again")

    for module in (api, compensate):  # where quantize_weight is looked up
        monkeypatch.setattr(module, "quantize_weight", no_quantizing)
    reloaded = load_checkpoint(path)
    assert torch.equal(logits_of(reloaded.model, ids), expected)
    record = reloaded.record
    assert record.quant_plan.to_dict() == report.quant.plan.to_dict()
    assert record.quant_plan.compensate_iters == record.quant_config.compensate_iters == iters


def test_packed_bytes_on_disk(tmp_path: Path) -> None:
    _, path, report = _saved(tmp_path, bits=2, compensate_rank=0)
    plan = report.quant.plan
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        stored = {k: f.get_slice(k) for k in f.keys()}
        target_bytes = 0
        for name in plan.shapes:
            for part in ("codes", "scale", "offset"):
                tensor = f.get_tensor(f"{name}.{part}")
                target_bytes += tensor.numel() * tensor.element_size()
            assert f.get_tensor(f"{name}.codes").dtype == torch.uint8
            assert f.get_tensor(f"{name}.scale").dtype == torch.float16
    assert target_bytes == plan.nbytes
    assert plan.nbytes == sum(m * n * 2 // 8 + 4 * (m * n // 32) for m, n in plan.shapes.values())
    assert not any(name.endswith(".weight") and name.rsplit(".", 1)[0] in plan.shapes for name in stored)
    assert json.loads((path / "quant_plan.json").read_text())["bytes"] == plan.nbytes


def test_stored_format_survives_a_dtype_cast(tmp_path: Path) -> None:
    model, _, report = _saved(tmp_path)
    model.to(torch.float32)  # upcasts float16 scales in memory only
    state = model.state_dict()
    name = next(iter(report.quant.plan.shapes))
    assert state[f"{name}.scale"].dtype == torch.float16 and state[f"{name}.up"].dtype == torch.float16


def test_export_dense_of_a_quantized_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model, path, _ = _saved(tmp_path)
    ids = token_ids()
    export_dense(path, tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    torch.testing.assert_close(logits_of(dense, ids), logits_of(model, ids), atol=1e-4, rtol=1e-4)


def test_checkpoint_module_knows_the_plan_file() -> None:
    assert checkpoint.QUANT_PLAN == "quant_plan.json"


# --- target size ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected",
                         [("60MB", 60_000_000), ("1.5 MiB", 1_572_864), ("2000", 2000), ("3kb", 3000)])
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_parse_size_rejects_garbage() -> None:
    with pytest.raises(WeloreError, match="Cannot read size 'sixty'.*e.g. 60MB"):
        parse_bytes("sixty", "size", "60MB")


@pytest.mark.parametrize("fraction", [0.2, 0.3, 0.45])
@pytest.mark.parametrize("calibrated", [False, True])
def test_target_size_is_met_within_one_percent(fraction: float, calibrated: bool) -> None:
    model = build_tiny("llama", hidden=64, layers=2)
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in find_targets(model).items()}
    dense_bytes = sum(m * n * 4 for m, n in shapes.values())
    target = int(fraction * dense_bytes)
    windows = token_ids(batch=4, length=32) if calibrated else None
    report = quantize_(model, QuantConfig(bits=None, group_size=32, target_size=target, max_compensate_rank=16),
                       calibration=windows, progress=False)
    assert report.nbytes <= target
    assert report.plan.nbytes == sum(model.get_submodule(n).nbytes for n in shapes)
    selection = report.plan.meta.get("selection")
    assert (selection is not None) == calibrated  # with calibration, checked against the uniform widths
    if selection is None or selection["chosen"] == "allocated":
        assert report.nbytes >= 0.99 * target
    else:  # a uniform width scored better on the held-back windows with the bytes it could use
        assert len(set(report.plan.bits.values())) == 1


def test_target_size_is_never_worse_than_a_uniform_width_on_held_back_windows() -> None:
    model = build_tiny("llama", hidden=64, layers=2)
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in find_targets(model).items()}
    target = int(0.14 * sum(m * n * 4 for m, n in shapes.values()))  # 4.48 bits: int3 (4 with groups of 32) fits
    windows = token_ids(batch=8, length=32)
    report = quantize_(model, QuantConfig(bits=None, group_size=32, target_size=target), calibration=windows,
                       progress=False)
    selection = report.plan.meta["selection"]
    assert selection["held_tokens"] == 32  # the last eighth of the windows
    scores = selection["perplexity"]
    assert "allocated" in scores and {"int3", "int2"} <= {label.split("+")[0] for label in scores}
    assert selection["chosen"] == min(scores, key=scores.get)
    assert all(bits <= 8 * target / report.plan.params for bits in selection["bits_per_param"].values())
    # The model holds the chosen plan's trial modules: the same as quantizing a fresh model with it.
    from welore.lowrank.select import hold_back
    from welore.quant import apply_quant_plan_, quant_targets
    from welore.quant.api import _collect_stats

    fresh = build_tiny("llama", hidden=64, layers=2)
    stats = _collect_stats(fresh, quant_targets(fresh), hold_back(windows)[0], 4, False)
    apply_quant_plan_(fresh, report.plan, stats, progress=False)
    probe = token_ids(batch=2, length=16, seed=9)
    assert torch.equal(logits_of(model, probe), logits_of(fresh, probe))


def test_uniform_plans_fill_the_budget_with_one_width_each() -> None:
    shapes = {"a": (64, 128), "b": (128, 64), "c": (64, 64)}
    base = QuantPlan(shapes=shapes, bits=dict.fromkeys(shapes, 4), group_size=dict.fromkeys(shapes, 32),
                     ranks=dict.fromkeys(shapes, 0), requested_bytes=12_000)
    plans = uniform_plans(base, (8, 4, 3, 2), max_rank=64)
    # codes, scales and offsets alone: int8 20,480 + 2,560 and int4 10,240 + 2,560 bytes do not fit
    assert {label.split("+")[0] for label in plans} == {"int3", "int2"}
    for label, plan in plans.items():
        bits = int(label[3])
        assert set(plan.bits.values()) == {bits} and plan.nbytes <= 12_000
        assert max(plan.ranks.values()) - min(plan.ranks.values()) <= 1
        smallest = min(m + n for m, n in shapes.values()) * 2
        assert 12_000 - plan.nbytes < smallest or max(plan.ranks.values()) == 64  # nothing left that buys a rank


def test_target_size_spends_more_bytes_for_less_error() -> None:
    errors = []
    for fraction in (0.12, 0.3):
        model = build_tiny("llama")
        ids = token_ids()
        dense = logits_of(build_tiny("llama"), ids)
        shapes = [tuple(weight_matrix(m).shape) for m in find_targets(model).values()]
        target = int(fraction * sum(m * n * 4 for m, n in shapes))
        quantize_(model, QuantConfig(bits=None, group_size=32, target_size=target), progress=False)
        errors.append(float((logits_of(model, ids) - dense).norm()))
    assert errors[1] < errors[0]


def test_unreachable_target_size() -> None:
    model = build_tiny("llama")
    with pytest.raises(WeloreError, match="below the smallest reachable"):
        quantize_(model, QuantConfig(bits=None, group_size=32, target_size=100), progress=False)


def test_matrix_bytes() -> None:
    assert matrix_bytes((576, 1536), 4, 64) == 576 * 1536 // 2 + 4 * 576 * 1536 // 64
    assert matrix_bytes((576, 1536), 3, 64, rank=8) == 576 * 1536 * 3 // 8 + 4 * 576 * 1536 // 64 + 8 * 2112 * 2


def test_config_errors() -> None:
    with pytest.raises(WeloreError, match="int8, int4, int3, int2"):
        QuantConfig(bits=5)
    with pytest.raises(WeloreError, match="Compensation rank"):
        QuantConfig(compensate_rank=-1)
    with pytest.raises(WeloreError, match="Largest compensation rank -1"):
        QuantConfig(bits=None, target_size=10**6, max_compensate_rank=-1)
    with pytest.raises(WeloreError, match="quantizer"):
        QuantConfig(quantizer="awq")
    with pytest.raises(WeloreError, match="at least 1"):
        QuantConfig(compensate_rank=4, compensate_iters=0)
    with pytest.raises(WeloreError, match="add --compensate-rank"):
        QuantConfig(compensate_iters=3)


# --- command line --------------------------------------------------------------------------


def test_cli_quantize_with_compensation_and_evaluate(tmp_path: Path, cli_model_dir: Path, capsys) -> None:
    from welore.cli import main

    out = tmp_path / "q3"
    code = main(["compress", "-q", str(cli_model_dir), "--quantize", "int3", "--group-size", "32",
                 "--compensate-rank", "4", "--calib", str(_text_file(tmp_path)), "--calib-tokens", "256",
                 "--calib-seq-len", "64", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "at 3 bits" in printed and "EoRA" in printed and "compensated" in printed
    model, record = load(out), read_record(out)
    assert all(isinstance(model.get_submodule(n), QuantizedLinear) for n in record.quant_plan.shapes)
    assert record.quant_config.calib == str(_text_file(tmp_path))
    assert main(["evaluate", "-q", str(out), "--text", str(_text_file(tmp_path)), "--max-tokens", "128",
                 "--seq-len", "64", "--no-speed"]) == 0


def test_cli_target_size(tmp_path: Path, cli_model_dir: Path, capsys) -> None:
    from welore.cli import main

    out = tmp_path / "sized"
    dense = load_dense_target_bytes(cli_model_dir)
    size = int(dense * 0.2)
    assert main(["compress", "-q", str(cli_model_dir), "--target-size", str(size), "--group-size", "32",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "requested" in printed
    plan = read_record(out).quant_plan
    assert 0.99 * size <= plan.nbytes <= size


def test_cli_calibrated_target_size_reports_and_saves_the_size_plan_chosen(tmp_path: Path, cli_model_dir: Path,
                                                                           capsys) -> None:
    from welore.cli import main

    out = tmp_path / "sized"
    size = int(load_dense_target_bytes(cli_model_dir) * 0.14)
    assert main(["compress", "-q", str(cli_model_dir), "--target-size", str(size), "--group-size", "32",
                 "--calib", str(_text_file(tmp_path)), "--calib-tokens", "512", "--calib-seq-len", "64",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    selection = read_record(out).quant_plan.meta["selection"]
    assert f"size plan: {selection['chosen']}, the lowest perplexity on 64 held-back" in printed
    assert "allocated" in selection["perplexity"] and len(selection["perplexity"]) >= 2


@pytest.mark.parametrize("argv, match", [
    (["--quantize", "int3", "--ratio", "0.2", "--factorizer", "whiten"], "needs calibration text"),
    (["--quantize", "int3", "--target-size", "1MB"], "not both"),
    (["--target-size", "lots"], "Cannot read size"),
    (["--quantize", "int4", "--group-size", "7"], "Group size 7"),
    (["--quantize", "int4", "--compensate-iters", "3"], "add --compensate-rank"),
    (["--quantize", "int4", "--quantizer", "gptq"], "gptq quantizer needs calibration text; pass --calib"),
    (["--target-size", "1MB", "--max-compensate-rank", "-1"], "Largest compensation rank -1 is negative"),
])
def test_cli_quantize_mistakes(tmp_path: Path, cli_model_dir: Path, capsys, argv, match) -> None:
    from welore.cli import main

    code = main(["compress", "-q", str(cli_model_dir), *argv, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and match in err and "Traceback" not in err


def _text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    if not path.exists():
        path.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times."
                                    for i in range(400)))
    return path


def load_dense_target_bytes(folder: Path) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return sum(weight_matrix(m).numel() * 4 for m in find_targets(model).values())


def test_target_size_above_the_largest() -> None:
    model = build_tiny("llama")
    with pytest.raises(WeloreError, match="more than the largest"):
        quantize_(model, QuantConfig(bits=None, group_size=32, target_size=10**9), progress=False)


def test_streamed_load_of_a_quantized_checkpoint(tmp_path: Path) -> None:
    from welore.eval.evaluate import perplexity

    model, path, _ = _saved(tmp_path)
    windows = token_ids(batch=3, length=12)
    streamed = load(path, stream=True)
    assert (perplexity(streamed, windows, batch_size=2, progress=False)
            == perplexity(model, windows, batch_size=2, progress=False))


def test_newer_quant_plan_is_refused(tmp_path: Path) -> None:
    _, path, _ = _saved(tmp_path)
    data = json.loads((path / "quant_plan.json").read_text())
    data["version"] = 99
    (path / "quant_plan.json").write_text(json.dumps(data))
    with pytest.raises(WeloreError, match="newer than this welore"):
        load(path)


def test_packed_weights_count_as_parameters() -> None:
    from welore.modules import count_parameters

    dense = count_parameters(build_tiny("llama"))
    model = build_tiny("llama")
    report = quantize_(model, QuantConfig(bits=3, group_size=32, compensate_rank=4), progress=False)
    factors = sum(4 * sum(s) for s in report.plan.shapes.values())
    assert count_parameters(model) == dense + factors


def test_backward_through_packed_codes_keeps_no_float_weight() -> None:
    """Gradients reach the inputs (and bias) through Ŵ as through a dense layer holding Ŵ, and
    autograd saves no (out, in) float copy of Ŵ for the backward (QLoRA's memory)."""
    from torch import nn

    dense = nn.Linear(64, 48, bias=True)
    layer, _ = quantize_layer(dense, "layer", bits=3, group_size=32, rank=4)
    layer.bias.requires_grad_(True)
    reference = nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        reference.weight.copy_(layer.quantized_weight())
        reference.bias.copy_(layer.bias)
    x = torch.randn(2, 5, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    x_ref = x.detach().clone().requires_grad_(True)
    expected = reference(x_ref) + F.linear(F.linear(x_ref, layer.down.float()), layer.up.float())
    expected.backward(grad)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad, atol=1e-5, rtol=1e-5)
    assert (48, 64) not in saved and (64, 48) not in saved


def test_scale_and_offset_gradients_match_autograd_through_the_dequantized_weight() -> None:
    """With trainable scales (PEQA), the packed layer's gradients for the scales, offsets, input and
    factors equal those of autograd through Ŵ = scale·q + offset written out in float tensors."""
    from torch import nn

    from welore.quant import set_scales_trainable_

    layer, _ = quantize_layer(nn.Linear(64, 48, bias=False), "layer", bits=2, group_size=16, rank=3)
    holder = nn.Sequential(layer)
    assert set_scales_trainable_(holder, True) == ["0"]
    assert layer.scales_train and layer.scale.dtype == torch.float32
    q = unpack_codes(layer.codes, 2, 48 * 64).view(-1, 16).float()  # (groups, 16)
    scale = layer.scale.detach().clone().requires_grad_(True)
    offset = layer.offset.detach().clone().requires_grad_(True)
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    x_ref = x.detach().clone().requires_grad_(True)
    w = (q * scale[:, None] + offset[:, None]).view(48, 64)
    expected = F.linear(x_ref, w) + F.linear(F.linear(x_ref, layer.down.detach().float()), layer.up.detach().float())
    expected.backward(grad)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.scale.grad, scale.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.offset.grad, offset.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    assert layer.scale.grad.abs().sum() > 0 and layer.offset.grad.abs().sum() > 0


def test_trainable_scales_keep_the_stored_format() -> None:
    """Scales as float32 parameters save as the same float16 tensors under the same names, and
    turning them back into buffers restores the module exactly."""
    from welore.quant import set_scales_trainable_

    model = build_tiny("llama")
    quantize_(model, QuantConfig(bits=3, group_size=32, compensate_rank=2), progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = token_ids()
    logits = logits_of(model, ids)
    changed = set_scales_trainable_(model, True)
    assert changed and set_scales_trainable_(model, True) == []  # idempotent
    during = model.state_dict()
    assert during.keys() == before.keys()
    assert all(during[k].dtype == before[k].dtype and torch.equal(during[k], before[k]) for k in before)
    torch.testing.assert_close(logits_of(model, ids), logits, atol=0, rtol=0)
    assert set_scales_trainable_(model, False) == changed
    assert not any(n.endswith((".scale", ".offset")) for n, _ in model.named_parameters())
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


# --- low rank and quantization together (W ≈ Q(up)·Q(down)) ---------------------------------------


def _joint(bits: int = 4, rank: int = 0, calibrated: bool = False):
    from conftest import give_decaying_spectra_

    from welore import CompressConfig, Recipe

    model = build_tiny("llama")
    give_decaying_spectra_(model)
    calibration = token_ids(batch=4, length=16, seed=3) if calibrated else None
    report = compress_(model, Recipe([CompressConfig(ratio=0.3, method="welore"),
                                      QuantConfig(bits=bits, group_size=16, compensate_rank=rank)]),
                       calibration=calibration, progress=False)
    return model, report.low_rank, report


def test_joint_quantizes_the_factors_and_the_dense_rest() -> None:
    from welore.lowrank.module import LowRankLinear

    model, low_rank, report = _joint()
    plan = report.quant.plan
    for name, rank in low_rank.plan.ranks.items():
        module = model.get_submodule(name)
        if rank is None:
            assert isinstance(module, QuantizedLinear) and name in plan.shapes
        else:
            assert isinstance(module, LowRankLinear) and isinstance(module.up, QuantizedLinear)
            assert plan.shapes[f"{name}.up"] == (module.out_features, rank)
            assert plan.shapes[f"{name}.down"] == (rank, module.in_features)
    assert report.record.plan is low_rank.plan and report.record.quant_plan is plan  # both plans are recorded
    quant_alone = quantize_(build_tiny("llama"), QuantConfig(bits=4, group_size=16), progress=False).plan
    params = sum(m * n for m, n in plan.shapes.values())
    assert params == pytest.approx((1 - low_rank.plan.achieved_ratio) * quant_alone.params, rel=1e-9)
    assert plan.nbytes == sum(matrix_bytes(s, 4, 16) for s in plan.shapes.values()) < quant_alone.nbytes


def test_joint_save_load_export_and_quantize_twice(tmp_path: Path) -> None:
    model, _, report = _joint(rank=2, calibrated=True)
    errors = report.quant.output_error
    assert errors and all(after <= before + 1e-9 for before, after in errors.values())
    path = save(model, tmp_path / "joint", record=report.record)
    ids = token_ids()
    reloaded = load_checkpoint(path)
    assert torch.equal(logits_of(model, ids), logits_of(reloaded.model, ids))
    assert reloaded.record == report.record
    from welore.eval.evaluate import perplexity

    windows = token_ids(batch=3, length=12)
    assert perplexity(load(path, stream=True), windows, progress=False) == perplexity(model, windows, progress=False)
    dense = export_dense(path, tmp_path / "dense")
    from transformers import AutoModelForCausalLM

    torch.testing.assert_close(logits_of(AutoModelForCausalLM.from_pretrained(dense), ids), logits_of(model, ids),
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(WeloreError, match="already quantized"):
        quantize_(model, QuantConfig(bits=4, group_size=16), progress=False)


def test_cli_low_rank_and_quantization_together(tmp_path: Path, cli_model_dir: Path, capsys) -> None:
    from welore.cli import main

    out = tmp_path / "joint"
    code = main(["compress", "-q", str(cli_model_dir), "--ratio", "0.3", "--method", "uniform", "--data-free",
                 "--quantize", "int4", "--group-size", "16", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "factorizer svd" in printed and "then quantized:" in printed and "at 4 bits" in printed
    record = read_record(out)
    assert record.plan.method == "uniform"
    dense = load_dense_target_bytes(cli_model_dir)
    # 70% of the weights at 6 bits (4-bit codes, groups of 16) instead of 32
    assert record.quant_plan.nbytes < 0.7 * dense * 6 / 32
    assert f"{dense / 1e6:.2f} MB -> {record.quant_plan.nbytes / 1e6:.3f} MB" in printed
    assert main(["evaluate", "-q", str(out), "--text", str(_text_file(tmp_path)), "--max-tokens", "128",
                 "--seq-len", "64", "--no-speed"]) == 0


def test_size_quality_plot_is_written_atomically(tmp_path: Path) -> None:
    from welore.report import plot_size_quality

    points = {"quantization alone": [(46.4, 91.0, "rtn3-g64"), (33.2, 5e5, "rtn2-g64")],
              "low rank + quantization": [(53.7, 30.0, "lr10-rtn4-g64")]}
    plot_size_quality(points, tmp_path / "f.png", dense=(212.3, 11.2), title="frontier")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]


def test_eora_factors_are_stored_balanced() -> None:
    dense = torch.nn.Linear(64, 48, bias=False)
    dense.weight.data = _weight()
    stats, _ = _stats(64)
    module, _ = quantize_layer(dense, "layer", 3, 32, rank=4, stats=stats, factor_dtype="float32")
    up, down = module.up.detach(), module.down.detach()  # (out, r), (r, in)
    torch.testing.assert_close(up.norm(dim=0), down.norm(dim=1), rtol=1e-4, atol=1e-7)
