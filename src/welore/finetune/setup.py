"""Everything `finetune` does before the first step: the checks, the accelerator, the
distillation objective, and `setup`, which builds the `Run` that the loop advances.

The checks come first and are cheap (nothing is loaded, trained or written before they pass);
`setup` then places the model, makes the training blocks, checks a resumed run is the same
run, decides what trains, builds the optimizer and schedule, restores the checkpoint or
measures the validation perplexity before the first step, and hands everything to accelerate.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from welore._io import check_output_dir
from welore.data import resolve_bos
from welore.devices import resolve_device
from welore.errors import WeloreError
from welore.eval.evaluate import perplexity
from welore.finetune.config import FinetuneConfig
from welore.finetune.data import BlockStream, TokenBlocks, make_blocks
from welore.finetune.distill import Distillation, check_teacher, freeze, load_teacher, resolve_teacher
from welore.finetune.optimizers import build_optimizer
from welore.finetune.sharding import check_fsdp, fsdp_requested, shard_
from welore.finetune.state import (
    TrainingState,
    check_resumable,
    checkpoints_dir,
    latest_checkpoint,
    load_checkpoint,
    model_fingerprint,
    run_identity,
    start_run,
)
from welore.finetune.trainable import Trainable, mark_trainable_, prepare_model

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)


# --- checks ---------------------------------------------------------------------------------------


def check_run(model: nn.Module, config: FinetuneConfig, out: Path | None, overwrite: bool, resume: bool) -> None:
    """Every check that needs no slow work: the model is whole, the precision and engine run here,
    the output folder may be written."""
    from welore.io.stream import is_streamed

    if is_streamed(model):
        raise WeloreError("Fine-tuning needs the whole model in memory, but this one reads its decoder blocks "
                          "from disk one at a time; load it without --max-memory (on a machine with room for it).")
    check_precision(config.precision, config.device)
    check_engine(config)
    check_output(out, config, overwrite, resume)


def check_precision(precision: str, device: str = "auto") -> None:
    """Refuse autocast modes the device cannot run."""
    cuda = resolve_device(device).type == "cuda"
    if precision == "fp16" and not cuda:
        raise WeloreError("fp16 autocast needs a CUDA GPU and there is none here; use --precision bf16 or no.")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise WeloreError("This GPU does not support bf16; use --precision fp16 or no.")


def check_engine(config: FinetuneConfig) -> None:
    """Refuse DeepSpeed, and what FSDP cannot run (`welore.finetune.sharding`)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise WeloreError("welore fine-tuning runs under DDP and FSDP but not under DeepSpeed; launch with --use_fsdp "
                          "or without an engine (plain DDP).")
    if fsdp_requested():
        check_fsdp(config.mode, config.optimizer)


def check_output(out: Path | None, config: FinetuneConfig, overwrite: bool, resume: bool) -> None:
    """Every check on the output and run folders, before any slow work."""
    if out is None:
        if config.save_every or resume:
            raise WeloreError("--save-every and --resume need an output folder; pass --out DIR.")
        return
    check_output_dir(out, overwrite)
    run_dir = checkpoints_dir(out)
    if not resume and run_dir.is_dir() and latest_checkpoint(run_dir) is not None and not overwrite:
        raise WeloreError(f"{run_dir} holds checkpoints of an unfinished run; pass --resume to continue it "
                          "or --overwrite to start over.")


# --- the accelerator and the objective --------------------------------------------------------------


def launched() -> bool:
    """True in a process started by `accelerate launch` / torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_accelerator(config: FinetuneConfig) -> Accelerator:
    """The Accelerator on `config.device`: one process, or each process of `accelerate launch`."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import patch_environment

    device = resolve_device(config.device)
    if launched() and device.index is not None:
        raise WeloreError(f"--device {config.device} names one GPU, and under accelerate launch each process uses "
                          "its own; use --device cuda (or auto).")
    if AcceleratorState._shared_state and not launched():
        # accelerate keeps its state (precision, device) in a process-wide singleton; in one
        # process (tests, a notebook, a benchmark) successive runs may differ, so start afresh.
        AcceleratorState._reset_state(reset_partial_state=True)
    # cpu=True is also what makes accelerate use gloo (MULTI_CPU) when launched without GPUs;
    # in one process, ACCELERATE_TORCH_DEVICE is accelerate's way to name a device (cuda:1, mps).
    named = {} if launched() or device.type == "cpu" else {"accelerate_torch_device": str(device)}
    # welore shards the model itself under --use_fsdp (accelerate's FSDP plugin needs GPUs).
    with patch_environment(accelerate_use_fsdp="false", **named):
        return Accelerator(cpu=device.type == "cpu", mixed_precision=config.precision,
                           gradient_accumulation_steps=config.grad_accum)


def distillation(model: nn.Module, tokenizer, config: FinetuneConfig, teacher: nn.Module | None = None,
                 source: str | None = None) -> Distillation | None:
    """The run's distillation objective (None without `config.distill.enabled`).

    The teacher is `teacher` when given (a model in memory), else `config.distill.teacher`
    loaded, else `source`, the dense model `model` was compressed from (`Record.source`);
    `config.distill.teacher` is set to the loaded spec so that the run's record names it.
    """
    options = config.distill
    if not options.enabled:
        if teacher is not None:
            raise WeloreError("A teacher was given but distillation is off; "
                              "set distill.enabled=True (--distill) or drop the teacher.")
        return None
    if teacher is None:
        options.teacher = resolve_teacher(source, options.teacher)
        teacher = load_teacher(options.teacher, model, tokenizer, options.teacher_dtype)
        log.info("distilling from %s (%s)", options.teacher, options.teacher_dtype)
    else:
        check_teacher(model, teacher)
        teacher = freeze(teacher).to(getattr(torch, options.teacher_dtype))
    return Distillation(teacher, alpha=options.alpha, temperature=options.temperature)


def validate(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    """Validation perplexity of `model` on `blocks` (N, T)."""
    ppl, _ = perplexity(model, blocks, batch_size=batch_size, progress=False)
    return ppl


# --- the run --------------------------------------------------------------------------------------


@dataclass
class Run:
    """One fine-tuning run as `setup` builds it and the loop advances it."""

    config: FinetuneConfig  # as run: the BOS policy resolved, the teacher named
    accelerator: Accelerator
    model: nn.Module  # as accelerate prepared it (DDP's wrapper under several processes), or FSDP's
    optimizer: torch.optim.Optimizer  # accelerate's wrapper of `raw_optimizer`
    raw_optimizer: torch.optim.Optimizer  # the optimizer itself, whose state checkpoints hold
    scheduler: Any  # warm-up then cosine decay, stepped once per process at every optimizer step
    loader: DataLoader  # (B, T) micro-batches of the training stream, from `state.items` on
    blocks: TokenBlocks  # training and validation blocks
    trainable: Trainable  # what trains (`mark_trainable_`)
    state: TrainingState  # step, position in the stream, losses, validation history
    distill: Distillation | None  # the objective, None for the LM loss
    run_dir: Path | None  # where resumable checkpoints go; None without an output folder
    sharded: bool  # the model is sharded by FSDP
    skeleton: Any  # what `unshard` rebuilds the model from (sharded runs only)
    resumed_from: int | None  # the step a resumed run continued from

    @property
    def per_step(self) -> int:
        """Training blocks per optimizer step, all processes together."""
        return self.config.batch_size * self.config.grad_accum * self.accelerator.num_processes


def setup(model: nn.Module, tokenizer, config: FinetuneConfig, blocks: TokenBlocks | None, out: Path | None,
          resume: bool, distill: Distillation | None) -> Run:
    """Build the run of `finetune` (its arguments, checked) up to the first step."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(config)
    world = accelerator.num_processes
    model_print = model_fingerprint(model) if out is not None else {}
    set_seed(config.seed)
    model = prepare_model(model, config)  # mode checks; LoRA wraps the model here
    model.to(accelerator.device)  # before the optimizer is built and the model first evaluated
    if distill is not None:
        distill.teacher.to(accelerator.device)
    config, blocks = _training_blocks(tokenizer, config, blocks)
    run_dir = checkpoints_dir(out) if out is not None else None
    teacher_print = model_fingerprint(distill.teacher) if distill is not None and out is not None else None
    sharded = fsdp_requested() and world > 1
    identity = run_identity(config, model_print, blocks.fingerprint(), processes=world, teacher_print=teacher_print,
                            engine="fsdp" if sharded else "ddp")
    checkpoint = check_resumable(run_dir, identity) if resume else None
    trainable = mark_trainable_(model, config)
    skeleton = shard_(model) if sharded else None  # before the optimizer: it holds the shards
    optimizer = build_optimizer(model, trainable.matrices, trainable.names, config)
    scheduler = _schedule(optimizer, config, world)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, trainable.names, optimizer, scheduler,
                                rank=accelerator.process_index, sharded=sharded)
    else:
        state = _start(model, blocks, config, accelerator, run_dir, identity)
    loader = _loader(blocks, config, state, world)
    if sharded:  # the model is FSDP's already; prepare would wrap it in DDP as well
        prepared, loader, scheduler = accelerator.prepare(optimizer, loader, scheduler)
    else:
        model, prepared, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    return Run(config=config, accelerator=accelerator, model=model, optimizer=prepared, raw_optimizer=optimizer,
               scheduler=scheduler, loader=loader, blocks=blocks, trainable=trainable, state=state, distill=distill,
               run_dir=run_dir, sharded=sharded, skeleton=skeleton,
               resumed_from=state.step if checkpoint is not None else None)


def _training_blocks(
    tokenizer, config: FinetuneConfig, blocks: TokenBlocks | None
) -> tuple[FinetuneConfig, TokenBlocks]:
    """The given blocks, or `config.data` tokenized (the config then records the BOS policy used)."""
    if blocks is not None:
        return config, blocks
    if tokenizer is not None:  # recorded as used
        config = replace(config, bos=resolve_bos(tokenizer, config.bos))
    return config, make_blocks(tokenizer, config.data, config.seq_len, config.max_train_tokens, config.val_tokens,
                               config.val_fraction, bos=config.bos)


def _schedule(optimizer: torch.optim.Optimizer, config: FinetuneConfig, world: int):
    """Linear warm-up, then cosine decay to 0 at the last step."""
    from transformers import get_cosine_schedule_with_warmup

    # An AcceleratedScheduler steps once per process at every optimizer step: hence `* world`.
    return get_cosine_schedule_with_warmup(optimizer, config.warmup_steps * world, config.steps * world)


def _start(model: nn.Module, blocks: TokenBlocks, config: FinetuneConfig, accelerator: Accelerator,
           run_dir: Path | None, identity: dict) -> TrainingState:
    """A new run's state: the validation perplexity before the first step, and the run folder
    when the run saves checkpoints."""
    state = TrainingState()
    state.history.append({"step": 0, "val_ppl": validate(model, blocks.val, config.batch_size)})
    if run_dir is not None and config.save_every and accelerator.is_main_process:
        start_run(run_dir, identity)
    accelerator.wait_for_everyone()
    return state


def _loader(blocks: TokenBlocks, config: FinetuneConfig, state: TrainingState, world: int) -> DataLoader:
    """(B, T) micro-batches of the training stream, from the run's position in it to its last step."""
    per_step = config.batch_size * config.grad_accum * world  # blocks per optimizer step, all processes
    stream = BlockStream(blocks.train, config.seed, start=state.items, stop=config.steps * per_step)
    # Its own generator: a DataLoader iterator otherwise draws a seed from torch's global RNG
    # when it starts, which a resumed run would do at another point of the RNG stream.
    return DataLoader(stream, batch_size=config.batch_size, shuffle=False, generator=torch.Generator())
