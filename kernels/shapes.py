"""Shape and dtype checks shared by the attention kernels, their references and dispatch.

Every check looks only at shapes and dtypes (values may be traced), and runs before
any kernel is traced, so a wrong call fails with a ``ValueError`` that names the
shapes instead of a lowering error deep inside Triton.
"""

from __future__ import annotations

import jax.numpy as jnp

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)
"""Head widths the Pallas kernels accept (80 and 96 are padded to 128 inside)."""

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
"""Input dtypes the attention kernels accept; softmax statistics are always fp32."""


def _desc(name: str, x) -> str:
    return f"{name}{tuple(x.shape)}:{jnp.dtype(x.dtype).name}"


def _check_float(where: str, **arrays) -> None:
    dtypes = {jnp.dtype(a.dtype) for a in arrays.values()}
    listed = ", ".join(_desc(n, a) for n, a in arrays.items())
    bad = [n for n, a in arrays.items() if jnp.dtype(a.dtype) not in FLOAT_DTYPES]
    if bad:
        raise ValueError(f"{where}: {', '.join(bad)} must be float32, bfloat16 or float16; "
                         f"got {listed}")
    if len(dtypes) != 1:
        raise ValueError(f"{where}: inputs must share one dtype; got {listed}. "
                         "Cast them to the same dtype first.")


def _check_int_vector(where: str, name: str, x, batch: int) -> None:
    if x.ndim != 1 or x.shape[0] != batch:
        raise ValueError(f"{where}: {_desc(name, x)} must have shape ({batch},), one entry "
                         "per sequence of the batch")
    if jnp.dtype(x.dtype) != jnp.dtype(jnp.int32):
        raise ValueError(f"{where}: {_desc(name, x)} must be int32; cast it with "
                         ".astype(jnp.int32)")


def check_head_dim(where: str, head_dim: int) -> None:
    """Raise unless ``head_dim`` is one the Pallas kernels support."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{where}: head dim {head_dim} is not supported; use one of "
                         f"{SUPPORTED_HEAD_DIMS}")


def check_attention(q, k, v, kv_lengths=None, *, where: str = "attention") -> None:
    """Validate q[B,S,Hq,D], k/v[B,T,Hkv,D] (Hq % Hkv == 0) and kv_lengths[B] int32."""
    shapes = f"{_desc('q', q)}, {_desc('k', k)}, {_desc('v', v)}"
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"{where}: expected q[B,S,Hq,D], k[B,T,Hkv,D], v[B,T,Hkv,D]; got {shapes}")
    if k.shape != v.shape:
        raise ValueError(f"{where}: k and v must have the same shape; got {shapes}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"{where}: batch sizes differ between q and k/v; got {shapes}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"{where}: head dims differ between q and k/v; got {shapes}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"{where}: query heads ({q.shape[2]}) must be a multiple of key/value "
                         f"heads ({k.shape[2]}); got {shapes}")
    _check_float(where, q=q, k=k, v=v)
    if kv_lengths is not None:
        _check_int_vector(where, "kv_lengths", kv_lengths, q.shape[0])


def check_paged(q, k_pages, v_pages, block_tables, lengths, *, where: str = "paged_attention") -> None:
    """Validate q[B,Hq,D], pages[Hkv,P,page,D], block_tables[B,M] int32, lengths[B] int32."""
    shapes = (f"{_desc('q', q)}, {_desc('k_pages', k_pages)}, {_desc('v_pages', v_pages)}, "
              f"{_desc('block_tables', block_tables)}, {_desc('lengths', lengths)}")
    if q.ndim != 3:
        raise ValueError(f"{where}: q must be [B,Hq,D] (one decode token per sequence); got {shapes}")
    _check_pages(where, k_pages, v_pages, shapes)
    if q.shape[2] != k_pages.shape[3]:
        raise ValueError(f"{where}: head dims differ between q and the pages; got {shapes}")
    if q.shape[1] % k_pages.shape[0]:
        raise ValueError(f"{where}: query heads ({q.shape[1]}) must be a multiple of key/value "
                         f"heads ({k_pages.shape[0]}); got {shapes}")
    _check_block_tables(where, block_tables, q.shape[0], shapes)
    _check_float(where, q=q, k_pages=k_pages, v_pages=v_pages)
    _check_int_vector(where, "lengths", lengths, q.shape[0])


def check_write(k_pages, v_pages, k_new, v_new, block_tables, positions, *,
                where: str = "write_kv") -> None:
    """Validate pages[Hkv,P,page,D], k_new/v_new[B,N,Hkv,D], block_tables[B,M], positions[B]."""
    shapes = (f"{_desc('k_pages', k_pages)}, {_desc('v_pages', v_pages)}, {_desc('k_new', k_new)}, "
              f"{_desc('v_new', v_new)}, {_desc('block_tables', block_tables)}, "
              f"{_desc('positions', positions)}")
    _check_pages(where, k_pages, v_pages, shapes)
    if k_new.ndim != 4 or k_new.shape != v_new.shape:
        raise ValueError(f"{where}: k_new and v_new must both be [B,N,Hkv,D]; got {shapes}")
    if k_new.shape[2] != k_pages.shape[0] or k_new.shape[3] != k_pages.shape[3]:
        raise ValueError(f"{where}: k_new heads/head dim must match the pages' [Hkv,...,D]; "
                         f"got {shapes}")
    _check_block_tables(where, block_tables, k_new.shape[0], shapes)
    if k_new.shape[1] > block_tables.shape[1] * k_pages.shape[2]:
        raise ValueError(f"{where}: {k_new.shape[1]} new tokens cannot fit in "
                         f"{block_tables.shape[1]} pages of {k_pages.shape[2]} tokens; got {shapes}")
    _check_float(where, k_pages=k_pages, v_pages=v_pages, k_new=k_new, v_new=v_new)
    _check_int_vector(where, "positions", positions, k_new.shape[0])


def _check_pages(where: str, k_pages, v_pages, shapes: str) -> None:
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"{where}: k_pages and v_pages must both be [Hkv,num_pages,page_size,D]; "
                         f"got {shapes}")
    if min(k_pages.shape) == 0:
        raise ValueError(f"{where}: the page pool is empty; got {shapes}")


def _check_block_tables(where: str, block_tables, batch: int, shapes: str) -> None:
    if block_tables.ndim != 2 or block_tables.shape[0] != batch or block_tables.shape[1] == 0:
        raise ValueError(f"{where}: block_tables must be [B={batch}, max_pages_per_seq>0]; "
                         f"got {shapes}")
    if jnp.dtype(block_tables.dtype) != jnp.dtype(jnp.int32):
        raise ValueError(f"{where}: block_tables must be int32; got {shapes}")


def check_page_size(where: str, page_size: int) -> None:
    """Raise unless the page size is a power of two (the Triton gather loads need it)."""
    if page_size & (page_size - 1):
        raise ValueError(f"{where}: page size {page_size} must be a power of two for the "
                         "Pallas kernels")
