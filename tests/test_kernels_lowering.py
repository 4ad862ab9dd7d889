"""The kernels lower to Triton IR for CUDA (no GPU needed): block shapes, dtypes and indexing are
accepted by the Pallas Triton lowering. Compiling that IR to PTX needs a GPU: benchmarks/kernels_gpu.py."""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from hexjax.kernels import flash_attention, paged_attention
from hexjax.kernels.kv_cache import write_kv

S = jax.ShapeDtypeStruct
TRITON_CALL = "__gpu$xla.gpu.triton"


def lower_for_cuda(fn, *args) -> str:
    exported = export.export(jax.jit(fn), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])
    return exported(*args).mlir_module()


def flash_grads(q, k, v):
    loss = lambda q, k, v: jnp.sum(flash_attention(q, k, v).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("dim, dtype", [(64, jnp.float32), (80, jnp.float16), (96, jnp.bfloat16),
                                        (128, jnp.bfloat16), (256, jnp.bfloat16)])
def test_flash_forward_and_backward_lower_to_triton(dim, dtype):
    q = S((2, 300, 8, dim), dtype)
    kv = S((2, 333, 2, dim), dtype)
    assert lower_for_cuda(lambda *a: flash_attention(*a), q, kv, kv).count(TRITON_CALL) == 1
    assert lower_for_cuda(flash_grads, q, kv, kv).count(TRITON_CALL) == 3  # fwd, dq, dk/dv


@pytest.mark.parametrize("dim, page_size, group", [(128, 8, 4), (128, 16, 8), (128, 32, 1),
                                                   (80, 16, 4), (64, 16, 2)])
def test_paged_attention_and_write_lower_to_triton(dim, page_size, group):
    bf = jnp.bfloat16
    pages = S((8, 300, page_size, dim), bf)
    tables = S((4, 64), jnp.int32)
    ints = S((4,), jnp.int32)
    text = lower_for_cuda(paged_attention, S((4, 8 * group, dim), bf), pages, pages, tables, ints)
    assert text.count(TRITON_CALL) == 1
    new = S((4, 37, 8, dim), bf)
    assert lower_for_cuda(write_kv, pages, pages, new, new, tables, ints).count(TRITON_CALL) == 1
