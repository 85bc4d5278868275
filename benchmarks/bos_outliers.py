"""Are the curvature pass's outlier tokens a window-start artefact? kfac/welore+seq with and
without BOS first in every window, with and without the outlier bound.

    .venv/bin/python benchmarks/bos_outliers.py [--model smollm2-135m] [--calib wiki]
        [--calib-tokens 8192] [--eval news] [--eval-tokens 4096] [--ratio 0.2]
        [--policies no yes] [--bounds default none] [--no-write]

For each BOS policy (`--bos no`, `--bos yes`) the default model is compressed at `--ratio` with
the curvature recipe (kfac factors, WeLore ranks, sequential calibration) on the same
calibration text, once with `welore.lowrank.curvature.OUTLIER_FACTOR` at its value and once with no
bound, and judged on the evaluation text's windows under the same policy. While the output
gradients are gathered, every token whose squared norm exceeds OUTLIER_FACTOR × its batch's
median at a target matrix is counted by its position in the window (0, 1, later), so the table
says where the outliers sit. Writes the `bos-outliers` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections import Counter

import torch
from _common import machine, publish

from welore import CompressConfig, compress_
from welore.data import describe_bos, load_text, token_windows
from welore.eval.evaluate import perplexity
from welore.io.models import load_model
from welore.lowrank import curvature

POSITIONS = ("0", "1", "2+")


def count_positions(counts: Counter):
    """Wrap `curvature._clip_outliers` so it also counts, by window position, the tokens above the
    (current) bound's threshold; with no bound the threshold is the default factor's."""
    clip = curvature._clip_outliers
    factor = curvature.OUTLIER_FACTOR if math.isfinite(curvature.OUTLIER_FACTOR) else 1e4

    def counting(g: torch.Tensor):
        squared = g.float().pow(2).sum(-1)  # (B, T)
        above = (squared > factor * squared.median()).nonzero()[:, 1]
        counts.update(str(int(p)) if p < 2 else "2+" for p in above)
        return clip(g)

    return counting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default="wiki")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval", default="news")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--policies", nargs="+", default=["no", "yes"], choices=["no", "yes"])
    parser.add_argument("--bounds", nargs="+", default=["default", "none"], choices=["default", "none"],
                        help="default: welore.lowrank.curvature.OUTLIER_FACTOR; none: no bound")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()

    loaded = load_model(args.model, dtype="float32")
    bound = curvature.OUTLIER_FACTOR
    rows = []
    for policy in args.policies:
        calibration = token_windows(loaded.tokenizer, load_text(args.calib, split="calib"), args.seq_len,
                                    args.calib_tokens, bos=policy)
        evaluation = token_windows(loaded.tokenizer, load_text(args.eval, split="eval"), args.seq_len,
                                   args.eval_tokens, bos=policy)
        dense, _ = perplexity(loaded.model, evaluation, progress=False)
        for factor in (bound if b == "default" else math.inf for b in args.bounds):
            counts: Counter = Counter()
            curvature.OUTLIER_FACTOR = factor
            original = curvature._clip_outliers
            curvature._clip_outliers = count_positions(counts)
            model = copy.deepcopy(loaded.model)
            start = time.perf_counter()
            try:
                compress_(model, CompressConfig(ratio=args.ratio, method="welore", factorizer="kfac", calib=args.calib,
                                                sequential=True, bos=policy), calibration=calibration, progress=False)
            finally:
                curvature._clip_outliers = original
                curvature.OUTLIER_FACTOR = bound
            seconds = time.perf_counter() - start
            ppl, _ = perplexity(model, evaluation, progress=False)
            rows.append((policy, describe_bos(loaded.tokenizer, policy), factor, dense, ppl, counts, seconds))
            print(f"bos {policy}, bound {factor:g}: dense {dense:.2f}, compressed {ppl:.2f}, above the bound by "
                  f"position {dict(counts)}, {seconds:.0f} s", flush=True)
            del model

    lines = [
        "## Outlier tokens of the curvature pass and BOS",
        "",
        f"Command: `.venv/bin/python benchmarks/bos_outliers.py --model {args.model} --calib {args.calib} "
        f"--calib-tokens {args.calib_tokens} --eval {args.eval} --eval-tokens {args.eval_tokens} "
        f"--ratio {args.ratio} --policies {' '.join(args.policies)} --bounds {' '.join(args.bounds)}`  ",
        f"kfac/welore+seq at ratio {args.ratio}, calibrated on {args.calib_tokens} tokens of {args.calib}, judged on "
        f"{args.eval_tokens} tokens of {args.eval} (windows of {args.seq_len} under the same BOS policy). Tokens "
        f"above the bound: (token, target matrix) pairs whose output gradient's squared norm exceeds "
        f"{bound:g} × its batch's median. Machine: {machine()}.",
        "",
        "| windows | bound | dense | kfac/welore+seq | tokens above the bound at position 0 / 1 / 2+ | seconds |",
        "|---|---|---:|---:|---|---:|",
        *(f"| {label.replace('|', chr(92) + '|')} | {'none' if not math.isfinite(f) else f'{f:g}'} | {d:.2f} "
          f"| {p:.2f} | {' / '.join(str(c.get(k, 0)) for k in POSITIONS)} | {s:.0f} |"
          for _, label, f, d, p, c, s in rows),
    ]
    publish("bos-outliers", "\n".join(lines), write=not args.no_write)


if __name__ == "__main__":
    main()
