"""Next-token selection: greedy, or temperature / top-k / top-p sampling with seeded keys."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hexjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits."""

    temperature: float = 0.0
    """Softmax temperature; 0 picks the most likely token (greedy)."""
    top_k: int = 0
    """Keep only the k most likely tokens (ties at the k-th logit kept); 0 turns it off."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p; 1 turns it off."""
    seed: int = 0
    """Seed of the random stream: token ``step`` of request ``r`` (the prompt's index in the call)
    is drawn with ``request_key(seed, r, step)``."""
    min_p: float = 0.0
    """Then drop tokens less likely than min_p times the most likely one; 0 turns it off."""

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ConfigError(f"Sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"Sampling.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"Sampling.top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ConfigError(f"Sampling.min_p must be in [0, 1] (0 = off), got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def step_key(seed: int | jax.Array, step: int | jax.Array) -> jax.Array:
    """The random key for generated token number ``step`` (0 = first new token).

    ``fold_in(key(seed), step)``: a pure function of (seed, step), so a token's draw
    does not depend on how the steps were split into calls or pipelined.
    """
    return jax.random.fold_in(jax.random.key(seed), step)


def request_key(seed: int | jax.Array, request: int | jax.Array, step: int | jax.Array) -> jax.Array:
    """The random key of generated token ``step`` of request ``request``.

    ``fold_in(step_key(seed, step), request)``, with ``request`` the prompt's
    index in the call (``prompts[request]``).  Single-device generation and
    every plan of the runtime use it, so a seed gives the same sampled tokens
    whichever replica, microbatch or row serves a request.
    """
    return jax.random.fold_in(step_key(seed, step), request)


def request_keys(seed: int | jax.Array, requests: jax.Array, step: int | jax.Array) -> jax.Array:
    """``request_key`` of each of ``requests`` [B] for one ``step``: keys [B] for ``sample``."""
    return jax.vmap(lambda r: request_key(seed, r, step))(jnp.asarray(requests, jnp.int32))


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Temperature-scaled float32 logits [B,V] with tokens outside top-k / top-p set to -inf.

    Order as Hugging Face: temperature, then top-k, then top-p over what top-k kept, then min-p.
    """
    x = logits.astype(jnp.float32) / jnp.float32(sampling.temperature if sampling.temperature > 0 else 1.0)
    neg = jnp.float32(-jnp.inf)
    if 0 < sampling.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, sampling.top_k)[0][..., -1:]
        x = jnp.where(x < kth, neg, x)
    if sampling.top_p < 1.0:
        sorted_x = jnp.sort(x, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_x, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep = before < sampling.top_p  # the most likely token is always kept
        cutoff = jnp.min(jnp.where(keep, sorted_x, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < cutoff, neg, x)
    if sampling.min_p > 0:   # p_i < min_p * p_max  <=>  x_i < x_max + log(min_p)
        x = jnp.where(x < jnp.max(x, axis=-1, keepdims=True) + jnp.log(jnp.float32(sampling.min_p)), neg, x)
    return x


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Next tokens [B] int32 from logits [B,V]; ``key`` is ignored when greedy.

    ``key`` is one key (the rows draw independent noise from it) or one key per row
    [B]; with per-row keys a row's token depends only on its key and its logits, not
    on which other sequences share the batch.
    """
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = filter_logits(logits, sampling)
    if key.ndim == 1:
        return jax.vmap(lambda k, row: jax.random.categorical(k, row))(key, x).astype(jnp.int32)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)
