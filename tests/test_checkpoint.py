"""Tests for welore.io.checkpoint: save/load of compressed models and export to dense folders."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import MODEL_CLASSES, build_tiny, give_decaying_spectra_, logits_of, token_ids
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from welore import CompressConfig, compress_
from welore.errors import WeloreError
from welore.io import stream
from welore.io.checkpoint import FORMAT_VERSION, WEIGHTS, export_dense, is_checkpoint, load, load_checkpoint, save
from welore.lowrank.factorize import FACTORIZERS
from welore.lowrank.module import LowRankLinear
from welore.lowrank.plan import RankPlan
from welore.modules import count_parameters


def _compressed(family: str, ratio: float = 0.3, method: str = "welore", dtype: torch.dtype = torch.float32):
    model = build_tiny(family)
    give_decaying_spectra_(model)
    model = model.to(dtype)
    report = compress_(model, CompressConfig(ratio=ratio, method=method), progress=False)
    assert report.replaced
    return model, report


def _listing(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def _data_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (file size minus its JSON header)."""
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
    return path.stat().st_size - 8 - header_len


@pytest.fixture
def saved(tmp_path: Path, family: str):
    """(compressed model, its checkpoint folder) for each family."""
    model, report = _compressed(family)
    return model, save(model, tmp_path / "ckpt", record=report.record), report


# --- round trip ------------------------------------------------------------------------------


def test_save_load_gives_identical_logits(saved, family: str) -> None:
    model, path, report = saved
    loaded = load(path)
    ids = token_ids()
    assert torch.equal(logits_of(loaded, ids), logits_of(model, ids))
    assert not loaded.training
    assert type(loaded) is MODEL_CLASSES[family]
    assert load_checkpoint(path).record == report.record
    assert count_parameters(loaded) == count_parameters(model)
    low_rank = {n for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    assert low_rank == set(report.plan.factorized)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert all(b.device.type == "cpu" for b in loaded.buffers())


def test_tied_embeddings_stay_tied(saved, family: str) -> None:
    model, path, report = saved
    loaded = load(path)
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert tied == (family in ("llama", "gpt2"))
    assert (loaded.get_input_embeddings().weight is loaded.get_output_embeddings().weight) == tied
    if tied:  # stored once, and a change to one is a change to the other
        assert "lm_head.weight" not in load_file(path / WEIGHTS)
        with torch.no_grad():
            loaded.get_input_embeddings().weight[0, 0] += 1
        assert loaded.get_output_embeddings().weight[0, 0] == loaded.get_input_embeddings().weight[0, 0]


def test_save_load_keeps_bfloat16(tmp_path: Path) -> None:
    model, _ = _compressed("llama", dtype=torch.bfloat16)
    loaded = load(save(model, tmp_path / "ckpt"))
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_saved_model_saves_again(tmp_path: Path) -> None:
    model, report = _compressed("gpt2")
    once = load_checkpoint(save(model, tmp_path / "once", record=report.record))
    twice = load_checkpoint(save(once.model, tmp_path / "twice", record=once.record))
    ids = token_ids()
    assert torch.equal(logits_of(twice.model, ids), logits_of(model, ids))
    assert twice.record == report.record


def test_load_computes_no_svd(saved, monkeypatch: pytest.MonkeyPatch) -> None:
    model, path, report = saved

    def forbidden(*args, **kwargs):
        raise AssertionError("load must not factorize or compute spectra")

    monkeypatch.setitem(FACTORIZERS, "svd", forbidden)
    monkeypatch.setattr("welore.lowrank.factorize.svd_factors", forbidden)
    monkeypatch.setattr(torch.linalg, "svd", forbidden)
    monkeypatch.setattr(torch.linalg, "svdvals", forbidden)
    monkeypatch.setattr(torch.linalg, "eigvalsh", forbidden)
    loaded = load(path)
    ids = token_ids()
    assert torch.equal(logits_of(loaded, ids), logits_of(model, ids))


# --- what is on disk ---------------------------------------------------------------------------


def test_checkpoint_folder_contents(saved) -> None:
    model, path, report = saved
    names = _listing(path)
    assert {"config.json", "welore.json", "rank_plan.json", WEIGHTS} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle")) for n in names)
    assert not any(n.startswith(".") for n in names)
    assert not any(p.name.startswith(".") for p in path.parent.iterdir()), "a temporary folder was left behind"
    meta = json.loads((path / "welore.json").read_text())
    assert meta["format"] == "welore-checkpoint"
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["achieved_ratio"] == pytest.approx(report.plan.achieved_ratio)
    assert RankPlan.load(path / "rank_plan.json") == report.plan
    assert is_checkpoint(path)
    stored = load_file(path / WEIGHTS)
    for name in report.plan.factorized:
        assert f"{name}.up.weight" in stored and f"{name}.down.weight" in stored
        assert f"{name}.weight" not in stored


def test_weights_shrink_with_the_parameters(tmp_path: Path, family: str) -> None:
    model, report = _compressed(family, ratio=0.4, method="uniform")
    dense = build_tiny(family)
    dense.save_pretrained(tmp_path / "dense")
    path = save(model, tmp_path / "ckpt")
    dense_file, compressed_file = tmp_path / "dense" / "model.safetensors", path / WEIGHTS
    # the tensor data is exactly the unique parameters (float32), tied weights stored once
    assert _data_bytes(dense_file) == 4 * report.params_before
    assert _data_bytes(compressed_file) == 4 * report.params_after
    # and the whole files shrink in proportion to the parameters removed
    size_ratio = compressed_file.stat().st_size / dense_file.stat().st_size
    assert size_ratio == pytest.approx(report.params_after / report.params_before, abs=0.03)
    assert size_ratio < 1 - 0.5 * report.model_reduction


# --- dense export --------------------------------------------------------------------------------


def test_export_dense_loads_with_transformers(saved, tmp_path: Path, family: str) -> None:
    model, path, report = saved
    out = export_dense(path, tmp_path / "dense")
    assert not is_checkpoint(out)
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in _listing(out))
    dense = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(dense) is MODEL_CLASSES[family]
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
    fresh = dict(build_tiny(family).named_modules())
    for name, module in dense.named_modules():  # same layer types as the architecture (Conv1D for GPT-2)
        assert type(module) is type(fresh[name]), name
    if family == "gpt2":
        assert isinstance(dense.get_submodule(report.plan.factorized[0]), Conv1D)
    ids = token_ids()
    assert torch.allclose(logits_of(dense, ids), logits_of(model, ids), atol=1e-4)
    assert count_parameters(dense) == count_parameters(build_tiny(family))


def test_export_into_existing_folder(saved, tmp_path: Path) -> None:
    _, path, _ = saved
    out = tmp_path / "dense"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(WeloreError, match="already exists"):
        export_dense(path, out)
    assert _listing(out) == {"keep.txt"}
    export_dense(path, out, overwrite=True)
    assert "keep.txt" not in _listing(out)
    assert (out / "config.json").is_file()


def test_export_of_a_non_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    build_tiny("llama").save_pretrained(folder)
    with pytest.raises(WeloreError, match="not a welore checkpoint"):
        export_dense(folder, tmp_path / "dense")
    assert not (tmp_path / "dense").exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


# --- saving safely -------------------------------------------------------------------------------


def test_save_refuses_existing_folder(tmp_path: Path) -> None:
    model, _ = _compressed("llama")
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(WeloreError, match="already exists"):
        save(model, out)
    assert _listing(out) == {"keep.txt"}
    save(model, out, overwrite=True)
    assert "keep.txt" not in _listing(out)
    ids = token_ids()
    assert torch.equal(logits_of(load(out), ids), logits_of(model, ids))
    assert _listing(tmp_path) == {"ckpt"}


def test_failed_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = _compressed("llama")

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(stream, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = _compressed("gpt2")
    out = save(model, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(stream, "save_file", broken_save_file)
    with pytest.raises(OSError):
        save(model, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _listing(tmp_path) == {"ckpt"}


def test_save_of_an_uncompressed_model(tmp_path: Path) -> None:
    with pytest.raises(WeloreError, match="not compressed"):
        save(build_tiny("llama"), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


# --- loading what is not a (valid) checkpoint -----------------------------------------------------


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_load_folder_without_welore_json(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    build_tiny("llama").save_pretrained(folder)
    with pytest.raises(WeloreError, match="not a welore checkpoint"):
        load(folder)


def test_load_missing_path_or_file(tmp_path: Path) -> None:
    with pytest.raises(WeloreError):
        load(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(WeloreError):
        load(tmp_path / "file.txt")


def test_load_without_weights(saved) -> None:
    _, path, _ = saved
    (path / WEIGHTS).unlink()
    with pytest.raises(WeloreError, match=WEIGHTS):
        load(path)


def test_load_damaged_weights(saved) -> None:
    _, path, _ = saved
    (path / WEIGHTS).write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeloreError):
        load(path)


def test_load_weights_that_do_not_match_the_plan(saved) -> None:
    model, path, report = saved
    name = report.plan.factorized[0]

    def lower_rank(data: dict) -> None:
        entry = data["matrices"][name]
        entry["rank"] = entry["rank"] - 1

    _edit_json(path / "rank_plan.json", lower_rank)
    with pytest.raises(WeloreError, match="do not match the rank plan"):
        load(path)


def test_load_plan_that_factorizes_a_dense_matrix(tmp_path: Path) -> None:
    model, report = _compressed("llama", ratio=0.05, method="welore")
    dense = [n for n, r in report.plan.ranks.items() if r is None]
    assert dense, "the test needs a plan with a dense matrix"
    path = save(model, tmp_path / "ckpt")
    _edit_json(path / "rank_plan.json", lambda d: d["matrices"][dense[0]].update(rank=1))
    with pytest.raises(WeloreError, match="do not match the rank plan"):
        load(path)


def test_load_newer_format(saved) -> None:
    _, path, _ = saved
    _edit_json(path / "welore.json", lambda d: d.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(WeloreError, match="upgrade welore"):
        load(path)


@pytest.mark.parametrize("content", ["{broken", json.dumps({"format": "something-else", "format_version": 1})])
def test_load_bad_welore_json(saved, content: str) -> None:
    _, path, _ = saved
    (path / "welore.json").write_text(content)
    with pytest.raises(WeloreError):
        load(path)


def test_load_without_config(saved) -> None:
    _, path, _ = saved
    (path / "config.json").unlink()
    with pytest.raises(WeloreError):
        load(path)


def test_load_without_plan(saved) -> None:
    _, path, _ = saved
    (path / "rank_plan.json").unlink()
    with pytest.raises(WeloreError):
        load(path)


# --- versioned files: one clear sentence for a missing, mistyped or newer version ----------------


def _low_rank(meta: dict) -> dict:
    """The lowrank stage of welore.json's recipe."""
    return meta["recipe"]["stages"][0]["lowrank"]


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.pop("format_version"), "has no 'format_version'"),
    (lambda d: d.update(format_version="1"), "not an integer"),
    (lambda d: d.update(format_version=None), "not an integer"),
    (lambda d: d["recipe"].update(version=99), "newer than this welore reads"),
    (lambda d: _low_rank(d).update(version=99), "newer than this welore reads"),
    (lambda d: d["recipe"].pop("version"), "has no 'version'"),
    (lambda d: _low_rank(d).update(ratio="a lot"), "wrong type"),
])
def test_checkpoint_versions_are_checked(tmp_path: Path, edit, match) -> None:
    model = build_tiny("llama")
    report = compress_(model, CompressConfig(ratio=0.2), progress=False)
    path = save(model, tmp_path / "ckpt", record=report.record)
    _edit_json(path / "welore.json", edit)
    with pytest.raises(WeloreError, match=match):
        load(path)


def test_unknown_keys_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = build_tiny("llama")
    report = compress_(model, CompressConfig(ratio=0.2), progress=False)
    path = save(model, tmp_path / "ckpt", record=report.record)
    _edit_json(path / "welore.json", lambda d: (d.update(extra=1), _low_rank(d).update(future_knob=3)))
    _edit_json(path / "rank_plan.json", lambda d: d.update(notes="hand edit"))
    with caplog.at_level("WARNING", logger="welore.versioned"):
        load(path)
    text = caplog.text
    assert "extra" in text and "future_knob" in text and "notes" in text


def test_a_checkpoint_of_a_replayed_plan_written_before_method_none_loads(tmp_path: Path) -> None:
    """Checkpoints written by earlier code recorded a replayed plan as method "plan"."""
    model = build_tiny("llama")
    report = compress_(model, CompressConfig(ratio=0.2), progress=False)
    replayed = build_tiny("llama")
    compress_(replayed, CompressConfig(method=None), plan=report.plan, progress=False)
    path = save(replayed, tmp_path / "ckpt")

    def as_version_1(meta: dict) -> None:  # what earlier code wrote: a compress_config, method "plan"
        del meta["recipe"]
        meta.update(format_version=1, compress_config=CompressConfig(method=None).to_dict() | {"method": "plan"})

    _edit_json(path / "welore.json", as_version_1)
    record = load_checkpoint(path).record
    assert record.compress_config.method is None and record.plan.ranks == report.plan.ranks


def test_a_checkpoint_written_by_welore_0_1_0_still_loads() -> None:
    """tests/data/checkpoint-0.1.0 was written by welore 0.1.0 (commit aa9fde7: a tiny LLaMA
    compressed by replaying a welore plan, recorded then as method "plan"); its logits were
    saved beside it by that code."""
    data = Path(__file__).parent / "data"
    checkpoint = load_checkpoint(data / "checkpoint-0.1.0")
    expected = torch.load(data / "checkpoint-0.1.0-logits.pt", weights_only=True)
    torch.testing.assert_close(logits_of(checkpoint.model, token_ids()), expected)
    assert checkpoint.record.compress_config.method is None and checkpoint.record.plan.method == "welore"


def test_a_format_1_joint_checkpoint_still_loads() -> None:
    """tests/data/checkpoint-format1-joint was written by the last format-1 code (before recipes):
    a tiny LLaMA at WeLore ratio 0.3 whose factors are quantized to 4 bits with rank-2 compensation;
    its logits were saved beside it. Its compress_config and quant_config read as the recipe."""
    data = Path(__file__).parent / "data"
    checkpoint = load_checkpoint(data / "checkpoint-format1-joint")
    expected = torch.load(data / "checkpoint-format1-joint-logits.pt", weights_only=True)
    torch.testing.assert_close(logits_of(checkpoint.model, token_ids()), expected)
    record = checkpoint.record
    assert record.source == "tiny-llama" and record.plan.method == "welore"
    assert [type(stage).__name__ for stage in record.recipe.stages] == ["CompressConfig", "QuantConfig"]
    assert record.quant_config.bits == 4 and record.quant_config.compensate_rank == 2
    assert set(record.quant_plan.shapes) >= {f"{n}.up" for n in record.plan.factorized}
