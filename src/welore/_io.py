"""Filesystem helpers: the cache folder and all-or-nothing output.

Every folder or file welore writes is built under a temporary name next to its destination
and renamed into place at the end, so an interrupted or failed run leaves nothing half-written:
a folder through `atomic_dir`, a file through `atomic_file` or the `write_text`, `write_json`
and `write_csv` helpers built on it (which are also used for the files inside an atomic folder).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from welore.errors import WeloreError

CACHE_ENV = "WELORE_CACHE"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cache_dir() -> Path:
    """Where converted models, extracted corpora and spectra live: `$WELORE_CACHE`, else
    `$XDG_CACHE_HOME/welore`, else `~/.cache/welore`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "welore"


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless `overwrite`; call before any slow work."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise WeloreError(f"Output folder {path} already exists; choose another path or pass --overwrite.")
    if path.exists() and not path.is_dir():
        raise WeloreError(f"Output path {path} is a file, not a folder; choose another path.")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path`, on error it is removed."""
    path = check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; give it the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_umask())
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """Write a matplotlib Figure as PNG, atomically (welore never touches pyplot's state)."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through `atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, payload: Any, indent: int | None = 2) -> None:
    """Write `payload` as JSON (`indent` spaces per level, None: one line) and a newline to `path`."""
    write_text(path, json.dumps(payload, indent=indent) + "\n")


def write_csv(path: str | Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    """Write `rows` (dicts keyed by `columns`) as a CSV file with a header line to `path`."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: str | int | float, what: str = "size", example: str = "4GB") -> int:
    """Bytes of a size a user wrote (--max-memory, --target-size): an int, or a string such as
    "4GB" (10^9), "4GiB" (2^30), "512 MB", "1000" (bytes); `what` and `example` word the error."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        number, unit = (float(match.group(1)), match.group(2).upper()) if match else (0.0, None)
    if unit not in _UNITS or number * _UNITS[unit] < 1:
        raise WeloreError(f"Cannot read {what} {value!r}; write a positive number of bytes with a unit, e.g. {example} "
                          "(MB = 10^6 bytes, MiB = 2^20).")
    return int(round(number * _UNITS[unit]))
