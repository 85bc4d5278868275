"""The one plain-text table layout (`welore.tables`) and the file writers of `welore._io`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from welore._io import write_csv, write_json, write_text
from welore.tables import format_table


def test_table_layout() -> None:
    table = format_table(["name", "kind", "value"], [["a", "long kind", "1.5"], ["longer name", "k", "-"]], left=2)
    assert table.splitlines() == [
        "name         kind       value",
        "===========  =========  =====",
        "a            long kind    1.5",
        "longer name  k              -",
    ]


def test_table_rows_need_a_cell_per_column() -> None:
    with pytest.raises(AssertionError, match="one cell per header column"):
        format_table(["a", "b"], [["1"]])


def test_writers(tmp_path: Path) -> None:
    write_json(tmp_path / "sub" / "a.json", {"x": [1, 2]})
    assert (tmp_path / "sub" / "a.json").read_text() == '{\n  "x": [\n    1,\n    2\n  ]\n}\n'
    write_json(tmp_path / "b.json", {"x": 1}, indent=None)
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": 1}
    write_csv(tmp_path / "c.csv", ["k", "v"], [{"k": "a", "v": 1}, {"k": "b", "v": 2.5}])
    assert (tmp_path / "c.csv").read_text() == "k,v\na,1\nb,2.5\n"
    write_text(tmp_path / "d.txt", "σ\n")
    assert (tmp_path / "d.txt").read_text(encoding="utf-8") == "σ\n"


def test_a_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    write_json(path, {"x": 1})
    with pytest.raises(TypeError):
        write_json(path, {"x": object()})  # not JSON: fails before anything is renamed
    with pytest.raises(ValueError):
        write_csv(tmp_path / "c.csv", ["k"], [{"k": 1, "unknown": 2}])  # fails while writing
    assert json.loads(path.read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
