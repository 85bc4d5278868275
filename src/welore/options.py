"""Command-line options generated from config dataclasses, so that each default is written once.

Every option of the `welore` command line that configures the library is a field of a config
dataclass, and the CLI reads the dataclass to build its argparse arguments:

    field                                            option
    seq_len: int = 512  # tokens per window          --seq-len N   "tokens per window (default: 512)"
    calib: str | None = None  # calibration text     --calib CALIB
    sequential: bool = False  # calibrate ...        --sequential          (a switch)
    speed: bool = True  # measure tokens/s           --no-speed            (a switch turning it off; its help
                                                     says so after the field's comment)
    targets: list[str] | None = None  # patterns     --targets PATTERN [PATTERN ...]
    betas: tuple[float, float] = (0.9, 0.999)        --betas BETAS BETAS
    params: dict = field(default_factory=dict)       --params NAME=VALUE   (once per name; the values
                                                     are text, typed by whoever reads them: `parse_value`)

The help text is the field's trailing comment (the comment STYLE.md asks for anyway), followed
by the default; comment lines right below the field and indented deeper than it continue the
comment, so a long one wraps:

    factorizer: str = "svd"  # how each matrix is factorized: svd (data-free), whiten (SVD-LLM),
        # asvd (activation-scaled); all but svd need --calib
 A field's `metadata` may add `choices` (a sequence, or a function returning one,
for registries that are imported late), `metavar`, `short` (e.g. "-q"), `flag` (the option's
name when it is not the field's, e.g. a singular for a repeatable option) and `more_help` (a
function returning text appended to the help, e.g. generated from a registry with
`describe_fields`); `{"cli": False}` keeps a field off the command line. A field named `version`
(a config's format version) never becomes an option.

A field whose type is itself a config dataclass is a group: it is no option, its fields are,
flattened in at its place and named by their own `flag` or name, with the values of the group's
default instance as defaults; `from_args` builds the group back. Group fields name their options
in full, so that a config reads `config.lora.rank` and the command line `--lora-rank`:

    lora: LoraOptions = field(default_factory=LoraOptions)  # in FinetuneConfig
    rank: int = field(default=8, metadata={"flag": "lora_rank"})  # in LoraOptions: --lora-rank N

A group's `metadata` may add `options`, {field of the group: option name}: only those fields are
options, under those names and in that order; the group's own checks name its own options, and
`from_args` puts the names given here into their messages (`GradientRunConfig` reuses
`FinetuneConfig` this way, with defaults of its own: those of the group's default instance).
Two fields that make the same option are an error when the parser is built.

To add an option: add one field, with its comment, to the dataclass that owns it —
`LoadOptions` (`welore.io.models`: options of every command that loads a model, such as `dtype`),
`CompressConfig`, `EvalOptions`, `TaskOptions`, `GradientRunConfig` or `FinetuneConfig` (or one
of its groups, e.g. `LoraOptions`) — and use it where that config is consumed (for `LoadOptions`,
a keyword of `load_model` with the same name). `add_options` puts it on every command that uses
that dataclass and `from_args` reads it back. Check values in the dataclass's `__post_init__`
and raise `WeloreError` naming the option (`--seq-len must be ...`): the CLI builds every config
before it loads a model, so a bad value is one sentence on stderr and exit status 2, with
nothing loaded. `QuantConfig` follows the same rule; its fields shared with the lowrank stage
(`--calib`, `--targets`, ...) or set by the command (`--quantize`, `--target-size`) are marked
`{"cli": False}` and passed by `welore compress` when it builds the recipe.

Why not transformers' `HfArgumentParser` (already a dependency): tried on these configs
(transformers 5.25), it passes a field's `metadata` straight to `add_argument`, so it fails on
the ones that carry more than argparse keywords (`QuantConfig`: "unexpected keyword argument
'cli'"; `CompressConfig`: "length of metavar tuple does not match nargs" for its dict of
factorizer parameters), takes help only from `metadata["help"]` (every field's comment would
be written twice), has no nested groups (`FinetuneConfig`'s LoRA, GaLore, distillation
options) and no repeatable NAME=VALUE form. It parsed `EvalOptions`, the one config with plain
fields only. jsonargparse, which has groups and YAML, is not in this machine's package index.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any

from welore.errors import WeloreError

NOT_OPTIONS = frozenset({"version"})  # field names that are never command-line options


def flag(name: str) -> str:
    """The option string of a field: seq_len -> --seq-len."""
    return "--" + name.replace("_", "-")


def _option(f: dataclasses.Field) -> str:
    """The option string of field `f` (its metadata's `flag`, else its name)."""
    return flag(f.metadata.get("flag", f.name))


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """{field name: its trailing comment} read from the source of `cls` and its dataclass bases."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # no source (a frozen or interactive class): no help text
            continue
        source = textwrap.dedent(source)
        by_line: dict[int, str] = {}
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                by_line[token.start[0]] = token.string.lstrip("#").strip()
        tree = ast.parse(source)
        source_lines = source.splitlines()
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node in body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                lines = list(range(node.lineno, (node.end_lineno or node.lineno) + 1))
                while _continues_comment(source_lines, lines[-1] + 1, node.col_offset):
                    lines.append(lines[-1] + 1)
                text = " ".join(by_line[n] for n in lines if n in by_line)
                if text:
                    comments[node.target.id] = text
    return comments


def _continues_comment(source_lines: list[str], lineno: int, field_indent: int) -> bool:
    """Whether line `lineno` (1-based) is a comment-only line indented deeper than a field's
    indentation `field_indent`: the continuation of the comment of the field above it."""
    if lineno > len(source_lines):
        return False
    line = source_lines[lineno - 1]
    return line.lstrip().startswith("#") and len(line) - len(line.lstrip()) > field_indent


def _unwrap_optional(tp: Any) -> Any:
    """X for `X | None` and `Optional[X]`; `tp` itself otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _format_default(value: Any) -> str | None:
    if value is None or value is False or value is dataclasses.MISSING:
        return None
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe_fields(cls: type) -> str:
    """The fields of the dataclass `cls` for a help text, "name (comment; default X), ..." ("none"
    without fields)."""
    comments, parts = field_comments(cls), []
    for f in dataclasses.fields(cls):
        shown = _format_default(_default_of(f))
        about = "; ".join(text for text in (comments.get(f.name), shown and f"default {shown}") if text)
        parts.append(f"{f.name} ({about})" if about else f.name)
    return ", ".join(parts) or "none"


def parse_value(tp: Any, text: str, what: str) -> Any:
    """`text` from the command line as a value of type `tp` (bool, int, float, str or `X | None`,
    where "none" is None); WeloreError saying what `what` takes otherwise."""
    inner = _unwrap_optional(tp)
    if inner is not tp and text.strip().lower() == "none":
        return None
    if inner is bool and text.strip().lower() in _BOOLS:
        return _BOOLS[text.strip().lower()]
    if inner in (int, float, str):
        try:
            return inner(text)
        except ValueError:
            pass
    elif inner is not bool:
        raise TypeError(f"{what}: no command-line form for type {tp!r}")
    words = {bool: "true or false", int: "a whole number", float: "a number"}
    raise WeloreError(f"{what} must be {words[inner]}, got {text!r}.")


_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _name_value(text: str) -> tuple[str, str]:
    """argparse type of a dict field's option: "NAME=VALUE" -> (NAME, VALUE)."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


class _NameValues(argparse.Action):
    """A dict field's option, once per name: each NAME=VALUE is added to a copy of the dict."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        name, value = values
        current = dict(getattr(namespace, self.dest) or {})
        if name in current:
            parser.error(f"{option_string} sets {name} more than once; give each name once")
        setattr(namespace, self.dest, {**current, name: value})


def option_fields(cls: type, only: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> list[dataclasses.Field]:
    """The fields of `cls` that are command-line options or groups of them, in declaration order."""
    chosen = [f for f in dataclasses.fields(cls)
              if f.name not in NOT_OPTIONS and f.metadata.get("cli", True) and f.name not in set(exclude)]
    if only is not None:
        wanted = list(only)
        known = {f.name for f in chosen}
        missing = [n for n in wanted if n not in known]
        assert not missing, f"{cls.__name__} has no option fields {missing}"
        chosen = [f for f in chosen if f.name in set(wanted)]
    return chosen


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _group_type(cls: type, f: dataclasses.Field) -> type | None:
    """The config dataclass that field `f` of `cls` holds (a group of options), or None."""
    tp = _hints(cls)[f.name]
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


@dataclasses.dataclass(frozen=True)
class Option:
    """One command-line option of a config: one of its fields, or a field of one of its groups."""

    dest: str  # argparse's dest: the field's name, or for a group's field the option's name
    name: str  # the option's name: lora_rank is --lora-rank
    path: tuple[str, ...]  # the field names from the config down to the field, e.g. ("lora", "rank")
    field: dataclasses.Field
    owner: type  # the dataclass that declares the field (its comment is the help)
    default: Any


def options(cls: type, only: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> list[Option]:
    """The options of the dataclass `cls` in declaration order, its groups' flattened in (see the
    module docstring); `only`/`exclude` pick fields of `cls` itself (a group whole). TypeError
    when two fields make the same option."""
    result: list[Option] = []
    for f in option_fields(cls, only, exclude):
        group = _group_type(cls, f)
        if group is None:
            result.append(Option(dest=f.name, name=f.metadata.get("flag", f.name), path=(f.name,), field=f, owner=cls,
                                 default=_default_of(f)))
            continue
        base, renamed = _default_of(f), f.metadata.get("options")
        inner = options(group, only=renamed)
        if renamed:  # in the order they are named
            inner.sort(key=lambda option: list(renamed).index(option.path[0]))
        for option in inner:
            name = renamed[option.path[0]] if renamed else option.name
            default = option.default
            if base is not dataclasses.MISSING:
                default = functools.reduce(getattr, option.path, base)
            result.append(dataclasses.replace(option, dest=name, name=name, path=(f.name, *option.path),
                                              default=default))
    for key in ("dest", "name"):
        seen: dict[str, Option] = {}
        for option in result:
            other = seen.setdefault(getattr(option, key), option)
            if other is not option:
                raise TypeError(f"{cls.__name__}: fields {'.'.join(other.path)} and {'.'.join(option.path)} both make "
                                f"the option {flag(option.name)}; give one another metadata flag")
    return result


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """Add one argparse option per field of the dataclass `cls` (see the module docstring).

    `only`/`exclude` pick fields; `defaults` overrides an option's default for this command
    (e.g. a demo that evaluates fewer tokens), by its `dest`: the field name (for a group's
    field, the option's name).
    """
    defaults = defaults or {}
    for option in options(cls, only, exclude):
        f = option.field
        default = defaults.get(option.dest, option.default)
        tp = _unwrap_optional(_hints(option.owner)[f.name])
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        help_text = f.metadata.get("help", field_comments(option.owner).get(f.name, ""))
        if "more_help" in f.metadata:
            help_text = f"{help_text}: {f.metadata['more_help']()}"
        kwargs: dict[str, Any] = {"dest": option.dest, "default": default}
        names = [f.metadata["short"]] if "short" in f.metadata else []
        if tp is bool:
            if default is True:
                help_text = f"{help_text} (on by default; this switch turns it off)" if help_text else help_text
                parser.add_argument(*names, flag("no_" + option.name), action="store_false", help=help_text, **kwargs)
            else:
                parser.add_argument(*names, flag(option.name), action="store_true", help=help_text, **kwargs)
            continue
        if tp is dict or origin is dict:  # repeatable NAME=VALUE
            kwargs.update(type=_name_value, action=_NameValues, metavar=f.metadata.get("metavar", "NAME=VALUE"))
            parser.add_argument(*names, flag(option.name), help=help_text, **kwargs)
            continue
        if origin in (list, Sequence) and len(args) == 1:
            kwargs.update(type=args[0], nargs="+")
        elif origin is tuple and args and Ellipsis not in args and len(set(args)) == 1:
            kwargs.update(type=args[0], nargs=len(args))
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            raise TypeError(f"{option.owner.__name__}.{f.name}: no command-line form for type {tp!r}; "
                            "give it metadata={'cli': False}")
        if kwargs["type"] in (int, float):
            kwargs["metavar"] = "N" if kwargs["type"] is int else "X"
        choices = f.metadata.get("choices")
        if callable(choices):
            choices = choices()
        if choices is not None:
            kwargs["choices"] = list(choices)
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        shown = _format_default(default)
        if shown is not None:
            help_text = f"{help_text} (default: {shown})" if help_text else f"default: {shown}"
        parser.add_argument(*names, flag(option.name), help=help_text, **kwargs)


def from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of `cls` from the options `add_options` added (fields absent from `args`
    keep their defaults; groups are built back from their fields' options); `overrides` set
    fields of `cls` directly."""
    values: dict[str, Any] = {}
    for option in options(cls):
        if not hasattr(args, option.dest):
            continue
        value = getattr(args, option.dest)
        tp = _unwrap_optional(_hints(option.owner)[option.field.name])
        if typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)  # argparse's nargs gives a list
        _put(values, option.path, value)
    return _build(cls, values | overrides)


def _put(values: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """values[a][b]... = value for path (a, b, ...), making the inner dicts on the way."""
    *groups, name = path
    functools.reduce(lambda level, group: level.setdefault(group, {}), groups, values)[name] = value


def _build(cls: type, values: dict[str, Any], base: Any = None) -> Any:
    """`cls` from {field: value}, where a group's value may be {its field: value}; the fields
    `values` lacks keep those of `base` if given, else their defaults."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        group, value = _group_type(cls, f), values[f.name]
        kwargs[f.name] = _build_group(f, group, value) if group is not None and isinstance(value, dict) else value
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def _build_group(f: dataclasses.Field, group: type, values: dict[str, Any]) -> Any:
    """Group field `f` from its fields' values, over its default instance; its checks' messages
    name the options as `f`'s `options` metadata renames them."""
    base = _default_of(f)
    try:
        return _build(group, values, None if base is dataclasses.MISSING else base)
    except WeloreError as err:
        renamed = f.metadata.get("options")
        if not renamed:
            raise
        message = str(err)
        for option in options(group, only=renamed):
            own, here = re.escape(flag(option.name)), flag(renamed[option.path[0]])
            message = re.sub(rf"(?<![\w-]){own}(?![\w-])", here, message)
        raise WeloreError(message) from None


def flat_values(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The option values in `data`, a dict of the dataclass `cls` with its groups as dicts (its
    `asdict`), by option: {"lora": {"rank": 8}, "steps": 3} -> {"lora_rank": 8, "steps": 3}."""
    flat = {}
    for option in options(cls):
        value: Any = data
        for name in option.path:
            if not isinstance(value, dict) or name not in value:
                break
            value = value[name]
        else:
            flat[option.dest] = value
    return flat


def nested_values(cls: type, flat: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `flat_values`: option values by option (and other keys, kept as they are)
    as a dict of `cls` with its groups as dicts: {"lora_rank": 8} -> {"lora": {"rank": 8}}."""
    paths = {option.dest: option.path for option in options(cls)}
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        _put(nested, paths.get(key, (key,)), value)
    return nested


def check_positive(config: Any, names: Sequence[str]) -> None:
    """Raise WeloreError naming (by its option) the first field in `names` that is not a positive integer."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    for name in names:
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise WeloreError(f"{_option(fields[name])} must be a positive integer, got {value!r}.")

