"""Paged decode attention (one new token per sequence) as a Pallas kernel, with its reference.

Layouts: q[B,Hq,D]; k_pages/v_pages[Hkv, num_pages, page_size, D]; block_tables[B, M]
int32 lists each sequence's page ids in order; lengths[B] int32 counts the cached
tokens of each sequence (token t of sequence b lives at page block_tables[b, t //
page_size], row t % page_size). Table entries past a sequence's last page are never
read, so they may hold anything. A sequence of length 0 gives zeros.

Lowering: Pallas' Triton backend (``plgpu.CompilerParams`` passed explicitly), for
the same reason as flash attention: it covers Ampere, Hopper and ROCm alike.

Work split: one program per (sequence, key/value head, split). All query heads that
share a key/value head are one [group, D] tile (padded to 16 rows, the smallest
Triton dot), so each page is read once per key/value head. The pages of a sequence
are cut into ``num_splits`` contiguous ranges (split-K): with batch 1 and a long
context there are still enough programs to fill the GPU. Each split writes its
normalised partial output and log-sum-exp; a small jnp epilogue combines them.
Decode is bound by reading K/V, so the masking of the ragged last block is always on.

Tuning: ``PagedBlockSizes`` (pages per loop step, splits, Triton settings), defaults per
GPU generation from ``hexjax.kernels.tuning``. Precision: both dots of float32 inputs ask
for full fp32 products (no TF32), as in flash attention.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from hexjax.kernels import shapes
from hexjax.kernels.flash_attention import MASK_VALUE, dot_precision, kernel_dot, padded_head_dim
from hexjax.kernels.tuning import PagedBlockSizes, current_device_kind

TARGET_PROGRAMS = PagedBlockSizes.default().target_programs
"""Generic number of programs the automatic num_splits aims for (several per SM)."""


def _paged_kernel(q_ref, k_ref, v_ref, table_ref, length_ref, o_ref, lse_ref, *,
                  sm_scale: float, pages_per_block: int, pages_per_split: int,
                  page_size: int, num_pages: int, head_dim: int):
    split = pl.program_id(2)
    length = length_ref[0]
    block_k = pages_per_block * page_size
    dim_p = q_ref.shape[-1]
    q = q_ref[...]
    seq_pages = lax.div(length + page_size - 1, page_size)
    first_page = split * pages_per_split
    local_pages = jnp.clip(seq_pages - first_page, 0, pages_per_split)
    num_blocks = lax.div(local_pages + pages_per_block - 1, pages_per_block)
    tile = (pages_per_block, page_size, dim_p)
    if dim_p != head_dim:
        rows_idx = jnp.broadcast_to(jnp.arange(page_size)[None, :, None], tile)
        cols_idx = jnp.broadcast_to(jnp.arange(dim_p)[None, None, :], tile)
        col_mask = cols_idx < head_dim

    def load(ref, ids):
        if dim_p == head_dim:
            x = ref[ids]
        else:
            # Head dims below the tile width: masked gather, never touching the next row.
            pages_idx = jnp.broadcast_to(ids[:, None, None], tile)
            x = plgpu.load(ref.at[pages_idx, rows_idx, cols_idx], mask=col_mask, other=0.0)
        return x.reshape(block_k, dim_p)

    def step(i, carry):
        acc, m, l = carry
        local = i * pages_per_block + jnp.arange(pages_per_block)
        ids = table_ref[pl.ds(pl.multiple_of(i * pages_per_block, pages_per_block),
                              pages_per_block)]
        # Table entries past the sequence may be garbage: point them at page 0.
        ids = jnp.where(local < local_pages, ids, 0)
        ids = jnp.clip(ids, 0, num_pages - 1)
        k = load(k_ref, ids)
        v = load(v_ref, ids)
        token = (first_page + i * pages_per_block) * page_size + jnp.arange(block_k)
        ok = token < length
        # Unwritten rows may hold NaN/inf: keep them out of both products.
        v = jnp.where(ok[:, None], v, jnp.zeros_like(v))
        s = kernel_dot(q, k, trans_b=True)
        s = jnp.where(ok[None, :], s * sm_scale, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(ok[None, :], jnp.exp(s - m_new[:, None]), 0.0)
        l_new = alpha * l + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + kernel_dot(p.astype(v.dtype), v)
        return acc, m_new, l_new

    rows = q.shape[0]
    carry = (jnp.zeros((rows, dim_p), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
             jnp.zeros((rows,), jnp.float32))
    acc, m, l = lax.fori_loop(0, num_blocks, step, carry)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = acc / l_safe[:, None]
    lse_ref[...] = jnp.where(empty, MASK_VALUE, m + jnp.log(l_safe))


def default_num_splits(batch: int, kv_heads: int, max_pages: int, pages_per_block: int,
                       target_programs: int = TARGET_PROGRAMS) -> int:
    """Splits so that batch * kv_heads * splits reaches target_programs, within the pages there are."""
    useful = pl.cdiv(max_pages, pages_per_block)
    wanted = pl.cdiv(target_programs, batch * kv_heads)
    return max(1, min(pl.next_power_of_2(wanted), pl.next_power_of_2(useful)))


@dataclasses.dataclass(frozen=True)
class PagedConfig:
    """Static configuration of one paged_attention call (resolved from PagedBlockSizes)."""

    sm_scale: float
    pages_per_block: int
    num_splits: int
    pages_per_split: int
    num_warps: int
    num_stages: int
    interpret: bool


def _resolve_config(q, k_pages, block_tables, *, sm_scale, interpret,
                    block_sizes: PagedBlockSizes | None) -> PagedConfig:
    batch, _, dim = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    max_pages = block_tables.shape[1]
    if block_sizes is None:
        block_sizes = PagedBlockSizes()
    elif not isinstance(block_sizes, PagedBlockSizes):
        raise TypeError(f"paged_attention: block_sizes must be a PagedBlockSizes or None; "
                        f"got {type(block_sizes).__name__}")
    bs = block_sizes.resolve(None if interpret else current_device_kind(), dim)
    min_pages = max(1, 16 // page_size)  # Triton dots need >= 16 keys
    pages_per_block = bs.pages_per_block
    if pages_per_block is None:
        pages_per_block = max(min_pages, 64 // page_size)
    if pages_per_block < min_pages:
        raise ValueError(f"paged_attention: pages_per_block={pages_per_block} must be a power of "
                         f"two with pages_per_block * page_size >= 16 (page_size {page_size})")
    num_splits = bs.num_splits
    if num_splits is None:
        num_splits = default_num_splits(batch, kv_heads, max_pages, pages_per_block,
                                        bs.target_programs)
    # Each split covers a power-of-two number of whole blocks of pages.
    pages_per_split = pl.next_power_of_2(
        pl.cdiv(pl.cdiv(max_pages, num_splits), pages_per_block)) * pages_per_block
    return PagedConfig(
        sm_scale=float(1.0 / math.sqrt(dim) if sm_scale is None else sm_scale),
        pages_per_block=pages_per_block, num_splits=num_splits, pages_per_split=pages_per_split,
        num_warps=bs.num_warps, num_stages=bs.num_stages, interpret=bool(interpret))


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, sm_scale: float | None = None,
                    interpret: bool = False, block_sizes: PagedBlockSizes | None = None):
    """One decode step of attention over a paged KV cache.

    Args:
      q: [B, Hq, D] float32/bfloat16/float16.
      k_pages, v_pages: [Hkv, num_pages, page_size, D], q's dtype; page_size a power of two.
      block_tables: [B, max_pages_per_seq] int32 page ids, in order.
      lengths: [B] int32 cached tokens per sequence (0 gives zeros).
      sm_scale: softmax scale, default 1/sqrt(D).
      interpret: run in Pallas interpret mode (CPU).
      block_sizes: pages per loop step (default: 64 tokens, at least 16), split-K ranges
        per sequence (default: enough programs to fill the GPU) and Triton settings;
        None fields take ``PagedBlockSizes.default`` for the GPU the call runs on.

    Returns:
      [B, Hq, D] in q's dtype.
    """
    shapes.check_paged(q, k_pages, v_pages, block_tables, lengths, where="paged_attention")
    shapes.check_head_dim("paged_attention", q.shape[2])
    shapes.check_page_size("paged_attention", k_pages.shape[2])
    cfg = _resolve_config(q, k_pages, block_tables, sm_scale=sm_scale, interpret=interpret,
                          block_sizes=block_sizes)
    return _paged_jit(q, k_pages, v_pages, block_tables, lengths, cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _paged_jit(q, k_pages, v_pages, block_tables, lengths, cfg: PagedConfig):
    batch, heads, dim = q.shape
    kv_heads, num_pages, page_size, _ = k_pages.shape
    max_pages = block_tables.shape[1]
    group = heads // kv_heads
    num_splits, pages_per_split = cfg.num_splits, cfg.pages_per_split
    table = jnp.pad(block_tables, ((0, 0), (0, num_splits * pages_per_split - max_pages)))
    table = table.reshape(batch, num_splits, pages_per_split)

    dim_p = padded_head_dim(dim)
    rows = max(16, pl.next_power_of_2(group))
    qg = q.reshape(batch, kv_heads, group, dim)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - group), (0, dim_p - dim)))

    kernel = functools.partial(
        _paged_kernel, sm_scale=cfg.sm_scale, pages_per_block=cfg.pages_per_block,
        pages_per_split=pages_per_split, page_size=page_size, num_pages=num_pages, head_dim=dim)
    out, lse = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, num_splits),
        in_specs=[
            pl.BlockSpec((None, None, rows, dim_p), lambda b, h, s: (b, h, 0, 0)),
            pl.BlockSpec((None, num_pages, page_size, dim_p), lambda b, h, s: (h, 0, 0, 0)),
            pl.BlockSpec((None, num_pages, page_size, dim_p), lambda b, h, s: (h, 0, 0, 0)),
            pl.BlockSpec((None, None, pages_per_split), lambda b, h, s: (b, s, 0)),
            pl.BlockSpec((None, 1), lambda b, h, s: (b, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, dim_p), lambda b, h, s: (b, s, h, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, s, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, num_splits, kv_heads, rows, dim_p), jnp.float32),
            jax.ShapeDtypeStruct((batch, num_splits, kv_heads, rows), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=cfg.interpret,
        name="hexjax_paged_attention",
    )(qg, k_pages, v_pages, table, lengths[:, None])
    return combine_splits(out[..., :group, :dim], lse[..., :group]).reshape(q.shape).astype(q.dtype)


def combine_splits(out, lse):
    """Merge split-K partials: out[B,splits,...,D] normalised per split, lse[B,splits,...]."""
    top = jnp.max(lse, axis=1, keepdims=True)
    weight = jnp.exp(lse - top)  # empty splits carry MASK_VALUE and weigh ~0 unless all are empty
    weight = jnp.where(lse <= MASK_VALUE, 0.0, weight)
    total = jnp.sum(weight, axis=1)
    merged = jnp.sum(out * weight[..., None], axis=1)
    return merged / jnp.where(total == 0.0, 1.0, total)[..., None]


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def paged_attention_reference(q, k_pages, v_pages, block_tables, lengths, *,
                              sm_scale: float | None = None):
    """Plain-jnp paged decode attention: gather each sequence's pages, then masked softmax."""
    shapes.check_paged(q, k_pages, v_pages, block_tables, lengths,
                       where="paged_attention_reference")
    batch, heads, dim = q.shape
    kv_heads, num_pages, page_size, _ = k_pages.shape
    max_pages = block_tables.shape[1]
    scale = 1.0 / math.sqrt(dim) if sm_scale is None else sm_scale
    precision = dot_precision(q.dtype)
    tokens = max_pages * page_size
    valid = jnp.arange(tokens)[None, :] < lengths[:, None]  # [B, T]
    pages = jnp.clip(block_tables, 0, num_pages - 1)
    k = k_pages[:, pages].reshape(kv_heads, batch, tokens, dim).astype(jnp.float32)
    v = v_pages[:, pages].reshape(kv_heads, batch, tokens, dim).astype(jnp.float32)
    k = jnp.where(valid[None, :, :, None], k, 0.0)
    v = jnp.where(valid[None, :, :, None], v, 0.0)
    qg = q.reshape(batch, kv_heads, heads // kv_heads, dim).astype(jnp.float32)
    logits = jnp.einsum("bgrd,gbtd->bgrt", qg, k, precision=precision) * scale
    mask = valid[:, None, None, :]
    weights = jax.nn.softmax(jnp.where(mask, logits, MASK_VALUE), axis=-1)
    weights = jnp.where(mask, weights, 0.0)
    out = jnp.einsum("bgrt,gbtd->bgrd", weights, v, precision=precision)
    return out.reshape(q.shape).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def paged_chunk_attention_reference(q, k_pages, v_pages, block_tables, positions, *,
                                    sm_scale: float | None = None):
    """Plain-jnp attention of a chunk of queries over each sequence's pages (chunked prefill).

    q[B,S,Hq,D] are the queries of tokens ``positions[b] + i`` (i < S) whose keys and values
    are already written; query i of row b sees the cached tokens ``0 .. positions[b] + i``.
    Pages as in ``paged_attention``. Returns [B,S,Hq,D].
    """
    if q.ndim != 4:
        raise ValueError(f"paged_chunk_attention_reference: q must be [B,S,Hq,D], got shape {q.shape}")
    shapes.check_paged(q[:, 0], k_pages, v_pages, block_tables, positions,
                       where="paged_chunk_attention_reference")
    batch, seq, heads, dim = q.shape
    kv_heads, num_pages, page_size, _ = k_pages.shape
    tokens = block_tables.shape[1] * page_size
    scale = 1.0 / math.sqrt(dim) if sm_scale is None else sm_scale
    precision = dot_precision(q.dtype)
    query_pos = positions[:, None] + jnp.arange(seq, dtype=jnp.int32)[None, :]          # [B, S]
    mask = jnp.arange(tokens)[None, None, :] <= query_pos[:, :, None]                    # [B, S, T]
    pages = jnp.clip(block_tables, 0, num_pages - 1)
    k = k_pages[:, pages].reshape(kv_heads, batch, tokens, dim).astype(jnp.float32)
    v = v_pages[:, pages].reshape(kv_heads, batch, tokens, dim).astype(jnp.float32)
    seen = jnp.arange(tokens)[None, :] <= query_pos[:, -1:]                               # [B, T]
    k = jnp.where(seen[None, :, :, None], k, 0.0)   # stale page contents never reach a product
    v = jnp.where(seen[None, :, :, None], v, 0.0)
    qg = q.reshape(batch, seq, kv_heads, heads // kv_heads, dim).astype(jnp.float32)
    logits = jnp.einsum("bsgrd,gbtd->bgrst", qg, k, precision=precision) * scale
    m = mask[:, None, None]
    weights = jax.nn.softmax(jnp.where(m, logits, MASK_VALUE), axis=-1)
    weights = jnp.where(m, weights, 0.0)
    out = jnp.einsum("bgrst,gbtd->bsgrd", weights, v, precision=precision)
    return out.reshape(q.shape).astype(q.dtype)
