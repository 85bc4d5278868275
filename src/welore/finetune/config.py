"""`FinetuneConfig` (what to train, how, on what) and `FinetuneResult` (what came out).

The config is a small dataclass that round-trips through JSON (`to_dict`/`from_dict`) and
carries a version; it is recorded beside every fine-tuned checkpoint (`finetune.json`) and
in every resumable run folder, where it decides whether a `--resume` continues the same run.
General training settings are its own fields; the settings of one mode, optimizer or loss are
a group each (`LrcOptions`, `LoraOptions`, `GaLoreOptions`, `DistillOptions`): `config.lora.rank`,
which the command line still spells `--lora-rank` (`welore.options`).

This module is the bottom of `welore.finetune`: it names the modes and optimizers that exist,
and `trainable` (one strategy per mode) and `optimizers` (one builder per optimizer) follow it.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from torch import nn

from welore.data import DEFAULT_TEXT, LEGACY_BOS, bos_option, check_bos_policy
from welore.devices import resolve_device
from welore.errors import WeloreError
from welore.options import check_positive, nested_values
from welore.versioned import check_version, config_from_dict, report_unknown

CONFIG_VERSION = 2  # 2: the settings of a mode, optimizer or loss grouped (1: every option at the top level)
MODE_NAMES = ("lrc", "lora", "full")  # what trains; one strategy each in welore.finetune.trainable.MODES
OPTIMIZER_NAMES = ("adamw", "galore", "fira")  # one builder each in welore.finetune.optimizers.OPTIMIZERS
PRECISIONS = ("no", "bf16", "fp16")
TEACHER_DTYPES = ("float32", "bfloat16")  # dtypes the distillation teacher may run in
DEFAULT_LR = {"lrc": 1e-4, "lora": 5e-4, "full": 3e-5}  # when lr is None; short runs, AdamW


@dataclass
class LrcOptions:
    """What trains in `--mode lrc` besides the factors of the LRC matrices (`welore.finetune.trainable`)."""

    min_cut: float = field(default=0.5, metadata={"flag": "lrc_min_cut"})  # a matrix whose rank is cut by at least
        # this fraction is an LRC
    train_nlrc: bool = False  # also train the N-LRC matrices (dense or lightly cut)
    train_norms: bool = False  # also train the normalisation layers' weights

    def __post_init__(self) -> None:
        if not 0 < self.min_cut <= 1:
            raise WeloreError(f"--lrc-min-cut {self.min_cut} is outside (0, 1]; use e.g. 0.5.")


@dataclass
class LoraOptions:
    """The adapters of `--mode lora` (peft)."""

    rank: int = field(default=8, metadata={"flag": "lora_rank"})  # rank r of each adapter
    alpha: float = field(default=16.0, metadata={"flag": "lora_alpha"})  # adapter scale alpha (the update is
        # alpha/r · B·A)
    dropout: float = field(default=0.0, metadata={"flag": "lora_dropout"})  # dropout on the adapter's input
    targets: list[str] | None = field(default=None, metadata={"flag": "lora_targets", "metavar": "PATTERN"})  # Linear
        # module patterns (exact, glob, re:); default: the target matrices
    keep_adapter: bool = False  # save the adapter (out/adapter) instead of merging it into the weights

    def __post_init__(self) -> None:
        check_positive(self, ("rank",))


@dataclass
class GaLoreOptions:
    """The gradient projection of `--optimizer galore` and `fira` (`welore.optim`)."""

    rank: int = field(default=128, metadata={"flag": "galore_rank"})  # rank of the gradient projection (capped by
        # each matrix's smaller side)
    gap: int = field(default=200, metadata={"flag": "galore_gap"})  # recompute the projection every this many steps
    scale: float = field(default=0.25, metadata={"flag": "galore_scale"})  # scale of the projected-back update

    def __post_init__(self) -> None:
        check_positive(self, ("rank", "gap"))


@dataclass
class DistillOptions:
    """Distillation from a teacher, `--distill` (`welore.finetune.distill`)."""

    enabled: bool = field(default=False, metadata={"flag": "distill"})  # train against the teacher's next-token
        # distribution (KL on the logits), not only the next token
    teacher: str | None = field(default=None, metadata={"metavar": "MODEL"})  # the --distill teacher; default: the
        # dense model a welore checkpoint came from (its welore.json source)
    alpha: float = field(default=1.0, metadata={"flag": "distill_alpha"})  # loss = alpha·KL(teacher ‖ student) +
        # (1 - alpha)·LM loss: 1 = pure distillation, 0 = plain LM loss
    temperature: float = field(default=1.0, metadata={"flag": "distill_temperature"})  # softens both distributions
        # before the KL (which is then scaled by its square)
    teacher_dtype: str = field(default="float32", metadata={"choices": TEACHER_DTYPES})  # the teacher's weights:
        # float32, or bfloat16 for half its memory

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise WeloreError(f"--distill-alpha must be in [0, 1] (the KL's share of the loss), got {self.alpha}.")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise WeloreError(f"--distill-temperature must be a positive number, got {self.temperature}.")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise WeloreError(f"Unknown --teacher-dtype {self.teacher_dtype!r}; "
                              f"choose one of {', '.join(TEACHER_DTYPES)}.")
        if self.teacher is not None and not self.enabled:
            raise WeloreError(f"--teacher {self.teacher} is only used with --distill; add --distill or drop --teacher.")


@dataclass
class FinetuneConfig:
    mode: str = field(default="lrc", metadata={"choices": MODE_NAMES})  # what trains: lrc (WeLore's low-rank
        # components), lora (peft adapters) or full
    optimizer: str = field(default="adamw", metadata={"choices": OPTIMIZER_NAMES})  # adamw, galore or fira
        # (welore.optim) on the trainable matrices
    steps: int = 100  # optimizer steps
    lr: float | None = None  # peak learning rate; default: the mode's own
        # (DEFAULT_LR: lrc 1e-4, lora 5e-4, full 3e-5)
    warmup_steps: int = 0  # linear warm-up steps, then cosine decay to 0 at `steps`
    weight_decay: float = 0.0  # AdamW's decoupled weight decay, on every trainable parameter
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's moment decay rates
    batch_size: int = 4  # blocks per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float | None = 1.0  # clip the global gradient norm to this; 0 = no clipping
    precision: str = field(default="no", metadata={"choices": PRECISIONS})  # autocast: no, bf16 or fp16 (accelerate's
        # mixed_precision; fp16 needs CUDA)
    seed: int = 0  # seeds torch/python/numpy RNGs, the data order and LoRA's initialisation
    device: str = "auto"  # where to train: auto (the GPU when there is one), cpu, cuda, cuda:N or mps
    # data
    data: str = DEFAULT_TEXT  # text spec: wiki/news (train on calib split, validate on eval split), a file, hf:...
    seq_len: int = 256  # tokens per training/validation block
    max_train_tokens: int | None = None  # use at most this many training tokens (default: all the text)
    val_tokens: int = 4096  # validation tokens
    val_fraction: float = 0.1  # share of a single text's blocks held out for validation (files, datasets)
    bos: str = bos_option()  # recorded as used: yes or no (welore.data.resolve_bos)
    eval_every: int = 0  # validation perplexity every N optimizer steps (0 = only before and after)
    save_every: int = 0  # resumable checkpoint every N optimizer steps (0 = none)
    # what trains besides the mode's matrices, and the settings of each mode, optimizer and loss
    lrc: LrcOptions = field(default_factory=LrcOptions)  # --mode lrc: which matrices are LRCs, what else trains
    train_scales: bool = False  # also train the per-group scales and offsets of packed quantized matrices
        # (codes frozen; PEQA)
    lora: LoraOptions = field(default_factory=LoraOptions)  # --mode lora: the adapters
    galore: GaLoreOptions = field(default_factory=GaLoreOptions)  # --optimizer galore or fira: the projection
    distill: DistillOptions = field(default_factory=DistillOptions)  # --distill: the teacher and the loss
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.mode not in MODE_NAMES:
            raise WeloreError(f"Unknown fine-tuning mode {self.mode!r}; choose one of {', '.join(MODE_NAMES)}.")
        if self.optimizer not in OPTIMIZER_NAMES:
            raise WeloreError(f"Unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZER_NAMES)}.")
        resolve_device(self.device)  # a device that is not here: one sentence, before anything loads
        check_bos_policy(self.bos)
        if self.precision not in PRECISIONS:
            raise WeloreError(f"Unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}.")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.max_grad_norm == 0:
            self.max_grad_norm = None
        if self.lr is None:
            self.lr = DEFAULT_LR[self.mode]
        positive = {"steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "val_tokens": self.val_tokens}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise WeloreError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}.")
        for name in ("warmup_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise WeloreError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}.")
        if self.warmup_steps >= self.steps:
            raise WeloreError(f"--warmup-steps ({self.warmup_steps}) must be fewer than --steps ({self.steps}).")
        if self.seq_len < 2:
            raise WeloreError(f"--seq-len must be at least 2, got {self.seq_len}.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise WeloreError(f"--lr must be a positive number, got {self.lr}.")
        if not 0 < self.val_fraction < 1:
            raise WeloreError(f"--val-fraction must be in (0, 1), got {self.val_fraction}.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise WeloreError(f"--max-grad-norm must be positive, got {self.max_grad_norm}.")
        if self.max_train_tokens is not None and self.max_train_tokens < self.seq_len:
            raise WeloreError(f"--max-train-tokens ({self.max_train_tokens}) is less than one block of "
                              f"--seq-len ({self.seq_len}); raise it or lower --seq-len.")

    @property
    def tokens_per_step(self) -> int:
        """Training tokens per optimizer step in one process."""
        return self.batch_size * self.grad_accum * self.seq_len

    def to_dict(self) -> dict:
        data = asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict, what: str = "The fine-tuning config") -> FinetuneConfig:
        """Read `to_dict` output back (version checked, unknown keys reported), or the flat dict
        of version 1, which held every option at the top level under its option's name."""
        if check_version(data, "version", CONFIG_VERSION, what) < 2:
            data = nested_values(cls, data) | {"version": CONFIG_VERSION}
        if "bos" not in data:  # earlier versions: blocks never started with BOS
            data = {**data, "bos": LEGACY_BOS}
        hints = typing.get_type_hints(cls)
        groups = {f.name: _group_from_dict(hints[f.name], data[f.name], f"{what} ({f.name})")
                  for f in fields(cls) if f.name in data and is_dataclass(hints[f.name])}
        return config_from_dict(cls, data | groups, what, CONFIG_VERSION)


def _group_from_dict(cls: type, data: object, what: str):
    """A group of `FinetuneConfig` from its dict, with `config_from_dict`'s checks and messages."""
    if not isinstance(data, dict):
        raise WeloreError(f"{what} is not a JSON object; re-create it with welore.")
    try:
        return cls(**report_unknown(data, (f.name for f in fields(cls)), what))
    except WeloreError as err:
        raise WeloreError(f"{what} holds a bad value: {err}") from None
    except (TypeError, ValueError) as err:
        raise WeloreError(f"{what} holds a value of the wrong type ({err}); re-create it with welore.") from None


@dataclass
class FinetuneResult:
    model: nn.Module  # the fine-tuned model (LoRA merged into it unless lora.keep_adapter)
    config: FinetuneConfig  # the configuration it was trained with (lr resolved)
    trainable_params: int  # parameters that trained
    total_params: int  # all unique parameters of the model that trained (adapters included)
    trainable_names: list[str] = field(default_factory=list)  # their names, in model order
    steps: int = 0  # optimizer steps taken in total (earlier runs included when resumed)
    train_tokens: int = 0  # training tokens seen in total, all processes
    epochs: float = 0.0  # passes over the training blocks those tokens made (above 1: blocks seen again)
    val_ppl_before: float | None = None  # validation perplexity before the first step
    val_ppl_after: float | None = None  # and after the last
    history: list[dict] = field(default_factory=list)  # {"step", "val_ppl"} before, every eval_every, after
    losses: list[float] = field(default_factory=list)  # mean training loss of each optimizer step, all processes
    train_seconds: float = 0.0  # wall time of this process's training steps (no evaluation, no saving)
    tokens_per_s: float | None = None  # training tokens per second of this run's steps
    peak_memory_bytes: int | None = None  # peak during training above the level before it (RSS / CUDA)
    total_peak_memory_bytes: int | None = None  # absolute peak during training
    processes: int = 1  # processes that trained together (DDP under accelerate launch)
    process_peak_memory_bytes: list[int | None] = field(default_factory=list)  # absolute peak of each process, 0 first
    resumed_from: int | None = None  # the step this run resumed from, if it did
    out: Path | None = None  # where the checkpoint was saved

    def to_dict(self) -> dict:
        skip = ("model", "config", "trainable_names")
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        data["config"] = self.config.to_dict()
        data["out"] = str(self.out) if self.out is not None else None
        return data

    def summary(self) -> str:
        """A few lines for people: trainable share, perplexity before/after, speed."""
        share = self.trainable_params / self.total_params if self.total_params else 0.0
        lines = [
            f"trainable parameters: {self.trainable_params:,} of {self.total_params:,} ({share:.2%})",
            f"steps: {self.steps} ({self.train_tokens:,} training tokens"
            + (f", {self.epochs:.2f} passes over the training text)" if self.epochs > 1 else ")")
            + (f", resumed from step {self.resumed_from}" if self.resumed_from else ""),
        ]
        if self.val_ppl_before is not None and self.val_ppl_after is not None:
            lines.append(f"validation perplexity: {self.val_ppl_before:.3f} -> {self.val_ppl_after:.3f}")
        if self.tokens_per_s is not None:
            memory = (f", peak memory +{self.peak_memory_bytes / 1e6:.0f} MB"
                      if self.peak_memory_bytes is not None else "")
            processes = f" ({self.processes} processes; memory of the main process)" if self.processes > 1 else ""
            lines.append(f"training speed: {self.tokens_per_s:.1f} tokens/s{memory}{processes}")
        return "\n".join(lines)
