"""Single-device generation: prefill a right-padded ragged batch into a contiguous
KV cache, then decode every new token inside one jitted ``lax.while_loop``."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hexjax.errors import ConfigError
from hexjax.models.config import ModelConfig
from hexjax.models.llama import LlamaStage, init_cache
from hexjax.models.sampling import Sampling, sample, step_key

# prompt lengths are padded up to a multiple of this so that nearby lengths share a compile
PROMPT_BUCKET = 16


class Programs(NamedTuple):
    """The two compiled pieces of generation (jitted; the cache argument is donated)."""

    prefill: Callable
    """``prefill(params, tokens[B,S], lengths[B], cache) -> (first_tokens[B], cache)``."""
    decode: Callable
    """``decode(params, first_tokens[B], lengths[B], cache, num_new) -> (tokens[B,num_new], count, cache)``;
    ``num_new`` is static; ``count`` is how many tokens were produced before every row hit eos."""


def _row_keys(seed: int, step, batch: int) -> jax.Array:
    # every row uses step_key(seed, step): a prompt gets the same tokens alone or batched
    return jnp.broadcast_to(step_key(seed, step), (batch,))


@functools.lru_cache(maxsize=32)
def programs(cfg: ModelConfig, sampling: Sampling, dtype: Any = jnp.float32,
             eos_id: int | None = None) -> Programs:
    """Jitted prefill and decode for one model configuration and sampling setting."""
    stage = LlamaStage(cfg, dtype=dtype, param_dtype=dtype)

    def prefill(params, tokens, lengths, cache):
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        logits, cache = stage.apply({"params": params}, tokens, pos, cache, logits_index=lengths - 1)
        return sample(logits, _row_keys(sampling.seed, 0, tokens.shape[0]), sampling), cache

    def decode(params, first, lengths, cache, num_new):
        out = jnp.zeros((first.shape[0], num_new), jnp.int32).at[:, 0].set(first)
        done = jnp.zeros_like(first, bool) if eos_id is None else first == eos_id

        def cond(state):
            i, _, _, _, done = state
            return (i < num_new) & ~jnp.all(done)

        def body(state):
            i, tok, cache, out, done = state
            # the token generated at step i-1 sits at position length + i - 1
            pos = (lengths + i - 1)[:, None]
            logits, cache = stage.apply({"params": params}, tok[:, None], pos, cache)
            nxt = sample(logits[:, 0], _row_keys(sampling.seed, i, first.shape[0]), sampling)
            if eos_id is not None:
                done = done | (nxt == eos_id)
            return i + 1, nxt, cache, out.at[:, i].set(nxt), done

        i, _, cache, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), first, cache, out, done))
        return out, i, cache

    return Programs(jax.jit(prefill, donate_argnums=3),
                    jax.jit(decode, donate_argnums=3, static_argnums=4))


def pad_prompts(prompts: Sequence[Sequence[int]], vocab_size: int,
                bucket: int = PROMPT_BUCKET) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded token matrix [B, S] (S a multiple of ``bucket``) and lengths [B]."""
    if not prompts:
        raise ConfigError("generate: no prompts given")
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() == 0:
        raise ConfigError(f"generate: prompt {int(np.argmin(lengths))} is empty; every prompt needs a token")
    s = -(-int(lengths.max()) // bucket) * bucket
    tokens = np.zeros((len(prompts), s), np.int32)
    for b, p in enumerate(prompts):
        row = np.asarray(p, np.int64)
        if row.min() < 0 or row.max() >= vocab_size:
            raise ConfigError(f"generate: prompt {b} has token ids outside [0, {vocab_size})")
        tokens[b, :len(p)] = row
    return tokens, lengths


def generate(cfg: ModelConfig, params: dict, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(), *, dtype: Any = jnp.float32, cache_dtype: Any = None,
             eos_id: int | None = None) -> list[list[int]]:
    """New tokens for each prompt (up to ``max_new_tokens``; cut after ``eos_id`` when given)."""
    if max_new_tokens <= 0:
        raise ConfigError(f"generate: max_new_tokens must be positive, got {max_new_tokens}")
    tokens, lengths = pad_prompts(prompts, cfg.vocab_size)
    needed = int(lengths.max()) + max_new_tokens
    if needed > cfg.max_position_embeddings:
        raise ConfigError(
            f"generate: the longest prompt ({int(lengths.max())}) plus max_new_tokens ({max_new_tokens}) "
            f"exceeds the model's max_position_embeddings ({cfg.max_position_embeddings})")
    prog = programs(cfg, sampling, dtype, eos_id)
    cache = init_cache(cfg, len(prompts), tokens.shape[1] + max_new_tokens, dtype=cache_dtype or dtype)
    first, cache = prog.prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), cache)
    out, _, _ = prog.decode(params, first, jnp.asarray(lengths), cache, max_new_tokens)
    result = np.asarray(out).tolist()
    if eos_id is not None:
        result = [row[:row.index(eos_id) + 1] if eos_id in row else row for row in result]
    return result
