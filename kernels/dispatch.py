"""Pick an attention implementation: the Pallas kernels on GPU, the jnp references elsewhere.

This module is the only place that chooses between the kernels and the references.

``impl`` is "auto" (Pallas when the arrays live on a GPU, or, for traced arrays, when
the default backend is a GPU; the jnp reference otherwise), "pallas" (the kernels;
on a non-GPU backend they run in interpret mode, which is slow and meant for tests)
or "xla" (the jnp reference, compiled by XLA). Shapes and dtypes are checked here,
before either implementation is traced, with the same rules for both, so a call that
works on CPU also works on GPU.

``stage_kernels(impl, head_dim, platform)`` makes the same choice once, ahead of
tracing, for a pipeline stage whose mesh lives on ``platform``: it returns the three
callables (write_kv, causal attention, decode attention) the stage's programs use.
"""

from __future__ import annotations

import functools

import jax

from hexjax.kernels import shapes
from hexjax.kernels.flash_attention import flash_attention, flash_attention_reference
from hexjax.kernels.kv_cache import write_kv as write_kv_pallas
from hexjax.kernels.kv_cache import write_kv_reference
from hexjax.kernels.paged_attention import (paged_attention, paged_attention_reference,
                                            paged_chunk_attention_reference)
from hexjax.kernels.tuning import (GPU_PLATFORMS, FlashBlockSizes, PagedBlockSizes,
                                   WriteBlockSizes)

IMPLS = ("auto", "pallas", "xla")
"""Accepted values of ``impl``."""


def is_gpu_platform(platform: str) -> bool:
    """True for "gpu", "cuda" and "rocm" (any case): platforms the Pallas kernels compile for."""
    return str(platform).lower() in GPU_PLATFORMS


def on_gpu(*arrays) -> bool:
    """True when the (concrete) arrays sit on a GPU, or for tracers when the default backend is one."""
    for x in arrays:
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            return all(is_gpu_platform(d.platform) for d in x.devices())
    return is_gpu_platform(jax.default_backend())


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")


def choose(impl: str, gpu: bool) -> tuple[bool, bool]:
    """(use the Pallas kernel?, in interpret mode?) for ``impl`` on a GPU (``gpu``) or not.

    "auto": Pallas natively on a GPU, the reference elsewhere; "pallas": Pallas, in
    interpret mode off GPU; "xla": the reference.
    """
    _check_impl(impl)
    if impl == "xla" or (impl == "auto" and not gpu):
        return False, False
    return True, not gpu


def use_pallas(impl: str, *arrays) -> tuple[bool, bool]:
    """(use the Pallas kernel?, in interpret mode?) for ``impl`` and the arrays it will see."""
    _check_impl(impl)  # before looking at the arrays
    return choose(impl, on_gpu(*arrays))


def attention(q, k, v, kv_lengths=None, *, causal: bool = True, sm_scale: float | None = None,
              impl: str = "auto", block_sizes: FlashBlockSizes | None = None):
    """Attention over contiguous q[B,S,Hq,D], k/v[B,T,Hkv,D]; see flash_attention.

    ``block_sizes`` reaches the Pallas kernel only.
    """
    shapes.check_attention(q, k, v, kv_lengths)
    shapes.check_head_dim("attention", q.shape[3])
    pallas, interpret = use_pallas(impl, q)
    if pallas:
        return flash_attention(q, k, v, kv_lengths, causal=causal, sm_scale=sm_scale,
                               interpret=interpret, block_sizes=block_sizes)
    return flash_attention_reference(q, k, v, kv_lengths, causal=causal, sm_scale=sm_scale)


def decode_attention(q, k_pages, v_pages, block_tables, lengths, *, sm_scale: float | None = None,
                     impl: str = "auto", block_sizes: PagedBlockSizes | None = None):
    """One decode step over a paged cache; see paged_attention for layouts.

    ``block_sizes`` reaches the Pallas kernel only.
    """
    shapes.check_paged(q, k_pages, v_pages, block_tables, lengths, where="decode_attention")
    shapes.check_head_dim("decode_attention", q.shape[2])
    pallas, interpret = use_pallas(impl, q)
    if pallas:
        shapes.check_page_size("decode_attention", k_pages.shape[2])
        return paged_attention(q, k_pages, v_pages, block_tables, lengths, sm_scale=sm_scale,
                               interpret=interpret, block_sizes=block_sizes)
    return paged_attention_reference(q, k_pages, v_pages, block_tables, lengths,
                                     sm_scale=sm_scale)


def write_kv(k_pages, v_pages, k_new, v_new, block_tables, positions, *, impl: str = "auto",
             block_sizes: WriteBlockSizes | None = None):
    """Write new keys/values into the paged cache; see kv_cache.write_kv. Returns (k_pages, v_pages)."""
    shapes.check_write(k_pages, v_pages, k_new, v_new, block_tables, positions)
    shapes.check_head_dim("write_kv", k_pages.shape[3])
    pallas, interpret = use_pallas(impl, k_pages)
    if pallas:
        return write_kv_pallas(k_pages, v_pages, k_new, v_new, block_tables, positions,
                               interpret=interpret, block_sizes=block_sizes)
    return write_kv_reference(k_pages, v_pages, k_new, v_new, block_tables, positions)


def stage_kernels(impl: str, head_dim: int, platform: str, *, device_kind: str | None = None):
    """(write_kv, attention, decode_attention) for a pipeline stage on devices of ``platform``.

    Args:
      impl: "auto" (Pallas on GPUs for the head dims the kernels support, the jnp
        references otherwise: CPU/TPU meshes, small test models), "pallas" (the kernels;
        interpret mode off GPU, for tests) or "xla" (the references).
      head_dim: the model's attention head width.
      platform: ``jax.Device.platform`` of the stage's mesh: "cpu", "gpu"/"cuda"/"rocm", "tpu".
      device_kind: optional ``jax.Device.device_kind`` of the stage's GPUs; picks the
        kernels' tuning defaults for that generation instead of the default device's.

    Returns:
      ``write_kv(k_pages, v_pages, k_new, v_new, block_tables, positions) -> (k_pages, v_pages)``,
      ``attention(q, k, v) -> out`` (causal) and
      ``decode_attention(q, k_pages, v_pages, block_tables, lengths) -> out``.

    Raises:
      ValueError: unknown ``impl`` (the message lists the choices), or "pallas" with a
        head dim the kernels do not support.
    """
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    gpu = is_gpu_platform(platform)
    if impl == "auto" and head_dim not in shapes.SUPPORTED_HEAD_DIMS:
        impl = "xla"
    pallas, interpret = choose(impl, gpu)
    if not pallas:
        return (write_kv_reference,
                functools.partial(flash_attention_reference, causal=True),
                paged_attention_reference)
    shapes.check_head_dim(f"stage_kernels(impl={impl!r})", head_dim)
    kind = device_kind if gpu else None
    flash_bs = FlashBlockSizes.default(kind, head_dim) if kind else None
    paged_bs = PagedBlockSizes.default(kind, head_dim) if kind else None
    write_bs = WriteBlockSizes.default(kind, head_dim) if kind else None
    return (functools.partial(write_kv_pallas, interpret=interpret, block_sizes=write_bs),
            functools.partial(flash_attention, causal=True, interpret=interpret,
                              block_sizes=flash_bs),
            functools.partial(paged_attention, interpret=interpret, block_sizes=paged_bs))


def stage_chunk_attention(impl: str, head_dim: int, platform: str, *, device_kind: str | None = None):
    """Attention of a prompt chunk over its sequence's cached pages, for a stage on ``platform``.

    ``chunk_attention(q, k_pages, v_pages, block_tables, positions) -> out`` with q[B,S,Hq,D]
    at positions ``positions[b] + i`` (see ``paged_chunk_attention_reference``). There is no
    Pallas kernel for it yet, so every ``impl`` gets the jnp reference (XLA fuses the gather
    and the masked softmax); the arguments are those of ``stage_kernels`` so a kernel can be
    chosen here later without touching the stage.
    """
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    return paged_chunk_attention_reference
