"""Gradient spectra: what the recorder measures, and how it relates gradients to weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import build_tiny, token_ids

from welore import CompressConfig, compress_
from welore.errors import WeloreError
from welore.gradients import GradientSpectra, spearman
from welore.lowrank.plan import allocate
from welore.lowrank.spectrum import compute_spectra
from welore.targets import find_targets, matrix_shape, weight_matrix


def train_steps(model, recorder, steps: int = 3) -> None:
    """A few plain AdamW steps, calling the recorder as `finetune` does (grads in place)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(1, steps + 1):
        ids = token_ids(batch=2, length=16, seed=step)
        model(ids, labels=ids).loss.backward()
        recorder(step, model)
        optimizer.step()
        optimizer.zero_grad()


def test_known_gradient_ranks() -> None:
    model = build_tiny("llama")
    recorder = GradientSpectra(model)
    targets = find_targets(model)
    generator = torch.Generator().manual_seed(0)
    for k, module in enumerate(targets.values()):  # gradient of rank k+1 (at most 4), equal singular values
        m, n = matrix_shape(module)
        r = min(k % 4 + 1, m, n)
        u, _ = torch.linalg.qr(torch.randn(m, r, generator=generator))
        v, _ = torch.linalg.qr(torch.randn(n, r, generator=generator))
        module.weight.grad = u @ v.T
    recorder(5, model)
    assert len(recorder.steps) == len(targets)
    for k, row in enumerate(recorder.steps):
        r = k % 4 + 1
        assert row["step"] == 5
        assert row["effective_rank"] == pytest.approx(r, rel=1e-4)  # r equal singular values
        assert row["stable_rank"] == pytest.approx(r, rel=1e-4)
        assert row["rank_90"] == r


def test_conv1d_gradients_are_read_as_out_by_in() -> None:
    model = build_tiny("gpt2")
    recorder = GradientSpectra(model)
    train_steps(model, recorder, steps=1)
    shapes = {n: matrix_shape(m) for n, m in find_targets(model).items()}
    for row in recorder.steps:
        assert row["full_rank"] == min(shapes[row["name"]])


def test_every_and_no_gradients(caplog: pytest.LogCaptureFixture) -> None:
    model = build_tiny("llama")
    recorder = GradientSpectra(model, every=2)
    train_steps(model, recorder, steps=4)
    assert sorted({r["step"] for r in recorder.steps}) == [2, 4]
    fresh = GradientSpectra(build_tiny("llama"))
    fresh(1, build_tiny("llama"))  # no backward pass yet: nothing to record, a warning
    assert fresh.steps == [] and "no target matrix has a gradient" in caplog.text
    with pytest.raises(WeloreError, match="No gradient was recorded"):
        fresh.report({})
    with pytest.raises(WeloreError, match="positive integer"):
        GradientSpectra(model, every=0)


def test_compressed_model_is_refused() -> None:
    model = build_tiny("llama")
    compress_(model, CompressConfig(ratio=0.3, method="uniform"), progress=False)
    with pytest.raises(WeloreError, match="already compressed"):
        GradientSpectra(model)


def test_spearman() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert spearman([1, 1, 2, 3], [5, 5, 6, 7]) == pytest.approx(1.0)  # ties share a rank
    assert math.isnan(spearman([1, 2], [1, 2]))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_report_relates_gradients_to_weights(tmp_path) -> None:
    model = build_tiny("llama")
    recorder = GradientSpectra(model)
    train_steps(model, recorder, steps=3)
    targets = find_targets(model)
    spectra = compute_spectra(targets, cache=False, progress=False)
    plan = allocate("welore", spectra, {n: matrix_shape(m) for n, m in targets.items()}, 0.3)
    report = recorder.report(spectra, plan=plan, model="tiny-llama")
    assert {r["name"] for r in report.rows} == set(targets)
    for row in report.rows:
        assert row["steps"] == 3
        assert 0 < row["grad_effective_fraction"] <= 1 and 0 < row["grad_rank90_fraction"] <= 1
        assert row["weight_kept_fraction"] == plan.kept_fraction(row["name"])
        w = weight_matrix(targets[row["name"]]).detach().double()
        s = torch.linalg.svdvals(w)
        assert row["weight_stable_rank"] == pytest.approx(((s**2).sum() / s[0] ** 2).item(), rel=1e-6)
    assert set(report.correlations) == {"grad_vs_weight_effective_rank", "grad_vs_weight_kept_rank"}
    assert all(-1 <= v <= 1 for v in report.correlations.values())
    summary = report.summary()
    assert "3 recorded steps (1..3)" in summary and "self_attn.q_proj" in summary and "Spearman" in summary

    out = report.write(tmp_path / "grads")
    names = {p.name for p in out.iterdir()}
    assert names == {"gradient_steps.csv", "gradient_summary.csv", "gradients.json", "gradient_summary.txt",
                     "gradient_ranks.png", "gradient_vs_weight.png"}
    data = json.loads((out / "gradients.json").read_text())
    assert len(data["steps"]) == 3 * len(targets) and data["plan"]["method"] == "welore"
    assert (out / "gradient_ranks.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(WeloreError, match="already exists"):
        report.write(tmp_path / "grads")


# --- welore analyze --gradients ----------------------------------------------------------------

GRAD_RUN = ["--grad-steps", "3", "--grad-seq-len", "32", "--grad-batch-size", "2", "--grad-val-tokens", "64"]


def test_cli_analyze_gradients(capsys, tmp_path, cli_model_dir, english_text_file) -> None:
    from welore.cli import main

    out = tmp_path / "analysis"
    code = main(["analyze", "-q", str(cli_model_dir), "--ratio", "0.2", "--gradients", "--data", str(english_text_file),
                 *GRAD_RUN, "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "3 steps of full fine-tuning with AdamW" in stdout and "Spearman correlation" in stdout
    assert (out / "spectra.csv").is_file() and (out / "rank_plan.json").is_file()
    assert {p.name for p in (out / "gradients").iterdir()} >= {"gradient_steps.csv", "gradient_summary.csv",
                                                                 "gradient_ranks.png", "gradient_vs_weight.png"}
    data = json.loads((out / "gradients" / "gradients.json").read_text())
    assert sorted({row["step"] for row in data["steps"]}) == [1, 2, 3]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


@pytest.mark.parametrize("argv, match", [
    (["--grad-every", "0"], "--grad-every must be a positive integer"),
    (["--grad-steps", "0"], "--grad-steps must be a positive integer"),
])
def test_cli_analyze_gradients_bad_options(capsys, tmp_path, cli_model_dir, argv, match) -> None:
    from welore.cli import main

    out = tmp_path / "analysis"
    code = main(["analyze", "-q", str(cli_model_dir), "--gradients", *GRAD_RUN, *argv, "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    assert err.startswith("welore: error:") and match in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())
