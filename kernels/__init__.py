"""Attention kernels in Pallas (Triton backend), each beside its plain-jnp reference.

- ``flash_attention(q, k, v, kv_lengths=None, *, causal=True, sm_scale=None, ...)``:
  q[B,S,Hq,D], k/v[B,T,Hkv,D] (Hq % Hkv == 0) -> [B,S,Hq,D]. Causal masking is
  bottom-right aligned (row i sees keys j <= i + T - S); optional kv_lengths[B]
  int32 masks right padding. Any S and T; D in 64/80/96/128/256. Differentiable
  (Pallas dq and dk/dv kernels behind ``jax.custom_vjp``).
- ``paged_attention(q, k_pages, v_pages, block_tables, lengths, *, ...)``: one
  decode token per sequence, q[B,Hq,D], pages[Hkv,num_pages,page_size,D],
  block_tables[B,max_pages] int32, lengths[B] int32 -> [B,Hq,D]; split-K over the
  context so a single long sequence still fills the GPU.
- ``paged_chunk_attention_reference(q, k_pages, v_pages, block_tables, positions)``:
  a chunk of queries q[B,S,Hq,D] at positions[b] + i over the sequence's cached pages
  (chunked prefill); jnp only, no Pallas kernel yet.
- ``write_kv(k_pages, v_pages, k_new, v_new, block_tables, positions)``: scatter
  k_new/v_new[B,N,Hkv,D] to positions[b] + n through the block tables; in place
  when the pages are donated.

Each has a ``*_reference`` in plain jnp (what runs on CPU). The dispatchers
``attention``, ``decode_attention`` and ``write_kv`` (in ``dispatch``; the
top-level ``write_kv`` is the dispatcher) take ``impl="auto" | "pallas" | "xla"``:
auto runs Pallas on GPU and the reference elsewhere; "pallas" off-GPU runs the
kernels in interpret mode. ``stage_kernels`` is the one place that picks the
kernels of a pipeline stage from its mesh's platform. Tile sizes, warps and
pipeline stages come in ``FlashBlockSizes`` / ``PagedBlockSizes`` /
``WriteBlockSizes`` (``block_sizes=``), with a default per GPU generation.
float32 inputs get float32 dots (no TF32). Bad shapes or dtypes raise
ValueError before tracing.
"""

if __name__ != "hexjax.kernels":   # reached as top-level `kernels`: see hexjax/_toplevel.py
    from hexjax._toplevel import step_aside
    step_aside(__name__, __path__[0])
else:
    from hexjax.kernels.dispatch import attention, decode_attention, stage_chunk_attention, stage_kernels, write_kv
    from hexjax.kernels.flash_attention import flash_attention, flash_attention_reference
    from hexjax.kernels.kv_cache import write_kv_reference
    from hexjax.kernels.paged_attention import (paged_attention, paged_attention_reference,
                                                paged_chunk_attention_reference)
    from hexjax.kernels.tuning import FlashBlockSizes, PagedBlockSizes, WriteBlockSizes, gpu_generation

    __all__ = [
        "FlashBlockSizes",
        "PagedBlockSizes",
        "WriteBlockSizes",
        "attention",
        "decode_attention",
        "flash_attention",
        "flash_attention_reference",
        "paged_attention",
        "paged_attention_reference",
        "paged_chunk_attention_reference",
        "gpu_generation",
        "stage_chunk_attention",
        "stage_kernels",
        "write_kv",
        "write_kv_reference",
    ]
