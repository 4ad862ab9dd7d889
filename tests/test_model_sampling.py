"""Sampling: filters against a numpy oracle, seeding, greedy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hexjax.errors import ConfigError
from hexjax.models.sampling import Sampling, filter_logits, request_key, request_keys, sample, step_key


def _oracle_filter(logits, temperature, top_k, top_p, min_p=0.0):
    """Straightforward per-row numpy version: sort, cut, renormalise."""
    x = logits.astype(np.float64) / (temperature or 1.0)
    out = np.full_like(x, -np.inf)
    for r, row in enumerate(x):
        order = np.argsort(-row, kind="stable")
        keep = np.zeros(row.size, bool)
        if top_k:
            kth = row[order[top_k - 1]]
            keep = row >= kth
        else:
            keep[:] = True
        if top_p < 1:
            kept = np.where(keep, row, -np.inf)
            p = np.exp(kept - kept.max())
            p /= p.sum()
            order = np.argsort(-kept, kind="stable")
            mass, chosen = 0.0, []
            for i in order:
                if mass >= top_p or not keep[i]:
                    break
                chosen.append(i)
                mass += p[i]
            cutoff = kept[chosen].min()
            keep &= row >= cutoff
        if min_p:
            kept = np.where(keep, row, -np.inf)
            p = np.exp(kept - kept.max())
            keep &= p >= min_p * p.max()
        out[r, keep] = row[keep]
    return out


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 5, 1.0, 0.0), (0.7, 0, 0.9, 0.0), (1.3, 20, 0.5, 0.0), (1.0, 0, 0.05, 0.0), (2.0, 1, 1.0, 0.0),
    (1.0, 3, 0.999, 0.0), (1.0, 0, 1.0, 0.1), (0.5, 10, 0.95, 0.05), (2.0, 0, 1.0, 0.5)])
def test_filter_matches_numpy_oracle(temperature, top_k, top_p, min_p):
    rng = np.random.default_rng(top_k)
    logits = rng.normal(size=(6, 50)).astype(np.float32) * 3
    logits[0, :4] = logits[0, 0]  # ties at the top
    got = np.asarray(filter_logits(jnp.asarray(logits), Sampling(temperature, top_k, top_p, min_p=min_p)))
    want = _oracle_filter(logits, temperature, top_k, top_p, min_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)


def test_sampled_frequencies_follow_filtered_softmax():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(1, 12)).astype(np.float32))
    s = Sampling(temperature=0.8, top_k=6, top_p=0.9, seed=3)
    n = 20000
    keys = jax.vmap(lambda i: step_key(3, i))(jnp.arange(n))
    toks = np.asarray(jax.vmap(lambda k: sample(logits, k, s))(keys))[:, 0]
    want = np.exp(_oracle_filter(np.asarray(logits), 0.8, 6, 0.9)[0])
    want /= want.sum()
    freq = np.bincount(toks, minlength=12) / n
    assert np.all(freq[want == 0] == 0)
    np.testing.assert_allclose(freq, want, atol=0.015)


def test_same_seed_same_tokens_and_greedy_is_argmax():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 100)).astype(np.float32))
    s = Sampling(temperature=1.0, top_p=0.95, seed=7)
    a = sample(logits, step_key(7, 3), s)
    b = jax.jit(sample, static_argnums=2)(logits, step_key(7, 3), s)
    c = sample(logits, step_key(7, 4), s)
    d = sample(logits, step_key(8, 3), s)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == jnp.int32 and a.shape == (4,)
    assert not (np.array_equal(a, c) and np.array_equal(a, d))
    np.testing.assert_array_equal(sample(logits, step_key(0, 0), Sampling()), np.argmax(np.asarray(logits), -1))


@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_settings(kw):
    with pytest.raises(ConfigError):
        Sampling(**kw)


def test_request_keys_one_rule_for_every_batching():
    """Token ``step`` of request ``r`` is drawn with fold_in(step_key(seed, step), r), whether the
    rows are sampled together with per-row keys (single-device generation) or one at a time (the
    runtime's rows, in any replica or microbatch)."""
    seed, step = 7, 3
    for r in (0, 1, 5):
        np.testing.assert_array_equal(jax.random.key_data(request_key(seed, r, step)),
                                      jax.random.key_data(jax.random.fold_in(step_key(seed, step), r)))
    reqs = jnp.array([4, 0, 2, 4], jnp.int32)
    keys = request_keys(seed, reqs, step)
    assert keys.shape == (4,)
    np.testing.assert_array_equal(jax.random.key_data(keys[2]), jax.random.key_data(request_key(seed, 2, step)))
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(4, 64)).astype(np.float32))
    s = Sampling(temperature=1.0, top_k=20, seed=seed)
    together = np.asarray(sample(logits, keys, s))
    one_by_one = [int(sample(logits[i][None], request_key(seed, reqs[i], step), s)[0]) for i in range(4)]
    assert together.tolist() == one_by_one
    # equal logits, same request: same token; another request or step: independent draws
    same = jnp.broadcast_to(logits[0], (64, 64))
    draws = np.asarray(sample(same, request_keys(seed, jnp.arange(64), step), s))
    assert len(set(draws.tolist())) > 1
    assert int(sample(same[:1], request_keys(seed, jnp.array([0]), step), s)[0]) == draws[0]
