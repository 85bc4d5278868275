"""Resumable training state: a run folder beside the output, one atomic folder per checkpoint.

    OUT.checkpoints/
        run.json                    what defines the run: the config's options by their command-line
                                    names (minus those that do not change the trajectory), a model
                                    fingerprint, a data hash
        step-000020/                the latest checkpoint (older ones are removed once it is complete)
            trainable.safetensors   the trainable parameters (frozen ones come from the model)
            optimizer.pt            the optimizer's state dict (tensors, numbers and strings only:
                                    read back with torch.load(..., weights_only=True))
            rng.safetensors         every process's torch CPU (and CUDA) generator states
            state.json              step, position in the data stream, losses, validation history,
                                    the scheduler's state, every process's python and numpy RNG states

Under several processes (DDP) only the main process writes; the other processes' RNG states
reach it through the loop (`rng_state` in each, gathered), so a resumed run restores each
process's own RNG streams. The number of processes is part of the run's identity: it sets the
global batch, so a run resumes only under as many processes as it started with.

A run folder exists only while a run is unfinished: it is removed once the final checkpoint
is saved to OUT. `--resume` refuses a run folder whose run.json differs from the current run's.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from welore._io import atomic_dir, write_json
from welore.data import LEGACY_BOS
from welore.errors import WeloreError
from welore.finetune.config import FinetuneConfig
from welore.options import flag, flat_values

log = logging.getLogger(__name__)

RUN_FORMAT = "welore-finetune-run"
RUN_VERSION = 3  # 2: RNG states per process, the number of processes in run.json; 3: the teacher's fingerprint
# Options that change neither the trained weights nor the data order (the device: only their
# rounding): a resume may change them.
_FREE_OPTIONS = ("eval_every", "save_every", "device", "version")


def checkpoints_dir(out: str | Path) -> Path:
    """The run folder of output folder `out`: `OUT.checkpoints` beside it."""
    out = Path(out)
    return out.with_name(f"{out.name}.checkpoints")


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """Name -> "shape dtype sum abs-sum" of every parameter, and of the weights stored as
    buffers (packed quantized codes, their scales and zero points): tells models apart cheaply."""
    prints = {}
    packed = {f"{n}.{b}" for n, m in model.named_modules() if hasattr(m, "packed_parameters")
              for b, _ in m.named_buffers(recurse=False)}
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n in packed)]
    with torch.no_grad():
        for name, param in tensors:
            values = param.detach().double()
            prints[name] = (f"{tuple(param.shape)} {param.dtype} "
                            f"{values.sum().item():.6e} {values.abs().sum().item():.6e}")
    return prints


def run_identity(config: FinetuneConfig, model_print: dict[str, str], data_print: str, processes: int = 1,
                 teacher_print: dict[str, str] | None = None, engine: str = "ddp") -> dict:
    """What a resumed run must share with the run it continues. The config is recorded flat, by
    option (`--lora-rank` as "lora_rank"), as every welore wrote it, so that a run saved before the
    config's fields were grouped resumes. A distillation teacher is not saved in checkpoints (it
    is frozen, and loaded again), only its fingerprint."""
    options = {k: v for k, v in _options(config).items() if k not in _FREE_OPTIONS}
    return {"format": RUN_FORMAT, "version": RUN_VERSION, "config": options, "model": model_print, "data": data_print,
            "processes": processes, "engine": engine, "teacher": teacher_print}


def _options(config: FinetuneConfig) -> dict:
    """The config's option values as JSON has them, by option: {"lora_rank": 8, ...}."""
    return flat_values(FinetuneConfig, config.to_dict())


def _difference(saved: dict, current: dict) -> str | None:
    """What differs between two run identities, in words, or None."""
    if saved.get("format") != RUN_FORMAT:
        return "its run.json is not a welore fine-tuning run"
    if saved.get("version") != RUN_VERSION:
        return f"its run.json is of version {saved.get('version')} and this welore writes version {RUN_VERSION}"
    if saved.get("processes") != current["processes"]:
        return f"the number of processes, {saved.get('processes')} vs {current['processes']},"
    if saved.get("engine", "ddp") != current["engine"]:
        return f"the engine, {saved.get('engine', 'ddp')} vs {current['engine']},"
    # an option newer than the saved run had its default then (the BOS policy: none, as blocks were made then)
    defaults = _options(FinetuneConfig()) | {"bos": LEGACY_BOS}
    for key, value in current["config"].items():
        before = saved.get("config", {}).get(key, defaults.get(key))
        if before != value:
            return f"{flag(key)} {before!r} vs {value!r}"
    if saved.get("model") != current["model"]:
        return "the model"
    if saved.get("teacher") != current["teacher"]:
        return "the distillation teacher"
    if saved.get("data") != current["data"]:
        return "the training or validation data"
    return None


def start_run(run_dir: Path, identity: dict) -> None:
    """Create the run folder (replacing an old one) with its run.json."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    write_json(run_dir / "run.json", identity, indent=1)


def latest_checkpoint(run_dir: Path) -> Path | None:
    steps = sorted(p for p in run_dir.glob("step-*") if p.is_dir() and (p / "state.json").is_file())
    return steps[-1] if steps else None


def check_resumable(run_dir: Path, identity: dict) -> Path:
    """The latest checkpoint of the run in `run_dir`, after checking it is the same run."""
    checkpoint = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if checkpoint is None:
        raise WeloreError(f"There is no checkpoint to resume in {run_dir}; drop --resume to start a new run "
                          "(and pass --save-every N to write checkpoints).")
    try:
        saved = json.loads((run_dir / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        saved = {}
    what = _difference(saved, identity)
    if what is not None:
        raise WeloreError(f"{run_dir} was written by a different run ({what} differs); "
                          "use a new --out or the same options.")
    return checkpoint


@dataclass
class TrainingState:
    step: int = 0  # optimizer steps done
    items: int = 0  # training blocks consumed from the stream (all processes)
    losses: list[float] = field(default_factory=list)  # mean loss per optimizer step
    history: list[dict] = field(default_factory=list)  # {"step", "val_ppl"}


def rng_state() -> dict:
    """This process's RNG states: torch's CPU (and CUDA) generators, python's and numpy's."""
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss], "numpy": None}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("numpy") is not None:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def trainable_state(model: nn.Module, optimizer: torch.optim.Optimizer, names: list[str],
                    sharded: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """The trainable parameters and the optimizer's state dict, whole, for `save_checkpoint`.

    Under FSDP (`sharded`) every process must call it and only the main process gets them."""
    if sharded:
        from welore.finetune.sharding import gather_trainable

        return gather_trainable(model, optimizer, names)
    params = dict(model.named_parameters())
    return {n: params[n].detach() for n in names}, optimizer.state_dict()


def save_checkpoint(run_dir: Path, state: TrainingState, params: dict[str, torch.Tensor], optimizer_state: dict,
                    scheduler, rng_states: list[dict]) -> Path:
    """Write checkpoint `step-N` atomically, then remove the older ones (the main process only).

    `params` and `optimizer_state` come from `trainable_state`; `rng_states` holds every
    process's `rng_state()`, process 0 first.
    """
    path = run_dir / f"step-{state.step:06d}"
    with atomic_dir(path, overwrite=True) as tmp:
        save_file({n: t.contiguous().cpu() for n, t in params.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        generators = {}
        for rank, rng in enumerate(rng_states):
            generators[f"rank{rank}.torch"] = rng["torch"]
            generators |= {f"rank{rank}.cuda{i}": s for i, s in enumerate(rng.get("cuda", []))}
        save_file(generators, str(tmp / "rng.safetensors"))
        payload = {"step": state.step, "items": state.items, "losses": state.losses, "history": state.history,
                   "scheduler": scheduler.state_dict(),
                   "rng": [{"python": rng["python"], "numpy": rng["numpy"]} for rng in rng_states]}
        write_json(tmp / "state.json", payload, indent=None)
    for old in run_dir.glob("step-*"):
        if old != path:
            shutil.rmtree(old, ignore_errors=True)
    log.info("saved checkpoint %s", path)
    return path


def load_checkpoint(path: Path, model: nn.Module, names: list[str], optimizer: torch.optim.Optimizer,
                    scheduler, rank: int = 0, sharded: bool = False) -> TrainingState:
    """Restore weights, optimizer, scheduler and process `rank`'s RNG states from checkpoint `path`.

    Under FSDP (`sharded`) every process must call it: each reads the whole checkpoint and
    keeps its shard."""
    data = json.loads((path / "state.json").read_text())
    tensors = load_file(path / "trainable.safetensors")
    if set(tensors) != set(names):
        raise WeloreError(f"{path} holds other trainable parameters than this run trains; "
                          "use a new --out or the same options.")
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    if sharded:
        from welore.finetune.sharding import scatter_trainable

        scatter_trainable(model, optimizer, tensors, optimizer_state)
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(data["scheduler"])
    generators = load_file(path / "rng.safetensors")
    prefix = f"rank{rank}."
    cuda = sorted((k for k in generators if k.startswith(prefix + "cuda")),
                  key=lambda k: int(k.removeprefix(prefix + "cuda")))
    set_rng_state({"torch": generators[prefix + "torch"], "cuda": [generators[k] for k in cuda]} | data["rng"][rank])
    log.info("resumed from %s", path)
    return TrainingState(step=data["step"], items=data["items"], losses=data["losses"], history=data["history"])
