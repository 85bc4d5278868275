"""Fine-tuning: WeLore's LRC fine-tuning, LoRA (peft) and full fine-tuning, with AdamW, GaLore or Fira.

    import welore
    model = welore.load("out/smollm2-welore")                 # a compressed checkpoint
    result = welore.finetune(model, tokenizer, welore.FinetuneConfig(mode="lrc", steps=100),
                             out="out/smollm2-welore-lrc")
    print(result.summary())                                   # trainable share, val ppl before/after

Modules: `config` (FinetuneConfig and its groups of options, FinetuneResult), `trainable` (modes;
`mark_trainable_` decides what trains), `optimizers` (registry), `data` (blocks, resumable order),
`distill` (the distillation loss and teacher), `state` (resumable checkpoints), `sharding` (FSDP),
`setup` (checks, and everything before the first step), `loop` (`finetune`, the steps), `saving`
(the fine-tuned checkpoint).
"""

from welore.finetune.config import (
    DistillOptions,
    FinetuneConfig,
    FinetuneResult,
    GaLoreOptions,
    LoraOptions,
    LrcOptions,
)
from welore.finetune.data import TokenBlocks, make_blocks
from welore.finetune.loop import finetune
from welore.finetune.optimizers import OPTIMIZERS
from welore.finetune.saving import load_finetuned, save_finetuned
from welore.finetune.trainable import MODES, Trainable, mark_trainable_

__all__ = [
    "MODES", "OPTIMIZERS", "DistillOptions", "FinetuneConfig", "FinetuneResult", "GaLoreOptions", "LoraOptions",
    "LrcOptions", "TokenBlocks", "Trainable", "finetune", "load_finetuned", "make_blocks", "mark_trainable_",
    "save_finetuned",
]
