"""Requests in and tokens out, shared by single-device generation and the runtime:
prompt validation and cutting generated sequences at the end-of-sequence token."""

from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np

from hexjax.errors import ConfigError
from hexjax.models.config import ModelConfig


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _token_list(i: int, p) -> list[int]:
    """Prompt ``i`` as a list of Python ints (numpy and JAX arrays of integers accepted)."""
    if hasattr(p, "dtype") and hasattr(p, "shape"):   # an array
        arr = np.asarray(p)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ConfigError(f"generate: prompt {i} must be a 1-D sequence of integer token ids, got an array "
                              f"of shape {arr.shape} and dtype {arr.dtype}")
        return arr.tolist()
    if isinstance(p, (str, bytes)) or not hasattr(p, "__iter__"):
        raise ConfigError(
            f"generate: prompt {i} is not a sequence of token ids but {type(p).__name__} {p!r:.40}; pass a "
            "list of prompts, e.g. [[1, 2, 3]] for one prompt")
    row = list(p)
    odd = [t for t in row if not _is_int(t)]
    if odd:
        raise ConfigError(f"generate: prompt {i} has non-integer token ids {odd[:3]}")
    return [int(t) for t in row]


def check_prompts(prompts: Sequence[Sequence[int]], cfg: ModelConfig, max_new_tokens: int) -> list[list[int]]:
    """The prompts as lists of Python ints, or a ``ConfigError`` saying what is wrong.

    Refused: ``max_new_tokens`` that is not a positive integer, no prompts, a
    prompt that is not a sequence of integers (such as one flat list of ids
    given instead of a list of prompts), an empty prompt, token ids outside
    ``[0, vocab_size)``, and a prompt whose length plus ``max_new_tokens``
    exceeds the model's ``max_position_embeddings``.
    """
    if not _is_int(max_new_tokens) or max_new_tokens <= 0:
        raise ConfigError(f"generate: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__"):
        raise ConfigError(f"generate: prompts must be a list of token-id lists, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ConfigError("generate: no prompts given; pass a list of token-id lists, e.g. [[1, 2, 3]]")
    out = []
    for i, p in enumerate(prompts):
        row = _token_list(i, p)
        if not row:
            raise ConfigError(f"generate: prompt {i} is empty; every prompt needs at least one token")
        bad = [t for t in row if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ConfigError(
                f"generate: prompt {i} has token ids {bad[:3]} outside [0, {cfg.vocab_size}) (the model's vocabulary)")
        if len(row) + max_new_tokens > cfg.max_position_embeddings:
            raise ConfigError(
                f"generate: prompt {i} ({len(row)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
                f"the model's max_position_embeddings ({cfg.max_position_embeddings}); shorten the prompt or "
                "ask for fewer new tokens")
        out.append(row)
    return out


def eos_lengths(rows: Sequence[Sequence[int]], eos_id: int | None) -> list[int]:
    """How many tokens of each generated row to keep: up to and including its first ``eos_id``
    (the whole row when it has none, or when ``eos_id`` is None).

    Use the lengths to cut anything aligned with the tokens, such as per-step
    logits: ``logits[i][:n]``.
    """
    out = []
    for row in rows:
        row = [int(t) for t in row]
        out.append(row.index(eos_id) + 1 if eos_id is not None and eos_id in row else len(row))
    return out


def cut_at_eos(rows: Sequence[Sequence[int]], eos_id: int | None) -> list[list[int]]:
    """Each row as a list of ints, cut after its first ``eos_id`` (unchanged when None)."""
    return [[int(t) for t in row][:n] for row, n in zip(rows, eos_lengths(rows, eos_id))]
