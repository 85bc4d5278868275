"""A recipe is data: the ordered stages welore applies to a model, one config dataclass each.

    recipe = Recipe([CompressConfig(ratio=0.2, method="welore", factorizer="whiten", calib="wiki"),
                     QuantConfig(bits=4, compensate_rank=16, calib="wiki")])
    report = welore.compress_(model, recipe, tokenizer=tokenizer)   # low rank, then the factors quantized
    welore.save(model, "out/ckpt", tokenizer=tokenizer, record=report.record)

Each stage type is registered in `STAGES` (name -> config class + handler, as torchao maps a
config type to its handler and llm-compressor runs a list of modifiers): `lowrank`
(`CompressConfig`, `welore.lowrank.compress.low_rank_`) and `quantize` (`QuantConfig`,
`welore.quant.quantize_`). A quantize stage after a low-rank one quantizes the two factors of
every factorized matrix and the matrices kept dense, W ≈ Q(up)·Q(down). Compensation and the
size allocation are part of the quantize stage, because `target_size` chooses every matrix's
width and compensation rank together and the alternating rounds interleave codes and factors.

A recipe is written as YAML or JSON (`Recipe.load`, `Recipe.save`):

    format: welore-recipe
    version: 1
    stages:
      - lowrank: {ratio: 0.2, method: welore, factorizer: whiten, calib: wiki}
      - quantize: {bits: 4, compensate_rank: 16, calib: wiki}

Each stage names its own calibration text; stages that name the same text, sizes and BOS
policy share one set of windows. `compress_` returns the report with the recipe *as it ran*
(calibration sizes and BOS policy resolved, `--method auto`'s choice made), which every
checkpoint records in `welore.json`; `welore.io.checkpoint.read_record` reads it back, so
`welore compress MODEL --recipe CKPT/welore.json` runs the same compression again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from welore.errors import WeloreError
from welore.lowrank.compress import AUTO, CompressConfig, LowRankReport, low_rank_
from welore.lowrank.module import LowRankLinear
from welore.lowrank.plan import RankPlan
from welore.lowrank.select import select_recipe
from welore.modules import count_parameters
from welore.quant import FACTOR_DTYPES, QuantConfig, QuantizedLinear, QuantPlan, QuantReport, quant_targets, quantize_
from welore.targets import find_targets, kept_dense, matrix_shape, weight_matrix
from welore.versioned import check_version, report_unknown

log = logging.getLogger(__name__)

RECIPE_FORMAT = "welore-recipe"
RECIPE_VERSION = 1


class StageConfig(Protocol):
    """What every stage config has: its target patterns, its calibration text and sizes (None
    without), what needs calibration, and a versioned dict form."""

    targets: list[str] | None
    calib: str | None
    calib_tokens: int | None
    calib_seq_len: int | None
    bos: str | None

    @property
    def needs_calibration(self) -> str | None: ...  # what cannot run without calibration text, None if nothing

    def to_dict(self) -> dict: ...


@dataclass(frozen=True)
class StageType:
    """One kind of stage: its config class and the handler that applies it to a model."""

    config: type
    run: Callable[[nn.Module, Any, _Context], tuple[Any, StageConfig]]  # (model, config, context) -> the stage's
        # report and its config as it ran


STAGES: dict[str, StageType] = {}


def stage_name(config: Any) -> str:
    """The registered name of a stage config's type (WeloreError for anything else)."""
    for name, stage in STAGES.items():
        if type(config) is stage.config:
            return name
    raise WeloreError(f"A recipe stage must be one of {', '.join(c.config.__name__ for c in STAGES.values())}, "
                      f"not {type(config).__name__}.")


@dataclass
class Recipe:
    """An ordered list of stage configs (at most one of each kind; low rank before quantization)."""

    stages: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [stage_name(s) for s in self.stages]
        if len(set(names)) != len(names):
            raise WeloreError(f"The recipe has more than one {next(n for n in names if names.count(n) > 1)} stage; "
                              "give each kind of stage once.")
        if names != sorted(names, key=list(STAGES).index):
            raise WeloreError("The recipe quantizes before it factorizes; put the lowrank stage first "
                              "(its factors are then quantized).")

    def stage(self, name: str) -> Any | None:
        """The stage config registered as `name`, None when the recipe has none."""
        return next((s for s in self.stages if stage_name(s) == name), None)

    def check(self) -> None:
        """Raise a user error for a stage that needs calibration text and names none (before
        any model is loaded)."""
        for config in self.stages:
            if (what := config.needs_calibration) is not None and config.calib is None:
                raise WeloreError(f"{what} needs calibration text; pass --calib (e.g. --calib wiki), or set calib "
                                  f"in the recipe's {stage_name(config)} stage.")

    def to_dict(self) -> dict:
        return {"format": RECIPE_FORMAT, "version": RECIPE_VERSION,
                "stages": [{stage_name(s): s.to_dict()} for s in self.stages]}

    @classmethod
    def from_dict(cls, data: Any, what: str = "The recipe") -> Recipe:
        check_version(data, "version", RECIPE_VERSION, what)
        if data.get("format", RECIPE_FORMAT) != RECIPE_FORMAT:
            raise WeloreError(f"{what} is a {data.get('format')!r} file, not a welore recipe; "
                              "pass a recipe (YAML or JSON) or a checkpoint's welore.json.")
        data = report_unknown(data, ("format", "version", "stages"), what)
        entries = data.get("stages")
        if not isinstance(entries, list) or not all(isinstance(e, dict) and len(e) == 1 for e in entries):
            raise WeloreError(f"{what} needs a list of stages, each one mapping, e.g. `- lowrank: {{ratio: 0.2}}`; "
                              "fix the file.")
        stages = []
        for entry in entries:
            (name, values), = entry.items()
            if name not in STAGES:
                raise WeloreError(f"{what} has a stage {name!r}; use one of {', '.join(STAGES)}.")
            values = dict(values or {})
            values.setdefault("version", 1)  # a hand-written recipe need not repeat the stage's format version
            stages.append(STAGES[name].config.from_dict(values, f"The {name} stage of {what.lower()}"))
        return cls(stages)

    def save(self, path: str | Path) -> None:
        """Write the recipe as YAML (.yaml/.yml) or JSON (anything else), atomically."""
        from welore._io import write_json, write_text

        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """A recipe from a YAML or JSON file (a checkpoint's: `welore.io.checkpoint.read_record`)."""
        path = Path(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise WeloreError(f"Cannot read the recipe {path} ({err}); check the path.") from None
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as err:  # yaml.YAMLError or json.JSONDecodeError
            raise WeloreError(f"{path} is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'} "
                              f"({str(err).splitlines()[0]}); fix the file.") from None
        return cls.from_dict(data, f"The recipe {path}")


@dataclass
class Record:
    """What compression did to a model: the plans that give its structure, the recipe that ran
    (calibration resolved) and the model it started from. `save` writes it beside the weights;
    `welore.io.checkpoint.load_checkpoint` reads it back."""

    plan: RankPlan  # every target matrix's rank (None = kept dense; all None without a lowrank stage)
    quant_plan: QuantPlan | None = None  # every quantized matrix's width, group and compensation rank
    recipe: Recipe = field(default_factory=Recipe)
    source: str | None = None  # the model the recipe was applied to

    @property
    def compress_config(self) -> CompressConfig | None:
        return self.recipe.stage("lowrank")

    @property
    def quant_config(self) -> QuantConfig | None:
        return self.recipe.stage("quantize")


def model_plans(model: nn.Module) -> tuple[RankPlan, QuantPlan | None]:
    """The plans a model's modules carry out, read off them: every `LowRankLinear`'s rank, every
    `QuantizedLinear`'s width, group and compensation rank, and the decoder blocks' other dense
    layers (`kept_dense`) as full-rank targets. The policy that chose them is not known from the modules
    (`method` "unrecorded"; "dense" for a model with neither)."""
    ranks, shapes, quantized = {}, {}, {}
    dense = kept_dense(model)
    low_rank = {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    for name, module in model.named_modules():  # in model order
        if isinstance(module, QuantizedLinear):
            quantized[name] = module
        if name in low_rank:
            ranks[name], shapes[name] = module.rank, (module.out_features, module.in_features)
        elif name in dense:
            ranks[name], shapes[name] = None, matrix_shape(module)
        elif isinstance(module, QuantizedLinear) and name.rpartition(".")[0] not in low_rank:  # quantized, full rank
            ranks[name], shapes[name] = None, (module.out_features, module.in_features)
    method = "unrecorded" if low_rank or quantized else "dense"
    plan = RankPlan(ranks=ranks, shapes=shapes, method=method)
    if not quantized:
        return plan, None
    dtypes = {m.factor_dtype for m in quantized.values()}
    factor_dtype = next(k for k, v in FACTOR_DTYPES.items() if v == dtypes.pop()) if len(dtypes) == 1 else "float16"
    quant_plan = QuantPlan(shapes={n: (m.out_features, m.in_features) for n, m in quantized.items()},
                           bits={n: m.bits for n, m in quantized.items()},
                           group_size={n: m.group_size for n, m in quantized.items()},
                           ranks={n: m.rank for n, m in quantized.items()}, factor_dtype=factor_dtype,
                           quantizer="unrecorded")
    return plan, quant_plan


@dataclass
class CompressReport:
    """What `compress_` did: the record to save, each stage's report, and the parameter and byte
    accounting of the whole pipeline."""

    record: Record
    low_rank: LowRankReport | None  # the lowrank stage's plan, replaced modules and config (None without one)
    quant: QuantReport | None  # the quantize stage's plan, modules and output errors (None without one)
    params_before: int  # whole-model unique parameters before
    params_after: int  # and after
    target_bytes_before: int  # bytes of the target matrices before, in their dtype
    target_bytes_after: int  # bytes of what replaced them (factors in their dtype; or packed codes, scales, factors)

    @property
    def plan(self) -> RankPlan:
        return self.record.plan

    @property
    def config(self) -> CompressConfig | None:
        """The lowrank stage as it ran (with --method auto: the chosen recipe's)."""
        return self.record.compress_config

    @property
    def replaced(self) -> list[str]:
        """Modules swapped for LowRankLinear."""
        return self.low_rank.replaced if self.low_rank is not None else []

    @property
    def model_reduction(self) -> float:
        """Fraction of the whole model's parameters removed (embeddings included)."""
        return 1 - self.params_after / self.params_before


@dataclass
class _Context:
    """What stages share: the tokenizer that makes calibration windows, windows given by the
    caller, the windows made so far (one set per text, size and BOS policy), the rank plan of an
    earlier lowrank stage, and the run's settings."""

    tokenizer: Any
    calibration: torch.Tensor | None
    batch_size: int
    progress: bool
    plan: RankPlan | None = None  # a given rank plan (replaces the lowrank stage's policy)
    gradients: dict | None = None  # the dense model's output-gradient statistics, when the caller holds them
    low_rank_plan: RankPlan | None = None  # set by the lowrank stage for the quantize stage
    later_stages: int = 0  # stages after the running one
    _windows: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def windows(self, config: Any) -> tuple[torch.Tensor | None, Any]:
        """The calibration windows of a stage config (None when it names no text and none were
        given), and the config with what was used recorded (tokens, window length, BOS policy)."""
        if self.calibration is not None:
            windows = self.calibration
        elif config.calib is None:
            return None, config
        else:
            from welore.data import load_text, resolve_bos, token_windows

            if self.tokenizer is None:
                raise WeloreError("The model has no tokenizer, so calibration text cannot be tokenized; "
                                  "pass a model folder that includes one.")
            config = replace(config, bos=resolve_bos(self.tokenizer, config.bos))
            key = (config.calib, config.calib_tokens, config.calib_seq_len, config.bos)
            if key not in self._windows:
                self._windows[key] = token_windows(
                    self.tokenizer, load_text(config.calib, split="calib"), config.calib_seq_len,
                    config.calib_tokens, options=("--calib-seq-len", "--calib-tokens"), bos=config.bos)
            windows = self._windows[key]
        if config.calib is not None:
            config = replace(config, calib_tokens=windows.numel(), calib_seq_len=windows.shape[1])
        return windows, config


def _run_low_rank(model: nn.Module, config: CompressConfig, context: _Context) -> tuple[LowRankReport, CompressConfig]:
    windows, config = context.windows(config)
    if context.calibration is not None and not config.data_aware and context.later_stages:
        windows, config = None, replace(config, calib=None)  # given for a later stage (e.g. EoRA), not for this one
    if config.method == AUTO and context.plan is None:
        if windows is None:
            raise WeloreError("--method auto chooses among data-aware recipes on calibration text; "
                              "pass --calib (e.g. --calib wiki).")
        config, _ = select_recipe(model, config, windows, context.batch_size, context.progress)
    report = low_rank_(model, config, plan=context.plan, calibration=windows, batch_size=context.batch_size,
                       progress=context.progress, gradients=context.gradients)
    context.low_rank_plan = report.plan
    return report, report.config


def _run_quantize(model: nn.Module, config: QuantConfig, context: _Context) -> tuple[QuantReport, QuantConfig]:
    windows, config = context.windows(config)
    report = quantize_(model, config, calibration=windows, batch_size=context.batch_size, progress=context.progress,
                       rank_plan=context.low_rank_plan)
    return report, config


STAGES["lowrank"] = StageType(CompressConfig, _run_low_rank)
STAGES["quantize"] = StageType(QuantConfig, _run_quantize)


def compress_(
    model: nn.Module,
    recipe: Recipe | CompressConfig | QuantConfig,
    tokenizer=None,
    *,
    plan: RankPlan | None = None,
    calibration: torch.Tensor | None = None,
    batch_size: int = 4,
    progress: bool = True,
    gradients: dict | None = None,
    source: str | None = None,
) -> CompressReport:
    """Apply `recipe` (or a single stage config) to `model` in place, stage by stage.

    Calibration windows come from each stage's `calib` text, tokenized with `tokenizer`, or are
    given as `calibration`, a LongTensor (N, T) of token windows from text disjoint from any
    evaluation text, used by every stage that takes calibration. `plan`: a saved rank plan that
    sets the lowrank stage's ranks. `gradients`: the dense model's output-gradient statistics
    (`welore.lowrank.compress.gradient_stats`) for a curvature-aware factorizer, when the caller holds them.
    The report's `record` is what `save` writes."""
    if not isinstance(recipe, Recipe):
        recipe = Recipe([recipe])
    if not recipe.stages:
        raise WeloreError("The recipe has no stages; give a lowrank or quantize stage.")
    if calibration is None:
        recipe.check()
    if plan is not None and recipe.stage("lowrank") is None:
        raise ValueError("a rank plan was given, but the recipe has no lowrank stage to apply it")
    context = _Context(tokenizer, calibration, batch_size, progress, plan=plan, gradients=gradients)
    first = recipe.stages[0]  # the matrices the recipe starts from: a quantize stage also takes a low-rank model's
    targets = (quant_targets(model, first.targets) if stage_name(first) == "quantize"
               else find_targets(model, first.targets))
    bytes_before = sum(weight_matrix(m).numel() * weight_matrix(m).element_size() for m in targets.values())
    params_before = count_parameters(model)
    reports: dict[str, Any] = {}
    ran = []
    for k, config in enumerate(recipe.stages):
        name = stage_name(config)
        log.info("stage %s", name)
        context.later_stages = len(recipe.stages) - k - 1
        reports[name], config = STAGES[name].run(model, config, context)
        ran.append(config)
    low_rank, quant = reports.get("lowrank"), reports.get("quantize")
    if low_rank is not None:
        rank_plan = low_rank.plan
    elif any(isinstance(m, LowRankLinear) for m in model.modules()):  # a low-rank model quantized: its ranks stand
        rank_plan, _ = model_plans(model)
    else:  # quantized alone: every quantized matrix full rank
        rank_plan = RankPlan(ranks=dict.fromkeys(quant.plan.shapes), shapes=dict(quant.plan.shapes), method="quantize")
    if quant is not None:
        bytes_after = quant.plan.nbytes
    else:
        bytes_after = sum(_matrix_bytes(model.get_submodule(n)) for n in rank_plan.ranks)
    record = Record(plan=rank_plan, quant_plan=quant.plan if quant is not None else None, recipe=Recipe(ran),
                    source=source)
    return CompressReport(record=record, low_rank=low_rank, quant=quant, params_before=params_before,
                          params_after=count_parameters(model), target_bytes_before=bytes_before,
                          target_bytes_after=bytes_after)


def _matrix_bytes(module: nn.Module) -> int:
    """Bytes of a target matrix as stored: its weight, or its two factors (bias excluded)."""
    if isinstance(module, LowRankLinear):
        return sum(f.weight.numel() * f.weight.element_size() for f in (module.up, module.down))
    weight = weight_matrix(module)
    return weight.numel() * weight.element_size()
