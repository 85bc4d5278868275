"""Measuring a model: perplexity, size, memory and speed (evaluate.py), lm-eval task scores
(tasks.py), and the wikitext markup stripping of the built-in wiki text (wikitext.py)."""
