"""Tuning knobs: per-generation defaults, partial overrides, validation (no kernel runs)."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from hexjax.kernels import flash_attention, paged_attention
from hexjax.kernels.kv_cache import write_kv
from hexjax.kernels.tuning import (FlashBlockSizes, PagedBlockSizes, WriteBlockSizes,
                                   gpu_generation)

S = jax.ShapeDtypeStruct


@pytest.mark.parametrize("device_kind, generation", [
    ("NVIDIA H100 80GB HBM3", "hopper"),
    ("NVIDIA H200", "hopper"),
    ("NVIDIA GH200 480GB", "hopper"),
    ("NVIDIA B200", "blackwell"),
    ("NVIDIA A100-SXM4-80GB", "ampere"),
    ("NVIDIA RTX A4000", "workstation"),
    ("NVIDIA RTX A6000", "workstation"),
    ("NVIDIA GeForce RTX 4090", "workstation"),
    ("NVIDIA A10G", "workstation"),
    ("NVIDIA L40S", "workstation"),
    ("AMD Instinct MI300X", "cdna"),
    ("Tesla V100-SXM2-16GB", "generic"),
    ("cpu", "generic"),
    (None, "generic"),
])
def test_gpu_generation(device_kind, generation):
    assert gpu_generation(device_kind) == generation


def test_flash_defaults_and_overrides():
    generic = FlashBlockSizes.default(None, 128)
    assert all(getattr(generic, f.name) is not None for f in dataclasses.fields(generic))
    assert FlashBlockSizes.default("NVIDIA H200", 128) == generic
    assert FlashBlockSizes.default("some future accelerator", 128) == generic
    small = FlashBlockSizes.default("NVIDIA RTX A4000", 128)
    assert small.block_q * small.block_k < generic.block_q * generic.block_k
    assert FlashBlockSizes.default(None, 80) == generic  # 80 and 96 are computed at 128
    assert FlashBlockSizes.default(None, 256).block_q < generic.block_q
    # None fields come from the device default, given fields win.
    mixed = FlashBlockSizes(block_q=32, num_warps=2).resolve("NVIDIA RTX A4000", 128)
    assert (mixed.block_q, mixed.num_warps, mixed.block_k) == (32, 2, small.block_k)
    hash(mixed)  # a static argument of jit
    with pytest.raises(dataclasses.FrozenInstanceError):
        mixed.block_q = 64
    with pytest.raises(ValueError, match="num_warps"):
        FlashBlockSizes(num_warps=3).resolve(None, 64)
    with pytest.raises(ValueError, match="block_k_dq=8"):
        FlashBlockSizes(block_k_dq=8).resolve(None, 64)


def test_paged_and_write_defaults():
    paged = PagedBlockSizes.default()
    assert paged.pages_per_block is None and paged.num_splits is None  # chosen per call
    assert PagedBlockSizes.default("NVIDIA L4").target_programs < paged.target_programs
    assert PagedBlockSizes(num_splits=4).resolve("NVIDIA H100 80GB HBM3", 128).num_splits == 4
    with pytest.raises(ValueError, match="num_splits"):
        PagedBlockSizes(num_splits=3).resolve(None, 128)
    assert WriteBlockSizes(block_n=4).resolve(None, 64) == WriteBlockSizes(block_n=4, num_warps=1)
    with pytest.raises(ValueError, match="block_n"):
        WriteBlockSizes(block_n=0).resolve(None, 64)


def test_kernels_reject_other_settings_objects():
    qkv = [S((1, 8, 2, 64), jnp.float32)] * 3
    with pytest.raises(TypeError, match="FlashBlockSizes"):
        jax.eval_shape(lambda *a: flash_attention(*a, block_sizes=dict(block_q=16)), *qkv)
    pages, tables, ints = S((2, 10, 16, 64), jnp.float32), S((2, 4), jnp.int32), S((2,), jnp.int32)
    with pytest.raises(TypeError, match="PagedBlockSizes"):
        jax.eval_shape(lambda *a: paged_attention(*a, block_sizes=FlashBlockSizes()),
                       S((2, 4, 64), jnp.float32), pages, pages, tables, ints)
    tiny_pages = S((2, 10, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="pages_per_block"):  # 4 pages of 2 tokens < 16 keys
        jax.eval_shape(lambda *a: paged_attention(*a, block_sizes=PagedBlockSizes(pages_per_block=4)),
                       S((2, 4, 64), jnp.float32), tiny_pages, tiny_pages, tables, ints)
    new = S((2, 3, 2, 64), jnp.float32)
    with pytest.raises(TypeError, match="WriteBlockSizes"):
        jax.eval_shape(lambda *a: write_kv(*a, block_sizes=PagedBlockSizes()),
                       pages, pages, new, new, tables, ints)
