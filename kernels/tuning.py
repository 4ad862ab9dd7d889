"""Tuning knobs of the Pallas kernels: tiles and Triton settings, one frozen dataclass per kernel.

Each kernel takes ``block_sizes: <Kernel>BlockSizes | None``. Fields left at None are
filled from ``<Kernel>BlockSizes.default(device_kind, ...)``, which looks the settings up
by GPU generation (``gpu_generation``); an unknown device kind, a CPU (interpret mode)
or None gets the generic settings. So ``FlashBlockSizes(block_q=64)`` changes one knob
and keeps the device's defaults for the rest.

The generic settings are the ones the GPU checks in ``benchmarks/kernels_gpu.py`` were
written against (H100/H200-class shared memory). The other generations only shrink
tiles or pipelining stages where the card has less shared memory per SM (about 100 KB
on sm_86/sm_89/sm_120 workstation and consumer parts, 64 KB LDS on AMD Instinct);
they are starting points, to be refined with ``benchmarks/kernels_gpu.py --tune``.
"""

from __future__ import annotations

import dataclasses
import re

GPU_PLATFORMS = ("gpu", "cuda", "rocm")
"""Platform names (``jax.Device.platform``, ``jax.default_backend()``) that mean a GPU."""

GENERATIONS = ("hopper", "blackwell", "ampere", "workstation", "cdna", "generic")
"""What ``gpu_generation`` returns."""

# Order matters: the first match wins (GH200 before H200, A100 before A10).
_GENERATION_PATTERNS = (
    ("hopper", r"\bG?H(100|200|800|20)\b"),
    ("blackwell", r"\bG?B(100|200|300)\b"),
    ("ampere", r"\bA(100|800|30)\b"),
    ("workstation", r"\bRTX\b|\bA(10G?|16|2|40)\b|\bL(4|40S?|20)\b|\bGB10\b"),
    ("cdna", r"\bMI\d{3}|\bGFX9\d\w*\b|\bINSTINCT\b"),
)


def gpu_generation(device_kind: str | None) -> str:
    """The tuning class of a GPU from its ``jax.Device.device_kind``; "generic" if unknown.

    "hopper" (H100/H200/GH200), "blackwell" (B100/B200/B300), "ampere" (A100/A800/A30,
    large shared memory), "workstation" (RTX A4000-A6000, RTX 30/40/50, A10/A40, L4/L40,
    GB10: about 100 KB of shared memory per SM), "cdna" (AMD Instinct), else "generic".
    """
    if not device_kind:
        return "generic"
    kind = device_kind.upper().replace("-", " ").replace("_", " ")
    for generation, pattern in _GENERATION_PATTERNS:
        if re.search(pattern, kind):
            return generation
    return "generic"


def current_device_kind() -> str | None:
    """``device_kind`` of the default backend's first device if it is a GPU, else None."""
    import jax
    try:
        device = jax.devices()[0]
    except RuntimeError:
        return None
    return device.device_kind if device.platform in GPU_PLATFORMS else None


def _head_tier(head_dim: int) -> int:
    """64, 128 or 256: the power-of-two tile width (>= 16) a head dim is computed at, bucketed."""
    width = 16
    while width < head_dim:
        width *= 2
    return 64 if width <= 64 else 128 if width <= 128 else 256


def _check(kernel: str, name: str, value: int, *, minimum: int, power_of_two: bool) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{kernel}: {name}={value!r} must be an int")
    if value < minimum or (power_of_two and value & (value - 1)):
        what = "a power of two" if power_of_two else "an int"
        raise ValueError(f"{kernel}: {name}={value} must be {what} >= {minimum}")


class _BlockSizes:
    """Shared behaviour: fill None fields from a default, validate."""

    def _filled_from(self, default):
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if getattr(self, f.name) is not None}
        return dataclasses.replace(default, **given)


@dataclasses.dataclass(frozen=True)
class FlashBlockSizes(_BlockSizes):
    """Tiles and Triton settings of ``flash_attention`` (forward, dq and dk/dv kernels).

    Tile sizes are powers of two >= 16; they are capped at the (padded) sequence lengths
    of a call, so short prefill chunks need no settings of their own. None: the default
    for the device and head dim (see ``FlashBlockSizes.default``).
    """

    block_q: int | None = None
    """Query rows per forward program."""
    block_k: int | None = None
    """Key rows per forward loop step."""
    block_q_dkv: int | None = None
    """Query rows per loop step of the dk/dv kernel."""
    block_k_dkv: int | None = None
    """Key rows per dk/dv program."""
    block_q_dq: int | None = None
    """Query rows per dq program."""
    block_k_dq: int | None = None
    """Key rows per loop step of the dq kernel."""
    num_warps: int | None = None
    """Triton warps of the forward kernel."""
    num_stages: int | None = None
    """Triton software-pipelining stages of the forward kernel."""
    num_warps_bwd: int | None = None
    """Triton warps of the backward kernels."""
    num_stages_bwd: int | None = None
    """Triton pipelining stages of the backward kernels."""

    TILE_FIELDS = ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq")

    @classmethod
    def default(cls, device_kind: str | None = None, head_dim: int = 128) -> FlashBlockSizes:
        """Every field set, for a device kind (None: generic) and head dim."""
        return _FLASH_DEFAULTS[gpu_generation(device_kind)][_head_tier(head_dim)]

    def resolve(self, device_kind: str | None, head_dim: int) -> FlashBlockSizes:
        """Fields left at None taken from ``default(device_kind, head_dim)``, then validated."""
        out = self._filled_from(self.default(device_kind, head_dim))
        for name in self.TILE_FIELDS:
            _check("flash_attention", name, getattr(out, name), minimum=16, power_of_two=True)
        for name in ("num_warps", "num_warps_bwd"):
            _check("flash_attention", name, getattr(out, name), minimum=1, power_of_two=True)
        for name in ("num_stages", "num_stages_bwd"):
            _check("flash_attention", name, getattr(out, name), minimum=1, power_of_two=False)
        return out


@dataclasses.dataclass(frozen=True)
class PagedBlockSizes(_BlockSizes):
    """Work split and Triton settings of ``paged_attention`` (decode). None: the default."""

    pages_per_block: int | None = None
    """Pages loaded per loop step (power of two, at least 16 tokens); None: 64 tokens."""
    num_splits: int | None = None
    """Split-K ranges per sequence (power of two); None: enough programs to fill the GPU."""
    target_programs: int | None = None
    """Programs the automatic ``num_splits`` aims for (a few per SM)."""
    num_warps: int | None = None
    """Triton warps per program."""
    num_stages: int | None = None
    """Triton pipelining stages."""

    @classmethod
    def default(cls, device_kind: str | None = None, head_dim: int = 128) -> PagedBlockSizes:
        """Every field set except pages_per_block and num_splits, which depend on the call."""
        del head_dim  # same settings for every supported head dim so far
        return _PAGED_DEFAULTS[gpu_generation(device_kind)]

    def resolve(self, device_kind: str | None, head_dim: int) -> PagedBlockSizes:
        out = self._filled_from(self.default(device_kind, head_dim))
        if out.pages_per_block is not None:
            _check("paged_attention", "pages_per_block", out.pages_per_block, minimum=1,
                   power_of_two=True)
        if out.num_splits is not None:
            _check("paged_attention", "num_splits", out.num_splits, minimum=1, power_of_two=True)
        _check("paged_attention", "target_programs", out.target_programs, minimum=1,
               power_of_two=False)
        _check("paged_attention", "num_warps", out.num_warps, minimum=1, power_of_two=True)
        _check("paged_attention", "num_stages", out.num_stages, minimum=1, power_of_two=False)
        return out


@dataclasses.dataclass(frozen=True)
class WriteBlockSizes(_BlockSizes):
    """Work split and Triton settings of ``write_kv``. None: the default."""

    block_n: int | None = None
    """New tokens per program."""
    num_warps: int | None = None
    """Triton warps per program (a row copy needs few)."""

    @classmethod
    def default(cls, device_kind: str | None = None, head_dim: int = 128) -> WriteBlockSizes:
        del device_kind, head_dim
        return WriteBlockSizes(block_n=16, num_warps=1)

    def resolve(self, device_kind: str | None, head_dim: int) -> WriteBlockSizes:
        out = self._filled_from(self.default(device_kind, head_dim))
        _check("write_kv", "block_n", out.block_n, minimum=1, power_of_two=False)
        _check("write_kv", "num_warps", out.num_warps, minimum=1, power_of_two=True)
        return out


def _flash(q, k, q_dkv, k_dkv, q_dq, k_dq, warps, stages, warps_bwd, stages_bwd):
    return FlashBlockSizes(block_q=q, block_k=k, block_q_dkv=q_dkv, block_k_dkv=k_dkv,
                           block_q_dq=q_dq, block_k_dq=k_dq, num_warps=warps, num_stages=stages,
                           num_warps_bwd=warps_bwd, num_stages_bwd=stages_bwd)


_GENERIC_FLASH = {
    64: _flash(128, 64, 32, 128, 128, 32, 4, 3, 4, 2),
    128: _flash(128, 64, 32, 128, 128, 32, 8, 2, 8, 2),
    256: _flash(64, 32, 16, 64, 64, 16, 8, 2, 8, 2),
}
# About 100 KB of shared memory per SM: halve the tiles that hold a whole D-wide block.
_SMALL_SMEM_FLASH = {
    64: _flash(64, 64, 32, 64, 64, 32, 4, 2, 4, 2),
    128: _flash(64, 32, 16, 64, 64, 16, 4, 2, 4, 2),
    256: _flash(32, 16, 16, 32, 32, 16, 4, 1, 4, 1),
}
# AMD Instinct: 64 KB LDS, 64-wide wavefronts; Triton's AMD backend pipelines with 1 stage.
_CDNA_FLASH = {tier: dataclasses.replace(blocks, num_stages=1, num_stages_bwd=1)
               for tier, blocks in _SMALL_SMEM_FLASH.items()}
_FLASH_DEFAULTS = {
    "hopper": _GENERIC_FLASH,
    "blackwell": _GENERIC_FLASH,
    "ampere": _GENERIC_FLASH,
    "workstation": _SMALL_SMEM_FLASH,
    "cdna": _CDNA_FLASH,
    "generic": _GENERIC_FLASH,
}

_GENERIC_PAGED = PagedBlockSizes(target_programs=512, num_warps=4, num_stages=2)
_PAGED_DEFAULTS = {
    "hopper": _GENERIC_PAGED,       # 132 SMs: about 4 programs each
    "blackwell": _GENERIC_PAGED,
    "ampere": _GENERIC_PAGED,
    "workstation": dataclasses.replace(_GENERIC_PAGED, target_programs=256),   # 48-84 SMs
    "cdna": dataclasses.replace(_GENERIC_PAGED, num_stages=1),
    "generic": _GENERIC_PAGED,
}
