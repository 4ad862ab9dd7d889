"""Writes of new keys/values into a paged KV cache, as a Pallas kernel, with its reference.

Layouts: k_pages/v_pages[Hkv, num_pages, page_size, D]; k_new/v_new[B, N, Hkv, D];
block_tables[B, M] int32; positions[B] int32. Token n of sequence b goes to cache
position p = positions[b] + n, i.e. page block_tables[b, p // page_size], row
p % page_size. Works for prefill (N = prompt length) and decode (N = 1).

Writes whose position falls outside the block table (p < 0 or p // page_size >= M)
or whose page id is outside [0, num_pages) are dropped, never redirected. Two
sequences must not write the same (page, row) in one call: which one wins is
unspecified.

The Pallas version updates the pages in place (``input_output_aliases``); call it
under ``jax.jit(..., donate_argnums=...)`` with the pages donated so XLA reuses the
buffers instead of copying the whole pool. Lowering: Pallas' Triton backend
(``plgpu.CompilerParams`` passed explicitly). One program per (sequence, key/value
head, block of tokens) copies its rows one D-wide row at a time: each row lands on
a different page slot, and rows are contiguous D-element stores. Tuning:
``WriteBlockSizes`` (tokens per program, warps).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from hexjax.kernels import shapes
from hexjax.kernels.flash_attention import padded_head_dim
from hexjax.kernels.tuning import WriteBlockSizes, current_device_kind


def _write_kernel(pos_ref, table_ref, k_new_ref, v_new_ref, k_in_ref, v_in_ref, k_ref, v_ref, *,
                  num_tokens: int, block_n: int, page_size: int, num_pages: int, max_pages: int,
                  head_dim: int):
    del k_in_ref, v_in_ref  # aliased with k_ref / v_ref
    dim_p = k_ref.shape[-1]
    col_mask = jnp.arange(dim_p) < head_dim if dim_p != head_dim else None
    start = pl.program_id(2) * block_n
    stop = jnp.minimum(start + block_n, num_tokens)
    base = pos_ref[0]

    def copy_row(src_ref, dst_ref, t, page, row):
        if col_mask is None:
            dst_ref[page, row, :] = src_ref[t, :]
        else:
            x = plgpu.load(src_ref.at[t, :], mask=col_mask, other=0.0)
            plgpu.store(dst_ref.at[page, row, :], x, mask=col_mask)

    def body(t, carry):
        pos = base + t
        slot = lax.div(jnp.maximum(pos, 0), page_size)
        in_table = jnp.logical_and(pos >= 0, slot < max_pages)
        page = table_ref[jnp.minimum(slot, max_pages - 1)]
        ok = jnp.logical_and(in_table, jnp.logical_and(page >= 0, page < num_pages))
        row = lax.rem(jnp.maximum(pos, 0), page_size)

        @pl.when(ok)
        def _():
            copy_row(k_new_ref, k_ref, t, page, row)
            copy_row(v_new_ref, v_ref, t, page, row)

        return carry

    lax.fori_loop(start, stop, body, 0)


def write_kv(k_pages, v_pages, k_new, v_new, block_tables, positions, *, interpret: bool = False,
             block_sizes: WriteBlockSizes | None = None):
    """Write k_new/v_new[B,N,Hkv,D] at positions[b] + n through each sequence's block table.

    Args:
      k_pages, v_pages: [Hkv, num_pages, page_size, D] (updated in place when donated).
      k_new, v_new: [B, N, Hkv, D], the pages' dtype.
      block_tables: [B, max_pages_per_seq] int32.
      positions: [B] int32 position of each sequence's first new token.
      interpret: run in Pallas interpret mode (CPU).
      block_sizes: tokens per program and Triton warps; None (or None fields) take
        ``WriteBlockSizes.default``.

    Returns:
      (k_pages, v_pages) with the new rows written.
    """
    shapes.check_write(k_pages, v_pages, k_new, v_new, block_tables, positions, where="write_kv")
    shapes.check_head_dim("write_kv", k_pages.shape[3])
    if block_sizes is None:
        block_sizes = WriteBlockSizes()
    elif not isinstance(block_sizes, WriteBlockSizes):
        raise TypeError(f"write_kv: block_sizes must be a WriteBlockSizes or None; "
                        f"got {type(block_sizes).__name__}")
    bs = block_sizes.resolve(None if interpret else current_device_kind(), k_pages.shape[3])
    block_n = min(bs.block_n, k_new.shape[1])
    return _write_jit(k_pages, v_pages, k_new, v_new, block_tables, positions,
                      interpret=bool(interpret), block_n=block_n, num_warps=bs.num_warps)


@functools.partial(jax.jit, static_argnames=("interpret", "block_n", "num_warps"))
def _write_jit(k_pages, v_pages, k_new, v_new, block_tables, positions, *, interpret: bool,
               block_n: int, num_warps: int):
    batch, num_tokens, kv_heads, dim = k_new.shape
    _, num_pages, page_size, _ = k_pages.shape
    max_pages = block_tables.shape[1]
    dim_p = padded_head_dim(dim)
    kernel = functools.partial(_write_kernel, num_tokens=num_tokens, block_n=block_n,
                               page_size=page_size, num_pages=num_pages, max_pages=max_pages,
                               head_dim=dim)
    page_spec = pl.BlockSpec((None, num_pages, page_size, dim_p), lambda b, h, j: (h, 0, 0, 0))
    new_spec = pl.BlockSpec((None, num_tokens, None, dim_p), lambda b, h, j: (b, 0, h, 0))
    return tuple(pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, pl.cdiv(num_tokens, block_n)),
        in_specs=[
            pl.BlockSpec((None, 1), lambda b, h, j: (b, 0)),
            pl.BlockSpec((None, max_pages), lambda b, h, j: (b, 0)),
            new_spec, new_spec, page_spec, page_spec,
        ],
        out_specs=[page_spec, page_spec],
        out_shape=[jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)],
        input_output_aliases={4: 0, 5: 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="hexjax_write_kv",
    )(positions[:, None], block_tables, k_new, v_new, k_pages, v_pages))


@jax.jit
def write_kv_reference(k_pages, v_pages, k_new, v_new, block_tables, positions):
    """Plain-jnp write_kv: one scatter per cache, dropping out-of-range writes."""
    shapes.check_write(k_pages, v_pages, k_new, v_new, block_tables, positions,
                       where="write_kv_reference")
    _, num_tokens, _, _ = k_new.shape
    _, num_pages, page_size, _ = k_pages.shape
    max_pages = block_tables.shape[1]
    pos = positions[:, None] + jnp.arange(num_tokens, dtype=jnp.int32)[None, :]  # [B, N]
    slot = jnp.maximum(pos, 0) // page_size
    page = jnp.take_along_axis(block_tables, jnp.minimum(slot, max_pages - 1), axis=1)
    ok = (pos >= 0) & (slot < max_pages) & (page >= 0) & (page < num_pages)
    page = jnp.where(ok, page, num_pages)  # out of range: the scatter drops it
    row = jnp.maximum(pos, 0) % page_size
    k_pages = k_pages.at[:, page, row].set(k_new.transpose(2, 0, 1, 3), mode="drop")
    v_pages = v_pages.at[:, page, row].set(v_new.transpose(2, 0, 1, 3), mode="drop")
    return k_pages, v_pages
