"""Low-rank gradient optimizers: GaLore (Zhao et al., 2024) and Fira (Chen et al., 2024).

Both are `torch.optim.Optimizer`s taking galore-torch's parameter-group keys:

    from welore.optim import GaLoreAdamW
    optimizer = GaLoreAdamW(
        [{"params": matrices, "rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
         {"params": others}],                      # no `rank`: plain AdamW
        lr=1e-3, weight_decay=0.0,
    )

`FiraAdamW` takes the same groups plus `limiter` (γ, default 1.01) and accepts `alpha` as
another name for `scale`.
"""

from welore.optim.fira import FiraAdamW
from welore.optim.galore import GaLoreAdamW, OptimizerConfigError
from welore.optim.projection import REFRESH_METHODS, ProjSide, ProjType

__all__ = ["REFRESH_METHODS", "FiraAdamW", "GaLoreAdamW", "OptimizerConfigError", "ProjSide", "ProjType"]
