"""Tests for LowRankLinear, the SVD factorizer and compress_ (targets → plan → factors → swap)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny, give_decaying_spectra_, logits_of, token_ids
from torch import nn
from transformers.pytorch_utils import Conv1D

from welore import CompressConfig, apply_plan_, compress_
from welore.errors import WeloreError
from welore.lowrank.factorize import FACTORIZERS, svd_factors
from welore.lowrank.module import LowRankLinear
from welore.lowrank.plan import RankPlan
from welore.modules import count_parameters
from welore.targets import find_targets, matrix_shape, weight_matrix


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _full_rank(dense: nn.Module) -> LowRankLinear:
    w = weight_matrix(dense)
    bias = dense.bias.detach() if dense.bias is not None else None
    return LowRankLinear.from_factors(*svd_factors(w, min(w.shape)), bias, w.dtype)


# --- LowRankLinear and the SVD factorizer ------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("out_features", "in_features"), [(24, 40), (40, 24), (32, 32)])
def test_full_rank_low_rank_linear_equals_linear(out_features: int, in_features: int, bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    low_rank = _full_rank(linear)
    assert low_rank.rank == min(out_features, in_features)
    assert (low_rank.up.bias is not None) == bias
    x = torch.randn(3, 5, in_features)
    with torch.no_grad():
        assert torch.allclose(low_rank(x), linear(x), atol=1e-4)
        assert torch.allclose(low_rank.dense_weight(), linear.weight, atol=1e-5)


@pytest.mark.parametrize(("nf", "nx"), [(48, 16), (16, 48)])
def test_full_rank_low_rank_linear_equals_conv1d(nf: int, nx: int) -> None:
    torch.manual_seed(0)
    conv = Conv1D(nf, nx)  # weight (nx, nf) = (in, out)
    with torch.no_grad():
        conv.weight.normal_(0, 0.2)
        conv.bias.normal_(0, 0.2)
    assert matrix_shape(conv) == (nf, nx)
    low_rank = _full_rank(conv)
    assert (low_rank.in_features, low_rank.out_features) == (nx, nf)
    x = torch.randn(2, 7, nx)
    with torch.no_grad():
        assert torch.allclose(low_rank(x), conv(x), atol=1e-4)


def test_svd_factors_are_the_best_rank_r_approximation() -> None:
    torch.manual_seed(0)
    w = torch.randn(30, 20)
    s = torch.linalg.svdvals(w.double())
    for rank in (1, 5, 19):
        up, down = svd_factors(w, rank)
        assert up.shape == (30, rank) and down.shape == (rank, 20)
        assert up.dtype == down.dtype == torch.float32
        error = torch.linalg.matrix_norm((w - up @ down).double())
        assert error.item() == pytest.approx(s[rank:].pow(2).sum().sqrt().item(), rel=1e-4)  # Eckart–Young
        # WeLore's balanced split: column i of up and row i of down both have norm √σ_i
        assert torch.allclose(up.norm(dim=0).double(), s[:rank].sqrt(), rtol=1e-4)
        assert torch.allclose(down.norm(dim=1).double(), s[:rank].sqrt(), rtol=1e-4)
    assert FACTORIZERS["svd"].factors(torch.eye(3), 2, None)[0].shape == (3, 2)


def test_low_rank_linear_rejects_impossible_rank() -> None:
    with pytest.raises(AssertionError):
        LowRankLinear(8, 4, rank=5)
    with pytest.raises(AssertionError):
        LowRankLinear(8, 4, rank=0)


def test_full_rank_swap_keeps_logits(family: str) -> None:
    """Parity: every target matrix replaced by its full-rank factors ⇒ the same logits."""
    model = build_tiny(family)
    ids = token_ids()
    expected = logits_of(model, ids)
    targets = find_targets(model)
    for name, dense in targets.items():
        _swap(model, name, _full_rank(dense))
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == len(targets)
    assert torch.allclose(logits_of(model, ids), expected, atol=1e-4)


# --- compress_ ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["uniform", "welore", "energy"])
def test_compress_replaces_exactly_the_plan(family: str, method: str) -> None:
    model = build_tiny(family)
    give_decaying_spectra_(model)
    ids = token_ids()
    before_logits = logits_of(model, ids)
    targets = find_targets(model)
    original = {name: copy.deepcopy(module) for name, module in targets.items()}
    untouched = {name: module for name, module in model.named_modules() if name not in targets}

    report = compress_(model, CompressConfig(ratio=0.3, method=method), progress=False)
    plan = report.plan
    assert set(plan.ranks) == set(targets)
    assert report.replaced == plan.factorized
    assert plan.factorized, "a 30% cut must factorize something"
    assert not any(name.startswith("welore_") for name in vars(model))  # the plan is returned, not attached
    for name, rank in plan.ranks.items():
        module = model.get_submodule(name)
        if rank is None:
            assert module is targets[name], f"{name} is dense in the plan but was replaced"
            continue
        assert isinstance(module, LowRankLinear)
        assert module.rank == rank
        assert (module.out_features, module.in_features) == matrix_shape(original[name])
        assert module.up.weight.shape == (module.out_features, rank)
        assert module.down.weight.shape == (rank, module.in_features)
        dense_bias = original[name].bias
        if dense_bias is None:
            assert module.up.bias is None
        else:
            assert torch.equal(module.up.bias, dense_bias)
        # the factors are the truncated SVD of the original matrix
        up, down = svd_factors(weight_matrix(original[name]), rank)
        assert torch.allclose(module.dense_weight(), up @ down, atol=1e-5)
    for name, module in untouched.items():  # everything else is the same object as before
        assert model.get_submodule(name) is module, name
    after_logits = logits_of(model, ids)
    assert torch.isfinite(after_logits).all()
    assert not torch.allclose(after_logits, before_logits, atol=1e-4)


def test_embeddings_and_head_are_not_targets(family: str) -> None:
    model = build_tiny(family)
    report = compress_(model, CompressConfig(ratio=0.4, method="uniform"), progress=False)
    assert isinstance(model.get_input_embeddings(), nn.Embedding)
    head = model.get_output_embeddings()
    assert isinstance(head, nn.Linear) and not isinstance(head, LowRankLinear)
    assert all(not name.startswith(("lm_head", "model.embed", "transformer.wte")) for name in report.plan.ranks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compress_keeps_dtype(family: str, dtype: torch.dtype) -> None:
    model = build_tiny(family).to(dtype)
    report = compress_(model, CompressConfig(ratio=0.2, method="welore"), progress=False)
    assert report.replaced
    for name in report.replaced:
        module = model.get_submodule(name)
        for param in module.parameters():
            assert param.dtype == dtype, name
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert torch.isfinite(logits_of(model, token_ids())).all()


def test_whole_model_reduction_is_consistent(family: str) -> None:
    model = build_tiny(family)
    before = count_parameters(model)
    report = compress_(model, CompressConfig(ratio=0.25, method="energy"), progress=False)
    plan = report.plan
    after = count_parameters(model)
    assert report.params_before == before == sum(p.numel() for p in build_tiny(family).parameters())
    assert report.params_after == after
    assert before - after == plan.total_params - plan.kept_params  # only target weights changed
    assert report.model_reduction == pytest.approx(1 - after / before)
    assert 0 < report.model_reduction < plan.achieved_ratio  # embeddings, norms, biases stay


def test_compress_with_given_plan_is_reproducible(family: str) -> None:
    first = build_tiny(family)
    give_decaying_spectra_(first)
    second = copy.deepcopy(first)
    plan = compress_(first, CompressConfig(ratio=0.2, method="welore"), progress=False).plan
    report = compress_(second, CompressConfig(method=None), plan=RankPlan.from_dict(plan.to_dict()), progress=False)
    assert report.plan.ranks == plan.ranks
    ids = token_ids()
    assert torch.equal(logits_of(first, ids), logits_of(second, ids))


# --- target patterns -------------------------------------------------------------------------


PATTERNS = {
    "llama": {
        "exact": (["model.layers.1.self_attn.q_proj"], {"model.layers.1.self_attn.q_proj"}),
        "glob": (["*.q_proj"], {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}),
        "regex": (["re:.*\\.(up|down)_proj"],
                  {f"model.layers.{i}.mlp.{k}_proj" for i in (0, 1) for k in ("up", "down")}),
        "several": (["model.layers.0.mlp.gate_proj", "*.1.self_attn.v_proj"],
                    {"model.layers.0.mlp.gate_proj", "model.layers.1.self_attn.v_proj"}),
    },
    "gpt2": {
        "exact": (["transformer.h.0.attn.c_attn"], {"transformer.h.0.attn.c_attn"}),
        "glob": (["*.mlp.c_fc"], {"transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"}),
        "regex": (["re:transformer\\.h\\.1\\..*"],
                  {f"transformer.h.1.{k}" for k in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}),
        "several": (["*.attn.c_proj", "transformer.h.0.mlp.c_proj"],
                    {"transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj", "transformer.h.0.mlp.c_proj"}),
    },
    "qwen2": {
        "exact": (["model.layers.0.self_attn.k_proj"], {"model.layers.0.self_attn.k_proj"}),
        "glob": (["*.o_proj"], {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"}),
        "regex": (["re:model\\.layers\\.0\\.self_attn\\.[qkv]_proj"],
                  {f"model.layers.0.self_attn.{k}_proj" for k in "qkv"}),
        "several": (["*.gate_proj", "re:.*1\\.mlp\\.up_proj"],
                    {"model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"}),
    },
}


@pytest.mark.parametrize("kind", ["exact", "glob", "regex", "several"])
def test_target_patterns_select_modules(family: str, kind: str) -> None:
    patterns, expected = PATTERNS[family][kind]
    model = build_tiny(family)
    assert set(find_targets(model, patterns)) == expected
    report = compress_(model, CompressConfig(ratio=0.3, method="uniform", targets=patterns), progress=False)
    assert set(report.plan.ranks) == expected
    assert set(report.replaced) <= expected
    low_rank = {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert low_rank == set(report.replaced)


def test_default_targets_are_the_block_linears(family: str) -> None:
    model = build_tiny(family)
    targets = find_targets(model)
    per_layer = {"llama": 7, "gpt2": 4, "qwen2": 7}[family]
    assert len(targets) == 2 * per_layer
    assert all(isinstance(m, (nn.Linear, Conv1D)) for m in targets.values())


@pytest.mark.parametrize("pattern", ["*.nothing_here", "model.layers.9.self_attn.q_proj", "re:xyz.*", "lm_head"])
def test_pattern_matching_nothing_is_an_error(pattern: str) -> None:
    model = build_tiny("llama")
    with pytest.raises(WeloreError, match="matches no Linear"):
        compress_(model, CompressConfig(ratio=0.2, targets=[pattern]), progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_invalid_regex_is_an_error() -> None:
    with pytest.raises(WeloreError, match="regular expression"):
        find_targets(build_tiny("llama"), ["re:(unclosed"])


# --- plans that do not fit -------------------------------------------------------------------


def test_plan_from_another_family_is_an_error() -> None:
    gpt2 = build_tiny("gpt2")
    plan = compress_(gpt2, CompressConfig(ratio=0.2, method="uniform"), progress=False).plan
    llama = build_tiny("llama")
    with pytest.raises(WeloreError, match="does not have"):
        compress_(llama, CompressConfig(method=None), plan=plan, progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in llama.modules())


def test_plan_from_a_wider_model_is_an_error() -> None:
    wide = build_tiny("llama", hidden=128)
    plan = compress_(wide, CompressConfig(ratio=0.2, method="uniform"), progress=False).plan
    narrow = build_tiny("llama")
    with pytest.raises(WeloreError, match="use a plan made for this model"):
        apply_plan_(narrow, plan, progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in narrow.modules())


def test_plan_on_compressed_model_is_an_error() -> None:
    model = build_tiny("llama")
    plan = compress_(model, CompressConfig(ratio=0.3, method="uniform"), progress=False).plan
    with pytest.raises(WeloreError, match="already factorized"):
        apply_plan_(model, plan, progress=False)


# --- configuration errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ratio": 0.2, "method": "nope"},
        {"ratio": 0.2, "factorizer": "qr"},
        {"ratio": 0.0},
        {"ratio": 1.0},
        {"ratio": -0.1},
        {"ratio": 1.5},
        {"ratio": 0.2, "lrc_min_cut": 0.0},
        {"ratio": 0.2, "lrc_min_cut": 1.5},
    ],
)
def test_bad_config_is_a_user_error(kwargs: dict) -> None:
    with pytest.raises(WeloreError):
        CompressConfig(**kwargs)


def test_config_round_trips() -> None:
    config = CompressConfig(ratio=0.3, method="energy", targets=["*.q_proj"], lrc_min_cut=0.7)
    assert CompressConfig.from_dict(config.to_dict()) == config
    assert CompressConfig.from_dict({**config.to_dict(), "future_field": 1}) == config


def test_no_ratio_and_no_plan_is_an_error() -> None:
    with pytest.raises(WeloreError, match="ratio"):
        compress_(build_tiny("llama"), CompressConfig(), progress=False)


def test_unreachable_ratio_is_an_error() -> None:
    model = build_tiny("gpt2")
    with pytest.raises(WeloreError, match="unreachable"):
        compress_(model, CompressConfig(ratio=0.999), progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_nan_weight_is_an_error(family: str) -> None:
    model = build_tiny(family)
    name = list(find_targets(model))[-1]
    with torch.no_grad():
        weight_matrix(model.get_submodule(name))[1, 2] = float("nan")
    with pytest.raises(WeloreError, match="NaN"):
        compress_(model, CompressConfig(ratio=0.2), progress=False)
