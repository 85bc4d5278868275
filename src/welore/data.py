"""Text for calibration and evaluation: built-in corpora, local files, Hugging Face datasets.

A text is named by one *spec* string, the same everywhere in welore (API and CLI):

    wiki                        built-in: 101 English Wikipedia articles, 2.8 M characters
    news                        built-in: 300 Australian news articles (the Lee corpus), 0.36 M
    path/to/file.txt            any readable UTF-8 text file (a built-in name wins over a file
                                of the same name; write ./wiki for the file)
    hf:DATASET[:CONFIG[:SPLIT[:COLUMN]]]
                                a Hugging Face dataset, e.g. ``hf:wikitext:wikitext-2-raw-v1:test``;
                                CONFIG may be left empty (``hf:DATASET::validation``), SPLIT
                                defaults to ``train`` and COLUMN to ``text``.

The built-in texts need no network: they are data files that ship inside the gensim 4.4.0
wheel (``pip install --no-deps gensim==4.4.0``), found without importing gensim. The Wikipedia
sample is a MediaWiki XML dump; its markup is stripped by `welore.eval.wikitext.strip_wikitext`. Each built-in
is extracted once and cached as plain text at ``cache_dir()/texts/<name>.txt``.

Built-ins are split by document, deterministically: ``calib`` is the first half of the
documents, ``eval`` the second half, ``all`` everything, so calibration and evaluation never
share a document. Local files and datasets have no such split: the whole text is used.

`token_windows` turns a text into non-overlapping windows of token ids, shape (N, seq_len).
Each window starts the way the model sees text in use: with the BOS token when its tokenizer
adds one by default (Llama, Mistral, Gemma), with text otherwise (SmolLM2, GPT-2, Qwen2); the
`bos` policy (`BOS_POLICIES`) overrides that. Without BOS a window's first token has to play
the attention sink the model learned to park on BOS, and a BOS model's perplexity on such
windows was measured 2.8x worse than on the same tokens with BOS.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from welore._io import cache_dir, write_text
from welore.errors import WeloreError
from welore.eval.wikitext import iter_wiki_articles, strip_wikitext

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SPLITS = ("calib", "eval", "all")
DEFAULT_TEXT = "wiki"  # the built-in text the commands use unless told otherwise

BOS_POLICIES = ("auto", "yes", "no")  # windows start with BOS: as the tokenizer does, always, never
LEGACY_BOS = "no"  # the policy of records written before there was one: windows never started with BOS
BOS_HELP = ("start every token window with the BOS token: auto (when the tokenizer adds one by default, as "
            "Llama's and Mistral's do), yes or no; the window length counts it")

HF_PREFIX = "hf:"
HF_DEFAULT_SPLIT = "train"
HF_DEFAULT_COLUMN = "text"

# Documents are separated by two blank lines in the cache file; inside a document there is
# never more than one blank line in a row, so the separator is unambiguous.
_DOC_SEPARATOR = "\n\n\n"
# First line of a cache file; bump the version when extraction changes so old caches are redone.
_CACHE_HEADER = "#welore-text v1"


# ---------------------------------------------------------------------------------------------
# Built-in texts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Builtin:
    """A text shipped as a data file inside the gensim wheel."""

    description: str  # one line for --help and listings
    label: str  # short phrase for reports: "built-in Wikipedia excerpt"
    filename: str  # path inside the gensim package
    extract: Callable[[Path], list[str]]  # data file -> list of documents (plain text)


def _extract_wiki(path: Path) -> list[str]:
    """Plain-text articles of a bz2-compressed MediaWiki XML dump."""
    docs = []
    for title, markup in iter_wiki_articles(path):
        text = strip_wikitext(markup)
        if len(text) >= 200:  # skip stubs and near-empty pages; they are mostly leftovers
            docs.append(text)
        else:
            logger.debug("Skipping %r: only %d characters after stripping markup", title, len(text))
    return docs


def _extract_lines(path: Path) -> list[str]:
    """One document per non-empty line (the Lee corpus format)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


_BUILTINS: dict[str, _Builtin] = {
    "wiki": _Builtin(
        description="101 English Wikipedia articles (2016 dump sample shipped with gensim)",
        label="built-in Wikipedia excerpt",
        filename="test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        extract=_extract_wiki,
    ),
    "news": _Builtin(
        description="300 Australian news articles (Lee background corpus shipped with gensim)",
        label="built-in news articles",
        filename="test/test_data/lee_background.cor",
        extract=_extract_lines,
    ),
}

BUILTIN_TEXTS: dict[str, str] = {name: b.description for name, b in _BUILTINS.items()}


def _builtin_names() -> str:
    return ", ".join(BUILTIN_TEXTS)


def _gensim_data_file(builtin: _Builtin) -> Path:
    """Locate a data file inside the installed gensim package without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise WeloreError(
            "The built-in texts come from the gensim package, which is not installed; "
            "run `pip install --no-deps gensim==4.4.0`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / builtin.filename
    if not path.is_file():
        raise WeloreError(
            f"The gensim installation lacks the data file {path}; "
            "run `pip install --no-deps --force-reinstall gensim==4.4.0`."
        )
    return path


def _cache_path(name: str) -> Path:
    return cache_dir() / "texts" / f"{name}.txt"


def _read_cache(path: Path) -> list[str] | None:
    """Documents from a cache file, or None if it is missing or from another welore version."""
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    header, _, body = content.partition("\n")
    if header.strip() != _CACHE_HEADER:
        return None
    docs = [doc.strip() for doc in body.split(_DOC_SEPARATOR)]
    return [doc for doc in docs if doc] or None


def _write_cache(path: Path, docs: list[str]) -> None:
    # Squeeze blank-line runs so no document can contain the separator.
    docs = [re.sub(r"\n{3,}", "\n\n", doc.strip()) for doc in docs]
    write_text(path, _CACHE_HEADER + "\n" + _DOC_SEPARATOR.join(docs) + "\n")


def _builtin_documents(name: str) -> list[str]:
    """The documents of a built-in text, extracted on first use and cached afterwards."""
    cache = _cache_path(name)
    docs = _read_cache(cache)
    if docs is not None:
        return docs
    builtin = _BUILTINS[name]
    source = _gensim_data_file(builtin)
    logger.info("Extracting built-in text %r from %s (once; cached at %s)", name, source, cache)
    start = time.perf_counter()
    docs = builtin.extract(source)
    _write_cache(cache, docs)
    logger.info(
        "Extracted %d documents, %d characters of %r in %.1f s",
        len(docs),
        sum(map(len, docs)),
        name,
        time.perf_counter() - start,
    )
    return docs


def _split_documents(docs: list[str], split: str) -> list[str]:
    """First half of the documents for calib, second half for eval, all of them for all."""
    half = len(docs) // 2
    if split == "calib":
        return docs[:half]
    if split == "eval":
        return docs[half:]
    return docs


# ---------------------------------------------------------------------------------------------
# Local files and Hugging Face datasets
# ---------------------------------------------------------------------------------------------


def _check_not_empty(text: str, where: str) -> str:
    if not text.strip():
        raise WeloreError(f"{where} is empty or only whitespace; give a text with some content.")
    return text


def _read_text_file(path: Path) -> str:
    """The content of a UTF-8 text file, with every user mistake turned into a WeloreError."""
    if not path.exists():
        raise WeloreError(
            f"Text file {path} does not exist; check the path or use a built-in text "
            f"({_builtin_names()})."
        )
    if path.is_dir():
        raise WeloreError(
            f"{path} is a folder, not a text file; give the path of a UTF-8 text file."
        )
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise WeloreError(
            f"Cannot read text file {path} ({e.strerror}); check its permissions."
        ) from e
    try:
        text = raw.decode("utf-8-sig")  # tolerates a byte-order mark
    except UnicodeDecodeError as e:
        raise WeloreError(
            f"Text file {path} is not valid UTF-8 (bad byte at offset {e.start}); "
            "convert it to UTF-8, e.g. with `iconv -t UTF-8`."
        ) from e
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _check_not_empty(text, f"Text file {path}")


@dataclass(frozen=True)
class HFTextSpec:
    """A parsed ``hf:DATASET[:CONFIG[:SPLIT[:COLUMN]]]`` spec."""

    dataset: str  # Hub id, e.g. "wikitext" or "allenai/c4"
    config: str | None = None  # dataset configuration, e.g. "wikitext-2-raw-v1"
    split: str = HF_DEFAULT_SPLIT  # dataset split, e.g. "test"
    column: str = HF_DEFAULT_COLUMN  # column holding the text

    @classmethod
    def parse(cls, spec: str) -> HFTextSpec:
        fields = spec[len(HF_PREFIX) :].split(":")
        if len(fields) > 4 or not fields[0].strip():
            raise WeloreError(
                f"Bad dataset spec {spec!r}; write hf:DATASET[:CONFIG[:SPLIT[:COLUMN]]], "
                "e.g. hf:wikitext:wikitext-2-raw-v1:test."
            )
        fields = [f.strip() for f in fields] + [""] * (4 - len(fields))
        dataset, config, split, column = fields
        return cls(dataset, config or None, split or HF_DEFAULT_SPLIT, column or HF_DEFAULT_COLUMN)

    def describe(self) -> str:
        config = f", config {self.config}" if self.config else ""
        return (
            f"Hugging Face dataset {self.dataset}{config}, split {self.split}, column {self.column}"
        )


def _load_hf_text(spec: HFTextSpec) -> str:
    """Rows of one dataset column joined by blank lines (the usual perplexity recipe)."""
    try:
        import datasets  # optional dependency: pip install welore[datasets]
    except ImportError as e:
        raise WeloreError(
            f"Reading {spec.dataset} needs the `datasets` package; run `pip install datasets`."
        ) from e
    logger.info("Loading %s", spec.describe())
    try:
        ds = datasets.load_dataset(spec.dataset, spec.config, split=spec.split)
    # offline (ConnectionError), unknown dataset (FileNotFoundError), bad config or split (ValueError)
    except (OSError, ValueError) as e:
        raise WeloreError(
            f"Could not load Hugging Face dataset {spec.dataset} ({type(e).__name__}: {e}); "
            "it needs network access or a local copy in the Hugging Face cache."
        ) from e
    if spec.column not in ds.column_names:
        raise WeloreError(
            f"Dataset {spec.dataset} has no column {spec.column!r}; name one of "
            f"{', '.join(ds.column_names)} as the last field of the hf: spec."
        )
    rows = [row for row in ds[spec.column] if row]
    return _check_not_empty("\n\n".join(str(r) for r in rows), f"Dataset {spec.dataset}")


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise WeloreError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}.")


def _resolve(spec: str) -> tuple[str, str | Path | HFTextSpec]:
    """Classify a spec as ("builtin", name), ("file", path) or ("hf", HFTextSpec)."""
    if spec.startswith(HF_PREFIX):
        return "hf", HFTextSpec.parse(spec)
    if not spec.strip():
        raise WeloreError(
            f"No text given; use a built-in text ({_builtin_names()}) or a file path."
        )
    if spec in _BUILTINS:
        return "builtin", spec
    path = Path(spec).expanduser()
    looks_like_path = path.suffix or "/" in spec or "\\" in spec
    if path.exists() or looks_like_path:
        return "file", path
    raise WeloreError(
        f"Unknown text {spec!r}; use a built-in text ({_builtin_names()}), the path of a UTF-8 "
        "text file, or hf:DATASET[:CONFIG[:SPLIT[:COLUMN]]]."
    )


def load_text(spec: str, split: str = "eval") -> str:
    """The text named by `spec` (see the module docstring for the spec syntax).

    `split` ("calib", "eval" or "all") picks documents of a built-in text; calib and eval share
    no document. Local files and datasets are used whole and ignore `split`. Documents are
    joined by a blank line.
    """
    _check_split(split)
    kind, target = _resolve(spec)
    if kind == "builtin":
        return "\n\n".join(_split_documents(_builtin_documents(target), split))
    if kind == "hf":
        return _load_hf_text(target)
    return _read_text_file(target)


def describe_text(spec: str, split: str = "eval") -> str:
    """A short description for reports, e.g. "wiki (built-in Wikipedia excerpt, eval split)"."""
    _check_split(split)
    kind, target = _resolve(spec)
    if kind == "builtin":
        return f"{spec} ({_BUILTINS[target].label}, {split} split)"
    if kind == "hf":
        return f"{spec} ({target.describe()})"
    return f"{spec} (local text file)"


def _chunks(text: str, size: int) -> Iterator[str]:
    """Pieces of at most `size` characters, cut before a line break or else before a space.

    Cutting *before* whitespace keeps pieces tokenizing like the whole text does, since BPE
    tokenizers attach a leading space to the following word.
    """
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = text.rfind("\n", start + 1, end)
            if cut <= start:
                cut = text.rfind(" ", start + 1, end)
            if cut > start:
                end = cut
        yield text[start:end]
        start = end


def _chunk_size(tokenizer: PreTrainedTokenizerBase) -> int:
    """Characters per tokenizer call, small enough never to exceed the model's max length.

    A character is at most 4 tokens (UTF-8 bytes, for byte-level tokenizers).
    """
    max_len = getattr(tokenizer, "model_max_length", None)
    if not isinstance(max_len, int) or max_len <= 0:
        return 4000
    return max(16, min(4000, max_len // 4))


def bos_option() -> Any:
    """The `bos` field of a config that makes token windows (one help text, one set of choices)."""
    return field(default="auto", metadata={"choices": BOS_POLICIES, "help": BOS_HELP})


def check_bos_policy(policy: str) -> None:
    if policy not in BOS_POLICIES:
        raise WeloreError(f"Unknown BOS policy {policy!r}; use --bos auto, yes or no.")


def settle_calibration_(config: Any) -> None:
    """A stage config's calibration fields (calib, calib_tokens, calib_seq_len, bos) made
    consistent: without a text no sizes or BOS policy are recorded; with one they are checked."""
    from welore.options import check_positive

    if config.calib is None:
        config.calib_tokens = config.calib_seq_len = config.bos = None
    else:
        check_bos_policy(config.bos)
        check_positive(config, ("calib_tokens", "calib_seq_len"))


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether `tokenizer` puts its BOS token first when it encodes a text by default."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("x")["input_ids"]
    return bool(ids) and ids[0] == bos


def resolve_bos(tokenizer: PreTrainedTokenizerBase, policy: str = "auto") -> str:
    """The BOS policy `policy` means for `tokenizer`: "yes" (windows start with its BOS token)
    or "no". "auto" follows the tokenizer's default (`adds_bos`); "yes" needs a BOS token."""
    check_bos_policy(policy)
    if policy == "auto":
        return "yes" if adds_bos(tokenizer) else "no"
    if policy == "yes" and tokenizer.bos_token_id is None:
        raise WeloreError("The tokenizer has no BOS token, so windows cannot start with one; use --bos no or auto.")
    return policy


def describe_bos(tokenizer: PreTrainedTokenizerBase, policy: str = "auto") -> str:
    """How windows start under `policy`, for reports: "BOS <s> first" or "no BOS"."""
    if resolve_bos(tokenizer, policy) == "yes":
        return f"BOS {tokenizer.bos_token} first"
    return "no BOS"


def token_windows(
    tokenizer: PreTrainedTokenizerBase, text: str, seq_len: int, max_tokens: int | None = None,
    options: tuple[str, str] = ("--seq-len", "--max-tokens"), bos: str = "auto",
) -> torch.Tensor:
    """Non-overlapping windows of token ids, a LongTensor of shape (N, seq_len).

    The text is tokenized piece by piece without special tokens (no BOS/EOS, not even between
    documents) and read as one stream, cut into windows of `seq_len` tokens; the last partial
    window is dropped. Under the BOS policy `bos` (`resolve_bos`: by default, when the tokenizer
    adds BOS), every window is the BOS token followed by the next `seq_len - 1` tokens of the
    stream. With `max_tokens`, at most `max_tokens // seq_len` windows are kept (and tokenizing
    stops once they are filled). Deterministic. `options` names the command-line options that
    set seq_len and max_tokens, for the error messages.
    """
    seq_option, tokens_option = options
    first = [tokenizer.bos_token_id] if resolve_bos(tokenizer, bos) == "yes" else []
    if seq_len < 2 + len(first):
        raise WeloreError(f"{seq_option} must be at least {2 + len(first)} (got {seq_len}); "
                          f"pass a larger {seq_option}.")
    if max_tokens is not None and max_tokens < seq_len:
        raise WeloreError(
            f"{tokens_option} ({max_tokens}) is smaller than one window of {seq_option} ({seq_len}); "
            f"raise {tokens_option} or use a smaller {seq_option}."
        )
    text_len = seq_len - len(first)  # text tokens per window
    wanted = None if max_tokens is None else max_tokens // seq_len  # windows
    ids: list[int] = []
    chunks = _chunks(text, _chunk_size(tokenizer))
    while wanted is None or len(ids) < wanted * text_len:
        batch = list(itertools.islice(chunks, 64))
        if not batch:
            break
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        ids.extend(itertools.chain.from_iterable(encoded))
    n_windows = len(ids) // text_len
    if wanted is not None:
        n_windows = min(n_windows, wanted)
    if n_windows == 0:
        raise WeloreError(
            f"The text has only {len(ids)} tokens, fewer than one window of {seq_len}; "
            f"use a longer text or a smaller {seq_option}."
        )
    windows = torch.tensor(ids[: n_windows * text_len], dtype=torch.long).view(n_windows, text_len)
    if first:
        windows = torch.cat([torch.full((n_windows, 1), first[0], dtype=torch.long), windows], dim=1)
    return windows  # (N, seq_len)


def overlap_fraction(calibration: str, evaluation: str, min_chars: int = 40) -> float:
    """Fraction of the evaluation text's paragraphs (of at least `min_chars` characters) that
    also occur in the calibration text; 0.0 means the two are disjoint."""

    def paragraphs(text: str) -> set[str]:
        return {p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) >= min_chars}

    evaluated = paragraphs(evaluation)
    if not evaluated:
        return 0.0
    return len(evaluated & paragraphs(calibration)) / len(evaluated)
