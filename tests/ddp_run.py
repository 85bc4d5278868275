"""`welore.cli.main` as tests/test_ddp.py starts it under `accelerate launch`, with two test hooks.

    WELORE_TEST_STOP_AT=N   every process stops at optimizer step N as Ctrl-C would (before the
                            step), leaving the run's last checkpoint behind
    WELORE_TEST_DUMP=DIR    every process saves its trained parameters to DIR/rank{R}.safetensors

Not a test module (pytest collects test_*.py only).
"""

from __future__ import annotations

import os
import sys

import welore.finetune  # noqa: F401  (the package; `welore.finetune` the attribute is the function)
from welore.cli import main

PACKAGE = sys.modules["welore.finetune"]
_finetune = PACKAGE.finetune


def _stop_at(step: int):
    def hook(current: int, model) -> None:
        if current == step:
            raise KeyboardInterrupt

    return hook


def finetune(*args, **kwargs):
    stop = int(os.environ.get("WELORE_TEST_STOP_AT", "0"))
    result = _finetune(*args, on_gradients=_stop_at(stop) if stop else None, **kwargs)
    dump = os.environ.get("WELORE_TEST_DUMP")
    if dump:
        from accelerate import PartialState
        from safetensors.torch import save_file

        params = {n: p.detach().contiguous() for n, p in result.model.named_parameters()}
        save_file(params, os.path.join(dump, f"rank{PartialState().process_index}.safetensors"))
    return result


PACKAGE.finetune = finetune  # the CLI imports it from welore.finetune when it runs

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
