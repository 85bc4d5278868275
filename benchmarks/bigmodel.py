"""welore on LLaMA-shaped models of real size: peak resident memory, wall and CPU time.

    .venv/bin/python benchmarks/bigmodel.py --model tinyllama-1.1b --runs free aware [--dir /tmp/welore-big]
    .venv/bin/python benchmarks/bigmodel.py --model llama2-7b --runs free evaluate
    .venv/bin/python benchmarks/bigmodel.py --model llama2-7b --runs evaluate-dense   # the uncompressed model

The model is random-weight (normal(0, 0.02) linears, unit norms, as LLaMA's `_init_weights`),
built from a public config and saved in bfloat16 as safetensors shards, one decoder block per
shard plus one for the rest, with an index JSON, as `save_pretrained` writes them. The whole
model is never in memory: the skeleton is built on the meta device from `LlamaConfig` only to
read the parameter names and shapes, and each block's tensors are drawn and written on their
own. Runs that feed text (data-aware compression, evaluation) get SmolLM2's tokenizer and its
vocabulary of 49152 instead of 32000. Random weights are fine for time and memory, meaningless
for quality. The folder is deleted afterwards unless --keep.

Each welore command runs in its own child process, with a cache folder of its own (a first
run: no spectra computed before), under `/usr/bin/time -v`: its peak resident
memory, wall time and CPU time (user + system) are reported; time per block = wall / layers.
The 1-minute load average before and after each run says whether the machine was shared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import machine, publish
from accelerate import init_empty_weights
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from welore.io.models import DEFAULT_MODEL, builtin_model_dir

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {  # public configs: TinyLlama-1.1B and LLaMA-2-7B; "tiny" checks the script itself
    "tinyllama-1.1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                           max_position_embeddings=2048, rms_norm_eps=1e-5),
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=256, num_hidden_layers=2, intermediate_size=688,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=32000,
                 max_position_embeddings=512, rms_norm_eps=1e-5),
}
RUNS = {  # name -> welore arguments after the model folder; {out} is a scratch folder
    "free": ["compress", "{model}", "--ratio", "0.2", "--out", "{out}", "--overwrite", "-q"],
    "aware": ["compress", "{model}", "--ratio", "0.2", "--factorizer", "whiten", "--calib", "wiki",
              "--sequential", "--out", "{out}", "--overwrite", "-q"],
    "evaluate": ["evaluate", "{out}", "--max-tokens", "2048", "--no-speed", "-q"],
    "evaluate-dense": ["evaluate", "{model}", "--max-tokens", "2048", "--no-speed", "-q"],
}


TEXT_RUNS = ("aware", "evaluate", "evaluate-dense")  # runs that feed text, so the model gets SmolLM2's tokenizer


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """LLaMA's init: normal(0, 0.02) for linear and embedding weights, ones for RMSNorm weights."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def build(name: str, folder: Path, tokenizer: Path | None = None) -> int:
    """Write the random bf16 model `name` to `folder` block by block; returns its bytes on disk.

    With `tokenizer` (a folder), its tokenizer files are copied in and the vocabulary is the
    tokenizer's (SmolLM2's 49152 instead of 32000), so that text can be fed to the model."""
    shape = dict(CONFIGS[name])
    if tokenizer is not None:
        from transformers import AutoTokenizer

        shape["vocab_size"] = len(AutoTokenizer.from_pretrained(tokenizer))
    config = LlamaConfig(**shape, torch_dtype="bfloat16", tie_word_embeddings=False)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)  # parameters on the meta device
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for param_name, param in skeleton.named_parameters():
        match = re.match(r"model\.layers\.(\d+)\.", param_name)
        groups.setdefault(f"block{int(match.group(1)):03d}" if match else "rest", {})[param_name] = tuple(param.shape)
    folder.mkdir(parents=True, exist_ok=False)
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    keys = sorted(groups)
    for i, key in enumerate(keys):
        file = f"model-{i + 1:05d}-of-{len(keys):05d}.safetensors"
        tensors = {n: random_tensor(n, shape, generator) for n, shape in groups[key].items()}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: file for n in tensors})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(folder)
    if tokenizer is not None:
        for file in tokenizer.iterdir():
            if file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy(file, folder / file.name)
    return total


def measure(argv: list[str], cache: Path) -> dict[str, float]:
    """Run `python -m welore.cli ARGV` under /usr/bin/time -v: peak RSS (GB), wall and CPU (s), and
    the machine's 1-minute load average before and after. `cache` (a new folder) is welore's
    cache for the run, so nothing computed by an earlier run (cached spectra) is reused."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), WELORE_CACHE=str(cache))
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "welore.cli", *argv]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()[0]
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    fields = dict(re.findall(r"^\s*([^:\n]+):\s*(.+)$", done.stderr, re.M))
    return {
        "rss_gb": int(fields["Maximum resident set size (kbytes)"]) * 1024 / 1e9,
        "wall_s": wall,
        "cpu_s": float(fields["User time (seconds)"]) + float(fields["System time (seconds)"]),
        "load": (load_before, load_after),  # 1-minute load averages: how much else ran beside it
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), default="tinyllama-1.1b")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=["free"])
    parser.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "welore-bigmodel"),
                        help="scratch folder (deleted after unless --keep; "
                             "default: welore-bigmodel in the system temp folder)")
    parser.add_argument("--max-memory", help="also pass --max-memory to every welore command")
    parser.add_argument("--keep", action="store_true", help="keep the model and outputs")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()

    scratch = Path(args.dir)
    model_dir, out_dir = scratch / args.model, scratch / f"{args.model}-compressed"
    layers = CONFIGS[args.model]["num_hidden_layers"]
    rows = []
    try:
        start = time.perf_counter()
        text = any(run in TEXT_RUNS for run in args.runs)
        size = build(args.model, model_dir, tokenizer=builtin_model_dir(DEFAULT_MODEL) if text else None)
        print(f"built {model_dir}: {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", flush=True)
        for run in args.runs:
            argv = [a.format(model=model_dir, out=out_dir) for a in RUNS[run]]
            if args.max_memory:
                argv += ["--max-memory", args.max_memory]
            figures = measure(argv, cache=scratch / f"cache-{run}")
            rows.append((run, " ".join(argv).replace(str(scratch), "$DIR"), figures))
            print(run, figures, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch / args.model, ignore_errors=True)
            shutil.rmtree(out_dir, ignore_errors=True)
            for run in args.runs:
                shutil.rmtree(scratch / f"cache-{run}", ignore_errors=True)

    lines = [
        f"## Big models: {args.model} (random bf16 weights, {size / 1e9:.2f} GB on disk)",
        "",
        f"Command: `.venv/bin/python benchmarks/bigmodel.py --model {args.model} --runs {' '.join(args.runs)}"
        + (f" --max-memory {args.max_memory}" if args.max_memory else "") + "`  ",
        f"Machine: {machine()}. The load average (1 minute, before → after) says how much else ran; "
        "above the core count, wall time overstates what the run needs and CPU time is the steadier figure.",
        "",
        "| run | welore command | peak RSS (GB) | × checkpoint | wall (s) | CPU (s) | wall per block (s) | load |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for run, command, f in rows:
        lines.append(f"| {run} | `welore {command}` | {f['rss_gb']:.2f} | {f['rss_gb'] * 1e9 / size:.2f} | "
                     f"{f['wall_s']:.0f} | {f['cpu_s']:.0f} | {f['wall_s'] / layers:.1f} | "
                     f"{f['load'][0]:.1f} → {f['load'][1]:.1f} |")
    text = "\n".join(lines)
    publish(f"bigmodel-{args.model}", text, write=not args.no_write)


if __name__ == "__main__":
    main()
