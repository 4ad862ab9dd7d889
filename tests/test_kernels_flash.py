"""Flash attention kernel against its reference and a naive softmax oracle.

The kernels run natively when the default backend is a GPU (``JAX_PLATFORMS=cuda``;
tests/conftest.py defaults to cpu) and in Pallas interpret mode elsewhere: every kernel call
passes ``INTERPRET``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hexjax.kernels import attention, flash_attention, flash_attention_reference
from hexjax.kernels import testing as kernel_testing
from hexjax.kernels.testing import default_interpret, pallas_interpret_flags, tolerance
from hexjax.kernels.tuning import FlashBlockSizes

INTERPRET = default_interpret()
"""False when the default backend is a GPU: the kernels then compile through Triton."""
ON_GPU = not INTERPRET

SMALL = FlashBlockSizes(block_q=16, block_k=16, block_q_dq=16, block_k_dq=16, block_q_dkv=16,
                        block_k_dkv=16)
# float32 must be fp32-accurate natively too: 1e-4 on a GPU, where a TF32 dot would miss it.
TOL = {dt: tolerance(dt, native=ON_GPU) for dt in (jnp.float32, jnp.bfloat16, jnp.float16)}
GRAD_TOL_F32 = 2e-4 if ON_GPU else 2e-5


default_matmul_precision = pytest.fixture(autouse=True)(kernel_testing.default_matmul_precision)


def naive_softmax(logits, mask):
    """Numpy softmax over the last axis (no compiles) within ``mask``; rows seeing nothing give 0."""
    logits = np.where(mask, logits, -np.inf)
    top = logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits - np.where(np.isfinite(top), top, 0.0))
    total = weights.sum(axis=-1, keepdims=True)
    return weights / np.where(total == 0.0, 1.0, total)


def naive_attention(q, k, v, *, causal, kv_lengths=None):
    """Explicit head repeat, explicit mask, softmax in numpy fp32; rows seeing nothing give 0."""
    q, k, v = (np.asarray(x, np.float32) for x in (q, k, v))
    batch, seq_q, heads, dim = q.shape
    seq_k = k.shape[1]
    rep = heads // k.shape[2]
    k = np.repeat(k, rep, axis=2)
    v = np.repeat(v, rep, axis=2)
    logits = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(dim)
    mask = np.ones((batch, 1, seq_q, seq_k), bool)
    for i in range(seq_q):
        for j in range(seq_k):
            if causal and j > i + seq_k - seq_q:
                mask[:, :, i, j] = False
    if kv_lengths is not None:
        for b, n in enumerate(np.asarray(kv_lengths)):
            mask[b, :, :, n:] = False
    weights = naive_softmax(logits, np.broadcast_to(mask, logits.shape))
    return np.einsum("bhst,bthd->bshd", weights, v)


def normal(seed, shape, dtype=jnp.float32):
    """Standard normal values drawn and cast on the host (jax.random would compile per shape)."""
    values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return jnp.asarray(values.astype(jnp.dtype(dtype)))


def make_qkv(seed, batch, seq_q, seq_k, heads, kv_heads, dim, dtype=jnp.float32):
    q = normal((seed, 0), (batch, seq_q, heads, dim), dtype)
    k = normal((seed, 1), (batch, seq_k, kv_heads, dim), dtype)
    v = normal((seed, 2), (batch, seq_k, kv_heads, dim), dtype)
    return q, k, v


def assert_close(actual, expected, tol):
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                               atol=tol, rtol=tol)


FORWARD_CASES = [
    # batch, S, T, Hq, Hkv, D, causal, dtype
    (2, 37, 37, 4, 4, 64, True, jnp.float32),     # MHA, not block multiples
    (2, 1, 45, 8, 2, 64, True, jnp.float32),      # one decode row, GQA 4
    (1, 19, 40, 2, 1, 96, True, jnp.float16),     # head dim padded to 128, fp16
    (1, 40, 24, 2, 2, 64, True, jnp.float32),     # S > T: the first rows see no key
]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: "-".join(map(str, c[:7])))
def test_forward_matches_reference_and_naive(case):
    batch, seq_q, seq_k, heads, kv_heads, dim, causal, dtype = case
    q, k, v = make_qkv(0, batch, seq_q, seq_k, heads, kv_heads, dim, dtype)
    out = flash_attention(q, k, v, causal=causal, interpret=INTERPRET, block_sizes=SMALL)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, flash_attention_reference(q, k, v, causal=causal), TOL[dtype])
    assert_close(out, naive_attention(q, k, v, causal=causal), TOL[dtype])


def test_default_blocks_and_kv_lengths():
    q, k, v = make_qkv(1, 3, 21, 50, 4, 2, 64)
    lengths = jnp.array([50, 17, 0], jnp.int32)
    out = flash_attention(q, k, v, lengths, causal=True, interpret=INTERPRET)
    expected = naive_attention(q, k, v, causal=True, kv_lengths=lengths)
    assert_close(out, expected, TOL[jnp.float32])
    assert_close(flash_attention_reference(q, k, v, lengths, causal=True), expected,
                 TOL[jnp.float32])
    assert not np.any(np.asarray(out[2]))  # length 0: zeros, not NaN


GRAD_CASES = [
    # batch, S, T, Hq, Hkv, D, causal, kv_lengths
    (1, 20, 45, 8, 2, 64, True, None),      # chunked prefill against a longer cache, GQA 4
    (1, 24, 33, 8, 1, 80, False, None),     # GQA 8, padded head dim, non-causal
    (2, 19, 40, 4, 2, 64, True, (40, 23)),  # ragged kv lengths
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "-".join(map(str, c[:7])))
def test_forward_and_gradients(case):
    """Output against the naive oracle, dq/dk/dv against jax.grad of the reference."""
    batch, seq_q, seq_k, heads, kv_heads, dim, causal, lengths = case
    q, k, v = make_qkv(2, batch, seq_q, seq_k, heads, kv_heads, dim)
    lengths = None if lengths is None else jnp.array(lengths, jnp.int32)
    cot = normal(3, q.shape)
    out, kernel_vjp = jax.vjp(lambda q, k, v: flash_attention(
        q, k, v, lengths, causal=causal, interpret=INTERPRET, block_sizes=SMALL), q, k, v)
    assert_close(out, naive_attention(q, k, v, causal=causal, kv_lengths=lengths),
                 TOL[jnp.float32])
    _, reference_vjp = jax.vjp(lambda q, k, v: flash_attention_reference(
        q, k, v, lengths, causal=causal), q, k, v)
    for name, g, w in zip("qkv", kernel_vjp(cot), reference_vjp(cot)):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=GRAD_TOL_F32,
                                   rtol=GRAD_TOL_F32, err_msg=f"d{name}")


def test_bf16_forward_and_gradients():
    q, k, v = make_qkv(4, 1, 32, 48, 4, 2, 64, jnp.bfloat16)
    out, kernel_vjp = jax.vjp(
        lambda q, k, v: flash_attention(q, k, v, interpret=INTERPRET, block_sizes=SMALL), q, k, v)
    assert out.dtype == jnp.bfloat16
    assert_close(out, naive_attention(q, k, v, causal=True), 2e-2)
    cot = normal(5, q.shape, jnp.bfloat16)
    _, reference_vjp = jax.vjp(lambda q, k, v: flash_attention_reference(q, k, v), q, k, v)
    for g, w in zip(kernel_vjp(cot), reference_vjp(cot)):
        assert g.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(w.astype(jnp.float32))))
        assert_close(g.astype(jnp.float32) / scale, w.astype(jnp.float32) / scale, 2e-2)


def test_dispatch():
    """"auto" runs the Pallas kernel exactly on a GPU (natively), "pallas" always, "xla" never."""
    q, k, v = make_qkv(0, 2, 37, 37, 4, 4, 64)  # shapes of the first forward case: compiled once
    want = flash_attention_reference(q, k, v)
    assert_close(attention(q, k, v, impl="xla"), want, 1e-6)
    assert_close(attention(q, k, v, impl="pallas", block_sizes=SMALL), want, TOL[jnp.float32])
    assert_close(attention(q, k, v, block_sizes=SMALL), want, TOL[jnp.float32])  # auto
    assert pallas_interpret_flags(lambda *a: attention(*a), q, k, v) == ([False] if ON_GPU else [])
    assert pallas_interpret_flags(lambda *a: attention(*a, impl="pallas"), q, k, v) == [INTERPRET]
    assert pallas_interpret_flags(lambda *a: attention(*a, impl="xla"), q, k, v) == []
    with pytest.raises(ValueError, match="impl"):
        attention(q, k, v, impl="cuda")


def _sds(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("q, k, v, lengths, match", [
    (_sds((1, 8, 6, 64)), _sds((1, 8, 4, 64)), _sds((1, 8, 4, 64)), None, "multiple"),
    (_sds((1, 8, 4, 64)), _sds((1, 8, 2, 128)), _sds((1, 8, 2, 128)), None, "head dims"),
    (_sds((1, 8, 4, 72)), _sds((1, 8, 2, 72)), _sds((1, 8, 2, 72)), None, "72"),
    (_sds((1, 8, 4, 64)), _sds((1, 8, 2, 64)), _sds((1, 9, 2, 64)), None, "same shape"),
    (_sds((2, 8, 4, 64)), _sds((1, 8, 2, 64)), _sds((1, 8, 2, 64)), None, "batch"),
    (_sds((8, 4, 64)), _sds((1, 8, 2, 64)), _sds((1, 8, 2, 64)), None, r"q\[B,S,Hq,D\]"),
    (_sds((1, 8, 4, 64), jnp.bfloat16), _sds((1, 8, 2, 64)), _sds((1, 8, 2, 64)), None, "dtype"),
    (_sds((1, 8, 4, 64), jnp.int32), _sds((1, 8, 2, 64), jnp.int32),
     _sds((1, 8, 2, 64), jnp.int32), None, "float32"),
    (_sds((1, 8, 4, 64)), _sds((1, 8, 2, 64)), _sds((1, 8, 2, 64)), _sds((1,), jnp.float32), "int32"),
    (_sds((1, 8, 4, 64)), _sds((1, 8, 2, 64)), _sds((1, 8, 2, 64)), _sds((2,), jnp.int32), r"\(1,\)"),
])
def test_bad_shapes_raise(q, k, v, lengths, match):
    fns = [lambda *a: flash_attention(*a, interpret=INTERPRET),
           lambda *a: attention(*a, impl="xla")]
    if match != "72":  # the reference itself accepts any head dim
        fns.append(flash_attention_reference)
    for fn in fns:
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(fn, q, k, v, lengths)


def test_bad_block_size_raises():
    with pytest.raises(ValueError, match="power of two"):
        jax.eval_shape(lambda *a: flash_attention(*a, block_sizes=FlashBlockSizes(block_q=24),
                                                  interpret=INTERPRET),
                       _sds((1, 8, 2, 64)), _sds((1, 8, 2, 64)), _sds((1, 8, 2, 64)))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(12))
def test_random_sweep(seed):
    rng = np.random.default_rng(seed)
    kv_heads = int(rng.choice([1, 2]))
    heads = kv_heads * int(rng.choice([1, 2, 4, 8]))
    dim = int(rng.choice([64, 80, 96, 128, 256]))
    seq_q = int(rng.integers(1, 70))
    seq_k = seq_q + int(rng.integers(0, 50))
    batch = int(rng.integers(1, 3))
    causal = bool(rng.integers(0, 2))
    dtype = jnp.bfloat16 if rng.integers(0, 3) == 0 else jnp.float32
    q, k, v = make_qkv(seed, batch, seq_q, seq_k, heads, kv_heads, dim, dtype)
    lengths = jnp.asarray(rng.integers(0, seq_k + 1, size=batch), jnp.int32)
    blocks = FlashBlockSizes(block_q=int(rng.choice([16, 32])), block_k=int(rng.choice([16, 32])))
    out = flash_attention(q, k, v, lengths, causal=causal, interpret=INTERPRET, block_sizes=blocks)
    assert_close(out, naive_attention(q, k, v, causal=causal, kv_lengths=lengths), TOL[dtype])
    if dtype == jnp.float32:
        cot = normal(seed, q.shape)
        got = jax.grad(lambda q, k, v: jnp.sum(flash_attention(
            q, k, v, lengths, causal=causal, interpret=INTERPRET, block_sizes=blocks) * cot),
            (0, 1, 2))(q, k, v)
        want = jax.grad(lambda q, k, v: jnp.sum(flash_attention_reference(
            q, k, v, lengths, causal=causal) * cot), (0, 1, 2))(q, k, v)
        for g, w in zip(got, want):
            tol = 2 * GRAD_TOL_F32 if ON_GPU else 5e-5
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=tol, rtol=tol)
