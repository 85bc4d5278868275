"""Multi-process fine-tuning: `accelerate launch --num_processes 2 ... welore.cli finetune` on the CPU.

Two processes with gloo, one thread each, on tiny models with SmolLM2's tokenizer and a local
text. A run of 2 processes with --batch-size 2 reads the same blocks per step as one process
with --batch-size 4, so its losses and weights must match that run's up to float rounding; a
2-process run interrupted and resumed under 2 processes must end exactly where an
uninterrupted one does. Every launch has a timeout, so a hung collective fails the test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMOLLM2_VOCAB, build_tiny, give_decaying_spectra_, save_model_folder
from safetensors.torch import load_file

from welore import CompressConfig, compress_
from welore.cli import main
from welore.finetune.state import checkpoints_dir
from welore.io.checkpoint import load, save

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 240  # seconds for one launch (about 20 s on a 2-core machine)
OPTIONS = ["--seq-len", "32", "--val-tokens", "128", "--max-train-tokens", "1024", "--lr", "1e-2"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(*argv, driver: bool = False, fsdp: bool = False, **env: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of 2 CPU processes (DDP, or FSDP with `fsdp`) running `welore finetune
    ARGV` (or tests/ddp_run.py)."""
    target = [str(ROOT / "tests" / "ddp_run.py")] if driver else ["-m", "welore.cli"]
    engine = ["--use_fsdp", "--fsdp_version", "2"] if fsdp else ["--multi_gpu"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *engine, "--num_processes", "2",
               "--num_machines", "1", "--num_cpu_threads_per_process", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               *target, "finetune", "-q", "--device", "cpu", *map(str, argv)]
    environment = (os.environ | {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
                   | env)
    return subprocess.run(command, env=environment, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)


def one_process(capsys, *argv) -> str:
    code = main(["finetune", "-q", *map(str, argv)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def record(out: Path) -> dict:
    return json.loads((out / "finetune.json").read_text())["result"]


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    expected = dict(load(b).named_parameters())
    for name, param in load(a).named_parameters():
        torch.testing.assert_close(param, expected[name], atol=atol, rtol=0, msg=name)


def assert_processes_identical(dump: Path) -> None:
    """Both processes' trained parameters (tests/ddp_run.py's dumps) are bit for bit the same."""
    rank0, rank1 = load_file(dump / "rank0.safetensors"), load_file(dump / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer) -> dict[str, Path]:
    """Tiny model folders with SmolLM2's tokenizer: a compressed LLaMA (with LRCs), a dense
    LLaMA and a dense GPT-2 (which has dropout, so resuming must restore the RNG streams)."""
    root = tmp_path_factory.mktemp("ddp-models")
    model = build_tiny("llama", vocab=SMOLLM2_VOCAB, hidden=32)
    dense = save_model_folder(model, smollm2_tokenizer, root / "llama")
    give_decaying_spectra_(model)
    compress_(model, CompressConfig(ratio=0.3, method="welore"), progress=False)
    gpt2 = build_tiny("gpt2", vocab=SMOLLM2_VOCAB, hidden=32)
    return {"compressed": save(model, root / "compressed", tokenizer=smollm2_tokenizer), "llama": dense,
            "gpt2": save_model_folder(gpt2, smollm2_tokenizer, root / "gpt2")}


def test_two_processes_match_one_process_with_the_same_global_batch(capsys, folders, english_text_file: Path,
                                                                   tmp_path: Path) -> None:
    common = [folders["compressed"], "--mode", "lrc", "--data", english_text_file, "--steps", "4", "--eval-every", "2",
              *OPTIONS]
    ddp = launch(*common, "--batch-size", "2", "--save-every", "2", "--out", tmp_path / "ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("trainable parameters:") == 1  # only the main process reports
    assert ddp.stdout.count("peak memory:") == 1
    assert "(2 processes" in ddp.stdout
    one_process(capsys, *common, "--batch-size", "4", "--out", tmp_path / "one")

    two, one = record(tmp_path / "ddp"), record(tmp_path / "one")
    assert two["processes"] == 2 and one["processes"] == 1 and len(two["process_peak_memory_bytes"]) == 2
    assert two["train_tokens"] == one["train_tokens"] == 4 * 4 * 32
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert [h["val_ppl"] for h in two["history"]] == pytest.approx([h["val_ppl"] for h in one["history"]], rel=1e-5)
    assert_same_weights(tmp_path / "ddp", tmp_path / "one", atol=1e-5)
    # One output folder each, and nothing else: no second copy, temporary folder or checkpoint left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "one"]


def test_distillation_under_two_processes_matches_one_process(capsys, folders, english_text_file: Path,
                                                             tmp_path: Path) -> None:
    """Each process runs its own frozen teacher (not wrapped by DDP) on its own micro-batches."""
    common = [folders["compressed"], "--mode", "lrc", "--distill", "--teacher", folders["llama"], "--distill-alpha",
              "0.5", "--distill-temperature", "2", "--data", english_text_file, "--steps", "3", *OPTIONS]
    ddp = launch(*common, "--batch-size", "2", "--out", tmp_path / "ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("distilled from") == 1
    one_process(capsys, *common, "--batch-size", "4", "--out", tmp_path / "one")
    two, one = record(tmp_path / "ddp"), record(tmp_path / "one")
    assert two["config"]["distill"]["teacher"] == str(folders["llama"]) and two["processes"] == 2
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert_same_weights(tmp_path / "ddp", tmp_path / "one", atol=1e-5)


def test_resume_under_two_processes_matches_an_uninterrupted_run(capsys, folders, english_text_file: Path,
                                                                 tmp_path: Path) -> None:
    """GPT-2 (dropout: the RNG streams matter) trained fully with GaLore (its state must resume too)."""
    common = [folders["gpt2"], "--mode", "full", "--optimizer", "galore", "--galore-rank", "4", "--galore-gap", "2",
              "--data", english_text_file, "--steps", "6", "--save-every", "3", "--batch-size", "1",
              "--grad-accum", "2", *OPTIONS]
    dump = tmp_path / "dump"
    dump.mkdir()
    straight = launch(*common, "--out", tmp_path / "straight", driver=True, WELORE_TEST_DUMP=str(dump))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert_processes_identical(dump)

    stopped = launch(*common, "--out", tmp_path / "resumed", driver=True, WELORE_TEST_STOP_AT="5")
    assert stopped.returncode != 0 and "interrupted" in stopped.stderr
    run_dir = checkpoints_dir(tmp_path / "resumed")
    assert not (tmp_path / "resumed").exists()
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.json", "step-000003"]  # written once, complete
    generators = load_file(run_dir / "step-000003" / "rng.safetensors")
    assert {"rank0.torch", "rank1.torch"} <= set(generators)  # each process's RNG streams

    code = main(["finetune", "-q", *map(str, common), "--out", str(tmp_path / "resumed"), "--resume"])
    assert code == 2 and "number of processes, 2 vs 1" in capsys.readouterr().err  # one process cannot resume it

    resumed = launch(*common, "--out", tmp_path / "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = record(tmp_path / "resumed"), record(tmp_path / "straight")
    assert a["resumed_from"] == 3 and a["steps"] == 6
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-6, abs=0)
    assert a["val_ppl_after"] == pytest.approx(b["val_ppl_after"], rel=1e-6)
    assert_same_weights(tmp_path / "resumed", tmp_path / "straight", atol=1e-6)
    assert not run_dir.exists()


def test_fira_under_two_processes_matches_one_process(capsys, folders, english_text_file: Path, tmp_path: Path) -> None:
    common = [folders["llama"], "--mode", "full", "--optimizer", "fira", "--galore-rank", "4", "--galore-gap", "2",
              "--galore-scale", "1", "--data", english_text_file, "--steps", "4", *OPTIONS]
    dump = tmp_path / "dump"
    dump.mkdir()
    ddp = launch(*common, "--batch-size", "2", "--out", tmp_path / "ddp", driver=True, WELORE_TEST_DUMP=str(dump))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert_processes_identical(dump)
    # One process reading the same micro-batches (2 blocks, accumulated twice): the projections
    # amplify rounding (a rank-4 subspace of a tiny gradient is ill-conditioned), so the
    # comparison is with the run that sums the gradients in the same order, not with --batch-size 4.
    one_process(capsys, *common, "--batch-size", "2", "--grad-accum", "2", "--out", tmp_path / "one")
    two, one = record(tmp_path / "ddp"), record(tmp_path / "one")
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-6)
    assert two["val_ppl_after"] < two["val_ppl_before"]
    assert_same_weights(tmp_path / "ddp", tmp_path / "one", atol=1e-6)


# Full fine-tuning at --lr 1e-2 amplifies rounding: the clipped gradient of an embedding row
# a batch barely touches is ~1e-9, where AdamW's eps makes the update depend on its last bits
# (the sharded norm is summed in another order); at 1e-3 the runs agree to 1e-6.
@pytest.mark.parametrize("model,mode,lr", [("compressed", "lrc", "1e-2"), ("llama", "full", "1e-3")])
def test_fsdp_matches_one_process_with_the_same_global_batch(model: str, mode: str, lr: str, capsys, folders,
                                                             english_text_file: Path, tmp_path: Path) -> None:
    """Each process holds half of every parameter, gradient and AdamW state; the run follows the
    one-process run, writes its checkpoints once, and saves an ordinary (unsharded) model."""
    common = [folders[model], "--mode", mode, "--data", english_text_file, "--steps", "4", "--eval-every", "2",
              *OPTIONS, "--lr", lr]
    dump = tmp_path / "dump"
    dump.mkdir()
    fsdp = launch(*common, "--batch-size", "2", "--save-every", "2", "--out", tmp_path / "fsdp", driver=True,
                  fsdp=True, WELORE_TEST_DUMP=str(dump))
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert fsdp.stdout.count("trainable parameters:") == 1
    assert_processes_identical(dump)  # every process ends with the whole trained model
    one_process(capsys, *common, "--batch-size", "4", "--out", tmp_path / "one")
    two, one = record(tmp_path / "fsdp"), record(tmp_path / "one")
    assert two["processes"] == 2 and two["train_tokens"] == one["train_tokens"]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert [h["val_ppl"] for h in two["history"]] == pytest.approx([h["val_ppl"] for h in one["history"]], rel=1e-5)
    assert_same_weights(tmp_path / "fsdp", tmp_path / "one", atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dump", "fsdp", "one"]


def test_resume_under_fsdp_matches_an_uninterrupted_run(capsys, folders, english_text_file: Path,
                                                        tmp_path: Path) -> None:
    """A checkpoint holds the whole trainable parameters and AdamW state, gathered from the shards;
    a resumed FSDP run scatters them back and ends where the uninterrupted one does."""
    common = [folders["gpt2"], "--mode", "full", "--data", english_text_file, "--steps", "6", "--save-every", "3",
              "--batch-size", "1", "--grad-accum", "2", *OPTIONS]
    straight = launch(*common, "--out", tmp_path / "straight", fsdp=True)
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = launch(*common, "--out", tmp_path / "resumed", driver=True, fsdp=True, WELORE_TEST_STOP_AT="5")
    assert stopped.returncode != 0 and "interrupted" in stopped.stderr
    run_dir = checkpoints_dir(tmp_path / "resumed")
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.json", "step-000003"]
    saved = load_file(run_dir / "step-000003" / "trainable.safetensors")
    assert {n: tuple(t.shape) for n, t in saved.items()} == {
        n: tuple(p.shape) for n, p in load(tmp_path / "straight").named_parameters()}  # whole tensors, not shards

    ddp = launch(*common, "--out", tmp_path / "resumed", "--resume")
    assert ddp.returncode != 0 and "the engine, fsdp vs ddp" in ddp.stderr  # the optimizer state is laid out otherwise
    resumed = launch(*common, "--out", tmp_path / "resumed", "--resume", fsdp=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = record(tmp_path / "resumed"), record(tmp_path / "straight")
    assert a["resumed_from"] == 3 and a["steps"] == 6
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-6, abs=0)
    assert_same_weights(tmp_path / "resumed", tmp_path / "straight", atol=1e-6)
    assert not run_dir.exists()


@pytest.mark.parametrize("argv,match", [
    (["--mode", "full", "--optimizer", "galore"], "galore projects each matrix's whole gradient and FSDP splits it"),
    (["--mode", "lora"], "--mode lora runs under DDP but not under FSDP"),
])
def test_what_fsdp_cannot_run_is_refused_in_one_sentence(argv: list[str], match: str, capsys, folders,
                                                         english_text_file: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch --use_fsdp sets
    code = main(["finetune", "-q", str(folders["llama"]), *argv, "--data", str(english_text_file),
                 "--out", str(tmp_path / "ft"), *OPTIONS])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and match in err, err
    assert not (tmp_path / "ft").exists()


def test_deepspeed_is_refused_in_one_sentence(capsys, folders, english_text_file: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    code = main(["finetune", "-q", str(folders["llama"]), "--mode", "full", "--data", str(english_text_file),
                 "--out", str(tmp_path / "ft"), *OPTIONS])
    err = capsys.readouterr().err
    assert code == 2 and "not under DeepSpeed" in err and len(err.strip().splitlines()) == 1, err
