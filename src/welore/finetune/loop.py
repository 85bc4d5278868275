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

With `config.distill.enabled` the loss of each micro-batch is `Distillation.loss` (`welore.finetune.distill`):
the KL from a frozen teacher's next-token distribution, computed on the fly in every process
(the teacher is not wrapped by DDP: it has no gradients to reduce), optionally mixed with the
LM loss. The teacher is loaded again by a resumed run; its fingerprint is part of the run's identity.

`finetune` reads as the outline: the checks and `setup` (`welore.finetune.setup`), the steps
(`train`: `_micro_step`, then `_record_step`, `_validate_every`, `_checkpoint_every`), `finish`
(the trained model as an ordinary module and the run's figures) and `save_result` (`welore.finetune.saving`).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from welore.eval.evaluate import PeakMemory
from welore.finetune.config import FinetuneConfig, FinetuneResult
from welore.finetune.data import TokenBlocks
from welore.finetune.distill import Distillation
from welore.finetune.saving import save_finetuned
from welore.finetune.setup import Run, check_run, distillation, setup, validate
from welore.finetune.sharding import unshard
from welore.finetune.state import rng_state, save_checkpoint, trainable_state
from welore.finetune.trainable import finish_model

if TYPE_CHECKING:
    from welore.recipe import Record

log = logging.getLogger(__name__)

GradientHook = Callable[[int, nn.Module], None]


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
    record: Record | None = None,
) -> FinetuneResult:
    """Fine-tune `model` as `config` says; save it to `out` (a welore checkpoint) if given.

    `blocks` (pre-tokenized training/validation blocks) replaces tokenizing `config.data`.
    `on_gradients(step, model)` is called once per optimizer step (1-based) when the whole
    accumulated, unscaled gradients are in `.grad`, before clipping and the optimizer step.
    With `config.save_every`, resumable checkpoints go to `OUT.checkpoints/`; `resume=True`
    continues the unfinished run there and ends exactly where an uninterrupted run would.
    The model is trained in place, except that LoRA wraps it (the result holds the model).
    With `config.distill.enabled`, `teacher` (a model with the same vocabulary; frozen and moved
    to the training device in place) replaces loading `config.distill.teacher` or the model's source.
    `record`: the model's record when it is a welore checkpoint (`welore.load_checkpoint`): it
    names the source model distillation defaults to, and the saved checkpoint keeps its recipe.
    """
    config = config or FinetuneConfig()
    out = Path(out) if out is not None else None
    check_run(model, config, out, overwrite, resume)
    distill = distillation(model, tokenizer, config, teacher,  # before anything slow is trained or written
                           record.source if record is not None else None)
    run = setup(model, tokenizer, config, blocks, out, resume, distill)
    seconds, memory = train(run, on_gradients, progress)
    result = finish(run, seconds, memory)
    log.info("fine-tuning done: %s", result.summary().replace("\n", "; "))
    if out is not None:
        save_result(run, result, out, tokenizer=tokenizer, overwrite=overwrite, source=source, record=record)
    return result


# --- the steps -------------------------------------------------------------------------------------


def train(run: Run, on_gradients: GradientHook | None, progress: bool) -> tuple[float, PeakMemory]:
    """The optimizer steps from `run.state.step` to the last; returns the seconds they took
    (without validation and checkpoints) and the memory they used."""
    config, accelerator = run.config, run.accelerator
    params = [p for p in run.model.parameters() if p.requires_grad]
    micro_losses: list[torch.Tensor] = []
    seconds = 0.0
    run.model.train()
    bar = tqdm(total=config.steps, initial=run.state.step, desc=f"fine-tuning ({config.mode}, {config.optimizer})",
               unit="step", disable=not progress or not accelerator.is_local_main_process)
    try:
        with PeakMemory(accelerator.device) as memory:
            tick = time.perf_counter()
            for batch in run.loader:  # (B, T)
                micro_losses.append(_micro_step(run, batch, params, on_gradients))
                if not accelerator.sync_gradients:
                    continue
                _record_step(run, micro_losses, bar)
                micro_losses = []
                seconds += time.perf_counter() - tick
                _validate_every(run)
                _checkpoint_every(run)
                tick = time.perf_counter()
    finally:
        bar.close()
    return seconds, memory


def _micro_step(run: Run, batch: torch.Tensor, params: list[nn.Parameter],
                on_gradients: GradientHook | None) -> torch.Tensor:
    """Forward and backward of one micro-batch (B, T); after a step's last micro-batch, the
    gradients are whole: unscale -> `on_gradients` -> clip -> optimizer and scheduler step (on
    the other micro-batches, accelerate's `accumulate` makes those steps no-ops)."""
    accelerator, model = run.accelerator, run.model
    with accelerator.accumulate(model):
        loss = _loss(model, batch, run.distill, accelerator)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.unscale_gradients()  # fp16 only; a no-op otherwise
            if on_gradients is not None:
                on_gradients(run.state.step + 1, accelerator.unwrap_model(model))
            if run.config.max_grad_norm is not None:
                _clip(accelerator, params, run.config.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _loss(model: nn.Module, batch: torch.Tensor, distill: Distillation | None, accelerator) -> torch.Tensor:
    """The LM loss of the micro-batch, or the distillation loss."""
    if distill is None:
        return model(input_ids=batch, labels=batch, use_cache=False).loss
    return distill.loss(model, batch, accelerator.autocast)


def _clip(accelerator, params: list[nn.Parameter], max_norm: float) -> None:
    """Clip the global gradient norm; gradients are already unscaled (fp16) at this point."""
    if accelerator.mixed_precision == "fp16":  # accelerate's clip would unscale a second time
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        accelerator.clip_grad_norm_(params, max_norm)


def _record_step(run: Run, micro_losses: list[torch.Tensor], bar: tqdm) -> None:
    """Count the optimizer step and record its loss: the mean over all processes' blocks of the step."""
    state = run.state
    state.step += 1
    state.items += run.per_step
    loss = run.accelerator.reduce(torch.stack(micro_losses).float().mean(), reduction="mean")
    state.losses.append(loss.item())
    bar.update(1)
    bar.set_postfix(loss=f"{state.losses[-1]:.3f}")


def _due(step: int, every: int, steps: int) -> bool:
    """Whether something done every `every` steps (0 = never) is due after `step`, before the last."""
    return bool(every) and step % every == 0 and step < steps


# --- evaluation and checkpoints during training ---------------------------------------------------


def _validate_every(run: Run) -> None:
    """Validation perplexity every `eval_every` steps (before and after: `setup`, `finish`)."""
    config, state = run.config, run.state
    if not _due(state.step, config.eval_every, config.steps):
        return
    ppl = validate(run.accelerator.unwrap_model(run.model), run.blocks.val, config.batch_size)
    state.history.append({"step": state.step, "val_ppl": ppl})
    log.info("step %d: validation perplexity %.3f", state.step, ppl)
    run.model.train()


def _checkpoint_every(run: Run) -> None:
    """A resumable checkpoint every `save_every` steps: every process takes part, the main one writes."""
    from accelerate.utils import gather_object

    config, accelerator = run.config, run.accelerator
    if not _due(run.state.step, config.save_every, config.steps):
        return
    rng_states = gather_object([rng_state()])  # every process's, process 0 first
    params, optimizer_state = trainable_state(accelerator.unwrap_model(run.model), run.raw_optimizer,
                                              run.trainable.names, run.sharded)
    if accelerator.is_main_process:
        save_checkpoint(run.run_dir, run.state, params, optimizer_state, run.scheduler, rng_states)
    accelerator.wait_for_everyone()


# --- after the last step ---------------------------------------------------------------------------


def finish(run: Run, seconds: float, memory: PeakMemory) -> FinetuneResult:
    """The trained model as an ordinary module (unwrapped, gathered from its shards, a LoRA adapter
    merged unless kept), its validation perplexity after the last step, and the run's figures."""
    from accelerate.utils import gather_object

    accelerator, config, state = run.accelerator, run.config, run.state
    process_peaks = gather_object([memory.total_peak_bytes])
    model = accelerator.unwrap_model(run.model, keep_fp32_wrapper=False)
    run.model = model  # the run lets go of DDP's wrapper (and its gradient buckets)
    accelerator.free_memory()
    if run.sharded:
        model = unshard(model, run.skeleton)  # an ordinary model again, in every process
    model = finish_model(model)
    model.eval()
    if config.mode == "lora" and not config.lora.keep_adapter:
        model = model.merge_and_unload()
    state.history.append({"step": state.step, "val_ppl": validate(model, run.blocks.val, config.batch_size)})
    run_steps = state.step - (run.resumed_from or 0)
    trainable = run.trainable
    return FinetuneResult(
        model=model, config=config, trainable_params=trainable.trainable_params,
        total_params=trainable.total_params, trainable_names=trainable.names, steps=state.step,
        train_tokens=state.items * config.seq_len, epochs=state.items / len(run.blocks.train),
        val_ppl_before=state.history[0]["val_ppl"], val_ppl_after=state.history[-1]["val_ppl"],
        history=state.history, losses=state.losses,
        train_seconds=seconds, tokens_per_s=run_steps * run.per_step * config.seq_len / seconds if seconds else None,
        peak_memory_bytes=memory.peak_bytes, total_peak_memory_bytes=memory.total_peak_bytes,
        processes=accelerator.num_processes, process_peak_memory_bytes=process_peaks, resumed_from=run.resumed_from,
    )


def save_result(run: Run, result: FinetuneResult, out: Path, tokenizer=None, overwrite: bool = False,
                source: str | None = None, record: Record | None = None) -> None:
    """The main process saves the checkpoint to `out` (`save_finetuned`) and removes the run's
    checkpoints, which it supersedes; the others wait."""
    if run.accelerator.is_main_process:
        save_finetuned(result, out, tokenizer=tokenizer, overwrite=overwrite, source=source,
                       data=run.blocks.description, record=record)
        if run.run_dir is not None and run.run_dir.exists():
            shutil.rmtree(run.run_dir)  # the run is finished; its checkpoints are superseded by `out`
    run.accelerator.wait_for_everyone()
    result.out = out
