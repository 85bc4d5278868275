"""Quality, size and speed of the default model compressed by each allocation policy.

    .venv/bin/python benchmarks/compression.py [--ratios 0.02 0.05 0.1 0.2 0.3 0.4]
        [--methods uniform welore energy] [--text wiki] [--seq-len 512] [--max-tokens 8192]

Everything is measured in one run with one harness (`welore.evaluate`): the dense model
first, then each (method, ratio) compressed from a fresh copy of it, saved to a temporary
folder for its size on disk, and evaluated on the same token windows of the evaluation split
of the text. Speed is measured last, in `--speed-rounds` interleaved rounds over all models
(dense, then each compressed one, then again), keeping each model's best round, so that a
transient load on the machine cannot favour one model over another. Writes the `compression`
section of docs/benchmarks.md and the raw figures to docs/compression.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

from _common import DOC, machine, publish

from welore import CompressConfig, compress_
from welore.data import describe_text, load_text, token_windows
from welore.eval.evaluate import evaluate, measure_speed
from welore.io.checkpoint import save
from welore.io.models import load_model


def fmt_ppl(ppl: float) -> str:
    return f"{ppl:.2f}" if ppl < 1000 else f"{ppl:.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.3, 0.4])
    parser.add_argument("--methods", nargs="+", default=["uniform", "welore", "energy"])
    parser.add_argument("--text", default="wiki")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--speed-rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()

    loaded = load_model(args.model)
    windows = token_windows(loaded.tokenizer, load_text(args.text, split="eval"), args.seq_len, args.max_tokens)
    dense = evaluate(loaded.model, windows, path=loaded.path, speed=False, progress=False)
    models = [loaded.model]
    records = [{"method": "dense", "ratio": 0.0, "achieved_ratio": 0.0, "model_reduction": 0.0,
                "compress_s": 0.0, **dense.to_dict()}]
    print(f"dense: ppl {dense.perplexity:.3f}", flush=True)
    for method in args.methods:
        for ratio in args.ratios:
            model = copy.deepcopy(loaded.model)
            start = time.perf_counter()
            report = compress_(model, CompressConfig(ratio=ratio, method=method), progress=False)
            seconds = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as tmp:
                save(model, Path(tmp) / "ckpt", source=args.model)
                result = evaluate(model, windows, path=Path(tmp) / "ckpt", speed=False, progress=False)
            records.append({"method": method, "ratio": ratio, "achieved_ratio": report.plan.achieved_ratio,
                            "model_reduction": report.model_reduction, "compress_s": seconds, **result.to_dict()})
            print(f"{method} {ratio}: ppl {result.perplexity:.3f}", flush=True)
            models.append(model)  # kept for the speed rounds (~0.5 GB each)

    for _ in range(args.speed_rounds):  # interleaved rounds; keep every model's best
        for record, model in zip(records, models, strict=True):
            prefill, generate = measure_speed(model, repeats=1)
            record["prefill_tokens_per_s"] = max(prefill, record["prefill_tokens_per_s"] or 0.0)
            record["generate_tokens_per_s"] = max(generate, record["generate_tokens_per_s"] or 0.0)
    dense_prefill, dense_generate = records[0]["prefill_tokens_per_s"], records[0]["generate_tokens_per_s"]

    command = ("`.venv/bin/python benchmarks/compression.py --ratios " + " ".join(map(str, args.ratios))
               + f" --methods {' '.join(args.methods)} --text {args.text} --seq-len {args.seq_len} "
               f"--max-tokens {args.max_tokens}`")
    lines = [
        "## Data-free compression of SmolLM2-135M: uniform vs WeLore vs energy",
        "",
        f"Command: {command}  ",
        f"Machine: {machine()}  ",
        f"Text: {describe_text(args.text)}, {windows.shape[0]} windows of {args.seq_len} tokens "
        f"({dense.eval_tokens} predicted tokens). Speed: prefill of 128 tokens and greedy generation "
        f"of 32 tokens, batch 1, best of {args.speed_rounds} interleaved rounds (each after a warm-up); ratios (×) are "
        "against the dense row of the same run.",
        "",
        "| method | ratio (achieved) | whole model | perplexity | params (M) | disk (MB) | prefill tok/s (×) | "
        "generate tok/s (×) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        ratio = "—" if r["method"] == "dense" else f"{r['ratio']} ({r['achieved_ratio']:.4f})"
        lines.append(
            f"| {r['method']} | {ratio} | −{r['model_reduction']:.1%} | {fmt_ppl(r['perplexity'])} | "
            f"{r['parameters'] / 1e6:.1f} | {r['disk_bytes'] / 1e6:.1f} | "
            f"{r['prefill_tokens_per_s']:.0f} ({r['prefill_tokens_per_s'] / dense_prefill:.2f}×) | "
            f"{r['generate_tokens_per_s']:.1f} ({r['generate_tokens_per_s'] / dense_generate:.2f}×) |"
        )
    text = "\n".join(lines)
    publish("compression", text, write=not args.no_write)
    if not args.no_write:
        (DOC.parent / "compression.json").write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
