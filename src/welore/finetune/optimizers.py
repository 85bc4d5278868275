"""Optimizers for fine-tuning, in a registry: name -> builder(matrices, others, config).

`matrices` are the trainable 2-D weights of target matrices, `others` every other trainable
parameter. AdamW treats both alike. GaLore and Fira (`welore.optim`) project the gradients of
`matrices` onto a rank-`galore.rank` subspace recomputed every `galore.gap` steps and run
plain AdamW on `others` (embeddings, norms, biases).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from welore.errors import WeloreError
from welore.finetune.config import OPTIMIZER_NAMES, FinetuneConfig
from welore.optim import FiraAdamW, GaLoreAdamW

Builder = Callable[[list[nn.Parameter], list[nn.Parameter], FinetuneConfig], torch.optim.Optimizer]


def _groups(matrices: list[nn.Parameter], others: list[nn.Parameter]) -> list[dict]:
    return [g for g in ({"params": matrices}, {"params": others}) if g["params"]]


def adamw(matrices: list[nn.Parameter], others: list[nn.Parameter], config: FinetuneConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(_groups(matrices, others), lr=config.lr, betas=config.betas,
                             weight_decay=config.weight_decay)


def _low_rank_groups(matrices: list[nn.Parameter], others: list[nn.Parameter], config: FinetuneConfig) -> list[dict]:
    if not matrices:
        raise WeloreError(f"{config.optimizer} projects the gradients of 2-D target matrices, and none of them "
                          "trains in this mode; use --optimizer adamw.")
    rank_group = {"params": matrices, "rank": config.galore.rank, "update_proj_gap": config.galore.gap,
                  "scale": config.galore.scale, "proj_type": "std"}
    return [rank_group] + ([{"params": others}] if others else [])


def _low_rank_optimizer(cls: type[torch.optim.Optimizer]) -> Builder:
    def build(
        matrices: list[nn.Parameter], others: list[nn.Parameter], config: FinetuneConfig
    ) -> torch.optim.Optimizer:
        return cls(_low_rank_groups(matrices, others, config), lr=config.lr, betas=config.betas,
                   weight_decay=config.weight_decay)

    build.__name__ = cls.__name__
    return build


OPTIMIZERS: dict[str, Builder] = {
    "adamw": adamw,
    "galore": _low_rank_optimizer(GaLoreAdamW),
    "fira": _low_rank_optimizer(FiraAdamW),
}
assert tuple(OPTIMIZERS) == OPTIMIZER_NAMES, "FinetuneConfig's optimizers (OPTIMIZER_NAMES) and their builders differ"


def build_optimizer(
    model: nn.Module, matrices: list[str], names: list[str], config: FinetuneConfig
) -> torch.optim.Optimizer:
    """The configured optimizer over the trainable parameters `names` (`matrices` among them)."""
    params = dict(model.named_parameters())
    rank = set(matrices)
    return OPTIMIZERS[config.optimizer]([params[n] for n in names if n in rank],
                                        [params[n] for n in names if n not in rank], config)
