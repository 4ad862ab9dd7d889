"""Flash attention (forward and backward) as Pallas kernels, with its plain-jnp reference.

Layouts: q[B,S,Hq,D], k/v[B,T,Hkv,D] with Hq % Hkv == 0 (grouped-query attention:
query head h reads key/value head h // (Hq // Hkv)); output [B,S,Hq,D].
With ``causal``, query row i sees keys j <= i + (T - S) (bottom-right aligned, so a
prefill chunk attends to a longer cache). Optional ``kv_lengths[B]`` int32 masks
keys at index >= kv_lengths[b] (right-padded ragged batches). A query row that sees
no key at all (kv_lengths 0, or S > T with causal) gives zeros and zero gradients.

Tuning: tile sizes and Triton settings come in one ``FlashBlockSizes`` (see
``hexjax.kernels.tuning``); fields left at None take the defaults of the GPU
generation the call runs on and of the head dim.

Precision: softmax statistics and accumulators are fp32 for every input dtype. For
float32 inputs every in-kernel dot asks for full fp32 products
(``precision=HIGHEST``, IEEE in Triton): without it Triton multiplies fp32 tiles in
TF32 on Ampere and later (about 1e-3 relative error). bfloat16/float16 inputs use the
tensor cores at their own precision with fp32 accumulation. The reference does the
same (HIGHEST for float32 inputs), so neither depends on ``jax_default_matmul_precision``.

Lowering: Pallas' Triton backend, selected explicitly by passing
``jax.experimental.pallas.triton.CompilerParams(num_warps, num_stages)``. Triton
runs on every CUDA GPU from Ampere on (A4000/A5000/A6000 as well as H100) and on
ROCm, which is what a heterogeneous cluster needs; Mosaic GPU targets Hopper and
Blackwell only.

Kernel structure: the forward kernel keeps one [block_q, D] query tile per program
and streams key/value tiles with an online softmax in fp32 (base-2 exponentials,
statistics saved as a base-2 log-sum-exp). Key tiles that every row of the query
tile fully sees run without masking; only the diagonal / ragged-tail tiles pay for
the mask. The backward pass has a dq kernel (one query tile, streaming keys) and a
dk/dv kernel (one key tile, streaming the queries of every query head that shares
that key/value head, so grouped-query gradients need no extra reduction).

Sequence lengths that are not block multiples are padded inside the wrapper (the
padded keys are masked, the padded query rows are dropped), and head dims 80 and
96 are zero-padded to 128, since Triton tiles must be powers of two.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from hexjax.kernels import shapes
from hexjax.kernels.tuning import FlashBlockSizes, current_device_kind

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
"""Finite stand-in for -inf: keeps max/exp free of inf - inf."""

LOG2E = math.log2(math.e)


def padded_head_dim(head_dim: int) -> int:
    """The power-of-two tile width a head dim is computed at."""
    return max(16, pl.next_power_of_2(head_dim))


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Static configuration of one flash attention call (hashable for custom_vjp and jit).

    Built by ``_resolve_config`` from a ``FlashBlockSizes`` with the tiles capped at the
    call's sequence lengths.
    """

    causal: bool
    """Bottom-right aligned causal mask."""
    sm_scale: float
    """Softmax scale applied to q.k."""
    block_q: int
    """Query rows per forward program."""
    block_k: int
    """Key rows per forward loop step."""
    block_q_dkv: int
    """Query rows per step of the dk/dv kernel."""
    block_k_dkv: int
    """Key rows per dk/dv program."""
    block_q_dq: int
    """Query rows per dq program."""
    block_k_dq: int
    """Key rows per step of the dq kernel."""
    num_warps: int
    """Triton warps for the forward kernel."""
    num_stages: int
    """Triton software-pipelining stages for the forward kernel."""
    num_warps_bwd: int
    """Triton warps for the backward kernels."""
    num_stages_bwd: int
    """Triton pipelining stages for the backward kernels."""
    interpret: bool
    """Run the kernels in Pallas interpret mode (CPU testing)."""


def _compiler_params(cfg: FlashConfig, backward: bool):
    if backward:
        return plgpu.CompilerParams(num_warps=cfg.num_warps_bwd, num_stages=cfg.num_stages_bwd)
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def dot_precision(dtype):
    """Precision the kernels give their dots for inputs of ``dtype``: HIGHEST for float32.

    The Pallas Triton lowering turns ``Precision.HIGHEST`` into ``inputPrecision = ieee``
    and DEFAULT/HIGH (also what an unset precision becomes) into ``tf32``, so float32
    tiles must ask explicitly. 16-bit inputs keep the default (their own precision,
    fp32 accumulation).
    """
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def kernel_dot(a, b, *, trans_b=False):
    """a @ b (or a @ b.T) inside a kernel, fp32 result; full fp32 products for float32 tiles."""
    return plgpu.dot(a, b, trans_b=trans_b, precision=dot_precision(a.dtype))


def _fwd_key_range(q_start, block_q, block_k, kv_len, offset, causal):
    """(n_full, n_end): key tiles [0, n_full) are fully visible, [n_full, n_end) need a mask."""
    n_end = lax.div(kv_len + block_k - 1, block_k)
    n_full = lax.div(kv_len, block_k)
    if causal:
        last_visible = q_start + block_q + offset  # one past the last key the last row sees
        n_end = jnp.minimum(n_end, lax.div(jnp.maximum(last_visible, 0) + block_k - 1, block_k))
        first_visible = q_start + offset + 1  # one past the last key the first row sees
        n_full = jnp.minimum(n_full, lax.div(jnp.maximum(first_visible, 0), block_k))
    return jnp.minimum(n_full, n_end), n_end


def _visible(q_start, k_start, rows, cols, kv_len, offset, causal, keys_first=False):
    """[rows, cols] mask of visible (query, key) pairs, or [cols, rows] with keys_first."""
    if keys_first:
        k_idx = k_start + jnp.arange(cols)[:, None]
        q_idx = q_start + jnp.arange(rows)[None, :]
    else:
        k_idx = k_start + jnp.arange(cols)[None, :]
        q_idx = q_start + jnp.arange(rows)[:, None]
    ok = k_idx < kv_len
    if causal:
        ok = jnp.logical_and(ok, k_idx <= q_idx + offset)
    return ok


def _fwd_kernel(q_ref, k_ref, v_ref, kv_len_ref, o_ref, lse_ref, *, cfg: FlashConfig, offset: int):
    block_q, block_k = cfg.block_q, cfg.block_k
    q_start = pl.program_id(0) * block_q
    kv_len = kv_len_ref[0]
    q = q_ref[...]
    scale2 = cfg.sm_scale * LOG2E

    def step(j, carry, masked):
        acc, m, l = carry
        k_start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        s = kernel_dot(q, k, trans_b=True) * scale2
        if masked:
            ok = _visible(q_start, k_start, block_q, block_k, kv_len, offset, cfg.causal)
            s = jnp.where(ok, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        if masked:
            p = jnp.where(ok, p, 0.0)
        l_new = alpha * l + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + kernel_dot(p.astype(v.dtype), v)
        return acc, m_new, l_new

    n_full, n_end = _fwd_key_range(q_start, block_q, block_k, kv_len, offset, cfg.causal)
    carry = (jnp.zeros(q.shape, jnp.float32),
             jnp.full((block_q,), MASK_VALUE, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    acc, m, l = lax.fori_loop(n_full, n_end, functools.partial(step, masked=True), carry)
    # Rows that saw no key keep l == 0: they output zeros.
    l_safe = jnp.where(l == 0.0, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(l_safe)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, kv_len_ref, dq_ref, *,
               cfg: FlashConfig, offset: int):
    block_q, block_k = cfg.block_q_dq, cfg.block_k_dq
    q_start = pl.program_id(0) * block_q
    kv_len = kv_len_ref[0]
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    scale2 = cfg.sm_scale * LOG2E

    def step(j, dq, masked):
        k_start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        p = jnp.exp2(kernel_dot(q, k, trans_b=True) * scale2 - lse[:, None])
        if masked:
            ok = _visible(q_start, k_start, block_q, block_k, kv_len, offset, cfg.causal)
            p = jnp.where(ok, p, 0.0)
        dp = kernel_dot(do, v, trans_b=True)
        ds = p * (dp - delta[:, None])
        return dq + kernel_dot(ds.astype(k.dtype), k)

    n_full, n_end = _fwd_key_range(q_start, block_q, block_k, kv_len, offset, cfg.causal)
    dq = jnp.zeros(q.shape, jnp.float32)
    dq = lax.fori_loop(0, n_full, functools.partial(step, masked=False), dq)
    dq = lax.fori_loop(n_full, n_end, functools.partial(step, masked=True), dq)
    dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, kv_len_ref, dk_ref, dv_ref, *,
                cfg: FlashConfig, offset: int, group: int, num_q_blocks: int):
    block_q, block_k = cfg.block_q_dkv, cfg.block_k_dkv
    k_start = pl.program_id(0) * block_k
    kv_len = kv_len_ref[0]
    k = k_ref[...]
    v = v_ref[...]
    scale2 = cfg.sm_scale * LOG2E

    # Query tiles [q_lo, q_mid) see this key tile partly (mask), [q_mid, end) fully.
    if cfg.causal:
        q_lo = lax.div(jnp.maximum(k_start - offset, 0), block_q)
        q_mid = lax.div(jnp.maximum(k_start + block_k - 1 - offset, 0) + block_q - 1, block_q)
    else:
        q_lo = jnp.int32(0)
        q_mid = jnp.int32(0)
    q_mid = jnp.where(k_start + block_k <= kv_len, q_mid, num_q_blocks)
    q_lo = jnp.where(k_start < kv_len, jnp.minimum(q_lo, num_q_blocks), num_q_blocks)
    q_mid = jnp.clip(q_mid, q_lo, num_q_blocks)

    def step(i, carry, head, masked):
        dk, dv = carry
        q_start = pl.multiple_of(i * block_q, block_q)
        rows = pl.ds(q_start, block_q)
        q = q_ref[rows, head, :]
        do = do_ref[rows, head, :]
        lse = lse_ref[head, rows]
        delta = delta_ref[head, rows]
        # Transposed scores [block_k, block_q] so dk/dv accumulate without transposes.
        p_t = jnp.exp2(kernel_dot(k, q, trans_b=True) * scale2 - lse[None, :])
        if masked:
            ok = _visible(q_start, k_start, block_q, block_k, kv_len, offset, cfg.causal,
                          keys_first=True)
            p_t = jnp.where(ok, p_t, 0.0)
        dv = dv + kernel_dot(p_t.astype(do.dtype), do)
        dp_t = kernel_dot(v, do, trans_b=True)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = dk + kernel_dot(ds_t.astype(q.dtype), q)
        return dk, dv

    def per_head(head, carry):
        carry = lax.fori_loop(q_lo, q_mid, functools.partial(step, head=head, masked=True), carry)
        return lax.fori_loop(q_mid, num_q_blocks, functools.partial(step, head=head, masked=False),
                             carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group, per_head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _forward(q, k, v, kv_len, cfg: FlashConfig, offset: int):
    """Padded inputs in, (o, lse) out: o[B,S,Hq,Dp], lse[B,Hq,S] (base 2, fp32)."""
    batch, seq_q, heads, dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    grid = (seq_q // cfg.block_q, batch, heads)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, offset=offset),
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, cfg.block_q, None, dim), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, seq_k, None, dim), lambda i, b, h: (b, 0, h // group, 0)),
            pl.BlockSpec((None, seq_k, None, dim), lambda i, b, h: (b, 0, h // group, 0)),
            pl.BlockSpec((None, 1), lambda i, b, h: (b, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, cfg.block_q, None, dim), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, None, cfg.block_q), lambda i, b, h: (b, h, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, seq_q), jnp.float32)],
        compiler_params=_compiler_params(cfg, backward=False),
        interpret=cfg.interpret,
        name="hexjax_flash_fwd",
    )(q, k, v, kv_len[:, None])


def _backward(q, k, v, kv_len, o, lse, do, cfg: FlashConfig, offset: int):
    """Padded inputs in, (dq, dk, dv) out, all padded."""
    batch, seq_q, heads, dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    # Row sums of o * do (elementwise, so no matmul precision is involved): [B,Hq,S].
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    kv_len2 = kv_len[:, None]

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, offset=offset),
        grid=(seq_q // cfg.block_q_dq, batch, heads),
        in_specs=[
            pl.BlockSpec((None, cfg.block_q_dq, None, dim), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, seq_k, None, dim), lambda i, b, h: (b, 0, h // group, 0)),
            pl.BlockSpec((None, seq_k, None, dim), lambda i, b, h: (b, 0, h // group, 0)),
            pl.BlockSpec((None, cfg.block_q_dq, None, dim), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, None, cfg.block_q_dq), lambda i, b, h: (b, h, i)),
            pl.BlockSpec((None, None, cfg.block_q_dq), lambda i, b, h: (b, h, i)),
            pl.BlockSpec((None, 1), lambda i, b, h: (b, 0)),
        ],
        out_specs=pl.BlockSpec((None, cfg.block_q_dq, None, dim), lambda i, b, h: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(cfg, backward=True),
        interpret=cfg.interpret,
        name="hexjax_flash_dq",
    )(q, k, v, do, lse, delta, kv_len2)

    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, offset=offset, group=group,
                          num_q_blocks=seq_q // cfg.block_q_dkv),
        grid=(seq_k // cfg.block_k_dkv, batch, kv_heads),
        in_specs=[
            pl.BlockSpec((None, seq_q, group, dim), lambda j, b, g: (b, 0, g, 0)),
            pl.BlockSpec((None, cfg.block_k_dkv, None, dim), lambda j, b, g: (b, j, g, 0)),
            pl.BlockSpec((None, cfg.block_k_dkv, None, dim), lambda j, b, g: (b, j, g, 0)),
            pl.BlockSpec((None, seq_q, group, dim), lambda j, b, g: (b, 0, g, 0)),
            pl.BlockSpec((None, group, seq_q), lambda j, b, g: (b, g, 0)),
            pl.BlockSpec((None, group, seq_q), lambda j, b, g: (b, g, 0)),
            pl.BlockSpec((None, 1), lambda j, b, g: (b, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, cfg.block_k_dkv, None, dim), lambda j, b, g: (b, j, g, 0)),
            pl.BlockSpec((None, cfg.block_k_dkv, None, dim), lambda j, b, g: (b, j, g, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(cfg, backward=True),
        interpret=cfg.interpret,
        name="hexjax_flash_dkv",
    )(q, k, v, do, lse, delta, kv_len2)
    return dq, dk, dv


def _pad_to(x, axis: int, size: int):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _padded_sizes(q, k, cfg: FlashConfig):
    q_tile = max(cfg.block_q, cfg.block_q_dq, cfg.block_q_dkv)
    k_tile = max(cfg.block_k, cfg.block_k_dq, cfg.block_k_dkv)
    seq_q = pl.cdiv(q.shape[1], q_tile) * q_tile
    seq_k = pl.cdiv(k.shape[1], k_tile) * k_tile
    return seq_q, seq_k, padded_head_dim(q.shape[3])


def _pad_inputs(q, k, v, cfg: FlashConfig):
    seq_q, seq_k, dim = _padded_sizes(q, k, cfg)
    q = _pad_to(_pad_to(q, 1, seq_q), 3, dim)
    k = _pad_to(_pad_to(k, 1, seq_k), 3, dim)
    v = _pad_to(_pad_to(v, 1, seq_k), 3, dim)
    return q, k, v


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, kv_len, cfg: FlashConfig):
    return _flash_fwd(q, k, v, kv_len, cfg)[0]


def _flash_fwd(q, k, v, kv_len, cfg: FlashConfig):
    seq_q, dim = q.shape[1], q.shape[3]
    offset = k.shape[1] - seq_q
    qp, kp, vp = _pad_inputs(q, k, v, cfg)
    o, lse = _forward(qp, kp, vp, kv_len, cfg, offset)
    # The zero-size array carries the unpadded key length through to the backward pass.
    return o[:, :seq_q, :, :dim], (qp, kp, vp, kv_len, o, lse, jnp.zeros((0, k.shape[1])))


def _flash_bwd(cfg: FlashConfig, residuals, do):
    qp, kp, vp, kv_len, o, lse, seq_k_marker = residuals
    seq_q, seq_k, dim = do.shape[1], seq_k_marker.shape[1], do.shape[3]
    # Zero cotangent on padded query rows / columns keeps them out of dk and dv.
    dop = _pad_to(_pad_to(do, 1, qp.shape[1]), 3, qp.shape[3])
    dq, dk, dv = _backward(qp, kp, vp, kv_len, o, lse, dop, cfg, seq_k - seq_q)
    return dq[:, :seq_q, :, :dim], dk[:, :seq_k, :, :dim], dv[:, :seq_k, :, :dim], None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _resolve_config(q, k, *, causal, sm_scale, interpret,
                    block_sizes: FlashBlockSizes | None) -> FlashConfig:
    seq_q, seq_k, dim = q.shape[1], k.shape[1], q.shape[3]
    if block_sizes is None:
        block_sizes = FlashBlockSizes()
    elif not isinstance(block_sizes, FlashBlockSizes):
        raise TypeError(f"flash_attention: block_sizes must be a FlashBlockSizes or None; "
                        f"got {type(block_sizes).__name__}")
    # Interpret mode (CPU) gets the generic settings; on a GPU those of its generation.
    device_kind = None if interpret else current_device_kind()
    bs = block_sizes.resolve(device_kind, dim)
    blocks = {name: getattr(bs, name) for name in FlashBlockSizes.TILE_FIELDS}
    # Short query sequences (decode, small chunks) need no more rows than they have.
    q_cap = max(16, pl.next_power_of_2(seq_q))
    for name in ("block_q", "block_q_dkv", "block_q_dq"):
        blocks[name] = min(blocks[name], q_cap)
    k_cap = max(16, pl.next_power_of_2(seq_k))
    for name in ("block_k", "block_k_dkv", "block_k_dq"):
        blocks[name] = min(blocks[name], k_cap)
    return FlashConfig(
        causal=bool(causal),
        sm_scale=float(1.0 / math.sqrt(dim) if sm_scale is None else sm_scale),
        num_warps=bs.num_warps,
        num_stages=bs.num_stages,
        num_warps_bwd=bs.num_warps_bwd,
        num_stages_bwd=bs.num_stages_bwd,
        interpret=bool(interpret),
        **blocks,
    )


@functools.partial(jax.jit, static_argnames=("cfg",))
def _flash_jit(q, k, v, kv_lengths, cfg: FlashConfig):
    seq_k = k.shape[1]
    if kv_lengths is None:
        kv_len = jnp.full((q.shape[0],), seq_k, jnp.int32)
    else:
        kv_len = jnp.clip(kv_lengths, 0, seq_k)
    return _flash(q, k, v, kv_len, cfg)


def flash_attention(q, k, v, kv_lengths=None, *, causal: bool = True, sm_scale: float | None = None,
                    interpret: bool = False, block_sizes: FlashBlockSizes | None = None):
    """Pallas flash attention, differentiable in q, k and v.

    Args:
      q: [B, S, Hq, D] float32/bfloat16/float16.
      k, v: [B, T, Hkv, D], same dtype, Hq % Hkv == 0; D in (64, 80, 96, 128, 256).
      kv_lengths: optional [B] int32; keys at index >= kv_lengths[b] are masked.
      causal: query row i sees keys j <= i + (T - S).
      sm_scale: softmax scale, default 1/sqrt(D).
      interpret: run in Pallas interpret mode (CPU).
      block_sizes: tiles and Triton settings; None (or None fields) take
        ``FlashBlockSizes.default`` for the GPU the call runs on and the head dim.

    Returns:
      [B, S, Hq, D] in q's dtype. float32 inputs are computed with full fp32 products.

    Calls with the same shapes and resolved settings share one compiled program, whichever
    way (directly, through ``dispatch``) they arrive.
    """
    shapes.check_attention(q, k, v, kv_lengths, where="flash_attention")
    shapes.check_head_dim("flash_attention", q.shape[3])
    cfg = _resolve_config(q, k, causal=causal, sm_scale=sm_scale, interpret=interpret,
                          block_sizes=block_sizes)
    return _flash_jit(q, k, v, kv_lengths, cfg)


def attention_mask(seq_q: int, seq_k: int, causal: bool, kv_lengths=None):
    """Boolean visibility [B or 1, 1, S, T]: True where query row i may attend to key j."""
    rows = jnp.arange(seq_q)[:, None]
    cols = jnp.arange(seq_k)[None, :]
    mask = jnp.ones((seq_q, seq_k), bool)
    if causal:
        mask = cols <= rows + (seq_k - seq_q)
    mask = mask[None, None]
    if kv_lengths is not None:
        mask = jnp.logical_and(mask, (cols[None] < kv_lengths[:, None, None])[:, None])
    return mask


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale"))
def flash_attention_reference(q, k, v, kv_lengths=None, *, causal: bool = True,
                              sm_scale: float | None = None):
    """Plain-jnp attention with the same layouts, masking and conventions as flash_attention.

    float32 inputs get full fp32 matmuls (``Precision.HIGHEST``) whatever
    ``jax_default_matmul_precision`` says, like the kernel.
    """
    shapes.check_attention(q, k, v, kv_lengths, where="flash_attention_reference")
    batch, seq_q, heads, dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(dim) if sm_scale is None else sm_scale
    precision = dot_precision(q.dtype)
    qg = q.reshape(batch, seq_q, kv_heads, heads // kv_heads, dim)
    logits = jnp.einsum("bsgrd,btgd->bgrst", qg, k, preferred_element_type=jnp.float32,
                        precision=precision) * scale
    mask = attention_mask(seq_q, seq_k, causal, kv_lengths)[:, :, None]  # [B|1,1,1,S,T]
    logits = jnp.where(mask, logits, MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1)
    weights = jnp.where(mask, weights, 0.0)  # rows with no visible key give zeros
    out = jnp.einsum("bgrst,btgd->bsgrd", weights, v.astype(jnp.float32), precision=precision)
    return out.reshape(q.shape).astype(q.dtype)
