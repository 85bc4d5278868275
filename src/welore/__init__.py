"""welore: find, measure and exploit the low-rank structure of language-model weights."""

__version__ = "0.1.0"
