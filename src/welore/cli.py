"""The `welore` command line: a thin layer over the Python API.

Each subcommand is one function whose docstring is its `--help`. Mistakes a user can make
raise `WeloreError`; `main` prints its one-sentence message and exits with status 2, without a
traceback. Everything else is a bug and raises loudly.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

from welore.errors import WeloreError

DEFAULT_TEXT = "wiki"


def _load(spec: str, dtype: str):
    from welore.models import load_model

    return load_model(spec, dtype=dtype)


def _eval_windows(tokenizer, args: argparse.Namespace, model_name: str):
    from welore.data import load_text, token_windows

    if tokenizer is None:
        raise WeloreError(f"{model_name} has no tokenizer, so perplexity cannot be measured; pass a model folder that includes one.")
    return token_windows(tokenizer, load_text(args.text, split="eval"), args.seq_len, args.max_tokens)


def cmd_analyze(args: argparse.Namespace) -> None:
    """Measure the singular-value spectrum of every target matrix (and, with --ratio, plan ranks)."""
    from welore._io import check_output_dir
    from welore.analyze import analyze
    from welore.compress import CompressConfig

    CompressConfig(ratio=args.ratio, method=args.method, lrc_min_cut=args.lrc_min_cut)  # fail before loading
    if args.out:
        check_output_dir(args.out, args.overwrite)
    loaded = _load(args.model, args.dtype)
    result = analyze(loaded.model, ratio=args.ratio, method=args.method, targets=args.targets,
                     lrc_min_cut=args.lrc_min_cut, name=args.model, progress=not args.quiet)
    print(result.summary())
    if args.out:
        result.write(args.out, overwrite=args.overwrite)
        print(f"\nwrote {args.out}/ (spectra.csv, spectra.json, summary.txt, spectra.png"
              + (", kept_rank.png, rank_plan.json)" if result.plan else ")"))


def _describe_replaced(replaced: list[str]) -> str:
    from welore.targets import matrix_type

    counts = Counter(matrix_type(n) for n in replaced)
    return ", ".join(f"{kind} x{n}" for kind, n in counts.items()) or "nothing"


def cmd_compress(args: argparse.Namespace) -> None:
    """Replace target matrices by low-rank factors with per-matrix ranks, and save the result."""
    from welore._io import check_output_dir
    from welore.checkpoint import save
    from welore.compress import CompressConfig, compress_
    from welore.evaluate import weights_size_on_disk
    from welore.plan import RankPlan

    if (args.ratio is None) == (args.plan is None):
        raise WeloreError("Give exactly one of --ratio (with --method) or --plan; e.g. --ratio 0.2 --method welore.")
    check_output_dir(args.out, args.overwrite)
    plan = RankPlan.load(args.plan) if args.plan else None
    config = CompressConfig(ratio=args.ratio, method="plan" if plan else args.method,
                            targets=args.targets, lrc_min_cut=args.lrc_min_cut)
    loaded = _load(args.model, args.dtype)
    start = time.perf_counter()
    report = compress_(loaded.model, config, plan=plan, progress=not args.quiet)
    elapsed = time.perf_counter() - start
    save(loaded.model, args.out, tokenizer=loaded.tokenizer, overwrite=args.overwrite, source=args.model)
    plan = report.plan
    print(f"replaced {len(report.replaced)} of {len(plan.ranks)} target matrices: {_describe_replaced(report.replaced)}")
    ratio_note = f" (requested {plan.requested_ratio})" if plan.requested_ratio is not None else ""
    print(f"target parameters removed: {plan.achieved_ratio:.2%}{ratio_note}; "
          f"whole model: {report.params_before / 1e6:.1f}M -> {report.params_after / 1e6:.1f}M "
          f"({report.model_reduction:.2%} fewer)")
    print(f"LRC (rank cut >= {config.lrc_min_cut:.0%}): {len(plan.lrc(config.lrc_min_cut))}; "
          f"compression took {elapsed:.1f}s")
    print(f"saved {args.out}/ ({weights_size_on_disk(args.out) / 1e6:.1f} MB of weights)")


def cmd_export(args: argparse.Namespace) -> None:
    """Write a welore checkpoint as a plain dense transformers folder (factors multiplied back)."""
    from welore.checkpoint import export_dense

    export_dense(args.checkpoint, args.dense, overwrite=args.overwrite)
    print(f"wrote {args.dense}/ (loads with transformers' AutoModelForCausalLM.from_pretrained)")


def _evaluate_one(spec: str, args: argparse.Namespace):
    from welore.evaluate import evaluate

    loaded = _load(spec, args.dtype)
    windows = _eval_windows(loaded.tokenizer, args, spec)
    return evaluate(loaded.model, windows, path=loaded.path, batch_size=args.batch_size,
                    speed=not args.no_speed, progress=not args.quiet)


def _write_json(path: str | None, payload: dict) -> None:
    from welore._io import atomic_file

    if path:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")


def _text_note(args: argparse.Namespace) -> str:
    from welore.data import describe_text

    return f"text: {describe_text(args.text)}; windows of {args.seq_len} tokens, at most {args.max_tokens} tokens"


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Perplexity, parameters, size on disk, peak memory and tokens/s of one model."""
    from welore.evaluate import format_table

    result = _evaluate_one(args.model, args)
    print(_text_note(args))
    print(format_table({args.model: result}))
    _write_json(args.json, {"text": args.text, "seq_len": args.seq_len, "results": {args.model: result.to_dict()}})


def cmd_compare(args: argparse.Namespace) -> None:
    """Several models measured one after another in one run, in one table (first = baseline)."""
    from welore.evaluate import format_table

    results = {}
    for spec in args.models:
        results[spec] = _evaluate_one(spec, args)
        gc.collect()
    print(_text_note(args))
    print(format_table(results, baseline=args.models[0]))
    _write_json(args.json, {"text": args.text, "seq_len": args.seq_len,
                            "results": {k: v.to_dict() for k, v in results.items()}})


def cmd_demo(args: argparse.Namespace) -> None:
    """The main job on the built-in model and text: analyze, compress (uniform vs WeLore), evaluate."""
    import copy

    from welore._io import atomic_dir
    from welore.analyze import analyze
    from welore.checkpoint import save
    from welore.compress import CompressConfig, compress_
    from welore.evaluate import evaluate, format_table
    from welore.models import DEFAULT_MODEL

    out = Path(args.out)
    loaded = _load(DEFAULT_MODEL, "float32")
    windows = _eval_windows(loaded.tokenizer, args, DEFAULT_MODEL)
    analysis = analyze(loaded.model, ratio=args.ratio, method="welore", name=DEFAULT_MODEL, progress=not args.quiet)
    print(analysis.summary(), "\n")
    results = {"dense": evaluate(loaded.model, windows, path=loaded.path, batch_size=args.batch_size,
                                 speed=not args.no_speed, progress=not args.quiet)}
    with atomic_dir(out, overwrite=True) as tmp:
        analysis.write(tmp / "analysis")
        for method in ("uniform", "welore"):
            model = copy.deepcopy(loaded.model)
            compress_(model, CompressConfig(ratio=args.ratio, method=method), progress=not args.quiet)
            save(model, tmp / method, tokenizer=loaded.tokenizer, source=DEFAULT_MODEL)
            results[f"{method} {args.ratio}"] = evaluate(
                model, windows, path=tmp / method, batch_size=args.batch_size,
                speed=not args.no_speed, progress=not args.quiet)
            del model
            gc.collect()
        (tmp / "results.json").write_text(json.dumps({k: v.to_dict() for k, v in results.items()}, indent=2) + "\n")
    print(_text_note(args))
    print(format_table(results, baseline="dense"))
    print(f"\nwrote {out}/ (analysis/ with plots and tables, uniform/ and welore/ checkpoints, results.json)")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", help="weights' dtype: float32 (default), bfloat16, float16 or auto")


def _add_plan_options(p: argparse.ArgumentParser) -> None:
    from welore.plan import POLICIES

    p.add_argument("--ratio", type=float, help="fraction of the target matrices' parameters to remove, in (0, 1)")
    p.add_argument("--method", default="welore", choices=sorted(POLICIES), help="rank-allocation policy (default: welore)")
    p.add_argument("--targets", nargs="+", metavar="PATTERN",
                   help="target modules by exact name, glob (*.q_proj) or re:regex; default: Linear layers in decoder blocks")
    p.add_argument("--lrc-min-cut", type=float, default=0.5, help="a matrix whose rank is cut by at least this fraction is an LRC")


def _add_eval_options(p: argparse.ArgumentParser, max_tokens: int = 32768) -> None:
    p.add_argument("--text", default=DEFAULT_TEXT,
                   help="evaluation text: wiki or news (built-in, eval split), a text file, or hf:DATASET (default: wiki)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per perplexity window (default 512)")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"evaluate on at most this many tokens (default {max_tokens})")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--no-speed", action="store_true", help="skip the prefill/generation speed measurement")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log what welore does")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser = argparse.ArgumentParser(prog="welore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=fn.__doc__, description=fn.__doc__, parents=[common])
        p.set_defaults(func=fn)
        return p

    p = command("analyze", cmd_analyze)
    p.add_argument("model", help="built-in name (smollm2-135m), model folder, welore checkpoint, .gguf file or hub id")
    _add_plan_options(p)
    _add_model_options(p)
    p.add_argument("--out", help="folder for the table (CSV, JSON), summary, plots and rank plan")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = command("compress", cmd_compress)
    p.add_argument("model", help="built-in name (smollm2-135m), model folder, .gguf file or hub id")
    _add_plan_options(p)
    p.add_argument("--plan", help="apply this saved rank plan (JSON) instead of computing one")
    p.add_argument("--out", required=True, help="folder for the compressed checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_model_options(p)

    p = command("export", cmd_export)
    p.add_argument("checkpoint", help="a welore checkpoint folder")
    p.add_argument("--dense", required=True, help="folder for the plain transformers model")
    p.add_argument("--overwrite", action="store_true", help="replace --dense if it exists")

    p = command("evaluate", cmd_evaluate)
    p.add_argument("model", help="built-in name, model folder, welore checkpoint, .gguf file or hub id")
    _add_eval_options(p)
    _add_model_options(p)
    p.add_argument("--json", help="also write the results to this JSON file")

    p = command("compare", cmd_compare)
    p.add_argument("models", nargs="+", help="two or more models (first = baseline for the ratio columns)")
    _add_eval_options(p)
    _add_model_options(p)
    p.add_argument("--json", help="also write the results to this JSON file")

    p = command("demo", cmd_demo)
    p.add_argument("--ratio", type=float, default=0.02, help="fraction of target parameters to remove (default 0.02)")
    p.add_argument("--out", default="out/demo", help="folder for the demo's outputs (replaced each run; default out/demo)")
    _add_eval_options(p, max_tokens=8192)
    return parser


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("seq_len", "max_tokens", "batch_size"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            print(f"welore: error: --{name.replace('_', '-')} must be a positive integer.", file=sys.stderr)
            return 2
    try:
        _quiet_libraries()
        args.func(args)
    except WeloreError as err:
        print(f"welore: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("welore: interrupted; nothing partial was left behind.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
