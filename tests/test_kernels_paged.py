"""Paged decode attention and KV-cache writes against references and naive oracles.

The kernels run natively when the default backend is a GPU (``JAX_PLATFORMS=cuda``;
tests/conftest.py defaults to cpu) and in Pallas interpret mode elsewhere: every kernel call
passes ``INTERPRET``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hexjax.kernels import (decode_attention, flash_attention_reference, paged_attention,
                            paged_attention_reference, write_kv, write_kv_reference)
from hexjax.kernels.dispatch import stage_kernels
from hexjax.kernels.kv_cache import write_kv as write_kv_pallas
from hexjax.kernels import testing as kernel_testing
from hexjax.kernels.testing import default_interpret, pallas_interpret_flags, tolerance
from hexjax.kernels.tuning import PagedBlockSizes, WriteBlockSizes

INTERPRET = default_interpret()
"""False when the default backend is a GPU: the kernels then compile through Triton."""
ON_GPU = not INTERPRET
PLATFORM = jax.default_backend()

# float32 must be fp32-accurate natively too: 1e-4 on a GPU, where a TF32 dot would miss it.
TOL = {dt: tolerance(dt, native=ON_GPU) for dt in (jnp.float32, jnp.bfloat16, jnp.float16)}


default_matmul_precision = pytest.fixture(autouse=True)(kernel_testing.default_matmul_precision)


def naive_decode(q, k_pages, v_pages, block_tables, lengths):
    """Copy each sequence's tokens out page by page, repeat KV heads, softmax in fp32."""
    q, k_pages, v_pages = (np.asarray(x, np.float32) for x in (q, k_pages, v_pages))
    batch, heads, dim = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    out = np.zeros_like(q)
    for b in range(batch):
        n = int(lengths[b])
        if n == 0:
            continue
        rows = [(int(block_tables[b, t // page_size]), t % page_size) for t in range(n)]
        k = np.stack([k_pages[:, p, r] for p, r in rows], axis=1)  # [Hkv, n, D]
        v = np.stack([v_pages[:, p, r] for p, r in rows], axis=1)
        k = np.repeat(k, heads // kv_heads, axis=0)
        v = np.repeat(v, heads // kv_heads, axis=0)
        logits = np.einsum("hd,hnd->hn", q[b], k) / np.sqrt(dim)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out[b] = np.einsum("hn,hnd->hd", weights, v)
    return out


def make_cache(seed, batch, heads, kv_heads, dim, page_size, max_pages, num_pages,
               dtype=jnp.float32, poison_unused=False):
    """Random pages, shuffled block tables, ragged lengths (first one 0); optionally NaN past each length."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, heads, dim)).astype(np.float32)
    k_pages = rng.normal(size=(kv_heads, num_pages, page_size, dim)).astype(np.float32)
    v_pages = rng.normal(size=(kv_heads, num_pages, page_size, dim)).astype(np.float32)
    tables = rng.permutation(num_pages)[:batch * max_pages].reshape(batch, max_pages)
    lengths = rng.integers(1, max_pages * page_size + 1, size=batch)
    lengths[0] = 0
    if poison_unused:
        for b in range(batch):
            for t in range(int(lengths[b]), max_pages * page_size):
                p, r = tables[b, t // page_size], t % page_size
                k_pages[:, p, r] = np.nan
                v_pages[:, p, r] = np.inf
            # Entries past the last page may be anything, even outside the pool.
            tables[b, -(-int(lengths[b]) // page_size):] = -7
    cast = lambda x: jnp.asarray(x.astype(jnp.dtype(dtype)))  # on the host: no convert to compile
    return (cast(q), cast(k_pages), cast(v_pages), jnp.asarray(tables, jnp.int32),
            jnp.asarray(lengths, jnp.int32))


def assert_close(actual, expected, tol):
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                               atol=tol, rtol=tol)


PAGED_CASES = [
    # batch, Hq, Hkv, D, page_size, max_pages, num_pages, num_splits, dtype
    (3, 4, 4, 64, 8, 6, 24, 2, jnp.float32),
    (3, 8, 2, 64, 16, 5, 20, None, jnp.float32),
    (2, 8, 1, 64, 32, 3, 8, 1, jnp.float32),
    (2, 4, 2, 80, 16, 4, 10, 4, jnp.float16),
    (3, 8, 4, 64, 16, 4, 16, 2, jnp.bfloat16),
]


@pytest.mark.parametrize("case", PAGED_CASES, ids=lambda c: "-".join(map(str, c[:8])))
def test_paged_matches_reference_and_naive(case):
    *sizes, num_splits, dtype = case
    q, k_pages, v_pages, tables, lengths = make_cache(0, *sizes, dtype=dtype)
    out = paged_attention(q, k_pages, v_pages, tables, lengths, interpret=INTERPRET,
                          block_sizes=PagedBlockSizes(num_splits=num_splits))
    assert out.shape == q.shape and out.dtype == q.dtype
    naive = naive_decode(q, k_pages, v_pages, np.asarray(tables), np.asarray(lengths))
    assert_close(out, paged_attention_reference(q, k_pages, v_pages, tables, lengths), TOL[dtype])
    assert_close(out, naive, TOL[dtype])
    assert not np.any(np.asarray(out[0], np.float32))  # length 0 gives zeros


def test_unused_rows_and_table_entries_are_never_read():
    # The shapes and settings of the first PAGED_CASES entry: the same compiled kernel.
    q, k_pages, v_pages, tables, lengths = make_cache(1, 3, 4, 4, 64, 8, 6, 24, poison_unused=True)
    out = paged_attention(q, k_pages, v_pages, tables, lengths, interpret=INTERPRET,
                          block_sizes=PagedBlockSizes(num_splits=2))
    ref = paged_attention_reference(q, k_pages, v_pages, tables, lengths)
    assert np.all(np.isfinite(np.asarray(out))) and np.all(np.isfinite(np.asarray(ref)))
    assert_close(out, ref, TOL[jnp.float32])
    assert_close(out, naive_decode(q, k_pages, v_pages, np.asarray(tables), np.asarray(lengths)),
                 TOL[jnp.float32])


def _write_inputs(seed, batch, tokens, kv_heads, dim, page_size, max_pages, num_pages):
    rng = np.random.default_rng(seed)
    k_pages = jnp.asarray(rng.normal(size=(kv_heads, num_pages, page_size, dim)), jnp.float32)
    v_pages = jnp.asarray(rng.normal(size=(kv_heads, num_pages, page_size, dim)), jnp.float32)
    k_new = jnp.asarray(rng.normal(size=(batch, tokens, kv_heads, dim)), jnp.float32)
    v_new = jnp.asarray(rng.normal(size=(batch, tokens, kv_heads, dim)), jnp.float32)
    tables = jnp.asarray(rng.permutation(num_pages)[:batch * max_pages].reshape(batch, max_pages),
                         jnp.int32)
    return k_pages, v_pages, k_new, v_new, tables


def test_write_kv_in_place_with_donated_pages():
    """The serving loop's write: pages donated to a jit, written in place; the result equals the
    reference and an explicit loop, rows nobody writes keep their values, off-table writes drop."""
    page_size, max_pages = 8, 4
    k_pages, v_pages, k_new, v_new, tables = _write_inputs(2, 3, 11, 2, 64, page_size, max_pages, 14)
    # Third sequence runs past its table: those writes must be dropped.
    positions = jnp.array([0, 13, 27], jnp.int32)
    want = write_kv_reference(k_pages, v_pages, k_new, v_new, tables, positions)
    before_k, before_v = np.array(k_pages), np.array(v_pages)
    expected_k, expected_v = before_k.copy(), before_v.copy()
    written = np.zeros(k_pages.shape[1:3], bool)  # [num_pages, page_size]
    for b in range(3):
        for n in range(11):
            pos = int(positions[b]) + n
            if pos // page_size < max_pages:
                page, row = int(tables[b, pos // page_size]), pos % page_size
                expected_k[:, page, row] = np.asarray(k_new[b, n])
                expected_v[:, page, row] = np.asarray(v_new[b, n])
                written[page, row] = True
    step = jax.jit(lambda kp, vp, *rest: write_kv_pallas(
        kp, vp, *rest, interpret=INTERPRET, block_sizes=WriteBlockSizes(block_n=4)),
        donate_argnums=(0, 1))
    k_ptr = k_pages.unsafe_buffer_pointer()
    got = step(k_pages, v_pages, k_new, v_new, tables, positions)
    # Donation is honoured and the result lives in the donated buffer: no copy of the pool.
    assert k_pages.is_deleted() and v_pages.is_deleted()
    assert got[0].unsafe_buffer_pointer() == k_ptr
    for g, w, e, before in zip(got, want, (expected_k, expected_v), (before_k, before_v)):
        g = np.asarray(g)
        np.testing.assert_array_equal(g, e)
        np.testing.assert_array_equal(np.asarray(w), e)
        np.testing.assert_array_equal(g[:, ~written], before[:, ~written])  # untouched rows


def test_write_kv_head_dim_80():
    k_pages, v_pages, k_new, v_new, tables = _write_inputs(3, 2, 3, 1, 80, 16, 2, 5)
    positions = jnp.array([5, 30], jnp.int32)
    got = write_kv_pallas(k_pages, v_pages, k_new, v_new, tables, positions, interpret=INTERPRET)
    want = write_kv_reference(k_pages, v_pages, k_new, v_new, tables, positions)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_prefill_then_decode_equals_contiguous_attention(impl):
    """A stage's write_kv (prompt, then one token) + decode attention == attention over the
    contiguous cache. The kernels come from stage_kernels for this backend's platform."""
    batch, heads, kv_heads, dim, page_size, max_pages = 2, 4, 2, 64, 8, 5
    write, _, decode = stage_kernels(impl, dim, PLATFORM)
    rng = np.random.default_rng(4)
    prompt = np.array([13, 30])  # ragged prompts, right padded to 30
    k_ctx = jnp.asarray(rng.normal(size=(batch, 31, kv_heads, dim)), jnp.float32)
    v_ctx = jnp.asarray(rng.normal(size=(batch, 31, kv_heads, dim)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(batch, heads, dim)), jnp.float32)
    num_pages = batch * max_pages + 3
    tables = jnp.asarray(rng.permutation(num_pages)[:batch * max_pages].reshape(batch, max_pages),
                         jnp.int32)
    k_pages = jnp.zeros((kv_heads, num_pages, page_size, dim), jnp.float32)
    v_pages = jnp.zeros_like(k_pages)
    zeros = jnp.zeros((batch,), jnp.int32)
    k_pages, v_pages = write(k_pages, v_pages, k_ctx[:, :30], v_ctx[:, :30], tables, zeros)
    # Decode token: each sequence writes at its own length, then attends over length + 1.
    new_k = jnp.stack([k_ctx[b, prompt[b]] for b in range(batch)])[:, None]
    new_v = jnp.stack([v_ctx[b, prompt[b]] for b in range(batch)])[:, None]
    positions = jnp.asarray(prompt, jnp.int32)
    k_pages, v_pages = write(k_pages, v_pages, new_k, new_v, tables, positions)
    lengths = positions + 1
    out = decode(q, k_pages, v_pages, tables, lengths)
    # Contiguous cache: the prompt then the decode token at index prompt[b].
    want = flash_attention_reference(q[:, None], k_ctx, v_ctx, lengths, causal=False)[:, 0]
    assert_close(out, want, TOL[jnp.float32])


def test_decode_dispatch_auto_picks_pallas_exactly_on_gpu():
    args = make_cache(5, 2, 4, 2, 64, 16, 2, 4)
    assert pallas_interpret_flags(lambda *a: decode_attention(*a), *args) == (
        [False] if ON_GPU else [])
    assert pallas_interpret_flags(lambda *a: decode_attention(*a, impl="pallas"), *args) == [
        INTERPRET]
    assert pallas_interpret_flags(lambda *a: decode_attention(*a, impl="xla"), *args) == []
    q, k_pages, v_pages, tables, _ = args
    new = jnp.zeros((2, 3, 2, 64), jnp.float32)
    write_args = (k_pages, v_pages, new, new, tables, jnp.zeros((2,), jnp.int32))
    assert pallas_interpret_flags(lambda *a: write_kv(*a), *write_args) == (
        [False] if ON_GPU else [])
    assert pallas_interpret_flags(lambda *a: write_kv(*a, impl="pallas"), *write_args) == [
        INTERPRET]


STAGE_PICKS = [
    # impl, head_dim, platform, kernels expected (None: the references), interpret
    ("auto", 64, "cpu", False, None),
    ("auto", 128, "tpu", False, None),
    ("auto", 128, "gpu", True, False),
    ("auto", 80, "cuda", True, False),
    ("auto", 256, "rocm", True, False),
    ("auto", 32, "gpu", False, None),      # small test model: no kernel for D=32
    ("pallas", 64, "cpu", True, True),     # tests: interpret mode
    ("pallas", 64, "CUDA", True, False),
    ("xla", 128, "gpu", False, None),
]


@pytest.mark.parametrize("impl, head_dim, platform, pallas, interpret", STAGE_PICKS)
def test_stage_kernels_pick(impl, head_dim, platform, pallas, interpret):
    """stage_kernels picks by the stage's platform, not by where the test runs; shapes only."""
    write, attend, decode = stage_kernels(impl, head_dim, platform)
    sds = jax.ShapeDtypeStruct
    f32, i32 = jnp.float32, jnp.int32
    pages = sds((2, 6, 16, head_dim), f32)
    tables, ints = sds((2, 3), i32), sds((2,), i32)
    new = sds((2, 5, 2, head_dim), f32)
    qkv = (sds((2, 5, 4, head_dim), f32), new, new)
    want = [interpret] if pallas else []
    assert pallas_interpret_flags(write, pages, pages, new, new, tables, ints) == want
    assert pallas_interpret_flags(attend, *qkv) == want
    assert pallas_interpret_flags(decode, sds((2, 4, head_dim), f32), pages, pages, tables,
                                  ints) == want
    assert jax.eval_shape(attend, *qkv).shape == qkv[0].shape


def test_stage_kernels_attention_is_causal_and_errors():
    _, attend, _ = stage_kernels("xla", 64, "cpu")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 1, 64)), jnp.float32)
    y = x.at[:, 2].set(100.0)  # a change to the last key/value must not reach the earlier rows
    np.testing.assert_array_equal(np.asarray(attend(x, x, x))[:, :2],
                                  np.asarray(attend(x, y, y))[:, :2])
    with pytest.raises(ValueError, match=r"'auto', 'pallas', 'xla'"):
        stage_kernels("triton", 64, "gpu")
    with pytest.raises(ValueError, match="head dim 32"):
        stage_kernels("pallas", 32, "cpu")
    write, attend, decode = stage_kernels("pallas", 128, "gpu", device_kind="NVIDIA RTX A4000")
    assert attend.keywords["block_sizes"].block_q == 64   # that generation's tiles
    assert decode.keywords["block_sizes"].target_programs == 256


def _sds(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


GOOD = dict(q=_sds((2, 8, 64)), k_pages=_sds((2, 10, 16, 64)), v_pages=_sds((2, 10, 16, 64)),
            block_tables=_sds((2, 4), jnp.int32), lengths=_sds((2,), jnp.int32))


@pytest.mark.parametrize("change, match", [
    (dict(q=_sds((2, 6, 64)), k_pages=_sds((4, 10, 16, 64)), v_pages=_sds((4, 10, 16, 64))),
     "multiple"),
    (dict(q=_sds((2, 8, 128))), "head dims"),
    (dict(v_pages=_sds((2, 10, 8, 64))), "k_pages and v_pages"),
    (dict(block_tables=_sds((2, 4), jnp.float32)), "int32"),
    (dict(block_tables=_sds((8,), jnp.int32)), "block_tables"),
    (dict(block_tables=_sds((3, 4), jnp.int32)), "block_tables"),
    (dict(lengths=_sds((2,), jnp.uint8)), "int32"),
    (dict(lengths=_sds((3,), jnp.int32)), r"\(2,\)"),
    (dict(q=_sds((2, 1, 8, 64))), r"q must be \[B,Hq,D\]"),
    (dict(q=_sds((2, 8, 72)), k_pages=_sds((2, 10, 16, 72)), v_pages=_sds((2, 10, 16, 72))), "72"),
])
def test_paged_bad_shapes_raise(change, match):
    args = {**GOOD, **change}
    fns = [lambda *a: paged_attention(*a, interpret=INTERPRET),
           lambda *a: decode_attention(*a, impl="xla")]
    if match != "72":
        fns.append(paged_attention_reference)
    for fn in fns:
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(fn, *args.values())


def test_paged_page_size_must_be_power_of_two():
    args = {**GOOD, "k_pages": _sds((2, 10, 12, 64)), "v_pages": _sds((2, 10, 12, 64))}
    with pytest.raises(ValueError, match="power of two"):
        jax.eval_shape(lambda *a: paged_attention(*a, interpret=INTERPRET), *args.values())


@pytest.mark.parametrize("change, match", [
    (dict(k_new=_sds((2, 3, 4, 64)), v_new=_sds((2, 3, 4, 64))), "heads"),
    (dict(v_new=_sds((2, 4, 2, 64))), "k_new and v_new"),
    (dict(k_new=_sds((2, 3, 2, 64), jnp.bfloat16), v_new=_sds((2, 3, 2, 64), jnp.bfloat16)), "dtype"),
    (dict(positions=_sds((2, 1), jnp.int32)), "positions"),
    (dict(k_new=_sds((2, 80, 2, 64)), v_new=_sds((2, 80, 2, 64))), "cannot fit"),
])
def test_write_bad_shapes_raise(change, match):
    args = dict(k_pages=_sds((2, 10, 16, 64)), v_pages=_sds((2, 10, 16, 64)),
                k_new=_sds((2, 3, 2, 64)), v_new=_sds((2, 3, 2, 64)),
                block_tables=_sds((2, 4), jnp.int32), positions=_sds((2,), jnp.int32))
    args.update(change)
    for fn in (lambda *a: write_kv_pallas(*a, interpret=INTERPRET), write_kv_reference,
               lambda *a: write_kv(*a, impl="xla")):
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(fn, *args.values())


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10))
def test_paged_random_sweep(seed):
    rng = np.random.default_rng(seed)
    kv_heads = int(rng.choice([1, 2, 4]))
    heads = kv_heads * int(rng.choice([1, 2, 4, 8]))
    dim = int(rng.choice([64, 80, 96, 128]))
    page_size = int(rng.choice([8, 16, 32]))
    max_pages = int(rng.integers(1, 9))
    batch = int(rng.integers(1, 5))
    num_pages = batch * max_pages + int(rng.integers(0, 5))
    dtype = jnp.bfloat16 if rng.integers(0, 3) == 0 else jnp.float32
    q, k_pages, v_pages, tables, lengths = make_cache(seed, batch, heads, kv_heads, dim, page_size,
                                                      max_pages, num_pages, dtype=dtype,
                                                      poison_unused=dtype == jnp.float32)
    num_splits = int(rng.choice([1, 2, 4, 8]))
    out = paged_attention(q, k_pages, v_pages, tables, lengths, interpret=INTERPRET,
                          block_sizes=PagedBlockSizes(num_splits=num_splits))
    assert_close(out, naive_decode(q, k_pages, v_pages, np.asarray(tables), np.asarray(lengths)),
                 TOL[dtype])
