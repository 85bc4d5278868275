"""`--method auto`: choose the compression recipe on the model at hand, not once for all models.

A recipe that wins on one model can lose on the next: on SmolLM2-135M the curvature recipe
(kfac factors, WeLore ranks, sequential calibration) beats SVD-LLM's whitening at every ratio
measured, while on a model of another family plain whitening with WeLore's ranks beat it. So
`select_recipe` compresses a copy of the model with each candidate in `CANDIDATES`, scores each
copy's perplexity on calibration windows held back from every fit (never on evaluation text),
and returns the best candidate's config with the scores; `welore.lowrank.compress.low_rank_` then compresses the model
itself with that config on all the calibration windows.

Cost: the candidates are fitted on a quarter (`SELECT_FRACTION`) of the windows not held back,
so the selection costs about a quarter of the candidates' full-size costs together: on
SmolLM2-135M at ratio 0.2 with 8,192 calibration tokens of either built-in text the whole run took
1.50-1.52x the CPU time of the curvature recipe alone, which it chose (`benchmarks/select_cost.py`,
docs/benchmarks.md). Memory: one copy of the model besides the model.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from welore.errors import WeloreError
from welore.lowrank.compress import CompressConfig, low_rank_

log = logging.getLogger(__name__)

HELD_FRACTION = 1 / 8  # of the calibration windows, held back to score the candidates
SELECT_FRACTION = 1 / 4  # of the other windows, fitting each candidate during the selection


@dataclass(frozen=True)
class Candidate:
    """One recipe `--method auto` tries: a factorizer, an allocation policy, sequential or not."""

    factorizer: str  # a data-aware factorizer of welore.lowrank.factorize.FACTORIZERS
    method: str  # an allocation policy of welore.lowrank.plan.POLICIES
    sequential: bool = False  # calibrate each block on the compressed blocks' outputs

    @property
    def label(self) -> str:
        return f"{self.factorizer}/{self.method}" + ("+seq" if self.sequential else "")

    def config(self, base: CompressConfig) -> CompressConfig:
        """`base` (ratio, targets, calibration provenance) with this recipe."""
        return replace(base, factorizer=self.factorizer, method=self.method, sequential=self.sequential,
                       factorizer_params={}, selection=None)


CANDIDATES = (
    Candidate("kfac", "welore", sequential=True),  # the best recipe on SmolLM2-135M
    Candidate("whiten", "welore"),  # SVD-LLM's whitening with WeLore's ranks
    Candidate("whiten", "uniform"),  # SVD-LLM as published: the floor
)


def hold_back(calibration: torch.Tensor, option: str = "--method auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(the other windows, the held-back windows) of `calibration` (N, T): the last N/8 windows,
    at least one, are held back to score choices on; `option` names what needs them."""
    n = calibration.shape[0]
    held = max(1, round(n * HELD_FRACTION))
    if n - held < 1:
        raise WeloreError(f"{option} holds calibration windows back to score its choices, and {n} window is too few; "
                          "raise --calib-tokens to at least 2 windows of --calib-seq-len.")
    return calibration[: n - held], calibration[n - held:]


def split_windows(calibration: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(selection windows, held-back windows) of `calibration` (N, T): the last N/8 windows are
    held back (`hold_back`), and the first quarter of the rest fit the candidates."""
    rest, held = hold_back(calibration)
    return rest[: max(1, round(len(rest) * SELECT_FRACTION))], held


def select_recipe(
    model: nn.Module, config: CompressConfig, calibration: torch.Tensor, batch_size: int = 4, progress: bool = True,
) -> tuple[CompressConfig, dict]:
    """The best candidate's config for `model` and the selection's record: every candidate's
    perplexity on the held-back windows and its seconds, the tokens fitted and held back."""
    from welore.eval.evaluate import perplexity
    from welore.io.stream import is_streamed

    if is_streamed(model):
        raise WeloreError("--method auto compresses a copy of the model with each recipe, but this one reads its "
                          "decoder blocks from disk; choose a recipe (e.g. --method welore --factorizer whiten) "
                          "or load the model without --max-memory.")
    fit, held = split_windows(calibration)
    log.info("selecting the recipe: %s, fitted on %d tokens, scored on %d held-back calibration tokens",
             ", ".join(c.label for c in CANDIDATES), fit.numel(), held.numel())
    scores: dict[str, dict[str, float]] = {}
    for candidate in CANDIDATES:
        trial = copy.deepcopy(model)
        start = time.perf_counter()
        low_rank_(trial, candidate.config(config), calibration=fit, batch_size=batch_size, progress=progress)
        try:
            ppl, _ = perplexity(trial, held, batch_size=batch_size, progress=False)
        except WeloreError:  # non-finite logits: this recipe broke the model
            ppl = float("inf")
        scores[candidate.label] = {"perplexity": ppl, "seconds": time.perf_counter() - start}
        log.info("%s: held-back perplexity %.3f", candidate.label, ppl)
        del trial
    best = min(CANDIDATES, key=lambda c: scores[c.label]["perplexity"])
    record = {"chosen": best.label, "candidates": scores, "fit_tokens": fit.numel(), "held_tokens": held.numel()}
    return replace(best.config(config), selection=record), record
