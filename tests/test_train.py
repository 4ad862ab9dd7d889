"""Training over a plan equals single-device training (8 virtual CPU devices, fp32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hexjax.errors import ConfigError, PlanError
from hexjax.models.config import ModelConfig
from hexjax.models.llama import LlamaStage, init_params
from hexjax.plan import Plan, Replica, Stage
from hexjax.train import TrainConfig, Trainer, one_f_one_b
from hexjax.train.schedule import max_live_activations

CFG = ModelConfig("t", vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=64)
TCFG = TrainConfig(lr=1e-2, warmup_steps=1, decay_steps=6, b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=0.5)
BATCH, SEQ = 8, 16


def plan(*replicas) -> Plan:
    return Plan("t", "", tuple(Replica(tuple(Stage(*s) for s in r)) for r in replicas))


# (layers, devices, dp, tp) per stage, per replica; and microbatches
PLANS = {
    "one-device": (plan([((0, 4), (0,))]), 4),     # 2-row microbatches, as the random plans below
    "uneven-tp1-2-4": (plan([((0, 1), (0,)), ((1, 3), (1, 2), 1, 2), ((3, 4), (3, 4, 5, 6), 1, 4)]), 4),
    "two-replicas": (plan([((0, 1), (0, 1), 1, 2), ((1, 4), (2, 3, 4, 5), 2, 2)],
                          [((0, 3), (6,)), ((3, 4), (7,))]), 2),
}
SLOW_PLANS = {
    "dp2": (plan([((0, 2), (0, 1), 2, 1), ((2, 4), (2, 3, 4, 5), 2, 2)]), 2, {}),
    "four-stages-m4": (plan([((0, 1), (0,)), ((1, 2), (1,)), ((2, 3), (2,)), ((3, 4), (3,))]), 4, {}),
    "three-replicas-rows-2-4-2": (plan([((0, 4), (0, 1, 2, 3), 1, 4)], [((0, 2), (4, 5), 2, 1), ((2, 4), (6,))],
                                       [((0, 4), (7,))]), 1, {"replica_rows": (2, 4, 2)}),
    "two-replicas-rows-2-6": (plan([((0, 1), (0, 1), 1, 2), ((1, 4), (2, 3, 4, 5), 2, 2)],
                                   [((0, 3), (6,)), ((3, 4), (7,))]), 1, {"replica_rows": (2, 6)}),
}


def batches(n, seed=0, batch=BATCH, seq=SEQ, vocab=CFG.vocab_size):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, (batch, seq + 1)) for _ in range(n)]


def reference(cfg, params, tcfg, data):
    """Plain single-device optax loop over the whole model (independent of hexjax.train)."""
    model = LlamaStage(cfg)

    def loss_fn(p, batch):
        x, y = batch[:, :-1], batch[:, 1:]
        pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape)
        logits = model.apply({"params": p}, x, pos)[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    sched = optax.warmup_cosine_decay_schedule(0.0, tcfg.lr, tcfg.warmup_steps, tcfg.decay_steps,
                                               tcfg.lr * tcfg.end_lr_ratio)
    opt = optax.chain(optax.clip_by_global_norm(tcfg.clip_norm),
                      optax.adamw(sched, tcfg.b1, tcfg.b2, tcfg.eps, weight_decay=tcfg.weight_decay,
                                  mask=lambda p: jax.tree.map(lambda a: a.ndim >= 2, p)))
    state = opt.init(params)

    @jax.jit
    def step(p, s, batch):
        loss, g = jax.value_and_grad(loss_fn)(p, batch)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    losses = []
    for b in data:
        params, state, loss = step(params, state, jnp.asarray(b))
        losses.append(float(loss))
    return losses, params


def rel_diff(a, b) -> float:
    """Largest per-leaf max|a - b| / max|b| over two trees."""
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / max(np.max(np.abs(np.asarray(y))), 1e-30))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def rel_norm(a, b) -> float:
    """Largest per-leaf ||a - b|| / ||b|| (L2 over the leaf) over two trees."""
    return max(float(np.linalg.norm(np.asarray(x, np.float64) - np.asarray(y, np.float64))
                     / max(np.linalg.norm(np.asarray(y, np.float64)), 1e-30))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def start_params():
    return init_params(LlamaStage(CFG), jax.random.key(0))


@pytest.fixture(scope="module")
def ref_run(start_params):
    return reference(CFG, start_params, TCFG, batches(3))


def _check_plan(p, m, start_params, ref_run, **kw):
    tr = Trainer(CFG, p, config=TCFG, microbatches=m, params=start_params, **kw)
    metrics = [tr.step(b) for b in batches(3)]
    want_losses, want_params = ref_run
    got = [x["loss"] for x in metrics]
    np.testing.assert_allclose(got, want_losses, rtol=1e-5)
    assert set(tr.params()) == set(want_params)
    assert rel_diff(tr.params(), want_params) < 1e-5
    assert tr.replicas_in_sync()
    assert metrics[1]["lr"] == pytest.approx(TCFG.lr)
    assert all(x["tokens"] == BATCH * SEQ for x in metrics)
    return tr


@pytest.mark.parametrize("name", list(PLANS))
def test_train_matches_single_device(name, start_params, ref_run):
    _check_plan(*PLANS[name], start_params, ref_run)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_PLANS))
def test_train_matches_single_device_more_plans(name, start_params, ref_run):
    p, m, kw = SLOW_PLANS[name]
    _check_plan(p, m, start_params, ref_run, **kw)


def test_train_grads_match_jax_grad(start_params):
    p, m = PLANS["two-replicas"]
    tr = Trainer(CFG, p, config=TCFG, microbatches=m, params=start_params)
    b = batches(1, seed=5)[0]
    loss, grads = tr.grads(b)
    model = LlamaStage(CFG)

    def loss_fn(params):
        x, y = b[:, :-1], b[:, 1:]
        logits = model.apply({"params": params}, x, jnp.broadcast_to(jnp.arange(SEQ), x.shape))[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    want_loss, want = jax.jit(jax.value_and_grad(loss_fn))(start_params)
    assert loss == pytest.approx(float(want_loss), rel=1e-6)
    assert tr.evaluate(b) == pytest.approx(float(want_loss), rel=1e-6)
    assert rel_diff(grads, want) < 1e-5


def test_train_tied_embeddings_and_remat():
    """The tied embedding sits on the first and the last stage: its gradients are summed over both."""
    cfg = ModelConfig("tied", vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    params = init_params(LlamaStage(cfg), jax.random.key(1))
    data = batches(2, seed=2)
    want_losses, want = reference(cfg, params, TCFG, data)
    tcfg = TrainConfig(**{**TCFG.__dict__, "remat": True})
    tr = Trainer(cfg, plan([((0, 1), (0, 1), 1, 2), ((1, 2), (2,))]), config=tcfg, microbatches=2, params=params)
    got = [tr.step(b)["loss"] for b in data]
    np.testing.assert_allclose(got, want_losses, rtol=1e-5)
    assert rel_diff(tr.params(), want) < 1e-5
    assert tr.replicas_in_sync()


def test_checkpoint_restores_onto_another_plan(tmp_path, start_params, ref_run):
    data = batches(3)
    a = Trainer(CFG, PLANS["two-replicas"][0], config=TCFG, microbatches=2, params=start_params)
    for b in data[:2]:
        a.step(b)
    a.save(tmp_path / "ckpt", extra={"position": 2}, wait=True)
    b = Trainer(CFG, PLANS["uneven-tp1-2-4"][0], config=TCFG, microbatches=4, params=start_params)
    meta = b.restore(tmp_path / "ckpt")
    assert meta["step"] == 2 and meta["extra"] == {"position": 2} and b.step_count == 2
    assert rel_diff(b.params(), a.params()) == 0.0
    got = b.step(data[2])
    want_losses, want_params = ref_run
    assert got["loss"] == pytest.approx(want_losses[2], rel=1e-5)
    assert got["lr"] == pytest.approx(float(TCFG.lr * 0.5 * (1 + np.cos(np.pi * 1 / 5)) * 0.9 + TCFG.lr * 0.1),
                                      rel=1e-6)
    assert rel_diff(b.params(), want_params) < 1e-5


def test_checkpoint_keeps_last_n_and_rejects_other_model(tmp_path, start_params):
    from hexjax.train.checkpoint import latest_step
    tcfg = TrainConfig(**{**TCFG.__dict__, "keep_checkpoints": 2})
    tr = Trainer(CFG, PLANS["one-device"][0], config=tcfg, params=start_params)
    for s in (1, 2, 3):
        tr.save(tmp_path, step=s)
    tr.wait_for_saves()
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 3]
    assert latest_step(tmp_path) == 3
    other = ModelConfig("t", vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=64)
    t2 = Trainer(other, plan([((0, 2), (1,))]), config=tcfg)
    with pytest.raises(ConfigError, match="another model"):
        t2.restore(tmp_path)


def test_train_errors_before_device_memory(start_params):
    p = SLOW_PLANS["dp2"][0]
    with pytest.raises(PlanError, match="stages end at layer 3"):
        Trainer(CFG, plan([((0, 3), (0,))]), config=TCFG)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        Trainer(CFG, p, config=TCFG, microbatches=2, global_batch=8, seq_len=65)
    tr = Trainer(CFG, p, config=TCFG, microbatches=2, params=start_params)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        tr.step(np.zeros((8, 66), np.int32))
    with pytest.raises(ConfigError, match="multiple of 4"):
        tr.step(np.zeros((6, 17), np.int32))
    with pytest.raises(ConfigError, match="replicas"):
        Trainer(CFG, PLANS["two-replicas"][0], config=TCFG, params=start_params).step(np.zeros((5, 17), np.int32))
    with pytest.raises(ConfigError, match="decay_steps"):
        TrainConfig(warmup_steps=5, decay_steps=5)


@pytest.mark.parametrize("stages,m", [(1, 1), (2, 1), (3, 2), (4, 4), (4, 7), (5, 3)])
def test_one_f_one_b_order(stages, m):
    order = one_f_one_b(stages, m)
    assert sorted(order) == sorted((op, s, i) for op in "FB" for s in range(stages) for i in range(m))
    seen = set()
    for op, s, i in order:
        if op == "F":
            assert s == 0 or ("F", s - 1, i) in seen
        else:
            assert ("F", s, i) in seen and (s == stages - 1 or ("B", s + 1, i) in seen)
        seen.add((op, s, i))
    assert max_live_activations(order, stages) == [min(stages - s, m) for s in range(stages)]


_KILLED_SAVE_CHILD = """
import asyncio, sys
import jax, numpy as np
from orbax.checkpoint._src.path import atomicity
from hexjax.models.config import ModelConfig
from hexjax.plan import Plan, Replica, Stage
from hexjax.train import TrainConfig, Trainer
cfg = ModelConfig("t", vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=64)
tr = Trainer(cfg, Plan("t", "", (Replica((Stage((0, 4), (0,)),)),)), config=TrainConfig(lr=1e-2))
batch = np.random.default_rng(0).integers(0, 128, (2, 17))
tr.step(batch)
tr.save(sys.argv[1], wait=True)                     # step 1: committed
commit = atomicity.AtomicRenameTemporaryPath.finalize

async def slow_commit(self):                         # a slow disk: step 2's files sit in orbax's temporary
    await asyncio.sleep(600)                         # directory until the rename, which the kill prevents
    await commit(self)
atomicity.AtomicRenameTemporaryPath.finalize = slow_commit
tr.step(batch)
tr.save(sys.argv[1])                                 # step 2: asynchronous, the loop goes on
print("saving", flush=True)
for _ in range(1000):
    tr.step(batch)
"""


def test_killed_save_keeps_previous_checkpoint(tmp_path, start_params):
    """SIGKILL while an asynchronous save is being written (the child trains on): the previous step stays the
    latest, the partial one is not listed, a new trainer restores step 1 and saves over the leftover."""
    import os
    import select
    import signal
    import subprocess
    import sys
    import time

    from hexjax.train.checkpoint import latest_step, read_meta
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE_CHILD, str(ckpt)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        # save() must return while step 2 is still being committed (a blocking save never prints this)
        ready, _, _ = select.select([child.stdout], [], [], 180)
        assert ready and child.stdout.readline().strip() == "saving", "save blocked the step loop"
        deadline = time.time() + 60
        while not any("tmp" in p.name for p in ckpt.iterdir()) and time.time() < deadline:
            time.sleep(0.05)
        partial = [p.name for p in ckpt.iterdir() if "tmp" in p.name]
        assert partial, "step 2's temporary directory never appeared"
        assert child.poll() is None, "the child should still be training while the save is written"
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert latest_step(ckpt) == 1 and read_meta(ckpt)["steps_taken"] == 1
    tr = Trainer(CFG, PLANS["one-device"][0], config=TCFG, params=start_params)
    assert tr.restore(ckpt)["step"] == 1 and tr.step_count == 1
    tr.save(ckpt, step=2, wait=True)
    assert latest_step(ckpt) == 2 and read_meta(ckpt)["steps_taken"] == 1


# ---- random plans: 5 AdamW steps over a drawn plan equal 5 single-device steps ----
#
# Compiling stage programs dominates the cost, so plans are drawn from replica *templates* on fixed
# devices (the layouts of PLANS above plus two), every replica gets 2-row microbatches and the global
# batch is 2 * microbatches * replicas: a template's programs then have the same shapes in every plan
# and are compiled once per session (shared with the tests above through ``stage_step``'s cache).
# The features are forced into the templates: 1, 2 and 3 stages, uneven splits, tp 1/2/4 (tp 4 above
# the 2 KV heads), dp 2 and dp2·tp2 meshes, scattered device orders, replicas of different layouts
# side by side, and 1..4 microbatches.  The default run checks 12 of the 16 (templates, microbatches).
#
# How parameters are compared.  AdamW's step m / (sqrt(v) + eps) is invariant to a gradient element's
# scale, so an element whose gradient is 1000x below its leaf's largest (or nearly cancels between two
# steps in m) carries its fp32 rounding (~1e-7 of the leaf's largest terms, i.e. ~1e-4 of itself) straight
# into its update.  Measured over the slow sweep's 60 drawn cases x 5 steps: the *same single-device
# program* run on the batch with its rows reversed (mathematically the same step, another summation
# order) differs from itself by up to 7.5e-5 in max|a - b| / max|b| per leaf, and the plans differ from
# it by up to 1.1e-4; in the leaf-norm relative error ||a - b|| / ||b|| the two are at most 4.9e-6 and
# 5.9e-6.  So the 1e-5 relative bar is applied to the leaf-norm error, where the plans sit at the
# single-device floor; the loss at every step is checked to 1e-5 and one step's gradients element-wise
# to 1e-5 of their leaf's largest; the element-wise parameter error is bounded at 3e-4 (2.7x the largest
# seen).  An update off by 1e-4 relative gives a leaf-norm error of 7.5e-5 and fails.

TEMPLATES = {
    "A": ([((0, 1), (0,)), ((1, 3), (1, 2), 1, 2), ((3, 4), (3, 4, 5, 6), 1, 4)], {0, 1, 2, 3, 4, 5, 6}),
    "B": ([((0, 1), (0, 1), 1, 2), ((1, 4), (2, 3, 4, 5), 2, 2)], {0, 1, 2, 3, 4, 5}),
    "C": ([((0, 3), (6,)), ((3, 4), (7,))], {6, 7}),
    "D": ([((0, 4), (0,))], {0}),
}
COMBOS = [(t,) for t in TEMPLATES] + [(a, b) for a in TEMPLATES for b in TEMPLATES
                                       if a < b and not TEMPLATES[a][1] & TEMPLATES[b][1]]
MB_ROWS = 2


def _reference_steps(params, data):
    """Single-device optax steps (as ``reference``), the batch's mean-loss gradient taken as the mean over
    its 2-row chunks (equal token counts), so one jitted gradient and one update serve every batch size."""
    global _REF
    if "_REF" not in globals():
        model = LlamaStage(CFG)

        def loss_fn(p, batch):
            x, y = batch[:, :-1], batch[:, 1:]
            logits = model.apply({"params": p}, x, jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape))[0]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        sched = optax.warmup_cosine_decay_schedule(0.0, TCFG.lr, TCFG.warmup_steps, TCFG.decay_steps,
                                                   TCFG.lr * TCFG.end_lr_ratio)
        opt = optax.chain(optax.clip_by_global_norm(TCFG.clip_norm),
                          optax.adamw(sched, TCFG.b1, TCFG.b2, TCFG.eps, weight_decay=TCFG.weight_decay,
                                      mask=lambda p: jax.tree.map(lambda a: a.ndim >= 2, p)))

        @jax.jit
        def update(p, s, g):
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s
        _REF = (opt, jax.jit(jax.value_and_grad(loss_fn)), update)
    opt, grad, update = _REF
    state, losses = opt.init(params), []
    if data is None:
        return None
    for b in data:
        parts = [grad(params, jnp.asarray(b[i:i + MB_ROWS])) for i in range(0, len(b), MB_ROWS)]
        n = len(parts)
        g = jax.tree.map(lambda *xs: sum(xs[1:], xs[0]) / n, *(g for _, g in parts))
        losses.append(sum(float(l) for l, _ in parts) / n)
        params, state = update(params, state, g)
    return losses, params


def _reference_grads(params, b):
    _reference_steps(params, None)
    parts = [_REF[1](params, jnp.asarray(b[i:i + MB_ROWS]))[1] for i in range(0, len(b), MB_ROWS)]
    return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]) / len(parts), *parts)


RANDOM_STEPS = 5


def _random_plan_case(combo, m, seed, start_params):
    p = plan(*(TEMPLATES[t][0] for t in combo))
    data = batches(RANDOM_STEPS, seed=seed, batch=MB_ROWS * m * len(combo))
    want_losses, want_params = _reference_steps(start_params, data)
    tr = Trainer(CFG, p, config=TCFG, microbatches=m, params=start_params)
    _, grads = tr.grads(data[0])
    assert rel_diff(grads, _reference_grads(start_params, data[0])) < 1e-5
    got = [tr.step(b)["loss"] for b in data]
    np.testing.assert_allclose(got, want_losses, rtol=1e-5)
    got_params = tr.params()
    assert rel_norm(got_params, want_params) < 1e-5      # see the comment above TEMPLATES
    assert rel_diff(got_params, want_params) < 3e-4
    assert tr.replicas_in_sync()


ALL_CASES = [(c, m) for c in COMBOS for m in range(1, 4 // len(c) + 1)]   # 16 (templates, microbatches)
# always in the drawn set: 3 stages with tp 1/2/4, 1 stage with 4 microbatches, two different replicas
MUST = [(("A",), 3), (("D",), 4), (("B", "C"), 1)]


def _hypothesis_test(plans_per_example, max_examples, start_params, seen):
    from hypothesis import HealthCheck, given, settings, strategies as st
    rest = [c for c in ALL_CASES if c not in MUST]

    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(cases=st.lists(st.sampled_from(rest), min_size=plans_per_example - len(MUST),
                          max_size=plans_per_example - len(MUST), unique=True).map(lambda xs: MUST + xs),
           seeds=st.lists(st.integers(0, 2**16), min_size=plans_per_example, max_size=plans_per_example))
    def check(cases, seeds):
        for (combo, m), seed in zip(cases, seeds):
            seen.append((combo, m))
            _random_plan_case(combo, m, seed, start_params)
    return check


def test_random_plans_match_single_device(start_params):
    """12 distinct plans drawn reproducibly (derandomized hypothesis) from the templates above."""
    seen = []
    _hypothesis_test(12, 1, start_params, seen)()
    assert len(set(seen)) == 12
    # the drawn set covers 1, 2 and 3 stages, two replicas, and 1..4 microbatches
    assert {len(TEMPLATES[t][0]) for c, _ in seen for t in c} == {1, 2, 3}
    assert any(len(c) == 2 for c, _ in seen) and {m for _, m in seen} == {1, 2, 3, 4}


@pytest.mark.slow
def test_random_plans_match_single_device_more(start_params):
    _hypothesis_test(len(ALL_CASES), 3, start_params, [])()


def test_bf16_mixed_precision_tracks_fp32(start_params, ref_run):
    """bf16 compute with fp32 master weights, gradients and AdamW state, through a dp2·tp2 stage, tracks
    the fp32 single-device losses: bf16 keeps 8 mantissa bits (~4e-3 per rounding) and the loss averages
    128 tokens; measured <= 1.3e-4 relative over 5 steps, asserted < 2e-3."""
    p = plan(TEMPLATES["B"][0])
    tr = Trainer(CFG, p, config=TCFG, microbatches=2, params=start_params, dtype="bfloat16")
    data = batches(3)
    _, grads = tr.grads(data[0])
    got = np.array([tr.step(b)["loss"] for b in data])
    want_losses, _ = ref_run
    rel = np.abs(got - want_losses) / np.array(want_losses)
    assert np.all(rel < 2e-3), rel
    assert np.any(rel > 0), "identical to fp32: the stages did not compute in bfloat16"
    assert {a.dtype for a in jax.tree.leaves(grads)} == {np.dtype(np.float32)}
    for row in tr.replicas:
        for st in row:
            assert {a.dtype for a in jax.tree.leaves(st.params)} == {jnp.dtype(jnp.float32)}
            floats = {a.dtype for a in jax.tree.leaves(st.state) if jnp.issubdtype(a.dtype, jnp.floating)}
            assert floats == {jnp.dtype(jnp.float32)}
            for k in st.step.keys:   # moments sharded like their parameters
                mu = st.state[k][0].mu
                assert jax.tree.map(lambda a: a.sharding, mu) == jax.tree.map(lambda a: a.sharding, st.params[k])
    first = tr.replicas[0][0]
    x = jax.device_put(np.asarray(data[0][:4, :-1], np.int32), first.step.input_sharding)
    y, stash = first.step.fwd(first.params, x)
    assert y.dtype == jnp.bfloat16   # activations cross stages in bf16
    assert {a.dtype for a in jax.tree.leaves(stash) if jnp.issubdtype(a.dtype, jnp.floating)} <= {
        jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}   # matmul outputs in bf16, attention scores in float32
    assert tr.replicas_in_sync()
