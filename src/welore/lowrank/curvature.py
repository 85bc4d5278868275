"""Curvature of the LM loss around each target matrix, from backward passes on calibration text.

The curvature-aware factorizers (`kfac`, `fisher` in `welore.lowrank.factorize`) truncate a matrix W
(out, in) so that the *loss* grows least, not its outputs' error. A second-order estimate of the
loss increase of a change ΔW is ½·vec(ΔW)ᵀ·F·vec(ΔW), F the (empirical) Fisher information of
the weight. For a linear layer y = W·x the gradient of the loss is Σ_t g_t·x_tᵀ, g_t = ∂loss/∂y_t
the gradient at the layer's output for token t, so F is built from x and g:

- Kronecker-factored (K-FAC, Martens & Grosse 2015; for compression KFAC-SVD): F ≈ A ⊗ G with
  A = Σ_t x_t·x_tᵀ / N (the input covariance, `InputStats.xtx / tokens`) and
  G = Σ_t g_t·g_tᵀ / N (the output-gradient covariance, `GradientStats.ggt / loss_tokens`);
  then ½·vec(ΔW)ᵀ·F·vec(ΔW) = ½·tr(ΔW·A·ΔWᵀ·G).
- Diagonal, per output row (FWSVD, Hsu et al., ICLR 2022): the squared gradient of the weight
  summed over calibration windows, Σ_b (∂loss_b/∂W)², summed along each row.

`gradient_stats` gathers both for every target matrix with one backward pass per calibration
batch, block by block from the top ("block-major" backward with recomputation, the same shape
as `welore.lowrank.calibrate.block_outputs`):

1. all windows go forward through block 0, 1, …, L−1; every block's input hidden states are kept;
2. the final norm, LM head and cross-entropy give ∂loss/∂(last block's output) per batch;
3. for k = L−1 … down to the lowest block holding targets, block k is run again on its saved
   inputs with gradients enabled and `torch.autograd.grad` carries ∂loss/∂(block output) to
   ∂loss/∂(block input); hooks on the block's targets see g at their outputs on the way.

So only one block is ever in memory (a model streamed from disk reads each block twice), no
parameter gradient is stored, and nothing of the model changes. Memory: the hidden states of
all windows at every block boundary, (L + 1)·N·T·d floats (566 MB for SmolLM2-135M's 30 blocks
at 8,192 tokens), plus every target's G, Σ out² float32 (~700 MB for SmolLM2-135M's 210 target
matrices; gate/up_proj's 1536² dominate). G must be complete before the first block is
compressed, so all of them are held; each block's is accumulated in float64 and stored in
float32 when its block is done.

The loss is the next-token cross-entropy summed over the window; `loss_tokens` counts the
predicted tokens, so G / loss_tokens and the Fisher / loss_tokens are in units of the *mean*
per-token loss (nats): the estimates above are the increase of the calibration perplexity's
logarithm. The labels are the text's own next tokens (the empirical Fisher).

**Outlier tokens.** A mean of g·gᵀ is not robust: on SmolLM2-135M, window 170 of the wiki
calibration half holds two tokens (positions 0 and 1) whose gradients at block 0's k/v_proj
outputs have ~7·10⁸ times the squared norm of their batch's median token, so above 32,768
calibration tokens they made up 99.9% of those matrices' G and the compressed model's perplexity
went from 90.9 to 2·10⁴. So every token whose ‖g‖² exceeds `OUTLIER_FACTOR` (10⁴) times its
batch's median at that layer is scaled down to that bound before it is accumulated, and
`gradient_stats` warns how many were. The bound was measured, not derived: in ordinary batches
the largest token (an attention sink at position 0) reaches ~1.6·10⁵ times the median, and a
bound of 10⁶ that spares those still left the capped spike with half of block 0's G (news 1.1·10⁴
at 131K tokens, window 170's share replaced); 10⁴ gives 78.3 there (72.6 with window 170
dropped altogether) and, clipping the sinks too, improves 8,192 tokens from 105.9 to 98.9.
The outliers are not an artefact of windows without BOS: with SmolLM2's BOS token forced first,
206 of 251 sit at position 0 (the BOS token itself) and the bound still helps (100.98 against
106.54 on news; `benchmarks/bos_outliers.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from welore.devices import float64_device
from welore.errors import WeloreError
from welore.io.stream import activation_bytes, check_activations, format_bytes
from welore.lowrank.calibrate import (
    InputStats,
    _advance,
    _capture_all,
    _ForwardHooks,
    _replayed_blocks,
    _run_block,
    _target_blocks,
)
from welore.targets import matrix_shape

log = logging.getLogger(__name__)

OUTLIER_FACTOR = 1e4  # a token's ‖g‖² above this multiple of its batch's median ‖g‖² is scaled down to it


def _clip_outliers(g: torch.Tensor) -> tuple[torch.Tensor, int]:
    """g (B, T, out) with every token whose ‖g‖² exceeds OUTLIER_FACTOR × the batch's median
    scaled down to that bound, and how many were."""
    squared = g.pow(2).sum(-1)  # (B, T)
    bound = OUTLIER_FACTOR * squared.median()
    over = squared > bound
    if bound <= 0 or not over.any():
        return g, 0
    scale = torch.where(over, (bound / squared).sqrt(), torch.ones_like(squared))  # (B, T)
    return g * scale[..., None], int(over.sum())


@dataclass(eq=False)
class GradientStats:
    """Statistics of ∂loss/∂y at one target's outputs y (out,) over the calibration text."""

    ggt: torch.Tensor  # (out, out) Σ over tokens of g·gᵀ (float64 while accumulated, float32 once complete)
    row_fisher: torch.Tensor  # (out,) float64: Σ over windows b and columns j of (∂loss_b/∂W_ij)²
    in_features: int  # columns of the weight, for the mean Fisher per entry of a row
    loss_tokens: int = 0  # next-token predictions in the summed loss (the normalisation to mean-loss units)
    names: list[str] = field(default_factory=list)  # the module these gradients belong to (for messages)
    clipped: int = 0  # outlier tokens scaled down to OUTLIER_FACTOR × their batch's median ‖g‖²

    @classmethod
    def zeros(cls, out_features: int, in_features: int, device: torch.device | str | None = None) -> GradientStats:
        device = float64_device(device) if device is not None else None
        return cls(ggt=torch.zeros(out_features, out_features, dtype=torch.float64, device=device),
                   row_fisher=torch.zeros(out_features, dtype=torch.float64, device=device), in_features=in_features)

    def add_(self, g: torch.Tensor, x: torch.Tensor) -> None:
        """Accumulate a batch: g (B, T, out) the output gradients, x (B, T, in) the inputs."""
        g, clipped = _clip_outliers(g.detach().to(self.ggt.device, torch.float64))  # (B, T, out)
        self.clipped += clipped
        flat = g.reshape(-1, g.shape[-1])  # (B·T, out)
        self.ggt.addmm_(flat.T, flat)  # (out, out)
        x = x.detach().to(self.ggt.device, torch.float64).reshape(g.shape[0], -1, x.shape[-1])  # (B, T, in)
        per_window = torch.einsum("bto,bti->boi", g, x)  # (B, out, in): ∂loss_b/∂W of every window
        self.row_fisher.add_(per_window.pow(2).sum(dim=(0, 2)))  # (out,)

    @property
    def covariance(self) -> torch.Tensor:
        """G = Σ g·gᵀ / loss_tokens, (out, out) float64."""
        return self.ggt.to(torch.float64) / self.loss_tokens

    @property
    def mean_row_fisher(self) -> torch.Tensor:
        """f_i = Σ_j F_ij / (in · loss_tokens), (out,) float64: the mean diagonal Fisher of row i."""
        return self.row_fisher / (self.in_features * self.loss_tokens)

    def check(self, name: str) -> None:
        if self.loss_tokens == 0:
            raise WeloreError(f"The gradient statistics of {name} hold no tokens; "
                              "the calibration windows must be at least 2 tokens long.")
        if not (torch.isfinite(self.ggt).all() and torch.isfinite(self.row_fisher).all()):
            raise WeloreError(
                f"The gradient statistics of {name} contain NaN or Inf; the model or the calibration text produced "
                "non-finite losses or gradients (try float32 instead of float16, or check the model's weights)."
            )


@dataclass(eq=False)
class CurvatureStats:
    """What a curvature-aware factorizer gets for one target: both Kronecker factors."""

    inputs: InputStats  # A side: Σ x·xᵀ of the layer's inputs
    grads: GradientStats  # G side: Σ g·gᵀ of the gradients at the layer's outputs


class _GradientCollector(_ForwardHooks):
    """Hooks on one block's targets: at every forward, register a hook on the output tensor that
    accumulates (g, x) into the target's GradientStats when the backward pass reaches it."""

    def __init__(self, modules: dict[str, nn.Module], stats: dict[str, GradientStats]) -> None:
        self.modules = modules
        self.stats = stats

    def hook(self, name: str):
        def on_forward(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0].detach()  # (B, T, in)
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                raise RuntimeError(f"{name}'s output does not carry gradients; cannot take its output gradients")
            if name not in self.stats:
                self.stats[name] = GradientStats.zeros(output.shape[-1], x.shape[-1], device=output.device)
                self.stats[name].names.append(name)
            output.register_hook(lambda g: self.stats[name].add_(g, x))

        return on_forward


def _loss_gradients(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, hidden: list[torch.Tensor],
                    batch_size: int) -> tuple[list[torch.Tensor], int]:
    """∂(summed next-token loss)/∂(last block's output) for every batch, and the tokens predicted."""
    device = model.get_input_embeddings().weight.device
    leaves = [h.detach().requires_grad_(True) for h in hidden]
    grads = []
    predicted = 0
    with torch.enable_grad(), _replayed_blocks(blocks, leaves):
        for i, start in enumerate(range(0, windows.shape[0], batch_size)):
            batch = windows[start : start + batch_size].to(device)  # (B, T)
            logits = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
            (grad,) = torch.autograd.grad(loss, leaves[i])  # (B, T, d)
            grads.append(grad)
            predicted += batch[:, 1:].numel()
            del logits, loss
    return grads, predicted


def gradient_stats(
    model: nn.Module, targets: dict[str, nn.Module], windows: torch.Tensor, batch_size: int = 4, progress: bool = True,
) -> dict[str, GradientStats]:
    """{target name: GradientStats} of the LM loss on `windows` (N, T), by block-major backward.

    The model is left unchanged (no parameter gradients are kept; train/eval modes restored).
    """
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise WeloreError("Calibration windows for gradients must be a non-empty (N, seq_len ≥ 2) tensor of token ids, "
                          f"not shape {tuple(windows.shape)}.")
    list_name, blocks, per_block, access = _target_blocks(model, targets, batch_size)
    hidden_bytes = (len(blocks) + 2) * activation_bytes(model, windows)
    grad_bytes = sum(4 * matrix_shape(m)[0] ** 2 for m in targets.values())
    log.info("output-gradient statistics: %s of hidden states, %s of G matrices",
             format_bytes(hidden_bytes), format_bytes(grad_bytes))
    check_activations(model, hidden_bytes + grad_bytes,
                      f"hidden states at every block of {windows.shape[0]}x{windows.shape[1]} tokens and "
                      "output-gradient statistics")
    first = min(per_block)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    stats: dict[str, GradientStats] = {}
    try:
        with tqdm(total=2 * len(blocks) - first, desc="gradients", unit="block", disable=not progress) as bar:
            with torch.no_grad():
                hidden, inputs = _capture_all(model, blocks, windows, batch_size)
                saved: list[list[torch.Tensor] | None] = []  # saved[k]: block k's input hidden states per batch
                for k in range(len(blocks)):
                    saved.append(list(hidden) if k >= first else None)
                    with access.use(k):
                        _advance(blocks[k], hidden, inputs[k])
                    bar.update()
            grads, predicted = _loss_gradients(model, blocks, windows, hidden, batch_size)
            del hidden
            log.info("backward passes of the LM loss through %d blocks of %s on %d windows of %d tokens",
                     len(blocks) - first, list_name, windows.shape[0], windows.shape[1])
            for k in reversed(range(first, len(blocks))):
                block_saved = saved[k]
                assert block_saved is not None
                with access.use(k), _GradientCollector(per_block.get(k, {}), stats), torch.enable_grad():
                    for i, (h, block_inputs) in enumerate(zip(block_saved, inputs[k], strict=True)):
                        leaf = h.detach().requires_grad_(True)  # (B, T, d)
                        out = _run_block(blocks[k], leaf, block_inputs)
                        (grads[i],) = torch.autograd.grad(out, leaf, grad_outputs=grads[i])
                        del out
                saved[k] = None
                for name in per_block.get(k, {}):
                    if name in stats:  # complete: keep G in float32
                        stats[name].ggt = stats[name].ggt.to(torch.float32)
                bar.update()
    finally:
        for module, training in modes.items():
            module.training = training
    missing = [name for name in targets if name not in stats]
    if missing:
        raise WeloreError(
            f"{', '.join(missing)} never ran while its block processed the calibration text; "
            "curvature-aware methods need targets that the calibration tokens pass through."
        )
    for name in targets:
        stats[name].loss_tokens = predicted
        stats[name].check(name)
    clipped = {name: stats[name].clipped for name in targets if stats[name].clipped}
    if clipped:
        log.warning("output gradients of %d tokens were more than %.0e times their batch's median squared norm and "
                    "were scaled down to that bound, in %d target matrices (most: %s, %d tokens)",
                    sum(clipped.values()), OUTLIER_FACTOR, len(clipped), max(clipped, key=clipped.get),
                    max(clipped.values()))
    return {name: stats[name] for name in targets}

