"""FSDP for `finetune`: each process keeps a 1/P shard of the parameters, gradients and AdamW state.

`accelerate launch --use_fsdp --num_processes P -m welore.cli finetune ...` asks for it.
accelerate's own FSDP plugin runs only on GPUs (on CPUs its launcher falls back to DDP, and
without a GPU its `Accelerator` is not distributed at all), so welore shards the model itself
with torch's `fully_shard` (FSDP2, the engine under accelerate's plugin): every decoder block
is one unit, the rest (embeddings, final norm, LM head) the root unit. This runs the same way
on GPUs (NCCL) and CPUs (gloo), and the multi-process tests run it on the CPU. accelerate still
launches the processes, shards the data and reduces the losses; the model is not handed to
`Accelerator.prepare` (that would wrap it in DDP a second time).

Gradients are averaged over the processes by FSDP's reduce-scatter, as DDP's all-reduce
does, so a P-process run follows a 1-process run with P times the batch size. Whole tensors
are needed in three places, each a collective call every process makes: a checkpoint (the
trainable parameters and AdamW's state, gathered in full and written by the main process), a
resume (every process reads the checkpoint and keeps its shard), and the end of the run (the
full state is loaded into an unsharded copy of the model, built on the meta device when
sharding starts, so the result is an ordinary model in every process).

GaLore and Fira project each matrix's whole gradient, which FSDP splits: they stay DDP-only;
so does LoRA (peft's wrapper), and a model streamed from disk cannot be trained at all.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from welore.errors import WeloreError
from welore.io.stream import decoder_blocks

FSDP_MODES = ("full", "lrc")


def fsdp_requested() -> bool:
    """True when `accelerate launch --use_fsdp` started this process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_fsdp(mode: str, optimizer: str) -> None:
    """Refuse what FSDP cannot run here, in one sentence."""
    if optimizer != "adamw":
        raise WeloreError(f"{optimizer} projects each matrix's whole gradient and FSDP splits it across processes; "
                          "use --optimizer adamw with FSDP, or launch without --use_fsdp "
                          "(plain DDP keeps whole gradients).")
    if mode not in FSDP_MODES:
        raise WeloreError(f"--mode {mode} runs under DDP but not under FSDP; use --mode full or lrc with FSDP, "
                          "or launch without --use_fsdp.")


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are on the meta device (no memory); buffers are copied.

    Ties survive (a shared parameter is copied once) and so do welore's attributes on the
    model (its rank plan); `unshard` later fills the parameters in."""
    memo: dict[int, object] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    return copy.deepcopy(model, memo)


def shard_(model: nn.Module) -> nn.Module:
    """Shard `model` in place over the processes (a unit per decoder block, and the root);
    returns its meta-device copy for `unshard`. The process group must be running already."""
    from torch.distributed.fsdp import fully_shard

    found = decoder_blocks(model)
    if found is None:
        raise WeloreError("FSDP shards a model by its decoder blocks and this model has no list of them; "
                          "launch without --use_fsdp.")
    skeleton = meta_copy(model)
    for block in found[1]:
        fully_shard(block)
    fully_shard(model)
    return skeleton


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def gather_trainable(model: nn.Module, optimizer: torch.optim.Optimizer,
                     names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """The trainable parameters and the optimizer state in full, on the CPU of the main process
    (other processes get empty dicts). Every process must call it."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state = get_model_state_dict(model, options=_options(cpu_offload=True))
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    return {n: state[n] for n in names if n in state}, optimizer_state


def scatter_trainable(model: nn.Module, optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor],
                      optimizer_state: dict) -> None:
    """Load full trainable parameters and optimizer state (every process passes them) into the
    sharded model and optimizer; each process keeps its shard. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(model, params, options=_options(strict=False))
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_options())


def unshard(model: nn.Module, skeleton: nn.Module) -> nn.Module:
    """`skeleton` (from `shard_`) holding the trained weights of the sharded `model`, in every
    process. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options())
    skeleton.load_state_dict(state, assign=True)
    tie = getattr(skeleton, "tie_weights", None)
    if callable(tie):
        tie()
    return skeleton
