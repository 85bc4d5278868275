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
import contextlib
import dataclasses
import gc
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from welore.errors import WeloreError
from welore.options import add_options, flag, from_args, option_fields


@dataclass
class RunOptions:
    """Options of every command."""

    verbose: bool = field(default=False, metadata={"short": "-v"})  # log what welore does
    quiet: bool = field(default=False, metadata={"short": "-q"})  # no progress bars


def _load(spec: str, args: argparse.Namespace, place: bool = True):
    """Load `spec` with the command's `LoadOptions` (every field is a keyword of load_model);
    with `place=False` (fine-tuning places the model itself) it stays on the CPU."""
    from welore.io.models import LoadOptions, load_model

    placement = {} if place else {"device": None}
    return load_model(spec, **asdict(from_args(LoadOptions, args, **placement)))


def _check_load_options(args: argparse.Namespace) -> None:
    from welore.io.models import LoadOptions

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
    from welore.gradients import GradientRunConfig
    from welore.lowrank.compress import CompressConfig

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
              f"{finetune_config.data}: validation perplexity {run.val_ppl_before:.3f} -> {run.val_ppl_after:.3f}")
        print(gradients.summary())
    _write_json(args, {"analysis": result.to_dict(), "gradients": gradients.to_dict() if gradients else None})
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
    """Replace target matrices by low-rank factors with per-matrix ranks, and/or (with --quantize or
    --target-size) by packed low-bit codes plus an optional low-rank correction, and save the result;
    --recipe runs a recipe file, or replays the one a checkpoint recorded."""
    from welore._io import check_output_dir
    from welore.eval.evaluate import weights_size_on_disk
    from welore.io.checkpoint import save
    from welore.recipe import compress_

    recipe, plan = _recipe(args)  # fail before loading
    _check_load_options(args)
    check_output_dir(args.out, args.overwrite)
    loaded = _load(args.model, args)
    if getattr(args, "builtin_calib", None):
        print(f"calibrating on the built-in {args.builtin_calib} text (its calibration half); pass --calib TEXT to "
              "choose another, or --data-free for none")
    start = time.perf_counter()
    report = compress_(loaded.model, recipe, loaded.tokenizer, plan=plan, progress=not args.quiet, source=args.model)
    elapsed = time.perf_counter() - start
    save(loaded.model, args.out, tokenizer=loaded.tokenizer, overwrite=args.overwrite, record=report.record)
    for line in _describe_report(report):
        print(line)
    print(f"compression took {elapsed:.1f}s")
    disk = weights_size_on_disk(args.out)
    print(f"saved {args.out}/ ({disk / 1e6:.1f} MB of weights)")
    _write_json(args, {"out": str(args.out), "recipe": report.record.recipe.to_dict(),
                       "achieved_ratio": report.plan.achieved_ratio, "params_before": report.params_before,
                       "params_after": report.params_after, "target_bytes_before": report.target_bytes_before,
                       "target_bytes_after": report.target_bytes_after, "disk_bytes": disk, "seconds": elapsed})


def _recipe(args: argparse.Namespace):
    """The recipe `welore compress` runs, and the rank plan that sets its ranks (if any): from
    --recipe (a recipe file, or a checkpoint whose recorded recipe is replayed with its rank plan
    when a plan set the ranks), else built from the options."""
    from welore.lowrank.compress import CompressConfig
    from welore.lowrank.plan import RankPlan
    from welore.quant import FORMATS, QuantConfig
    from welore.recipe import Recipe

    if args.recipe:
        given = [flag(f.name) for cls in (CompressConfig, QuantConfig) for f in option_fields(cls)
                 if hasattr(args, f.name) and getattr(args, f.name) not in (f.default, None)
                 and f.default_factory is dataclasses.MISSING]
        given += [o for o in ("--plan", "--quantize", "--target-size", "--data-free")
                  if getattr(args, o[2:].replace("-", "_"))]
        if given:
            raise WeloreError(f"--recipe sets the whole compression, so {given[0]} has no effect; put it in the "
                              "recipe, or drop --recipe.")
        return _recorded_recipe(Path(args.recipe))
    if args.ratio is not None and args.plan is not None:
        raise WeloreError("Give exactly one of --ratio (with --method) or --plan, not both; "
                          "e.g. --ratio 0.2 --method welore.")
    if args.quantize and args.target_size:
        raise WeloreError("Give --quantize (one width for every matrix) or --target-size (widths chosen per matrix), "
                          "not both.")
    quantized = bool(args.quantize or args.target_size)
    if args.ratio is None and args.plan is None and not quantized:
        raise WeloreError("Give --ratio (with --method), --plan, --quantize, --target-size or --recipe; "
                          "e.g. --ratio 0.2 --method welore.")
    stages = []
    plan = RankPlan.load(args.plan) if args.plan else None
    if args.ratio is not None or plan is not None:
        choice = _factorizer_choice(args)  # before the config reads --calib
        low_rank = from_args(CompressConfig, args, **({"method": None} if plan is not None else {}), **choice)
        if quantized and not low_rank.data_aware:  # --calib then serves the compensation alone
            low_rank = replace(low_rank, calib=None)
        stages.append(low_rank)
    if quantized:  # the calibration text and targets are the lowrank stage's options, shared
        shared = {name: getattr(args, name) for name in ("targets", "calib", "calib_tokens", "calib_seq_len", "bos")}
        stages.append(from_args(QuantConfig, args, bits=FORMATS[args.quantize] if args.quantize else None,
                                target_size=args.target_size, **shared))
    recipe = Recipe(stages)
    recipe.check()
    return recipe, plan


def _factorizer_choice(args: argparse.Namespace) -> dict:
    """The factorizer `welore compress` uses: --factorizer as given; --data-free's plain SVD; else the
    recommended recipe's whitening, calibrated on the built-in text when --calib is not given (then
    args.calib, which the quantize stage shares, and args.builtin_calib are set)."""
    from welore.lowrank.compress import AUTO, BUILTIN_CALIB, RECOMMENDED

    if args.data_free:
        if args.factorizer not in (None, "svd") or args.calib is not None or args.factorizer_params:
            raise WeloreError("--data-free factorizes without calibration text; drop --factorizer, "
                              "--factorizer-param and --calib, or drop --data-free.")
        return {"factorizer": "svd"}
    if args.factorizer is not None:
        return {"factorizer": args.factorizer}
    if args.method == AUTO:  # it chooses the factorizer; the built-in text serves it when --calib is not given
        choice = {"factorizer": RECOMMENDED["factorizer"]}
    else:
        choice = {"factorizer": RECOMMENDED["factorizer"],
                  "factorizer_params": args.factorizer_params or RECOMMENDED["factorizer_params"]}
    if args.calib is None:
        args.calib = args.builtin_calib = BUILTIN_CALIB
    return choice


def _recorded_recipe(path: Path):
    """The recipe in `path` (YAML or JSON), or a checkpoint's (its folder or welore.json) with
    its rank plan when a plan, not a policy, set the ranks."""
    from welore.io.checkpoint import read_record
    from welore.recipe import Recipe

    if path.is_dir() or path.name == "welore.json":
        record = read_record(path.parent if path.name == "welore.json" else path)
        recipe, low_rank = record.recipe, record.recipe.stage("lowrank")
        if not recipe.stages:
            raise WeloreError(f"{path} records no compression (it was saved without its recipe); "
                              "give a recipe file or the compression options.")
        return recipe, record.plan if low_rank is not None and low_rank.method is None else None
    recipe = Recipe.load(path)
    recipe.check()
    if (low_rank := recipe.stage("lowrank")) is not None and low_rank.method is None:
        raise WeloreError(f"The lowrank stage of {path} has no method and a recipe file holds no rank plan; "
                          "give it a method (e.g. method: welore) with a ratio.")
    return recipe, None


def _describe_report(report) -> list[str]:
    """What `compress_` did, in the lines `welore compress` prints."""
    lines = []
    low_rank, quant = report.record.compress_config, report.record.quant_config
    if low_rank is not None:
        plan = report.plan
        if low_rank.selection is not None:
            lines.append(_describe_selection(low_rank.selection))
        lines.append(f"replaced {len(report.replaced)} of {len(plan.ranks)} target matrices: "
                     f"{_describe_replaced(report.replaced)}")
        ratio_note = f" (requested {plan.requested_ratio})" if plan.requested_ratio is not None else ""
        lines.append(f"target parameters removed: {plan.achieved_ratio:.2%}{ratio_note}; "
                     f"whole model: {report.params_before / 1e6:.1f}M -> {report.params_after / 1e6:.1f}M "
                     f"({report.model_reduction:.2%} fewer)")
        calib_note = (f", calibrated on {low_rank.calib_tokens} tokens of {low_rank.calib}"
                      if low_rank.calib is not None else "")
        params = "".join(f" {name}={value:g}" if isinstance(value, float) else f" {name}={value}"
                         for name, value in low_rank.factorizer_params.items())
        if low_rank.refit is not None:
            calib_note += f", refit {low_rank.refit} (ridge {low_rank.refit_ridge:g})"
        lines.append(f"LRC (rank cut >= {low_rank.lrc_min_cut:.0%}): {len(plan.lrc(low_rank.lrc_min_cut))}; "
                     f"factorizer {low_rank.factorizer}{params}{calib_note}")
    if quant is not None:
        lines += _describe_quantization(report, quant)
    return lines


def _describe_quantization(report, config) -> list[str]:
    plan = report.quant.plan
    lines = ["then quantized:"] if report.record.compress_config is not None else []
    widths = ", ".join(f"{n} at {b} bits" for b, n in sorted(Counter(plan.bits.values()).items(), reverse=True))
    ranks = Counter(plan.ranks.values())
    rank_note = ("no compensation" if set(ranks) == {0} else
                 "compensation ranks " + ", ".join(f"{r} ({n})" for r, n in sorted(ranks.items())))
    space = (f"EoRA, whitened by {config.calib_tokens} tokens of {config.calib}" if config.calib is not None
             else "weight space") + (f"; best of {config.compensate_iters} rounds alternating with the codes"
                                     if config.compensate_iters > 1 else "")
    lines.append(f"quantized {len(report.quant.replaced)} matrices ({config.quantizer}, groups of "
                 f"{config.group_size}): {widths}; {rank_note}" + ("" if set(ranks) == {0} else f" ({space})"))
    selection = plan.meta.get("selection")
    if selection is not None:
        scores = ", ".join(f"{label} {ppl:.3f} ({selection['bits_per_param'][label]:.3f} bits)"
                           for label, ppl in selection["perplexity"].items())
        lines.append(f"size plan: {selection['chosen']}, the lowest perplexity on {selection['held_tokens']} "
                     f"held-back calibration tokens of: {scores}")
    target = config.target_size
    request = f" (requested {target / 1e6:.3f} MB, {plan.nbytes / target - 1:+.2%})" if target else ""
    lines.append(f"target matrices: {report.target_bytes_before / 1e6:.2f} MB -> {plan.nbytes / 1e6:.3f} MB{request}, "
                 f"{plan.bits_per_param:.3f} bits per parameter")
    errors = report.quant.output_error
    if errors:
        before = sum(b for b, _ in errors.values()) / len(errors)
        after = sum(a for _, a in errors.values()) / len(errors)
        lines.append(f"mean relative output error on the calibration tokens: {before:.4f} quantized"
                     + (f", {after:.4f} compensated" if set(ranks) != {0} else ""))
    return lines


def cmd_export(args: argparse.Namespace) -> None:
    """Write a welore checkpoint as a plain dense transformers folder (factors multiplied back)."""
    from welore._io import parse_bytes
    from welore.io.checkpoint import export_dense
    from welore.io.models import LoadOptions

    options = from_args(LoadOptions, args)
    budget = parse_bytes(options.max_memory, "the memory size") if options.max_memory is not None else None
    export_dense(args.checkpoint, args.dense, overwrite=args.overwrite, budget=budget)
    print(f"wrote {args.dense}/ (loads with transformers' AutoModelForCausalLM.from_pretrained)")


def _evaluate_one(spec: str, args: argparse.Namespace, options):
    """Load and evaluate one model; returns the loaded model and its EvalResult."""
    from welore.eval.evaluate import evaluate

    loaded = _load(spec, args)
    calib = {s.calib for s in loaded.record.recipe.stages if s.calib} if loaded.record else set()
    windows, bos = _eval_windows(loaded.tokenizer, options, spec, calib=min(calib) if calib else None)
    result = evaluate(loaded.model, windows, path=loaded.path, batch_size=options.batch_size,
                      speed=options.speed, progress=not args.quiet)
    return loaded, result, bos


JSON_HELP = "also write the results as JSON to this file, or to stdout with - (the report then goes to stderr)"


def _write_json(args: argparse.Namespace, payload: dict) -> None:
    """The command's results as JSON: to --json FILE (atomically), or with `--json -` to the
    process's stdout (`main` sends everything else the command prints to stderr)."""
    import json

    from welore._io import write_json

    if args.json == "-":
        print(json.dumps(payload, indent=2, default=str), file=args.stdout)
    elif args.json:
        write_json(args.json, payload)
        print(f"wrote {args.json}")


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
    from welore.eval.evaluate import EvalOptions, format_table
    from welore.eval.tasks import TaskOptions, check_tasks, format_task_table, run_tasks

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
    _write_json(args, payload)


def _method_label(record) -> tuple[str, float] | None:
    """("factorizer/method", achieved ratio) of a low-rank welore checkpoint's record, None otherwise."""
    if record is None or (config := record.compress_config) is None:
        return None
    return f"{config.factorizer}/{record.plan.method}", record.plan.achieved_ratio


def cmd_compare(args: argparse.Namespace) -> None:
    """Several models measured one after another in one run, in one table (first = baseline)."""
    from welore.eval.evaluate import EvalOptions, format_table
    from welore.report import plot_perplexity_vs_ratio

    options = from_args(EvalOptions, args)
    _check_load_options(args)
    results, labels, bos = {}, {}, {}
    for spec in args.models:
        loaded, results[spec], bos[spec] = _evaluate_one(spec, args, options)
        labels[spec] = _method_label(loaded.record)
        del loaded
        gc.collect()
    print(_text_note(options, bos))
    print(format_table(results, baseline=args.models[0]))
    _write_json(args, {"text": options.text, "seq_len": options.seq_len, "bos": bos,
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


DEMO_RECIPES = {  # label -> the lowrank stage, beside the dense model; the last is what `welore compress` runs
    "SVD-LLM": {"method": "uniform", "factorizer": "whiten"},
    "WeLore data-free": {"method": "welore", "factorizer": "svd"},
    "welore recommended": {"method": "welore", "factorizer": "whiten", "factorizer_params": {"shrinkage": 0.1}},
}


def cmd_demo(args: argparse.Namespace) -> None:
    """The main job on the built-in model: SmolLM2-135M compressed three ways at each of two sizes (SVD-LLM's
    whitened uniform ranks, WeLore's data-free ranks and factors, welore's recommended recipe),
    calibrated on wiki and judged on news against the dense model, with a size-quality plot."""
    import copy

    from welore._io import atomic_dir, write_json
    from welore.data import describe_text, load_text, resolve_bos, token_windows
    from welore.eval.evaluate import EvalOptions, evaluate
    from welore.io.checkpoint import save
    from welore.io.models import DEFAULT_MODEL, load_model
    from welore.lowrank.compress import BUILTIN_CALIB, CompressConfig
    from welore.recipe import compress_
    from welore.report import plot_size_quality
    from welore.tables import format_table

    options = from_args(EvalOptions, args, speed=False)
    configs = {(label, ratio): from_args(CompressConfig, args, ratio=ratio, **recipe,
                                         calib=BUILTIN_CALIB if recipe["factorizer"] != "svd" else None)
               for ratio in args.ratios for label, recipe in DEMO_RECIPES.items()}
    out = Path(args.out)
    start = time.perf_counter()
    loaded = load_model(DEFAULT_MODEL, dtype="float32")
    windows, _ = _eval_windows(loaded.tokenizer, options, DEFAULT_MODEL, calib=BUILTIN_CALIB)
    calibration = token_windows(loaded.tokenizer, load_text(BUILTIN_CALIB, split="calib"), args.calib_seq_len,
                                args.calib_tokens, options=("--calib-seq-len", "--calib-tokens"),
                                bos=resolve_bos(loaded.tokenizer, args.bos))
    dense = evaluate(loaded.model, windows, path=loaded.path, batch_size=options.batch_size, speed=False,
                     progress=not args.quiet)
    results, reports = {}, {}
    with atomic_dir(out, overwrite=True) as tmp:
        for (label, ratio), config in configs.items():
            model = copy.deepcopy(loaded.model)
            folder = tmp / f"{label.lower().replace(' ', '-')}-{ratio}"
            reports[label, ratio] = compress_(model, config, calibration=calibration if config.data_aware else None,
                                              progress=not args.quiet, source=DEFAULT_MODEL)
            save(model, folder, tokenizer=loaded.tokenizer, record=reports[label, ratio].record)
            results[label, ratio] = evaluate(model, windows, path=folder, batch_size=options.batch_size, speed=False,
                                             progress=not args.quiet)
            del model
            gc.collect()
        dense_mb = next(iter(reports.values())).target_bytes_before / 1e6
        points: dict[str, list] = {}
        for (label, ratio), report in reports.items():
            points.setdefault(label, []).append((report.target_bytes_after / 1e6, results[label, ratio].perplexity,
                                                 f"{ratio}"))
        plot_size_quality(points, tmp / "size_quality.png", dense=(dense_mb, dense.perplexity),
                          dense_label="dense (float32)",
                          title=f"{DEFAULT_MODEL}: perplexity on {options.text} vs size (labels: ratio)")
        write_json(tmp / "results.json", {"calib": BUILTIN_CALIB, "calib_tokens": calibration.numel(),
                                          "text": options.text, "dense": dense.to_dict(),
                                          "results": [{"recipe": label, "ratio": ratio, **result.to_dict()}
                                                      for (label, ratio), result in results.items()]})
    rows = [["dense", "-", "-", f"{dense.perplexity:.3f}", "1.00", f"{dense_mb:.1f}"]]
    for (label, ratio), report in reports.items():
        config = report.config
        recipe = f"{config.factorizer}/{config.method}" + ("@0.1" if config.factorizer_params else "")
        ppl = results[label, ratio].perplexity
        rows.append([label, recipe, f"{ratio}", f"{ppl:.3f}", f"{ppl / dense.perplexity:.2f}",
                     f"{report.target_bytes_after / 1e6:.1f}"])
    print(f"{DEFAULT_MODEL} with a fraction (ratio) of its target matrices' parameters removed; calibrated on "
          f"{calibration.numel()} tokens of {describe_text(BUILTIN_CALIB, 'calib')}, judged on {options.max_tokens} "
          f"tokens of {describe_text(options.text)} (windows of {options.seq_len})")
    print(format_table(["model", "recipe", "ratio", f"perplexity ({options.text})", "× dense", "target MB"], rows))
    ratio = args.ratios[0]
    best = min(DEMO_RECIPES, key=lambda label: results[label, ratio].perplexity)
    others = ", ".join(f"{label} {results[label, ratio].perplexity:.1f}" for label in DEMO_RECIPES if label != best)
    print(f"\nbest at ratio {ratio}: {best}, {results[best, ratio].perplexity:.1f} on {options.text} "
          f"(dense {dense.perplexity:.1f}; {others})")
    print(f"use it: welore compress MODEL --ratio {ratio} --out DIR   (calibrates on the built-in {BUILTIN_CALIB} "
          "text; --calib TEXT for your own)")
    print(f"wrote {out}/ ({len(reports)} checkpoints, size_quality.png, results.json) in "
          f"{time.perf_counter() - start:.0f}s")


def cmd_finetune(args: argparse.Namespace) -> None:
    """Fine-tune a model: WeLore's LRC factors, LoRA adapters or all weights, with AdamW, GaLore or Fira,
    on the LM loss or (--distill) against the dense model's next-token distribution."""
    from welore.finetune import FinetuneConfig, finetune
    from welore.finetune.setup import check_output, check_precision

    config = from_args(FinetuneConfig, args)  # checks the options before anything is loaded
    _check_load_options(args)
    check_precision(config.precision, config.device)
    check_output(Path(args.out), config, args.overwrite, args.resume)
    loaded = _load(args.model, args, place=False)
    result = finetune(loaded.model, loaded.tokenizer, config, out=args.out, overwrite=args.overwrite,
                      resume=args.resume, source=args.model, progress=not args.quiet, record=loaded.record)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under accelerate launch, the main process reports
        return
    print(f"{config.mode} fine-tuning with {config.optimizer} (lr {config.lr:g}) on {config.data}")
    distill = config.distill
    if distill.enabled:
        print(f"distilled from {distill.teacher} ({distill.teacher_dtype}): loss = {distill.alpha:g}·KL "
              f"(temperature {distill.temperature:g}) + {1 - distill.alpha:g}·LM loss")
    print(result.summary())
    for point in result.history[1:-1]:
        print(f"  step {point['step']}: validation perplexity {point['val_ppl']:.3f}")
    adapter = " with its LoRA adapter in adapter/" if config.mode == "lora" and config.lora.keep_adapter else ""
    print(f"saved {args.out}/{adapter} (loads with welore.load; fine-tuning record in finetune.json)")
    _write_json(args, result.to_dict() | {"out": str(args.out)})


MODEL_HELP = "built-in name (smollm2-135m), model folder, welore checkpoint, .gguf file or hub id"


def build_parser() -> argparse.ArgumentParser:
    from welore.eval.evaluate import EvalOptions
    from welore.eval.tasks import TaskOptions
    from welore.finetune import FinetuneConfig
    from welore.gradients import GradientRunConfig
    from welore.io.models import LoadOptions
    from welore.lowrank.compress import CompressConfig
    from welore.quant import FORMATS, QuantConfig

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
    p.add_argument("--json", metavar="FILE", help=JSON_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    g = p.add_argument_group("gradient spectra (--gradients)")
    g.add_argument("--gradients", action="store_true",
                   help="also train all weights briefly (AdamW) and record every target matrix's gradient "
                        "spectrum per step")
    add_options(g, GradientRunConfig)

    p = command("compress", cmd_compress)
    p.add_argument("model", help=MODEL_HELP)
    compression = p.add_argument_group("compression")
    add_options(compression, CompressConfig, defaults={"factorizer": None})
    compression.add_argument("--data-free", action="store_true",
                             help="WeLore's original data-free path: plain SVD factors, no calibration text (the "
                                  "default is the recommended data-aware recipe: --factorizer whiten "
                                  "--factorizer-param shrinkage=0.1, calibrated on --calib, else the built-in wiki "
                                  "text)")
    p.add_argument("--plan", help="apply this saved rank plan (JSON) instead of computing one")
    p.add_argument("--recipe", metavar="FILE",
                   help="run the stages of this recipe (YAML or JSON), or replay the recipe a checkpoint recorded "
                        "(its folder or welore.json), instead of giving the compression options")
    p.add_argument("--out", required=True, help="folder for the compressed checkpoint")
    p.add_argument("--json", metavar="FILE", help=JSON_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    loading(p)
    quantization = p.add_argument_group("quantization (alone, or with --ratio/--plan: of the low-rank factors)")
    quantization.add_argument("--quantize", choices=list(FORMATS),
                              help="store every target matrix as packed codes of this width (weight-only, asymmetric, "
                                   "in groups)")
    quantization.add_argument("--target-size", metavar="SIZE",
                              help="choose per-matrix widths and compensation ranks so the target matrices (codes, "
                                   "scales, zero points, factors) take SIZE, e.g. 60MB (10^6 bytes) or 57MiB "
                                   "(2^20 bytes)")
    add_options(quantization, QuantConfig)

    p = command("export", cmd_export)
    p.add_argument("checkpoint", help="a welore checkpoint folder")
    p.add_argument("--dense", required=True, help="folder for the plain transformers model")
    p.add_argument("--overwrite", action="store_true", help="replace --dense if it exists")
    add_options(p.add_argument_group("model loading"), LoadOptions, only=["max_memory"])

    p = command("evaluate", cmd_evaluate)
    p.add_argument("model", help=MODEL_HELP)
    add_options(p.add_argument_group("evaluation"), EvalOptions)
    loading(p)
    p.add_argument("--json", metavar="FILE", help=JSON_HELP)
    add_options(p.add_argument_group("lm-eval tasks (--tasks)"), TaskOptions)

    p = command("compare", cmd_compare)
    p.add_argument("models", nargs="+", help="two or more models (first = baseline for the ratio columns)")
    add_options(p.add_argument_group("evaluation"), EvalOptions)
    loading(p)
    p.add_argument("--json", metavar="FILE", help=JSON_HELP)
    p.add_argument("--plot", help="also draw perplexity vs compression ratio, one line per method, to this PNG file")

    p = command("demo", cmd_demo)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.1], metavar="X",
                   help="fractions of the target matrices' parameters to remove, one compression of each recipe per "
                        "ratio; the first is the one the last lines judge (default: 0.05 0.1)")
    add_options(p, CompressConfig, only=["calib_tokens", "calib_seq_len", "bos"], defaults={"calib_tokens": 2048})
    p.add_argument("--out", default="out/demo",
                   help="folder for the demo's outputs (replaced each run; default out/demo)")
    add_options(p.add_argument_group("evaluation"), EvalOptions, exclude=("speed", "bos"),
                defaults={"text": "news", "max_tokens": 4096})

    p = command("finetune", cmd_finetune)
    p.add_argument("model", help="a welore checkpoint (needed for lrc) or any model: " + MODEL_HELP)
    p.add_argument("--out", required=True, help="folder for the fine-tuned welore checkpoint")
    p.add_argument("--json", metavar="FILE", help=JSON_HELP)
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
    args.stdout = sys.stdout  # with `--json -` the JSON alone goes here, the report to stderr
    to_stdout = getattr(args, "json", None) == "-"
    with contextlib.redirect_stdout(sys.stderr) if to_stdout else contextlib.nullcontext():
        try:
            _quiet_libraries()
            if getattr(args, "max_memory", None) is not None:
                from welore.io.stream import return_freed_memory

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
    from welore.eval.evaluate import process_peak_memory
    from welore.io.stream import format_bytes

    peaks = process_peak_memory()
    parts = [f"{format_bytes(peaks.pop('rss'))} resident"] if "rss" in peaks else []
    parts += [f"{format_bytes(v)} on {k}" for k, v in peaks.items()]
    return f"peak memory: {', '.join(parts) or 'not measurable here'}"


if __name__ == "__main__":
    sys.exit(main())
