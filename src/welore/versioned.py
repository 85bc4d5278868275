"""Reading the versioned JSON files welore writes (`welore.json`, `rank_plan.json`, the
fine-tuning config), so that a file from another version or a hand edit is one clear sentence.

Every file carries an integer format version. Reading one whose version is missing, not an
integer, or newer than this welore knows raises `WeloreError` naming the file and the fix.
Keys this welore does not know are reported (a logged warning naming them) and ignored, so a
file from a newer minor release still loads but nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any, TypeVar

from welore.errors import WeloreError

log = logging.getLogger(__name__)

T = TypeVar("T")


def check_version(data: Any, key: str, current: int, what: str) -> int:
    """`data[key]` as a format version this welore reads, else WeloreError about `what`."""
    if not isinstance(data, dict):
        raise WeloreError(f"{what} is not a JSON object; re-create it with welore.")
    if key not in data:
        raise WeloreError(f"{what} has no {key!r}, so its format is unknown; re-create it with welore.")
    version = data[key]
    if isinstance(version, bool) or not isinstance(version, int):
        raise WeloreError(f"{what} has {key} {version!r}, not an integer; re-create it with welore.")
    if version > current:
        raise WeloreError(f"{what} has format version {version}, newer than this welore reads ({current}); "
                          "upgrade welore.")
    return version


def report_unknown(data: dict, known: Iterable[str], what: str) -> dict:
    """`data` without the keys outside `known`, which are logged as a warning."""
    known = set(known)
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        log.warning("%s has keys this welore does not know, ignored: %s", what, ", ".join(map(str, unknown)))
    return {k: v for k, v in data.items() if k in known}


def config_from_dict(cls: type[T], data: Any, what: str, current: int, key: str = "version") -> T:
    """The dataclass `cls` from its `to_dict` output: version checked, unknown keys reported,
    bad values (the dataclass's own checks, or values of the wrong type) as WeloreError."""
    check_version(data, key, current, what)
    values = report_unknown(data, (f.name for f in dataclasses.fields(cls)), what)
    try:
        return cls(**values)
    except WeloreError as err:
        raise WeloreError(f"{what} holds a bad value: {err}") from None
    except (TypeError, ValueError) as err:
        raise WeloreError(f"{what} holds a value of the wrong type ({err}); re-create it with welore.") from None
