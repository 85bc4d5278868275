"""Tests for lm-eval task scores (`welore.eval.tasks`, `welore evaluate --tasks`).

They run the local task tests/data/tasks/welore_tiny_mc (twelve multiple-choice questions in a
JSONL file) on tiny random models, with the datasets library offline and its cache in a
temporary folder: nothing is downloaded. lm-eval is installed by the Makefile (the `lmeval`
extra), so these tests are not skipped when it is missing: they fail.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
import torch
from conftest import SMOLLM2_VOCAB, build_tiny
from test_cli import assert_user_error, run

import welore
from welore.eval.tasks import INSTALL_HINT, check_tasks, format_task_table, run_tasks
from welore.lowrank.module import LowRankLinear

TASK_DIR = Path(__file__).parent / "data" / "tasks"
TASK = "welore_tiny_mc"
TASK_ARGS = ["--tasks", TASK, "--task-dir", TASK_DIR]
EVAL = ["--seq-len", "32", "--max-tokens", "256", "--no-speed"]


@pytest.fixture(autouse=True)
def offline_datasets(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The datasets library offline, with its cache in a temporary folder."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets")


@pytest.fixture
def tiny_llama() -> torch.nn.Module:
    """A tiny random LLaMA with SmolLM2's vocabulary."""
    return build_tiny("llama", vocab=SMOLLM2_VOCAB, hidden=32)


def questions() -> list[dict]:
    with open(TASK_DIR / f"{TASK}.jsonl") as f:
        return [json.loads(line) for line in f]


@torch.no_grad()
def reference_scores(model: torch.nn.Module, tokenizer) -> dict[str, float]:
    """acc and acc_norm of the tiny task computed by hand: each choice's summed log-likelihood
    after the question (tokenized as lm-eval does: the whole text, split after the question)."""
    acc = acc_norm = 0
    rows = questions()
    for row in rows:
        context = tokenizer.encode(row["question"])
        lls = []
        for choice in row["choices"]:
            whole = tokenizer.encode(row["question"] + " " + choice)
            assert whole[: len(context)] == context
            ids = torch.tensor([whole])  # (1, T)
            logprobs = model(ids[:, :-1]).logits.float().log_softmax(-1)[0]  # (T-1, V)
            targets = ids[0, len(context):]  # the choice's tokens
            lls.append(float(logprobs[len(context) - 1:].gather(-1, targets[:, None]).sum()))
        lls_t = torch.tensor(lls, dtype=torch.float64)
        lengths = torch.tensor([float(len(c)) for c in row["choices"]], dtype=torch.float64)
        acc += int(lls_t.argmax()) == row["answer"]
        acc_norm += int((lls_t / lengths).argmax()) == row["answer"]
    return {"acc": acc / len(rows), "acc_norm": acc_norm / len(rows)}


def test_local_task_on_a_tiny_model(tiny_llama, smollm2_tokenizer) -> None:
    tiny_llama.train()  # run_tasks evaluates in eval mode and restores this
    scores = run_tasks(tiny_llama, smollm2_tokenizer, [TASK], task_dir=TASK_DIR, progress=False)
    assert list(scores) == [TASK]
    metrics = scores[TASK]
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(metrics)
    assert all(0 <= metrics[m] <= 1 for m in ("acc", "acc_norm"))
    assert all(module.training for module in tiny_llama.modules())
    tiny_llama.eval()
    expected = reference_scores(tiny_llama, smollm2_tokenizer)
    assert {m: metrics[m] for m in ("acc", "acc_norm")} == pytest.approx(expected)


def test_compressed_model_is_scored_as_it_runs(tiny_llama, smollm2_tokenizer) -> None:
    welore.compress_(tiny_llama, welore.CompressConfig(ratio=0.3, method="energy"), progress=False)
    assert any(isinstance(m, LowRankLinear) for m in tiny_llama.modules())
    metrics = run_tasks(tiny_llama, smollm2_tokenizer, [TASK], task_dir=TASK_DIR, progress=False)[TASK]
    assert 0 <= metrics["acc"] <= 1
    scored = {m: metrics[m] for m in ("acc", "acc_norm")}
    assert scored == pytest.approx(reference_scores(tiny_llama, smollm2_tokenizer))


def test_relative_data_files_resolve_against_the_task_dir(tiny_llama, smollm2_tokenizer, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The task's `data_files` is relative; it must be found from any working directory."""
    monkeypatch.chdir(tmp_path)
    scores = run_tasks(tiny_llama, smollm2_tokenizer, [TASK], task_dir=os.path.relpath(TASK_DIR), limit=2,
                       progress=False)
    assert scores[TASK]["acc"] in (0, 0.5, 1)  # limit=2: a fraction of two questions
    assert Path.cwd() == tmp_path


def test_task_folder_with_a_tag_and_data_in_a_subfolder(tiny_llama, smollm2_tokenizer, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the task whose data file sits in a subfolder, named as a list, and reached through
    a tag: run from another working directory, both tasks score as the original does."""
    folder = tmp_path / "tasks"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "q.jsonl").write_text((TASK_DIR / f"{TASK}.jsonl").read_text())
    original = (TASK_DIR / f"{TASK}.yaml").read_text()
    assert "    test: welore_tiny_mc.jsonl\n" in original
    for name, files in [("copy_a", "    test: data/q.jsonl\n"), ("copy_b", "    test: [data/q.jsonl]\n")]:
        text = original.replace(f"task: {TASK}", f"task: {name}\ntag: copies").replace(
            "    test: welore_tiny_mc.jsonl\n", files)
        (folder / f"{name}.yaml").write_text(text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    scores = run_tasks(tiny_llama, smollm2_tokenizer, ["copies"], task_dir=Path("..") / "tasks", limit=3,
                       progress=False)
    reference = run_tasks(tiny_llama, smollm2_tokenizer, [TASK], task_dir=TASK_DIR, limit=3, progress=False)[TASK]
    assert scores == {"copy_a": reference, "copy_b": reference}


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bars_of_scoring(tiny_llama, smollm2_tokenizer, capfd: pytest.CaptureFixture,
                                  progress: bool) -> None:
    run_tasks(tiny_llama, smollm2_tokenizer, [TASK], task_dir=TASK_DIR, limit=2, progress=progress)
    err = capfd.readouterr().err
    assert ("Running loglikelihood requests" in err) == progress


def test_tokenizer_is_not_modified(tiny_llama, smollm2_tokenizer) -> None:
    import copy

    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.pad_token = None  # lm-eval gives its own copy a padding token
    run_tasks(tiny_llama, tokenizer, [TASK], task_dir=TASK_DIR, limit=1, progress=False)
    assert tokenizer.pad_token is None


def test_cli_evaluate_with_tasks(capsys, tmp_path: Path, cli_model_dir: Path, english_text_file: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the task's relative data path must not depend on the working directory
    report = tmp_path / "result.json"
    code, out, err = run(capsys, "evaluate", cli_model_dir, *TASK_ARGS, "--text", english_text_file, *EVAL,
                         "--json", report)
    assert code == 0, err
    assert "perplexity" in out and "0-shot" in out
    task_rows = [line.split() for line in out.splitlines() if line.startswith(TASK)]
    assert [row[1] for row in task_rows] == ["acc", "acc_norm"]
    result = json.loads(report.read_text())
    assert result["results"][str(cli_model_dir)]["perplexity"] > 1  # perplexity measured as without --tasks
    acc = result["tasks"][TASK]["acc"]
    assert 0 <= acc <= 1
    assert f"{acc:.4f}" == task_rows[0][2]
    assert result["fewshot"] == 0 and result["task_limit"] is None


def test_cli_unknown_task(capsys, cli_model_dir: Path, english_text_file: Path) -> None:
    code, out, err = run(capsys, "evaluate", cli_model_dir, "--tasks", TASK, "no_such_task", "--task-dir", TASK_DIR,
                         "--text", english_text_file, *EVAL)
    assert_user_error(code, out, err, match="no_such_task")
    assert "--task-dir" in err and TASK + "," not in err


def test_cli_missing_task_dir(capsys, tmp_path: Path, cli_model_dir: Path, english_text_file: Path) -> None:
    code, out, err = run(capsys, "evaluate", cli_model_dir, "--tasks", TASK, "--task-dir", tmp_path / "missing",
                         "--text", english_text_file, *EVAL)
    assert_user_error(code, out, err, match="does not exist")


@pytest.mark.parametrize("option", [["--task-limit", "0"], ["--fewshot", "-1"]])
def test_cli_bad_task_options(capsys, cli_model_dir: Path, english_text_file: Path, option: list[str]) -> None:
    code, out, err = run(capsys, "evaluate", cli_model_dir, *TASK_ARGS, *option, "--text", english_text_file, *EVAL)
    assert_user_error(code, out, err)


def test_lm_eval_not_installed(capsys, monkeypatch: pytest.MonkeyPatch, tiny_llama, smollm2_tokenizer,
                               cli_model_dir: Path, english_text_file: Path) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails
    with pytest.raises(welore.WeloreError, match="pip install 'welore\\[lmeval\\]'"):
        run_tasks(tiny_llama, smollm2_tokenizer, [TASK], task_dir=TASK_DIR)
    code, out, err = run(capsys, "evaluate", cli_model_dir, *TASK_ARGS, "--text", english_text_file, *EVAL)
    assert_user_error(code, out, err)
    assert INSTALL_HINT in err


def test_dataset_that_needs_the_network(monkeypatch: pytest.MonkeyPatch, tiny_llama, smollm2_tokenizer) -> None:
    """Offline, a hub dataset fails with a ConnectionError (as datasets raises it for lm-eval's
    built-in tasks); it becomes a WeloreError that points to local tasks."""

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(welore.WeloreError, match="network access") as info:
        run_tasks(tiny_llama, smollm2_tokenizer, [TASK], task_dir=TASK_DIR)
    assert "ai2_arc" in str(info.value) and "--task-dir" in str(info.value)


def test_check_tasks(tmp_path: Path) -> None:
    check_tasks([TASK], TASK_DIR, limit=3, num_fewshot=0)  # no error, no dataset loaded
    with pytest.raises(welore.WeloreError, match="not a folder"):
        check_tasks([TASK], TASK_DIR / f"{TASK}.yaml")
    with pytest.raises(welore.WeloreError, match="non-empty list"):
        check_tasks(TASK, TASK_DIR)  # a string, not a list


def test_format_task_table() -> None:
    table = format_task_table({"a": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.25}, "long_task": {"f1": 1.0}})
    lines = table.splitlines()
    assert lines[0].split() == ["task", "metric", "value", "stderr"]
    assert [line.split() for line in lines[2:]] == [
        ["a", "acc", "0.5000", "0.1000"], ["a", "acc_norm", "0.2500", "-"], ["long_task", "f1", "1.0000", "-"],
    ]
