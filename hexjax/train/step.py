"""One pipeline stage's training programs on its own ``(dp, tp)`` mesh.

* ``fwd(params, x) -> y``: x is token ids [mb, S] (first stage) or hidden
  [mb, S, H]; on the last stage ``fwd(params, x, targets) -> (loss_sum, count)``,
  the summed token cross-entropy and the number of counted targets (>= 0).
* ``bwd``: the vjp of the stage, recomputing its forward inside the program,
  returning the parameter gradients added to a donated accumulator and the
  cotangent of the input (None on the first stage, whose input is token ids).
  The last stage's ``bwd`` runs its forward too and also returns the loss;
  its loss is scaled by ``inv_tokens`` (one over the global token count) so
  the accumulated gradients are those of the global mean.
* ``update``: the AdamW update of every key the stage holds, gradients scaled
  by the global clipping factor, parameters, state and gradients donated.

Shapes of the mesh and parameter layout come from ``hexjax.runtime.stage`` and
``hexjax.runtime.sharding``; batches are split over ``dp`` by the input sharding.

Mixed precision: parameters (the master copy), gradients and optimizer state
are kept in ``master_dtype``; ``fwd``/``bwd`` cast the parameters to the
stage's compute dtype (``kind.dtype``) inside the program, so activations and
their cotangents travel in the compute dtype while the vjp through the cast
hands back gradients in the master dtype.  The loss is always float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from hexjax.models import llama
from hexjax.runtime import sharding
from hexjax.runtime.stage import StageKind, stage_module


def token_loss(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy over targets >= 0 (float32) and how many there are."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    mask = targets >= 0
    nll = -jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask).astype(jnp.int32)


def _positions(x: jax.Array) -> jax.Array:
    b, s = x.shape[:2]
    return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))


def stage_apply(kind: StageKind, remat: bool):
    """``f(params, x) -> out`` of a stage (logits on the last), optionally with each layer rematerialised."""
    module = stage_module(kind)
    if not remat:
        return lambda params, x: module.apply({"params": params}, x, _positions(x))[0]

    cfg, dt = kind.cfg, jnp.dtype(kind.dtype)

    def layer_fn(i):
        layer = llama.DecoderLayer(cfg, dt, dt, name=f"layer_{i}")

        @jax.checkpoint
        def run(p, h, pos):
            return layer.apply({"params": p}, h, pos, None)[0]
        return run

    layers = [(f"layer_{i}", layer_fn(i)) for i in range(kind.first_layer, kind.first_layer + kind.num_layers)]
    embed = llama.Embed(cfg.vocab_size, cfg.hidden_size, dt, dt)
    norm = llama.RMSNorm(cfg.rms_norm_eps, dt, dt)
    head = llama.LMHead(cfg.vocab_size, dt, dt)

    def apply(params, x):
        pos = _positions(x)
        h = embed.apply({"params": params["embed"]}, x) if kind.embed else x.astype(dt)
        for name, run in layers:
            h = run(params[name], h, pos)
        if not kind.head:
            return h
        h = norm.apply({"params": params["final_norm"]}, h)
        if cfg.tie_word_embeddings:
            return embed.apply({"params": params["embed"]}, h, method=llama.Embed.attend)
        return head.apply({"params": params["lm_head"]}, h)
    return apply


class StageStep:
    """Shardings and jitted training programs of one stage (see the module docstring)."""

    def __init__(self, kind: StageKind, devices: list, opt: optax.GradientTransformation, remat: bool = False,
                 master_dtype: str | None = None):
        self.kind = kind
        self.compute_dtype = jnp.dtype(kind.dtype)
        self.master_dtype = jnp.dtype(master_dtype or kind.dtype)
        self.devices = list(devices)
        self.mesh = mesh = sharding.make_mesh(self.devices, kind.dp, kind.tp)
        module = stage_module(kind)
        self.param_specs = sharding.param_specs(llama.logical_axes(module), kind.cfg, kind.tp)
        self.param_shardings = sharding.named(mesh, self.param_specs)
        self.abstract_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, self.master_dtype),
                                            llama.abstract_params(module))
        self.keys = list(self.abstract_params)
        self.replicated = NamedSharding(mesh, P())
        self.rows_sharding = NamedSharding(mesh, P("dp", None))
        self.hidden_sharding = NamedSharding(mesh, P("dp", None, None))
        self.input_sharding = self.rows_sharding if kind.embed else self.hidden_sharding
        self.opt = opt
        self.abstract_state = {k: jax.eval_shape(opt.init, self.abstract_params[k]) for k in self.keys}
        from hexjax.train.optimizer import state_shardings
        self.state_shardings = {k: state_shardings(opt, self.abstract_state[k], self.param_shardings[k],
                                                   self.replicated) for k in self.keys}
        f_compute = stage_apply(kind, remat)
        if self.master_dtype == self.compute_dtype:
            f = f_compute
        else:
            cdt = self.compute_dtype

            def f(params, x):
                return f_compute(jax.tree.map(lambda a: a.astype(cdt), params), x)
        ps, rep, inp = self.param_shardings, self.replicated, self.input_sharding

        if kind.head:
            def fwd(params, x, targets):
                return token_loss(f(params, x), targets)
            self.fwd = jax.jit(fwd, in_shardings=(ps, inp, self.rows_sharding), out_shardings=(rep, rep))

            def bwd(params, x, targets, inv_tokens, acc):
                def scaled(p, xx):
                    loss, count = token_loss(f(p, xx), targets)
                    return loss * inv_tokens, (loss, count)
                if kind.embed:
                    (_, (loss, count)), g = jax.value_and_grad(scaled, has_aux=True)(params, x)
                    dx = None
                else:
                    (_, (loss, count)), (g, dx) = jax.value_and_grad(scaled, argnums=(0, 1), has_aux=True)(params, x)
                acc = jax.tree.map(jnp.add, acc, g)
                return acc, dx, loss, count
            out = (ps, None if kind.embed else self.hidden_sharding, rep, rep)
            self.bwd = jax.jit(bwd, donate_argnums=(4,), in_shardings=(ps, inp, self.rows_sharding, rep, ps),
                               out_shardings=out)
        else:
            self.fwd = jax.jit(f, in_shardings=(ps, inp), out_shardings=self.hidden_sharding)

            def bwd(params, x, cot, acc):
                if kind.embed:
                    _, pull = jax.vjp(lambda p: f(p, x), params)
                    (g,), dx = pull(cot), None
                else:
                    _, pull = jax.vjp(f, params, x)
                    g, dx = pull(cot)
                return jax.tree.map(jnp.add, acc, g), dx
            out = (ps, None if kind.embed else self.hidden_sharding)
            self.bwd = jax.jit(bwd, donate_argnums=(3,), in_shardings=(ps, inp, self.hidden_sharding, ps),
                               out_shardings=out)

        shapes = self.abstract_params
        self.zeros = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes),
                             out_shardings=ps)
        ss = self.state_shardings
        self.init_state = jax.jit(lambda p: {k: opt.init(p[k]) for k in p}, in_shardings=(ps,), out_shardings=ss)

        def update(params, state, grads, scale):
            new_p, new_s = {}, {}
            for k in params:
                g = jax.tree.map(lambda a: a * scale.astype(a.dtype), grads[k])
                u, new_s[k] = opt.update(g, state[k], params[k])
                new_p[k] = optax.apply_updates(params[k], u)
            return new_p, new_s
        self.update = jax.jit(update, donate_argnums=(0, 1), in_shardings=(ps, ss, ps, rep),
                              out_shardings=(ps, ss))

    def sum_squares(self, grads: dict, keys) -> jax.Array:
        """Sum of squares of the gradients of ``keys`` (a scalar on this mesh)."""
        return _sum_squares({k: grads[k] for k in keys})

    def place_params(self, params: dict) -> dict:
        """This stage's sub-tree of a full parameter tree, cast to the master dtype and placed on its mesh.

        Goes through host copies, so the placed arrays never alias the caller's (the update donates them)."""
        dt = self.master_dtype
        sub = {k: jax.tree.map(lambda a: np.asarray(a).astype(dt), params[k]) for k in self.keys}
        return jax.device_put(sub, self.param_shardings)


@jax.jit
def _sum_squares(tree):
    return sum((jnp.sum(jnp.square(a.astype(jnp.float32))) for a in jax.tree.leaves(tree)), jnp.float32(0))


@functools.partial(jax.jit, donate_argnums=())
def tree_sum(trees):
    """Element-wise sum of equally structured, equally placed trees (in list order)."""
    return jax.tree.map(lambda *xs: functools.reduce(jnp.add, xs), *trees)


@functools.lru_cache(maxsize=64)
def stage_step(kind: StageKind, devices: tuple, config) -> StageStep:
    """A stage's programs for a ``TrainConfig``, shared by every trainer with the same stage and devices."""
    from hexjax.train.optimizer import make_optimizer
    return StageStep(kind, list(devices), make_optimizer(config), config.remat, config.master_dtype)
