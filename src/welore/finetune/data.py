"""Training and validation blocks, and the resumable order in which training reads them.

A text becomes packed blocks of `seq_len` token ids (no padding, documents run together),
each starting with BOS under the BOS policy (`welore.data.token_windows`).
Built-in texts train on their calibration half and validate on their evaluation half (they
share no document); a single text (a file, a dataset) is cut into blocks and its last
`val_fraction` of blocks is held out. Either way, training and validation share no token.

Training reads the blocks in a fresh random order each epoch, seeded by (seed, epoch), as one
endless stream; item i of the stream is a pure function of i. Resuming at item i therefore
needs nothing but i (no sampler or RNG state).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from welore.data import BUILTIN_TEXTS, load_text, token_windows
from welore.errors import WeloreError

log = logging.getLogger(__name__)


@dataclass
class TokenBlocks:
    train: torch.Tensor  # (N, T) token ids to train on
    val: torch.Tensor  # (M, T) token ids to validate on, disjoint from train
    description: str = "token blocks"  # where they came from, for reports

    def __post_init__(self) -> None:
        for name, blocks in (("train", self.train), ("val", self.val)):
            if blocks.dim() != 2 or blocks.shape[0] < 1 or blocks.shape[1] < 2:
                raise WeloreError(f"The {name} blocks must be a (N, T) tensor with N >= 1 and T >= 2, "
                                  f"got shape {tuple(blocks.shape)}.")

    def fingerprint(self) -> str:
        """A hash of the token ids, so that a resumed run can tell it reads the same data."""
        digest = hashlib.sha256()
        for blocks in (self.train, self.val):
            digest.update(str(tuple(blocks.shape)).encode())
            digest.update(blocks.to(torch.int64).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def make_blocks(tokenizer, spec: str, seq_len: int, max_train_tokens: int | None = None,
                val_tokens: int = 4096, val_fraction: float = 0.1, bos: str = "auto") -> TokenBlocks:
    """Training and validation blocks of `seq_len` tokens from text `spec` (see module docstring),
    starting with BOS under the policy `bos` (`welore.data.resolve_bos`)."""
    if tokenizer is None:
        raise WeloreError("This model has no tokenizer, so the text cannot be tokenized; "
                          "pass a model folder that includes one.")
    if val_tokens < seq_len:
        raise WeloreError(f"--val-tokens ({val_tokens}) is less than one block of --seq-len ({seq_len}); "
                          "raise it or lower --seq-len.")
    if spec in BUILTIN_TEXTS:
        train = token_windows(tokenizer, load_text(spec, split="calib"), seq_len, max_train_tokens,
                              options=("--seq-len", "--max-train-tokens"), bos=bos)
        val = token_windows(tokenizer, load_text(spec, split="eval"), seq_len, val_tokens,
                            options=("--seq-len", "--val-tokens"), bos=bos)
        return TokenBlocks(train, val, f"{spec}: calib split for training, eval split for validation")
    limit = None if max_train_tokens is None else max_train_tokens + val_tokens
    blocks = token_windows(tokenizer, load_text(spec, split="all"), seq_len, limit,
                           options=("--seq-len", "--max-train-tokens"), bos=bos)  # (N, T)
    n = len(blocks)
    if n < 2:
        raise WeloreError(f"{spec} gives only one block of {seq_len} tokens, and fine-tuning needs at least two "
                          "(one to train on, one to validate on); use a longer text or a smaller --seq-len.")
    n_val = min(max(1, round(n * val_fraction)), val_tokens // seq_len, n - 1)
    train = blocks[: n - n_val]
    if max_train_tokens is not None:
        train = train[: max(1, max_train_tokens // seq_len)]
    return TokenBlocks(train, blocks[n - n_val:], f"{spec}: last {n_val} of {n} blocks held out for validation")


class BlockStream(Dataset):
    """Items `start`..`stop`-1 of the endless, per-epoch shuffled stream of training blocks."""

    def __init__(self, blocks: torch.Tensor, seed: int, start: int, stop: int) -> None:
        self.blocks, self.seed, self.start, self.stop = blocks, seed, start, stop
        self._orders: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.stop - self.start

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.blocks), generator=generator)}
        return self._orders[epoch]

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self.start + index
        epoch, position = divmod(item, len(self.blocks))
        return self.blocks[self._order(epoch)[position]]  # (T,)
