"""Multi-process fine-tuning: 2 processes (DDP, gloo, CPU) against 1 process on SmolLM2-135M.

    .venv/bin/python benchmarks/finetune_ddp.py [--mode full] [--steps 8] [--seq-len 256] [--rounds 2]

Every run is `welore finetune` of the default model on the same global batch: one process
reads 4 blocks of `--seq-len` tokens per optimizer step, two processes (`accelerate launch
--multi_gpu --num_processes 2`, gloo on the CPU, `--device cpu`) read 2 blocks each. The
settings run in fresh processes, interleaved over `--rounds` rounds so that load from other
programs falls on all of them alike; the table gives each setting's median over the rounds.
Figures come from each run's `finetune.json`: tokens/s over the training steps (evaluation
excluded), every process's peak resident memory during training, the per-step losses (the
2-process losses must equal the 1-process ones up to float rounding). Writes the `finetune-ddp`
section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, publish

ROOT = Path(__file__).resolve().parent.parent
GLOBAL_BATCH = 4  # blocks per optimizer step, all processes together
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]
# (label, processes, threads per process)
SETTINGS = [("1 process, 2 threads", 1, 2), ("2 processes (DDP, gloo), 1 thread each", 2, 1),
            ("1 process, 1 thread", 1, 1)]
BASELINE = SETTINGS[0][0]


def run(processes: int, threads: int, options: list[str], out: Path) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT / "src")}
    batch = ["--batch-size", str(GLOBAL_BATCH // processes)]
    if processes == 1:
        command = [sys.executable, "-m", "welore.cli"]
    else:
        command = [*LAUNCH, "--num_processes", str(processes), "--num_cpu_threads_per_process", str(threads),
                   "-m", "welore.cli"]
    subprocess.run([*command, "finetune", "-q", "--device", "cpu", *options, *batch, "--out", str(out)],
                   check=True, cwd=ROOT, env=env)
    return json.loads((out / "finetune.json").read_text())["result"]


def meaning(speed: dict[str, float], memory: dict[str, float], loads: list[float]) -> str:
    """What the figures say, in words, from the figures."""
    ddp, one_thread = SETTINGS[1][0], SETTINGS[2][0]
    cores = len(os.sched_getaffinity(0))
    text = (f"What this means: on this {cores}-core machine two processes ran at "
            f"{speed[ddp] / speed[BASELINE]:.2f}× the tokens/s of one process with 2 threads and "
            f"{speed[ddp] / speed[one_thread]:.2f}× that of one process with 1 thread, with "
            f"{memory[ddp] / memory[BASELINE]:.2f}× the memory: every process holds the whole model, its "
            "gradients and AdamW's state. ")
    if max(loads) > cores:
        text += (f"The machine was shared: its load average was {min(loads):.0f}–{max(loads):.0f} during the runs "
                 f"on {cores} cores. Under such load a process with 2 OpenMP threads spends much of its time "
                 "with one thread waiting for the other to get a core, so the comparison with it says more about "
                 "the load than about DDP; the one against one single-thread process (the same compute per "
                 "process) is the fairer one. ")
    text += ("On a CPU, DDP divides the same cores between processes that each run a smaller batch and adds "
             "a gradient all-reduce per step; the speed-up it is made for (one process per GPU, each with its "
             "own compute) needs several GPUs, and none was available to measure it.")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--mode", default="full", help="fine-tuning mode (full needs no compressed checkpoint)")
    parser.add_argument("--data", default="wiki")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--val-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()
    assert len(os.sched_getaffinity(0)) >= 2, "two processes need two cores"
    options = [args.model, "--mode", args.mode, "--data", args.data, "--steps", str(args.steps),
               "--seq-len", str(args.seq_len), "--val-tokens", str(args.val_tokens),
               "--max-train-tokens", str(args.steps * GLOBAL_BATCH * args.seq_len), "--warmup-steps", "1"]

    records: dict[str, list[dict]] = {label: [] for label, _, _ in SETTINGS}
    loads = [os.getloadavg()[0]]  # the machine's 1-minute load average before, and after each run
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for label, processes, threads in SETTINGS:
                result = run(processes, threads, options, Path(tmp) / f"{round_}-{processes}-{threads}")
                records[label].append(result)
                loads.append(os.getloadavg()[0])
                print(f"round {round_ + 1} {label}: {result['tokens_per_s']:.1f} tokens/s, losses "
                      f"{[round(x, 4) for x in result['losses']]}", flush=True)
    minutes = (time.perf_counter() - started) / 60

    def median(label: str, key) -> float:
        return statistics.median(key(r) for r in records[label])

    speed = {label: median(label, lambda r: r["tokens_per_s"]) for label in records}
    memory = {label: median(label, lambda r: sum(r["process_peak_memory_bytes"])) for label in records}
    base_losses = records[BASELINE][0]["losses"]
    lines = ["| setting | global batch | tokens/s (median) | tokens/s × | rounds (tokens/s) | "
             "peak RSS, all processes (MB) | "
             "peak × | max relative loss difference vs 1 process |", "|---|---|---|---|---|---|---|---|"]
    for label, processes, _ in SETTINGS:
        rows = records[label]
        loss_gap = max(abs(a - b) / abs(b) for r in rows for a, b in zip(r["losses"], base_losses, strict=True))
        per_process = " + ".join(f"{b / 1e6:.0f}" for b in rows[0]["process_peak_memory_bytes"])
        rounds = ", ".join(f"{r['tokens_per_s']:.0f}" for r in rows)
        lines.append(f"| {label} | {processes}×{GLOBAL_BATCH // processes}×{args.seq_len} | {speed[label]:.0f} | "
                     f"{speed[label] / speed[BASELINE]:.2f}× | {rounds} | "
                     f"{memory[label] / 1e6:.0f} ({per_process}) | {memory[label] / memory[BASELINE]:.2f}× | "
                     f"{loss_gap:.1e} |")
    command = "python benchmarks/finetune_ddp.py " + shlex.join(sys.argv[1:])
    text = "\n".join([
        "## Multi-process fine-tuning: 2 processes (DDP) vs 1 on this machine",
        "",
        f"Command: `{command.strip()}` ({minutes:.0f} minutes)  ",
        f"Machine: {machine()}, {len(os.sched_getaffinity(0))} cores usable, no GPU, shared with other work "
        "(its load shifts the absolute figures; the rounds are interleaved so it falls on every setting)  ",
        f"Model: {args.model}, `--mode {args.mode}` with AdamW, {args.steps} optimizer steps of a global batch of "
        f"{GLOBAL_BATCH} blocks × {args.seq_len} tokens of {args.data}'s calib split, float32, `--device cpu`. "
        "One process reads the 4 blocks itself; two processes (`accelerate launch --multi_gpu --num_processes 2 "
        "--num_cpu_threads_per_process 1`, gloo) read 2 each and average their gradients by all-reduce.",
        "",
        "tokens/s: training tokens of all processes per second over the training steps (evaluation excluded). "
        "Peak RSS: each process's resident memory at its peak during training, summed (each process in "
        "parentheses, first round).",
        "",
        "\n".join(lines),
        "",
        meaning(speed, memory, loads),
    ])
    publish("finetune-ddp", text, write=not args.no_write)


if __name__ == "__main__":
    main()
