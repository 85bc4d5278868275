"""`--method auto`: the recipe chosen per model on held-back calibration windows (welore.lowrank.select)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, logits_of, token_ids
from test_cli import assert_user_error, nothing_left, run

from welore import CompressConfig, compress_
from welore.errors import WeloreError
from welore.io.checkpoint import read_record
from welore.lowrank.select import CANDIDATES, split_windows


def bos_windows(n: int = 16, length: int = 32) -> torch.Tensor:
    """(n, length) token ids, each window BOS (id 1) first, as a BOS-adding tokenizer's windows are."""
    ids = token_ids(batch=n, length=length - 1, seed=4)
    return torch.cat([torch.ones(n, 1, dtype=ids.dtype), ids], dim=1)


def test_split_windows_holds_back_an_eighth_and_fits_on_a_quarter_of_the_rest() -> None:
    windows = bos_windows(16)
    fit, held = split_windows(windows)
    assert torch.equal(held, windows[14:]) and torch.equal(fit, windows[:4])  # 16 - 2 = 14 others, a quarter: 4
    fit, held = split_windows(windows[:2])
    assert torch.equal(fit, windows[:1]) and torch.equal(held, windows[1:2])
    with pytest.raises(WeloreError, match="raise --calib-tokens"):
        split_windows(windows[:1])


def test_auto_keeps_the_best_candidate_and_compresses_with_it_on_every_window() -> None:
    model, windows = build_tiny("llama"), bos_windows()
    reference = copy.deepcopy(model)
    report = compress_(model, CompressConfig(ratio=0.3, method="auto", calib="text"), calibration=windows,
                       progress=False)
    selection = report.config.selection
    assert set(selection["candidates"]) == {c.label for c in CANDIDATES}
    scores = {label: s["perplexity"] for label, s in selection["candidates"].items()}
    assert selection["chosen"] == min(scores, key=scores.get)
    assert selection["held_tokens"] == 2 * 32 and selection["fit_tokens"] == 4 * 32
    chosen = next(c for c in CANDIDATES if c.label == selection["chosen"])
    assert (report.config.factorizer, report.config.method, report.config.sequential) == \
        (chosen.factorizer, chosen.method, chosen.sequential)
    # The model is the chosen recipe run from scratch on all the calibration windows.
    again = compress_(reference, chosen.config(CompressConfig(ratio=0.3, calib="text")), calibration=windows,
                      progress=False)
    probe = token_ids(batch=2, length=16, seed=9)
    assert torch.allclose(logits_of(model, probe), logits_of(reference, probe), atol=1e-5)
    assert report.plan.ranks == again.plan.ranks


def test_auto_needs_calibration_and_leaves_the_factorizer_to_itself() -> None:
    with pytest.raises(WeloreError, match="pass --calib"):
        compress_(build_tiny("llama"), CompressConfig(ratio=0.3, method="auto"), progress=False)
    with pytest.raises(WeloreError, match="chooses the factorizer itself"):
        CompressConfig(ratio=0.3, method="auto", calib="wiki", refit="up")


def test_cli_auto_reports_and_records_the_selection(capsys, tmp_path: Path, bos_model_dir: Path,
                                                   english_text_file: Path) -> None:
    out = tmp_path / "auto"
    code, stdout, err = run(capsys, "compress", bos_model_dir, "--ratio", "0.2", "--method", "auto",
                            "--calib", english_text_file, "--calib-tokens", "512", "--calib-seq-len", "32",
                            "--out", out)
    assert code == 0, err
    assert "recipe chosen by --method auto:" in stdout and "held-back" in stdout
    recorded = json.loads((out / "welore.json").read_text())["recipe"]["stages"][0]["lowrank"]
    assert recorded["method"] != "auto" and recorded["selection"]["chosen"] in stdout
    assert recorded["bos"] == "yes"
    assert read_record(out).compress_config == CompressConfig.from_dict(recorded)


def test_cli_auto_without_calibration_uses_the_builtin_text(capsys, tmp_path: Path, cli_model_dir: Path) -> None:
    code, out, err = run(capsys, "compress", cli_model_dir, "--ratio", "0.2", "--method", "auto", "--calib-tokens",
                         "512", "--calib-seq-len", "32", "--out", tmp_path / "out")
    assert code == 0, err
    assert "calibrating on the built-in wiki text" in out and "recipe chosen by --method auto:" in out
    assert_user_error(*run(capsys, "compress", cli_model_dir, "--ratio", "0.2", "--method", "auto", "--data-free",
                           "--out", tmp_path / "other"), match="pass --calib")
    assert nothing_left(tmp_path, "other")
