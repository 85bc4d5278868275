"""welore.eval.wikitext.strip_wikitext: the cases that make it stay instead of mwparserfromhell's
strip_code(), which on these keeps image captions and "thumb|" options, template parameters,
<ref> contents, table rows and "References"/"See also" sections (benchmarks/wikitext_compare.py
counts them over the built-in excerpt)."""

from __future__ import annotations

import pytest

from welore.eval.wikitext import strip_wikitext


@pytest.mark.parametrize(
    "markup, expected",
    [
        ("'''Foo''' is a {{lang|grc|{{nested|{{deep}}}}}} thing.", "Foo is a thing."),
        ("A [[target|label]] and [[plain]]s.", "A label and plains."),
        (
            "Cite.<ref name=a>{{cite web|url=x}} [[y]]</ref> Next.<ref name=b/> End.",
            "Cite. Next. End.",
        ),
        (
            "[[File:x.jpg|thumb|A [[cat|feline]] near Bicyclo[1.1.0]butane]]Text after.",
            "Text after.",
        ),
        ("[[Image:y.png|left|[[a]] [[b|c]]]] Kept.\n[[Category:Animals|Z]]", "Kept."),
        (
            "Before\n{| class=wikitable\n|-\n| a || {{b}}\n{|\n| inner\n|}\n|}\nAfter",
            "Before\n\nAfter",
        ),
        ("See [http://example.com the site] now.", "See the site now."),
        ("Hidden<!-- [[x]] {{y}} -->text<br/> <span style='x'>kept</span>", "Hiddentext kept"),
        ("x &amp; y&nbsp;z &ndash; w", "x & y z – w"),
        ("== History ==\nSome text.", "History\n\nSome text."),
        ("* one\n** two\n# three\n: four\n;five", "one\ntwo\nthree\nfour\nfive"),
        ("a\n\n\n\n\nb", "a\n\nb"),
        ("[[:Category:Foo|Foo cats]] [[de:Anarchismus]] [[wikt:word|word]]", "Foo cats word"),
        ("[[Paris (France)|]] is big.", "Paris is big."),
        ("''italic'' and '''''both'''''", "italic and both"),
    ],
)
def test_strip_wikitext(markup, expected):
    assert strip_wikitext(markup) == expected


def test_strip_wikitext_drops_source_sections():
    markup = (
        "Intro.\n== See also ==\n* [[Other]]\n=== Sub ===\nmore\n"
        "== References ==\n{{reflist}}\n== Later ==\nKept."
    )
    assert strip_wikitext(markup) == "Intro.\n\nLater\n\nKept."


def test_strip_wikitext_drops_empty_sections():
    markup = (
        "Intro.\n== Medals ==\n{| class=wikitable\n| x\n|}\n== Parts ==\n=== Empty ===\n"
        "* {{flag|UK}} (UK)\n=== Full ===\nText."
    )
    assert strip_wikitext(markup) == "Intro.\n\nParts\n\nFull\n\nText."


def test_strip_wikitext_unbalanced():
    # An unclosed template swallows the rest; stray closers disappear.
    assert strip_wikitext("Good }} text ]] here. {{broken|never closed") == "Good text here."
