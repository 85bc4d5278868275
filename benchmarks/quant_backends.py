"""Which weight-only quantization backend welore builds on: torchao, HQQ or optimum-quanto.

For four target matrices of the default model (layer 10's q_proj, v_proj, up_proj, down_proj)
and their real inputs on 512 tokens of wiki text, each backend quantizes the weight at 8/4/3/2
bits with groups of 32/64/128 along each row (where it can), and we record:

- whether it can at all (a missing bit width or group size is a row saying so),
- the bytes it stores for the quantized weight (codes + scales + zero points, as held in memory),
- the relative weight error ‖W − Ŵ‖/‖W‖ and output error ‖(W − Ŵ)·Xᵀ‖/‖W·Xᵀ‖,
- the time of one forward of the quantized layer on the 512 tokens, relative to dense float32.

A plain RTN reference (asymmetric min/max per group, torch only) is measured alongside.

    pip install --no-deps torchao==0.18.0 hqq==0.2.8.post1 optimum-quanto==0.2.7 einops termcolor
    PYTHONPATH=src python benchmarks/quant_backends.py

Writes docs/quant_backends.json and the quant-backends section of docs/benchmarks.md.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch
from _common import machine, write_section
from torch import nn

LAYER = 10
MATRICES = ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")
BITS = (8, 4, 3, 2)
GROUPS = (32, 64, 128)
TOKENS = 512


def activations():
    from welore.data import load_text, token_windows
    from welore.io.models import load_model

    loaded = load_model("smollm2-135m")
    model = loaded.model
    windows = token_windows(loaded.tokenizer, load_text("wiki", split="calib"), TOKENS, TOKENS)
    inputs, weights = {}, {}
    hooks = []
    for name in MATRICES:
        module = model.model.layers[LAYER].get_submodule(name)
        weights[name] = module.weight.detach().clone()
        hooks.append(module.register_forward_pre_hook(
            lambda m, a, n=name: inputs.__setitem__(n, a[0].detach().reshape(-1, a[0].shape[-1]).clone())))
    with torch.no_grad():
        model(windows)
    for h in hooks:
        h.remove()
    return weights, inputs


def tensor_bytes(obj) -> int:
    """Bytes of every tensor reachable from a module's state (parameters, buffers, tensor-subclass parts)."""
    total, seen = 0, set()

    def visit(t):
        nonlocal total
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            for n in names:
                visit(getattr(t, n))
            return
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for t in obj:
        visit(t)
    return total


def rtn(w, bits, group):
    g = w.reshape(w.shape[0], -1, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)
    q = ((g - lo) / scale).round().clamp(0, 2**bits - 1)
    deq = (q * scale + lo).reshape_as(w)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data = deq
    packed = w.numel() * bits // 8 + 2 * 2 * g.shape[0] * g.shape[1]  # codes + fp16 scale/min
    return layer, packed


def torchao_layer(w, bits, group):
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    layer = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False))
    layer[0].weight.data = w.clone()
    if bits == 8 and group is None:
        config = Int8WeightOnlyConfig()
    else:
        dtype = {8: torch.int8, 4: torch.int4, 3: torch.int3, 2: torch.int2}[bits]
        config = IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(group),
                                      mapping_type=MappingType.ASYMMETRIC)
    quantize_(layer, config)
    return layer[0], tensor_bytes([layer[0].weight])


def hqq_layer(w, bits, group, optimize):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w.clone()
    config = BaseQuantizeConfig(nbits=bits, group_size=group, axis=1)
    config["weight_quant_params"]["optimize"] = optimize
    layer = HQQLinear(lin, quant_config=config, compute_dtype=torch.float32, device="cpu")
    parts = [layer.W_q] + [v for v in layer.meta.values() if isinstance(v, torch.Tensor)]
    return layer, tensor_bytes(parts)


def quanto_layer(w, bits, group):
    from optimum.quanto import qint2, qint4, qint8, quantize_weight
    from optimum.quanto.tensor.optimizers import AbsmaxOptimizer, MaxOptimizer

    qtype = {8: qint8, 4: qint4, 2: qint2}.get(bits)
    if qtype is None:
        raise NotImplementedError("quanto has no 3-bit integer type (qint2, qint4, qint8 only)")
    if bits == 8:  # quanto's int8 weights are symmetric, per output channel (no groups)
        qw = quantize_weight(w, qtype=qtype, axis=0, scale=AbsmaxOptimizer()(w, qtype=qtype, axis=0))
    else:
        scale, shift = MaxOptimizer()(w, qtype=qtype, axis=0, group_size=group)
        qw = quantize_weight(w, qtype=qtype, axis=0, scale=scale, shift=shift, group_size=group)

    class Dequantized(nn.Module):
        def forward(self, x):
            return torch.nn.functional.linear(x, qw.dequantize())

    return Dequantized(), tensor_bytes([qw])


def measure(make, w, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer, nbytes = make()
    with torch.no_grad():
        ref = x @ w.T
        out = layer(x).float()
        start = time.perf_counter()
        for _ in range(5):
            layer(x)
        t = (time.perf_counter() - start) / 5
        start = time.perf_counter()
        for _ in range(5):
            x @ w.T
        t_dense = (time.perf_counter() - start) / 5
        # weight error from the layer's response to the identity
        eye = torch.eye(w.shape[1])
        w_hat = layer(eye).float().T
    return {
        "bytes": nbytes,
        "weight_err": ((w - w_hat).norm() / w.norm()).item(),
        "output_err": ((out - ref).norm() / ref.norm()).item(),
        "time_vs_dense": t / t_dense,
    }


def main() -> None:
    torch.manual_seed(0)
    weights, inputs = activations()
    backends = {
        "rtn (torch reference)": lambda w, b, g: rtn(w, b, g),
        "torchao IntxWeightOnly": torchao_layer,
        "hqq rtn (optimize=False)": lambda w, b, g: hqq_layer(w, b, g, False),
        "hqq (optimize=True)": lambda w, b, g: hqq_layer(w, b, g, True),
        "optimum-quanto": quanto_layer,
    }
    rows = []
    for backend, fn in backends.items():
        for bits in BITS:
            for group in GROUPS:
                agg = {"bytes": 0, "params": 0, "weight_err": [], "output_err": [], "time_vs_dense": []}
                error = None
                for name, w in weights.items():
                    try:
                        m = measure(lambda fn=fn, w=w, bits=bits, group=group: fn(w, bits, group), w, inputs[name])
                    except Exception as err:  # a backend that cannot do this setting
                        error = f"{type(err).__name__}: {str(err)[:120]}"
                        break
                    agg["bytes"] += m["bytes"]
                    agg["params"] += w.numel()
                    for k in ("weight_err", "output_err", "time_vs_dense"):
                        agg[k].append(m[k])
                row = {"backend": backend, "bits": bits, "group": group}
                if error:
                    row["error"] = error
                else:
                    row.update(
                        bits_per_param=8 * agg["bytes"] / agg["params"],
                        weight_err=sum(agg["weight_err"]) / len(agg["weight_err"]),
                        output_err=sum(agg["output_err"]) / len(agg["output_err"]),
                        time_vs_dense=sum(agg["time_vs_dense"]) / len(agg["time_vs_dense"]),
                    )
                print(row, flush=True)
                rows.append(row)
    out = Path(__file__).resolve().parent.parent / "docs" / "quant_backends.json"
    out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")
    lines = [
        "## Quantization backends (weight-only, CPU)",
        "",
        f"Layer {LAYER}'s q/v/up/down_proj of SmolLM2-135M, inputs from {TOKENS} tokens of wiki text; "
        "errors are means over the four matrices; bytes per parameter as stored in memory by the backend "
        "(codes + scales + zero points); forward time relative to a dense float32 matmul. "
        f"Machine: {machine()}.",
        "",
        "Command: `PYTHONPATH=src python benchmarks/quant_backends.py` (with the three backends installed, "
        "see the script).",
        "",
        "| backend | bits | group | stored bits/param | weight rel. err | output rel. err | forward time / dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['bits']} | {r['group']} | "
                         f"not supported: {r['error'].replace('|', '/')} | | | |")
        else:
            lines.append(f"| {r['backend']} | {r['bits']} | {r['group']} | {r['bits_per_param']:.2f} | "
                         f"{r['weight_err']:.4f} | {r['output_err']:.4f} | {r['time_vs_dense']:.1f}x |")
    write_section("quant-backends", "\n".join(lines))


if __name__ == "__main__":
    main()
