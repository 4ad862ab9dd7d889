"""AdamW with a warmup + cosine schedule, one optax state per top-level parameter key.

The optimizer state is kept per global key (``layer_3``, ``embed``, ...), not
per stage, so it is sharded like that key's parameters on whichever stage holds
them and a checkpoint of it restores onto any other plan.  Gradient clipping is
not part of the optax chain: the global norm spans stages on different meshes,
so the trainer computes it (``clip_scale``) and scales the gradients before the
update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from hexjax.train.config import TrainConfig


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Learning rate per step: linear warmup, then cosine decay (or constant when ``decay_steps`` is 0)."""
    if cfg.decay_steps:
        return optax.warmup_cosine_decay_schedule(
            init_value=cfg.lr * cfg.init_lr_ratio, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
            decay_steps=cfg.decay_steps, end_value=cfg.lr * cfg.end_lr_ratio)
    if cfg.warmup_steps:
        return optax.join_schedules(
            [optax.linear_schedule(cfg.lr * cfg.init_lr_ratio, cfg.lr, cfg.warmup_steps),
             optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])
    return optax.constant_schedule(cfg.lr)


def _decay_mask(params):
    return jax.tree.map(lambda a: a.ndim >= 2, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The AdamW transform applied to one key's (already clipped) gradients."""
    return optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mask=None if cfg.decay_norms else _decay_mask)


def clip_scale(norm: jax.Array, clip_norm: float | None) -> jax.Array:
    """Factor applied to every gradient so their global norm is at most ``clip_norm``
    (as ``optax.clip_by_global_norm``: 1 below the threshold)."""
    if clip_norm is None:
        return jnp.ones_like(norm)
    return jnp.where(norm < clip_norm, jnp.ones_like(norm), clip_norm / norm)


def state_shardings(opt: optax.GradientTransformation, abstract_state, param_shardings, replicated):
    """Shardings of one key's optimizer state: moments like the parameters, counters replicated."""
    return optax.tree_map_params(opt, lambda _, s: s, abstract_state, param_shardings,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
