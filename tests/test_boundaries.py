"""Module boundaries the code relies on: compression does not import the evaluation harness,
and library code leaves process-wide state (matplotlib's backend, the working directory,
other libraries' internals) alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "welore"
COMPRESSION = ["lowrank/compress.py", "lowrank/plan.py", "lowrank/factorize.py", "lowrank/calibrate.py",
               "lowrank/curvature.py", "lowrank/refit.py", "lowrank/module.py", "lowrank/spectrum.py", "modules.py",
               "targets.py", "quant/module.py", "quant/quantizers.py", "quant/compensate.py", "quant/allocate.py",
               "quant/plan.py"]  # the selections (lowrank/select.py, quant/api.py's size plans) score by perplexity
HARNESS = {"welore.eval.evaluate", "welore.eval.tasks", "welore.report", "welore.cli"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("name", COMPRESSION)
def test_compression_does_not_import_the_evaluation_harness(name: str) -> None:
    assert not _imports(SRC / name) & HARNESS


def _calls(path: Path) -> set[str]:
    """Dotted names of every call in the file, e.g. "os.chdir", "matplotlib.use"."""
    calls = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)):
            calls.add(f"{node.func.value.id}.{node.func.attr}")
    return calls


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_library_code_leaves_global_state_alone(path: Path) -> None:
    assert not _calls(path) & {"os.chdir", "matplotlib.use"}
    assert not _imports(path) & {"matplotlib.pyplot", "unittest.mock", "unittest"}


def test_plots_leave_pyplot_alone(tmp_path: Path) -> None:
    """Drawing a plot opens no pyplot figure and keeps the backend a notebook chose."""
    import matplotlib

    from welore.report import plot_perplexity_vs_ratio

    backend = matplotlib.get_backend()
    plot_perplexity_vs_ratio([("svd/welore", 0.1, 20.0), ("svd/welore", 0.2, 30.0)], tmp_path / "p.png", dense=10.0)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == backend
    pyplot = __import__("sys").modules.get("matplotlib.pyplot")
    assert pyplot is None or not pyplot.get_fignums()
