"""The `welore` command line: a thin layer over the Python API.

Each subcommand is one function whose docstring is its `--help`. Its options are generated
from the config dataclasses it hands to the library (`welore.options`), so every default and
every help text is written once, beside the field it configures; only the command's own
inputs and outputs (the model argument, `--out`, `--overwrite`, `--json`, ...) are declared
here. Every config is built before a model is loaded, so a bad value fails at once.

Mistakes a user can make raise `WeloreError`; `main` prints its one-sentence message and exits
with status 2, without a traceback. Everything else is a bug and raises loudly.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from welore.errors import WeloreError
from welore.options import add_options, from_args


@dataclass
class RunOptions:
    """Options of every command."""

    verbose: bool = field(default=False, metadata={"short": "-v"})  # log what welore does
    quiet: bool = field(default=False, metadata={"short": "-q"})  # no progress bars


def _load(spec: str, args: argparse.Namespace, place: bool = True):
    """Load `spec` with the command's `LoadOptions` (every field is a keyword of load_model);
    with `place=False` (fine-tuning places the model itself) it stays on the CPU."""
    from welore.models import LoadOptions, load_model

    placement = {} if place else {"device": None}
    return load_model(spec, **asdict(from_args(LoadOptions, args, **placement)))


def _check_load_options(args: argparse.Namespace) -> None:
    from welore.models import LoadOptions

    from_args(LoadOptions, args)


def _eval_windows(tokenizer, options, model_name: str, calib: str | None = None):
    """Evaluation windows of `options.text` (the evaluation split of built-in texts) under the BOS
    policy `options.bos`, and that policy resolved for this tokenizer (yes or no). When the model
    was calibrated on `calib`, say so if the two texts overlap."""
    from welore.data import load_text, overlap_fraction, resolve_bos, token_windows

    if tokenizer is None:
        raise WeloreError(f"{model_name} has no tokenizer, so perplexity cannot be measured; "
                          "pass a model folder that includes one.")
    text = load_text(options.text, split="eval")
    if calib:
        shared = overlap_fraction(load_text(calib, split="calib"), text)
        if shared > 0:
            print(f"welore: warning: {shared:.0%} of the evaluation text's paragraphs also appear in the calibration "
                  f"text ({calib}) of {model_name}, so its perplexity is optimistic; evaluate on disjoint text.",
                  file=sys.stderr)
    bos = resolve_bos(tokenizer, options.bos)
    return token_windows(tokenizer, text, options.seq_len, options.max_tokens, bos=bos), bos


def cmd_analyze(args: argparse.Namespace) -> None:
    """Measure the singular-value spectrum of every target matrix (and, with --ratio, plan ranks;
    with --gradients, also the gradients' spectra over a short training run)."""
    from welore._io import atomic_dir, check_output_dir
    from welore.analyze import analyze
    from welore.compress import CompressConfig
    from welore.gradients import GradientRunConfig

    config = from_args(CompressConfig, args)  # fail before loading
    gradient_run = from_args(GradientRunConfig, args) if args.gradients else None
    finetune_config = gradient_run.finetune_config() if gradient_run else None
    _check_load_options(args)
    if args.out:
        check_output_dir(args.out, args.overwrite)
    loaded = _load(args.model, args)
    result = analyze(loaded.model, ratio=config.ratio, method=config.method, targets=config.targets,
                     lrc_min_cut=config.lrc_min_cut, name=args.model, progress=not args.quiet)
    print(result.summary())
    gradients = None
    if finetune_config is not None:
        from welore.finetune import finetune
        from welore.gradients import GradientSpectra

        recorder = GradientSpectra(loaded.model, config.targets, every=gradient_run.grad_every)
        run = finetune(loaded.model, loaded.tokenizer, finetune_config, on_gradients=recorder, progress=not args.quiet)
        gradients = recorder.report(result.spectra, plan=result.plan, model=args.model)
        print(f"\n{finetune_config.steps} steps of full fine-tuning with AdamW (lr {finetune_config.lr:g}) on "
              f"{gradient_run.data}: validation perplexity {run.val_ppl_before:.3f} -> {run.val_ppl_after:.3f}")
        print(gradients.summary())
    if args.out:
        with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
            result.write_files(tmp)
            if gradients is not None:
                gradients.write_files(tmp / "gradients")
        print(f"\nwrote {args.out}/ (spectra.csv, spectra.json, summary.txt, spectra.png"
              + (", kept_rank.png, rank_plan.json" if result.plan else "")
              + (", gradients/" if gradients is not None else "") + ")")


def _describe_replaced(replaced: list[str]) -> str:
    from welore.targets import matrix_type

    counts = Counter(matrix_type(n) for n in replaced)
    return ", ".join(f"{kind} x{n}" for kind, n in counts.items()) or "nothing"


def _describe_selection(selection: dict) -> str:
    """What --method auto tried and chose, in one line."""
    scores = ", ".join(f"{label} {score['perplexity']:.3f} ({score['seconds']:.0f}s)"
                       for label, score in selection["candidates"].items())
    return (f"recipe chosen by --method auto: {selection['chosen']}; perplexity on {selection['held_tokens']} "
            f"held-back calibration tokens after fitting on {selection['fit_tokens']}: {scores}")


def cmd_compress(args: argparse.Namespace) -> None:
    """Replace target matrices by low-rank factors with per-matrix ranks (or, with --quantize or
    --target-size, by packed low-bit codes plus an optional low-rank correction), and save the result."""
    from welore._io import check_output_dir
    from welore.checkpoint import save
    from welore.compress import CompressConfig, calibration_windows, compress_
    from welore.evaluate import weights_size_on_disk
    from welore.plan import RankPlan

    if args.quantize or args.target_size:
        return _compress_quantized(args)
    if (args.ratio is None) == (args.plan is None):
        raise WeloreError("Give exactly one of --ratio (with --method) or --plan; e.g. --ratio 0.2 --method welore.")
    config = from_args(CompressConfig, args)
    _check_load_options(args)
    check_output_dir(args.out, args.overwrite)
    plan = RankPlan.load(args.plan) if args.plan else None
    if plan is not None:
        config = from_args(CompressConfig, args, method=None)  # the plan sets the ranks
    loaded = _load(args.model, args)
    calibration, config = calibration_windows(loaded.tokenizer, config, args.model)
    start = time.perf_counter()
    report = compress_(loaded.model, config, plan=plan, calibration=calibration, progress=not args.quiet)
    elapsed = time.perf_counter() - start
    save(loaded.model, args.out, tokenizer=loaded.tokenizer, overwrite=args.overwrite, source=args.model)
    plan, config = report.plan, report.config
    if config.selection is not None:
        print(_describe_selection(config.selection))
    print(f"replaced {len(report.replaced)} of {len(plan.ranks)} target matrices: "
          f"{_describe_replaced(report.replaced)}")
    ratio_note = f" (requested {plan.requested_ratio})" if plan.requested_ratio is not None else ""
    print(f"target parameters removed: {plan.achieved_ratio:.2%}{ratio_note}; "
          f"whole model: {report.params_before / 1e6:.1f}M -> {report.params_after / 1e6:.1f}M "
          f"({report.model_reduction:.2%} fewer)")
    calib_note = f", calibrated on {calibration.numel()} tokens of {config.calib}" if calibration is not None else ""
    params = "".join(f" {name}={value:g}" if isinstance(value, float) else f" {name}={value}"
                     for name, value in config.factorizer_params.items())
    if config.refit is not None:
        calib_note += f", refit {config.refit} (ridge {config.refit_ridge:g})"
    print(f"LRC (rank cut >= {config.lrc_min_cut:.0%}): {len(plan.lrc(config.lrc_min_cut))}; "
          f"factorizer {config.factorizer}{params}{calib_note}; compression took {elapsed:.1f}s")
    print(f"saved {args.out}/ ({weights_size_on_disk(args.out) / 1e6:.1f} MB of weights)")


def _compress_quantized(args: argparse.Namespace) -> None:
    """`compress --quantize/--target-size`: weight-only quantization (+ compensation) of the
    targets; with --ratio/--plan, of the low-rank factors (and the matrices kept dense) after
    low-rank compression: W ≈ Q(up)·Q(down)."""
    from welore._io import check_output_dir
    from welore.checkpoint import save
    from welore.compress import CompressConfig, calibration_windows, compress_
    from welore.evaluate import weights_size_on_disk
    from welore.plan import RankPlan
    from welore.quantize import QuantOptions, quantize_
    from welore.targets import find_targets, weight_matrix

    joint = args.ratio is not None or args.plan is not None
    if args.ratio is not None and args.plan is not None:
        raise WeloreError("Give --ratio (with --method) or --plan, not both; e.g. --ratio 0.2 --method welore.")
    rank_plan = RankPlan.load(args.plan) if args.plan else None
    # a saved plan sets the ranks, so no allocation method
    compress = from_args(CompressConfig, args, **({"method": None} if rank_plan is not None else {}))
    config = from_args(QuantOptions, args).config(compress)
    _check_load_options(args)
    check_output_dir(args.out, args.overwrite)
    loaded = _load(args.model, args)
    calibration, compress = calibration_windows(loaded.tokenizer, compress, args.model)
    if calibration is not None:  # record what was used
        config = replace(config, calib_tokens=calibration.numel(), bos=compress.bos)
    start = time.perf_counter()
    low_rank = None
    if joint:  # low rank first; the calibration text serves the factorizer if it is data-aware, and the compensation
        dense_bytes = sum(weight_matrix(m).numel() * weight_matrix(m).element_size()
                          for m in find_targets(loaded.model, compress.targets).values())
        low_rank = compress_(loaded.model, compress, plan=rank_plan,
                             calibration=calibration if compress.data_aware else None, progress=not args.quiet)
        compress = low_rank.config
        if compress.selection is not None:
            print(_describe_selection(compress.selection))
    report = quantize_(loaded.model, config, calibration=calibration, progress=not args.quiet)
    elapsed = time.perf_counter() - start
    if low_rank is not None:
        factors = report.dense_bytes
        report.dense_bytes = dense_bytes
        print(f"low rank ({low_rank.plan.method}, {compress.factorizer}): {len(low_rank.replaced)} of "
              f"{len(low_rank.plan.ranks)} target matrices factorized, {low_rank.plan.achieved_ratio:.2%} of their "
              f"parameters removed ({dense_bytes / 1e6:.2f} MB -> {factors / 1e6:.2f} MB); then quantized:")
    save(loaded.model, args.out, tokenizer=loaded.tokenizer, overwrite=args.overwrite, source=args.model)
    plan = report.plan
    target = config.target_size
    widths = ", ".join(f"{n} at {b} bits" for b, n in sorted(Counter(plan.bits.values()).items(), reverse=True))
    ranks = Counter(plan.ranks.values())
    rank_note = ("no compensation" if set(ranks) == {0} else
                 "compensation ranks " + ", ".join(f"{r} ({n})" for r, n in sorted(ranks.items())))
    space = (f"EoRA, whitened by {calibration.numel()} tokens of {compress.calib}" if calibration is not None
             else "weight space") + (f"; best of {config.compensate_iters} rounds alternating with the codes"
                                     if config.compensate_iters > 1 else "")
    print(f"quantized {len(report.replaced)} target matrices ({config.quantizer}, groups of {config.group_size}): "
          f"{widths}; {rank_note}" + ("" if set(ranks) == {0} else f" ({space})"))
    selection = plan.meta.get("selection")
    if selection is not None:
        scores = ", ".join(f"{label} {ppl:.3f} ({selection['bits_per_param'][label]:.3f} bits)"
                           for label, ppl in selection["perplexity"].items())
        print(f"size plan: {selection['chosen']}, the lowest perplexity on {selection['held_tokens']} held-back "
              f"calibration tokens of: {scores}")
    request = f" (requested {target / 1e6:.3f} MB, {plan.nbytes / target - 1:+.2%})" if target else ""
    print(f"target matrices: {report.dense_bytes / 1e6:.2f} MB -> {plan.nbytes / 1e6:.3f} MB{request}, "
          f"{plan.bits_per_param:.3f} bits per parameter; took {elapsed:.1f}s")
    if report.output_error:
        before = sum(b for b, _ in report.output_error.values()) / len(report.output_error)
        after = sum(a for _, a in report.output_error.values()) / len(report.output_error)
        print(f"mean relative output error on the calibration tokens: {before:.4f} quantized"
              + (f", {after:.4f} compensated" if set(ranks) != {0} else ""))
    print(f"saved {args.out}/ ({weights_size_on_disk(args.out) / 1e6:.1f} MB of weights)")


def cmd_export(args: argparse.Namespace) -> None:
    """Write a welore checkpoint as a plain dense transformers folder (factors multiplied back)."""
    from welore._io import parse_bytes
    from welore.checkpoint import export_dense
    from welore.models import LoadOptions

    options = from_args(LoadOptions, args)
    budget = parse_bytes(options.max_memory, "the memory size") if options.max_memory is not None else None
    export_dense(args.checkpoint, args.dense, overwrite=args.overwrite, budget=budget)
    print(f"wrote {args.dense}/ (loads with transformers' AutoModelForCausalLM.from_pretrained)")


def _evaluate_one(spec: str, args: argparse.Namespace, options):
    """Load and evaluate one model; returns the loaded model and its EvalResult."""
    from welore.evaluate import evaluate

    loaded = _load(spec, args)
    config = getattr(loaded.model, "welore_config", None)
    windows, bos = _eval_windows(loaded.tokenizer, options, spec, calib=config.calib if config else None)
    result = evaluate(loaded.model, windows, path=loaded.path, batch_size=options.batch_size,
                      speed=options.speed, progress=not args.quiet)
    return loaded, result, bos


def _write_json(path: str | None, payload: dict) -> None:
    from welore._io import write_json

    if path:
        write_json(path, payload)
        print(f"wrote {path}")


def _text_note(options, bos: dict[str, str]) -> str:
    """The evaluation text and windows; `bos` is each model's resolved BOS policy."""
    from welore.data import describe_text

    policies = set(bos.values())
    if policies == {"yes"}:
        start = "each starting with BOS"
    elif policies == {"no"}:
        start = "no BOS"
    else:
        start = "BOS first for " + ", ".join(name for name, policy in bos.items() if policy == "yes")
    return (f"text: {describe_text(options.text)}; windows of {options.seq_len} tokens ({start}; --bos {options.bos}), "
            f"at most {options.max_tokens} tokens")


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Perplexity, parameters, size on disk, peak memory and tokens/s of one model (and lm-eval task scores
    with --tasks)."""
    from welore.evaluate import EvalOptions, format_table
    from welore.tasks import TaskOptions, check_tasks, format_task_table, run_tasks

    options, tasks = from_args(EvalOptions, args), from_args(TaskOptions, args)
    _check_load_options(args)
    if tasks.tasks:  # fail before loading the model and measuring perplexity
        check_tasks(tasks.tasks, tasks.task_dir, limit=tasks.task_limit, num_fewshot=tasks.fewshot)
    loaded, result, bos = _evaluate_one(args.model, args, options)
    scores = None
    if tasks.tasks:
        scores = run_tasks(loaded.model, loaded.tokenizer, tasks.tasks, task_dir=tasks.task_dir, limit=tasks.task_limit,
                           batch_size=options.batch_size, num_fewshot=tasks.fewshot, progress=not args.quiet,
                           bos=options.bos)
    print(_text_note(options, {args.model: bos}))
    print(format_table({args.model: result}))
    payload = {"text": options.text, "seq_len": options.seq_len, "bos": bos, "results": {args.model: result.to_dict()}}
    if scores is not None:
        limit_note = f", at most {tasks.task_limit} examples per task" if tasks.task_limit else ""
        print(f"\nlm-eval tasks: {tasks.fewshot}-shot{limit_note}")
        print(format_task_table(scores))
        payload.update(fewshot=tasks.fewshot, task_limit=tasks.task_limit, tasks=scores)
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
    from welore.evaluate import EvalOptions, format_table
    from welore.report import plot_perplexity_vs_ratio

    options = from_args(EvalOptions, args)
    _check_load_options(args)
    results, labels, bos = {}, {}, {}
    for spec in args.models:
        loaded, results[spec], bos[spec] = _evaluate_one(spec, args, options)
        labels[spec] = _method_label(loaded.model)
        del loaded
        gc.collect()
    print(_text_note(options, bos))
    print(format_table(results, baseline=args.models[0]))
    _write_json(args.json, {"text": options.text, "seq_len": options.seq_len, "bos": bos,
                            "results": {k: v.to_dict() for k, v in results.items()}})
    if args.plot:
        points = [(labels[k][0], labels[k][1], r.perplexity) for k, r in results.items() if labels[k]]
        if not points:
            raise WeloreError("None of the models is a welore checkpoint, so there is no ratio to plot; "
                              "compare compressed models.")
        dense = [r.perplexity for k, r in results.items() if labels[k] is None]
        plot_perplexity_vs_ratio(points, args.plot, dense=dense[0] if dense else None,
                                 title=f"perplexity on {options.text} vs compression ratio")
        print(f"wrote {args.plot}")


def cmd_demo(args: argparse.Namespace) -> None:
    """The main job on the built-in model and text: analyze, compress (uniform vs WeLore), evaluate."""
    import copy

    from welore._io import atomic_dir, write_json
    from welore.analyze import analyze
    from welore.checkpoint import save
    from welore.compress import CompressConfig, compress_
    from welore.evaluate import EvalOptions, evaluate, format_table
    from welore.models import DEFAULT_MODEL, load_model

    options = from_args(EvalOptions, args)
    configs = {method: from_args(CompressConfig, args, method=method) for method in ("uniform", "welore")}
    out = Path(args.out)
    loaded = load_model(DEFAULT_MODEL, dtype="float32")
    windows, bos = _eval_windows(loaded.tokenizer, options, DEFAULT_MODEL)
    analysis = analyze(loaded.model, ratio=args.ratio, method="welore", name=DEFAULT_MODEL, progress=not args.quiet)
    print(analysis.summary(), "\n")
    results = {"dense": evaluate(loaded.model, windows, path=loaded.path, batch_size=options.batch_size,
                                 speed=options.speed, progress=not args.quiet)}
    with atomic_dir(out, overwrite=True) as tmp:
        analysis.write(tmp / "analysis")
        for method, config in configs.items():
            model = copy.deepcopy(loaded.model)
            compress_(model, config, progress=not args.quiet)
            save(model, tmp / method, tokenizer=loaded.tokenizer, source=DEFAULT_MODEL)
            results[f"{method} {args.ratio}"] = evaluate(
                model, windows, path=tmp / method, batch_size=options.batch_size,
                speed=options.speed, progress=not args.quiet)
            del model
            gc.collect()
        write_json(tmp / "results.json", {k: v.to_dict() for k, v in results.items()})
    print(_text_note(options, {DEFAULT_MODEL: bos}))
    print(format_table(results, baseline="dense"))
    print(f"\nwrote {out}/ (analysis/ with plots and tables, uniform/ and welore/ checkpoints, results.json)")


def cmd_finetune(args: argparse.Namespace) -> None:
    """Fine-tune a model: WeLore's LRC factors, LoRA adapters or all weights, with AdamW, GaLore or Fira,
    on the LM loss or (--distill) against the dense model's next-token distribution."""
    from welore.finetune import FinetuneConfig, finetune
    from welore.finetune.loop import check_output, check_precision

    config = from_args(FinetuneConfig, args)  # checks the options before anything is loaded
    _check_load_options(args)
    check_precision(config.precision, config.device)
    check_output(Path(args.out), config, args.overwrite, args.resume)
    loaded = _load(args.model, args, place=False)
    result = finetune(loaded.model, loaded.tokenizer, config, out=args.out, overwrite=args.overwrite,
                      resume=args.resume, source=args.model, progress=not args.quiet)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under accelerate launch, the main process reports
        return
    print(f"{config.mode} fine-tuning with {config.optimizer} (lr {config.lr:g}) on {config.data}")
    if config.distill:
        print(f"distilled from {config.teacher} ({config.teacher_dtype}): loss = {config.distill_alpha:g}·KL "
              f"(temperature {config.distill_temperature:g}) + {1 - config.distill_alpha:g}·LM loss")
    print(result.summary())
    for point in result.history[1:-1]:
        print(f"  step {point['step']}: validation perplexity {point['val_ppl']:.3f}")
    adapter = " with its LoRA adapter in adapter/" if config.mode == "lora" and config.keep_adapter else ""
    print(f"saved {args.out}/{adapter} (loads with welore.load; fine-tuning record in finetune.json)")


MODEL_HELP = "built-in name (smollm2-135m), model folder, welore checkpoint, .gguf file or hub id"


def build_parser() -> argparse.ArgumentParser:
    from welore.compress import CompressConfig
    from welore.evaluate import EvalOptions
    from welore.finetune import FinetuneConfig
    from welore.gradients import GradientRunConfig
    from welore.models import LoadOptions
    from welore.quantize import QuantOptions
    from welore.tasks import TaskOptions

    common = argparse.ArgumentParser(add_help=False)
    add_options(common, RunOptions)
    from welore import __version__

    parser = argparse.ArgumentParser(prog="welore", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"welore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=fn.__doc__, description=fn.__doc__, parents=[common])
        p.set_defaults(func=fn)
        return p

    def loading(p: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
        add_options(p.add_argument_group("model loading"), LoadOptions, exclude=exclude)

    plan_fields = ("ratio", "method", "targets", "lrc_min_cut")

    p = command("analyze", cmd_analyze)
    p.add_argument("model", help=MODEL_HELP)
    add_options(p.add_argument_group("rank plan (with --ratio)"), CompressConfig, only=plan_fields)
    loading(p)
    p.add_argument("--out", help="folder for the table (CSV, JSON), summary, plots and rank plan")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    g = p.add_argument_group("gradient spectra (--gradients)")
    g.add_argument("--gradients", action="store_true",
                   help="also train all weights briefly (AdamW) and record every target matrix's gradient "
                        "spectrum per step")
    add_options(g, GradientRunConfig)

    p = command("compress", cmd_compress)
    p.add_argument("model", help=MODEL_HELP)
    add_options(p.add_argument_group("compression"), CompressConfig)
    p.add_argument("--plan", help="apply this saved rank plan (JSON) instead of computing one")
    p.add_argument("--out", required=True, help="folder for the compressed checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    loading(p)
    quantization = p.add_argument_group("quantization (alone, or with --ratio/--plan: of the low-rank factors)")
    add_options(quantization, QuantOptions)

    p = command("export", cmd_export)
    p.add_argument("checkpoint", help="a welore checkpoint folder")
    p.add_argument("--dense", required=True, help="folder for the plain transformers model")
    p.add_argument("--overwrite", action="store_true", help="replace --dense if it exists")
    add_options(p.add_argument_group("model loading"), LoadOptions, only=["max_memory"])

    p = command("evaluate", cmd_evaluate)
    p.add_argument("model", help=MODEL_HELP)
    add_options(p.add_argument_group("evaluation"), EvalOptions)
    loading(p)
    p.add_argument("--json", help="also write the results to this JSON file")
    add_options(p.add_argument_group("lm-eval tasks (--tasks)"), TaskOptions)

    p = command("compare", cmd_compare)
    p.add_argument("models", nargs="+", help="two or more models (first = baseline for the ratio columns)")
    add_options(p.add_argument_group("evaluation"), EvalOptions)
    loading(p)
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--plot", help="also draw perplexity vs compression ratio, one line per method, to this PNG file")

    p = command("demo", cmd_demo)
    add_options(p, CompressConfig, only=["ratio"], defaults={"ratio": 0.02})
    p.add_argument("--out", default="out/demo",
                   help="folder for the demo's outputs (replaced each run; default out/demo)")
    add_options(p.add_argument_group("evaluation"), EvalOptions, defaults={"max_tokens": 8192})

    p = command("finetune", cmd_finetune)
    p.add_argument("model", help="a welore checkpoint (needed for lrc) or any model: " + MODEL_HELP)
    p.add_argument("--out", required=True, help="folder for the fine-tuned welore checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and an unfinished run's checkpoints)")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run of --out from its last checkpoint")
    add_options(p.add_argument_group("fine-tuning"), FinetuneConfig)
    loading(p, exclude=("device",))  # fine-tuning places the model itself
    return parser


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        _quiet_libraries()
        if getattr(args, "max_memory", None) is not None:
            from welore.stream import return_freed_memory

            return_freed_memory()  # a budget: hand freed blocks back to the system at once
        args.func(args)
    except WeloreError as err:
        print(f"welore: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("welore: interrupted; nothing partial was left behind.", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") == "0":  # under `accelerate launch`, the main process alone reports
        print(_peak_memory_line())
    return 0


def _peak_memory_line() -> str:
    """The process's peak resident memory (and GPU memory, where used) over the whole command."""
    from welore.evaluate import process_peak_memory
    from welore.stream import format_bytes

    peaks = process_peak_memory()
    parts = [f"{format_bytes(peaks.pop('rss'))} resident"] if "rss" in peaks else []
    parts += [f"{format_bytes(v)} on {k}" for k, v in peaks.items()]
    return f"peak memory: {', '.join(parts) or 'not measurable here'}"


if __name__ == "__main__":
    sys.exit(main())
