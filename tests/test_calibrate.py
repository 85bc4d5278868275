"""Tests for calibration statistics: `InputStats` and `iter_block_stats` (block by block).

The reference is a brute-force run: plain forward hooks on every target during one forward of
the whole model, accumulating XᵀX directly.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny, tiny_config, token_ids
from torch import nn
from transformers import Qwen2ForCausalLM

from welore.errors import WeloreError
from welore.lowrank.calibrate import InputStats, iter_block_stats
from welore.targets import find_targets, layer_index

WINDOWS = dict(batch=5, length=16)  # 5 windows in batches of 2: the last batch is smaller
BATCH = 2

# Target groups that read one tensor, by family (matrix type without the block prefix).
SHARED = {
    "llama": [{"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}, {"mlp.gate_proj", "mlp.up_proj"}],
    "qwen2": [{"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}, {"mlp.gate_proj", "mlp.up_proj"}],
    "gpt2": [],
}


def brute_force(model: nn.Module, targets: dict[str, nn.Module], windows: torch.Tensor) -> dict[str, InputStats]:
    """XᵀX, Σ|x| and token counts of every target, from hooks on one forward of the whole model."""
    stats: dict[str, InputStats] = {}

    def hook(name: str):
        def accumulate(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()  # (tokens, in)
            s = stats.setdefault(name, InputStats.zeros(x.shape[1]))
            s.xtx += x.T @ x
            s.abs_sum += x.abs().sum(0)
            s.tokens += x.shape[0]

        return accumulate

    handles = [module.register_forward_hook(hook(name)) for name, module in targets.items()]
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], BATCH):
                model(windows[start : start + BATCH], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def collect(model: nn.Module, windows: torch.Tensor, targets: dict[str, nn.Module] | None = None, on_block=None):
    """Run iter_block_stats to the end; block index -> {name: stats}. `on_block(k, stats)` may change the model."""
    targets = find_targets(model) if targets is None else targets
    blocks = {}
    for k, stats in iter_block_stats(model, targets, windows, batch_size=BATCH, progress=False):
        blocks[k] = stats
        if on_block is not None:
            on_block(k, stats)
    return blocks


def assert_stats_close(got: InputStats, expected: InputStats, name: str) -> None:
    assert got.tokens == expected.tokens, name
    scale = expected.xtx.abs().max()
    assert torch.allclose(got.xtx, expected.xtx, rtol=1e-5, atol=1e-6 * scale), name
    assert torch.allclose(got.abs_sum, expected.abs_sum, rtol=1e-5, atol=1e-6 * expected.abs_sum.max()), name
    assert torch.allclose(got.mean_abs, expected.abs_sum / expected.tokens, rtol=1e-5), name


def assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks, f"forward hook left on {name!r}"
        assert not module._forward_pre_hooks, f"forward pre-hook left on {name!r}"


def test_stats_match_brute_force(tiny_model: nn.Module, family: str) -> None:
    windows = token_ids(**WINDOWS)
    targets = find_targets(tiny_model)
    expected = brute_force(tiny_model, targets, windows)
    blocks = collect(tiny_model, windows)
    # blocks in order, each with exactly its targets
    assert list(blocks) == sorted({layer_index(name) for name in targets})
    for k, stats in blocks.items():
        assert set(stats) == {name for name in targets if layer_index(name) == k}
        for name, s in stats.items():
            assert s.xtx.dtype == s.abs_sum.dtype == torch.float64
            assert s.tokens == windows.numel()
            assert_stats_close(s, expected[name], name)
    assert_no_hooks(tiny_model)


def test_modules_reading_one_tensor_share_stats(tiny_model: nn.Module, family: str) -> None:
    blocks = collect(tiny_model, token_ids(**WINDOWS))
    for k, stats in blocks.items():
        prefix = next(iter(stats)).split(f".{k}.")[0] + f".{k}."
        groups = {}  # id(stats) -> matrix types reading it
        for name, s in stats.items():
            groups.setdefault(id(s), set()).add(name[len(prefix) :])
        shared = [g for g in groups.values() if len(g) > 1]
        assert sorted(map(sorted, shared)) == sorted(map(sorted, SHARED[family]))
        for name, s in stats.items():
            assert name in s.names and all(stats[n] is s for n in s.names)


def test_calibration_is_sequential() -> None:
    """Block 1 sees the outputs of block 0 as the consumer left it (here: q_proj zeroed)."""
    windows = token_ids(**WINDOWS)
    plain = collect(build_tiny("llama"), windows)

    def zero_q_proj(k: int, stats: dict[str, InputStats]) -> None:
        if k == 0:
            with torch.no_grad():
                model.model.layers[0].self_attn.q_proj.weight.zero_()

    model = build_tiny("llama")
    sequential = collect(model, windows, on_block=zero_q_proj)
    expected = brute_force(model, find_targets(model), windows)  # the model as modified
    for name, s in sequential[0].items():  # block 0 was measured before the change
        assert_stats_close(s, plain[0][name], name)
    for name, s in sequential[1].items():
        assert not torch.allclose(s.xtx, plain[1][name].xtx, rtol=1e-3), name
        assert_stats_close(s, expected[name], name)


def test_a_replaced_module_is_used_for_the_next_block() -> None:
    """Swapping a target for another module (as compression does) also feeds the next block."""
    windows = token_ids(**WINDOWS)
    model = build_tiny("gpt2")

    def swap(k: int, stats: dict[str, InputStats]) -> None:
        if k == 0:
            mlp = model.transformer.h[0].mlp
            mlp.c_proj = _Halved(mlp.c_proj)

    blocks = collect(model, windows, on_block=swap)
    expected = brute_force(model, find_targets(model), windows)
    for name, s in blocks[1].items():
        assert_stats_close(s, expected[name], name)


class _Halved(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.inner(x)


def test_hybrid_attention_blocks_get_their_own_masks() -> None:
    """Qwen2 with sliding-window attention in block 1 only: block 1 gets the sliding mask."""
    config = tiny_config("qwen2")
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, 4, 1
    config.layer_types = ["full_attention", "sliding_attention"]
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    windows = token_ids(**WINDOWS)
    expected = brute_force(model, find_targets(model), windows)
    blocks = collect(model, windows)
    for name, s in blocks[1].items():
        assert_stats_close(s, expected[name], name)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]


def test_subset_of_targets_and_train_mode_restored() -> None:
    model = build_tiny("gpt2").train()
    windows = token_ids(**WINDOWS)
    targets = find_targets(model, ["transformer.h.1.mlp.c_proj"])
    blocks = collect(model, windows, targets=targets)
    assert list(blocks) == [1] and list(blocks[1]) == ["transformer.h.1.mlp.c_proj"]
    assert all(m.training for m in model.modules()), "train mode restored"
    expected = brute_force(model.eval(), targets, windows)  # the statistics were taken in eval mode
    assert_stats_close(blocks[1]["transformer.h.1.mlp.c_proj"], expected["transformer.h.1.mlp.c_proj"], "c_proj")


def test_stopping_early_removes_hooks() -> None:
    model = build_tiny("llama").train()
    generator = iter_block_stats(model, find_targets(model), token_ids(**WINDOWS), batch_size=BATCH, progress=False)
    k, stats = next(generator)
    assert k == 0 and stats
    assert_no_hooks(model)  # none while the consumer holds the block
    generator.close()
    assert_no_hooks(model)
    assert model.training


def test_target_outside_the_blocks_is_an_error() -> None:
    model = build_tiny("llama")
    targets = {**find_targets(model), "lm_head": model.lm_head}
    with pytest.raises(WeloreError, match="need targets inside decoder blocks"):
        next(iter_block_stats(model, targets, token_ids(**WINDOWS), progress=False))
    with pytest.raises(WeloreError, match="No target"):
        next(iter_block_stats(model, {}, token_ids(**WINDOWS), progress=False))
    assert_no_hooks(model)


def test_check_rejects_non_finite_or_empty_stats() -> None:
    stats = InputStats.zeros(4)
    with pytest.raises(WeloreError, match="no tokens"):
        stats.check("model.layers.0.mlp.up_proj")
    stats.add_(torch.randn(3, 5, 4))
    assert stats.tokens == 15
    stats.check("model.layers.0.mlp.up_proj")
    stats.abs_sum[2] = float("inf")
    with pytest.raises(WeloreError,
                       match=r"statistics of model\.layers\.0\.mlp\.up_proj contain NaN.*non-finite activations"):
        stats.check("model.layers.0.mlp.up_proj")
    stats = InputStats.zeros(4)
    stats.add_(torch.full((2, 4), float("nan")))
    with pytest.raises(WeloreError, match="contain NaN"):
        stats.check("x")


def test_non_finite_activations_stop_calibration() -> None:
    model = build_tiny("llama")
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight.fill_(float("nan"))
    with pytest.raises(WeloreError, match=r"mlp\.(gate|up)_proj.*contain NaN"):
        collect(model, token_ids(**WINDOWS))
    assert_no_hooks(model)


def test_drained_statistics_are_freed_before_the_next_block() -> None:
    """`drain` hands out a block's statistics in order and empties the dict; the generator keeps
    no reference, so while the next block runs the earlier block's statistics are gone (one
    block's XᵀX in memory at a time, not two)."""
    import gc
    import weakref

    from welore.lowrank.calibrate import drain

    model = build_tiny("llama", layers=3)
    targets = find_targets(model)
    alive: list[weakref.ref] = []
    seen_alive: list[int] = []  # earlier statistics still referenced, each time a block starts

    def count(module: nn.Module, args: tuple) -> None:
        gc.collect()
        seen_alive.append(sum(ref() is not None for ref in alive))

    hooks = [block.register_forward_pre_hook(count) for block in model.model.layers]
    for _, block_stats in iter_block_stats(model, targets, token_ids(**WINDOWS), batch_size=BATCH, progress=False):
        names, handed = list(block_stats), []
        for name, stats in drain(block_stats):
            handed.append(name)
            alive.append(weakref.ref(stats))
        del stats
        assert handed == names and not block_stats
    for hook in hooks:
        hook.remove()
    assert len(alive) == len(targets) and seen_alive and not any(seen_alive), seen_alive
