"""All singular values of the default model's target matrices: welore vs `torch.linalg.svd`.

    .venv/bin/python benchmarks/spectrum_speed.py [--model smollm2-135m] [--repeats 3]

Side by side in one run, one matrix type at a time and alternating the two methods, each
timed as the best of `--repeats`. welore takes eigenvalues of the float64 Gram matrices, one
single-threaded solve per core (`welore.lowrank.spectrum.singular_values_many`); the baseline calls
`torch.linalg.svd` on each float32 matrix as stored, with torch's default threads. Accuracy
is measured against float64 `torch.linalg.svdvals`.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import machine, publish

from welore.io.models import load_model
from welore.lowrank.spectrum import singular_values_many
from welore.targets import find_targets, matrix_type, weight_matrix


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()

    model = load_model(args.model).model
    targets = find_targets(model)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in targets.items():
        w = weight_matrix(module).detach().contiguous()
        groups.setdefault(f"{matrix_type(name)} {tuple(w.shape)}", {})[name] = w

    rows: dict[str, list[float]] = {}
    svd_total = gram_total = max_rel = 0.0
    for kind, matrices in groups.items():  # the two methods alternate, group by group
        t_svd = best_time(lambda m=matrices: [torch.linalg.svd(w, full_matrices=False) for w in m.values()],
                          args.repeats)
        t_gram = best_time(lambda m=matrices: singular_values_many(m, progress=False), args.repeats)
        ours = singular_values_many(matrices, progress=False)
        rel = 0.0
        for name, w in matrices.items():
            reference = torch.linalg.svdvals(w.double())
            # relative error of every singular value, guarded against exact zeros
            rel = max(rel, ((ours[name] - reference).abs() / reference.clamp_min(1e-30)).max().item())
        rows[kind] = [len(matrices), t_svd, t_gram, rel]
        svd_total, gram_total, max_rel = svd_total + t_svd, gram_total + t_gram, max(max_rel, rel)

    lines = [
        "## Singular values: welore vs `torch.linalg.svd`",
        "",
        f"Command: `.venv/bin/python benchmarks/spectrum_speed.py --model {args.model} --repeats {args.repeats}`  ",
        f"Machine: {machine()}",
        "",
        "| matrix type (shape) | count | torch.linalg.svd (s) | welore (s) | speed-up | max relative error |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind, (count, t_svd, t_gram, rel) in rows.items():
        lines.append(f"| {kind} | {count} | {t_svd:.3f} | {t_gram:.3f} | {t_svd / t_gram:.1f}× | {rel:.1e} |")
    lines.append(f"| **all {len(targets)} matrices** | {len(targets)} | {svd_total:.2f} | {gram_total:.2f} | "
                 f"**{svd_total / gram_total:.1f}×** | {max_rel:.1e} |")
    lines += ["", "Relative error: max over all singular values of |σ_welore − σ_ref| / σ_ref, "
              "with σ_ref from float64 `torch.linalg.svdvals`."]
    text = "\n".join(lines)
    publish("spectrum-speed", text, write=not args.no_write)


if __name__ == "__main__":
    main()
