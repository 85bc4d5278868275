"""Module surgery shared by compression and fine-tuning: `swap_module` puts a module in place of
another by its qualified name, and `count_parameters` counts a model's unique parameters (tied
weights once; packed quantized codes as the weights they stand for)."""


from __future__ import annotations

from typing import Any

from torch import nn


def swap_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called `name` (e.g. "model.layers.0.mlp.up_proj") by `module`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters of `model`: tied weights (one Parameter, or one storage) counted once,
    and a matrix stored as packed quantized codes (`packed_parameters`) as its out·in weights."""
    seen: set[Any] = set()
    total = 0
    for param in model.parameters():  # already skips repeats of the same Parameter object
        if param.device.type == "meta":
            key: Any = id(param)
        else:
            key = (str(param.device), param.untyped_storage().data_ptr(), param.storage_offset(),
                   tuple(param.shape), param.stride())
        if key in seen:
            continue
        seen.add(key)
        total += param.numel()
    # Weights stored as buffers (packed quantized codes) count as the parameters they stand for.
    return total + sum(getattr(module, "packed_parameters", 0) for module in model.modules())
