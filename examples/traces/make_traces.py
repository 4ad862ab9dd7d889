"""Write the example request-size traces of this folder from stated distributions.

    python examples/traces/make_traces.py

Lengths are drawn (seed 0) from log-normal distributions clipped to ranges
that fit Llama-2's 4,096 positions; no arrival times (``--rate`` sets them).
The three shapes follow the workload kinds Mélange and HexGen evaluate with:

- ``conversational.jsonl``: chat turns, short prompts and answers
  (prompt median 256, output median 192);
- ``long-document.jsonl``: summarising long documents, long prompts and short
  answers (prompt median 2,500, output median 160);
- ``mixed.jsonl``: four conversational requests to one long-document request,
  shuffled;
- ``small-mixed.jsonl``: short and long requests for the ``small`` preset's CPU runs
  (prompt 4-96 or 120-200 tokens, outputs 4-48);
- ``conversational-histogram.json``: the conversational trace as a histogram
  (prompt and output lengths rounded up to powers of two), the other file form.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
N = 1000


def lognormal(rng, median, sigma, lo, hi, n):
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(int)


def conversational(rng, n):
    return np.stack([lognormal(rng, 256, 0.8, 8, 2048, n), lognormal(rng, 192, 0.7, 8, 1024, n)], 1)


def long_document(rng, n):
    return np.stack([lognormal(rng, 2500, 0.3, 1024, 3584, n), lognormal(rng, 160, 0.5, 16, 512, n)], 1)


def write(name, sizes):
    lines = [json.dumps({"prompt_len": int(p), "output_len": int(o)}) for p, o in sizes]
    (HERE / name).write_text("\n".join(lines) + "\n")


def main() -> None:
    rng = np.random.default_rng(0)
    conv = conversational(rng, N)
    write("conversational.jsonl", conv)
    write("long-document.jsonl", long_document(rng, N))
    mixed = np.concatenate([conversational(rng, N * 4 // 5), long_document(rng, N // 5)])
    write("mixed.jsonl", mixed[rng.permutation(len(mixed))])
    short = np.stack([rng.integers(4, 97, 160), rng.integers(4, 49, 160)], 1)
    long = np.stack([rng.integers(120, 201, 40), rng.integers(4, 49, 40)], 1)
    small = np.concatenate([short, long])
    write("small-mixed.jsonl", small[rng.permutation(len(small))])
    pow2 = (2 ** np.ceil(np.log2(conv))).astype(int)
    bins: dict[tuple[int, int], int] = {}
    for p, o in pow2:
        bins[(int(p), int(o))] = bins.get((int(p), int(o)), 0) + 1
    hist = [{"prompt_len": p, "output_len": o, "count": c} for (p, o), c in sorted(bins.items())]
    (HERE / "conversational-histogram.json").write_text(
        '{"histogram": [\n' + ",\n".join("  " + json.dumps(b) for b in hist) + "\n]}\n")


if __name__ == "__main__":
    main()
