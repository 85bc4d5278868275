"""Token windows start the way the model is used: with BOS exactly when its tokenizer adds one.

Two tiny local model folders with SmolLM2's vocabulary: `cli_model_dir`, whose tokenizer (the
default model's) adds no BOS, and `bos_model_dir`, whose tokenizer puts BOS first as Llama's and
Mistral's do (conftest.py). Perplexity is checked against a direct transformers computation that
shares no code with welore: the standard encoding of the text (BOS included where the tokenizer
adds it), cut into windows by hand, and the model's own loss.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from welore.cli import main
from welore.errors import WeloreError
from welore.finetune import FinetuneConfig
from welore.io.checkpoint import load, read_record
from welore.lowrank.compress import CompressConfig
from welore.quant import QuantConfig

SEQ, TOKENS = 32, 256


def run(capsys: pytest.CaptureFixture, command: str, *argv: str | Path) -> tuple[int, str, str]:
    code = main([command, "-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def direct_perplexity(folder: Path, text: str, seq_len: int, n_windows: int) -> float:
    """The standard protocol written out: encode the text as the tokenizer does by default, put
    its BOS (if it adds one) before every window of seq_len - 1 text tokens, and average the
    model's own loss (over each window's T-1 predicted tokens) across the windows."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(text[:20_000])["input_ids"]
    bos = ids[:1] if ids[0] == tokenizer.bos_token_id else []
    text_ids = ids[len(bos):]
    step = seq_len - len(bos)
    losses = []
    with torch.no_grad():
        for k in range(n_windows):
            window = torch.tensor([bos + text_ids[k * step:(k + 1) * step]])  # (1, T)
            assert window.shape[1] == seq_len
            losses.append(model(input_ids=window, labels=window).loss.item())
    return math.exp(sum(losses) / len(losses))


@pytest.mark.parametrize("which, policy", [("bos_model_dir", "yes"), ("cli_model_dir", "no")])
def test_evaluate_equals_a_direct_transformers_computation(capsys, tmp_path: Path, english_text_file: Path,
                                                           which: str, policy: str,
                                                           request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(which)
    report = tmp_path / "result.json"
    code, out, err = run(capsys, "evaluate", folder, "--text", english_text_file, "--seq-len", SEQ,
                         "--max-tokens", TOKENS, "--no-speed", "--json", report)
    assert code == 0, err
    saved = json.loads(report.read_text())
    assert saved["bos"] == policy
    assert ("each starting with BOS" if policy == "yes" else "no BOS") in out and "--bos auto" in out
    result = saved["results"][str(folder)]
    assert result["eval_tokens"] == (TOKENS // SEQ) * (SEQ - 1)  # every window predicts its T-1 text tokens
    expected = direct_perplexity(folder, english_text_file.read_text(), SEQ, TOKENS // SEQ)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_bos_changes_the_perplexity_and_no_forces_the_old_windows(capsys, tmp_path: Path, bos_model_dir: Path,
                                                                  english_text_file: Path) -> None:
    """--bos no on a BOS model scores the windows of earlier welore versions, which differ."""
    scores = {}
    for policy in ("auto", "no"):
        report = tmp_path / f"{policy}.json"
        code, _, err = run(capsys, "evaluate", bos_model_dir, "--text", english_text_file, "--seq-len", SEQ,
                           "--max-tokens", TOKENS, "--no-speed", "--bos", policy, "--json", report)
        assert code == 0, err
        scores[policy] = json.loads(report.read_text())["results"][str(bos_model_dir)]["perplexity"]
    assert scores["auto"] != pytest.approx(scores["no"], rel=1e-4)


def test_compress_records_the_bos_policy_it_calibrated_with(capsys, tmp_path: Path, bos_model_dir: Path,
                                                            cli_model_dir: Path, english_text_file: Path) -> None:
    for folder, policy in ((bos_model_dir, "yes"), (cli_model_dir, "no")):
        out = tmp_path / folder.name
        code, _, err = run(capsys, "compress", folder, "--ratio", "0.2", "--factorizer", "whiten",
                           "--calib", english_text_file, "--calib-tokens", TOKENS, "--calib-seq-len", SEQ,
                           "--out", out)
        assert code == 0, err
        meta = json.loads((out / "welore.json").read_text())
        assert meta["recipe"]["stages"][0]["lowrank"]["bos"] == policy
        assert read_record(out).compress_config.bos == policy


def test_calibration_with_and_without_bos_gives_other_factors(capsys, tmp_path: Path, bos_model_dir: Path,
                                                              english_text_file: Path) -> None:
    """The calibration windows reach the factorizer: forcing --bos no changes what it fits."""
    weights = {}
    for policy in ("auto", "no"):
        out = tmp_path / policy
        code, _, err = run(capsys, "compress", bos_model_dir, "--ratio", "0.2", "--factorizer", "whiten",
                           "--calib", english_text_file, "--calib-tokens", TOKENS, "--calib-seq-len", SEQ,
                           "--bos", policy, "--out", out)
        assert code == 0, err
        weights[policy] = dict(load(out).state_dict())
    assert weights["auto"].keys() == weights["no"].keys()
    assert any(not torch.equal(weights["auto"][k], weights["no"][k]) for k in weights["auto"])


def test_quantization_records_the_bos_policy(capsys, tmp_path: Path, bos_model_dir: Path,
                                             english_text_file: Path) -> None:
    out = tmp_path / "q"
    code, _, err = run(capsys, "compress", bos_model_dir, "--quantize", "int4", "--group-size", "32",
                       "--compensate-rank", "2", "--calib", english_text_file, "--calib-tokens", TOKENS,
                       "--calib-seq-len", SEQ, "--out", out)
    assert code == 0, err
    quant = json.loads((out / "welore.json").read_text())["recipe"]["stages"][0]["quantize"]
    assert quant["bos"] == "yes" and quant["calib_tokens"] == TOKENS


def test_finetune_records_the_bos_policy(capsys, tmp_path: Path, bos_model_dir: Path,
                                         english_text_file: Path) -> None:
    out = tmp_path / "ft"
    code, _, err = run(capsys, "finetune", bos_model_dir, "--mode", "full", "--steps", "1", "--batch-size", "2",
                       "--seq-len", SEQ, "--val-tokens", "64", "--data", english_text_file, "--out", out)
    assert code == 0, err
    record = json.loads((out / "finetune.json").read_text())
    assert record["result"]["config"]["bos"] == "yes"


def test_records_from_before_the_policy_read_as_no_bos() -> None:
    """Earlier welore versions never put BOS first: their records say so when read."""
    old = CompressConfig(ratio=0.2, factorizer="whiten", calib="wiki").to_dict()
    del old["bos"]
    assert CompressConfig.from_dict(old).bos == "no"
    assert CompressConfig.from_dict(CompressConfig(ratio=0.2).to_dict()).bos is None  # no calibration, no policy
    quant = QuantConfig(calib="wiki", calib_tokens=8192).to_dict()
    del quant["bos"]
    assert QuantConfig.from_dict(quant).bos == "no"
    tuned = FinetuneConfig().to_dict()
    del tuned["bos"]
    assert FinetuneConfig.from_dict(tuned).bos == "no"
    assert FinetuneConfig.from_dict(FinetuneConfig().to_dict()).bos == "auto"


def test_bad_policy_is_one_sentence() -> None:
    with pytest.raises(WeloreError, match="Unknown BOS policy 'sometimes'; use --bos auto, yes or no"):
        FinetuneConfig(bos="sometimes")
    with pytest.raises(WeloreError, match="Unknown BOS policy"):
        CompressConfig(ratio=0.2, factorizer="whiten", calib="wiki", bos="sometimes")
