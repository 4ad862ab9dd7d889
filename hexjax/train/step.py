"""One pipeline stage's training programs on its own ``(dp, tp)`` mesh.

* ``fwd(params, x) -> (y, stash)``: x is token ids [mb, S] (first stage) or
  hidden [mb, S, H]; ``stash`` is the list of activations the stage's backward
  needs (the vjp residuals that depend on ``x``), kept by the pipeline until
  that microbatch's backward. On the last stage ``fwd(params, x, targets) ->
  (loss_sum, count)``, the summed token cross-entropy and the number of counted
  targets (>= 0); ``infer(params, x) -> y`` is the forward alone (evaluation).
* ``bwd``: the vjp of the stage from its stash, returning the parameter
  gradients added to a donated accumulator and the cotangent of the input (None
  on the first stage, whose input is token ids). Nothing of the forward's
  matmuls is recomputed: without remat the stash holds every matmul's output
  (``jax.checkpoint_policies.dots_saveable``; norms, rotary embedding, softmax
  and SiLU, all elementwise, are recomputed from them), with ``remat`` it holds
  the inputs of each layer's attention and MLP halves, and each half is run
  again inside the backward (``jax.checkpoint`` per half) and differentiated
  before the half below is recomputed, so only one half's values are live at a
  time. Residuals that do not depend on ``x`` (the
  weights, their compute-dtype casts, position tables, the causal mask) are
  not stashed but rebuilt from the parameters inside ``bwd``.
  The last stage's ``bwd`` fuses its forward and backward (1F1B runs them back
  to back there) and also returns the loss; its loss is scaled by
  ``inv_tokens`` (one over the global token count) so the accumulated
  gradients are those of the global mean.
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
from typing import Any

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


def train_pieces(kind: StageKind, remat: bool, compute_dtype) -> list[tuple[tuple[str, ...], Any]]:
    """The stage as a chain of ``(keys, fn(params, h, positions) -> h)``: the embedding (first stage), each decoder
    layer, and on the last stage the final norm and LM head (``fn`` returns logits). ``params`` is the
    master tree; each piece casts its weights to ``compute_dtype`` itself, so the casts are rebuilt in the
    backward rather than stashed. Layers save their matmul outputs for the backward
    (``dots_saveable``); with ``remat`` each layer is two pieces, its attention and its MLP half, that
    save nothing but their input (``_layer_halves``)."""
    cfg, dt = kind.cfg, jnp.dtype(compute_dtype)
    policy = None if remat else jax.checkpoint_policies.dots_saveable
    embed = llama.Embed(cfg.vocab_size, cfg.hidden_size, dt, dt)

    def cast(tree):
        return jax.tree.map(lambda a: a.astype(dt), tree)

    pieces: list = []
    if kind.embed:
        pieces.append((("embed",), lambda p, x, pos: embed.apply({"params": cast(p["embed"])}, x)))
    for i in range(kind.first_layer, kind.first_layer + kind.num_layers):
        name, layer = f"layer_{i}", llama.DecoderLayer(cfg, dt, dt, name=f"layer_{i}")
        if remat:
            pieces.extend(_layer_halves(cfg, dt, name, cast))
            continue

        def run(p, h, pos, name=name, layer=layer):
            return layer.apply({"params": cast(p[name])}, h.astype(dt), pos, None)[0]
        pieces.append(((name,), jax.checkpoint(run, policy=policy)))
    if kind.head:
        norm, lm_head = llama.RMSNorm(cfg.rms_norm_eps, dt, dt), llama.LMHead(cfg.vocab_size, dt, dt)
        tied = cfg.tie_word_embeddings

        def head(p, h, pos):
            h = norm.apply({"params": cast(p["final_norm"])}, h)
            if tied:
                return embed.apply({"params": cast(p["embed"])}, h, method=llama.Embed.attend)
            return lm_head.apply({"params": cast(p["lm_head"])}, h)
        pieces.append((("final_norm", "embed") if tied else ("final_norm", "lm_head"), head))
    return pieces


def _layer_halves(cfg, dt, name, cast):
    """The pieces of a rematerialised decoder layer: its attention half ``x + attn(norm(x))`` and its MLP
    half ``h + mlp(norm(h))``, as ``llama.DecoderLayer`` computes them, each under ``jax.checkpoint``.

    One piece per layer would recompute the whole layer and leave XLA free to put the MLP's weight
    gradients after the attention's backward, keeping the MLP's recomputed values (four ``f``-wide
    float32 values) live beside the attention's score-sized ones. As two pieces the MLP half is
    differentiated first and its values are dead when the attention half is recomputed, at the cost of
    stashing the MLP's input too (``h`` per token and layer)."""
    attn_norm = llama.RMSNorm(cfg.rms_norm_eps, dt, dt)
    attn = llama.Attention(cfg, dt, dt)
    mlp_norm = llama.RMSNorm(cfg.rms_norm_eps, dt, dt)
    mlp = llama.MLP(cfg, dt, dt)

    def attention(p, h, pos):
        q = cast(p[name])
        h = h.astype(dt)
        y = attn_norm.apply({"params": q["attn_norm"]}, h)
        return h + attn.apply({"params": q["attn"]}, y, pos, None)[0]

    def feed_forward(p, h, pos):
        q = cast(p[name])
        y = mlp_norm.apply({"params": q["mlp_norm"]}, h)
        return h + mlp.apply({"params": q["mlp"]}, y)
    return [((name,), jax.checkpoint(attention)), ((name,), jax.checkpoint(feed_forward))]


def _piece_vjp(fn, p, h, pos):
    """``fn``'s output and vjp at ``(p, h)`` (``p`` alone when ``h`` holds token ids)."""
    if jnp.issubdtype(h.dtype, jnp.floating):
        return jax.vjp(lambda q, hh: fn(q, hh, pos), p, h)
    return jax.vjp(lambda q: fn(q, h, pos), p)


def _piece_residuals(fn, p, h, pos):
    """``(y, leaves of fn's vjp)``: the piece's output and everything its backward reads."""
    y, pull = _piece_vjp(fn, p, h, pos)
    return y, jax.tree.leaves(pull)


def chain_forward(pieces, params, x):
    """Run the pieces on ``x``; returns the output and, per piece, the residuals that depend on its input
    (the stash: weights, their casts, positions and masks are rebuilt by ``chain_backward``)."""
    h, stash, pos = x, [], _positions(x)
    for keys, fn in pieces:
        p = {k: params[k] for k in keys}
        y, leaves = _piece_residuals(fn, p, h, pos)
        stash.append([a for a, k in zip(leaves, _depends_on_input(fn, p, h, pos)) if k])
        h = y
    return h, stash


def chain_backward(pieces, params, x, stash, cot, acc, extra=None):
    """The vjp of ``chain_forward``'s pieces from their stash, each piece's parameter gradients added to the
    accumulator ``acc`` (plus ``extra[k]`` where given, e.g. a tied embedding's gradient from the head):
    ``(new acc, cotangent of x)``.

    Pieces are taken last to first, one at a time: each piece's residuals (with remat, its smallest
    weight) are made to depend on the cotangent arriving from the piece above, and that cotangent on the
    piece above's accumulated gradients and computed once (``after``, ``cotangent_after``). XLA
    schedules a program as a whole and would otherwise rebuild (with remat, recompute) every layer's
    values as soon as the stash exists and put the weight gradients off until the whole cotangent chain
    is done, keeping every layer's temporaries live at once."""
    pos = _positions(x)
    shapes = [x]
    for keys, fn in pieces[:-1]:     # each piece's input, for shapes only
        shapes.append(jax.eval_shape(fn, {k: params[k] for k in keys}, shapes[-1], pos))
    acc, extra = dict(acc), extra or {}
    for (keys, fn), st, h in reversed(list(zip(pieces, stash, shapes))):
        p = {k: params[k] for k in keys}
        # the input only sets shapes here: every residual that depends on it comes from the stash, and
        # XLA drops the forward's work on the placeholder as dead code
        hz = jnp.zeros(h.shape, h.dtype)
        _, pull = _piece_vjp(fn, p, hz, pos)
        leaves, tree = jax.tree.flatten(pull)
        keep = _depends_on_input(fn, p, hz, pos)
        own = {id(a) for a in jax.tree.leaves(p)}
        weights = [i for i, a in enumerate(leaves) if id(a) in own and jnp.issubdtype(a.dtype, jnp.floating)]
        if jnp.issubdtype(h.dtype, jnp.floating) and weights and all(a.shape == h.shape for a in st):
            # rematerialised (the stash is the input alone): the piece's smallest weight (its norm's scale)
            # carries the wait, so everything rebuilt through the weights waits; a tied float32 input would
            # be copied whole, as the norm's reduction reads it unfused. A narrower input is tied as well:
            # the norm reads a float32 copy of it anyway, which XLA:CPU would otherwise make early (in the
            # last stage's program, during the forward) and keep until this piece's backward
            leaves = list(leaves)
            small = min(weights, key=lambda i: leaves[i].size)
            leaves[small] = after(leaves[small], cot)
            it = iter(st if st[0].dtype == jnp.float32 else after(list(st), cot))
        else:
            it = iter(after(list(st), cot))
        pull = jax.tree.unflatten(tree, [next(it) if k else a for a, k in zip(leaves, keep)])
        out = pull(cot)
        g, cot = (out[0], out[1]) if len(out) == 2 else (out[0], None)
        for k, v in g.items():
            if k in extra:
                v = jax.tree.map(jnp.add, v, extra[k])
            acc[k] = jax.tree.map(jnp.add, acc[k], v)
        if cot is not None:
            cot = cotangent_after(cot, [acc[k] for k in g])
    return acc, cot


def after(tree, dep):
    """``tree`` with each floating leaf made to depend on every leaf of ``dep``, its value unchanged.

    Adds zero times the float32 sum of ``dep`` (exact while that sum is finite; a non-finite gradient
    poisons the step's clipping norm anyway). XLA keeps it: a float ``x * 0`` is not folded (NaN), whereas
    an ``optimization_barrier`` is removed before XLA:CPU schedules and so orders nothing."""
    zero = _zero_after(dep)
    if zero is None:
        return tree

    def tie(a):
        return a + zero.astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
    return jax.tree.map(tie, tree)


def cotangent_after(cot, dep):
    """``after`` for the cotangent handed from one piece's backward to the next: also materialised once.

    The cotangent is a sum of parts (the residual stream's, each matmul's input gradient); an added zero
    would let XLA fuse that sum into each consumer, keeping the parts, and the next piece's parts with them,
    live down the whole chain. The remainder by infinity (``x`` itself for finite ``x``) is an op XLA
    counts as expensive and does not duplicate into several consumers, so the sum is computed once."""
    zero = _zero_after(dep)
    if zero is None:
        return cot
    inf = zero + jnp.inf

    def tie(a):
        return jax.lax.rem(a, inf.astype(a.dtype)) if jnp.issubdtype(a.dtype, jnp.floating) else a
    return jax.tree.map(tie, cot)


def _zero_after(dep):
    """Zero times the float32 sum of ``dep``'s floating leaves (None when it has none)."""
    deps = [a for a in jax.tree.leaves(dep) if jnp.issubdtype(a.dtype, jnp.floating)]
    if not deps:
        return None
    return sum(jnp.sum(a.astype(jnp.float32)) for a in deps) * 0


def compiler_options(platform: str, remat: bool = False) -> dict:
    """XLA options of a stage's forward and backward programs on ``platform`` (``remat``: rematerialised).

    XLA:CPU's default scheduler orders a program for parallelism across its thread pool and starts every
    layer's elementwise values (the softmax rebuilt from the scores, SiLU, casts) as soon as their inputs
    exist, keeping all of them live at once, data dependencies (``after``) notwithstanding. Its
    memory-minimising schedule runs the backward layer by layer, as the cost model counts it
    (``hexjax.search.train_cost``): with both, the ``small`` model's one-stage backward at 16 x 128 tokens
    holds 183 MiB of temporaries instead of 398 (float32), 51 with remat (and CSE off, below). It costs
    speed on CPU: ``benchmarks/train_cpu.py`` ran the two-replica plan's step in about 0.91 s instead of 0.63 s
    (2 cores at load 7.5). The option name is XLA:CPU's; GPU backends schedule with a memory limit already.

    With remat, common-subexpression elimination is off too: ``jax.checkpoint`` fences the recomputed
    forward with optimisation barriers, which XLA:CPU expands before CSE, so the last stage's fused
    program would otherwise merge a layer's recomputation with its forward and keep the forward's
    values (the weights' casts, the norms' float32 inputs) live from the forward to that layer's backward.
    """
    if platform != "cpu":
        return {}
    opts = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    if remat:
        opts["xla_disable_hlo_passes"] = "cse"
    return opts if _accepted(tuple(opts.items())) else {}


@functools.lru_cache(maxsize=None)
def _accepted(opts: tuple) -> bool:
    """Whether this jaxlib's XLA:CPU knows the options (an unknown one fails every compile)."""
    try:
        jax.jit(lambda a: a + 1, compiler_options=dict(opts)).lower(np.float32(0)).compile()
        return True
    except Exception:     # noqa: BLE001 -- any rejection means: schedule as XLA does by default
        return False


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
        jit = functools.partial(jax.jit, compiler_options=compiler_options(self.devices[0].platform, remat) or None)
        self.infer = jit(f, in_shardings=(ps, inp), out_shardings=None if kind.head else self.hidden_sharding)
        pieces = train_pieces(kind, remat, self.compute_dtype)

        if kind.head:
            def fwd(params, x, targets):
                return token_loss(f(params, x), targets)
            self.fwd = jit(fwd, in_shardings=(ps, inp, self.rows_sharding), out_shardings=(rep, rep))

            body, head = pieces[:-1], pieces[-1]

            def bwd(params, x, targets, inv_tokens, acc):
                h, stash = chain_forward(body, params, x)

                def scaled(p, hh):
                    loss, count = token_loss(head[1](p, hh, None), targets)
                    return loss * inv_tokens, (loss, count)
                hp = {k: params[k] for k in head[0]}
                (_, (loss, count)), (g, cot) = jax.value_and_grad(scaled, argnums=(0, 1), has_aux=True)(hp, h)
                # a tied embedding has a gradient from both ends: the head's joins the embedding piece's
                shared = {k: v for k, v in g.items() if any(k in keys for keys, _ in body)}
                acc = dict(acc, **{k: jax.tree.map(jnp.add, acc[k], v) for k, v in g.items() if k not in shared})
                # the body's backward waits for the head's gradients and loss, so the logits can go first
                done = [acc[k] for k in g if k not in shared] + [loss]
                acc, dx = chain_backward(body, params, x, stash, cotangent_after(cot, done), acc, shared)
                return acc, None if kind.embed else dx, loss, count
            out = (ps, None if kind.embed else self.hidden_sharding, rep, rep)
            self.bwd = jit(bwd, donate_argnums=(4,), in_shardings=(ps, inp, self.rows_sharding, rep, ps),
                           out_shardings=out)
        else:
            # the stash keeps whatever layout XLA gives each residual (None: unconstrained)
            self.fwd = jit(lambda params, x: chain_forward(pieces, params, x), in_shardings=(ps, inp),
                           out_shardings=(self.hidden_sharding, None))

            def bwd(params, stash, cot, acc):
                x = jnp.zeros(cot.shape[:2], jnp.int32) if kind.embed else jnp.zeros(cot.shape, cot.dtype)
                acc, dx = chain_backward(pieces, params, x, stash, cot, acc)
                return acc, None if kind.embed else dx
            out = (ps, None if kind.embed else self.hidden_sharding)
            self.bwd = jit(bwd, donate_argnums=(3,), in_shardings=(ps, None, self.hidden_sharding, ps),
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


def _depends_on_input(fn, params, x, pos) -> list[bool]:
    """For each residual of the piece ``fn`` (``_piece_residuals``), whether its value depends on ``x``:
    data flow over the traced program, a nested call's outputs depending on ``x`` when any of its inputs
    does. Values that depend only on the parameters and positions can be rebuilt."""
    from jax.extend.core import Var

    def shape(a):
        return jax.ShapeDtypeStruct(a.shape, a.dtype)
    closed = jax.make_jaxpr(lambda p, h, q: _piece_residuals(fn, p, h, q))(
        jax.tree.map(shape, params), shape(x), shape(pos))
    jaxpr = closed.jaxpr
    dep = {jaxpr.invars[len(jax.tree.leaves(params))]}
    for eqn in jaxpr.eqns:
        if any(isinstance(v, Var) and v in dep for v in eqn.invars):
            dep.update(eqn.outvars)
    return [isinstance(v, Var) and v in dep for v in jaxpr.outvars[1:]]


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
