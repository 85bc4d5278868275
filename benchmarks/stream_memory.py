"""Peak resident memory of compress / analyze / evaluate / export, whole model vs one block at a time.

Every job runs in its own process (so each peak is that job's alone) and reports the process's
peak resident set size (VmHWM), its time, and a digest of what it produced (the saved
factors' bytes, the perplexity), so the resident and streamed runs are compared side by side
in one run and checked to give identical results. Next to each streamed peak stands the
peak-memory law of the README:

    peak ≈ P + max(ends, blocks), P python + torch + welore (measured by an empty job), where
      ends   = W_out (weights outside the decoder blocks: embeddings, final norm, LM head)
               + N·T·d·b (hidden states of all N windows of T tokens; b bytes per value)
               + L (one batch's logits and their float32 log-probabilities, 2·B·T·V·4; perplexity only)
               + 2·W_shard (the largest output shard serialized in memory; compress and export only)
      blocks = 2·W_block (the block being processed and its factorized / working copy)
               + N·T·d·b
               + S (XᵀX statistics of one block, float64: Σ over its distinct inputs of in²·8; calibration only)
    (the weights outside the blocks are released while a pass goes over the blocks)

    python benchmarks/stream_memory.py                     # SmolLM2-135M (float32), writes docs/benchmarks.md
    python benchmarks/stream_memory.py --model DIR --dtype bfloat16 --section stream-memory-1b --jobs ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section  # noqa: E402

JOBS = ("baseline", "compress-svd", "compress-whiten-seq", "analyze", "evaluate", "export")


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _digest(folder: Path) -> str:
    from welore.io.stream import TensorFiles

    files = TensorFiles(folder)
    digest = hashlib.blake2b(digest_size=8)
    for name in sorted(files.files):
        tensor = files.read([name])[name]
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return digest.hexdigest()


def child(args: argparse.Namespace) -> dict:
    """Run one job in this process; return its peak RSS, time and result digest."""
    import torch

    torch.set_num_threads(args.threads)
    from welore import CompressConfig, compress_
    from welore.data import load_text, token_windows
    from welore.eval.evaluate import perplexity
    from welore.io.checkpoint import export_dense, save
    from welore.io.models import load_model

    max_memory = args.max_memory if args.streamed else None
    if args.streamed:  # as the CLI does when --max-memory is given
        from welore.io.stream import return_freed_memory

        return_freed_memory()
    start = time.perf_counter()
    result: dict = {}
    out = Path(args.work) / f"{args.job}-{args.calib_tokens[0]}-{'streamed' if args.streamed else 'resident'}"
    if args.job == "baseline":
        import welore.analyze  # noqa: F401  (everything a job imports, nothing loaded)
    elif args.job == "export":
        export_dense(Path(args.work) / f"compress-svd-{args.calib_tokens[0]}-resident", out, stream=args.streamed)
        result["digest"] = _digest(out)
    else:
        loaded = load_model(args.model, dtype=args.dtype, max_memory=max_memory)
        if args.job == "compress-svd":
            compress_(loaded.model, CompressConfig(ratio=args.ratio, method="welore"), progress=False)
            save(loaded.model, out)
            result["digest"] = _digest(out)
        elif args.job == "compress-whiten-seq":
            windows = token_windows(loaded.tokenizer, load_text("wiki", split="calib"), args.seq_len,
                                    args.calib_tokens[0])
            config = CompressConfig(ratio=args.ratio, method="welore", factorizer="whiten", sequential=True,
                                    calib="wiki", calib_tokens=windows.numel())
            compress_(loaded.model, config, calibration=windows, progress=False)
            save(loaded.model, out)
            result["digest"] = _digest(out)
            result["tokens"] = windows.numel()
        elif args.job == "analyze":
            from welore.analyze import analyze

            analysis = analyze(loaded.model, ratio=args.ratio, progress=False)
            result["digest"] = hashlib.blake2b(
                b"".join(s.numpy().tobytes() for s in analysis.spectra.values()), digest_size=8).hexdigest()
        elif args.job == "evaluate":
            windows = token_windows(loaded.tokenizer, load_text("wiki", split="eval"), args.seq_len, args.eval_tokens)
            ppl, _ = perplexity(loaded.model, windows, progress=False)
            result["digest"] = f"ppl {ppl!r}"
            result["tokens"] = windows.numel()
    result.update(seconds=time.perf_counter() - start, peak_rss=_peak_rss())
    return result


def law(settings: dict, tokens: int, job: str, base: int) -> dict[str, dict[str, int]]:
    """The peak-memory law (docs/big-models.md) for a streamed `job`, term by term, in bytes, for its two
    phases: at the ends of a pass (`ends`) and over the blocks (`blocks`); the peak is the larger."""
    import torch

    from welore.io.checkpoint import empty_model
    from welore.io.models import DTYPES
    from welore.io.stream import StreamedBlocks, TensorFiles

    folder = Path(settings["model"])
    config = json.loads((folder / "config.json").read_text())
    dtype = DTYPES.get(settings["dtype"], torch.float32)
    access = StreamedBlocks(empty_model(folder, dtype), TensorFiles(folder))
    d, mlp, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shared = {"P": base}
    if job in ("compress-whiten-seq", "evaluate"):
        shared["N·T·d·b"] = tokens * d * dtype.itemsize
    ends = {**shared, "W_out": access.outside_bytes}  # capturing block 0's inputs, the LM head, writing the output
    if job == "evaluate":
        ends["L"] = 2 * settings["batch_size"] * settings["seq_len"] * vocab * 4
    if job.startswith(("compress", "export")):  # the largest shard written (the embeddings), serialized in memory
        ends["2·W_shard"] = 2 * access.outside_bytes
    blocks = {**shared, "2·W_block": 2 * access.block_bytes}  # between them: the weights outside are released
    if job == "compress-whiten-seq":
        blocks["S"] = (3 * d * d + mlp * mlp) * 8  # q/k/v, o, gate/up and down inputs
    return {"ends": ends, "blocks": blocks}


def render(data: dict) -> str:
    """The docs section for the results in `data` (the --json file), with the law beside each streamed peak."""
    settings, base, gb = data["settings"], data["baseline_rss"], 1e9
    lines = [
        f"Peak resident memory (VmHWM of the job's own process) of {data['model']} ({settings['dtype']}), whole model "
        f"vs `max_memory={settings['max_memory']}` (one decoder block at a time), ratio {settings['ratio']}; "
        f"an empty job (python + torch + welore imported) peaks at {base / gb:.2f} GB. "
        "`law` is the peak-memory law of docs/big-models.md for the streamed run; `identical` compares the saved "
        "factors' bytes (or the perplexity) of the two runs. "
        + (f"{settings['parallel']} jobs ran at once on a shared machine, so the wall times only say the streamed "
           "runs are not slower by much; the peaks are each process's own." if settings["parallel"] > 1 else ""),
        "",
        f"Command: `{data['command']}`  ",
        f"Machine: {data['machine']}",
        "",
        "| job | tokens | resident peak | streamed peak | streamed / resident | law (streamed) | law terms (GB) | "
        "wall time resident → streamed | identical |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        r, s = row["resident"], row["streamed"]
        phases = law(settings, row["tokens"], row["job"], base)
        text = "; ".join(f"{phase}: " + ", ".join(f"{k} {v / gb:.3f}" for k, v in terms.items())
                         for phase, terms in phases.items())
        predicted = max(sum(terms.values()) for terms in phases.values())
        lines.append(
            f"| {row['job']} | {row['tokens'] or '-'} | {r['peak_rss'] / gb:.2f} GB | {s['peak_rss'] / gb:.2f} GB | "
            f"{s['peak_rss'] / r['peak_rss']:.2f}× | {predicted / gb:.2f} GB | {text} | "
            f"{r['seconds']:.0f} s → {s['seconds']:.0f} s | {'yes' if row['identical'] else 'NO'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="built-in name or model folder (safetensors)")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or auto")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--max-memory", default="4GB", help="the budget given to the streamed runs (default 4GB)")
    parser.add_argument("--calib-tokens", type=int, nargs="+", default=[2048, 8192],
                        help="calibration token counts to measure")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=1,
                        help="jobs run at once (times are then not comparable; peaks are)")
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=JOBS)
    parser.add_argument("--section", default="stream-memory", help="section of docs/benchmarks.md to write")
    parser.add_argument("--json", default="docs/stream_memory.json",
                        help="raw results (default docs/stream_memory.json)")
    parser.add_argument("--render", metavar="JSON",
                        help="only rewrite the docs section from a --json file of an earlier run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--streamed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.render:
        _write(args.section, json.loads(Path(args.render).read_text()))
        return
    command = "python benchmarks/stream_memory.py " + " ".join(sys.argv[1:])
    label = args.model
    # a built-in name: its converted folder, so the jobs' private caches need not convert it
    if not Path(args.model).is_dir():
        from welore.io.models import builtin_model_dir

        args.model = str(builtin_model_dir(args.model))
    rows = []
    with tempfile.TemporaryDirectory(prefix="stream-memory-") as work:
        def run(job: str, streamed: bool, **extra) -> dict:
            cmd = [sys.executable, __file__, "--child", "1", "--job", job, "--work", work, "--model", args.model,
                   "--dtype", args.dtype, "--ratio", str(args.ratio), "--max-memory", args.max_memory,
                   "--eval-tokens", str(args.eval_tokens), "--seq-len", str(args.seq_len),
                   "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
            cmd += ["--calib-tokens", str(extra.get("calib_tokens", args.calib_tokens[0]))]
            if streamed:
                cmd.append("--streamed")
            env = {**os.environ, "WELORE_CACHE": tempfile.mkdtemp(prefix="cache-", dir=work)}  # no cached spectra
            done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            if done.returncode:
                raise RuntimeError(f"{job} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(job, "streamed" if streamed else "resident", extra, result, flush=True)
            return result

        base = run("baseline", False)["peak_rss"]
        jobs = [j for j in args.jobs if j != "baseline"]
        if "export" in jobs and "compress-svd" not in jobs:
            jobs.insert(0, "compress-svd")
        cases = [(job, {"calib_tokens": n} if n else {}) for job in jobs
                 for n in (args.calib_tokens if job == "compress-whiten-seq" else [None])]
        # Peaks are per process, so jobs may run side by side (--parallel); export reads compress-svd's output.
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            futures = {(job, str(extra), kind): pool.submit(run, job, kind == "streamed", **extra)
                       for job, extra in cases if job != "export" for kind in ("resident", "streamed")}
            for future in futures.values():
                future.result()
            futures.update({(job, str(extra), kind): pool.submit(run, job, kind == "streamed", **extra)
                            for job, extra in cases if job == "export" for kind in ("resident", "streamed")})
        for job, extra in cases:
            pair = {kind: futures[(job, str(extra), kind)].result() for kind in ("resident", "streamed")}
            rows.append({"job": job, "tokens": pair["streamed"].get("tokens", 0), "resident": pair["resident"],
                         "streamed": pair["streamed"],
                         "identical": pair["resident"].get("digest") == pair["streamed"].get("digest")})
    settings = {k: getattr(args, k)
                for k in ("model", "dtype", "ratio", "max_memory", "batch_size", "seq_len", "parallel")}
    data = {"command": command, "machine": machine(), "model": label, "settings": settings, "baseline_rss": base,
            "rows": rows}
    Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    _write(args.section, data)


def _write(section: str, data: dict) -> None:
    text = render(data)
    write_section(section, text)
    print(text)


if __name__ == "__main__":
    main()
