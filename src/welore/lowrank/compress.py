"""The lowrank stage: target matrices → rank plan → factorize → swap modules, in place.

    report = welore.compress_(model, CompressConfig(ratio=0.2, method="welore"))   # a one-stage recipe

The rank plan comes from an allocation policy (`welore.lowrank.plan.POLICIES`) run on the cached
singular values of the target matrices, or is given (`plan=RankPlan.load(...)`). One
function, `apply_plan_`, swaps every factorized matrix for a `LowRankLinear` and reports what
it replaced; `load` reuses it on the meta device to rebuild a saved model's structure.

Everything runs one decoder block at a time (`welore.io.stream.block_access`): spectra, then
factorization. For a model loaded with its blocks on disk (`load_model(..., max_memory=...)`)
each block is read only while it is processed and its compressed version is written back to
disk, so the whole model is never in memory; for a resident model the same code runs with
nothing to read.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from welore.data import LEGACY_BOS, bos_option, settle_calibration_
from welore.errors import WeloreError
from welore.io.stream import block_access
from welore.lowrank.factorize import (
    FACTORIZERS,
    Factorizer,
    balance_factors,
    describe_factorizer_params,
    make_factorizer,
)
from welore.lowrank.module import LowRankLinear
from welore.lowrank.plan import POLICIES, RankPlan, allocate, check_ratio, needs_spectra
from welore.lowrank.refit import REFITS, Refit
from welore.lowrank.spectrum import check_finite, compute_spectra
from welore.modules import swap_module
from welore.targets import DENSE_TYPES, find_targets, matrix_shape, weight_matrix
from welore.versioned import config_from_dict

log = logging.getLogger(__name__)

CONFIG_VERSION = 1
AUTO = "auto"  # the `method` that selects the recipe on the model at hand (welore.lowrank.select)
RECOMMENDED = {"method": "welore", "factorizer": "whiten", "factorizer_params": {"shrinkage": 0.1}}  # what
    # `welore compress MODEL --ratio R` runs: the best cross-domain perplexity on the default model among the
    # recipes that run in bounded memory at every size (docs/compression.md, "The default recipe")
BUILTIN_CALIB = "wiki"  # the calibration text of the recommended recipe when none is given


def _policies() -> list[str]:
    return [*sorted(POLICIES), AUTO]


def _factorizers() -> list[str]:
    return sorted(FACTORIZERS)


def _refits() -> list[str]:
    return sorted(REFITS)


@dataclass
class CompressConfig:
    ratio: float | None = None  # fraction of the target matrices' parameters to remove, in (0, 1)
    method: str | None = field(default="welore", metadata={"choices": _policies})  # rank-allocation policy
        # (welore.lowrank.plan.POLICIES), or auto: try kfac/welore+seq, whiten/welore and whiten/uniform on the model
        # and keep the best on held-back calibration windows (needs --calib; sets --factorizer and --sequential); none
        # when a saved --plan sets the ranks
    factorizer: str = field(default="svd", metadata={"choices": _factorizers})  # how each matrix is factorized: svd
        # (data-free), whiten (SVD-LLM), asvd (activation-scaled), kfac (Kronecker-factored loss curvature) or fisher
        # (FWSVD's row Fisher); all but svd need --calib
    targets: list[str] | None = field(default=None, metadata={"metavar": "PATTERN"})  # target modules by exact name,
        # glob (*.q_proj) or re:regex; default: Linear layers in decoder blocks
    lrc_min_cut: float = 0.5  # a matrix whose rank is cut by at least this fraction is an LRC
    calib: str | None = None  # calibration text for the data-aware factorizers: wiki or news (their calibration half),
        # a text file, or hf:DATASET
    calib_tokens: int | None = 8192  # calibration tokens (with --calib)
    calib_seq_len: int | None = 512  # tokens per calibration window (with --calib)
    bos: str | None = bos_option()  # with --calib; recorded as used: yes or no (see welore.data.resolve_bos)
    factorizer_params: dict = field(default_factory=dict, metadata={"flag": "factorizer_param",
                                                                    "more_help": describe_factorizer_params})
        # the chosen factorizer's own parameters, e.g. alpha 1.0 for asvd; on the command line NAME=VALUE, once
        # per parameter (--factorizer-param alpha=1.0); the factorizers take
    sequential: bool = False  # calibrate each block on the outputs of the already-compressed blocks before it
    refit: str | None = field(default=None, metadata={"choices": _refits})  # after truncation, refit by least squares
        # to the dense outputs on the compressed prefix's inputs: up (the up factor) or both (up and down); needs
        # --calib, implies --sequential
    refit_ridge: float = 1e-3  # ridge of the refit, × the mean diagonal of the Gram matrix it inverts (with --refit)
    selection: dict | None = field(default=None, metadata={"cli": False})  # recorded by --method auto: the recipe
        # chosen, every candidate's held-back perplexity and seconds (welore.lowrank.select)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in _policies():
            raise WeloreError(f"Unknown method {self.method!r}; choose one of {', '.join(_policies())}.")
        if self.method == AUTO and (self.factorizer_params or self.refit is not None):
            raise WeloreError("--method auto chooses the factorizer itself; drop --factorizer-param and --refit, "
                              "or choose a method and factorizer.")
        factorizer = self.make_factorizer()  # checks the name and its parameters
        self.factorizer_params = {key: getattr(factorizer, key) for key in self.factorizer_params}  # typed, as recorded
        self.make_refit()  # checks the mode and the ridge
        if self.refit is not None:  # the refit needs the compressed prefix's inputs
            self.sequential = True
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise WeloreError(f"Ratio {self.ratio} is outside (0, 1); it is the fraction of target parameters to "
                              "remove, e.g. 0.2.")
        if not 0 < self.lrc_min_cut <= 1:
            raise WeloreError(f"LRC minimum cut {self.lrc_min_cut} is outside (0, 1]; use e.g. 0.5.")
        settle_calibration_(self)

    @property
    def data_aware(self) -> bool:
        """Whether compressing with this config needs calibration windows."""
        return self.needs_calibration is not None

    @property
    def needs_calibration(self) -> str | None:
        """What cannot run without calibration text (None when everything can)."""
        if self.method == AUTO:
            return "--method auto"
        return f"The {self.factorizer} factorizer" if self.make_factorizer().needs_stats else None

    def make_factorizer(self) -> Factorizer:
        """The configured factorizer with its parameters (`welore.lowrank.factorize.make_factorizer`)."""
        return make_factorizer(self.factorizer, self.factorizer_params)

    def make_refit(self) -> Refit | None:
        """The configured refit (`welore.lowrank.refit.Refit`), None without --refit."""
        if self.refit is None:
            if self.refit_ridge != Refit.ridge:
                raise WeloreError("--refit-ridge is given without --refit; "
                                  "add --refit up (or both), or drop --refit-ridge.")
            return None
        return Refit(self.refit, self.refit_ridge)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, what: str = "The compression config") -> CompressConfig:
        """Read `to_dict` output back (version checked, unknown keys reported)."""
        if isinstance(data, dict) and data.get("method") == "plan":  # how earlier versions recorded a replayed plan
            data = {**data, "method": None}
        if isinstance(data, dict) and data.get("calib") and "bos" not in data:  # earlier versions: never BOS
            data = {**data, "bos": LEGACY_BOS}
        return config_from_dict(cls, data, what, CONFIG_VERSION)


@dataclass
class LowRankReport:
    """What the low-rank stage did (`welore.recipe.CompressReport` holds it with the accounting)."""

    plan: RankPlan  # what was decided
    replaced: list[str] = field(default_factory=list)  # modules swapped for LowRankLinear
    config: CompressConfig | None = None  # the config that ran (with --method auto: the chosen recipe's), with the
        # calibration tokens and window length used


def plan_ranks(model: nn.Module, config: CompressConfig, progress: bool = True) -> RankPlan:
    """Decide every target matrix's rank with the configured policy (no weights change)."""
    if config.ratio is None:
        raise WeloreError("No ratio given; pass --ratio (e.g. 0.2) or a saved --plan.")
    if config.method is None:
        raise WeloreError("No rank-allocation method given (method None means a rank plan sets the ranks); "
                          "pass --method or a saved --plan.")
    if config.method == AUTO:
        raise WeloreError("--method auto chooses a recipe by compressing the model, so it has no rank plan of its own; "
                          "plan with a policy, e.g. --method welore.")
    targets = find_targets(model, config.targets)
    spectra = block_spectra(model, targets, progress=progress)
    shapes = {n: matrix_shape(m) for n, m in targets.items()}
    return allocate(config.method, spectra, shapes, config.ratio)


def block_spectra(model: nn.Module, targets: dict[str, nn.Module], progress: bool = True) -> dict[str, torch.Tensor]:
    """Singular values of every target matrix, computed (and cached) one decoder block at a time."""
    access = block_access(model)
    groups = access.groups(targets)
    spectra: dict[str, torch.Tensor] = {}
    with _outside_released_if_unused(access, groups):
        for k, names in tqdm(groups, desc="spectra", unit="block", disable=not progress):
            with access.use(k):
                spectra.update(compute_spectra({n: targets[n] for n in names}, progress=False))
    return {n: spectra[n] for n in targets}


def _outside_released_if_unused(access, groups: list[tuple[int | None, list[str]]]):
    """`access.outside_released()` when every target lies inside the decoder blocks (a pass
    over targets outside them, e.g. the LM head, needs those weights)."""
    return access.outside_released() if all(k is not None for k, _ in groups) else contextlib.nullcontext()


def check_plan_fits(model: nn.Module, plan: RankPlan) -> None:
    """Raise a user error when the plan names modules or shapes this model does not have."""
    modules = dict(model.named_modules())
    for name, shape in plan.shapes.items():
        module = modules.get(name)
        if module is None:
            raise WeloreError(f"The rank plan names {name}, which this model does not have; "
                              "use a plan made for this model.")
        if isinstance(module, LowRankLinear):
            raise WeloreError(f"{name} is already factorized; apply plans to an uncompressed model.")
        if not isinstance(module, DENSE_TYPES) or matrix_shape(module) != tuple(shape):
            raise WeloreError(f"The rank plan expects {name} to be a {shape[0]}x{shape[1]} Linear layer, "
                              "which it is not here; use a plan made for this model.")


def factorize_layer(
    dense: nn.Module, name: str, rank: int, factorizer: str | Factorizer, stats=None, refit: Refit | None = None
) -> LowRankLinear:
    """Factorize one dense layer at `rank` (bias, dtype and device kept); with `refit`, the
    factors are then refitted on paired statistics (`welore.lowrank.refit`)."""
    weight = weight_matrix(dense)
    check_finite(name, weight)
    factorizer = FACTORIZERS[factorizer] if isinstance(factorizer, str) else factorizer
    up, down = factorizer.factors(weight, rank, stats)
    if refit is not None:
        if factorizer.needs_gradients:  # the refit passes input statistics alone
            stats, factorizer = stats.inputs, _BoundGradients(factorizer, stats.grads)
        up, down = refit(weight, up, down, stats, factorizer, name)
    up, down = balance_factors(up, down)  # fine-tuning (LRC) updates both factors in proportion
    bias = dense.bias.detach() if dense.bias is not None else None
    return LowRankLinear.from_factors(up.to(weight.device), down.to(weight.device), bias, dtype=weight.dtype)


def apply_plan_(
    model: nn.Module, plan: RankPlan, factorizer: str | Factorizer = "svd", progress: bool = True, empty: bool = False
) -> list[str]:
    """Swap every matrix the plan factorizes for a `LowRankLinear`; return the names replaced.

    `empty=True` builds the factors on the meta device without computing anything (used to
    rebuild a saved model's structure before loading its weights).
    """
    check_plan_fits(model, plan)
    if empty:
        for name in plan.factorized:
            dense = model.get_submodule(name)
            out_features, in_features = matrix_shape(dense)
            dtype = weight_matrix(dense).dtype
            rank = plan.ranks[name]
            assert rank is not None
            module = LowRankLinear(in_features, out_features, rank, bias=dense.bias is not None, device="meta",
                                   dtype=dtype)
            swap_module(model, name, module)
        return list(plan.factorized)
    access = block_access(model)
    groups = access.groups(plan.factorized)
    with tqdm(total=len(plan.factorized), desc="factorizing", disable=not progress) as bar, \
            _outside_released_if_unused(access, groups):
        for k, names in groups:
            with access.use(k):
                for name in names:
                    rank = plan.ranks[name]
                    assert rank is not None
                    swap_module(model, name, factorize_layer(model.get_submodule(name), name, rank, factorizer))
                    bar.update()
    log.info("replaced %d of %d target matrices by low-rank factors", len(plan.factorized), len(plan.ranks))
    return list(plan.factorized)


def calibrated_spectra(
    model: nn.Module, config: CompressConfig, calibration: torch.Tensor, batch_size: int = 4, progress: bool = True,
    gradients: dict | None = None,
) -> dict[str, torch.Tensor]:
    """The spectra a data-aware factorizer sees (e.g. singular values of W·S, or of L_Gᵀ·W·L_A
    for kfac, in loss units), block by block. `gradients`: the output-gradient statistics a
    curvature-aware factorizer needs (`gradient_stats`), gathered here when not given."""
    from welore.lowrank.calibrate import drain, iter_block_stats

    factorizer = config.make_factorizer()
    targets = find_targets(model, config.targets)
    if factorizer.needs_gradients and gradients is None:
        gradients = gradient_stats(model, targets, calibration, batch_size, progress)
    spectra = {}
    for _, block_stats in iter_block_stats(model, targets, calibration, batch_size=batch_size, progress=progress,
                                           sequential=False):
        for name, stats in drain(block_stats):  # each block's statistics freed before the next block's are taken
            stats.check(name)
            spectra[name] = factorizer.spectrum(weight_matrix(targets[name]), _with_gradients(stats, gradients, name))
        del stats
    return spectra


def gradient_stats(model: nn.Module, targets: dict[str, nn.Module], calibration: torch.Tensor, batch_size: int = 4,
                   progress: bool = True) -> dict:
    """Output-gradient statistics of the LM loss for every target (`welore.lowrank.curvature`)."""
    from welore.lowrank.curvature import gradient_stats as gather

    with torch.no_grad():  # gather enables gradients only where it needs them
        return gather(model, targets, calibration, batch_size=batch_size, progress=progress)


@dataclass(frozen=True)
class _BoundGradients:
    """A curvature-aware factorizer with one target's output-gradient statistics bound, for
    callers that hold only its input statistics (the refit re-truncates with the factorizer)."""

    factorizer: Factorizer  # kfac or fisher
    grads: object  # welore.lowrank.curvature.GradientStats of the target

    def factors(self, weight: torch.Tensor, rank: int, stats) -> tuple[torch.Tensor, torch.Tensor]:
        from welore.lowrank.curvature import CurvatureStats

        return self.factorizer.factors(weight, rank, CurvatureStats(inputs=stats, grads=self.grads))


def _with_gradients(stats, gradients: dict | None, name: str):
    """A target's input statistics, paired with its output-gradient statistics when there are any."""
    if gradients is None:
        return stats
    from welore.lowrank.curvature import CurvatureStats

    return CurvatureStats(inputs=stats, grads=gradients[name])


def _apply_plan_calibrated_(
    model: nn.Module, plan: RankPlan, config: CompressConfig, calibration: torch.Tensor,
    batch_size: int = 4, progress: bool = True, gradients: dict | None = None,
) -> list[str]:
    """Factorize with input statistics gathered block by block; each block is swapped as soon
    as it is factorized. Sequential: block k+1 is calibrated on the compressed block k's
    outputs; otherwise on the dense block k's outputs (computed before the swap). With a refit,
    the dense model's inputs are gathered beside them and the factors refitted. A
    curvature-aware factorizer also gets `gradients` (taken on the dense model, here when not
    given: the loss's gradients need the whole model, so they are not sequential)."""
    from welore.lowrank.calibrate import drain, iter_block_stats

    check_plan_fits(model, plan)
    targets = {name: model.get_submodule(name) for name in plan.factorized}
    refit = config.make_refit()
    if config.make_factorizer().needs_gradients and gradients is None:
        gradients = gradient_stats(model, targets, calibration, batch_size, progress)
    for _, block_stats in iter_block_stats(model, targets, calibration, batch_size=batch_size, progress=progress,
                                           sequential=config.sequential, paired=refit is not None):
        for name, stats in drain(block_stats):  # each block's statistics freed before the next block's are taken
            stats.check(name)
            rank = plan.ranks[name]
            assert rank is not None
            swap_module(model, name, factorize_layer(targets[name], name, rank, config.make_factorizer(),
                                                     _with_gradients(stats, gradients, name), refit))
        del stats
    return list(plan.factorized)


def low_rank_(
    model: nn.Module,
    config: CompressConfig,
    plan: RankPlan | None = None,
    calibration: torch.Tensor | None = None,
    batch_size: int = 4,
    progress: bool = True,
    gradients: dict | None = None,
) -> LowRankReport:
    """The lowrank stage (`welore.compress_` runs it from a recipe): factorize `model`'s target
    matrices in place; returns the plan, the replaced modules and the config as it ran.

    Data-aware factorizers (`whiten`, `asvd`, `kfac`, `fisher`) need `calibration`, a LongTensor (N, T) of token
    windows from text disjoint from any evaluation text (`welore.data.load_text(..., split="calib")`).
    `gradients`: the dense model's output-gradient statistics on that text (`gradient_stats`) for a
    curvature-aware factorizer, when the caller already holds them; gathered here otherwise.
    """
    if config.method == AUTO and plan is None:
        raise ValueError("--method auto is resolved by welore.compress_ (welore.lowrank.select) before the lowrank "
                         "stage runs")
    factorizer = config.make_factorizer()
    if config.refit is not None and not factorizer.needs_stats:
        raise WeloreError(f"--refit fits the factors on calibration text, but the {config.factorizer} factorizer uses "
                          "none; choose a data-aware factorizer (e.g. whiten) and pass --calib.")
    if factorizer.needs_stats and calibration is None:
        raise WeloreError(f"The {config.factorizer} factorizer needs calibration text; "
                          "pass --calib (e.g. --calib wiki).")
    if not factorizer.needs_stats and calibration is not None:
        raise WeloreError(f"The {config.factorizer} factorizer is data-free and uses no calibration text; "
                          "drop --calib or choose whiten or asvd.")
    if config.sequential and not factorizer.needs_stats:
        raise WeloreError(f"Sequential calibration needs a data-aware factorizer, but {config.factorizer} uses no "
                          "calibration text; drop --sequential or choose whiten or asvd.")
    if gradients is not None and not factorizer.needs_gradients:
        raise ValueError(f"gradients were given, but the {config.factorizer} factorizer uses none; pass them only "
                         "to a curvature-aware factorizer (kfac, fisher)")
    if plan is None and config.method is None:
        raise WeloreError("No rank-allocation method given (method None means a rank plan sets the ranks); "
                          "pass --method or a saved --plan.")
    with torch.no_grad():
        if plan is None and factorizer.needs_stats:
            if config.ratio is None:
                raise WeloreError("No ratio given; pass --ratio (e.g. 0.2) or a saved --plan.")
            targets = find_targets(model, config.targets)
            shapes = {n: matrix_shape(m) for n, m in targets.items()}
            check_ratio(config.ratio, shapes)
            if factorizer.needs_gradients and gradients is None:  # once, on the dense model
                gradients = gradient_stats(model, targets, calibration, batch_size, progress)
            spectra = (calibrated_spectra(model, config, calibration, batch_size, progress, gradients)
                       if needs_spectra(config.method) else {})
            plan = allocate(config.method, spectra, shapes, config.ratio)
        elif plan is None:
            plan = plan_ranks(model, config, progress=progress)
        if factorizer.needs_stats:
            replaced = _apply_plan_calibrated_(model, plan, config, calibration, batch_size, progress, gradients)
        else:
            replaced = apply_plan_(model, plan, factorizer=config.make_factorizer(), progress=progress)
    if calibration is not None:  # record what was used, whoever built the windows
        config = replace(config, calib_tokens=calibration.numel(), calib_seq_len=calibration.shape[1])
    return LowRankReport(plan=plan, replaced=replaced, config=config)
