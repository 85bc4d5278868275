"""Rank-r factors of one matrix: welore's Gram route (`top_factors`) vs a full `torch.linalg.svd`.

    .venv/bin/python benchmarks/factorize_speed.py [--models smollm2-135m tinyllama-1.1b llama2-7b]
        [--repeats 2] [--threads 1]

Per matrix shape of three LLaMA-shaped models, side by side in one run and alternating the
methods, each timed as the best of `--repeats` (wall and CPU time of this process):
the full SVD the factorizers took before (`svd`: float32 as stored; `whiten`/`asvd`: float64
of W·S or W·diag(s)) against `welore.lowrank.factorize.top_factors` (float64 Gram matrix, top-r
eigenvectors, the other side by one product). The rank is the uniform ratio-0.2 rank,
r = 0.8·m·n/(m+n). SmolLM2-135M's matrices are its real block-0 weights; the larger shapes
(TinyLlama-1.1B's and LLaMA-2-7B's configs) are random normal(0, 0.02), enough for timing.
Accuracy: relative Frobenius error of up·down against the float64 truncated SVD's product.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import machine, publish
from threadpoolctl import threadpool_limits

from welore.lowrank.factorize import top_factors

# (hidden, intermediate, kv width) of the models whose shapes are timed
SHAPES = {
    "tinyllama-1.1b": (2048, 5632, 256),
    "llama2-7b": (4096, 11008, 4096),
}


def shapes_of(hidden: int, intermediate: int, kv: int) -> dict[str, tuple[int, int]]:
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "o_proj": (hidden, hidden),
              "gate_proj": (intermediate, hidden), "down_proj": (hidden, intermediate)}
    # one row per distinct shape: q and o (and k for full-head attention) are timed once
    distinct: dict[tuple[int, int], str] = {}
    for kind, shape in shapes.items():
        distinct.setdefault(shape, kind)
    return {kind: shape for shape, kind in distinct.items()}


def matrices(model: str) -> dict[str, torch.Tensor]:
    """kind (shape) -> one float32 matrix of that shape."""
    if model == "smollm2-135m":
        from welore.io.models import load_model
        from welore.targets import find_targets, matrix_type, weight_matrix

        loaded = load_model(model).model
        out = {}
        for name, module in find_targets(loaded).items():
            w = weight_matrix(module).detach().float().contiguous()
            kind = f"{matrix_type(name).split('.')[-1]} {tuple(w.shape)}"
            if ".0." in name and not any(k.endswith(str(tuple(w.shape))) for k in out):
                out[kind] = w
        return out
    generator = torch.Generator().manual_seed(0)
    return {f"{kind} {shape}": torch.randn(*shape, generator=generator) * 0.02
            for kind, shape in shapes_of(*SHAPES[model]).items()}


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def full_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "tinyllama-1.1b", "llama2-7b"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and BLAS threads (default 1, as compress gives each core its own matrix)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # scipy's LAPACK (the CPU eigen-solver) too

    methods = {
        "SVD f32": lambda w, r: full_svd(w, r),
        "SVD f64": lambda w, r: full_svd(w.double(), r),
        "Gram f64": lambda w, r: top_factors(w, r),
    }
    rows = []
    for model in args.models:
        for kind, w in matrices(model).items():
            m, n = w.shape
            rank = round(0.8 * m * n / (m + n))
            best = {name: (float("inf"), float("inf")) for name in methods}
            for _ in range(args.repeats):  # the methods alternate
                for name, fn in methods.items():
                    wall, cpu = timed(lambda fn=fn, w=w, rank=rank: fn(w, rank))
                    best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
            up, down = top_factors(w, rank)
            reference = torch.matmul(*full_svd(w.double(), rank))
            error = ((up @ down - reference).norm() / reference.norm()).item()
            rows.append((model, kind, rank, best, error))
            print(model, kind, rank, best, f"{error:.1e}", flush=True)

    lines = [
        "## Factorization: top-r factors from the Gram matrix vs a full SVD",
        "",
        f"Command: `.venv/bin/python benchmarks/factorize_speed.py --models {' '.join(args.models)} "
        f"--repeats {args.repeats} --threads {args.threads}`  ",
        f"Machine: {machine()}",
        "",
        "Times in seconds, best of the repeats, wall / CPU of this process; the methods alternate. "
        "The machine's 2 cores were shared with other jobs during the run, so the CPU times are "
        "the steadier figure. Speed-ups are Gram f64 against the SVD each factorizer used before: "
        "float32 for `svd`, float64 for `whiten`/`asvd`. Rank: uniform ratio 0.2, "
        "r = 0.8·m·n/(m+n). Error: ‖up·down − A_r‖_F / ‖A_r‖_F against the float64 truncated SVD.",
        "",
        "| model | matrix (shape) | rank | SVD f32 wall / CPU | SVD f64 wall / CPU | Gram f64 wall / CPU "
        "| speed-up vs f32 (CPU) | speed-up vs f64 (CPU) | error |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, kind, rank, best, error in rows:
        f32, f64, gram = best["SVD f32"], best["SVD f64"], best["Gram f64"]
        lines.append(
            f"| {model} | {kind} | {rank} | {f32[0]:.2f} / {f32[1]:.2f} | {f64[0]:.2f} / {f64[1]:.2f} | "
            f"{gram[0]:.2f} / {gram[1]:.2f} | {f32[1] / gram[1]:.1f}× | {f64[1] / gram[1]:.1f}× | {error:.1e} |"
        )
    text = "\n".join(lines)
    publish("factorize-speed", text, write=not args.no_write)


if __name__ == "__main__":
    main()
