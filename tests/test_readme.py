"""The README is a short manual whose figures come from the docs.

Every figure README.md quotes (outside its command and code blocks, the demo's output included)
must appear in docs/*.md, where docs/benchmarks.md gives its command, date and machine. The
README stays under 250 lines, starts with the two commands, and links only to files that exist.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = {path.name: path.read_text(encoding="utf-8") for path in sorted((ROOT / "docs").glob("*.md"))}

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)  # (info string, body) of a fenced block
CODE = {"bash", "sh", "python", "yaml"}  # blocks of commands and code: their numbers are options, not figures
VERSION = re.compile(r"\d+(?:\.\d+){2,}|Python\s*(?:≥|>=)?\s*\d+\.\d+")  # 2.13.0, Python ≥ 3.10
FIGURE = re.compile(
    r"(?<![\w.,])(?:"
    r"\d{1,3}(?:,\d{3})+(?:\.\d+)?"  # a thousands separator: 8,192
    r"|\d+\.\d+(?:e[+-]?\d+)?"  # a decimal point: 134.8, 3.38e+05
    r"|\d+(?=\s?(?:%|×|MB|GB|MiB|GiB|kB|min\b|s\b))"  # a unit, percent or × suffix: 20%, 4×, 280 s
    r")"
)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def prose(markdown: str) -> str:
    """The text outside fenced blocks of commands and code (other fenced blocks, such as the
    demo's output, are kept)."""
    return FENCE.sub(lambda m: "" if m.group(1) in CODE else m.group(2), markdown)


def figures(text: str) -> list[str]:
    return FIGURE.findall(VERSION.sub(" ", text))


def quoted_in(figure: str, text: str) -> bool:
    """Whether `text` holds `figure` as a whole number (8,192 may be written 8192)."""
    variants = {figure, figure.replace(",", "")}
    return any(re.search(rf"(?<![\d.,]){re.escape(v)}(?![\d]|[.,]\d)", text) for v in variants)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_figure_extraction():
    text = "134.8 on news (dense 28.30), 8,192 tokens, 0.16×, 20%, 280 s, 2.20 GB; torch 2.13.0, Python ≥ 3.10, 12 runs"
    assert figures(text) == ["134.8", "28.30", "8,192", "0.16", "20", "280", "2.20"]
    assert quoted_in("8,192", "on 8192 tokens") and not quoted_in("0.2", "ratio 0.25")


def test_every_readme_figure_is_in_the_docs():
    docs = "\n".join(DOCS.values())
    missing = sorted({f for f in figures(prose(README)) if not quoted_in(f, docs)})
    assert not missing, (f"README.md quotes figures that no docs/*.md states: {missing}; add them to "
                         "docs/benchmarks.md (with their command, date and machine) or correct the README")


def test_readme_is_short():
    lines = README.count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move detail to a guide in docs/ (at most 250)"


def test_readme_starts_with_the_two_commands():
    info, body = FENCE.search(README).groups()
    commands = [line.split("#")[0].strip() for line in body.splitlines() if line.strip()]
    assert info in {"sh", "bash"} and commands == ["make demo", "make test"], (
        f"README.md's first block should be a shell block with `make demo` and `make test`, not {info}: {commands}")


def test_readme_links_resolve():
    for target in LINK.findall(README):
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        assert (ROOT / path).is_file(), f"README.md links to {path}, which does not exist"
        if anchor and path.endswith(".md"):
            headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(encoding="utf-8"), flags=re.M)
            assert anchor in {slug(h) for h in headings}, f"README.md links to {target}: no such heading"
