"""Tests for recovery by distillation (`welore.finetune.distill`, `welore finetune --distill`) on tiny models.

The student is a tiny LLaMA compressed by WeLore, the teacher the dense model it came from
(or a copy of the student itself, where the loss must vanish). Data and helpers as in
test_finetune.py: arithmetic token sequences a tiny model learns within a few steps.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import SMOLLM2_VOCAB, build_tiny, give_decaying_spectra_, save_model_folder
from test_finetune import CLI, Interrupt, arithmetic_blocks, assert_user_error, config, interrupt_at

from welore import CompressConfig, compress_
from welore.cli import main
from welore.errors import WeloreError
from welore.finetune import DistillOptions, FinetuneConfig, TokenBlocks, finetune
from welore.finetune.distill import distill_kl, resolve_teacher
from welore.finetune.state import checkpoints_dir
from welore.io.checkpoint import load, read_record, save


@pytest.fixture(scope="module")
def blocks() -> TokenBlocks:
    return TokenBlocks(arithmetic_blocks(32, seed=0), arithmetic_blocks(8, seed=1))


def dense_and_compressed(seed: int = 0, **kwargs):
    """A dense tiny LLaMA with heterogeneous spectra and its WeLore compression at ratio 0.3."""
    dense = build_tiny("llama", seed=seed, **kwargs)
    give_decaying_spectra_(dense)
    student = copy.deepcopy(dense)
    compress_(student, CompressConfig(ratio=0.3, method="welore"), progress=False)
    return dense, student


def run(model, blocks, teacher=None, **kwargs):
    options = {k: kwargs.pop(k) for k in ("out", "resume", "overwrite", "on_gradients") if k in kwargs}
    return finetune(model, None, config(**kwargs), blocks=blocks, progress=False, teacher=teacher, **options)


def distilling(**kwargs) -> DistillOptions:
    """Distillation on (`--distill`), with these settings."""
    return DistillOptions(enabled=True, **kwargs)


# --- the loss --------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_matches_a_direct_computation(temperature: float) -> None:
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=generator), 3 * torch.randn(2, 5, 11, generator=generator)
    direct = student.double().requires_grad_(True)
    p = torch.softmax(teacher.double() / temperature, dim=-1)  # (B, T, V)
    q = torch.softmax(direct / temperature, dim=-1)
    expected = (p * (p.log() - q.log())).sum(-1).mean() * temperature**2
    expected.backward()
    ours = student.clone().requires_grad_(True)
    kl = distill_kl(ours, teacher, temperature)
    kl.backward()
    torch.testing.assert_close(kl.double(), expected.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.grad.double(), direct.grad, atol=1e-7, rtol=1e-5)
    assert distill_kl(student, student, temperature) == 0
    assert distill_kl(student, teacher, temperature) > 0


def test_kl_of_a_model_against_itself_is_zero_with_zero_gradient() -> None:
    _, student = dense_and_compressed()
    batch = arithmetic_blocks(2, seed=3)
    logits = student(input_ids=batch).logits.detach().requires_grad_(True)  # (B, T, V)
    loss = distill_kl(logits, logits.detach(), temperature=2.0)
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize("mode", ["lrc", "lora", "full"])
def test_teacher_equal_to_student_gives_zero_loss_and_zero_gradient(mode: str, blocks) -> None:
    _, student = dense_and_compressed()
    teacher = copy.deepcopy(student)
    gradients = []

    def record(step: int, model) -> None:
        gradients.append(max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None))

    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    result = run(student, blocks, teacher=teacher, mode=mode, steps=3, distill=distilling(), on_gradients=record)
    assert result.losses == [0.0, 0.0, 0.0]
    assert gradients == [0.0, 0.0, 0.0]
    assert result.val_ppl_after == result.val_ppl_before
    if mode != "lora":  # (a merged LoRA adapter with a zero update leaves the weights as they were too)
        assert all(torch.equal(p, before[n]) for n, p in result.model.named_parameters())


def test_alpha_zero_is_plain_lm_finetuning_exactly(blocks) -> None:
    dense, student = dense_and_compressed()
    plain = run(copy.deepcopy(student), blocks, steps=4)
    mixed = run(copy.deepcopy(student), blocks, teacher=dense, steps=4, distill=distilling(alpha=0.0))
    assert mixed.losses == plain.losses
    expected = dict(plain.model.named_parameters())
    assert all(torch.equal(p, expected[n]) for n, p in mixed.model.named_parameters())


def test_distillation_moves_the_student_towards_the_teacher(blocks) -> None:
    dense, student = dense_and_compressed()
    batch = blocks.val

    def kl_to_teacher(model) -> float:
        with torch.no_grad():
            return distill_kl(model(input_ids=batch).logits, dense(input_ids=batch).logits).item()

    before = kl_to_teacher(student)
    result = run(student, blocks, teacher=copy.deepcopy(dense), steps=8, lr=1e-3, distill=distilling(temperature=2.0))
    assert kl_to_teacher(result.model) < before
    assert result.config.distill.enabled and result.config.distill.temperature == 2.0


def test_alpha_mixes_kl_and_lm_loss(blocks) -> None:
    """The first step's loss (before any update) is α·KL + (1 − α)·LM for the data's first batch."""
    dense, student = dense_and_compressed()
    kl = run(copy.deepcopy(student), blocks, teacher=dense, steps=1, distill=distilling()).losses[0]
    lm = run(copy.deepcopy(student), blocks, steps=1).losses[0]
    mixed = run(copy.deepcopy(student), blocks, teacher=dense, steps=1, distill=distilling(alpha=0.3)).losses[0]
    assert mixed == pytest.approx(0.3 * kl + 0.7 * lm, rel=1e-5)


def test_bf16_teacher(blocks) -> None:
    dense, student = dense_and_compressed()
    result = run(student, blocks, teacher=dense, steps=2, distill=distilling(teacher_dtype="bfloat16"))
    assert dense.model.embed_tokens.weight.dtype == torch.bfloat16 and all(map(lambda x: x > 0, result.losses))


def test_resumed_distillation_matches_an_uninterrupted_run(blocks, tmp_path: Path) -> None:
    options = dict(steps=6, save_every=3, lr=3e-3, distill=distilling(alpha=0.5, temperature=2.0))
    dense, student = dense_and_compressed()
    straight = run(copy.deepcopy(student), blocks, teacher=copy.deepcopy(dense), out=tmp_path / "straight", **options)
    with pytest.raises(Interrupt):
        run(copy.deepcopy(student), blocks, teacher=copy.deepcopy(dense), out=tmp_path / "resumed",
            on_gradients=interrupt_at(5), **options)
    assert not (tmp_path / "resumed").exists()
    run_json = json.loads((checkpoints_dir(tmp_path / "resumed") / "run.json").read_text())
    assert run_json["teacher"] and run_json["config"]["distill_alpha"] == 0.5  # by option, as every welore wrote it
    assert not any("teacher" in p.name for p in (checkpoints_dir(tmp_path / "resumed") / "step-000003").iterdir())
    with pytest.raises(WeloreError, match=r"different run \(the distillation teacher differs"):
        run(copy.deepcopy(student), blocks, teacher=build_tiny("llama", seed=5), out=tmp_path / "resumed",
            resume=True, **options)
    resumed = run(copy.deepcopy(student), blocks, teacher=copy.deepcopy(dense), out=tmp_path / "resumed",
                  resume=True, **options)
    assert resumed.resumed_from == 3 and resumed.losses == straight.losses
    expected = dict(straight.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        torch.testing.assert_close(param, expected[name], atol=1e-6, rtol=0)
    record = json.loads((tmp_path / "resumed" / "finetune.json").read_text())["result"]["config"]["distill"]
    assert record["enabled"] and record["alpha"] == 0.5 and record["temperature"] == 2.0


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_outside_the_unit_interval_is_refused(alpha: float) -> None:
    with pytest.raises(WeloreError, match=r"--distill-alpha must be in \[0, 1\]"):
        FinetuneConfig(distill=distilling(alpha=alpha))


def test_other_bad_settings_are_refused(blocks) -> None:
    with pytest.raises(WeloreError, match="--distill-temperature must be a positive number"):
        FinetuneConfig(distill=distilling(temperature=0))
    with pytest.raises(WeloreError, match="add --distill or drop --teacher"):
        FinetuneConfig(distill=DistillOptions(teacher="smollm2-135m"))
    dense, student = dense_and_compressed()
    with pytest.raises(WeloreError, match="distillation is off"):
        run(student, blocks, teacher=dense)


def test_a_teacher_with_another_vocabulary_is_refused(blocks) -> None:
    _, student = dense_and_compressed()
    with pytest.raises(WeloreError, match="predicts 96 tokens and the model 128.*same tokenizer"):
        run(student, blocks, teacher=build_tiny("llama", vocab=96), distill=distilling())


def test_a_dense_model_without_a_source_needs_a_teacher(blocks) -> None:
    with pytest.raises(WeloreError, match="records no source model.*--teacher MODEL"):
        run(build_tiny("llama"), blocks, mode="full", distill=distilling())


def test_the_teacher_is_the_source_followed_back_through_checkpoints(tmp_path: Path) -> None:
    _, student = dense_and_compressed()
    first = save(student, tmp_path / "compressed", source="dense-model")
    again = save(load(first), tmp_path / "finetuned", source=str(first))
    source = read_record(again).source
    assert source == str(first)
    assert resolve_teacher(source, None) == "dense-model"
    assert resolve_teacher(source, "other") == "other"


# --- CLI -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense_and_compressed_dirs(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer) -> tuple[Path, Path]:
    """A dense tiny LLaMA folder with SmolLM2's tokenizer and its compressed checkpoint, which records it as source."""
    root = tmp_path_factory.mktemp("distill")
    dense = build_tiny("llama", vocab=SMOLLM2_VOCAB, hidden=32)
    give_decaying_spectra_(dense)
    dense_dir = save_model_folder(dense, smollm2_tokenizer, root / "dense")
    compress_(dense, CompressConfig(ratio=0.3, method="welore"), progress=False)
    return dense_dir, save(dense, root / "compressed", tokenizer=smollm2_tokenizer, source=str(dense_dir))


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["finetune", "-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_distills_from_the_recorded_source(capsys, dense_and_compressed_dirs, english_text_file: Path,
                                               tmp_path: Path) -> None:
    dense_dir, compressed_dir = dense_and_compressed_dirs
    code, out, err = cli(capsys, compressed_dir, "--distill", "--distill-alpha", "0.8", "--distill-temperature", "2",
                         "--data", english_text_file, "--steps", "2", "--out", tmp_path / "ft", *CLI)
    assert code == 0, err
    assert f"distilled from {dense_dir}" in out
    record = json.loads((tmp_path / "ft" / "finetune.json").read_text())["result"]["config"]["distill"]
    assert record["enabled"] and record["teacher"] == str(dense_dir) and record["alpha"] == 0.8
    assert record["teacher_dtype"] == "float32"
    code, out, err = cli(capsys, compressed_dir, "--distill", "--teacher", dense_dir, "--teacher-dtype", "bfloat16",
                         "--data", english_text_file, "--steps", "1", "--out", tmp_path / "ft2", *CLI)
    assert code == 0, err
    record = json.loads((tmp_path / "ft2" / "finetune.json").read_text())["result"]["config"]["distill"]
    assert record["teacher_dtype"] == "bfloat16"


def test_cli_distillation_user_errors(capsys, dense_and_compressed_dirs, cli_model_dir: Path, english_text_file: Path,
                                      tmp_path: Path, smollm2_tokenizer) -> None:
    dense_dir, compressed_dir = dense_and_compressed_dirs
    out, text = tmp_path / "ft", ["--data", english_text_file]
    assert_user_error(*cli(capsys, compressed_dir, "--distill", "--distill-alpha", "2", *text, "--out", out, *CLI),
                      "--distill-alpha must be in [0, 1]", tmp_path)
    assert_user_error(*cli(capsys, cli_model_dir, "--mode", "full", "--distill", *text, "--out", out, *CLI),
                      "records no source model", tmp_path)
    other = save_model_folder(build_tiny("llama", vocab=1000, hidden=32), None, tmp_path / "other-vocab")
    assert_user_error(*cli(capsys, compressed_dir, "--distill", "--teacher", other, *text, "--out", out, *CLI),
                      "distill from a model with the same tokenizer", tmp_path)
    assert_user_error(*cli(capsys, compressed_dir, "--distill", "--teacher", tmp_path / "missing", *text, "--out", out,
                           *CLI), "cannot be loaded", tmp_path)
    assert_user_error(*cli(capsys, compressed_dir, "--teacher", dense_dir, *text, "--out", out, *CLI),
                      "add --distill or drop --teacher", tmp_path)
