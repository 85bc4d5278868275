"""welore's perplexity beside lm-eval's rolling (wikitext-style) perplexity on the same text.

    .venv/bin/python benchmarks/lmeval_compare.py [--model smollm2-135m] [--text news]
        [--seq-len 512] [--max-tokens 4096] [--no-write]

The text is the evaluation split of a built-in text (or a local file), cut to the characters of
the tokens welore's windows hold, so that both tools score the same tokens. Four figures:

- welore: `token_windows` (BOS first when the tokenizer adds one, `--bos auto`) and
  `welore.eval.evaluate.perplexity`: every window of T tokens predicts its last T-1 text tokens.
- welore `--bos no` and `--bos yes`: the same text with windows that never or always start
  with BOS (for a tokenizer that adds none, "yes" forces its BOS token anyway).
- lm-eval: `HFLM.loglikelihood_rolling` on the text as one document, `max_length` = T:
  its first window conditions on the prefix token (the tokenizer's BOS, else EOS), later
  windows on the one token before them, and it predicts every token of the document. The
  token-level perplexity is exp(-loglikelihood / tokens), as lm-eval's `wikitext` task
  computes it before turning it into word and byte perplexities.

Writes the `lmeval-compare` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import time

from _common import machine, publish

from welore.data import describe_bos, describe_text, load_text, token_windows
from welore.eval.evaluate import perplexity
from welore.io.models import load_model


def lm_eval_perplexity(model, tokenizer, text: str, seq_len: int) -> tuple[float, int]:
    """lm-eval's rolling token perplexity of `text` as one document, and the tokens it predicted."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=seq_len)
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (loglikelihood,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
    n_tokens = len(lm.tok_encode(text))
    return math.exp(-loglikelihood / n_tokens), n_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", default="news")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()

    loaded = load_model(args.model, dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    full = load_text(args.text, split="eval")
    # The characters behind the text tokens of the --bos no windows: the same tokens for every row.
    plain = token_windows(tokenizer, full, args.seq_len, args.max_tokens, bos="no")  # (N, T)
    text = tokenizer.decode(plain.flatten().tolist())
    rows = []
    for policy in ("auto", "no", "yes"):
        start = time.perf_counter()
        windows = token_windows(tokenizer, text, args.seq_len, args.max_tokens, bos=policy)
        ppl, n = perplexity(model, windows, progress=False)
        rows.append((f"welore --bos {policy} ({describe_bos(tokenizer, policy)})", ppl, n,
                     time.perf_counter() - start))
    start = time.perf_counter()
    ppl, n = lm_eval_perplexity(model, tokenizer, text, args.seq_len)
    rows.append((f"lm-eval loglikelihood_rolling, max_length {args.seq_len}", ppl, n, time.perf_counter() - start))

    reference = rows[0][1]
    lines = [
        "## Perplexity protocol: welore vs lm-eval's rolling perplexity",
        "",
        f"Command: `.venv/bin/python benchmarks/lmeval_compare.py --model {args.model} --text {args.text} "
        f"--seq-len {args.seq_len} --max-tokens {args.max_tokens}`  ",
        f"Model {args.model}; text {describe_text(args.text)}, the first {plain.numel()} tokens; "
        f"windows of {args.seq_len} tokens. Machine: {machine()}.",
        "",
        "| protocol | perplexity | predicted tokens | vs welore (auto) | seconds |",
        "|---|---:|---:|---:|---:|",
        *(f"| {name.replace('|', chr(92) + '|')} | {ppl:.3f} | {n} | {ppl / reference - 1:+.2%} | {seconds:.1f} |"
          for name, ppl, n, seconds in rows),
        "",
        "welore's windows are disjoint and each predicts T-1 tokens from the ones before it in the window; "
        "lm-eval's rolling windows predict every token, the first from the prefix token (BOS, else EOS) and "
        "each later window's first from the one token before it. Both put the tokenizer's BOS first only "
        "where it adds one; lm-eval's later windows start mid-text without it, welore's (with `--bos auto` "
        "on such a tokenizer) each start with BOS, as the standard perplexity recipe of transformers does.",
    ]
    publish("lmeval-compare", "\n".join(lines), write=not args.no_write)


if __name__ == "__main__":
    main()
