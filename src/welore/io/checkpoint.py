"""Save and reload compressed models; export them as ordinary dense transformers folders.

A welore checkpoint is a folder:

    config.json             the model's transformers config (unchanged by compression)
    welore.json             format name and version, the recipe that ran (`welore.recipe`: its
                            stages' configs, calibration resolved), the source model, and which
                            state-dict names alias one stored tensor (tied weights)
    rank_plan.json          the rank plan (module name -> shape, kept rank or null = dense)
    quant_plan.json         for a quantized model: per matrix its bits, group size and
                            compensation rank (`welore.quant`); its packed codes, float16
                            scales/zero points and factors are ordinary tensors of the weights
    model.safetensors       the weights, low-rank factors included; no pickle anywhere (or, past
                            `max_shard_bytes`, shards model-0000i-of-0000N.safetensors plus
                            model.safetensors.index.json, as save_pretrained writes them)
    tokenizer files         when the source model had a tokenizer

`save(model, out, record=report.record)` writes what `welore.compress_` returned; `load_checkpoint`
gives the model and that record back (`load` the model alone). Nothing is attached to the model:
without a record, `save` reads the plans off its `LowRankLinear` and `QuantizedLinear` modules.

`load` never recomputes an SVD: it builds the model from its config with empty (meta)
parameters, swaps in empty `LowRankLinear` (and `QuantizedLinear`) modules from the plans, then assigns the stored
tensors (`load_state_dict(..., assign=True)`), checking that names and shapes match exactly;
`load(path, stream=True)` instead reads only the weights outside the decoder blocks and
leaves the blocks on disk until they are used (`welore.io.stream`).

`save` and `export_dense` write block by block through `welore.io.stream.ShardWriter`, reading
each block of a streamed model only while it is written, so neither needs the whole model in
memory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from welore import __version__
from welore._io import atomic_dir, check_output_dir, write_json
from welore.errors import WeloreError
from welore.io.stream import DEFAULT_SHARD_BYTES, Blocks, ShardWriter, TensorFiles, block_access, should_stream, stream_
from welore.io.stream import WEIGHTS as WEIGHTS  # the single-file name, re-exported
from welore.lowrank.compress import CompressConfig, apply_plan_
from welore.lowrank.module import LowRankLinear
from welore.lowrank.plan import RankPlan
from welore.modules import swap_module
from welore.quant import QuantConfig, QuantizedLinear, QuantPlan, apply_quant_plan_
from welore.recipe import Recipe, Record, model_plans
from welore.versioned import check_version, report_unknown

log = logging.getLogger(__name__)

FORMAT = "welore-checkpoint"
FORMAT_VERSION = 2  # 2: the recipe that ran replaces version 1's compress_config and quant_config
META_KEYS = ("format", "format_version", "welore_version", "source", "recipe", "aliases", "achieved_ratio",
             "compress_config", "quant_config")  # save() writes; the last two: version 1 only
QUANT_PLAN = "quant_plan.json"


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "welore.json").is_file()


def _dedup(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict with each shared tensor stored once, and alias name -> stored name."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state.items():
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors, aliases


def _write_weights(access: Blocks, folder: Path, max_shard_bytes: int, change_block=None) -> dict[str, str]:
    """Write the model's weights into `folder`, the tensors outside the blocks first, then one
    block at a time (read, optionally changed by `change_block(block, prefix)`, written,
    released). Returns the aliases (tied tensors stored once)."""
    writer = ShardWriter(folder, max_shard_bytes=max_shard_bytes)
    tensors, aliases = _dedup(access.state_dict_outside())
    writer.add(tensors)
    for k in range(len(access)):
        with access.use(k, keep_changes=False) as block:
            if change_block is not None:
                change_block(block, access.prefix(k))
            tensors, block_aliases = _dedup(access.block_state_dict(k))
            writer.add(tensors)
            aliases.update(block_aliases)
    writer.close()
    return aliases


def save(
    model: PreTrainedModel,
    out: str | Path,
    tokenizer=None,
    overwrite: bool = False,
    source: str | None = None,
    max_shard_bytes: int | None = None,
    record: Record | None = None,
) -> Path:
    """Write a compressed model to folder `out`, with `record` (`CompressReport.record`, or the
    one `load_checkpoint` returns): its recipe and plans. Without a record, the plans are read
    off the model's modules (`model_plans`) and the recipe is recorded as unknown.

    Weights go in shards of at most `max_shard_bytes` (default 5 GB; a streamed model writes
    one shard per decoder block, so no more than one block is ever held in memory)."""
    if record is None:
        plan, quant_plan = model_plans(model)
        if plan.method == "dense":
            raise WeloreError("This model is not compressed by welore (it has no low-rank or quantized layers); "
                              "compress it first or use save_pretrained.")
        record = Record(plan=plan, quant_plan=quant_plan)
    _check_record_fits(model, record)
    access = block_access(model)
    if max_shard_bytes is None:
        max_shard_bytes = 1 if access.streamed else DEFAULT_SHARD_BYTES
    with atomic_dir(out, overwrite=overwrite) as tmp:
        aliases = _write_weights(access, tmp, max_shard_bytes)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "welore_version": __version__,
            "source": source or record.source,
            "recipe": record.recipe.to_dict(),
            "aliases": aliases,
            "achieved_ratio": record.plan.achieved_ratio,
        }
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        record.plan.save(tmp / "rank_plan.json")
        if record.quant_plan is not None:
            record.quant_plan.save(tmp / QUANT_PLAN)
        write_json(tmp / "welore.json", meta)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    log.info("saved welore checkpoint to %s", out)
    return Path(out)


def _check_record_fits(model: nn.Module, record: Record) -> None:
    """A record whose plans do not describe the model's modules is a caller's bug: the checkpoint
    would not load."""
    low_rank = {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert set(record.plan.factorized) == low_rank, "the record's rank plan does not match the model's low-rank layers"
    assert set(record.quant_plan.shapes if record.quant_plan else ()) == quantized, \
        "the record's quantization plan does not match the model's quantized layers"


def read_record(path: str | Path) -> Record:
    """The record of checkpoint `path`: its plans, the recipe that ran and the source model.
    A version-1 checkpoint's compress_config and quant_config become the recipe's stages."""
    path = Path(path)
    meta = _read_meta(path)
    plan = RankPlan.load(path / "rank_plan.json")
    quant_plan = QuantPlan.load(path / QUANT_PLAN) if (path / QUANT_PLAN).is_file() else None
    where = path / "welore.json"
    if "recipe" in meta:
        recipe = Recipe.from_dict(meta["recipe"], f"The recipe in {where}")
    else:
        stages = []
        if plan.method not in ("quantize", "dense"):  # version 1 wrote those for no low rank
            stages.append(CompressConfig.from_dict(meta.get("compress_config", {}),
                                                   f"The compression config in {where}"))
        if quant_plan is not None and "quant_config" in meta:
            stages.append(QuantConfig.from_dict(meta["quant_config"], f"The quantization config in {where}"))
        recipe = Recipe(stages)
    return Record(plan=plan, quant_plan=quant_plan, recipe=recipe, source=meta.get("source"))


def _read_meta(path: Path) -> dict:
    if not path.is_dir():
        raise WeloreError(f"{path} is not a folder; pass a folder written by `welore compress`.")
    if not is_checkpoint(path):
        raise WeloreError(f"{path} is not a welore checkpoint (no welore.json); "
                          "pass a folder written by `welore compress`.")
    try:
        meta = json.loads((path / "welore.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeloreError(f"{path / 'welore.json'} is unreadable ({err}); re-create the checkpoint.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise WeloreError(f"{path / 'welore.json'} does not describe a welore checkpoint; re-create the checkpoint.")
    check_version(meta, "format_version", FORMAT_VERSION, str(path / "welore.json"))
    return report_unknown(meta, META_KEYS, str(path / "welore.json"))


def empty_model(path: Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The model's architecture from its config, parameters on the meta device (in `dtype`,
    default the config's), buffers real."""
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise WeloreError(f"Cannot read the model config in {path} ({err}); check the folder.") from None
    stored = getattr(config, "dtype", None)
    dtype = dtype or (stored if isinstance(stored, torch.dtype) else None) or torch.float32
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


@dataclass
class Checkpoint:
    model: PreTrainedModel  # in eval mode
    record: Record  # its plans, the recipe that made it and its source model


def load(
    path: str | Path, device: str | torch.device | None = None, stream: bool = False, dtype: torch.dtype | None = None,
    budget: int | None = None, tokenizer: bool = False,
):
    """Rebuild a saved compressed model; its logits equal those of the model that was saved.
    With `tokenizer=True`, (model, tokenizer) — the tokenizer saved beside it, None if none was.
    (`load_checkpoint` gives its record too.)"""
    model = load_checkpoint(path, device, stream, dtype, budget).model
    if not tokenizer:
        return model
    return model, saved_tokenizer(Path(path))


def saved_tokenizer(path: Path):
    """The tokenizer saved in folder `path` (AutoTokenizer), None when it holds none."""
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_checkpoint(
    path: str | Path, device: str | torch.device | None = None, stream: bool = False, dtype: torch.dtype | None = None,
    budget: int | None = None,
) -> Checkpoint:
    """A saved compressed model, rebuilt, and its record (`read_record`).

    `stream=True` reads only the weights outside the decoder blocks now; each block is read
    from the checkpoint's safetensors when it is used (`welore.io.stream`), in `dtype` (default:
    as stored).
    """
    path = Path(path)
    record = read_record(path)
    plan, quant_plan = record.plan, record.quant_plan
    aliases = _read_meta(path).get("aliases", {})
    if stream:
        model = empty_model(path, dtype)
        apply_plan_(model, plan, empty=True)
        if quant_plan is not None:
            apply_quant_plan_(model, quant_plan, empty=True)
        stream_(model, path, aliases=aliases, device=device or "cpu", budget=budget)
    else:
        model = _empty_model_stored(path, plan, quant_plan)
        files = TensorFiles(path, aliases)
        tensors = files.read(files.names(), device=device if device is not None else "cpu")
        expected = model.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        wrong = sorted(n for n in set(expected) & set(tensors) if expected[n].shape != tensors[n].shape)
        if missing or unexpected or wrong:
            first = (missing or unexpected or wrong)[0]
            raise WeloreError(
                f"The weights in {path} do not match the rank plan ({len(missing)} missing, "
                f"{len(unexpected)} unexpected, {len(wrong)} mis-shaped, e.g. {first}); re-create the checkpoint."
            )
        model.load_state_dict(tensors, assign=True)
        model.tie_weights()
        if dtype is not None:
            model = model.to(dtype)
    model.eval()
    return Checkpoint(model, record)


def _empty_model_stored(path: Path, plan: RankPlan, quant_plan: QuantPlan | None = None) -> PreTrainedModel:
    """The empty model whose parameters `load_state_dict(assign=True)` replaces as stored."""
    model = empty_model(path)
    apply_plan_(model, plan, empty=True)
    if quant_plan is not None:
        apply_quant_plan_(model, quant_plan, empty=True)
    return model


def densify_(
    model: nn.Module, skeleton: dict[str, type] | None = None, prefix: str = "", skip: str | None = None
) -> list[str]:
    """Multiply every `LowRankLinear` back (and dequantize every `QuantizedLinear`, its
    compensation added) into the dense layer type the architecture uses.

    `model` may be one decoder block, with `prefix` its name in the whole model and `skeleton`
    the whole model's module types (`_skeleton_types`). Modules under `skip.` are left alone."""
    skeleton = skeleton if skeleton is not None else _skeleton_types(model)
    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, (LowRankLinear, QuantizedLinear)) or (skip and name.startswith(f"{skip}.")):
            continue
        if any(name.startswith(f"{done}.") for done in replaced):  # a quantized factor of a LowRankLinear
            continue
        weight = module.dense_weight().detach()  # (out, in)
        if isinstance(module, QuantizedLinear):
            weight = weight.to(module.weight_dtype)
        bias = module.up.bias if isinstance(module, LowRankLinear) else module.bias
        if skeleton.get(prefix + name) is Conv1D:
            dense: nn.Module = Conv1D(module.out_features, module.in_features)
            dense.weight = nn.Parameter(weight.t().contiguous())  # Conv1D stores (in, out)
        else:
            dense = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
            dense.weight = nn.Parameter(weight)
        if bias is not None:
            dense.bias = nn.Parameter(bias.detach().clone())
        swap_module(model, name, dense)
        replaced.append(name)
    return replaced


def _skeleton_types(model: PreTrainedModel) -> dict[str, type]:
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(model.config)
    return {name: type(module) for name, module in skeleton.named_modules()}


def export_dense(
    path: str | Path, out: str | Path, overwrite: bool = False, stream: bool | None = None,
    max_shard_bytes: int | None = None, budget: int | None = None,
) -> Path:
    """Write checkpoint `path` as a plain transformers folder that `from_pretrained` loads.

    The folder holds what `save_pretrained` writes (config, generation config, weights in
    shards of at most `max_shard_bytes` plus their index, tied weights stored once). Blocks are
    multiplied back and written one at a time; with `stream=True` each is also read from `path`
    only then, so the whole model is never in memory (within `budget` bytes, if given). By
    default it streams when a `budget` is given or the checkpoint would not fit in memory.
    """
    check_output_dir(out, overwrite)
    if stream is None:
        stream = should_stream(Path(path), None, budget)
    model = load(path, stream=stream, budget=budget)
    access = block_access(model)
    skeleton = _skeleton_types(model)
    densify_(model, skeleton, skip=access.list_name if access.streamed else None)  # streamed: outside the blocks
    if max_shard_bytes is None:
        max_shard_bytes = 1 if access.streamed else DEFAULT_SHARD_BYTES
    with atomic_dir(out, overwrite=overwrite) as tmp:
        _write_weights(access, tmp, max_shard_bytes,
                       change_block=lambda block, prefix: densify_(block, skeleton, prefix))
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                     "merges.txt", "tokenizer.model", "chat_template.jinja", "added_tokens.json"):
            if (Path(path) / name).is_file():
                (tmp / name).write_bytes((Path(path) / name).read_bytes())
    return Path(out)
