"""Pick an attention implementation: the Pallas kernels on GPU, the jnp references elsewhere.

``impl`` is "auto" (Pallas when the arrays live on a GPU, or, for traced arrays, when
the default backend is a GPU; the jnp reference otherwise), "pallas" (the kernels;
on a non-GPU backend they run in interpret mode, which is slow and meant for tests)
or "xla" (the jnp reference, compiled by XLA). Shapes and dtypes are checked here,
before either implementation is traced, with the same rules for both, so a call that
works on CPU also works on GPU.
"""

from __future__ import annotations

import jax

from hexjax.kernels import shapes
from hexjax.kernels.flash_attention import flash_attention, flash_attention_reference
from hexjax.kernels.kv_cache import write_kv as write_kv_pallas
from hexjax.kernels.kv_cache import write_kv_reference
from hexjax.kernels.paged_attention import paged_attention, paged_attention_reference

IMPLS = ("auto", "pallas", "xla")
"""Accepted values of ``impl``."""

_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def on_gpu(*arrays) -> bool:
    """True when the (concrete) arrays sit on a GPU, or for tracers when the default backend is one."""
    for x in arrays:
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            return all(d.platform in _GPU_PLATFORMS for d in x.devices())
    return jax.default_backend() in _GPU_PLATFORMS


def use_pallas(impl: str, *arrays) -> tuple[bool, bool]:
    """(use the Pallas kernel?, in interpret mode?) for ``impl`` and the arrays it will see."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    gpu = on_gpu(*arrays)
    if impl == "xla" or (impl == "auto" and not gpu):
        return False, False
    return True, not gpu


def attention(q, k, v, kv_lengths=None, *, causal: bool = True, sm_scale: float | None = None,
              impl: str = "auto", **block_sizes):
    """Attention over contiguous q[B,S,Hq,D], k/v[B,T,Hkv,D]; see flash_attention.

    ``block_sizes`` (block_q, block_k, ..., num_warps) reach the Pallas kernel only.
    """
    shapes.check_attention(q, k, v, kv_lengths)
    shapes.check_head_dim("attention", q.shape[3])
    pallas, interpret = use_pallas(impl, q)
    if pallas:
        return flash_attention(q, k, v, kv_lengths, causal=causal, sm_scale=sm_scale,
                               interpret=interpret, **block_sizes)
    return flash_attention_reference(q, k, v, kv_lengths, causal=causal, sm_scale=sm_scale)


def decode_attention(q, k_pages, v_pages, block_tables, lengths, *, sm_scale: float | None = None,
                     impl: str = "auto", **block_sizes):
    """One decode step over a paged cache; see paged_attention for layouts.

    ``block_sizes`` (pages_per_block, num_splits, num_warps, num_stages) reach Pallas only.
    """
    shapes.check_paged(q, k_pages, v_pages, block_tables, lengths, where="decode_attention")
    shapes.check_head_dim("decode_attention", q.shape[2])
    pallas, interpret = use_pallas(impl, q)
    if pallas:
        shapes.check_page_size("decode_attention", k_pages.shape[2])
        return paged_attention(q, k_pages, v_pages, block_tables, lengths, sm_scale=sm_scale,
                               interpret=interpret, **block_sizes)
    return paged_attention_reference(q, k_pages, v_pages, block_tables, lengths,
                                     sm_scale=sm_scale)


def write_kv(k_pages, v_pages, k_new, v_new, block_tables, positions, *, impl: str = "auto",
             **block_sizes):
    """Write new keys/values into the paged cache; see kv_cache.write_kv. Returns (k_pages, v_pages)."""
    shapes.check_write(k_pages, v_pages, k_new, v_new, block_tables, positions)
    shapes.check_head_dim("write_kv", k_pages.shape[3])
    pallas, interpret = use_pallas(impl, k_pages)
    if pallas:
        return write_kv_pallas(k_pages, v_pages, k_new, v_new, block_tables, positions,
                               interpret=interpret, **block_sizes)
    return write_kv_reference(k_pages, v_pages, k_new, v_new, block_tables, positions)
