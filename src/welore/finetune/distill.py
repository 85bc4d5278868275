"""Recovery by distillation: train the student against the dense teacher's next-token distribution.

Knowledge distillation (Hinton et al. 2015) on the logits. At every position t of a block the
student's loss is the KL divergence from the teacher's softened distribution to its own,

    KL_t = Σ_v p_v · (log p_v − log q_v),   p = softmax(z_teacher / τ),  q = softmax(z_student / τ)

averaged over every position of the batch and multiplied by τ² (so that the gradient's size
does not shrink as the temperature τ grows). The LM loss (cross-entropy on the next token) can
be mixed in: loss = α·KL + (1 − α)·LM; α = 1 is pure distillation, α = 0 plain fine-tuning.

The teacher is the dense model the compressed model came from (a welore checkpoint records
its source in welore.json; a fine-tuned checkpoint's source is followed back to the dense
model) or any model named explicitly with the same vocabulary. It runs on the fly, frozen,
under `no_grad`, on the same device as the student, optionally in bfloat16 to halve its
memory. On-the-fly rather than cached top-k logits: the teacher's forward costs about a third
of the student's forward + backward, caching SmolLM2's 49K-way distribution even at top-64
would take ~0.5 KB per token on disk, and a cache would tie a run to one data order; the
teacher is recomputed exactly after `--resume`, so only its identity goes into a run's record.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from welore.errors import WeloreError

log = logging.getLogger(__name__)

_MAX_HOPS = 8  # source links followed from a checkpoint back to its dense model


class _DistillKL(torch.autograd.Function):
    """τ²·mean KL(p ‖ q) with the gradient written out: ∂/∂z_student = τ·(q − p)/N.

    Autograd through log_softmax would give −p + q·Σp, which is ~1e-11 rather than 0 when the
    student equals the teacher (Σp is 1 only up to rounding), and Adam turns even such a
    gradient into a step; written out, it is exactly zero there.
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        vocab = student.shape[-1]
        log_q = F.log_softmax(student.detach().float().reshape(-1, vocab) / temperature, dim=-1)  # (N, V)
        log_p = F.log_softmax(teacher.detach().float().reshape(-1, vocab) / temperature, dim=-1)  # (N, V)
        p = log_p.exp()
        n = log_q.shape[0]
        kl = (p * (log_p - log_q)).sum() / n * temperature**2
        ctx.save_for_backward(log_q.exp_().sub_(p))  # q - p, (N, V)
        ctx.scale, ctx.shape, ctx.dtype = temperature / n, student.shape, student.dtype
        return kl

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (q_minus_p,) = ctx.saved_tensors
        return (grad * ctx.scale * q_minus_p).reshape(ctx.shape).to(ctx.dtype), None, None


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """τ² · mean over positions of KL(softmax(teacher/τ) ‖ softmax(student/τ)), in float32.

    Both logits are (B, T, V) (or any (..., V)); the result is a scalar, differentiable in the
    student's logits only.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    return _DistillKL.apply(student_logits, teacher_logits, temperature)


@dataclass
class Distillation:
    """The distillation objective of one run: `loss(model, batch)` for a (B, T) batch of token ids."""

    teacher: nn.Module  # frozen, in eval mode, on the student's device
    alpha: float = 1.0  # weight of the KL term; 1 - alpha weighs the LM loss
    temperature: float = 1.0  # softening of both distributions (τ)

    def loss(self, model: nn.Module, batch: torch.Tensor, autocast: Callable = contextlib.nullcontext) -> torch.Tensor:
        """α·KL(teacher ‖ student) + (1 − α)·LM loss on `batch` (B, T); the teacher runs under
        `no_grad` and `autocast()` (the training loop's mixed precision)."""
        out = model(input_ids=batch, labels=batch if self.alpha < 1 else None, use_cache=False)
        with torch.no_grad(), autocast():
            teacher_logits = self.teacher(input_ids=batch, use_cache=False).logits  # (B, T, V)
        kl = distill_kl(out.logits, teacher_logits, self.temperature)
        if self.alpha == 1:
            return kl
        return self.alpha * kl + (1 - self.alpha) * out.loss


def resolve_teacher(source: str | None, teacher: str | None) -> str:
    """The teacher's spec: `teacher` when given, else the dense model the student was made from.

    `source` is the student checkpoint's recorded source (`Record.source`; None for a model that
    is not a welore checkpoint); when that source is itself a welore checkpoint (a fine-tuned one
    records the compressed model it started from) the chain is followed back.
    """
    if teacher is not None:
        return teacher
    if source is None:
        raise WeloreError("Distillation needs a teacher and this model records no source model (it is not a welore "
                          "checkpoint); name the dense model with --teacher MODEL.")
    from welore.io.checkpoint import _read_meta, is_checkpoint

    for _ in range(_MAX_HOPS):
        path = Path(source).expanduser()
        if not (path.is_dir() and is_checkpoint(path)):
            break
        earlier = _read_meta(path).get("source")
        if earlier is None:
            break
        source = earlier
    return source


def _vocab_size(model: nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None:
        return weight.shape[0] if not getattr(head, "fan_in_fan_out", False) else weight.shape[1]
    return getattr(getattr(model, "config", None), "vocab_size", None)


def check_teacher(model: nn.Module, teacher: nn.Module, tokenizer=None, teacher_tokenizer=None,
                  name: str = "the teacher") -> None:
    """Refuse a teacher whose logits do not index the same tokens as the student's."""
    ours, theirs = _vocab_size(model), _vocab_size(teacher)
    if ours != theirs:
        raise WeloreError(f"{name} predicts {theirs} tokens and the model {ours}, so their distributions cannot be "
                          "compared; distill from a model with the same tokenizer (--teacher MODEL).")
    if (tokenizer is not None and teacher_tokenizer is not None
            and tokenizer.get_vocab() != teacher_tokenizer.get_vocab()):
        raise WeloreError(f"{name} uses another tokenizer than the model (same size, different tokens); "
                          "distill from a model with the same tokenizer (--teacher MODEL).")


def load_teacher(spec: str, model: nn.Module, tokenizer=None, dtype: str = "float32") -> nn.Module:
    """Load the teacher `spec` on the CPU in `dtype`, frozen and in eval mode, checked against `model`."""
    from welore.io.models import load_model

    try:
        loaded = load_model(spec, dtype=dtype, device=None)
    except WeloreError as err:
        raise WeloreError(f"The teacher {spec!r} cannot be loaded ({str(err).rstrip('.')}); "
                          "pass --teacher MODEL.") from None
    check_teacher(model, loaded.model, tokenizer, loaded.tokenizer, name=f"The teacher {spec}")
    return freeze(loaded.model)


def freeze(teacher: nn.Module) -> nn.Module:
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher
