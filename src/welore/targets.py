"""Which weight matrices welore works on, and how to read them as (out, in) matrices.

By default the *target matrices* are the `Linear` weights inside the decoder blocks (any
module that lives under an `nn.ModuleList`, which is how every Hugging Face causal LM stores
its blocks): attention q/k/v/o and MLP gate/up/down for LLaMA-style models, `c_attn`,
`c_proj`, `c_fc` for GPT-2 (`Conv1D`, whose weight is stored transposed). Embeddings and the
LM head are never default targets. Users can name targets explicitly with patterns: an exact
module name, a shell glob (`*.q_proj`), or a regular expression prefixed by `re:`.
"""

from __future__ import annotations

import fnmatch
import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from welore.errors import WeloreError

DENSE_TYPES = (nn.Linear, Conv1D)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as an (out_features, in_features) view; `Conv1D` stores (in, out)."""
    if isinstance(module, Conv1D):
        return module.weight.t()  # (in, out) -> (out, in)
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"not a dense layer: {type(module).__name__}")


def matrix_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a dense layer."""
    out_features, in_features = weight_matrix(module).shape
    return int(out_features), int(in_features)


def _inside_module_list(model: nn.Module) -> set[str]:
    """Names of all modules that have an `nn.ModuleList` among their ancestors."""
    names: set[str] = set()
    for list_name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            for child_name, _ in module.named_modules():
                if child_name:
                    names.add(f"{list_name}.{child_name}" if list_name else child_name)
    return names


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def find_targets(model: nn.Module, patterns: list[str] | None = None) -> dict[str, nn.Module]:
    """Map module name -> dense layer for every target matrix, in model order.

    With `patterns`, every `Linear`/`Conv1D` whose name matches one of them is a target (and a
    pattern that matches no dense layer is an error); without, the decoder blocks' dense layers.
    """
    from welore.lowrank.module import LowRankLinear

    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        raise WeloreError("This model is already compressed by welore; compress or analyze its dense original instead.")
    dense = _dense_layers(model)
    if patterns:
        for pattern in patterns:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as err:
                    raise WeloreError(f"Target pattern {pattern!r} is not a valid regular expression ({err}); "
                                      "fix the pattern.") from None
            if not any(_matches(name, pattern) for name in dense):
                raise WeloreError(
                    f"Target pattern {pattern!r} matches no Linear layer of this model; "
                    f"check the names (e.g. {next(iter(dense), 'none found')!r})."
                )
        targets = {n: m for n, m in dense.items() if any(_matches(n, p) for p in patterns)}
    else:
        in_blocks = _inside_module_list(model)
        targets = {n: m for n, m in dense.items() if n in in_blocks}
    if not targets:
        raise WeloreError(
            "Found no target matrices (Linear layers inside decoder blocks) in this model; "
            "name them with --targets patterns."
        )
    return targets


def _dense_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv1D outside the embeddings and the LM head, in model order."""
    excluded = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    return {name: module for name, module in model.named_modules()
            if isinstance(module, DENSE_TYPES) and id(module) not in excluded}


def kept_dense(model: nn.Module) -> dict[str, nn.Module]:
    """The decoder blocks' dense layers that are not a factor of a `LowRankLinear`: on a
    compressed model, the default targets its compression kept dense."""
    from welore.lowrank.module import LowRankLinear

    low_rank = {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    in_blocks = _inside_module_list(model)
    return {n: m for n, m in _dense_layers(model).items() if n in in_blocks and n.rpartition(".")[0] not in low_rank}


def layer_index(name: str) -> int | None:
    """The decoder block index in a module name (`model.layers.3.mlp.up_proj` -> 3)."""
    match = re.search(r"\.(\d+)\.", f".{name}.")
    return int(match.group(1)) if match else None


def matrix_type(name: str) -> str:
    """The module name without its block prefix (`model.layers.3.mlp.up_proj` -> `mlp.up_proj`)."""
    match = re.search(r"\.\d+\.(.+)$", name)
    return match.group(1) if match else name
