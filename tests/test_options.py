"""The command line is generated from the config dataclasses (`welore.options`): its defaults
are theirs, its help is their field comments, and what it parses builds them back."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest

from welore.cli import RunOptions, build_parser
from welore.errors import WeloreError
from welore.eval.evaluate import EvalOptions
from welore.eval.tasks import TaskOptions
from welore.finetune import DistillOptions, FinetuneConfig, GaLoreOptions, LoraOptions, LrcOptions
from welore.gradients import GradientRunConfig
from welore.io.models import LoadOptions, load_model
from welore.lowrank.compress import CompressConfig
from welore.options import (
    add_options,
    check_positive,
    field_comments,
    flat_values,
    from_args,
    nested_values,
    options,
    parse_value,
)

# command -> (the shortest valid argv, the config classes whose options it has)
COMMANDS = {
    "analyze": (["m"], [RunOptions, LoadOptions, GradientRunConfig]),
    "compress": (["m", "--out", "o"], [RunOptions, LoadOptions, CompressConfig]),
    "evaluate": (["m"], [RunOptions, LoadOptions, EvalOptions, TaskOptions]),
    "compare": (["a", "b"], [RunOptions, LoadOptions, EvalOptions]),
    "finetune": (["m", "--out", "o"], [RunOptions, LoadOptions, FinetuneConfig]),
    "export": (["c", "--dense", "d"], [RunOptions]),
}


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


COMMAND_DEFAULTS = {("compress", "factorizer"): None}  # compress without --factorizer: the recommended recipe
    # (welore.lowrank.compress.RECOMMENDED), or svd with --data-free


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_parser_defaults_are_the_dataclass_defaults(command: str) -> None:
    argv, classes = COMMANDS[command]
    args = build_parser().parse_args([command, *argv])
    for cls in classes:
        for option in options(cls):
            expected = COMMAND_DEFAULTS.get((command, option.dest), option.default)
            assert getattr(args, option.dest) == expected, f"{command} {cls.__name__} {option.dest}"
            setattr(args, option.dest, option.default)
        assert from_args(cls, args) == cls()


def test_analyze_plan_options_and_demo_overrides() -> None:
    parser = build_parser()
    args = parser.parse_args(["analyze", "m"])
    for name in ("ratio", "method", "targets", "lrc_min_cut"):
        assert getattr(args, name) == _default(CompressConfig.__dataclass_fields__[name])
    assert not hasattr(args, "factorizer")  # analyze plans ranks; it does not factorize
    demo = parser.parse_args(["demo"])
    assert (demo.ratios, demo.calib_tokens, demo.max_tokens) == ([0.05, 0.1], 2048, 4096)  # the demo's own run
    assert from_args(EvalOptions, demo, speed=False) == EvalOptions(text="news", max_tokens=4096, speed=False)


def test_every_option_reaches_its_config() -> None:
    args = build_parser().parse_args([
        "finetune", "m", "--out", "o", "--mode", "lora", "--optimizer", "galore", "--lr", "0.001", "--betas", "0.8",
        "0.9", "--max-grad-norm", "0", "--lora-targets", "*.q_proj", "re:.*v_proj", "--train-nlrc", "--seq-len", "64",
    ])
    config = from_args(FinetuneConfig, args)
    assert (config.mode, config.optimizer, config.lr, config.betas) == ("lora", "galore", 0.001, (0.8, 0.9))
    assert config.max_grad_norm is None  # 0 = no clipping
    assert config.lora.targets == ["*.q_proj", "re:.*v_proj"] and config.lrc.train_nlrc and config.seq_len == 64
    args = build_parser().parse_args(["compress", "m", "--out", "o", "--ratio", "0.3", "--factorizer", "whiten",
                                      "--calib", "news", "--calib-tokens", "1024", "--sequential",
                                      "--dtype", "bfloat16"])
    assert from_args(CompressConfig, args) == CompressConfig(ratio=0.3, factorizer="whiten", calib="news",
                                                             calib_tokens=1024, sequential=True)
    params = build_parser().parse_args(["compress", "m", "--out", "o", "--factorizer", "asvd", "--factorizer-param",
                                        "alpha=1", "--factorizer-param", "floor=1e-4", "--calib", "news"])
    config = from_args(CompressConfig, params)
    assert config == CompressConfig(factorizer="asvd", factorizer_params={"alpha": 1.0, "floor": 1e-4}, calib="news")
    assert config.to_dict()["factorizer_params"] == {"alpha": 1.0, "floor": 1e-4}  # typed, as welore.json records it
    assert from_args(LoadOptions, args) == LoadOptions(dtype="bfloat16")
    assert from_args(EvalOptions, build_parser().parse_args(["evaluate", "m", "--no-speed"])).speed is False


def test_finetune_groups_are_flat_options_and_nested_settings() -> None:
    args = build_parser().parse_args([
        "finetune", "m", "--out", "o", "--lora-rank", "16", "--keep-adapter", "--galore-gap", "10", "--distill",
        "--teacher", "dense", "--distill-alpha", "0.5", "--lrc-min-cut", "0.7", "--train-scales",
    ])
    assert args.lora_rank == 16 and args.distill is True and args.lrc_min_cut == 0.7  # dest = the option's name
    config = from_args(FinetuneConfig, args)
    assert config.lora == LoraOptions(rank=16, keep_adapter=True) and config.train_scales
    assert config.galore == GaLoreOptions(gap=10) and config.lrc == LrcOptions(min_cut=0.7)
    assert config.distill == DistillOptions(enabled=True, teacher="dense", alpha=0.5)
    flat = flat_values(FinetuneConfig, config.to_dict())
    assert flat["lora_rank"] == 16 and flat["distill"] is True and flat["teacher"] == "dense" and "lora" not in flat
    assert nested_values(FinetuneConfig, flat) | {"version": config.version} == config.to_dict()


def test_help_is_the_field_comment() -> None:
    comments = field_comments(FinetuneConfig)
    assert comments["steps"] == "optimizer steps"
    assert "Adam's moment decay rates" in comments["betas"]
    for cls in (FinetuneConfig, LoadOptions, CompressConfig, EvalOptions, TaskOptions, GradientRunConfig, RunOptions):
        # every option has help: its comment, or a help text shared by several configs (e.g. --bos)
        for option in options(cls):
            assert "help" in option.field.metadata or option.field.name in field_comments(option.owner), option


def test_load_options_are_load_model_keywords() -> None:
    """Adding a field to LoadOptions adds an option to every model-loading command; load_model
    must take it by the same name."""
    keywords = inspect.signature(load_model).parameters
    assert all(f.name in keywords for f in dataclasses.fields(LoadOptions))


@dataclasses.dataclass
class _Toy:
    size: int = 3  # how many
    scale: float | None = None  # how much
    names: list[str] | None = None  # which ones
    pair: tuple[int, int] = (1, 2)  # two numbers
    kind: str = dataclasses.field(default="a", metadata={"choices": lambda: ["a", "b"]})  # a or b
    loud: bool = False  # shout
        # loudly
    # a comment at the fields' own indentation introduces the next field; it is not help
    fast: bool = True  # hurry
    extras: dict = dataclasses.field(default_factory=dict,
                                     metadata={"flag": "extra", "more_help": lambda: "x or y"})  # named values
    secret: dict = dataclasses.field(default_factory=dict, metadata={"cli": False})  # not an option
    version: int = 1


def _toy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    add_options(parser, _Toy)
    return parser


def test_generator_on_a_toy_config(capsys: pytest.CaptureFixture) -> None:
    parser = _toy_parser()
    assert from_args(_Toy, parser.parse_args([])) == _Toy()
    args = parser.parse_args(["--size", "5", "--scale", "0.5", "--names", "x", "y", "--pair", "3", "4",
                              "--kind", "b", "--loud", "--no-fast"])
    assert from_args(_Toy, args) == _Toy(size=5, scale=0.5, names=["x", "y"], pair=(3, 4), kind="b", loud=True,
                                         fast=False)
    assert not hasattr(args, "secret") and not hasattr(args, "version")
    text = " ".join(parser.format_help().split())
    assert "how many (default: 3)" in text and "--no-fast" in text and "{a,b}" in text
    assert "--loud shout loudly" in text and field_comments(_Toy)["fast"] == "hurry"
    assert "--extra NAME=VALUE named values: x or y" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--kind", "c"])
    assert "invalid choice: 'c'" in capsys.readouterr().err


def test_a_dict_field_is_a_repeatable_name_value_option(capsys: pytest.CaptureFixture) -> None:
    parser = _toy_parser()
    args = parser.parse_args(["--extra", "a=1", "--extra", " b = x=y "])
    assert from_args(_Toy, args).extras == {"a": "1", "b": "x=y"}  # text: whoever reads them types them
    assert from_args(_Toy, parser.parse_args([])).extras == {} and _Toy().extras == {}  # not shared
    with pytest.raises(SystemExit):
        parser.parse_args(["--extra", "a=1", "--extra", "a=2"])
    assert "--extra sets a more than once" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--extra", "a"])
    assert "expected NAME=VALUE, got 'a'" in capsys.readouterr().err


@pytest.mark.parametrize("tp, text, value", [
    (float, "1e-3", 1e-3), (int, "7", 7), (bool, "False", False), (bool, "yes", True), (str, "a b", "a b"),
    (float | None, "none", None), (int | None, "3", 3),
])
def test_parse_value(tp, text: str, value) -> None:
    assert parse_value(tp, text, "x") == value


@pytest.mark.parametrize("tp, text, match", [
    (float, "abc", "x must be a number, got 'abc'"), (int, "1.5", "x must be a whole number"),
    (bool, "maybe", "x must be true or false"),
])
def test_parse_value_errors_are_one_sentence(tp, text: str, match: str) -> None:
    with pytest.raises(WeloreError, match=match):
        parse_value(tp, text, "x")


def test_a_field_without_a_command_line_form_is_a_bug() -> None:
    @dataclasses.dataclass
    class Bad:
        table: set = dataclasses.field(default_factory=set)  # no CLI form

    with pytest.raises(TypeError, match="no command-line form"):
        add_options(argparse.ArgumentParser(), Bad)


@pytest.mark.parametrize("cls, kwargs, match", [
    (EvalOptions, {"seq_len": 0}, "--seq-len must be a positive integer"),
    (CompressConfig, {"calib": "wiki", "calib_tokens": -1}, "--calib-tokens must be a positive integer"),
    (GradientRunConfig, {"grad_every": 0}, "--grad-every must be a positive integer"),
    (LoraOptions, {"rank": 0}, "--lora-rank must be a positive integer"),
    (GaLoreOptions, {"gap": 0}, "--galore-gap must be a positive integer"),
    (LrcOptions, {"min_cut": 0.0}, "--lrc-min-cut 0.0 is outside"),
    (DistillOptions, {"teacher": "m"}, "add --distill or drop --teacher"),
    (LoadOptions, {"dtype": "float8"}, "Unknown dtype"),
])
def test_configs_check_their_values(cls, kwargs, match) -> None:
    with pytest.raises(WeloreError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.pop("version"), "has no 'version'"),
    (lambda d: d.update(version=2.0), "not an integer"),
    (lambda d: d.update(version=FinetuneConfig().version + 1), "newer than this welore reads"),
    (lambda d: d.update(steps="many"), "bad value: --steps must be a positive integer, got .many."),
    (lambda d: d.update(lr="fast"), "wrong type"),
    (lambda d: d.update(steps=0), "bad value: --steps must be a positive integer"),
    (lambda d: d["lora"].update(rank=0), r"config \(lora\) holds a bad value: --lora-rank must be a positive integer"),
    (lambda d: d.update(lora=8), r"config \(lora\) is not a JSON object"),
    (lambda d: d["galore"].update(gap="often"), "bad value: --galore-gap must be a positive integer"),
])
def test_finetune_config_file_errors_are_one_sentence(edit, match) -> None:
    data = FinetuneConfig(mode="full").to_dict()
    edit(data)
    with pytest.raises(WeloreError, match=match):
        FinetuneConfig.from_dict(data)


def test_configs_round_trip_and_report_unknown_keys(caplog: pytest.LogCaptureFixture) -> None:
    config = FinetuneConfig(mode="lora", betas=(0.8, 0.9), lora=LoraOptions(targets=["*.q_proj"]))
    assert FinetuneConfig.from_dict(config.to_dict()) == config
    compress = CompressConfig(ratio=0.2, factorizer="whiten", calib="wiki", sequential=True)
    assert CompressConfig.from_dict(compress.to_dict()) == compress
    with caplog.at_level("WARNING", logger="welore.versioned"):
        assert FinetuneConfig.from_dict({**config.to_dict(), "new_knob": 1}) == config
    assert "new_knob" in caplog.text
    with caplog.at_level("WARNING", logger="welore.versioned"):
        data = config.to_dict()
        data["lora"]["new_knob"] = 1
        assert FinetuneConfig.from_dict(data) == config
    assert "(lora)" in caplog.text and "new_knob" in caplog.text


# finetune.json's config as the welore before FinetuneConfig's groups wrote it (version 1): every
# option at the top level, by its name
FLAT_CONFIG = {
    "mode": "lora", "optimizer": "adamw", "steps": 100, "lr": 0.0005, "warmup_steps": 0, "weight_decay": 0.0,
    "betas": [0.9, 0.999], "batch_size": 4, "grad_accum": 1, "max_grad_norm": 1.0, "precision": "no", "seed": 0,
    "device": "auto", "data": "wiki", "seq_len": 256, "max_train_tokens": None, "val_tokens": 4096, "val_fraction": 0.1,
    "bos": "auto", "eval_every": 0, "save_every": 0, "lrc_min_cut": 0.5, "train_nlrc": True, "train_norms": False,
    "train_scales": False, "lora_rank": 16, "lora_alpha": 16.0, "lora_dropout": 0.0, "lora_targets": ["*.q_proj"],
    "keep_adapter": False, "galore_rank": 128, "galore_gap": 10, "galore_scale": 0.25, "distill": True,
    "teacher": "dense", "distill_alpha": 0.5, "distill_temperature": 1.0, "teacher_dtype": "float32", "version": 1,
}


def test_a_flat_finetune_config_of_version_1_reads_into_the_groups() -> None:
    config = FinetuneConfig.from_dict(FLAT_CONFIG)
    assert config == FinetuneConfig(mode="lora", lrc=LrcOptions(train_nlrc=True),
                                    lora=LoraOptions(rank=16, targets=["*.q_proj"]), galore=GaLoreOptions(gap=10),
                                    distill=DistillOptions(enabled=True, teacher="dense", alpha=0.5))
    assert config.version == FinetuneConfig().version == 2
    assert FinetuneConfig.from_dict(config.to_dict()) == config
    # the oldest records: no BOS policy (blocks never started with BOS), no device, no distillation
    oldest = {k: v for k, v in FLAT_CONFIG.items() if k not in ("bos", "device", "train_scales") and "distill" not in k
              and "teacher" not in k}
    config = FinetuneConfig.from_dict(oldest)
    assert config.bos == "no" and not config.distill.enabled and config.lora.rank == 16
    with pytest.raises(WeloreError, match="bad value: --lora-rank must be a positive integer"):
        FinetuneConfig.from_dict({**FLAT_CONFIG, "lora_rank": 0})


# --- groups of options ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Inner:
    rate: float = 0.1  # how fast
    on: bool = dataclasses.field(default=False, metadata={"flag": "inner_on"})  # switch it on
    count: int = 1  # how many

    def __post_init__(self) -> None:
        check_positive(self, ("count",))


@dataclasses.dataclass
class _Outer:
    size: int = 3  # how big
    inner: _Inner = dataclasses.field(default_factory=_Inner)  # the inner settings


@dataclasses.dataclass
class _Clash:
    rate: float = 1.0  # another rate
    inner: _Inner = dataclasses.field(default_factory=_Inner)  # the inner settings


@dataclasses.dataclass
class _Reuses:
    inner: _Inner = dataclasses.field(default_factory=lambda: _Inner(count=5),
                                      metadata={"options": {"count": "inner_count", "rate": "speed"}})  # renamed


def _parser(cls: type) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    add_options(parser, cls)
    return parser


def test_a_group_contributes_its_fields_options(capsys: pytest.CaptureFixture) -> None:
    parser = _parser(_Outer)
    assert from_args(_Outer, parser.parse_args([])) == _Outer()
    args = parser.parse_args(["--size", "4", "--rate", "0.5", "--inner-on", "--count", "2"])
    assert from_args(_Outer, args) == _Outer(size=4, inner=_Inner(rate=0.5, on=True, count=2))
    assert not hasattr(args, "inner")
    text = " ".join(parser.format_help().split())
    assert "--rate X how fast (default: 0.1)" in text and "--inner-on switch it on" in text
    assert [o.path for o in options(_Outer)] == [("size",), ("inner", "rate"), ("inner", "on"), ("inner", "count")]
    with pytest.raises(WeloreError, match="--count must be a positive integer"):
        from_args(_Outer, parser.parse_args(["--count", "0"]))


def test_two_fields_making_one_option_are_an_error_when_the_parser_is_built() -> None:
    with pytest.raises(TypeError, match=r"rate and inner.rate both make the option --rate"):
        _parser(_Clash)


def test_a_group_reused_under_other_names_keeps_its_checks_and_names_the_options_used() -> None:
    parser = _parser(_Reuses)
    assert [o.dest for o in options(_Reuses)] == ["inner_count", "speed"]  # only these, in this order
    assert from_args(_Reuses, parser.parse_args([])) == _Reuses()  # the default instance's values
    assert from_args(_Reuses, parser.parse_args(["--speed", "2"])).inner == _Inner(rate=2.0, count=5)
    with pytest.raises(WeloreError, match="^--inner-count must be a positive integer, got 0"):
        from_args(_Reuses, parser.parse_args(["--inner-count", "0"]))
    text = " ".join(parser.format_help().split())
    assert "--inner-count N how many (default: 5)" in text and "--inner-on" not in text
