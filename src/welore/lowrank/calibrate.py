"""Statistics of the target matrices' inputs on calibration text, one decoder block at a time.

Data-aware factorizers (`whiten`, after SVD-LLM, Wang et al., ICLR 2025; `asvd`, after ASVD,
Yuan et al., 2023) need, for every target matrix, the statistics of its inputs x (in,) over
the calibration tokens: XᵀX = Σ x xᵀ and Σ |x|. `iter_block_stats` collects them block by
block so that memory holds one block's statistics plus the hidden states of the calibration
windows, never the whole model's:

    for k, stats in iter_block_stats(model, find_targets(model), windows):
        ...  # stats: name -> InputStats for block k's targets; the block may be changed here

1. One forward of the model per batch is stopped at the first block by a pre-hook that keeps
   the block's inputs (hidden states and every other argument: attention mask, position ids
   or embeddings, ...) and raises. This "catcher" needs no knowledge of the family's signature.
2. For block k: hooks on its targets accumulate the statistics while the block runs over every
   batch; the statistics are yielded; when the consumer resumes (it may have compressed block
   k meanwhile), block k runs again and its outputs become block k+1's inputs. So block k+1
   is calibrated on the outputs of the already-compressed block k ("sequential" calibration).
   Without `sequential`, the outputs of the statistics pass (the unchanged block's) are kept
   instead, and block k is not run twice.

Block k's weights are needed only while it is used (`welore.io.stream.block_access(model).use(k)`):
for a model loaded with its blocks on disk, block k is read when its statistics are taken and
released (its compressed version written back) before block k+1 is read. The hidden states
of all calibration windows, N·T·d floats, are the only other large state.

`block_outputs` and `final_logits` run evaluation windows through the model the same way,
block-major (all windows through block k, then k+1, ...), for perplexity in bounded memory.

Modules that read the same tensor (q/k/v, gate/up) share one `InputStats` object: XᵀX is
computed once for them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from welore.devices import float64_device
from welore.errors import WeloreError
from welore.io.stream import Blocks, activation_bytes, block_access, check_activations
from welore.lowrank.spectrum import all_finite

log = logging.getLogger(__name__)


ADD_CHUNK_TOKENS = 512  # tokens converted to float64 at a time when statistics accumulate


@dataclass(eq=False)  # identity semantics: several modules may hold the same object
class InputStats:
    xtx: torch.Tensor  # (in, in) float64: Σ over calibration tokens of x xᵀ
    abs_sum: torch.Tensor  # (in,) float64: Σ |x|
    tokens: int  # number of tokens accumulated
    names: list[str] = field(default_factory=list)  # the modules that read this input (for messages)
    cross: torch.Tensor | None = None  # (in, in) float64: Σ x x_denseᵀ, x_dense the dense model's input of the same
        # token (paired statistics only)

    @classmethod
    def zeros(cls, in_features: int, device: torch.device | str | None = None) -> InputStats:
        """Empty statistics for inputs on `device`, kept in float64 there (on the CPU for MPS)."""
        device = float64_device(device) if device is not None else None
        return cls(
            xtx=torch.zeros(in_features, in_features, dtype=torch.float64, device=device),
            abs_sum=torch.zeros(in_features, dtype=torch.float64, device=device),
            tokens=0,
        )

    @property
    def in_features(self) -> int:
        return int(self.abs_sum.shape[0])

    @property
    def mean_abs(self) -> torch.Tensor:
        """Mean |x| of every input channel, (in,) float64."""
        return self.abs_sum / self.tokens

    def add_(self, x: torch.Tensor, dense: torch.Tensor | None = None) -> None:
        """Accumulate a batch of inputs x (..., in); with `dense`, the dense model's inputs of the
        same tokens (..., in), also Σ x x_denseᵀ."""
        x = x.detach().reshape(-1, x.shape[-1])  # (tokens, in)
        if dense is not None:
            dense = dense.detach().reshape(-1, dense.shape[-1])  # (tokens, in)
            assert dense.shape == x.shape, f"dense inputs {tuple(dense.shape)} do not pair with inputs {tuple(x.shape)}"
            if self.cross is None:
                self.cross = torch.zeros_like(self.xtx)
        for start in range(0, x.shape[0], ADD_CHUNK_TOKENS):  # float64 copies of a chunk, not of the whole batch
            part = x[start:start + ADD_CHUNK_TOKENS].to(self.xtx.device, torch.float64)  # (chunk, in)
            self.xtx.addmm_(part.T, part)  # (in, in)
            if dense is not None:
                self.cross.addmm_(part.T, dense[start:start + ADD_CHUNK_TOKENS].to(self.xtx.device, torch.float64))
            self.abs_sum.add_(part.abs().sum(dim=0))  # (in,)
        self.tokens += x.shape[0]

    def check(self, name: str) -> None:
        """Raise a user error when these statistics are empty or hold NaN/Inf."""
        if self.tokens == 0:
            raise WeloreError(f"The input statistics of {name} hold no tokens; the module never ran on the "
                              "calibration text, so check the targets and the calibration windows.")
        finite = all_finite(self.xtx) and all_finite(self.abs_sum)
        if not (finite and (self.cross is None or all_finite(self.cross))):
            raise WeloreError(
                f"The input statistics of {name} contain NaN or Inf; the model or the calibration text produced "
                "non-finite activations (try float32 instead of float16, or check the model's weights)."
            )


class _StopForward(Exception):
    """Raised by the catcher hook to stop the model's forward at the first block."""


@dataclass
class _BlockInputs:
    """What the model passes to a decoder block for one batch, the hidden states aside."""

    by_keyword: bool  # hidden states passed as `hidden_states=` instead of positionally
    args: tuple  # positional arguments after the hidden states
    kwargs: dict[str, Any]  # keyword arguments (attention mask, position embeddings, ...)


def _block_list(
    model: nn.Module, targets: dict[str, nn.Module]
) -> tuple[str, nn.ModuleList, dict[int, dict[str, nn.Module]]]:
    """The name of the `nn.ModuleList` of decoder blocks holding the targets, the list, and the
    targets grouped by block: block index -> {name: module}.

    The outermost list wins, so lists inside a block (mixture-of-experts) are not mistaken for it.
    """
    if not targets:
        raise WeloreError("No target matrices to calibrate; name some with --targets.")
    lists = sorted(
        ((name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and name),
        key=lambda item: item[0].count("."),
    )
    found: dict[str, tuple[str, nn.ModuleList]] = {}
    per_block: dict[int, dict[str, nn.Module]] = {}
    for target, module in targets.items():
        for list_name, blocks in lists:
            prefix = f"{list_name}."
            if target.startswith(prefix):
                index = target[len(prefix) :].split(".", 1)[0]
                if index.isdigit() and int(index) < len(blocks):
                    found[target] = (list_name, blocks)
                    per_block.setdefault(int(index), {})[target] = module
                    break
        else:
            raise WeloreError(
                f"Target {target} is not inside the decoder blocks; data-aware methods need targets "
                "inside decoder blocks, so drop it from --targets or use a data-free factorizer."
            )
    list_names = sorted({list_name for list_name, _ in found.values()})
    if len(list_names) > 1:
        raise WeloreError(
            f"The targets lie in several stacks of blocks ({', '.join(list_names)}); data-aware methods "
            "calibrate one stack of decoder blocks, so pick targets from one of them."
        )
    list_name, blocks = next(iter(found.values()))
    return list_name, blocks, per_block


def _layer_types(model: nn.Module, n_blocks: int) -> list[str] | None:
    """`config.layer_types` when the blocks are of several kinds (e.g. full and sliding-window
    attention), which the model gives different attention masks or position embeddings."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == n_blocks and len(set(types)) > 1:
        return list(types)
    return None


def _capture_block_inputs(
    model: nn.Module, block: nn.Module, windows: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[_BlockInputs]]:
    """Hidden states (B, T, d) and other arguments the model gives `block`, batch by batch."""
    hidden: list[torch.Tensor] = []
    inputs: list[_BlockInputs] = []

    def catch(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        if args:
            hidden.append(args[0])
            inputs.append(_BlockInputs(by_keyword=False, args=tuple(args[1:]), kwargs=kwargs))
        else:
            hidden.append(kwargs.pop("hidden_states"))
            inputs.append(_BlockInputs(by_keyword=True, args=(), kwargs=kwargs))
        raise _StopForward

    device = model.get_input_embeddings().weight.device
    handle = block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)  # (B, T)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                continue
            raise RuntimeError("the model's forward finished without calling its first decoder block")
    finally:
        handle.remove()
    return hidden, inputs


def _capture_all(
    model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[list[_BlockInputs]]]:
    """Block 0's hidden states per batch, and every block's other inputs per batch.

    Usually all blocks get the same arguments. When `config.layer_types` mixes kinds of block,
    the model picks each block's mask by its entry there; the catcher then runs once more per
    other kind, with that kind written into entry 0, and each block gets its kind's arguments.
    """
    hidden, first = _capture_block_inputs(model, blocks[0], windows, batch_size)
    types = _layer_types(model, len(blocks))
    if types is None:
        return hidden, [first] * len(blocks)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    by_type = {types[0]: first}
    original = config.layer_types
    try:
        for kind in dict.fromkeys(types[1:]):
            if kind not in by_type:
                config.layer_types = [kind, *types[1:]]
                by_type[kind] = _capture_block_inputs(model, blocks[0], windows, batch_size)[1]
    finally:
        config.layer_types = original
    return hidden, [by_type[kind] for kind in types]


_TUPLE_BLOCKS: set[type] = set()  # block classes seen returning a tuple (Falcon, Bloom, MPT, GPT-Neo)


def _run_block(block: nn.Module, hidden: torch.Tensor, inputs: _BlockInputs) -> torch.Tensor:
    """The block's output hidden states; blocks return a tensor or a tuple, by family and version."""
    if inputs.by_keyword:
        out = block(hidden_states=hidden, **inputs.kwargs)
    else:
        out = block(hidden, *inputs.args, **inputs.kwargs)
    if isinstance(out, (tuple, list)):
        _TUPLE_BLOCKS.add(type(block))
        return out[0]
    return out


class _ForwardHooks:
    """While entered, `self.hook(name)` is a forward hook on each module of `self.modules`
    (name -> module); subclasses say what the hook does."""

    modules: dict[str, nn.Module]

    def hook(self, name: str) -> Callable[[nn.Module, tuple, Any], None]:
        raise NotImplementedError

    def __enter__(self: _Hooks) -> _Hooks:
        self._handles = [m.register_forward_hook(self.hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()


_Hooks = TypeVar("_Hooks", bound=_ForwardHooks)


class _Collector(_ForwardHooks):
    """Forward hooks that accumulate one block's input statistics.

    Within one block forward, modules whose input is the same tensor share one InputStats; the
    tensors seen are kept alive until the forward ends, so no later input can reuse their memory
    and be mistaken for them.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.stats: dict[str, InputStats] = {}
        self._seen: list[tuple[torch.Tensor, InputStats]] = []  # inputs of the current forward
        self.dense: dict[str, torch.Tensor] | None = None  # paired: name -> the dense stream's input of this batch
        self.capturing = False  # True while the dense stream's forward runs

    def new_forward(self) -> None:
        self._seen.clear()

    @contextlib.contextmanager
    def capturing_dense(self) -> Iterator[None]:
        """While active (the block's forward on the dense stream), every target's input is kept,
        not accumulated; the next forward's statistics pair with them."""
        self.dense, self.capturing = {}, True
        try:
            yield
        finally:
            self.capturing = False

    def hook(self, name: str):
        def accumulate(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0]
            if self.capturing:  # the dense stream's forward: keep the input for pairing, accumulate nothing
                self.dense[name] = x
                return
            shared = next((s for t, s in self._seen if _same_tensor(t, x)), None)
            if shared is not None:
                known = self.stats.setdefault(name, shared)
                if name not in shared.names:
                    shared.names.append(name)
                if known is shared:
                    return  # already accumulated for this forward
                raise RuntimeError(f"{name} shares its input with {shared.names} in one forward but not in another")
            stats = self.stats.get(name)
            if stats is not None and any(s is stats for _, s in self._seen):
                raise RuntimeError(f"{stats.names} share their input in one forward but not in another")
            if stats is None:
                stats = self.stats[name] = InputStats.zeros(x.shape[-1], device=x.device)
                stats.names.append(name)
            stats.add_(x, None if self.dense is None else self.dense[name])
            self._seen.append((x, stats))

        return accumulate

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._seen.clear()


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (
        a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
    )


def iter_block_stats(
    model: nn.Module,
    targets: dict[str, nn.Module],
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
    sequential: bool = True,
    paired: bool = False,
) -> Iterator[tuple[int, dict[str, InputStats]]]:
    """Yield (block index, {target name: InputStats}) for every decoder block holding targets.

    `windows` (N, T) are token ids of calibration text. Blocks come in order, each with exactly
    its targets; names that read one tensor share one InputStats. The consumer may change block
    k (e.g. compress it) before resuming: with `sequential`, block k+1's statistics are then
    taken on the changed block's outputs; without, on the unchanged block's. Statistics live on
    the device of the module they describe. Block k is in memory while its statistics are used.
    The generator keeps no reference to a block's statistics once resumed: a consumer that drops
    them (`drain`) holds one block's statistics at a time, not two.

    `paired` (with `sequential`) also runs the dense model alongside: a second stream of hidden
    states goes through every block before the consumer changes it, and each target's statistics
    get `cross` = Σ x xᵀ_dense, its input x here against the dense model's input of the same token
    (what `welore.lowrank.refit` needs). It doubles the hidden states kept, nothing else.
    """
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise WeloreError("Calibration windows must be a non-empty (N, seq_len) tensor of token ids, "
                          f"not shape {tuple(windows.shape)}.")
    list_name, blocks, per_block, access = _target_blocks(model, targets, batch_size)
    stats_bytes = max(sum(8 * m.in_features**2 if isinstance(m, nn.Linear) else 8 * m.weight.shape[0] ** 2
                          for m in modules.values()) for modules in per_block.values())
    if paired and not sequential:
        raise WeloreError("Paired statistics compare the compressed prefix's inputs with the dense model's, "
                          "so they need sequential=True.")
    streams = 2 if paired else 1
    check_activations(model, streams * activation_bytes(model, windows) + stats_bytes * streams,
                      f"calibration hidden states of {windows.shape[0]}x{windows.shape[1]} tokens and XᵀX statistics")
    last = max(per_block)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=last + 1, desc="calibration", unit="block", disable=not progress) as bar:
            hidden, inputs = _capture_all(model, blocks, windows, batch_size)
            dense_hidden = [h.clone() for h in hidden] if paired else None  # the dense model's stream
            log.info("calibrating %d targets in %d blocks of %s on %d windows of %d tokens",
                     len(targets), len(per_block), list_name, windows.shape[0], windows.shape[1])
            with access.outside_released():
                for k in range(last + 1):
                    with access.use(k):
                        advanced = False
                        if k in per_block:
                            advance = not sequential and k < last
                            stats = _block_stats(blocks[k], per_block[k], hidden, inputs[k], keep_outputs=advance,
                                                 dense_hidden=dense_hidden)
                            advanced = advance
                            yield k, stats
                            del stats  # so a consumer that drops them frees them before the next block's
                        elif dense_hidden is not None and k < last:  # a block without targets: the dense stream too
                            _advance(blocks[k], dense_hidden, inputs[k])
                        if k < last and not advanced:  # the next block's inputs: this block's outputs, after any
                            _advance(blocks[k], hidden, inputs[k])  # change; looked up again: it may be replaced
                    bar.update()
    finally:
        for module, training in modes.items():
            module.training = training


def drain(block_stats: dict[str, InputStats]) -> Iterator[tuple[str, InputStats]]:
    """(name, statistics) of one block from `iter_block_stats`, in order, each removed from the
    dict as it is handed out: statistics no remaining target shares are freed as soon as the
    consumer drops them (a 1.1B model's blocks hold 0.36 GB of XᵀX, its down_proj's 0.25 GB)."""
    while block_stats:
        name = next(iter(block_stats))
        yield name, block_stats.pop(name)


def _target_blocks(
    model: nn.Module, targets: dict[str, nn.Module], batch_size: int
) -> tuple[str, nn.ModuleList, dict[int, dict[str, nn.Module]], Blocks]:
    """What a block-by-block pass over `targets` needs, checked: the name of their stack of
    blocks, the stack, the targets grouped by block index (`_block_list`) and the block access."""
    list_name, blocks, per_block = _block_list(model, targets)
    if batch_size < 1:
        raise WeloreError(f"batch_size must be at least 1 (got {batch_size}).")
    return list_name, blocks, per_block, _access(model, blocks)


def _access(model: nn.Module, blocks: nn.ModuleList) -> Blocks:
    """The model's block access, checked to be about the same stack of blocks as `blocks`."""
    access = block_access(model)
    if access.streamed and access.blocks is not blocks:
        raise WeloreError(
            f"The targets lie outside the decoder blocks {access.list_name} that are read from disk one at a time; "
            "pick targets inside them or load the model without --max-memory."
        )
    return access


def _advance(block: nn.Module, hidden: list[torch.Tensor], inputs: list[_BlockInputs]) -> None:
    """Replace every batch's hidden states by `block`'s outputs on them."""
    for i, block_inputs in enumerate(inputs):
        hidden[i] = _run_block(block, hidden[i], block_inputs)


def _block_stats(
    block: nn.Module, targets: dict[str, nn.Module], hidden: list[torch.Tensor], inputs: list[_BlockInputs],
    keep_outputs: bool = False, dense_hidden: list[torch.Tensor] | None = None,
) -> dict[str, InputStats]:
    """Run `block` over every batch with hooks on its `targets`; name -> checked InputStats.
    With `keep_outputs`, every batch's hidden states are replaced by the block's outputs. With
    `dense_hidden` (the dense model's hidden states of the same batches), the block first runs
    on those, which are replaced by its outputs, and the statistics pair the two inputs (`cross`)."""
    collector = _Collector(targets)
    with collector:
        for i, (hidden_states, block_inputs) in enumerate(zip(hidden, inputs, strict=True)):
            collector.new_forward()
            if dense_hidden is not None:  # the dense stream first; its inputs pair with this batch's
                with collector.capturing_dense():
                    dense_hidden[i] = _run_block(block, dense_hidden[i], block_inputs)
                missing = [name for name in targets if name not in collector.dense]
                if missing:
                    raise WeloreError(f"{', '.join(missing)} never ran while its block processed the calibration text; "
                                      "data-aware methods need targets that the calibration tokens pass through.")
            out = _run_block(block, hidden_states, block_inputs)
            if keep_outputs:
                hidden[i] = out
    missing = [name for name in targets if name not in collector.stats]
    if missing:
        raise WeloreError(
            f"{', '.join(missing)} never ran while its block processed the calibration text; "
            "data-aware methods need targets that the calibration tokens pass through."
        )
    stats = {name: collector.stats[name] for name in targets}
    for name, s in stats.items():
        s.check(name)
    return stats


# --------------------------------------------------------------------------------------------
# Block-major forward (perplexity in bounded memory)


def block_outputs(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> tuple[list[torch.Tensor], list[_BlockInputs]]:
    """The last decoder block's output hidden states for every batch of `windows` (N, T), and
    the arguments the blocks got: all windows through block 0, then block 1, ... (each block
    in memory only while it runs)."""
    access = block_access(model)
    if not len(access):
        raise WeloreError("This model has no stack of decoder blocks (nn.ModuleList) to run block by block.")
    check_activations(model, activation_bytes(model, windows),
                      f"hidden states of {windows.shape[0]}x{windows.shape[1]} tokens")
    with torch.no_grad():
        hidden, inputs = _capture_all(model, access.blocks, windows, batch_size)
        with access.outside_released():
            for k in tqdm(range(len(access)), desc="blocks", unit="block", disable=not progress):
                with access.use(k) as block:
                    _advance(block, hidden, inputs[k])
    return hidden, inputs[-1]


@contextlib.contextmanager
def _replayed_blocks(blocks: nn.ModuleList, final: list[torch.Tensor]) -> Iterator[None]:
    """While active, the model's forward skips its blocks: block 0 returns the next tensor of
    `final` (the last block's outputs computed before), the others pass their input on."""
    batches = iter(final)
    # the model reads `outputs[0]` from blocks that return tuples: give it what its blocks return
    as_tuple = any(type(block) in _TUPLE_BLOCKS for block in blocks)

    def returned(hidden: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor]:
        return (hidden,) if as_tuple else hidden

    def first(*args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor]:
        return returned(next(batches))

    def passthrough(*args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor]:
        return returned(args[0] if args else kwargs["hidden_states"])

    for k, block in enumerate(blocks):
        block.forward = first if k == 0 else passthrough
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def final_logits(
    model: nn.Module, windows: torch.Tensor, hidden: list[torch.Tensor], batch_size: int
) -> Iterator[torch.Tensor]:
    """(B, T, V) logits of every batch of `windows`, given the last block's outputs `hidden`
    (`block_outputs`): the model's forward with its blocks replayed, i.e. embeddings (unused),
    final norm and LM head only."""
    access = block_access(model)
    device = model.get_input_embeddings().weight.device
    with torch.no_grad(), _replayed_blocks(access.blocks, hidden):
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)  # (B, T)
            yield model(input_ids=batch, use_cache=False).logits
