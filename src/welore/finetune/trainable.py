"""What trains in each fine-tuning mode, decided in ONE place: `mark_trainable_`.

Modes are small strategy objects in a registry (`MODES`): `prepare` checks the model (and,
for LoRA, wraps it with peft adapters) and `selects` names the parameters that train.
`mark_trainable_` is the only function that sets `requires_grad`; it returns a `Trainable`
report (names, counts, and which trainable tensors are 2-D weights of target matrices, the
rank group of GaLore/Fira).

- `lrc` (Jaiswal et al. 2024, "From GaLore to WeLore"): only the factors (`up`, `down`) of the
  low-rank components, i.e. the matrices whose rank the plan cut by at least `lrc.min_cut`.
  N-LRC matrices, embeddings, norms and the factors' biases stay frozen unless asked.
  On a quantized model (`welore.quant`) the low-rank components are also the compensation
  factors of the packed matrices (W ≈ Q(W) + up·down): they train with the packed codes frozen,
  as QLoRA trains adapters on a frozen 4-bit model, but starting from the fitted correction
  (EoRA) instead of zero. A factor stored quantized itself (`--ratio` with `--quantize`) is
  frozen like any packed matrix; only its compensation, if it has one, trains. With
  `--train-scales` the packed matrices' per-group scales and offsets train too, their codes
  frozen (PEQA, Kim et al. 2023; EfficientQAT's end-to-end stage): a few parameters per group
  that move every weight of the group, which is what a 2- or 3-bit grid needs most.
- `lora` (Hu et al. 2021), through the `peft` library: adapters on the target matrices of a
  dense model, or on the `up`/`down` factors and remaining dense targets of a compressed one.
- `full`: every parameter.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from welore.errors import WeloreError
from welore.finetune.config import MODE_NAMES, FinetuneConfig
from welore.lowrank.module import LowRankLinear
from welore.lowrank.plan import RankPlan
from welore.modules import count_parameters
from welore.quant.module import QuantizedLinear, set_factor_dtype_, set_scales_trainable_
from welore.recipe import model_plans
from welore.targets import DENSE_TYPES, _matches, find_targets

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."  # what peft puts before the wrapped model's names


@dataclass
class Trainable:
    names: list[str]  # trainable parameter names, in model order
    matrices: list[str]  # those that are 2-D weights of target matrices (GaLore/Fira's rank group)
    trainable_params: int  # elements of the trainable parameters
    total_params: int  # unique parameters of the whole model (tied weights once, adapters included)

    def summary(self) -> str:
        share = self.trainable_params / self.total_params if self.total_params else 0.0
        return (f"trainable parameters: {self.trainable_params:,} of {self.total_params:,} ({share:.2%}) "
                f"in {len(self.names)} tensors")


@dataclass(frozen=True)
class Mode:
    prepare: Callable[[nn.Module, FinetuneConfig], nn.Module]  # check the model, wrap it if needed
    selects: Callable[[nn.Module, FinetuneConfig], set[str]]  # names of the parameters that train


def _compressed_plan(model: nn.Module) -> RankPlan | None:
    """The rank plan a compressed model's modules carry out (`welore.recipe.model_plans`),
    None for a model with no low-rank or quantized layers."""
    plan, _ = model_plans(model)
    return None if plan.method == "dense" else plan


def target_names(model: nn.Module) -> list[str]:
    """The target matrices: a compressed model's factorized, quantized and kept-dense block
    matrices, else the decoder blocks' Linears."""
    plan = _compressed_plan(model)
    return list(plan.ranks) if plan is not None else list(find_targets(model))


def _base(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _plan(model: nn.Module) -> RankPlan:
    plan = _compressed_plan(model)
    if plan is None:
        raise WeloreError("LRC fine-tuning trains the low-rank factors of a compressed model, and this model is "
                          "not compressed; compress it first with welore compress (or use --mode lora or full).")
    return plan


def _compensated(model: nn.Module, name: str) -> bool:
    """Whether target matrix `name` is, or has a factor that is, quantized with compensation factors."""
    module = model.get_submodule(name)
    parts = [module.up, module.down] if isinstance(module, LowRankLinear) else [module]
    return any(isinstance(m, QuantizedLinear) and m.rank for m in parts)


def _scales_train(model: nn.Module, name: str) -> bool:
    """Whether target matrix `name` is, or has a factor that is, packed with trainable scales."""
    module = model.get_submodule(name)
    parts = [module.up, module.down] if isinstance(module, LowRankLinear) else [module]
    return any(isinstance(m, QuantizedLinear) and m.scales_train for m in parts)


def lrc_names(model: nn.Module, min_cut: float) -> list[str]:
    """The LRC matrices at `min_cut` (and the quantized ones with compensation factors),
    checked to exist with something to train (a clear error otherwise)."""
    plan = _plan(model)
    lrc = plan.lrc(min_cut)
    quantized = any(isinstance(m, QuantizedLinear) for m in model.modules())
    if quantized:
        lrc = [n for n in plan.ranks if n in lrc or _compensated(model, n) or _scales_train(model, n)]
        lrc = [n for n in lrc if _matrix_weights(model, n)]
        if not lrc:
            raise WeloreError("This quantized model has no compensation factors (and no unquantized low-rank "
                              "factors), so LRC fine-tuning has nothing to train; quantize it with --compensate-rank R "
                              "(e.g. 16), or add --train-scales.")
    if not lrc:
        largest = max(1 - plan.kept_fraction(n) for n in plan.ranks)
        raise WeloreError(f"No target matrix has its rank cut by at least {min_cut:.0%} (the largest cut is "
                          f"{largest:.0%}), so LRC fine-tuning has nothing to train; lower --lrc-min-cut.")
    return lrc


def _matrix_weights(model: nn.Module, name: str) -> set[str]:
    """Parameter names of a target matrix's trainable weights: both factors, or the dense
    weight; for a matrix (or factor) stored as packed codes, its compensation factors and, with
    `--train-scales`, its scales and offsets (the codes are frozen buffers)."""
    module = model.get_submodule(name)
    if isinstance(module, LowRankLinear):
        return _matrix_weights(model, f"{name}.up") | _matrix_weights(model, f"{name}.down")
    if isinstance(module, QuantizedLinear):
        return ({f"{name}.up", f"{name}.down"} if module.rank else set()) | (
            {f"{name}.scale", f"{name}.offset"} if module.scales_train else set())
    return {f"{name}.weight"}


def _norm_params(model: nn.Module) -> set[str]:
    """Parameters of normalisation layers (LayerNorm, RMSNorm and the like)."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("Norm"):
            names |= {f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False)}
    return names


def _prepare_lrc(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    lrc_names(model, config.lrc.min_cut)  # fail before any slow work
    return model


def _select_lrc(model: nn.Module, config: FinetuneConfig) -> set[str]:
    lrc = lrc_names(model, config.lrc.min_cut)
    names = set().union(*(_matrix_weights(model, n) for n in lrc))
    if config.lrc.train_nlrc:
        names |= set().union(set(), *(_matrix_weights(model, n) for n in _plan(model).ranks if n not in lrc))
    if config.lrc.train_norms:
        names |= _norm_params(model)
    return names


def lora_target_modules(model: nn.Module, patterns: list[str] | None = None) -> list[str]:
    """Names of the Linear/Conv1D modules that get adapters.

    Default: every target matrix; for a `LowRankLinear`, its `up` and `down` factors. With
    `patterns` (exact names, globs or `re:` regexes), every dense layer that matches one.
    """
    if patterns:
        dense = [n for n, m in model.named_modules() if isinstance(m, DENSE_TYPES)]
        for pattern in patterns:
            if not any(_matches(n, pattern) for n in dense):
                raise WeloreError(f"LoRA target pattern {pattern!r} matches no Linear layer of this model; "
                                  f"check the names (e.g. {dense[0] if dense else 'none found'!r}).")
        return [n for n in dense if any(_matches(n, p) for p in patterns)]
    modules = []
    for name in target_names(model):
        module = model.get_submodule(name)
        modules += [f"{name}.up", f"{name}.down"] if isinstance(module, LowRankLinear) else [name]
    return modules


def _prepare_lora(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    modules = lora_target_modules(model, config.lora.targets)
    packed = [n for n in modules if isinstance(model.get_submodule(n), QuantizedLinear)]
    if packed:
        raise WeloreError(f"LoRA adapters need Linear layers and {packed[0]} (with {len(packed) - 1} others) is "
                          "stored as packed quantized codes; use --mode lrc, which trains the quantized model's "
                          "compensation factors (quantize with --compensate-rank R), or pass --lora-targets for other "
                          "layers.")
    conv1d = [isinstance(model.get_submodule(n), Conv1D) for n in modules]
    lora = LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=modules, bias="none", fan_in_fan_out=all(conv1d))
    log.info("LoRA (r=%d, alpha=%g) on %d modules", config.lora.rank, config.lora.alpha, len(modules))
    with warnings.catch_warnings():  # peft calls a transformers property that transformers deprecates
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, lora)


def _select_lora(model: nn.Module, config: FinetuneConfig) -> set[str]:
    from peft.tuners.lora import LoraLayer

    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapters in ("lora_A", "lora_B"):
                names |= {f"{module_name}.{adapters}.{p}" for p, _ in getattr(module, adapters).named_parameters()}
    return names


def _select_all(model: nn.Module, config: FinetuneConfig) -> set[str]:
    return {n for n, _ in model.named_parameters()}


MODES: dict[str, Mode] = {
    "lrc": Mode(prepare=_prepare_lrc, selects=_select_lrc),
    "lora": Mode(prepare=_prepare_lora, selects=_select_lora),
    "full": Mode(prepare=lambda model, config: model, selects=_select_all),
}
assert tuple(MODES) == MODE_NAMES, "FinetuneConfig's modes (MODE_NAMES) and their strategies differ"


def prepare_model(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    """Check the model suits the mode (and wrap it with LoRA adapters); returns the model to train.

    Compensation factors of quantized matrices, stored in float16, are trained in float32
    (AdamW's steps underflow in float16), and so are their scales and offsets with --train-scales;
    `finish_model` casts them back for saving."""
    if config.train_scales:
        if config.mode == "lora":
            raise WeloreError("--train-scales trains the scales of packed quantized matrices, which LoRA leaves "
                              "alone; use it with --mode lrc (or full), or drop it.")
        if not set_scales_trainable_(_base(model), True):
            raise WeloreError("--train-scales trains the scales of packed quantized matrices and this model has "
                              "none; quantize it first (welore compress --quantize int3), or drop --train-scales.")
        log.info("training the scales and offsets of the packed matrices in float32, their codes frozen")
    model = MODES[config.mode].prepare(model, config)
    cast = set_factor_dtype_(model, torch.float32)
    if cast:
        log.info("training the compensation factors of %d quantized matrices in float32", len(cast))
    return model


def finish_model(model: nn.Module) -> nn.Module:
    """After training: compensation factors back in their storage dtype, so the model in memory
    computes what its saved checkpoint does."""
    set_factor_dtype_(model)
    set_scales_trainable_(model, False)
    return model


def mark_trainable_(model: nn.Module, config: FinetuneConfig) -> Trainable:
    """THE function that decides what trains: sets `requires_grad` on every parameter of `model`."""
    selected = MODES[config.mode].selects(model, config)
    params = dict(model.named_parameters())
    unknown = selected - set(params)
    assert not unknown, f"mode {config.mode} selected parameters the model does not have: {sorted(unknown)[:3]}"
    for name, param in params.items():
        param.requires_grad_(name in selected)
    names = [n for n in params if n in selected]
    targets = target_names(_base(model))
    prefix = PEFT_PREFIX if _base(model) is not model else ""

    def in_target(name: str) -> bool:
        module = name.removeprefix(prefix).rpartition(".")[0]
        return any(module == t or module.startswith(t + ".") for t in targets)

    matrices = [n for n in names if params[n].dim() == 2 and in_target(n)]
    trainable = Trainable(names=names, matrices=matrices, trainable_params=sum(params[n].numel() for n in names),
                          total_params=count_parameters(model))
    log.info("%s mode: %s", config.mode, trainable.summary())
    return trainable
