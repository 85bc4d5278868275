"""Quality, size, memory and speed of a causal LM: one harness for dense and compressed models.

Every figure is measured the same way for every model, so a dense model and its compressed
versions can be put side by side in one table (`format_table`):

- **perplexity**: exp of the mean next-token negative log-likelihood over all predicted tokens
  of fixed-length token windows (every window of T tokens predicts T-1 of them; a window that
  starts with BOS, as `welore.data.token_windows` makes them for a tokenizer that adds one,
  predicts its T-1 text tokens and never the BOS). Each token's
  NLL is computed in float32 from the model's logits and summed in float64, one window at a
  time, so the result does not depend on the batch size beyond float noise.
- **parameters**: unique parameters, tied weights counted once.
- **disk size**: bytes of the weight files (`*.safetensors`, else `*.bin`) in the model's folder.
- **peak memory**: the peak above the pre-evaluation baseline, resident set size (RSS) on a
  CPU and allocated CUDA memory on a GPU (`PeakMemory`).
- **speed**: prefill tokens/s of one forward pass over a fixed prompt, and greedy generation
  tokens/s of `model.generate` with KV cache; medians of a few timed runs after a warm-up.

The model is treated as an opaque `nn.Module`: `model(input_ids).logits` and `model.generate`
are all this module relies on. Evaluation never keeps gradients, runs under
`torch.inference_mode` (`torch.no_grad` for an FSDP-sharded model, see `_no_grad`), and restores
every submodule's train/eval mode afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from welore import tables
from welore.data import DEFAULT_TEXT, bos_option, check_bos_policy
from welore.errors import WeloreError
from welore.modules import count_parameters
from welore.options import check_positive

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin")  # weight-file formats counted by weights_size_on_disk
_MB = 1e6  # format_table reports decimal megabytes


@dataclass
class EvalOptions:
    """How the `evaluate`, `compare` and `demo` commands measure a model (`welore.options`)."""

    text: str = DEFAULT_TEXT  # evaluation text: wiki or news (built-in, eval split), a text file, or hf:DATASET
    seq_len: int = 512  # tokens per perplexity window
    max_tokens: int = 32768  # evaluate on at most this many tokens
    batch_size: int = 4  # windows per forward pass
    speed: bool = True  # measure prefill/generation speed (tokens/s)
    bos: str = bos_option()

    def __post_init__(self) -> None:
        check_positive(self, ("seq_len", "max_tokens", "batch_size"))
        check_bos_policy(self.bos)


@dataclass
class EvalResult:
    """Everything `evaluate` measured on one model; `None` where a figure was not measured."""

    perplexity: float | None  # exp(mean token NLL) over all predicted tokens of the windows
    eval_tokens: int  # number of predicted tokens that went into perplexity
    parameters: int  # unique parameters (tied weights counted once)
    disk_bytes: int | None  # size of the weight files in the model's folder; None if in-memory only
    peak_memory_bytes: int | None  # peak memory during the evaluation above the pre-evaluation baseline
    prefill_tokens_per_s: float | None  # prompt tokens processed per second by one forward pass
    generate_tokens_per_s: float | None  # new tokens per second of greedy generation with KV cache
    device: str  # where the model ran, e.g. "cpu" or "cuda:0"

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of the fields, ready for `json.dumps`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        """Rebuild a result from `to_dict` output (e.g. read back from a JSON file)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise WeloreError(f"Unknown evaluation fields {sorted(unknown)}; is this a welore evaluation file?")
        return cls(**data)


# --------------------------------------------------------------------------------------------
# Model helpers


def _model_device(model: nn.Module) -> torch.device:
    """Where inputs must go: the input embeddings' device, else the first parameter's or buffer's."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_embeddings):
        with contextlib.suppress(NotImplementedError, AttributeError):  # models without embeddings raise these
            embeddings = get_embeddings()
            if embeddings is not None and getattr(embeddings, "weight", None) is not None:
                return embeddings.weight.device
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _vocab_size(model: nn.Module) -> int | None:
    """Number of token ids the model can embed, or None when it cannot be found out."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_embeddings):
        with contextlib.suppress(NotImplementedError, AttributeError):  # models without embeddings raise these
            embeddings = get_embeddings()
            if isinstance(embeddings, nn.Embedding):
                return embeddings.num_embeddings
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    return vocab if isinstance(vocab, int) else None


def _context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows, or None when it does not say."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        with contextlib.suppress(ValueError, AttributeError):  # a config without a decoder text config
            config = config.get_text_config(decoder=True)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _accepts_use_cache(model: nn.Module) -> bool:
    """Whether `model.forward` takes `use_cache` (transformers models do)."""
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _logits(model: nn.Module, input_ids: torch.Tensor, use_cache: bool | None = None) -> torch.Tensor:
    """The (B, T, V) logits of one forward pass; `use_cache` is passed only if the model takes it."""
    kwargs = {"use_cache": use_cache} if use_cache is not None and _accepts_use_cache(model) else {}
    out = model(input_ids, **kwargs)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{type(model).__name__} returned {type(out).__name__} with no `.logits` tensor.")
    return logits


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put the model in eval mode and restore each submodule's own train/eval flag afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that a clock read measures the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


# --------------------------------------------------------------------------------------------
# Perplexity


def _check_windows(model: nn.Module, windows: torch.Tensor, batch_size: int) -> None:
    """Raise WeloreError if `windows` cannot be evaluated by `model`; cheap, runs before slow work."""
    if not isinstance(windows, torch.Tensor):
        raise WeloreError(f"Windows must be a torch tensor of token ids, not {type(windows).__name__}.")
    if windows.dim() != 2:
        raise WeloreError(f"Windows must be a 2-D (N, T) tensor of token ids; got shape {tuple(windows.shape)}.")
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise WeloreError(f"Windows must hold integer token ids, not {windows.dtype}; tokenize the text first.")
    n_windows, length = windows.shape
    if n_windows == 0:
        raise WeloreError("There are no windows to evaluate; give more text or shorter windows.")
    if length < 2:
        raise WeloreError(f"Windows of {length} token predict nothing; use windows of at least 2 tokens.")
    if batch_size < 1:
        raise WeloreError(f"Batch size must be at least 1, got {batch_size}.")
    context = _context_length(model)
    if context is not None and length > context:
        raise WeloreError(f"Windows of {length} tokens exceed the model's context of {context}; make shorter windows.")
    vocab = _vocab_size(model)
    low, high = int(windows.min()), int(windows.max())
    if low < 0 or (vocab is not None and high >= vocab):
        bad = low if low < 0 else high
        raise WeloreError(
            f"Token id {bad} is outside the model's vocabulary of {vocab}; "
            "tokenize the windows with this model's tokenizer."
        )


def _window_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed NLL of one window, float32 per token and float64 sum. logits (T-1, V), targets (T-1,)."""
    nll = F.cross_entropy(logits.float(), targets, reduction="none")  # (T-1,)
    return float(nll.double().sum())


def _no_grad(model: nn.Module):
    """`torch.inference_mode()`, or `torch.no_grad()` for a model sharded by FSDP (`fully_shard`):
    FSDP reuses its all-gather buffers in training, and a buffer made in inference mode cannot be
    written outside it."""
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            return torch.no_grad()
    return torch.inference_mode()


def perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> tuple[float, int]:
    """Perplexity of `model` on `windows`, a (N, T) LongTensor of token ids.

    Every window predicts its last T-1 tokens from the ones before. Returns
    `(exp(summed NLL / n_predicted), n_predicted)` with `n_predicted = N * (T - 1)`. Batches go
    to the device of the model's input embeddings; the model is left in the mode it came in.
    Raises WeloreError if the windows do not fit the model or the model's logits are not finite.
    """
    _check_windows(model, windows, batch_size)
    device = _model_device(model)
    n_windows, length = windows.shape
    total_nll = 0.0  # float64 running sum of token NLLs
    n_predicted = 0
    with _no_grad(model), _eval_mode(model), tqdm(
        total=n_windows, desc="perplexity", unit="window", disable=not progress
    ) as bar:
        batches = _batch_logits(model, windows, batch_size, progress)
        for start, logits in zip(range(0, n_windows, batch_size), batches, strict=True):
            batch = windows[start : start + batch_size].to(device=device, dtype=torch.long)  # (B, T)
            targets = batch[:, 1:].to(logits.device)  # (B, T-1)
            batch_nll = sum(_window_nll(logits[row, :-1], targets[row]) for row in range(len(batch)))
            if not math.isfinite(batch_nll):
                raise WeloreError(
                    "The model produced non-finite logits; its weights may be corrupt or overflow "
                    f"in {logits.dtype} (windows {start}-{start + len(batch) - 1}; try float32)."
                )
            total_nll += batch_nll
            n_predicted += len(batch) * (length - 1)
            bar.update(len(batch))
            bar.set_postfix(ppl=f"{_safe_exp(total_nll / n_predicted):.3f}")
    ppl = _safe_exp(total_nll / n_predicted)
    logger.info("Perplexity %.4f over %d predicted tokens (%d windows of %d).", ppl, n_predicted, n_windows, length)
    return ppl, n_predicted


def _batch_logits(model: nn.Module, windows: torch.Tensor, batch_size: int, progress: bool) -> Iterator[torch.Tensor]:
    """(B, T, V) logits of every batch of `windows`: one forward each, or, for a model whose
    decoder blocks are read from disk (`welore.io.stream`), block-major: all windows through
    block 0, then block 1, ... (`welore.lowrank.calibrate.block_outputs`), then final norm and LM head."""
    from welore.io.stream import is_streamed

    if is_streamed(model):
        from welore.lowrank.calibrate import block_outputs, final_logits

        windows = windows.to(dtype=torch.long)
        hidden, _ = block_outputs(model, windows, batch_size, progress=progress)
        yield from final_logits(model, windows, hidden, batch_size)
        return
    device = _model_device(model)
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device=device, dtype=torch.long)  # (B, T)
        yield _logits(model, batch, use_cache=False)


def _safe_exp(x: float) -> float:
    """exp(x), or inf where it would overflow a float."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


# --------------------------------------------------------------------------------------------
# Size


def weights_size_on_disk(path: str | os.PathLike[str]) -> int:
    """Bytes of the weight files in the model folder `path` (or of the weight file `path`).

    Counts the `*.safetensors` files directly in the folder; a folder holding only `*.bin`
    files (older PyTorch checkpoints) counts those instead. A folder with both counts the
    safetensors files alone, since they are the copy transformers loads. Hidden files and
    subfolders (such as welore's in-progress `.name.tmp-*` folders) are not counted.
    """
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise WeloreError(f"{path} is not a weight file (*.safetensors or *.bin); pass the model's folder.")
        return path.stat().st_size
    if not path.is_dir():
        raise WeloreError(f"Model folder {path} does not exist; pass the folder the model was saved to.")
    files = {suffix: [] for suffix in WEIGHT_SUFFIXES}
    for entry in sorted(path.iterdir()):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        if entry.suffix in files:
            files[entry.suffix].append(entry)
    chosen = files[".safetensors"] or files[".bin"]
    if files[".safetensors"] and files[".bin"]:
        logger.info("%s holds both *.safetensors and *.bin files; counting only the safetensors.", path)
    if not chosen:
        raise WeloreError(f"No *.safetensors or *.bin weight files in {path}; pass the folder the model was saved to.")
    return sum(entry.stat().st_size for entry in chosen)


# --------------------------------------------------------------------------------------------
# Memory


def _proc_status_kb(field: str) -> int | None:
    """A `kB` field of /proc/self/status (Linux) in kB, or None where it cannot be read."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS; False where the OS refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _lifetime_max_rss() -> int | None:
    """The process-lifetime peak RSS in bytes from getrusage, or None without `resource`."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(max_rss) if sys.platform == "darwin" else int(max_rss) * 1024  # bytes on macOS, kB elsewhere


_peaks_before_reset: dict[str, int] = {}  # highest peak seen per watched memory before PeakMemory reset it


def _remember_peak(key: str, value: int | None) -> None:
    if value is not None:
        _peaks_before_reset[key] = max(_peaks_before_reset.get(key, 0), value)


def process_peak_memory() -> dict[str, int]:
    """The process's peak memory so far, in bytes: "rss" (resident set size, also across the
    resets `PeakMemory` makes) and, once CUDA was used, "cuda:N" (memory allocated by torch)."""
    hwm_kb = _proc_status_kb("VmHWM")
    rss = hwm_kb * 1024 if hwm_kb is not None else _lifetime_max_rss()
    peaks = {}
    if rss is not None:
        peaks["rss"] = max(rss, _peaks_before_reset.get("rss", 0))
    if "torch" in sys.modules and torch.cuda.is_available() and torch.cuda.is_initialized():
        for index in range(torch.cuda.device_count()):
            key = f"cuda:{index}"
            peak = max(torch.cuda.max_memory_allocated(index), _peaks_before_reset.get(key, 0))
            if peak:
                peaks[key] = peak
    return peaks


class PeakMemory:
    """Context manager measuring peak memory inside its block, above the level at entry.

    On a CPU it measures the process's resident set size (RSS): on entry it resets the peak
    (writing "5" to /proc/self/clear_refs, Linux) and records the current RSS as baseline; on
    exit it reads the peak (VmHWM). Where the peak cannot be reset the figure includes whatever
    peak the process reached before the block (`lifetime` is then True and a log line says so).
    On a CUDA device it measures memory allocated by PyTorch on that device. Blocks must not be
    nested on the CPU: an inner block resets the peak the outer one is watching.

        with PeakMemory(device) as memory:
            ...
        memory.peak_bytes, memory.total_peak_bytes
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")  # what is watched
        self.kind = "cuda" if self.device.type == "cuda" and torch.cuda.is_available() else "rss"  # "cuda" or "rss"
        self.baseline_bytes: int | None = None  # memory in use when the block began
        self.peak_bytes: int | None = None  # peak inside the block minus baseline; set on exit
        self.total_peak_bytes: int | None = None  # absolute peak inside the block; set on exit
        self.lifetime = False  # True when the figure includes the process-lifetime peak before the block

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda":
            device = self.device if self.device.index is not None else torch.device("cuda", torch.cuda.current_device())
            self.device = device
            torch.cuda.synchronize(device)
            _remember_peak(str(device), torch.cuda.max_memory_allocated(device))
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline_bytes = torch.cuda.memory_allocated(device)
            return self
        hwm_kb = _proc_status_kb("VmHWM")
        _remember_peak("rss", hwm_kb * 1024 if hwm_kb is not None else None)
        reset = _reset_peak_rss()
        rss_kb = _proc_status_kb("VmRSS")
        if rss_kb is not None:
            self.baseline_bytes = rss_kb * 1024
        else:  # no /proc: the best baseline left is the lifetime peak so far
            self.baseline_bytes = _lifetime_max_rss()
        if not reset:
            self.lifetime = True
            logger.info(
                "Could not reset the process's peak memory; the peak figure is the process-lifetime "
                "peak minus the memory in use at the start, and may include earlier work."
            )
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            self.total_peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm_kb = _proc_status_kb("VmHWM")
            self.total_peak_bytes = hwm_kb * 1024 if hwm_kb is not None else _lifetime_max_rss()
        if self.total_peak_bytes is not None and self.baseline_bytes is not None:
            self.peak_bytes = max(0, self.total_peak_bytes - self.baseline_bytes)


# --------------------------------------------------------------------------------------------
# Speed


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds `fn()` took, with the device synchronized before both clock reads, and its result."""
    _synchronize(device)
    start = time.perf_counter()
    result = fn()
    _synchronize(device)
    return time.perf_counter() - start, result


def _pad_token_id(model: nn.Module) -> int:
    """A pad token id for `generate` (unused: the prompt has no padding), to keep it quiet."""
    for config in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(config, name, None)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
    return 0


@torch.inference_mode()
def measure_speed(
    model: nn.Module,
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
    vocab_size: int | None = None,
) -> tuple[float, float]:
    """(prefill tokens/s, generation tokens/s) of `model` on a fixed random prompt.

    Prefill: one forward pass over a (1, prompt_len) prompt of token ids drawn with a fixed
    seed. Generation: greedy `model.generate` of exactly `new_tokens` tokens with KV cache,
    timed end to end (its prefill included), tokens/s = new_tokens / seconds. Each figure is
    the median of `repeats` timed runs after one untimed warm-up. `vocab_size` defaults to
    the model's number of input embeddings.
    """
    for name, value in (("prompt_len", prompt_len), ("new_tokens", new_tokens), ("repeats", repeats)):
        if value < 1:
            raise WeloreError(f"{name} must be at least 1, got {value}.")
    vocab = vocab_size if vocab_size is not None else _vocab_size(model)
    if vocab is None or vocab < 1:
        raise WeloreError("Cannot tell the model's vocabulary size; pass vocab_size.")
    context = _context_length(model)
    if context is not None and prompt_len + new_tokens > context:
        raise WeloreError(
            f"A prompt of {prompt_len} plus {new_tokens} new tokens exceeds the model's context of "
            f"{context}; lower prompt_len or new_tokens."
        )
    if not callable(getattr(model, "generate", None)):
        raise WeloreError(f"{type(model).__name__} has no generate method; pass speed=False to skip speed.")
    device = _model_device(model)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=generator).to(device)  # (1, P)
    generate_kwargs = dict(
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=_pad_token_id(model),
    )

    def prefill() -> torch.Tensor:
        return _logits(model, prompt)

    def generate() -> torch.Tensor:
        return model.generate(prompt, **generate_kwargs)

    with _eval_mode(model):
        prefill_times = [_timed(prefill, device)[0] for _ in range(repeats + 1)][1:]
        generate_times = []
        for _ in range(repeats + 1):
            seconds, output = _timed(generate, device)
            generate_times.append(seconds)
            produced = output.shape[-1] - prompt_len
            if produced != new_tokens:
                raise RuntimeError(f"generate produced {produced} tokens instead of {new_tokens}.")
        generate_times = generate_times[1:]
    prefill_speed = prompt_len / statistics.median(prefill_times)
    generate_speed = new_tokens / statistics.median(generate_times)
    logger.info(
        "Speed on %s: prefill %.1f tokens/s (%d-token prompt), generation %.1f tokens/s (%d new tokens).",
        device, prefill_speed, prompt_len, generate_speed, new_tokens,
    )
    return prefill_speed, generate_speed


# --------------------------------------------------------------------------------------------
# Everything at once


def evaluate(
    model: nn.Module,
    windows: torch.Tensor | None,
    *,
    path: str | os.PathLike[str] | None = None,
    batch_size: int = 4,
    speed: bool = True,
    prompt_len: int = 128,
    new_tokens: int = 32,
    progress: bool = True,
) -> EvalResult:
    """Perplexity on `windows` (skipped if None), size, peak memory and speed of `model`.

    `path` is the folder the model was loaded from or saved to; without it the disk size is
    None (the model's `name_or_path` is not trusted: a model compressed in memory still names
    the folder of its dense original). Peak memory is measured around the perplexity and speed
    runs together, above the memory in use before them.
    """
    disk_bytes = weights_size_on_disk(path) if path is not None else None
    if windows is not None:
        _check_windows(model, windows, batch_size)  # fail before any slow work
    from welore.io.stream import is_streamed

    if speed and is_streamed(model):
        logger.warning("The model's decoder blocks are read from disk one at a time, so its speed is not measured.")
        speed = False
    device = _model_device(model)
    ppl: float | None = None
    eval_tokens = 0
    prefill_speed: float | None = None
    generate_speed: float | None = None
    peak_bytes: int | None = None
    if windows is not None or speed:
        with PeakMemory(device) as memory:
            if windows is not None:
                ppl, eval_tokens = perplexity(model, windows, batch_size=batch_size, progress=progress)
            if speed:
                prefill_speed, generate_speed = measure_speed(model, prompt_len=prompt_len, new_tokens=new_tokens)
        peak_bytes = memory.peak_bytes
    result = EvalResult(
        perplexity=ppl,
        eval_tokens=eval_tokens,
        parameters=count_parameters(model),
        disk_bytes=disk_bytes,
        peak_memory_bytes=peak_bytes,
        prefill_tokens_per_s=prefill_speed,
        generate_tokens_per_s=generate_speed,
        device=str(device),
    )
    logger.info("Evaluation: %s", result.to_dict())
    return result


# --------------------------------------------------------------------------------------------
# Table


def _fmt(value: float | int | None, spec: str, scale: float = 1.0) -> str:
    """`value / scale` formatted with `spec`, or "-" when the value is missing."""
    if value is None:
        return "-"
    return f"{value / scale:{spec}}"


def _ratio(value: float | int | None, base: float | int | None) -> str:
    """value / base as "0.80×", or "-" when either is missing or the base is zero."""
    if value is None or base is None or base == 0:
        return "-"
    return f"{value / base:.3f}×"


def format_table(rows: dict[str, EvalResult], baseline: str | None = None) -> str:
    """A plain-text table, one row per model name; with `baseline`, ratio columns against it.

    Columns: perplexity, parameters (millions), disk size and peak memory (MB = 10^6 bytes),
    prefill and generation tokens/s; with a baseline also parameters × and prefill speed ×
    relative to the baseline row. Missing values are shown as "-".
    """
    if baseline is not None and baseline not in rows:
        raise WeloreError(f"Baseline {baseline!r} is not one of the models in the table: {sorted(rows)}.")
    header = ["model", "perplexity", "params (M)", "disk (MB)", "peak mem (MB)", "prefill tok/s", "gen tok/s"]
    if baseline is not None:
        header += ["params ×", "prefill ×"]
    table = []
    base = rows[baseline] if baseline is not None else None
    for name, result in rows.items():
        cells = [
            name,
            _fmt(result.perplexity, ".3f"),
            _fmt(result.parameters, ".3f", 1e6),
            _fmt(result.disk_bytes, ".1f", _MB),
            _fmt(result.peak_memory_bytes, ".1f", _MB),
            _fmt(result.prefill_tokens_per_s, ".1f"),
            _fmt(result.generate_tokens_per_s, ".1f"),
        ]
        if base is not None:
            cells += [
                _ratio(result.parameters, base.parameters),
                _ratio(result.prefill_tokens_per_s, base.prefill_tokens_per_s),
            ]
        table.append(cells)
    return tables.format_table(header, table)
