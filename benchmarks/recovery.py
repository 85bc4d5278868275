"""Recovery after compression, away from the calibration text: plain LM fine-tuning vs distillation
from the dense model, on one fixed training-token budget.

    .venv/bin/python benchmarks/recovery.py --ratio 0.2 [--calib wiki] [--calib-tokens 8192] \
        [--compress "--method welore --factorizer whiten --factorizer-param shrinkage=0.1"] \
        [--train-tokens 65536] [--batch-size 4] [--seq-len 256] [--mode lrc] [--lr 1e-4] [--eval-tokens 4096] \
        [--finetune=--train-scales]   # more `welore finetune` options; `=` because the value starts with --

What a user does, each step a `welore` command in its own process:

1. `welore compress` the default model at `--ratio` with the `--compress` options (the best
   training-free setting of the cross-domain frontier), calibrated on `--calib-tokens` of the
   `--calib` text's calibration half; without `--ratio`, `--compress` must quantize (e.g.
   "--quantize int2 --group-size 64 --compensate-rank 8"): quantization alone, whose compensation
   factors are what LRC fine-tuning then trains (issue 10);
2. `welore finetune` the checkpoint twice on the same budget (`--losses` picks one) — `--train-tokens` of the same
   text's calibration half (read again, reshuffled, where the budget exceeds it), `--batch-size` ×
   `--seq-len` tokens per step, warm-up then cosine decay — once with the plain next-token loss
   and once with `--distill` (KL to the dense source model's next-token distribution, α = 1, τ = 1);
3. `welore evaluate` the compressed and both recovered checkpoints (and the dense model) on
   `--eval-tokens` of BOTH texts' evaluation halves (windows of 512, as the frontier benchmark),
   so the figure on the other text is a cross-domain one: neither compression nor training saw it.

Every run adds its record to docs/recovery.json (a rerun with the same model, ratio, calibration,
compression options, budget and learning rate replaces its record), and the `recovery` section of
docs/benchmarks.md shows them all, one table per record.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import DOC, machine, publish

ROOT = Path(__file__).resolve().parent.parent
WELORE = [sys.executable, "-m", "welore.cli"]
TEXTS = ("wiki", "news")
RESULTS = DOC.parent / "recovery.json"
DEFAULT_COMPRESS = "--method welore --factorizer whiten --factorizer-param shrinkage=0.1"
LOSSES = {"lm": ("LM loss", []), "distill": ("distillation", ["--distill"])}  # --losses name -> label, options


def git_commit() -> str | None:
    """The code measured (a rerun after a change to welore adds a record instead of replacing one)."""
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or None


def welore(*argv: str) -> float:
    """Run one `welore` command; return its wall seconds."""
    start = time.perf_counter()
    subprocess.run([*WELORE, *argv], check=True, cwd=ROOT)
    return time.perf_counter() - start


def evaluate(model: str, tmp: Path, eval_tokens: int) -> dict[str, float]:
    """Perplexity of `model` on both texts' evaluation halves."""
    ppl = {}
    for text in TEXTS:
        out = tmp / "eval.json"
        welore("evaluate", "-q", model, "--text", text, "--max-tokens", str(eval_tokens), "--seq-len", "512",
               "--no-speed", "--json", str(out))
        ppl[text] = next(iter(json.loads(out.read_text())["results"].values()))["perplexity"]
    return ppl


def dense_figures(args: argparse.Namespace) -> dict[str, float] | None:
    """The dense model's perplexities from docs/frontier.json when it measured the same model on the
    same windows (its `run` evaluates the default model on `eval_tokens` in windows of 512), else None."""
    frontier = DOC.parent / "frontier.json"
    if args.model != "smollm2-135m" or not frontier.exists():
        return None
    data = json.loads(frontier.read_text())
    if data.get("eval_tokens") != args.eval_tokens or data.get("seq_len") != 512:
        return None
    return data["dense"]


KEY = ("model", "ratio", "calib", "calib_tokens", "compress", "train_tokens", "finetune", "commit")


def load_records() -> list[dict]:
    """Every record of docs/recovery.json (an early file held one record, not a list)."""
    if not RESULTS.exists():
        return []
    data = json.loads(RESULTS.read_text())
    return data["records"] if "records" in data else [data]


def save(record: dict) -> None:
    """Add (or replace) `record` in docs/recovery.json, written atomically."""
    records = [r for r in load_records() if [r.get(k) for k in KEY] != [record.get(k) for k in KEY]]
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps({"records": [*records, record]}, indent=1) + "\n")
    tmp.replace(RESULTS)


def fmt(ppl: float) -> str:
    return f"{ppl:.1f}" if ppl < 1000 else f"{ppl:.2e}"


def quantizes(compress: str) -> bool:
    """Whether `welore compress` options quantize the model (and so need no --ratio)."""
    return any(option in shlex.split(compress) for option in ("--quantize", "--target-size"))


def run(args: argparse.Namespace, command: str) -> dict:
    if args.ratio is None and not quantizes(args.compress):
        raise SystemExit("give --ratio R, or --compress options that quantize (--quantize or --target-size)")
    steps = args.train_tokens // (args.batch_size * args.seq_len)
    if steps < 2:
        raise SystemExit(f"--train-tokens {args.train_tokens} is less than two steps of "
                         f"{args.batch_size}x{args.seq_len}")
    budget = ["--data", args.calib, "--mode", args.mode, "--lr", str(args.lr), "--steps", str(steps),
              "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
              "--warmup-steps", str(max(1, steps // 10)),
              "--max-train-tokens", str(steps * args.batch_size * args.seq_len),
              "--val-tokens", "512", *shlex.split(args.finetune)]
    record: dict = {"machine": machine(), "model": args.model, "ratio": args.ratio, "calib": args.calib,
                    "calib_tokens": args.calib_tokens, "compress": args.compress, "eval_tokens": args.eval_tokens,
                    "train_tokens": steps * args.batch_size * args.seq_len, "finetune": budget, "command": command,
                    "commit": git_commit(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        record["dense"] = dense_figures(args) or evaluate(args.model, tmp, args.eval_tokens)
        print("dense", record["dense"], flush=True)
        compressed = str(tmp / "compressed")
        ratio = [] if args.ratio is None else ["--ratio", str(args.ratio)]
        seconds = welore("compress", "-q", args.model, *ratio, *shlex.split(args.compress),
                         "--calib", args.calib, "--calib-tokens", str(args.calib_tokens), "--out", compressed)
        record["runs"]["training-free"] = {"perplexity": evaluate(compressed, tmp, args.eval_tokens),
                                           "seconds": seconds}
        print("training-free", record["runs"]["training-free"], flush=True)
        for label, extra in (LOSSES[name] for name in args.losses):
            out = tmp / label.replace(" ", "-")
            seconds = welore("finetune", "-q", compressed, *budget, *extra, "--out", str(out))
            result = json.loads((out / "finetune.json").read_text())["result"]
            record["runs"][label] = {"perplexity": evaluate(str(out), tmp, args.eval_tokens), "seconds": seconds,
                                     **{k: result[k] for k in ("train_tokens", "epochs", "tokens_per_s",
                                                               "train_seconds", "trainable_params",
                                                               "total_params", "losses")}}
            print(label, record["runs"][label], flush=True)
            if not args.no_write:  # after every run, so a killed benchmark keeps what it finished
                save(record)
    return record


GOAL = 60 / 28.3  # <= 60 on news (dense 28.3) after recovery, wiki -> news at ratio 0.2
QUANT_GOAL = 3.0  # within 3x dense at 2 bits (quantization alone, the compensation trained)


def goal(record: dict) -> float:
    """The multiple of dense a record's recovered model should reach: issue 10's for a quantized model
    without low rank, issue 9's otherwise."""
    return QUANT_GOAL if record["ratio"] is None else GOAL


def ratio(record: dict) -> str:
    return "—" if record["ratio"] is None else str(record["ratio"])


def learning_rate(record: dict) -> str:
    """The peak learning rate a record's runs trained with."""
    return f"{float(record['finetune'][record['finetune'].index('--lr') + 1]):g}"


def finetune_options(record: dict) -> list[str]:
    """The `--finetune` options a record's runs added to the budget (e.g. --train-scales)."""
    budget = record["finetune"]
    return budget[budget.index("--val-tokens") + 2:]


def render(records: list[dict]) -> str:
    """The section: a summary of every record's cross-domain figures, then one table per record, in
    the order they were measured."""
    lines = ["## Recovery after compression: LM fine-tuning vs distillation, away from the training text", "",
             *render_summary(records), ""]
    for record in records:
        lines += [*render_record(record), ""]
    return "\n".join(lines).rstrip() + "\n"


def render_summary(records: list[dict]) -> list[str]:
    """One row per record: the cross-domain perplexity before and after its best recovery run, against
    issue 9's goal (<= 60 on news after recovery at 0.2, that is <= 2.12x dense; the same multiple is
    applied to the other direction and ratios, where the issue asks only for the figures)."""
    lines = [f"### Summary: cross-domain perplexity before and after recovery (goal: ≤ {GOAL:.2f}× dense, "
             f"≤ 60 on news; rows without a ratio quantize only: ≤ {QUANT_GOAL:.0f}× dense, "
             "the 2-bit goal)", "",
             "| direction | ratio | compression | calibration tokens | training tokens | lr | training-free | "
             "recovered (best run) | × dense | goal |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for record in records:
        other = next(t for t in TEXTS if t != record["calib"])
        dense = record["dense"][other]
        trained = {label: run["perplexity"][other] for label, run in record["runs"].items()
                   if label != "training-free"}
        if not trained:
            continue
        label, best = min(trained.items(), key=lambda item: item[1])
        extra = " ".join(finetune_options(record))
        lines.append(f"| {record['calib']} → {other} | {ratio(record)} | `{record['compress']}`"
                     f"{f', fine-tuned with `{extra}`' if extra else ''}"
                     f"{' (welore ' + record['commit'] + ')' if record.get('commit') else ''} | "
                     f"{record['calib_tokens']:,} | {record['train_tokens']:,} | {learning_rate(record)} | "
                     f"{fmt(record['runs']['training-free']['perplexity'][other])} | {fmt(best)} ({label}) | "
                     f"{best / dense:.2f} | {'met' if best / dense <= goal(record) else 'not met'} |")
    return lines


def passes(record: dict) -> str:
    """How often the training read its text: records before `epochs` was kept all made one pass."""
    epochs = max((run.get("epochs", 1.0) for label, run in record["runs"].items() if label != "training-free"),
                 default=1.0)
    return "one pass" if epochs <= 1 else f"{epochs:.2f} passes over it"


def render_record(record: dict) -> list[str]:
    calib, other, dense = record["calib"], next(t for t in TEXTS if t != record["calib"]), record["dense"]
    ways = {"LM loss": "the plain next-token loss",
            "distillation": "`--distill` (KL to the dense source model's next-token distribution)"}
    made = [ways[label] for label in record["runs"] if label in ways]
    how = (f"once with {made[0]} and once with {made[1]}" if len(made) == 2
           else f"with {made[0]} only" if made else "not at all")
    lines = [
        f"### {record['train_tokens']:,} training tokens of {calib}, "
        f"{'' if record['ratio'] is None else f'ratio {ratio(record)}, '}`{record['compress']}`, "
        f"lr {learning_rate(record)}; judged on {other}",
        "",
        *([record["note"], ""] if record.get("note") else []),
        "Command:",
        "",
        f"    {record['command']}",
        "",
        f"Machine: {record['machine']}. The default model compressed by "
        f"`welore compress {'' if record['ratio'] is None else '--ratio ' + ratio(record) + ' '}"
        f"{record['compress']} --calib {calib} "
        f"--calib-tokens {record['calib_tokens']}`, then `welore finetune "
        f"{' '.join(record['finetune'])}` ({record['train_tokens']:,} training tokens of {calib}'s calibration half, "
        f"{passes(record)}), {how}. Perplexity by `welore evaluate --max-tokens {record['eval_tokens']} --seq-len 512` "
        f"on each text's evaluation half: {other} was seen neither by the compression nor by the training.",
        "",
        f"| model | perplexity on {other} (cross-domain) | perplexity on {calib} | × dense on {other} | wall s | "
        "training tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
        f"| dense | {fmt(dense[other])} | {fmt(dense[calib])} | 1.00 | — | — |",
    ]
    for label, run in record["runs"].items():
        ppl = run["perplexity"]
        speed = f"{run['tokens_per_s']:.0f}" if run.get("tokens_per_s") else "—"
        name = "compressed, training-free" if label == "training-free" else f"+ fine-tuned, {label}"
        lines.append(f"| {name} | {fmt(ppl[other])} | {fmt(ppl[calib])} | {ppl[other] / dense[other]:.2f} | "
                     f"{run['seconds']:.0f} | {speed} |")
    trained = next((r for r in record["runs"].values() if r.get("trainable_params")), None)
    if trained:
        lines += ["", f"Trainable parameters: {trained['trainable_params']:,} of {trained['total_params']:,}. "
                  "Wall seconds: the whole `welore compress` / `welore finetune` command (loading, the teacher's "
                  "forward passes, validation and saving included)."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float,
                        help="low-rank compression ratio; leave out when --compress quantizes without low rank")
    parser.add_argument("--calib", choices=TEXTS, default="wiki", help="calibration and training text (calib half)")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--compress", default=DEFAULT_COMPRESS,
                        help="welore compress options (method, factorizer, ...)")
    parser.add_argument("--train-tokens", type=int, default=65536, help="training-token budget of each fine-tuning run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--mode", default="lrc")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--finetune", default="",
                        help="further welore finetune options, e.g. --finetune=--train-scales (= as it starts with --)")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--losses", nargs="+", choices=list(LOSSES), default=list(LOSSES),
                        help="which fine-tuning runs to make (both by default, on the same budget)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument("--records", action="store_true",
                        help="render the section from docs/recovery.json instead of running")
    args = parser.parse_args()
    command = "python benchmarks/recovery.py " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "--records")
    if args.records:
        records = load_records()
    else:
        record = run(args, command)
        records = [r for r in load_records() if [r.get(k) for k in KEY] != [record.get(k) for k in KEY]] + [record]
    publish("recovery", render(records), write=not args.no_write)


if __name__ == "__main__":
    main()
