"""Save and reload compressed models; export them as ordinary dense transformers folders.

A welore checkpoint is a folder:

    config.json             the model's transformers config (unchanged by compression)
    welore.json             format name and version, the CompressConfig, the source model,
                            and which state-dict names alias one stored tensor (tied weights)
    rank_plan.json          the rank plan (module name -> shape, kept rank or null = dense)
    model.safetensors       the weights, low-rank factors included; no pickle anywhere
    tokenizer files         when the source model had a tokenizer

`load` never recomputes an SVD: it builds the model from its config with empty (meta)
parameters, swaps in empty `LowRankLinear` modules from the plan, then assigns the stored
tensors (`load_state_dict(..., assign=True)`), checking that names and shapes match exactly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from welore import __version__
from welore._io import atomic_dir, check_output_dir
from welore.compress import CompressConfig, apply_plan_
from welore.errors import WeloreError
from welore.modules import LowRankLinear
from welore.plan import RankPlan

log = logging.getLogger(__name__)

FORMAT = "welore-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "welore.json").is_file()


def _dedup_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each shared tensor stored once, and alias name -> stored name."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors, aliases


def save(
    model: PreTrainedModel,
    out: str | Path,
    tokenizer=None,
    overwrite: bool = False,
    source: str | None = None,
) -> Path:
    """Write a compressed model (one returned by `compress_` or `load`) to folder `out`."""
    plan: RankPlan | None = getattr(model, "welore_plan", None)
    if plan is None:
        raise WeloreError("This model was not compressed by welore (it has no rank plan); compress it first or use save_pretrained.")
    config: CompressConfig = getattr(model, "welore_config", CompressConfig(method="plan"))
    tensors, aliases = _dedup_state_dict(model)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "welore_version": __version__,
        "source": source or getattr(model, "welore_source", None),
        "compress_config": config.to_dict(),
        "aliases": aliases,
        "achieved_ratio": plan.achieved_ratio,
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        plan.save(tmp / "rank_plan.json")
        (tmp / "welore.json").write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    log.info("saved welore checkpoint to %s", out)
    return Path(out)


def _read_meta(path: Path) -> dict:
    if not path.is_dir():
        raise WeloreError(f"{path} is not a folder; pass a folder written by `welore compress`.")
    if not is_checkpoint(path):
        raise WeloreError(f"{path} is not a welore checkpoint (no welore.json); pass a folder written by `welore compress`.")
    try:
        meta = json.loads((path / "welore.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeloreError(f"{path / 'welore.json'} is unreadable ({err}); re-create the checkpoint.") from None
    if meta.get("format") != FORMAT:
        raise WeloreError(f"{path / 'welore.json'} does not describe a welore checkpoint; re-create the checkpoint.")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise WeloreError(f"{path} has checkpoint format {meta['format_version']}, newer than this welore reads ({FORMAT_VERSION}); upgrade welore.")
    return meta


def _empty_model(path: Path) -> PreTrainedModel:
    """The model's architecture from its config, parameters on the meta device, buffers real."""
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise WeloreError(f"Cannot read the model config in {path} ({err}); re-create the checkpoint.") from None
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)


def load(path: str | Path, device: str | torch.device | None = None) -> PreTrainedModel:
    """Rebuild a saved compressed model; its logits equal those of the model that was saved."""
    path = Path(path)
    meta = _read_meta(path)
    plan = RankPlan.load(path / "rank_plan.json")
    model = _empty_model(path)
    apply_plan_(model, plan, empty=True)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise WeloreError(f"{path} has no {WEIGHTS}; the checkpoint is incomplete, re-create it.")
    try:
        tensors = load_file(weights, device=str(device) if device is not None else "cpu")
    except (SafetensorError, OSError) as err:
        raise WeloreError(f"Cannot read {weights} ({err}); the file is damaged, re-create the checkpoint.") from None
    for alias, stored in meta.get("aliases", {}).items():
        if stored in tensors:
            tensors[alias] = tensors[stored]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(n for n in set(expected) & set(tensors) if expected[n].shape != tensors[n].shape)
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise WeloreError(
            f"The weights in {weights} do not match the rank plan ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(wrong)} mis-shaped, e.g. {first}); re-create the checkpoint."
        )
    model.load_state_dict(tensors, assign=True)
    model.tie_weights()
    model.eval()
    model.welore_plan = plan
    model.welore_config = CompressConfig.from_dict(meta.get("compress_config", {}))
    model.welore_source = meta.get("source")
    return model


def densify_(model: PreTrainedModel) -> list[str]:
    """Multiply every `LowRankLinear` back into the dense layer type the architecture uses."""
    skeleton = _skeleton_types(model)
    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, LowRankLinear):
            continue
        weight = module.dense_weight().detach()  # (out, in)
        bias = module.up.bias
        if skeleton.get(name) is Conv1D:
            dense: nn.Module = Conv1D(module.out_features, module.in_features)
            dense.weight = nn.Parameter(weight.t().contiguous())  # Conv1D stores (in, out)
        else:
            dense = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
            dense.weight = nn.Parameter(weight)
        if bias is not None:
            dense.bias = nn.Parameter(bias.detach().clone())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, dense)
        replaced.append(name)
    return replaced


def _skeleton_types(model: PreTrainedModel) -> dict[str, type]:
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(model.config)
    return {name: type(module) for name, module in skeleton.named_modules()}


def export_dense(path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write checkpoint `path` as a plain transformers folder that `from_pretrained` loads."""
    check_output_dir(out, overwrite)
    model = load(path)
    densify_(model)
    for attr in ("welore_plan", "welore_config", "welore_source"):
        delattr(model, attr)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                     "merges.txt", "tokenizer.model", "chat_template.jinja", "added_tokens.json"):
            if (Path(path) / name).is_file():
                (tmp / name).write_bytes((Path(path) / name).read_bytes())
    return Path(out)
