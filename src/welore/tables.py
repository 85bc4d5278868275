"""Plain-text tables for people, laid out in one place so that every table welore prints or
writes (evaluation results, lm-eval task scores, spectra and gradient summaries) reads alike:

    model   perplexity  params (M)
    ======  ==========  ==========
    dense       13.037     134.515
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1) -> str:
    """`rows` of cells under `header`: columns two spaces apart, each as wide as its widest cell,
    a rule of "=" under the header; the first `left` columns (names) are aligned left, the rest
    (numbers) right. Trailing spaces are trimmed."""
    table = [list(header), *(list(row) for row in rows)]
    assert all(len(row) == len(header) for row in table), "every row needs one cell per header column"
    widths = [max(len(row[col]) for row in table) for col in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(width) if col < left else cell.rjust(width)
                         for col, (cell, width) in enumerate(zip(cells, widths, strict=True))).rstrip()

    rule = "  ".join("=" * width for width in widths)
    return "\n".join([line(table[0]), rule, *(line(cells) for cells in table[1:])])
