"""The kernels lower to Triton IR for CUDA (no GPU needed): block shapes, dtypes and indexing are
accepted by the Pallas Triton lowering, with every tuning default, and float32 dots ask for full
fp32 products. Compiling that IR to PTX needs a GPU: benchmarks/kernels_gpu.py (and, on a GPU
backend, every kernel test in tests/test_kernels_*.py runs natively)."""

import re

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from hexjax.kernels import flash_attention, paged_attention
from hexjax.kernels.kv_cache import write_kv
from hexjax.kernels.tuning import FlashBlockSizes, PagedBlockSizes, WriteBlockSizes

S = jax.ShapeDtypeStruct
TRITON_CALLS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")
"""Custom-call targets of a Pallas Triton kernel (the second once jaxlib compiles at lowering)."""


def lower_for_cuda(fn, *args) -> str:
    exported = export.export(jax.jit(fn), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(name)
                                              for name in TRITON_CALLS])
    return exported(*args).mlir_module()


def count_triton_calls(text: str) -> int:
    return sum(text.count(f"@{name}(") for name in TRITON_CALLS)


def flash_grads(q, k, v, block_sizes=None):
    loss = lambda q, k, v: jnp.sum(flash_attention(q, k, v, block_sizes=block_sizes)
                                   .astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("dim, dtype", [(64, jnp.float32), (80, jnp.float16), (96, jnp.bfloat16),
                                        (128, jnp.bfloat16), (256, jnp.bfloat16)])
def test_flash_forward_and_backward_lower_to_triton(dim, dtype):
    q = S((2, 300, 8, dim), dtype)
    kv = S((2, 333, 2, dim), dtype)
    assert count_triton_calls(lower_for_cuda(lambda *a: flash_attention(*a), q, kv, kv)) == 1
    assert count_triton_calls(lower_for_cuda(flash_grads, q, kv, kv)) == 3  # fwd, dq, dk/dv


@pytest.mark.parametrize("dim, page_size, group", [(128, 8, 4), (128, 16, 8), (128, 32, 1),
                                                   (80, 16, 4), (64, 16, 2)])
def test_paged_attention_and_write_lower_to_triton(dim, page_size, group):
    bf = jnp.bfloat16
    pages = S((8, 300, page_size, dim), bf)
    tables = S((4, 64), jnp.int32)
    ints = S((4,), jnp.int32)
    text = lower_for_cuda(paged_attention, S((4, 8 * group, dim), bf), pages, pages, tables, ints)
    assert count_triton_calls(text) == 1
    new = S((4, 37, 8, dim), bf)
    assert count_triton_calls(lower_for_cuda(write_kv, pages, pages, new, new, tables, ints)) == 1


@pytest.mark.parametrize("device_kind", ["NVIDIA H200", "NVIDIA RTX A4000", "AMD Instinct MI300X"])
def test_per_generation_defaults_lower(device_kind):
    """The non-generic tuning tables give tiles the Triton lowering accepts (D=128 and 256)."""
    for dim in (128, 256):
        q, kv = S((1, 200, 4, dim), jnp.bfloat16), S((1, 230, 2, dim), jnp.bfloat16)
        blocks = FlashBlockSizes.default(device_kind, dim)
        assert count_triton_calls(lower_for_cuda(
            lambda *a, b=blocks: flash_grads(*a, block_sizes=b), q, kv, kv)) == 3
    pages = S((2, 40, 16, 128), jnp.bfloat16)
    tables, ints = S((2, 8), jnp.int32), S((2,), jnp.int32)
    paged = PagedBlockSizes.default(device_kind, 128)
    text = lower_for_cuda(lambda *a: paged_attention(*a, block_sizes=paged),
                          S((2, 8, 128), jnp.bfloat16), pages, pages, tables, ints)
    assert count_triton_calls(text) == 1
    new = S((2, 5, 2, 128), jnp.bfloat16)
    write = WriteBlockSizes.default(device_kind, 128)
    assert count_triton_calls(lower_for_cuda(lambda *a: write_kv(*a, block_sizes=write),
                                             pages, pages, new, new, tables, ints)) == 1


@pytest.fixture
def triton_modules(monkeypatch):
    """Collects the Triton IR text of every kernel lowered while the test runs."""
    try:
        from jax._src.pallas.triton import lowering as triton_lowering
        original = triton_lowering.lower_jaxpr_to_triton_module
    except (ImportError, AttributeError) as exc:  # internal API: moved in this jax version
        pytest.skip(f"cannot observe the Triton IR in this jax version: {exc}")
    modules = []

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        modules.append(result.module.operation.get_asm())
        return result

    monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", capture)
    return modules


def dot_lines(modules) -> list[str]:
    return [line for text in modules for line in text.splitlines()
            if re.search(r"\btt\.dot\b", line)]


def test_tf32_is_visible_in_the_triton_ir(triton_modules):
    """Control: a float32 dot that allows TF32 says so in the IR, so the test below can see it."""

    def kernel(x_ref, o_ref):
        o_ref[...] = plgpu.dot(x_ref[...], x_ref[...], allow_tf32=True)

    call = pl.pallas_call(kernel, out_shape=S((16, 16), jnp.float32),
                          compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1))
    lower_for_cuda(call, S((16, 16), jnp.float32))
    lines = dot_lines(triton_modules)
    assert len(lines) == 1 and "tf32" in lines[0], lines


@pytest.mark.parametrize("matmul_precision", ["default", "tensorfloat32"])
def test_float32_kernels_use_full_precision_dots(triton_modules, matmul_precision):
    """No float32 dot of any kernel (forward, dq, dk/dv, paged) lowers to TF32, whatever the
    global matmul precision: fp32 inputs must get fp32 accuracy on Ampere/Hopper too."""
    f32 = jnp.float32
    q, kv = S((1, 40, 4, 64), f32), S((1, 50, 2, 64), f32)
    pages = S((2, 12, 16, 96), f32)
    with jax.default_matmul_precision(matmul_precision):
        lower_for_cuda(flash_grads, q, kv, kv)
        lower_for_cuda(paged_attention, S((2, 4, 96), f32), pages, pages, S((2, 6), jnp.int32),
                       S((2,), jnp.int32))
    assert len(triton_modules) == 4  # fwd, dq, dk/dv, paged
    lines = dot_lines(triton_modules)
    assert len(lines) >= 4 + 6 + 8 + 2, lines  # fwd, dq, dk/dv (masked and unmasked loops), paged
    assert all("xf32>" in line for line in lines), lines
    assert not [line for line in lines if "tf32" in line], lines
