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


def _eval_windows(tokenizer, args: argparse.Namespace, model_name: str, calib: str | None = None):
    """Evaluation windows from --text (the evaluation split of built-in texts). When the model
    was calibrated on `calib`, say so if the two texts overlap."""
    from welore.data import load_text, overlap_fraction, token_windows

    if tokenizer is None:
        raise WeloreError(f"{model_name} has no tokenizer, so perplexity cannot be measured; pass a model folder that includes one.")
    text = load_text(args.text, split="eval")
    if calib:
        shared = overlap_fraction(load_text(calib, split="calib"), text)
        if shared > 0:
            print(f"welore: warning: {shared:.0%} of the evaluation text's paragraphs also appear in the calibration "
                  f"text ({calib}) of {model_name}, so its perplexity is optimistic; evaluate on disjoint text.",
                  file=sys.stderr)
    return token_windows(tokenizer, text, args.seq_len, args.max_tokens)


def cmd_analyze(args: argparse.Namespace) -> None:
    """Measure the singular-value spectrum of every target matrix (and, with --ratio, plan ranks;
    with --gradients, also the gradients' spectra over a short training run)."""
    from welore._io import atomic_dir, check_output_dir
    from welore.analyze import analyze
    from welore.compress import CompressConfig

    CompressConfig(ratio=args.ratio, method=args.method, lrc_min_cut=args.lrc_min_cut)  # fail before loading
    finetune_config = _gradient_run_config(args) if args.gradients else None
    if args.out:
        check_output_dir(args.out, args.overwrite)
    loaded = _load(args.model, args.dtype)
    result = analyze(loaded.model, ratio=args.ratio, method=args.method, targets=args.targets,
                     lrc_min_cut=args.lrc_min_cut, name=args.model, progress=not args.quiet)
    print(result.summary())
    gradients = None
    if finetune_config is not None:
        from welore.finetune import finetune
        from welore.gradients import GradientSpectra

        recorder = GradientSpectra(loaded.model, args.targets, every=args.grad_every)
        run = finetune(loaded.model, loaded.tokenizer, finetune_config, on_gradients=recorder, progress=not args.quiet)
        gradients = recorder.report(result.spectra, plan=result.plan, model=args.model)
        print(f"\n{finetune_config.steps} steps of full fine-tuning with AdamW (lr {finetune_config.lr:g}) on "
              f"{args.data}: validation perplexity {run.val_ppl_before:.3f} -> {run.val_ppl_after:.3f}")
        print(gradients.summary())
    if args.out:
        with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
            result.write_files(tmp)
            if gradients is not None:
                gradients.write_files(tmp / "gradients")
        print(f"\nwrote {args.out}/ (spectra.csv, spectra.json, summary.txt, spectra.png"
              + (", kept_rank.png, rank_plan.json" if result.plan else "")
              + (", gradients/" if gradients is not None else "") + ")")


def _gradient_run_config(args: argparse.Namespace):
    """The short full fine-tuning run during which `analyze --gradients` records gradients."""
    from welore.finetune import FinetuneConfig

    return FinetuneConfig(mode="full", optimizer="adamw", steps=args.grad_steps, lr=args.grad_lr, data=args.data,
                          seq_len=args.grad_seq_len, batch_size=args.grad_batch_size,
                          max_train_tokens=args.grad_steps * args.grad_batch_size * args.grad_seq_len,
                          val_tokens=args.grad_val_tokens)


def _describe_replaced(replaced: list[str]) -> str:
    from welore.targets import matrix_type

    counts = Counter(matrix_type(n) for n in replaced)
    return ", ".join(f"{kind} x{n}" for kind, n in counts.items()) or "nothing"


def _calibration(args: argparse.Namespace, tokenizer, model_name: str):
    """Calibration windows from --calib (the calibration split of built-in texts), or None."""
    from welore.data import load_text, token_windows

    if not args.calib:
        return None
    if tokenizer is None:
        raise WeloreError(f"{model_name} has no tokenizer, so calibration text cannot be tokenized; pass a model folder that includes one.")
    return token_windows(tokenizer, load_text(args.calib, split="calib"), args.calib_seq_len, args.calib_tokens,
                         options=("--calib-seq-len", "--calib-tokens"))


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
    config = CompressConfig(ratio=args.ratio, method="plan" if plan else args.method, factorizer=args.factorizer,
                            targets=args.targets, lrc_min_cut=args.lrc_min_cut, calib=args.calib,
                            calib_tokens=args.calib_tokens if args.calib else None, sequential=args.sequential)
    loaded = _load(args.model, args.dtype)
    calibration = _calibration(args, loaded.tokenizer, args.model)
    start = time.perf_counter()
    report = compress_(loaded.model, config, plan=plan, calibration=calibration, progress=not args.quiet)
    elapsed = time.perf_counter() - start
    save(loaded.model, args.out, tokenizer=loaded.tokenizer, overwrite=args.overwrite, source=args.model)
    plan = report.plan
    print(f"replaced {len(report.replaced)} of {len(plan.ranks)} target matrices: {_describe_replaced(report.replaced)}")
    ratio_note = f" (requested {plan.requested_ratio})" if plan.requested_ratio is not None else ""
    print(f"target parameters removed: {plan.achieved_ratio:.2%}{ratio_note}; "
          f"whole model: {report.params_before / 1e6:.1f}M -> {report.params_after / 1e6:.1f}M "
          f"({report.model_reduction:.2%} fewer)")
    calib_note = f", calibrated on {calibration.numel()} tokens of {args.calib}" if calibration is not None else ""
    print(f"LRC (rank cut >= {config.lrc_min_cut:.0%}): {len(plan.lrc(config.lrc_min_cut))}; "
          f"factorizer {config.factorizer}{calib_note}; compression took {elapsed:.1f}s")
    print(f"saved {args.out}/ ({weights_size_on_disk(args.out) / 1e6:.1f} MB of weights)")


def cmd_export(args: argparse.Namespace) -> None:
    """Write a welore checkpoint as a plain dense transformers folder (factors multiplied back)."""
    from welore.checkpoint import export_dense

    export_dense(args.checkpoint, args.dense, overwrite=args.overwrite)
    print(f"wrote {args.dense}/ (loads with transformers' AutoModelForCausalLM.from_pretrained)")


def _evaluate_one(spec: str, args: argparse.Namespace):
    """Evaluate one model; returns its EvalResult and its (method label, ratio) or None if dense."""
    from welore.evaluate import evaluate

    loaded = _load(spec, args.dtype)
    config = getattr(loaded.model, "welore_config", None)
    windows = _eval_windows(loaded.tokenizer, args, spec, calib=config.calib if config else None)
    result = evaluate(loaded.model, windows, path=loaded.path, batch_size=args.batch_size,
                      speed=not args.no_speed, progress=not args.quiet)
    return result, _method_label(loaded.model)


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
    """Perplexity, parameters, size on disk, peak memory and tokens/s of one model (and lm-eval task scores with --tasks)."""
    from welore.evaluate import evaluate, format_table
    from welore.tasks import check_tasks, format_task_table, run_tasks

    if args.tasks:  # fail before loading the model and measuring perplexity
        check_tasks(args.tasks, args.task_dir, limit=args.task_limit, num_fewshot=args.fewshot)
    # As _evaluate_one, keeping the loaded model for the tasks.
    loaded = _load(args.model, args.dtype)
    config = getattr(loaded.model, "welore_config", None)
    windows = _eval_windows(loaded.tokenizer, args, args.model, calib=config.calib if config else None)
    result = evaluate(loaded.model, windows, path=loaded.path, batch_size=args.batch_size,
                      speed=not args.no_speed, progress=not args.quiet)
    scores = None
    if args.tasks:
        scores = run_tasks(loaded.model, loaded.tokenizer, args.tasks, task_dir=args.task_dir, limit=args.task_limit,
                           batch_size=args.batch_size, num_fewshot=args.fewshot, progress=not args.quiet)
    print(_text_note(args))
    print(format_table({args.model: result}))
    payload = {"text": args.text, "seq_len": args.seq_len, "results": {args.model: result.to_dict()}}
    if scores is not None:
        limit_note = f", at most {args.task_limit} examples per task" if args.task_limit else ""
        print(f"\nlm-eval tasks: {args.fewshot}-shot{limit_note}")
        print(format_task_table(scores))
        payload.update(fewshot=args.fewshot, task_limit=args.task_limit, tasks=scores)
    _write_json(args.json, payload)


def _method_label(model) -> tuple[str, float] | None:
    """("factorizer/method", achieved ratio) of a welore-compressed model, None for dense."""
    plan = getattr(model, "welore_plan", None)
    if plan is None:
        return None
    config = model.welore_config
    return f"{config.factorizer}/{plan.method}", plan.achieved_ratio


def cmd_compare(args: argparse.Namespace) -> None:
    """Several models measured one after another in one run, in one table (first = baseline)."""
    from welore._io import atomic_file
    from welore.evaluate import format_table
    from welore.report import plot_perplexity_vs_ratio

    results, labels = {}, {}
    for spec in args.models:
        results[spec], labels[spec] = _evaluate_one(spec, args)
        gc.collect()
    print(_text_note(args))
    print(format_table(results, baseline=args.models[0]))
    _write_json(args.json, {"text": args.text, "seq_len": args.seq_len,
                            "results": {k: v.to_dict() for k, v in results.items()}})
    if args.plot:
        points = [(labels[k][0], labels[k][1], r.perplexity) for k, r in results.items() if labels[k]]
        if not points:
            raise WeloreError("None of the models is a welore checkpoint, so there is no ratio to plot; compare compressed models.")
        dense = [r.perplexity for k, r in results.items() if labels[k] is None]
        with atomic_file(args.plot) as tmp:
            plot_perplexity_vs_ratio(points, tmp, dense=dense[0] if dense else None,
                                     title=f"perplexity on {args.text} vs compression ratio")
        print(f"wrote {args.plot}")


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


def cmd_finetune(args: argparse.Namespace) -> None:
    """Fine-tune a model: WeLore's LRC factors, LoRA adapters or all weights, with AdamW, GaLore or Fira."""
    from welore.finetune import FinetuneConfig, finetune
    from welore.finetune.loop import check_output, check_precision

    config = FinetuneConfig(
        mode=args.mode, optimizer=args.optimizer, steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_grad_norm=args.max_grad_norm or None, precision=args.precision, seed=args.seed, data=args.data,
        seq_len=args.seq_len, max_train_tokens=args.max_train_tokens, val_tokens=args.val_tokens,
        val_fraction=args.val_fraction, eval_every=args.eval_every, save_every=args.save_every,
        lrc_min_cut=args.lrc_min_cut, train_nlrc=args.train_nlrc, train_norms=args.train_norms,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=args.lora_targets, keep_adapter=args.keep_adapter, galore_rank=args.galore_rank,
        galore_gap=args.galore_gap, galore_scale=args.galore_scale,
    )  # checks the options before anything is loaded
    check_precision(config.precision)
    check_output(Path(args.out), config, args.overwrite, args.resume)
    loaded = _load(args.model, args.dtype)
    result = finetune(loaded.model, loaded.tokenizer, config, out=args.out, overwrite=args.overwrite,
                      resume=args.resume, source=args.model, progress=not args.quiet)
    print(f"{config.mode} fine-tuning with {config.optimizer} (lr {config.lr:g}) on {args.data}")
    print(result.summary())
    for point in result.history[1:-1]:
        print(f"  step {point['step']}: validation perplexity {point['val_ppl']:.3f}")
    adapter = " with its LoRA adapter in adapter/" if config.mode == "lora" and config.keep_adapter else ""
    print(f"saved {args.out}/{adapter} (loads with welore.load; fine-tuning record in finetune.json)")


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
    from welore.factorize import FACTORIZERS
    from welore.finetune import MODES, OPTIMIZERS
    from welore.finetune.config import PRECISIONS

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
    g = p.add_argument_group("gradient spectra (--gradients)")
    g.add_argument("--gradients", action="store_true",
                   help="also train all weights briefly (AdamW) and record every target matrix's gradient spectrum per step")
    g.add_argument("--data", default=DEFAULT_TEXT, help="training text for --gradients (default: wiki, its calibration half)")
    g.add_argument("--grad-steps", type=int, default=20, help="optimizer steps to record (default 20)")
    g.add_argument("--grad-every", type=int, default=1, help="record every k-th step (default 1)")
    g.add_argument("--grad-lr", type=float, default=3e-5, help="learning rate of the recording run (default 3e-5)")
    g.add_argument("--grad-seq-len", type=int, default=256, help="tokens per training block (default 256)")
    g.add_argument("--grad-batch-size", type=int, default=4, help="blocks per step (default 4)")
    g.add_argument("--grad-val-tokens", type=int, default=2048, help="validation tokens before/after (default 2048)")

    p = command("compress", cmd_compress)
    p.add_argument("model", help="built-in name (smollm2-135m), model folder, .gguf file or hub id")
    _add_plan_options(p)
    p.add_argument("--plan", help="apply this saved rank plan (JSON) instead of computing one")
    p.add_argument("--factorizer", default="svd", choices=sorted(FACTORIZERS),
                   help="how each matrix is factorized: svd (data-free, default), whiten (SVD-LLM) or asvd (activation-scaled); the last two need --calib")
    p.add_argument("--calib", help="calibration text for whiten/asvd: wiki or news (their calibration half), a text file, or hf:DATASET")
    p.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens (default 8192)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--sequential", action="store_true",
                   help="calibrate each block on the outputs of the already-compressed blocks before it")
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
    p.add_argument("--tasks", nargs="+", metavar="TASK",
                   help="also score the model on these lm-eval tasks (e.g. arc_easy, or a task in --task-dir); "
                        "built-in tasks download their data and need network access")
    p.add_argument("--task-dir", help="folder of lm-eval YAML task files (relative data paths in them resolve against it)")
    p.add_argument("--task-limit", type=int, help="score at most this many examples per task (default: all)")
    p.add_argument("--fewshot", type=int, default=0, help="solved examples put before each question (default 0: zero-shot)")

    p = command("compare", cmd_compare)
    p.add_argument("models", nargs="+", help="two or more models (first = baseline for the ratio columns)")
    _add_eval_options(p)
    _add_model_options(p)
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--plot", help="also draw perplexity vs compression ratio, one line per method, to this PNG file")

    p = command("demo", cmd_demo)
    p.add_argument("--ratio", type=float, default=0.02, help="fraction of target parameters to remove (default 0.02)")
    p.add_argument("--out", default="out/demo", help="folder for the demo's outputs (replaced each run; default out/demo)")
    _add_eval_options(p, max_tokens=8192)

    p = command("finetune", cmd_finetune)
    p.add_argument("model", help="a welore checkpoint (for lrc), built-in name, model folder, .gguf file or hub id")
    p.add_argument("--mode", default="lrc", choices=list(MODES),
                   help="what trains: lrc (low-rank components of a compressed model, default), lora or full")
    p.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS), help="default: adamw")
    p.add_argument("--data", default=DEFAULT_TEXT,
                   help="training text: wiki or news (train on the calib split, validate on the eval split), "
                        "a text file or hf:DATASET (last --val-fraction of blocks held out); default: wiki")
    p.add_argument("--out", required=True, help="folder for the fine-tuned welore checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and an unfinished run's checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue the unfinished run of --out from its last checkpoint")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: lrc 1e-4, lora 5e-4, full 3e-5)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps before cosine decay (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--batch-size", type=int, default=4, help="blocks per micro-batch (default 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this; 0 = no clipping (default 1)")
    p.add_argument("--precision", default="no", choices=list(PRECISIONS), help="autocast (fp16 needs a GPU; default no)")
    p.add_argument("--seed", type=int, default=0, help="seed of the RNGs and the data order (default 0)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per block (default 256)")
    p.add_argument("--max-train-tokens", type=int, help="train on at most this many tokens of the text (default: all)")
    p.add_argument("--val-tokens", type=int, default=4096, help="validation tokens (default 4096)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of a single text held out for validation (default 0.1)")
    p.add_argument("--eval-every", type=int, default=0, help="validation perplexity every N steps too (default 0: before and after only)")
    p.add_argument("--save-every", type=int, default=0, help="resumable checkpoint every N steps, in OUT.checkpoints/ (default 0: none)")
    p.add_argument("--lrc-min-cut", type=float, default=0.5, help="lrc: a matrix whose rank is cut by at least this fraction trains (default 0.5)")
    p.add_argument("--train-nlrc", action="store_true", help="lrc: also train the N-LRC matrices")
    p.add_argument("--train-norms", action="store_true", help="lrc: also train the normalisation layers")
    p.add_argument("--lora-rank", type=int, default=8, help="lora: adapter rank (default 8)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="lora: adapter scale alpha (default 16)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="lora: dropout on the adapter input (default 0)")
    p.add_argument("--lora-targets", nargs="+", metavar="PATTERN",
                   help="lora: Linear modules by exact name, glob or re:regex (default: target matrices, factors of compressed ones)")
    p.add_argument("--keep-adapter", action="store_true", help="lora: save the adapter in OUT/adapter instead of merging it")
    p.add_argument("--galore-rank", type=int, default=128, help="galore/fira: gradient projection rank (default 128)")
    p.add_argument("--galore-gap", type=int, default=200, help="galore/fira: steps between projection updates (default 200)")
    p.add_argument("--galore-scale", type=float, default=0.25, help="galore/fira: update scale (default 0.25)")
    _add_model_options(p)
    return parser


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    positive = ("seq_len", "max_tokens", "batch_size", "calib_tokens", "calib_seq_len",
                "grad_steps", "grad_every", "grad_seq_len", "grad_batch_size", "grad_val_tokens")
    for name in positive:
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
