"""Optimizer step time and state size on SmolLM2-135M's target matrices: AdamW, GaLore, Fira.

    .venv/bin/python benchmarks/optim_speed.py [--model smollm2-135m] [--ranks 128 64 16] [--gap 50] [--threads 1]

Every optimizer owns a copy of the 210 target matrices of the default model (30 layers × q/k/v/o
and gate/up/down, 106M parameters) and receives the same gradients: random normal matrices of
the right shapes, two sets used alternately. What an optimizer step costs depends on the shapes,
the rank and the refresh method, not on where the gradient's values came from; the only value
dependence is how well a subspace iteration converges, which is the accuracy question tested in
tests/test_optim.py, not a speed one.

One run times one refresh period per optimizer, side by side: after an untimed first step (the
cold projector refresh), steps 2 … T+1 are timed, so the period holds T − 1 ordinary steps and
one warm refresh (step T+1). The optimizers alternate step by step, so a transient load on the
machine hits all of them alike. The period average is reported as
((T − 1)·median ordinary step + refresh step) / T, robust to a stray slow step.

Methods (all with lr 1e-3, weight decay 0.01, scale 0.25, proj_type "std"):
- AdamW: `torch.optim.AdamW` with its defaults (the single-tensor loop on a CPU).
- GaLore, svd: `GaLoreAdamW(proj_method="svd")`, a full SVD per matrix per refresh, as the paper.
- GaLore, subspace: `GaLoreAdamW` as shipped (warm-started randomized subspace iteration).
- Fira, subspace: `FiraAdamW` as shipped.
State bytes count every tensor in `optimizer.state`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import machine, publish

from welore.io.models import load_model
from welore.optim import FiraAdamW, GaLoreAdamW
from welore.targets import find_targets

LR, WEIGHT_DECAY, SCALE = 1e-3, 0.01, 0.25


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def build(method: str, params: list[torch.nn.Parameter], rank: int, gap: int) -> torch.optim.Optimizer:
    if method == "AdamW":
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    cls, refresh = {"GaLore, svd": (GaLoreAdamW, "svd"), "GaLore, subspace": (GaLoreAdamW, "subspace"),
                    "Fira, subspace": (FiraAdamW, "subspace")}[method]
    group = {"params": params, "rank": rank, "update_proj_gap": gap, "scale": SCALE, "proj_type": "std",
             "proj_method": refresh}
    return cls([group], lr=LR, weight_decay=WEIGHT_DECAY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ranks", type=int, nargs="+", default=[128, 64, 16])
    parser.add_argument("--gap", type=int, default=50, help="update_proj_gap T: steps per refresh period")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(args.model).model
    weights = [m.weight.detach().float() for m in find_targets(model).values()]  # nn.Linear: (out, in)
    del model
    generator = torch.Generator().manual_seed(0)
    grad_sets = [[1e-3 * torch.randn(w.shape, generator=generator) for w in weights] for _ in range(2)]

    low_rank = ("GaLore, svd", "GaLore, subspace", "Fira, subspace")
    runs = [("AdamW", None)] + [(m, r) for r in args.ranks for m in low_rank]
    params = {run: [torch.nn.Parameter(w.clone()) for w in weights] for run in runs}
    optimizers = {run: build(run[0], params[run], run[1] or 0, args.gap) for run in runs}
    times: dict[tuple, list[float]] = {run: [] for run in runs}
    for step in range(1, args.gap + 2):  # step 1 untimed (cold refresh); steps 2 … T+1 timed
        for run in runs:
            for p, g in zip(params[run], grad_sets[step % 2], strict=True):
                p.grad = g
            start = time.perf_counter()
            optimizers[run].step()
            elapsed = time.perf_counter() - start
            if step > 1:
                times[run].append(elapsed)
        print(f"step {step}/{args.gap + 1}: " + ", ".join(f"{run[0]} r{run[1]} {times[run][-1]:.2f}s"
                                                       for run in runs if times[run]), flush=True)

    adamw_run = ("AdamW", None)
    period = {}
    for run, ts in times.items():
        ordinary, refresh = ts[:-1], ts[-1]  # the last timed step (T+1) refreshes the projectors
        period[run] = ((args.gap - 1) * statistics.median(ordinary) + refresh) / args.gap
    base_time, base_bytes = period[adamw_run], state_bytes(optimizers[adamw_run])
    n_params = sum(w.numel() for w in weights)
    rows = []
    for run in runs:
        method, rank = run
        ordinary = statistics.median(times[run][:-1])
        refresh = "—" if rank is None else f"{times[run][-1]:.2f}"
        amortised = "—" if rank is None else f"{(times[run][-1] - ordinary) / args.gap * 1e3:.0f}"
        nbytes = state_bytes(optimizers[run])
        rows.append(f"| {method} | {rank or '—'} | {ordinary * 1e3:.0f} | {refresh} | {amortised} | "
                    f"{period[run] * 1e3:.0f} | **{period[run] / base_time:.2f}×** | {nbytes / 2**20:.0f} | "
                    f"{nbytes / base_bytes:.2f}× |")
    command = (f".venv/bin/python benchmarks/optim_speed.py --model {args.model} "
               f"--ranks {' '.join(map(str, args.ranks))} --gap {args.gap} --threads {args.threads}")
    markdown = "\n".join([
        "## Optimizer step time and state: AdamW vs GaLore vs Fira on SmolLM2-135M's target matrices",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Matrices: the {len(weights)} target matrices of {args.model} ({n_params / 1e6:.1f}M parameters: "
        "q/o 576×576, k/v 192×576, gate/up 1536×576, down 576×1536), float32, each optimizer with its own copy. "
        "Gradients: random normal of the same shapes (two sets, alternating); step cost depends on shapes, rank "
        "and method, not on the gradient values' origin.  ",
        f"Timing: one refresh period of update_proj_gap = {args.gap} steps per optimizer, the optimizers "
        "alternating step by step in one run; period average = ((T − 1)·median ordinary step + the warm refresh "
        "step) / T. proj_type \"std\" (the 576 side of every matrix is projected), lr 1e-3, weight decay 0.01.",
        "",
        "| method | rank | ordinary step (ms) | refresh step (s) | refresh per step (ms) | period average (ms) | "
        "vs AdamW | state (MiB) | state vs AdamW |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Refresh per step = (refresh step − ordinary step) / T: the projector refresh's share of the period "
        "average. An ordinary GaLore or Fira step costs two (m×n)·r matrix products per matrix (project the "
        "gradient, project the step back: 4·r flops per parameter) against AdamW's few memory-bound elementwise "
        "passes, so on a CPU the step time grows with the rank whatever the refresh method; Fira adds two "
        "passes over G. Goal for the default method (GaLore, subspace): ≤ 1.5× AdamW.",
    ])
    publish("optim-speed", markdown, write=not args.no_write)


if __name__ == "__main__":
    main()
