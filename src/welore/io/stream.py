"""Bounded memory: a model whose decoder blocks stay on disk and are read one at a time.

A *streamed* model is built on the meta device (accelerate's `init_empty_weights`); only the
weights outside the decoder blocks (embeddings, final norm, LM head) are read into memory.
Every piece of welore that works block by block asks `block_access(model)` for the blocks and
wraps its work on block k in `access.use(k)`:

    access = block_access(model)
    with access.use(k) as block:     # block k's tensors read from the safetensors shards
        ...                          # the block may be changed (e.g. compressed) here
    # released: its parameters are back on the meta device, changes written to a spill folder

For an ordinary (resident) model `use` does nothing, so the in-memory path and the streamed
path are the same code: the streamed path is the in-memory path with a block materializer.

The weights come from a folder's `model.safetensors` or from its shards listed in
`model.safetensors.index.json` (`TensorFiles`), read with `safetensors.safe_open` one block at
a time; `ShardWriter` writes a state dict group by group (a block at a time) as sharded
safetensors plus index JSON, the layout `save_pretrained` uses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from welore._io import write_json
from welore.errors import WeloreError

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 10**9  # shards of an in-memory save (save_pretrained's old default)

def format_bytes(n: int | float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


# --------------------------------------------------------------------------------------------
# Reading and writing safetensors folders


class TensorFiles:
    """Where each tensor of a folder's safetensors weights lives (single file or shards).

    `aliases` maps a name that is not stored to the stored name holding the same tensor
    (welore checkpoints store tied weights once). `override` points names to other files (a
    streamed model's changed blocks).
    """

    def __init__(self, folder: str | Path, aliases: dict[str, str] | None = None) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        single = self.folder / WEIGHTS
        self.files: dict[str, Path] = {}  # stored name -> file
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
                raise WeloreError(f"{index} is unreadable ({err}); re-create the model folder.") from None
            self.files = {name: self.folder / file for name, file in weight_map.items()}
            for file in set(self.files.values()):
                if not file.is_file():
                    raise WeloreError(f"{index} names {file.name}, which is missing; "
                                      "the folder is incomplete, re-create it.")
        elif single.is_file():
            for name in self._keys(single):
                self.files[name] = single
        else:
            raise WeloreError(f"{self.folder} has no {WEIGHTS} or {INDEX}; pass a folder of safetensors weights.")
        self.aliases = {a: s for a, s in (aliases or {}).items() if s in self.files}

    @staticmethod
    def _keys(file: Path) -> list[str]:
        try:
            with safe_open(file, framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as err:
            raise WeloreError(f"Cannot read {file} ({err}); the file is damaged, re-create it.") from None

    def __contains__(self, name: str) -> bool:
        return name in self.files or name in self.aliases

    def names(self) -> list[str]:
        return [*self.files, *self.aliases]

    def override(self, file: Path, names: Iterable[str]) -> None:
        for name in names:
            self.files[name] = file
            self.aliases.pop(name, None)

    def read(self, names: Iterable[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The named tensors, each read once per file with `safe_open`."""
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for name in names:
            stored = self.aliases.get(name, name)
            if stored not in self.files:
                raise WeloreError(f"{self.folder} has no tensor {name}; the weights do not match the model's config, "
                                  "re-create the folder.")
            by_file.setdefault(self.files[stored], []).append((name, stored))
        tensors: dict[str, torch.Tensor] = {}
        for file, pairs in by_file.items():
            try:
                with safe_open(file, framework="pt", device=str(device)) as f:
                    for name, stored in pairs:
                        tensors[name] = f.get_tensor(stored)
            except (SafetensorError, OSError) as err:
                raise WeloreError(f"Cannot read {file} ({err}); the file is damaged, re-create the model "
                                  "folder.") from None
        return tensors

    def nbytes(self, names: Iterable[str] | None = None, dtype: torch.dtype | None = None) -> int:
        """Bytes of the named tensors (all stored ones by default), in `dtype` when given."""
        wanted = {self.aliases.get(n, n) for n in names} if names is not None else set(self.files)
        total = 0
        by_file: dict[Path, list[str]] = {}
        for name in wanted:
            by_file.setdefault(self.files[name], []).append(name)
        for file, stored in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in stored:
                    piece = f.get_slice(name)
                    numel = 1
                    for size in piece.get_shape():
                        numel *= size
                    itemsize = dtype.itemsize if dtype is not None else _SAFE_ITEMSIZE.get(piece.get_dtype(), 4)
                    total += numel * itemsize
        return total


_SAFE_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class ShardWriter:
    """Write tensors group by group into `folder` as `save_pretrained` lays them out.

    Groups (e.g. one decoder block) are never split; a shard is written as soon as adding the
    next group would pass `max_shard_bytes`, so at most one shard is held in memory. One shard
    becomes `model.safetensors`; several become `model-0000i-of-0000N.safetensors` plus
    `model.safetensors.index.json`. Call `close()` once at the end.
    """

    def __init__(self, folder: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes  # a shard is written once it holds this much
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []  # written shards and their tensor names
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        for name, tensor in tensors.items():
            assert name not in self.pending and name not in self.names(), f"{name} written twice"
            self.pending[name] = tensor.detach().contiguous().cpu()
        self.pending_bytes += size
        self.total_bytes += size
        if self.pending_bytes >= self.max_shard_bytes:
            self._flush()

    def names(self) -> set[str]:
        return {name for _, names in self.shards for name in names}

    def _flush(self) -> None:
        path = self.folder / f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write what is pending, name the shards, write the index; returns the weight files."""
        if self.pending or not self.shards:
            self._flush()
        if len(self.shards) == 1:
            path = self.folder / WEIGHTS
            self.shards[0][0].rename(path)
            return [path]
        n = len(self.shards)
        weight_map, files = {}, []
        for i, (tmp, names) in enumerate(self.shards, start=1):
            path = self.folder / f"model-{i:05d}-of-{n:05d}.safetensors"
            tmp.rename(path)
            files.append(path)
            weight_map.update(dict.fromkeys(names, path.name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(self.folder / INDEX, index)
        return files


# --------------------------------------------------------------------------------------------
# Decoder blocks, resident or streamed


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The `nn.ModuleList` of decoder blocks (the one holding the most parameters), or None."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name and len(module):
            size = sum(p.numel() for p in module.parameters())
            if size and (best is None or size > best[2]):
                best = (name, module, size)
    return (best[0], best[1]) if best else None


class Blocks:
    """A model's decoder blocks, all resident in memory: `use(k)` does nothing."""

    streamed = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        found = decoder_blocks(model)
        self.list_name, self.blocks = found if found else ("", nn.ModuleList())

    def __len__(self) -> int:
        return len(self.blocks)

    def prefix(self, k: int) -> str:
        return f"{self.list_name}.{k}."

    def block_of(self, name: str) -> int | None:
        """The index of the block holding module or tensor `name`, None outside the blocks."""
        if not self.list_name or not name.startswith(f"{self.list_name}."):
            return None
        index = name[len(self.list_name) + 1 :].split(".", 1)[0]
        return int(index) if index.isdigit() and int(index) < len(self.blocks) else None

    def groups(self, names: Iterable[str]) -> list[tuple[int | None, list[str]]]:
        """`names` grouped by block in block order; names outside the blocks first (key None)."""
        grouped: dict[int | None, list[str]] = {}
        for name in names:
            grouped.setdefault(self.block_of(name), []).append(name)
        return sorted(grouped.items(), key=lambda item: -1 if item[0] is None else item[0])

    @contextlib.contextmanager
    def use(self, k: int | None, keep_changes: bool = True) -> Iterator[nn.Module | None]:
        """Block k in memory for the duration (k None: nothing to read)."""
        yield self.blocks[k] if k is not None else None

    @contextlib.contextmanager
    def outside_released(self) -> Iterator[None]:
        """For the duration, the weights outside the decoder blocks need not be in memory (a pass
        over the blocks uses them only before the first block and after the last); resident
        models keep them."""
        yield

    def state_dict_outside(self) -> dict[str, torch.Tensor]:
        """The state dict of everything outside the decoder blocks."""
        return {n: t for n, t in self.model.state_dict().items() if self.block_of(n) is None}

    def block_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Block k's state dict under its full names (call inside `use(k)`)."""
        return {self.prefix(k) + n: t for n, t in self.blocks[k].state_dict().items()}


class StreamedBlocks(Blocks):
    """Decoder blocks read from safetensors files when used, released to meta afterwards.

    A block whose modules or parameters were replaced while in use (a compressed block) is
    written to a spill folder on release and read from there next time, so `save` can stream it.
    `max_resident` counts the most blocks held at once (tests check that it stays 1).
    """

    streamed = True

    def __init__(
        self, model: nn.Module, files: TensorFiles, device: str | torch.device = "cpu", budget: int | None = None
    ) -> None:
        super().__init__(model)
        if not len(self.blocks):
            raise WeloreError("This model has no stack of decoder blocks (nn.ModuleList) to stream; "
                              "load it without --max-memory.")
        self.files = files
        self.device = torch.device(device)
        self.budget = budget  # bytes the user allows, None = no stated budget
        self.resident: set[int] = set()
        self.max_resident = 0
        self._spill: tempfile.TemporaryDirectory | None = None
        dtype = _model_dtype(model)
        outside = [n for n in _tensor_names(model) if self.block_of(n) is None and n in files]
        self.outside_bytes = files.nbytes(outside, dtype)  # embeddings, final norm, LM head
        self.block_bytes = max(files.nbytes([self.prefix(k) + n for n in _tensor_names(b)], dtype)
                               for k, b in enumerate(self.blocks))  # the largest block
        self.check_budget(0, "")

    def check_budget(self, activation_bytes: int, what: str) -> None:
        """Raise a user error when the resident weights, two blocks and `activation_bytes` of
        activations (described by `what`) exceed the stated budget."""
        need = self.outside_bytes + 2 * self.block_bytes + activation_bytes
        if self.budget is None or need <= self.budget:
            return
        parts = (f"embeddings, norm and LM head {format_bytes(self.outside_bytes)} "
                 f"+ two decoder blocks {format_bytes(2 * self.block_bytes)}")
        if activation_bytes:
            parts += f" + {what} {format_bytes(activation_bytes)}"
        raise WeloreError(
            f"The memory budget of {format_bytes(self.budget)} is below what one block at a time needs ({parts} "
            f"= {format_bytes(need)}); raise --max-memory" + (" or use fewer tokens." if activation_bytes else ".")
        )

    def _spill_dir(self) -> Path:
        if self._spill is None:
            self._spill = tempfile.TemporaryDirectory(prefix="welore-blocks-")
        return Path(self._spill.name)

    def close(self) -> None:
        """Delete the spill folder (also done when the object is garbage-collected)."""
        if self._spill is not None:
            self._spill.cleanup()
            self._spill = None

    def materialize_outside(self) -> None:
        """Read every tensor outside the decoder blocks; tie weights; check nothing is missing."""
        model = self.model
        names = [n for n in _tensor_names(model) if self.block_of(n) is None and n in self.files]
        for name, tensor in self.files.read(names).items():
            set_module_tensor_to_device(model, name, self.device, value=tensor, clear_cache=False)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.device.type == "meta" and self.block_of(n) is None]
        if missing:
            raise WeloreError(f"{self.files.folder} has no tensor {missing[0]}; "
                              "the weights do not match the model's config, re-create the folder.")

    @contextlib.contextmanager
    def outside_released(self) -> Iterator[None]:
        """The weights outside the blocks that came from the files (embeddings, final norm, LM
        head, and what is tied to them) go to the meta device for the duration and are read back
        afterwards: a pass over the blocks then holds W_out only at its ends."""
        state = {n: t for n, t in self.model.state_dict(keep_vars=True).items()
                 if self.block_of(n) is None and t.device.type != "meta"}
        from_files = {t.data_ptr() for n, t in state.items() if n in self.files}
        released = [n for n, t in state.items() if t.data_ptr() in from_files]
        del state  # no reference may outlive the release
        for name in released:
            set_module_tensor_to_device(self.model, name, "meta", clear_cache=False)
        try:
            yield
        finally:
            self.materialize_outside()

    @contextlib.contextmanager
    def use(self, k: int | None, keep_changes: bool = True) -> Iterator[nn.Module | None]:
        if k is None:
            yield None
            return
        block = self.blocks[k]
        prefix = self.prefix(k)
        names = [n for n in _tensor_names(block) if prefix + n in self.files]
        for name, tensor in self.files.read([prefix + n for n in names]).items():
            set_module_tensor_to_device(self.model, name, self.device, value=tensor, clear_cache=False)
        loaded = {n: p for n, p in block.named_parameters()}
        modules = list(block.modules())  # those holding what was read
        self.resident.add(k)
        self.max_resident = max(self.max_resident, len(self.resident))
        try:
            yield block
            block = self.blocks[k]  # the consumer may have replaced the whole block
            params = dict(block.named_parameters())
            changed = params.keys() != loaded.keys() or any(p is not loaded[n] for n, p in params.items())
            if changed and keep_changes:
                path = self._spill_dir() / f"block-{k:05d}.safetensors"
                tensors = self.block_state_dict(k)
                save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, str(path))
                self.files.override(path, tensors)
        finally:
            block = self.blocks[k]
            for name, param in list(block.named_parameters()):
                if param.device.type != "meta":
                    set_module_tensor_to_device(block, name, "meta", clear_cache=False)
            kept = {id(m) for m in block.modules()}
            for module in modules:  # replaced ones too: a caller may still hold them, but not their weights
                if id(module) not in kept:
                    module.to("meta")
            self.resident.discard(k)


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (the first one's)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def activation_bytes(model: nn.Module, windows: torch.Tensor) -> int:
    """Bytes of the hidden states of all `windows` (N, T) at one point of the model: N·T·d·itemsize."""
    width = model.get_input_embeddings().weight.shape[-1]
    return windows.numel() * width * _model_dtype(model).itemsize


def check_activations(model: nn.Module, nbytes: int, what: str) -> None:
    """For a streamed model with a budget, raise a user error when `nbytes` more do not fit."""
    access = block_access(model)
    if isinstance(access, StreamedBlocks):
        access.check_budget(nbytes, what)


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def should_stream(folder: Path, dtype: torch.dtype | None, budget: int | None) -> bool:
    """Stream a folder's blocks when the user stated a budget, or when its weights (in `dtype`)
    exceed the memory the system has available."""
    if budget is not None:
        return True
    available = available_memory()
    try:
        size = TensorFiles(folder).nbytes(dtype=dtype)
    except WeloreError:
        return False  # no safetensors weights (e.g. *.bin only): load it whole
    if available is not None and size > available:
        log.warning("%s needs %s in memory but %s is available: reading its decoder blocks one at a time",
                    folder, format_bytes(size), format_bytes(available))
        return True
    return False


def return_freed_memory() -> bool:
    """Have glibc's malloc give every allocation of 128 KiB or more back to the system when it is
    freed, for the rest of the process (a fixed M_MMAP_THRESHOLD; False where not glibc).

    By default glibc raises that threshold to the size of the largest block freed so far and
    keeps such allocations for reuse, so a process that reads and frees one decoder block after
    another keeps several blocks' worth of freed memory resident: streamed `analyze` of
    SmolLM2-135M peaked at 0.75 GB with the default and 0.52 GB with the fixed threshold
    (benchmarks/stream_memory.py). The CLI calls this when --max-memory is given.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_mmap_threshold = -3  # from <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 128 * 1024))


def _tensor_names(module: nn.Module) -> list[str]:
    """Names of a module's parameters and persistent buffers (what a state dict holds)."""
    return list(module.state_dict(keep_vars=True))


def block_access(model: nn.Module) -> Blocks:
    """The model's decoder blocks: streamed ones if the model was loaded streamed, else resident."""
    access = getattr(model, "welore_blocks", None)
    return access if access is not None else Blocks(model)


def is_streamed(model: nn.Module) -> bool:
    return block_access(model).streamed


def stream_(model: nn.Module, folder: str | Path, aliases: dict[str, str] | None = None,
            device: str | torch.device = "cpu", budget: int | None = None) -> nn.Module:
    """Make a model built on the meta device read its blocks from `folder` when used.

    Everything outside the decoder blocks is read now; blocks stay on meta until `use(k)`.
    With a `budget` (bytes), raises a user error when even one block at a time cannot fit.
    """
    access = StreamedBlocks(model, TensorFiles(folder, aliases), device=device, budget=budget)
    access.materialize_outside()
    model.welore_blocks = access
    return model


def release_spill(model: nn.Module) -> None:
    """Delete a streamed model's spill folder (its changed blocks are lost)."""
    access = getattr(model, "welore_blocks", None)
    if isinstance(access, StreamedBlocks):
        access.close()
