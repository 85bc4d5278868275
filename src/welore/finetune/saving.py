"""The fine-tuned checkpoint: `save_finetuned` writes a welore checkpoint with its fine-tuning
record (`finetune.json`) and, for a kept LoRA adapter, peft's `adapter/`; `load_finetuned` reads
it back with the adapter."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from welore import __version__
from welore._io import atomic_dir, write_json
from welore.finetune.config import FinetuneResult

if TYPE_CHECKING:
    from welore.recipe import Record

log = logging.getLogger(__name__)

FINETUNE_FORMAT = "welore-finetune"
FINETUNE_VERSION = 1


def save_finetuned(result: FinetuneResult, out: str | Path, tokenizer=None, overwrite: bool = False,
                   source: str | None = None, data: str | None = None, record: Record | None = None) -> Path:
    """Save the fine-tuned model as a welore checkpoint (with `finetune.json`, and `adapter/` for
    a kept LoRA adapter); `welore.load(out)` gives back the same logits. `record`: the record of
    the compressed model it started from (its recipe carries over; fine-tuning changes no plan);
    without one the plans are read off the model's modules (a dense model: every target dense)."""
    from welore.io.checkpoint import save
    from welore.recipe import Record, model_plans

    model = result.model
    peft_model = model if callable(getattr(model, "get_base_model", None)) else None
    # A kept adapter is saved by peft; the checkpoint holds the base model without it (a copy
    # with the adapter layers taken out, so the model in `result` keeps its adapter).
    base = copy.deepcopy(peft_model).unload() if peft_model is not None else model
    if record is None:
        plan, quant_plan = model_plans(base)
        record = Record(plan=plan, quant_plan=quant_plan)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        # save() writes atomically too: it replaces the (empty) temporary folder with the checkpoint.
        save(base, tmp, tokenizer=tokenizer, overwrite=True, source=source, record=record)
        if peft_model is not None:
            peft_model.save_pretrained(tmp / "adapter")
        provenance = {"format": FINETUNE_FORMAT, "version": FINETUNE_VERSION, "welore_version": __version__,
                      "source": source, "data": data, "adapter": "adapter" if peft_model is not None else None,
                      "result": result.to_dict() | {"out": str(out)}}
        write_json(tmp / "finetune.json", provenance)
    log.info("saved fine-tuned checkpoint to %s", out)
    return Path(out)


def load_finetuned(path: str | Path) -> nn.Module:
    """A checkpoint written by `finetune`: `welore.load`, plus its LoRA adapter if it kept one."""
    from welore.io.checkpoint import load

    path = Path(path)
    model = load(path)
    if (path / "adapter" / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path / "adapter")
        model.eval()
    return model
