"""The quality frontier: data-free and data-aware compression of the default model, side by side.

    .venv/bin/python benchmarks/frontier.py [--ratios 0.1 0.2 0.3 0.4] [--calib-tokens 8192]
        [--eval-tokens 8192] [--seq-len 512]

Calibration text: the calibration half of `wiki`; evaluation: the disjoint evaluation half
of `wiki` and of `news`. For each factorizer (svd, asvd, whiten) and allocation policy the
script computes a rank plan per ratio, factorizes a fresh copy of the dense model, and
measures perplexity on both texts, all in one run.

To fit a CPU budget, the input statistics of every target matrix are gathered ONCE on the
dense model (the non-sequential setting, which is what `compress_` does without
`--sequential`) and every configuration reuses them; `compress_` itself gathers them block
by block and keeps one block's statistics at a time. Compression time is reported as that
shared calibration pass plus each configuration's own spectra and factorization time. The
`SEQUENTIAL` configurations cannot share statistics (each block is calibrated on its own
compressed predecessors), so they run the whole `compress_(..., sequential=True)` pipeline.
Writes the `frontier` section of docs/benchmarks.md, docs/frontier.json and docs/frontier.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

from _common import DOC, machine, publish

from welore.calibrate import iter_block_stats
from welore.compress import CompressConfig, compress_, factorize_layer
from welore.data import describe_text, load_text, token_windows
from welore.evaluate import perplexity
from welore.factorize import FACTORIZERS
from welore.models import load_model
from welore.modules import swap_module
from welore.plan import allocate
from welore.report import plot_perplexity_vs_ratio
from welore.spectrum import compute_spectra
from welore.targets import find_targets, matrix_shape, weight_matrix

CONFIGS = [  # (factorizer, allocation policy); whiten/uniform is SVD-LLM's published setting
    ("svd", "uniform"), ("svd", "welore"), ("svd", "energy"),
    ("asvd", "uniform"), ("asvd", "welore"),
    ("whiten", "uniform"), ("whiten", "welore"), ("whiten", "energy"), ("whiten", "loss"), ("whiten", "minimax"),
]
SEQUENTIAL = [("whiten", "uniform"), ("whiten", "minimax")]  # also run with `--sequential`, through compress_
TEXTS = ["wiki", "news"]


def fmt(ppl: float) -> str:
    return f"{ppl:.2f}" if ppl < 1000 else f"{ppl:.2e}"


def label(factorizer: str, policy: str, sequential: bool) -> str:
    return f"{factorizer}/{policy}" + ("+seq" if sequential else "")


def measure(compressed, evals: dict, name: str, ratio: float, achieved: float, timing: dict) -> dict:
    """Perplexity of a compressed copy on every text, as a record."""
    ppl = {t: perplexity(compressed, w, progress=False)[0] for t, w in evals.items()}
    print(f"{name} {ratio}: {ppl}", flush=True)
    return {"label": name, "ratio": ratio, "achieved_ratio": achieved, "perplexity": ppl, **timing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4])
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()

    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    calibration = token_windows(tokenizer, load_text("wiki", split="calib"), args.seq_len, args.calib_tokens)
    evals = {t: token_windows(tokenizer, load_text(t, split="eval"), args.seq_len, args.eval_tokens) for t in TEXTS}
    dense = {t: perplexity(model, w, progress=False)[0] for t, w in evals.items()}
    print("dense", dense, flush=True)

    targets = find_targets(model)
    shapes = {n: matrix_shape(m) for n, m in targets.items()}
    start = time.perf_counter()
    stats = {}
    for _, block in iter_block_stats(model, targets, calibration, progress=False):
        stats.update(block)
    calib_seconds = time.perf_counter() - start

    spectra, spectra_seconds = {}, {}
    for factorizer in dict.fromkeys(f for f, _ in CONFIGS):
        start = time.perf_counter()
        if FACTORIZERS[factorizer].needs_stats:
            spectra[factorizer] = {n: FACTORIZERS[factorizer].spectrum(weight_matrix(m), stats[n]) for n, m in targets.items()}
        else:
            spectra[factorizer] = compute_spectra(targets, cache=False, progress=False)
        spectra_seconds[factorizer] = time.perf_counter() - start

    records = []
    for ratio in args.ratios:
        for factorizer, policy in CONFIGS:
            plan = allocate(policy, spectra[factorizer], shapes, ratio)
            compressed = copy.deepcopy(model)
            start = time.perf_counter()
            for name in plan.factorized:
                module = factorize_layer(compressed.get_submodule(name), name, plan.ranks[name], factorizer, stats.get(name))
                swap_module(compressed, name, module)
            factor_seconds = time.perf_counter() - start
            uses_calib = FACTORIZERS[factorizer].needs_stats
            records.append(measure(compressed, evals, label(factorizer, policy, False), ratio, plan.achieved_ratio, {
                "factorize_s": factor_seconds, "spectra_s": spectra_seconds[factorizer],
                "calibration_s": calib_seconds if uses_calib else 0.0}))
        for factorizer, policy in SEQUENTIAL:  # the whole pipeline, as `welore compress --sequential` runs it
            compressed = copy.deepcopy(model)
            start = time.perf_counter()
            report = compress_(compressed, CompressConfig(ratio=ratio, method=policy, factorizer=factorizer, sequential=True),
                               calibration=calibration, progress=False)
            records.append(measure(compressed, evals, label(factorizer, policy, True), ratio, report.plan.achieved_ratio,
                                   {"total_s": time.perf_counter() - start}))

    labels = [label(f, p, False) for f, p in CONFIGS] + [label(f, p, True) for f, p in SEQUENTIAL]
    command = (f"`.venv/bin/python benchmarks/frontier.py --ratios {' '.join(map(str, args.ratios))} "
               f"--calib-tokens {args.calib_tokens} --eval-tokens {args.eval_tokens} --seq-len {args.seq_len}`")
    lines = [
        "## Data-aware compression: the quality frontier on SmolLM2-135M",
        "",
        f"Command: {command}  ",
        f"Machine: {machine()}  ",
        f"Calibration: {calibration.numel()} tokens of {describe_text('wiki', 'calib')}. Evaluation: "
        + ", ".join(f"{evals[t].numel()} tokens of {describe_text(t)}" for t in TEXTS)
        + f"; windows of {args.seq_len} tokens. Factorizer/policy: `svd` is data-free, `asvd` scales input "
        "channels by (mean |x|)^0.5, `whiten` is SVD-LLM's truncation-aware whitening; `whiten/uniform` is "
        "SVD-LLM's published setting; `whiten/loss` allocates ranks globally by whitened truncation loss, "
        "`whiten/minimax` bounds every layer's relative output error by one global value; `+seq` adds "
        "`--sequential` (block k calibrated on the outputs of the compressed blocks before it).",
    ]
    best_lines = []
    for text in TEXTS:
        lines += ["", f"Perplexity on `{text}` (dense: {dense[text]:.2f}); best per ratio in bold.", "",
                  "| method | " + " | ".join(str(r) for r in args.ratios) + " |",
                  "|---|" + "---:|" * len(args.ratios)]
        best = {r: min((x for x in records if x["ratio"] == r), key=lambda x: x["perplexity"][text]) for r in args.ratios}
        for name in labels:
            cells = []
            for r in args.ratios:
                rec = next(x for x in records if x["ratio"] == r and x["label"] == name)
                cell = fmt(rec["perplexity"][text])
                cells.append(f"**{cell}**" if rec is best[r] else cell)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        for r in args.ratios:
            baseline = next(x for x in records if x["ratio"] == r and x["label"] == "whiten/uniform")
            winner = best[r]
            best_lines.append(
                f"- `{text}`, ratio {r}: best is {winner['label']} "
                f"({fmt(winner['perplexity'][text])}), vs whiten/uniform {fmt(baseline['perplexity'][text])} "
                f"({baseline['perplexity'][text] / winner['perplexity'][text]:.2f}× lower perplexity)")
    lines += ["", "Where each method wins:", "", *best_lines, "",
              "Compression time (seconds): the shared calibration pass, the spectra each factorizer's allocation "
              "needs, and the mean factorization time per configuration; `+seq` rows run the whole of "
              "`compress_(..., sequential=True)` (a calibration pass for the plan, then block by block on the "
              "compressed outputs), timed end to end.", "",
              "| factorizer/policy | calibration | spectra | factorization (mean) | total (mean) |",
              "|---|---:|---:|---:|---:|"]
    for name in labels:
        recs = [x for x in records if x["label"] == name]
        if "total_s" in recs[0]:
            lines.append(f"| {name} | — | — | — | {sum(x['total_s'] for x in recs) / len(recs):.1f} |")
            continue
        factorize = sum(x["factorize_s"] for x in recs) / len(recs)
        total = recs[0]["calibration_s"] + recs[0]["spectra_s"] + factorize
        lines.append(f"| {name} | {recs[0]['calibration_s']:.1f} | {recs[0]['spectra_s']:.1f} | {factorize:.1f} | {total:.1f} |")
    lines += ["", "![perplexity vs ratio](frontier.png)"]
    text = "\n".join(lines)
    publish("frontier", text, write=not args.no_write)
    if not args.no_write:
        (DOC.parent / "frontier.json").write_text(json.dumps({"dense": dense, "records": records}, indent=2) + "\n")
        points = [(x["label"], x["achieved_ratio"], x["perplexity"]["wiki"]) for x in records]
        plot_perplexity_vs_ratio(points, DOC.parent / "frontier.png", dense=dense["wiki"],
                                 title="SmolLM2-135M, perplexity on wiki (eval half) vs compression ratio")


if __name__ == "__main__":
    main()
