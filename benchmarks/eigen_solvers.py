"""Top-r eigenpairs of a Gram matrix: LAPACK's subset solver (MRRR) vs torch's full `eigh`.

    .venv/bin/python benchmarks/eigen_solvers.py [--sizes 576 2048 4096] [--threads 2]

Every factorization welore computes on the CPU ends in the r largest eigenpairs of a k×k
float64 Gram matrix (`welore.lowrank.factorize._top_eigenpairs`). scipy's `eigh(subset_by_index=...,
driver="evr")` computes only those r; `torch.linalg.eigh` (divide and conquer) computes all k.
This times both side by side, per k and r/k, to place the switch between them
(`EVR_MAX_FRACTION`). The Gram matrices are those of random normal k × 1.5k matrices, a
Marchenko–Pastur spectrum without gaps, as random-weight big models have; wall seconds, best of
--repeats, with the threads compress's factorization pass gives one matrix (the machine's cores).
"""

from __future__ import annotations

import argparse
import os
import time

import scipy.linalg
import torch
from _common import machine, publish
from threadpoolctl import threadpool_limits

from welore.lowrank.factorize import EVR_MAX_FRACTION

FRACTIONS = (0.1, 0.2, 0.25, 0.3, 0.4, 0.6)


def best_of(repeats: int, fn, *args) -> float:
    """The shortest wall time of `repeats` calls fn(*args)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def full_solver(gram: torch.Tensor) -> None:
    torch.linalg.eigh(gram)


def subset_solver(gram: torch.Tensor, rank: int) -> None:
    k = gram.shape[0]
    scipy.linalg.eigh(gram.numpy().copy(), subset_by_index=(k - rank, k - 1), driver="evr",
                      overwrite_a=True, check_finite=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[576, 2048, 4096])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # scipy's LAPACK too

    generator = torch.Generator().manual_seed(0)
    rows = []
    for k in args.sizes:
        a = torch.randn(k, k + k // 2, generator=generator, dtype=torch.float64)
        gram = a @ a.T  # (k, k)
        full = best_of(args.repeats, full_solver, gram)
        subset = {fraction: best_of(args.repeats, subset_solver, gram, int(fraction * k)) for fraction in FRACTIONS}
        rows.append((k, full, subset))
        print(k, f"eigh {full:.2f}", {f: round(t, 2) for f, t in subset.items()}, flush=True)

    lines = [
        "## Eigen-solvers: the r largest eigenpairs of a k×k Gram matrix",
        "",
        f"Command: `.venv/bin/python benchmarks/eigen_solvers.py --sizes {' '.join(map(str, args.sizes))} "
        f"--threads {args.threads} --repeats {args.repeats}`  ",
        f"Machine: {machine()}",
        "",
        "Wall seconds, best of the repeats, float64. `eigh`: torch's full decomposition (all k pairs); "
        "the other columns: scipy's subset solver (LAPACK MRRR, driver evr) for r = fraction·k. "
        f"welore takes the subset solver up to r = {EVR_MAX_FRACTION}·k and the full one above "
        "(`welore.lowrank.factorize.EVR_MAX_FRACTION`); the ratio column is subset / full at that switch.",
        "",
        "| k | eigh (all k) | " + " | ".join(f"r = {f}·k" for f in FRACTIONS) + " | at the switch |",
        "|---:|---:|" + "---:|" * len(FRACTIONS) + "---:|",
    ]
    for k, full, subset in rows:
        at_switch = subset.get(EVR_MAX_FRACTION)
        lines.append(f"| {k} | {full:.2f} | " + " | ".join(f"{subset[f]:.2f}" for f in FRACTIONS)
                     + (f" | {at_switch / full:.2f}× |" if at_switch is not None else " | |"))
    publish("eigen-solvers", "\n".join(lines), write=not args.no_write)


if __name__ == "__main__":
    main()
