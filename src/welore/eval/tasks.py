"""Zero-shot task scores through EleutherAI's lm-evaluation-harness (lm-eval).

    from welore.eval.tasks import run_tasks
    scores = run_tasks(model, tokenizer, ["welore_tiny_mc"], task_dir="tests/data/tasks")
    scores["welore_tiny_mc"]["acc"]     # fraction of questions answered right, in [0, 1]

The in-memory model (dense, or holding welore `LowRankLinear` modules) and its tokenizer are
handed to lm-eval's `HFLM` wrapper, so a compressed model is scored exactly as it runs, with
no export. A task is named as lm-eval names it: one of lm-eval's built-in tasks (e.g.
`arc_easy`, `hellaswag`; `lm-eval ls tasks` lists them), whose datasets come from the Hugging
Face hub and so need network access or the HF cache, or a task defined by a YAML file in a
task folder (`task_dir`), which can read a local data file and needs no network. A task (or
tag) of the task folder is read with lm-eval's YAML loader and handed to lm-eval as a config
whose relative data paths (`dataset_kwargs: data_files:`, a local `dataset_path`) are made
absolute against the task folder, so it runs from any working directory; a group is handed to
lm-eval by name, so its tasks' data paths must be absolute.
`tests/data/tasks/welore_tiny_mc.yaml` is a twelve-question example to copy.

For a multiple-choice task, `acc` is the fraction of questions where the choice with the
highest log-likelihood after the question is the right one, and `acc_norm` the same with
log-likelihoods divided by the choices' lengths in characters; `*_stderr` are their standard errors.

lm-eval is an optional dependency: `pip install 'welore[lmeval]'`. It is imported only when
tasks are run. Its log messages are silenced unless welore's own logging shows INFO; with
`progress=False` its scoring loops run with their `disable_tqdm` switch (lm-eval 0.4.13 has
none for the short bar it draws while it builds each task's prompts).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import importlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from welore.data import resolve_bos
from welore.errors import WeloreError
from welore.eval.evaluate import _eval_mode
from welore.tables import format_table

logger = logging.getLogger(__name__)

INSTALL_HINT = "Task evaluation needs lm-eval; run `pip install 'welore[lmeval]'`."
LIST_HINT = ("`lm-eval ls tasks` lists the built-in ones, and a task of your own is a YAML file in a "
             "folder passed with --task-dir")
_LM_EVAL_LOGGERS = ("lm_eval", "lm-eval")  # the second is the name older lm-eval versions use
_STDERR_SUFFIX = "_stderr"


@dataclass
class TaskOptions:
    """lm-eval task scoring of the `evaluate` command (`welore.options`); see `run_tasks`."""

    tasks: list[str] | None = field(default=None, metadata={"metavar": "TASK"})  # also score the model on these lm-eval
        # tasks (e.g. arc_easy, or a task in --task-dir); built-in tasks download their data and need network access
    task_dir: str | None = None  # folder of lm-eval YAML task files (relative data paths in them resolve against it)
    task_limit: int | None = None  # score at most this many examples per task (default: all)
    fewshot: int = 0  # solved examples put before each question (0: zero-shot)


def _import_lm_eval(*submodules: str) -> Any:
    """The `lm_eval` package with `submodules` imported, or WeloreError with the install hint."""
    try:
        for name in submodules:
            importlib.import_module(f"lm_eval.{name}")
        import lm_eval
    except ImportError:
        raise WeloreError(INSTALL_HINT) from None
    return lm_eval


def _check_options(tasks: list[str], task_dir: str | os.PathLike[str] | None, limit: int | None,
                   num_fewshot: int) -> Path | None:
    """Raise WeloreError for bad arguments; returns the task folder as an absolute path."""
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise WeloreError(f"Tasks must be a non-empty list of task names, got {tasks!r}; e.g. ['arc_easy'].")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise WeloreError(f"The task limit must be a positive number of examples per task, got {limit!r}.")
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise WeloreError(f"The number of few-shot examples must be 0 or more, got {num_fewshot!r}.")
    if task_dir is None:
        return None
    folder = Path(task_dir).expanduser()
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise WeloreError(f"Task folder {folder} {what}; pass a folder of lm-eval YAML task files to --task-dir.")
    return folder.resolve()


@functools.lru_cache(maxsize=1)
def _builtin_task_manager() -> Any:
    """lm-eval's TaskManager of its built-in tasks alone. Indexing them reads thousands of YAML
    files (~10 s), and they cannot change while Python runs, so the index is built once."""
    return _import_lm_eval("tasks").tasks.TaskManager()


def _task_manager(tasks: list[str], task_dir: Path | None) -> Any:
    """An lm-eval TaskManager that knows every name in `tasks`, or WeloreError naming the rest.

    The task folder alone is indexed first (milliseconds); lm-eval's built-in tasks are indexed
    too only when some name is not in the folder.
    """
    task_manager_class = _import_lm_eval("tasks").tasks.TaskManager
    if task_dir is None:
        manager = _builtin_task_manager()
    else:
        manager = task_manager_class(include_path=str(task_dir), include_defaults=False)
        if set(tasks) <= set(manager.all_tasks):
            return manager
        manager = task_manager_class(include_path=str(task_dir))
    known = set(manager.all_tasks)
    unknown = [name for name in tasks if name not in known]
    if unknown:
        guesses = [match for name in unknown for match in difflib.get_close_matches(name, known, n=1)]
        guess = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
        where = (f"lm-eval's built-in tasks or {task_dir}" if task_dir
                 else "lm-eval's built-in tasks (no --task-dir given)")
        raise WeloreError(f"Unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}{guess}: "
                          f"not among {where}; {LIST_HINT}.")
    return manager


def check_tasks(tasks: list[str], task_dir: str | os.PathLike[str] | None = None, *,
                limit: int | None = None, num_fewshot: int = 0) -> None:
    """Raise WeloreError if `run_tasks` would refuse these arguments: lm-eval missing, a task
    folder that does not exist, an unknown task name or a bad limit. Call it before slow work;
    it loads no dataset."""
    folder = _check_options(tasks, task_dir, limit, num_fewshot)
    _task_manager(tasks, folder)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence lm-eval's logging (unless welore logs INFO) and the datasets library's progress
    bars; both are restored after."""
    import datasets

    with contextlib.ExitStack() as stack:
        if not logger.isEnabledFor(logging.INFO):
            for name in _LM_EVAL_LOGGERS:
                lm_logger = logging.getLogger(name)
                stack.callback(lm_logger.setLevel, lm_logger.level)
                lm_logger.setLevel(logging.ERROR)
        if datasets.is_progress_bar_enabled():
            datasets.disable_progress_bars()
            stack.callback(datasets.enable_progress_bars)
        yield


def _language_model(lm_eval: Any, model: nn.Module, tokenizer: Any, batch_size: int, progress: bool,
                    bos: str = "auto") -> Any:
    """lm-eval's HFLM wrapper of the in-memory `model`; with `progress=False` its request loops
    run with the `disable_tqdm` switch lm-eval gives them."""
    class QuietHFLM(lm_eval.models.huggingface.HFLM):
        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            return super().generate_until(requests, disable_tqdm=True)

    wrapper = lm_eval.models.huggingface.HFLM if progress else QuietHFLM
    add_bos = None if bos == "auto" else resolve_bos(tokenizer, bos) == "yes"  # None: the tokenizer's default
    return wrapper(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size, add_bos_token=add_bos)


def _task_specs(tasks: list[str], manager: Any, task_dir: Path | None) -> list[str | dict[str, Any]]:
    """What to hand lm-eval for each of `tasks`: a task of `task_dir` as its config, read with
    lm-eval's YAML loader, with relative data paths made absolute against `task_dir`; a tag of
    `task_dir` as its tasks' configs; anything else (a built-in task, a group) by name."""
    if task_dir is None:
        return list(tasks)
    load_yaml = _import_lm_eval("tasks._yaml_loader").tasks._yaml_loader.load_yaml
    index = manager.task_index

    def from_folder(name: str) -> bool:
        path = index[name].yaml_path
        return path is not None and path.resolve().is_relative_to(task_dir)

    def config(name: str) -> dict[str, Any]:
        return _absolute_data_paths(load_yaml(index[name].yaml_path), task_dir)

    specs: list[str | dict[str, Any]] = []
    for name in tasks:
        if name in manager.all_tags and all(from_folder(task) for task in index[name].tags):
            specs.extend(config(task) for task in sorted(index[name].tags))
        elif name in manager.all_subtasks and from_folder(name):
            specs.append(config(name))
        else:
            specs.append(name)
    return specs


def _absolute_data_paths(config: dict[str, Any], task_dir: Path) -> dict[str, Any]:
    """`config` with its `dataset_kwargs.data_files` (a path, a list or a {split: path(s)} dict)
    made absolute against `task_dir`, as is `dataset_path` when it names something in `task_dir`."""
    def absolute(paths: Any) -> Any:
        if isinstance(paths, str):
            return paths if "://" in paths else str(task_dir / paths)  # an absolute path stays as it is
        if isinstance(paths, list):
            return [absolute(p) for p in paths]
        if isinstance(paths, dict):
            return {split: absolute(p) for split, p in paths.items()}
        return paths

    kwargs = config.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        config["dataset_kwargs"] = {**kwargs, "data_files": absolute(kwargs["data_files"])}
    dataset_path = config.get("dataset_path")
    if isinstance(dataset_path, str) and (task_dir / dataset_path).exists():
        config["dataset_path"] = str(task_dir / dataset_path)
    return config


def _network_error(err: BaseException) -> ConnectionError | None:
    """The ConnectionError behind `err` (itself or a cause), or None."""
    while err is not None:
        if isinstance(err, ConnectionError):
            return err
        err = err.__cause__ or err.__context__
    return None


def _metrics(entry: dict[str, Any]) -> dict[str, float]:
    """{metric: value} from one task's lm-eval results, whose keys are "metric,filter"
    ("acc,none", "acc_stderr,none"); a filter other than "none" is kept as "metric (filter)"."""
    metrics = {}
    for key, value in entry.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # "alias", "sample_len", or a stderr of "N/A"
        metrics[metric if filter_name == "none" else f"{metric} ({filter_name})"] = float(value)
    return metrics


def run_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str],
    task_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    batch_size: int = 4,
    num_fewshot: int = 0,
    progress: bool = True,
    bos: str = "auto",
) -> dict[str, dict[str, float]]:
    """Score `model` on lm-eval `tasks`: task name -> {metric: value}, e.g. {"acc": 0.75,
    "acc_stderr": 0.13, "acc_norm": 0.5, "acc_norm_stderr": 0.15}.

    `task_dir` is a folder of YAML task files, searched besides lm-eval's built-in tasks;
    `limit` scores only the first N examples of each task; `num_fewshot` puts that many solved
    examples before each question (0: zero-shot; a task file that sets `num_fewshot: 0` keeps
    it). `bos` is the BOS policy (`welore.data.BOS_POLICIES`): lm-eval encodes with the tokenizer's
    default under auto, and with or without BOS under yes or no. `batch_size` requests go through
    the model at once. The model runs where it is, in eval
    mode; every submodule's train/eval flag is restored afterwards, and the caller's tokenizer is
    not modified (lm-eval may give its copy a padding token). Task groups (e.g. `mmlu`) report
    the group and each of its tasks. As lm-eval's own command does, this seeds Python's, NumPy's
    and torch's global random generators, so repeated runs give the same scores.

    Raises WeloreError if lm-eval is not installed, the task folder does not exist, a task name
    is unknown, or a task's dataset cannot be loaded (built-in tasks need network access).
    """
    folder = _check_options(tasks, task_dir, limit, num_fewshot)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise WeloreError(f"Batch size must be at least 1, got {batch_size!r}.")
    if tokenizer is None:
        raise WeloreError("Task evaluation needs the model's tokenizer; pass a model folder that includes one.")
    from welore.io.stream import is_streamed

    if is_streamed(model):
        raise WeloreError("lm-eval tasks need the whole model in memory, but this one reads its decoder blocks "
                          "from disk one at a time; drop --tasks or --max-memory.")
    lm_eval = _import_lm_eval("tasks", "models.huggingface", "evaluator")
    tasks = list(dict.fromkeys(tasks))  # each task once, in the order given
    manager = _task_manager(tasks, folder)
    logger.info("Running lm-eval %s on %s (%d-shot%s).", lm_eval.__version__, ", ".join(tasks), num_fewshot,
                f", at most {limit} examples per task" if limit else "")
    specs = _task_specs(tasks, manager, folder)
    with _eval_mode(model), _quiet():
        lm = _language_model(lm_eval, model, tokenizer, batch_size, progress, bos)
        try:
            output = lm_eval.evaluator.simple_evaluate(model=lm, tasks=specs, task_manager=manager,
                                                       num_fewshot=num_fewshot, limit=limit, log_samples=False)
        except Exception as err:  # lm-eval and datasets wrap a failed download in many types; only that is re-worded
            network = _network_error(err)
            if network is None:
                raise
            reason = str(network).splitlines()[0] if str(network) else type(network).__name__
            which = f"task {tasks[0]}" if len(tasks) == 1 else f"one of the tasks {', '.join(tasks)}"
            raise WeloreError(
                f"Cannot fetch the dataset of {which} from the Hugging Face hub ({reason}); lm-eval's built-in "
                "tasks need network access (or their dataset in the HF cache), so offline use a local task: "
                "a YAML task file and its data in a folder passed with --task-dir."
            ) from None
    results = {name: _metrics(entry) for name, entry in output["results"].items()}
    for name, metrics in results.items():
        logger.info("%s: %s", name, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return results


def format_task_table(results: dict[str, dict[str, float]]) -> str:
    """A plain-text table of `run_tasks` results: one row per task and metric, with the
    metric's standard error (`<metric>_stderr`) in its own column, "-" where there is none."""
    table = []
    for task, metrics in results.items():
        for metric, value in metrics.items():
            if metric.endswith(_STDERR_SUFFIX) and metric[: -len(_STDERR_SUFFIX)] in metrics:
                continue
            stderr = metrics.get(metric + _STDERR_SUFFIX)
            table.append([task, metric, f"{value:.4f}",
                          "-" if stderr is None or not math.isfinite(stderr) else f"{stderr:.4f}"])
    return format_table(["task", "metric", "value", "stderr"], table, left=2)
