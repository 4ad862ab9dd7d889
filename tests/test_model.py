"""LlamaStage: stage chaining, KV cache, parameter trees and logical axes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hexjax.errors import ConfigError
from hexjax.models import (
    KVCache, LlamaStage, ModelConfig, abstract_params, default_attention, init_cache, init_params,
    logical_axes, stage_params)

TINY = ModelConfig.preset("tiny")
TIED_BIASED = dataclasses.replace(TINY, name="tiny-tied-bias", tie_word_embeddings=True,
                                  attention_bias=True, mlp_bias=True, num_layers=3)
AXIS_NAMES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm"}


def _forward(cfg, params, tokens, positions=None, **kw):
    stage = LlamaStage(cfg, **kw)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return stage.apply({"params": params}, tokens, positions)[0]


@pytest.fixture(scope="module")
def tiny_params():
    return init_params(LlamaStage(TINY), jax.random.key(0))


@pytest.fixture(scope="module")
def tied_params():
    params = init_params(LlamaStage(TIED_BIASED), jax.random.key(1))
    # biases start at zero and norm scales at one: perturb every leaf so that all of them matter
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.mark.parametrize("cfg_name", ["tiny", "tied"])
def test_stages_chained_equal_full_model(cfg_name, tiny_params, tied_params):
    cfg, params = (TINY, tiny_params) if cfg_name == "tiny" else (TIED_BIASED, tied_params)
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(9), tokens.shape)
    full = _forward(cfg, params, tokens)
    cuts = [0, 1, 2, cfg.num_layers]
    x = tokens
    for s, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        first, last = s == 0, b == cfg.num_layers
        sp = stage_params(params, cfg, a, b - a, embed=first, head=last)
        assert set(sp) >= {f"layer_{i}" for i in range(a, b)}
        assert ("embed" in sp) == (first or (last and cfg.tie_word_embeddings))
        x, _ = LlamaStage(cfg, a, b - a, embed=first, head=last).apply({"params": sp}, x, pos)
        assert x.shape == ((2, 9, cfg.vocab_size) if last else (2, 9, cfg.hidden_size))
    assert x.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(x), np.asarray(full), rtol=0, atol=1e-6)


def test_stage_params_is_the_stage_init_tree(tied_params):
    """The sliced full tree has exactly the structure and shapes a stage initialises."""
    cfg = TIED_BIASED
    for kw in [dict(first_layer=0, num_layers=2, embed=True, head=False),
               dict(first_layer=2, num_layers=1, embed=False, head=True),
               dict(first_layer=1, num_layers=1, embed=False, head=False)]:
        want = abstract_params(LlamaStage(cfg, **kw))
        got = stage_params(tied_params, cfg, kw["first_layer"], kw["num_layers"], kw["embed"], kw["head"])
        assert jax.tree.structure(want) == jax.tree.structure(got)
        assert jax.tree.map(lambda a: a.shape, want) == jax.tree.map(lambda a: a.shape, got)
    # initialising a stage alone with the full model's key gives the same numbers
    full = init_params(LlamaStage(cfg), jax.random.key(5))
    alone = init_params(LlamaStage(cfg, 1, 2, embed=False, head=True), jax.random.key(5))
    jax.tree.map(np.testing.assert_array_equal, alone, stage_params(full, cfg, 1, 2, False, True))


def test_kv_cache_prefill_then_decode_equals_full_forward(tiny_params):
    cfg, params = TINY, tiny_params
    tokens = jax.random.randint(jax.random.key(3), (3, 12), 0, cfg.vocab_size)
    full = _forward(cfg, params, tokens)
    stage = LlamaStage(cfg)
    step = jax.jit(lambda p, t, pos, c: stage.apply({"params": p}, t, pos, c), donate_argnums=3)
    cache = init_cache(cfg, 3, 16)
    pos = jnp.broadcast_to(jnp.arange(12), tokens.shape)
    out, cache = step(params, tokens[:, :5], pos[:, :5], cache)   # prefill
    outs = [out]
    out, cache = step(params, tokens[:, 5:8], pos[:, 5:8], cache)  # a second chunk
    outs.append(out)
    for i in range(8, 12):  # decode
        out, cache = step(params, tokens[:, i:i + 1], pos[:, i:i + 1], cache)
        outs.append(out)
    assert isinstance(cache[0], KVCache) and len(cache) == cfg.num_layers
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=2e-6)


def test_ragged_right_padded_batch_with_cache(tiny_params):
    """Each row keeps its own positions; padding never leaks into real tokens."""
    cfg, params = TINY, tiny_params
    lengths = [7, 3, 5]
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, cfg.vocab_size, n + 4) for n in lengths]  # prompt + 4 decoded
    s = max(lengths)
    prompt = np.zeros((3, s), np.int32)
    for b, n in enumerate(lengths):
        prompt[b, :n] = seqs[b][:n]
        prompt[b, n:] = 17  # junk padding
    stage = LlamaStage(cfg)
    step = jax.jit(lambda *a, **k: stage.apply({"params": params}, *a, **k))
    cache = init_cache(cfg, 3, 16)
    pos = jnp.broadcast_to(jnp.arange(s), (3, s))
    last, cache = step(jnp.asarray(prompt), pos, cache, logits_index=jnp.asarray(lengths) - 1)
    got = [[np.asarray(last[b])] for b in range(3)]
    cur = np.asarray(lengths)
    for i in range(4):
        tok = np.array([[seqs[b][cur[b]]] for b in range(3)], np.int32)
        out, cache = step(jnp.asarray(tok), jnp.asarray(cur[:, None]), cache)
        for b in range(3):
            got[b].append(np.asarray(out[b, 0]))
        cur = cur + 1
    for b, n in enumerate(lengths):
        ref = np.asarray(_forward(cfg, params, jnp.asarray(seqs[b][None], jnp.int32)))[0, n - 1:n + 4]
        np.testing.assert_allclose(np.stack(got[b]), ref, atol=2e-6)


def test_pluggable_attention_fn(tiny_params):
    """A separately written attention (explicit KV-head repeat) gives the same logits,
    and the stage really calls the function it is given."""
    calls = []

    def reference_attention(q, k, v, layer_cache, positions):
        calls.append(q.shape)
        rep = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        s = jnp.where(jnp.tril(jnp.ones((q.shape[1],) * 2, bool)), s, -jnp.inf)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v), layer_cache

    tokens = jax.random.randint(jax.random.key(4), (2, 6), 0, TINY.vocab_size)
    want = _forward(TINY, tiny_params, tokens)
    got = _forward(TINY, tiny_params, tokens, attention_fn=reference_attention)
    assert len(calls) == TINY.num_layers and calls[0] == (2, 6, TINY.num_heads, TINY.head_dim)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


def test_logical_axes_match_params(tied_params):
    for cfg, kw in [(TINY, {}), (TIED_BIASED, dict(first_layer=1, num_layers=2, embed=False))]:
        stage = LlamaStage(cfg, **kw)
        axes, shapes = logical_axes(stage), abstract_params(stage)
        assert jax.tree.structure(shapes) == jax.tree.structure(
            axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        for spec, arr in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                             jax.tree.leaves(shapes)):
            assert len(spec) == arr.ndim and set(spec) <= AXIS_NAMES
    layer = logical_axes(LlamaStage(TIED_BIASED))["layer_0"]
    assert tuple(layer["attn"]["wq"]) == ("embed", "heads", "head_dim")
    assert tuple(layer["attn"]["wk"]) == ("embed", "kv_heads", "head_dim")
    assert tuple(layer["attn"]["wo"]) == ("heads", "head_dim", "embed")
    assert tuple(layer["mlp"]["down"]) == ("mlp", "embed")


@pytest.mark.parametrize("cfg", [TINY, TIED_BIASED, ModelConfig.preset("llama-2-70b"), ModelConfig.preset("llama-3.1-8b")],
                         ids=lambda c: c.name)
def test_abstract_params_count_matches_config(cfg):
    shapes = abstract_params(LlamaStage(cfg, param_dtype=jnp.bfloat16))
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)) == cfg.num_params
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(shapes))
    assert set(shapes) == {"embed", "final_norm", *(["lm_head"] if not cfg.tie_word_embeddings else []),
                           *(f"layer_{i}" for i in range(cfg.num_layers))}


def test_bad_layer_range_and_cache_length(tiny_params):
    with pytest.raises(ConfigError, match="outside"):
        abstract_params(LlamaStage(TINY, first_layer=3, num_layers=2))
    with pytest.raises(ConfigError, match="outside"):
        stage_params(tiny_params, TINY, 2, 5)
    with pytest.raises(ConfigError, match="cache has 2"):
        LlamaStage(TINY).apply({"params": tiny_params}, jnp.zeros((1, 1), jnp.int32),
                               jnp.zeros((1, 1), jnp.int32), init_cache(TINY, 1, 4, 2))


def test_default_attention_without_cache_is_causal():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 4, 2, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 4, 1, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, 4, 1, 8)), jnp.float32)
    out, cache = default_attention(q, k, v, None, jnp.arange(4)[None])
    assert cache is None
    # position 0 attends only to itself
    np.testing.assert_allclose(np.asarray(out[0, 0]), np.asarray(jnp.broadcast_to(v[0, 0], (2, 8))), atol=1e-6)
    # changing a later token leaves earlier outputs untouched
    v2 = v.at[0, 3].set(5.0)
    out2, _ = default_attention(q, k, v2, None, jnp.arange(4)[None])
    np.testing.assert_allclose(np.asarray(out2[0, :3]), np.asarray(out[0, :3]), atol=0)
    assert not np.allclose(np.asarray(out2[0, 3]), np.asarray(out[0, 3]))
