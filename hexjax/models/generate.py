"""Single-device generation: prefill a right-padded ragged batch into a contiguous
KV cache, then decode every new token inside one jitted ``lax.while_loop``."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hexjax.models.config import ModelConfig
from hexjax.models.llama import LlamaStage, init_cache
from hexjax.models.prompts import check_prompts, cut_at_eos
from hexjax.models.sampling import Sampling, request_keys, sample

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
    # row b is request b (prompts[b]): request_key(seed, b, step), the runtime's rule for every plan
    return request_keys(seed, jnp.arange(batch, dtype=jnp.int32), step)


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


def pad_prompts(prompts: Sequence[Sequence[int]], *,
                bucket: int = PROMPT_BUCKET) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded token matrix [B, S] (S a multiple of ``bucket``) and lengths [B] of
    prompts already checked by ``check_prompts``."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    s = -(-int(lengths.max()) // bucket) * bucket
    tokens = np.zeros((len(prompts), s), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = p
    return tokens, lengths


def generate(cfg: ModelConfig, params: dict, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(), *, dtype: Any = jnp.float32, cache_dtype: Any = None,
             eos_id: int | None = None) -> list[list[int]]:
    """New tokens for each prompt (up to ``max_new_tokens``; cut after ``eos_id`` when given).

    Sampled tokens of ``prompts[r]`` are drawn with ``request_key(sampling.seed, r, step)``,
    as every plan of the runtime draws them, so both give the same tokens for a seed.
    """
    prompts = check_prompts(prompts, cfg, max_new_tokens)
    tokens, lengths = pad_prompts(prompts)
    prog = programs(cfg, sampling, dtype, eos_id)
    cache = init_cache(cfg, len(prompts), tokens.shape[1] + max_new_tokens, dtype=cache_dtype or dtype)
    first, cache = prog.prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), cache)
    out, _, _ = prog.decode(params, first, jnp.asarray(lengths), cache, max_new_tokens)
    return cut_at_eos(np.asarray(out).tolist(), eos_id)
