"""`finetune(model, tokenizer, config)`: the training loop, run through `accelerate`.

One loop for every mode and optimizer. It runs in one process on a CPU or GPU, and unchanged
in several processes under `accelerate launch` (DDP, on GPUs or on CPUs with gloo):
`Accelerator.prepare` wraps the model, optimizer, scheduler and data loader; gradient
accumulation uses `accelerator.accumulate`. Per optimizer step: micro-batches forward/backward
-> unscale -> `on_gradients(step, model)` -> clip -> optimizer and scheduler step. Validation
perplexity is measured before the first step, every `eval_every` steps and after the last.

Under P processes each optimizer step reads P x batch_size x grad_accum blocks of the one
training stream (process p takes micro-batches p, p + P, ...), so a run with P processes
follows the run of one process with P times the batch size: the same blocks per step, the
same mean loss (reduced over processes), gradients averaged by DDP's all-reduce. GaLore and
Fira see that all-reduced gradient in every process and compute the same projection, so the
processes stay identical. Only the main process writes (checkpoints, the output folder); the
others wait at a barrier. Under `accelerate launch --use_fsdp` the model is sharded instead
(`welore.finetune.sharding`: torch's FSDP2, on CPUs and GPUs alike) for `full` and `lrc` with
AdamW; DeepSpeed is refused (`check_engine`).

With `config.distill` the loss of each micro-batch is `Distillation.loss` (`welore.finetune.distill`):
the KL from a frozen teacher's next-token distribution, computed on the fly in every process
(the teacher is not wrapped by DDP: it has no gradients to reduce), optionally mixed with the
LM loss. The teacher is loaded again by a resumed run; its fingerprint is part of the run's identity.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from welore import __version__
from welore._io import atomic_dir, check_output_dir, write_json
from welore.data import resolve_bos
from welore.devices import resolve_device
from welore.errors import WeloreError
from welore.evaluate import PeakMemory, perplexity
from welore.finetune.config import FinetuneConfig, FinetuneResult
from welore.finetune.data import BlockStream, TokenBlocks, make_blocks
from welore.finetune.distill import (
    Distillation,
    check_teacher,
    freeze,
    load_teacher,
    resolve_teacher,
)
from welore.finetune.optimizers import build_optimizer
from welore.finetune.sharding import check_fsdp, fsdp_requested, shard_, unshard
from welore.finetune.state import (
    TrainingState,
    check_resumable,
    checkpoints_dir,
    latest_checkpoint,
    load_checkpoint,
    model_fingerprint,
    rng_state,
    run_identity,
    save_checkpoint,
    start_run,
    trainable_state,
)
from welore.finetune.trainable import finish_model, mark_trainable_, prepare_model

log = logging.getLogger(__name__)

GradientHook = Callable[[int, nn.Module], None]
FINETUNE_FORMAT = "welore-finetune"
FINETUNE_VERSION = 1


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


def launched() -> bool:
    """True in a process started by `accelerate launch` / torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _accelerator(config: FinetuneConfig):
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


def distillation(model: nn.Module, tokenizer, config: FinetuneConfig,
                 teacher: nn.Module | None = None) -> Distillation | None:
    """The run's distillation objective (None without `config.distill`).

    The teacher is `teacher` when given (a model in memory), else `config.teacher` loaded, else
    the dense model `model` was compressed from; `config.teacher` is set to the loaded spec so
    that the run's record names it.
    """
    if not config.distill:
        if teacher is not None:
            raise WeloreError("A teacher was given but distillation is off; "
                              "set distill=True (--distill) or drop the teacher.")
        return None
    if teacher is None:
        config.teacher = resolve_teacher(model, config.teacher)
        teacher = load_teacher(config.teacher, model, tokenizer, config.teacher_dtype)
        log.info("distilling from %s (%s)", config.teacher, config.teacher_dtype)
    else:
        check_teacher(model, teacher)
        teacher = freeze(teacher).to(getattr(torch, config.teacher_dtype))
    return Distillation(teacher, alpha=config.distill_alpha, temperature=config.distill_temperature)


def _evaluate(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    ppl, _ = perplexity(model, blocks, batch_size=batch_size, progress=False)
    return ppl


def finetune(
    model: nn.Module,
    tokenizer=None,
    config: FinetuneConfig | None = None,
    *,
    blocks: TokenBlocks | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    on_gradients: GradientHook | None = None,
    source: str | None = None,
    progress: bool = True,
    teacher: nn.Module | None = None,
) -> FinetuneResult:
    """Fine-tune `model` as `config` says; save it to `out` (a welore checkpoint) if given.

    `blocks` (pre-tokenized training/validation blocks) replaces tokenizing `config.data`.
    `on_gradients(step, model)` is called once per optimizer step (1-based) when the whole
    accumulated, unscaled gradients are in `.grad`, before clipping and the optimizer step.
    With `config.save_every`, resumable checkpoints go to `OUT.checkpoints/`; `resume=True`
    continues the unfinished run there and ends exactly where an uninterrupted run would.
    The model is trained in place, except that LoRA wraps it (the result holds the model).
    With `config.distill`, `teacher` (a model with the same vocabulary; frozen and moved to the
    training device in place) replaces loading `config.teacher` or the model's source.
    """
    config = config or FinetuneConfig()
    from welore.stream import is_streamed

    if is_streamed(model):
        raise WeloreError("Fine-tuning needs the whole model in memory, but this one reads its decoder blocks "
                          "from disk one at a time; load it without --max-memory (on a machine with room for it).")
    out = Path(out) if out is not None else None
    check_precision(config.precision, config.device)
    check_engine(config)
    check_output(out, config, overwrite, resume)
    distill = distillation(model, tokenizer, config, teacher)  # before anything slow is trained or written
    from accelerate.utils import gather_object, set_seed
    from transformers import get_cosine_schedule_with_warmup

    accelerator = _accelerator(config)
    world = accelerator.num_processes
    model_print = model_fingerprint(model) if out is not None else {}
    set_seed(config.seed)
    model = prepare_model(model, config)  # mode checks; LoRA wraps the model here
    model.to(accelerator.device)  # before the optimizer is built and the model first evaluated
    if distill is not None:
        distill.teacher.to(accelerator.device)
    if blocks is None:
        if tokenizer is not None:  # recorded as used
            config = replace(config, bos=resolve_bos(tokenizer, config.bos))
        blocks = make_blocks(tokenizer, config.data, config.seq_len, config.max_train_tokens, config.val_tokens,
                             config.val_fraction, bos=config.bos)
    run_dir = checkpoints_dir(out) if out is not None else None
    teacher_print = model_fingerprint(distill.teacher) if distill is not None and out is not None else None
    sharded = fsdp_requested() and world > 1
    identity = run_identity(config, model_print, blocks.fingerprint(), processes=world, teacher_print=teacher_print,
                            engine="fsdp" if sharded else "ddp")
    checkpoint = check_resumable(run_dir, identity) if resume else None
    trainable = mark_trainable_(model, config)
    skeleton = shard_(model) if sharded else None  # before the optimizer: it holds the shards
    optimizer = build_optimizer(model, trainable.matrices, trainable.names, config)
    raw_optimizer = optimizer
    # An AcceleratedScheduler steps once per process at every optimizer step: hence `* world`.
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps * world, config.steps * world)
    per_step = config.batch_size * config.grad_accum * world  # blocks per optimizer step, all processes
    state = TrainingState()
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, trainable.names, optimizer, scheduler,
                                rank=accelerator.process_index, sharded=sharded)
    else:
        state.history.append({"step": 0, "val_ppl": _evaluate(model, blocks.val, config.batch_size)})
        if run_dir is not None and config.save_every and accelerator.is_main_process:
            start_run(run_dir, identity)
        accelerator.wait_for_everyone()
    stream = BlockStream(blocks.train, config.seed, start=state.items, stop=config.steps * per_step)
    # Its own generator: a DataLoader iterator otherwise draws a seed from torch's global RNG
    # when it starts, which a resumed run would do at another point of the RNG stream.
    loader = DataLoader(stream, batch_size=config.batch_size, shuffle=False, generator=torch.Generator())
    if sharded:  # the model is FSDP's already; prepare would wrap it in DDP as well
        optimizer, loader, scheduler = accelerator.prepare(optimizer, loader, scheduler)
    else:
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    resumed_from = state.step if checkpoint is not None else None
    start_step = state.step

    trainable_params = [p for p in model.parameters() if p.requires_grad]
    micro_losses: list[torch.Tensor] = []
    seconds = 0.0
    model.train()
    bar = tqdm(total=config.steps, initial=state.step, desc=f"fine-tuning ({config.mode}, {config.optimizer})",
               unit="step", disable=not progress or not accelerator.is_local_main_process)
    try:
        with PeakMemory(accelerator.device) as memory:
            tick = time.perf_counter()
            for batch in loader:  # (B, T)
                with accelerator.accumulate(model):
                    if distill is None:
                        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                    else:
                        loss = distill.loss(model, batch, accelerator.autocast)
                    accelerator.backward(loss)
                    micro_losses.append(loss.detach())
                    if accelerator.sync_gradients:
                        accelerator.unscale_gradients()  # fp16 only; a no-op otherwise
                        if on_gradients is not None:
                            on_gradients(state.step + 1, accelerator.unwrap_model(model))
                        if config.max_grad_norm is not None:
                            _clip(accelerator, trainable_params, config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                state.step += 1
                state.items += per_step
                loss = accelerator.reduce(torch.stack(micro_losses).float().mean(), reduction="mean")
                state.losses.append(loss.item())  # the mean over all processes' blocks of the step
                micro_losses = []
                bar.update(1)
                bar.set_postfix(loss=f"{state.losses[-1]:.3f}")
                seconds += time.perf_counter() - tick
                if config.eval_every and state.step % config.eval_every == 0 and state.step < config.steps:
                    ppl = _evaluate(accelerator.unwrap_model(model), blocks.val, config.batch_size)
                    state.history.append({"step": state.step, "val_ppl": ppl})
                    log.info("step %d: validation perplexity %.3f", state.step, ppl)
                    model.train()
                if config.save_every and state.step % config.save_every == 0 and state.step < config.steps:
                    rng_states = gather_object([rng_state()])  # every process's, process 0 first
                    params, optimizer_state = trainable_state(accelerator.unwrap_model(model), raw_optimizer,
                                                              trainable.names, sharded)
                    if accelerator.is_main_process:
                        save_checkpoint(run_dir, state, params, optimizer_state, scheduler, rng_states)
                    accelerator.wait_for_everyone()
                tick = time.perf_counter()
    finally:
        bar.close()
    process_peaks = gather_object([memory.total_peak_bytes])
    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    accelerator.free_memory()
    if sharded:
        model = unshard(model, skeleton)  # an ordinary model again, in every process
    model = finish_model(model)
    model.eval()
    if config.mode == "lora" and not config.keep_adapter:
        model = model.merge_and_unload()
    state.history.append({"step": state.step, "val_ppl": _evaluate(model, blocks.val, config.batch_size)})
    run_steps = state.step - start_step
    result = FinetuneResult(
        model=model, config=config, trainable_params=trainable.trainable_params,
        total_params=trainable.total_params, trainable_names=trainable.names, steps=state.step,
        train_tokens=state.items * config.seq_len, epochs=state.items / len(blocks.train),
        val_ppl_before=state.history[0]["val_ppl"], val_ppl_after=state.history[-1]["val_ppl"],
        history=state.history, losses=state.losses,
        train_seconds=seconds, tokens_per_s=run_steps * per_step * config.seq_len / seconds if seconds else None,
        peak_memory_bytes=memory.peak_bytes, total_peak_memory_bytes=memory.total_peak_bytes,
        processes=world, process_peak_memory_bytes=process_peaks, resumed_from=resumed_from,
    )
    log.info("fine-tuning done: %s", result.summary().replace("\n", "; "))
    if out is not None:
        if accelerator.is_main_process:
            save_finetuned(result, out, tokenizer=tokenizer, overwrite=overwrite, source=source,
                           data=blocks.description)
            if run_dir is not None and run_dir.exists():
                shutil.rmtree(run_dir)  # the run is finished; its checkpoints are superseded by `out`
        accelerator.wait_for_everyone()
        result.out = out
    return result


def _clip(accelerator, params: list[nn.Parameter], max_norm: float) -> None:
    """Clip the global gradient norm; gradients are already unscaled (fp16) at this point."""
    if accelerator.mixed_precision == "fp16":  # accelerate's clip would unscale a second time
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        accelerator.clip_grad_norm_(params, max_norm)


def dense_plan(model: nn.Module):
    """A rank plan that keeps every target matrix dense (how a dense fine-tuned model is saved)."""
    from welore.plan import RankPlan
    from welore.targets import find_targets, matrix_shape

    targets = find_targets(model)
    return RankPlan(ranks={n: None for n in targets}, shapes={n: matrix_shape(m) for n, m in targets.items()},
                    method="dense")


def save_finetuned(result: FinetuneResult, out: str | Path, tokenizer=None, overwrite: bool = False,
                   source: str | None = None, data: str | None = None) -> Path:
    """Save the fine-tuned model as a welore checkpoint (with `finetune.json`, and `adapter/` for
    a kept LoRA adapter); `welore.load(out)` gives back the same logits."""
    from welore.checkpoint import save

    model = result.model
    peft_model = model if callable(getattr(model, "get_base_model", None)) else None
    # A kept adapter is saved by peft; the checkpoint holds the base model without it (a copy
    # with the adapter layers taken out, so the model in `result` keeps its adapter).
    base = copy.deepcopy(peft_model).unload() if peft_model is not None else model
    dense = getattr(base, "welore_plan", None) is None
    if dense:
        base.welore_plan = dense_plan(base)
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            # save() writes atomically too: it replaces the (empty) temporary folder with the checkpoint.
            save(base, tmp, tokenizer=tokenizer, overwrite=True, source=source)
            if peft_model is not None:
                peft_model.save_pretrained(tmp / "adapter")
            provenance = {"format": FINETUNE_FORMAT, "version": FINETUNE_VERSION, "welore_version": __version__,
                          "source": source, "data": data, "adapter": "adapter" if peft_model is not None else None,
                          "result": result.to_dict() | {"out": str(out)}}
            write_json(tmp / "finetune.json", provenance)
    finally:
        if dense:
            del base.welore_plan
    log.info("saved fine-tuned checkpoint to %s", out)
    return Path(out)


def load_finetuned(path: str | Path) -> nn.Module:
    """A checkpoint written by `finetune`: `welore.load`, plus its LoRA adapter if it kept one."""
    from welore.checkpoint import load

    path = Path(path)
    model = load(path)
    if (path / "adapter" / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path / "adapter")
        model.eval()
    return model
