"""How unbalanced the raw factors of each factorizer are, before `balance_factors` evens them.

    .venv/bin/python benchmarks/factor_balance.py [--factorizers whiten kfac] [--layers 3 20] [--calib-tokens 8192]

For every target matrix of the chosen decoder layers of the default model, the factorizer's own
factors at half rank (whitened by `--calib-tokens` of wiki's calibration half) and the ratio
‖up[:, j]‖ / ‖down[j, :]‖ of each component j: printed as min / median / max per matrix.
A ratio far from 1 means Adam (per-element steps) fine-tunes the two sides at very different
relative rates; welore stores every factorization balanced (ratio 1).
"""

from __future__ import annotations

import argparse

from welore.data import load_text, token_windows
from welore.io.models import load_model
from welore.lowrank.calibrate import iter_block_stats
from welore.lowrank.compress import gradient_stats
from welore.lowrank.curvature import CurvatureStats
from welore.lowrank.factorize import make_factorizer
from welore.tables import format_table
from welore.targets import find_targets, weight_matrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factorizers", nargs="+", default=["whiten", "kfac"])
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 20])
    parser.add_argument("--calib-tokens", type=int, default=8192)
    args = parser.parse_args()
    loaded = load_model("smollm2-135m")
    calibration = token_windows(loaded.tokenizer, load_text("wiki", split="calib"), 512, args.calib_tokens)
    prefixes = tuple(f"model.layers.{i}." for i in args.layers)
    targets = {n: m for n, m in find_targets(loaded.model).items() if n.startswith(prefixes)}
    stats = {}
    for _, block in iter_block_stats(loaded.model, targets, calibration, progress=False):
        stats.update(block)
    factorizers = {name: make_factorizer(name) for name in args.factorizers}
    grads = None
    if any(f.needs_gradients for f in factorizers.values()):
        grads = gradient_stats(loaded.model, targets, calibration, progress=False)
    rows = []
    for kind, factorizer in factorizers.items():
        for name, module in targets.items():
            weight = weight_matrix(module)
            curvature = factorizer.needs_gradients
            layer_stats = CurvatureStats(inputs=stats[name], grads=grads[name]) if curvature else stats[name]
            up, down = factorizer.factors(weight, min(weight.shape) // 2, layer_stats)
            ratio = up.norm(dim=0) / down.norm(dim=1)  # (r,)
            rows.append([kind, name, f"{ratio.min():.3g}", f"{ratio.median():.3g}", f"{ratio.max():.3g}"])
    print(format_table(["factorizer", "matrix", "min", "median", "max"], rows, left=2))


if __name__ == "__main__":
    main()
