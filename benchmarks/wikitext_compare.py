"""welore's MediaWiki stripper vs mwparserfromhell's strip_code() on the built-in Wikipedia
excerpt: markup left in the text, size, time and a line diff (the figures in welore/eval/wikitext.py).

    pip install mwparserfromhell==0.7.2   # not a welore dependency
    python benchmarks/wikitext_compare.py
"""

from __future__ import annotations

import difflib
import re
import time

import mwparserfromhell as mw

from welore import data
from welore.eval.wikitext import iter_wiki_articles, strip_wikitext

DROPPED_TAGS = ("ref", "gallery", "math", "timeline", "references")  # tags strip_wikitext drops too
LEFTOVER = {  # markup that should not survive in plain text
    "{{ or }}": r"\{\{|\}\}",
    "[[ or ]]": r"\[\[|\]\]",
    "table {| |} or |-": r"\{\||\|\}|^\|-",
    "file/image/category link": r"(?i)\b(?:file|image|category|thumb)\s*[:|]",
    "html tag": r"</?[a-zA-Z][^<>]*>",
    "'' quotes": r"'{2,}",
    "== heading ==": r"(?m)^=+.*=+\s*$",
    "url": r"https?://",
    "|param= residue": r"\|\s*\w+\s*=",
}


def strip_code(markup: str) -> str:
    code = mw.parse(markup)
    for tag in code.filter_tags(recursive=False):
        if str(tag.tag).lower() in DROPPED_TAGS:
            code.remove(tag)
    return code.strip_code(normalize=True, collapse=True, keep_template_params=False)


def main() -> None:
    articles = list(iter_wiki_articles(data._gensim_data_file(data._BUILTINS["wiki"])))
    outputs = {}
    for name, fn in (("welore strip_wikitext", strip_wikitext), ("mwparserfromhell strip_code", strip_code)):
        start = time.perf_counter()
        texts = [fn(markup) for _, markup in articles]
        seconds = time.perf_counter() - start
        kept = [t for t in texts if len(t) >= 200]
        left = {k: sum(len(re.findall(p, t)) for t in kept) for k, p in LEFTOVER.items()}
        print(f"{name}: {len(kept)} of {len(articles)} articles kept, {sum(map(len, kept))} chars, "
              f"{seconds:.1f}s; leftovers: {left}")
        outputs[name] = [line for t in texts for line in t.splitlines() if line.strip()]
    ours, theirs = outputs.values()
    ops = {"equal": 0, "replace": 0, "delete": 0, "insert": 0}
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ours, theirs, autojunk=False).get_opcodes():
        ops[tag] += max(i2 - i1, j2 - j1)
    print(f"non-empty lines: welore {len(ours)}, mwparserfromhell {len(theirs)}; line diff: {ops}")


if __name__ == "__main__":
    main()
