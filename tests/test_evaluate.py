"""Tests for welore.evaluate on tiny random Llama and GPT-2 models (no downloads)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from welore.errors import WeloreError
from welore.eval.evaluate import (
    EvalResult,
    PeakMemory,
    count_parameters,
    evaluate,
    format_table,
    measure_speed,
    perplexity,
    weights_size_on_disk,
)

VOCAB = 128


def tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=256,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def make_windows(n: int = 5, length: int = 24) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (n, length), generator=generator)  # (N, T)


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    return tiny_gpt2()


# --- perplexity ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_perplexity_matches_transformers_loss(name: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(name).eval()
    windows = make_windows()
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.double() for w in windows]
    expected = math.exp(float(torch.stack(losses).mean()))
    ppl, n_predicted = perplexity(model, windows, batch_size=2, progress=False)
    assert n_predicted == windows.shape[0] * (windows.shape[1] - 1)
    assert ppl == pytest.approx(expected, rel=1e-5)


def test_perplexity_does_not_depend_on_batch_size(llama: LlamaForCausalLM) -> None:
    windows = make_windows(n=5)
    ppl_1, _ = perplexity(llama, windows, batch_size=1, progress=False)
    ppl_3, _ = perplexity(llama, windows, batch_size=3, progress=False)
    assert ppl_1 == pytest.approx(ppl_3, rel=1e-5)


def test_perplexity_is_deterministic(gpt2: GPT2LMHeadModel) -> None:
    windows = make_windows()
    assert perplexity(gpt2, windows, progress=False) == perplexity(gpt2, windows, progress=False)


def test_perplexity_restores_modes_and_keeps_no_gradients() -> None:
    model = tiny_llama()
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back as it was
    perplexity(model, make_windows(n=2), progress=False)
    assert model.training and model.model.layers[1].training
    assert not model.model.layers[0].training
    assert all(p.grad is None for p in model.parameters())


class UniformLM(torch.nn.Module):
    """An opaque model whose logits are all equal: its perplexity is exactly the vocabulary size."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.ones(*input_ids.shape, VOCAB)  # (B, T, V)


def test_perplexity_of_an_opaque_uniform_model_is_the_vocabulary_size() -> None:
    ppl, n_predicted = perplexity(UniformLM(), make_windows(n=3, length=10), progress=False)
    assert ppl == pytest.approx(VOCAB, rel=1e-6)
    assert n_predicted == 27


def test_non_finite_weights_raise() -> None:
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("nan"))
    with pytest.raises(WeloreError, match="non-finite logits"):
        perplexity(model, make_windows(n=2), progress=False)


@pytest.mark.parametrize(
    "windows, message",
    [
        (torch.arange(10), "2-D"),
        (torch.rand(2, 8), "integer token ids"),
        (torch.zeros(2, 1, dtype=torch.long), "at least 2 tokens"),
        (torch.full((2, 8), VOCAB), "outside the model's vocabulary"),
        (torch.zeros(1, 300, dtype=torch.long), "exceed the model's context"),
    ],
)
def test_bad_windows_raise(llama: LlamaForCausalLM, windows: torch.Tensor, message: str) -> None:
    with pytest.raises(WeloreError, match=message):
        perplexity(llama, windows, progress=False)


# --- size ----------------------------------------------------------------------------------


def test_count_parameters_counts_tied_weights_once() -> None:
    untied, tied = tiny_llama(tie=False), tiny_llama(tie=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    embedding = VOCAB * 32
    assert count_parameters(untied) == sum(t.numel() for t in untied.state_dict().values() if t.is_floating_point())
    assert count_parameters(tied) == count_parameters(untied) - embedding
    gpt2 = tiny_gpt2()
    assert count_parameters(gpt2) == sum(p.numel() for p in gpt2.parameters())


def test_count_parameters_shared_storage_counted_once() -> None:
    shared = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(shared, torch.nn.Linear(4, 4))
    model[1].weight = torch.nn.Parameter(shared.weight.data)  # another Parameter, same storage
    assert count_parameters(model) == 16 + 4 + 4


def test_weights_size_on_disk(tmp_path, llama: LlamaForCausalLM) -> None:
    llama.save_pretrained(tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert files
    expected = sum(f.stat().st_size for f in files)
    hidden = tmp_path / ".model.tmp-123"
    hidden.mkdir()
    (hidden / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 1000)  # same weights in the old format
    assert weights_size_on_disk(tmp_path) == expected
    assert weights_size_on_disk(files[0]) == files[0].stat().st_size


def test_weights_size_on_disk_bin_only_and_errors(tmp_path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 1234)
    assert weights_size_on_disk(tmp_path) == 1234
    with pytest.raises(WeloreError, match="does not exist"):
        weights_size_on_disk(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeloreError, match="No \\*.safetensors"):
        weights_size_on_disk(empty)


# --- memory and speed ----------------------------------------------------------------------


def _settle_memory() -> None:
    """Free what earlier tests left for the collector and hand glibc's free heap back to the system,
    so that the resident set does not shrink under a measurement (which would hide its growth)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def test_peak_memory_grows_with_allocation() -> None:
    _settle_memory()
    with PeakMemory() as idle:
        pass
    assert isinstance(idle.peak_bytes, int) and idle.peak_bytes >= 0
    size = 200_000_000
    with PeakMemory() as memory:
        block = torch.ones(size // 4, dtype=torch.float32)  # writes every page
        block.add_(1.0)
        del block
    assert isinstance(memory.peak_bytes, int)
    assert memory.peak_bytes >= 0.75 * size
    assert memory.total_peak_bytes >= memory.peak_bytes


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_measure_speed_is_positive_and_finite(name: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(name)
    prefill, generate = measure_speed(model, prompt_len=16, new_tokens=4, repeats=2)
    for value in (prefill, generate):
        assert math.isfinite(value) and value > 0


def test_measure_speed_rejects_too_long_prompt(llama: LlamaForCausalLM) -> None:
    with pytest.raises(WeloreError, match="context"):
        measure_speed(llama, prompt_len=250, new_tokens=32)


# --- evaluate, table -----------------------------------------------------------------------


def test_evaluate_end_to_end(tmp_path) -> None:
    model = tiny_gpt2()
    model.save_pretrained(tmp_path)
    windows = make_windows()
    result = evaluate(model, windows, path=tmp_path, prompt_len=16, new_tokens=4, progress=False)
    assert result.perplexity == pytest.approx(perplexity(model, windows, progress=False)[0])
    assert result.eval_tokens == windows.numel() - windows.shape[0]
    assert result.parameters == count_parameters(model)
    assert result.disk_bytes == weights_size_on_disk(tmp_path)
    assert result.peak_memory_bytes is not None and result.peak_memory_bytes >= 0
    assert result.prefill_tokens_per_s > 0 and result.generate_tokens_per_s > 0
    assert result.device == "cpu"
    data = json.loads(json.dumps(result.to_dict()))
    assert EvalResult.from_dict(data) == result


def test_evaluate_without_windows_or_speed(llama: LlamaForCausalLM) -> None:
    result = evaluate(llama, None, speed=False, progress=False)
    assert result.perplexity is None and result.eval_tokens == 0
    assert result.disk_bytes is None and result.peak_memory_bytes is None
    assert result.prefill_tokens_per_s is None and result.generate_tokens_per_s is None
    json.dumps(result.to_dict())


def _result(**changes) -> EvalResult:
    base = dict(perplexity=25.0, eval_tokens=1000, parameters=134_515_008, disk_bytes=538_000_000,
                peak_memory_bytes=900_000_000, prefill_tokens_per_s=2000.0,
                generate_tokens_per_s=40.0, device="cpu")
    return EvalResult(**{**base, **changes})


def test_format_table() -> None:
    rows = {
        "dense": _result(),
        "welore-0.2": _result(parameters=107_612_006, prefill_tokens_per_s=2500.0, disk_bytes=None),
        "uniform": _result(perplexity=None, generate_tokens_per_s=None),
    }
    table = format_table(rows, baseline="dense")
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    for name in rows:
        assert any(line.startswith(name) for line in lines)
    cells = {line.split()[0]: line.split() for line in lines[2:]}
    assert cells["welore-0.2"][3] == "-"  # disk
    assert cells["uniform"][1] == "-"  # perplexity
    assert cells["dense"][-2:] == ["1.000×", "1.000×"]
    assert cells["welore-0.2"][-2:] == ["0.800×", "1.250×"]
    assert "×" not in format_table(rows)
    with pytest.raises(WeloreError, match="Baseline"):
        format_table(rows, baseline="missing")
