"""`--target-size` against uniform widths of no more bytes, judged away from the calibration text.

    .venv/bin/python benchmarks/target_size.py [--calib wiki] [--eval news] [--calib-tokens 8192]
        [--eval-tokens 4096] [--bits 2.5 3.0 3.5 4.0 4.5] [--group-size 64] [--no-write]

For each size (bits per target parameter, codes + float16 scales and offsets + float16 factors)
the default model is quantized as `quantize_` does with `--target-size` and `--calib`: the input
statistics come from the calibration windows less the last eighth, which is held back; the
allocation (`plan_quantization`) and every uniform width that fits (`uniform_plans`) each quantize
a fresh copy. Every candidate is scored on the held-back windows (what `quantize_` chooses by)
and on the other text's evaluation half (what a user sees). The table says which plan the
held-back score chose and how it compares cross-domain with the best uniform width. The
statistics are gathered once and shared by every size. Writes the `target-size-CALIB`
section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import time

from _common import machine, publish

from welore.data import load_text, token_windows
from welore.eval.evaluate import perplexity
from welore.io.models import load_model
from welore.lowrank.select import hold_back
from welore.lowrank.spectrum import _one_thread_per_op
from welore.quant import QuantConfig, apply_quant_plan_, plan_quantization, quant_targets, uniform_plans
from welore.quant.api import _collect_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default="wiki")
    parser.add_argument("--eval", default="news")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--bits", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0, 4.5])
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()

    loaded = load_model(args.model, dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    calibration = token_windows(tokenizer, load_text(args.calib, split="calib"), args.seq_len, args.calib_tokens)
    fit, held = hold_back(calibration)
    evaluation = token_windows(tokenizer, load_text(args.eval, split="eval"), args.seq_len, args.eval_tokens)
    dense = perplexity(model, evaluation, progress=False)[0]
    targets = quant_targets(model)
    params = sum(m.weight.numel() for m in targets.values())
    stats = _collect_stats(model, targets, fit, 4, False)
    rows = []
    for bits in args.bits:
        config = QuantConfig(bits=None, group_size=args.group_size, target_size=int(bits * params / 8),
                             calib=args.calib)
        start = time.perf_counter()
        with _one_thread_per_op():
            allocated = plan_quantization(model, config, stats, progress=False)
        plans = {"allocated": allocated, **uniform_plans(allocated, config.target_bits, config.max_compensate_rank)}
        scores = {}
        for label, plan in plans.items():
            trial = copy.deepcopy(model)
            with _one_thread_per_op():
                apply_quant_plan_(trial, plan, stats, progress=False)
            scores[label] = (perplexity(trial, held, progress=False)[0], perplexity(trial, evaluation,
                                                                                     progress=False)[0])
            print(f"{bits} bits, {label} ({plan.bits_per_param:.3f}): held-back {scores[label][0]:.2f}, "
                  f"{args.eval} {scores[label][1]:.2f}", flush=True)
            del trial
        chosen = min(scores, key=lambda label: scores[label][0])
        uniform = {k: v for k, v in scores.items() if k != "allocated"}
        best_uniform = min(uniform, key=lambda label: uniform[label][1]) if uniform else None
        rows.append((bits, plans, scores, chosen, best_uniform, time.perf_counter() - start))

    def cell(plans, scores, label):
        return f"{label} ({plans[label].bits_per_param:.2f} b): {scores[label][1]:.1f} [{scores[label][0]:.1f}]"

    lines = [
        f"## Size targets against uniform widths, {args.calib} → {args.eval}",
        "",
        f"Command: `.venv/bin/python benchmarks/target_size.py --calib {args.calib} --eval {args.eval} "
        f"--calib-tokens {args.calib_tokens} --eval-tokens {args.eval_tokens} --group-size {args.group_size} "
        f"--bits {' '.join(f'{b:g}' for b in args.bits)}`  ",
        f"{args.model}, groups of {args.group_size}; statistics from {fit.numel()} {args.calib} calibration tokens, "
        f"{held.numel()} more held back to choose; perplexity on {evaluation.numel()} tokens of {args.eval} "
        f"(dense {dense:.2f}), the held-back score in brackets; b = bits per target parameter. "
        f"Machine: {machine()}.",
        "",
        f"| size | allocation | uniform widths that fit | chosen | {args.eval}: chosen vs best uniform | seconds |",
        "|---:|---|---|---|---:|---:|",
    ]
    for bits, plans, scores, chosen, best_uniform, seconds in rows:
        uniform = "; ".join(cell(plans, scores, label) for label in plans if label != "allocated") or "none"
        versus = (f"{scores[chosen][1]:.1f} vs {scores[best_uniform][1]:.1f}" if best_uniform else
                  f"{scores[chosen][1]:.1f}")
        lines.append(f"| {bits:g} | {cell(plans, scores, 'allocated')} | {uniform} | {chosen} | {versus} | "
                     f"{seconds:.0f} |")
    publish(f"target-size-{args.calib}", "\n".join(lines), write=not args.no_write)


if __name__ == "__main__":
    main()
