"""`--method auto` beside the single recipes it chooses from: its pick, its quality away from the
calibration text, and its cost against the curvature recipe alone, in one run.

    .venv/bin/python benchmarks/select_cost.py [--model smollm2-135m] [--calib wiki]
        [--calib-tokens 8192] [--ratio 0.2] [--eval-tokens 4096] [--no-write]

The model is compressed from fresh copies, one after another in this process: with each
candidate recipe of `welore.lowrank.select.CANDIDATES` on all the calibration windows, then with
`--method auto` (which fits every candidate on a quarter of the windows, scores them on the
eighth held back, and compresses with the winner on all of them). Every result is judged on both
built-in texts' evaluation halves. Cost is given in wall and CPU seconds; their ratio to the
curvature recipe is taken in CPU seconds, which other jobs on the machine disturb far less. Writes the
`select-CALIB` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import resource
import time

from _common import machine, publish

from welore import CompressConfig, compress_
from welore.data import describe_bos, load_text, token_windows
from welore.eval.evaluate import perplexity
from welore.io.models import load_model
from welore.lowrank.select import CANDIDATES

TEXTS = ("wiki", "news")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far: a cost that other jobs on the machine
    disturb far less than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default="wiki", choices=TEXTS)
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()

    loaded = load_model(args.model, dtype="float32")
    tokenizer = loaded.tokenizer
    calibration = token_windows(tokenizer, load_text(args.calib, split="calib"), args.seq_len, args.calib_tokens)
    evals = {t: token_windows(tokenizer, load_text(t, split="eval"), args.seq_len, args.eval_tokens) for t in TEXTS}
    dense = {t: perplexity(loaded.model, w, progress=False)[0] for t, w in evals.items()}
    base = CompressConfig(ratio=args.ratio, calib=args.calib)
    runs = [(c.label, c.config(base)) for c in CANDIDATES] + [("auto", CompressConfig(ratio=args.ratio, method="auto",
                                                                                      calib=args.calib))]
    rows, selection = [], None
    for label, config in runs:
        model = copy.deepcopy(loaded.model)
        start, cpu = time.perf_counter(), cpu_seconds()
        report = compress_(model, config, calibration=calibration, progress=False)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        ppl = {t: perplexity(model, w, progress=False)[0] for t, w in evals.items()}
        if report.config.selection is not None:
            selection = report.config.selection
            label = f"auto → {selection['chosen']}"
        rows.append((label, ppl, seconds, cpu))
        print(f"{label}: {ppl}, {seconds:.0f} s, {cpu:.0f} CPU s", flush=True)
        del model

    other = next(t for t in TEXTS if t != args.calib)
    curvature = rows[0][3]  # CPU seconds of the first candidate, the curvature recipe
    lines = [
        f"## Recipe selection (`--method auto`) on {args.model}, {args.calib} → {other}",
        "",
        f"Command: `.venv/bin/python benchmarks/select_cost.py --model {args.model} --calib {args.calib} "
        f"--calib-tokens {args.calib_tokens} --ratio {args.ratio} --eval-tokens {args.eval_tokens}`  ",
        f"Ratio {args.ratio}, {calibration.numel()} calibration tokens of {args.calib} "
        f"({describe_bos(tokenizer)}), {args.eval_tokens} evaluation tokens of each text; dense: {other} "
        f"{dense[other]:.2f}, {args.calib} {dense[args.calib]:.2f}. One process, one run after another. "
        f"Machine: {machine()}.",
        "",
        f"| recipe | {other} (cross-domain) | {args.calib} (in-domain) | wall s | CPU s | CPU × {rows[0][0]} |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {label} | {ppl[other]:.2f} | {ppl[args.calib]:.2f} | {s:.0f} | {c:.0f} | {c / curvature:.2f} |"
          for label, ppl, s, c in rows),
    ]
    if selection is not None:
        scores = ", ".join(f"{label} {score['perplexity']:.2f}" for label, score in selection["candidates"].items())
        lines += ["", f"The selection's scores (perplexity on {selection['held_tokens']} held-back {args.calib} "
                      f"calibration tokens, each candidate fitted on {selection['fit_tokens']}): {scores}."]
    publish(f"select-{args.calib}", "\n".join(lines), write=not args.no_write)


if __name__ == "__main__":
    main()
