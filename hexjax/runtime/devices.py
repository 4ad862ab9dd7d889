"""Map a plan's global device indices onto JAX devices."""

from __future__ import annotations

import os

from hexjax.errors import PlanError


def use_virtual_cpu_devices(count: int) -> None:
    """Ask for ``count`` virtual CPU devices; call before JAX starts its backends.

    Simulates a described cluster on one machine: the plan's device ``i``
    becomes virtual CPU device ``i`` (run with ``RunOptions(platform="cpu")``
    where accelerators are present too).
    """
    if count < 1:
        raise ValueError(f"virtual device count must be at least 1, got {count}")
    flag = f"--xla_force_host_platform_device_count={count}"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count=")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [flag])
    import jax
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        # backends already started: the flag can no longer change the count
        have = len(jax.devices())
        if have < count:
            raise PlanError(
                f"asked for {count} virtual CPU devices but JAX has already started with {have}; "
                "set XLA_FLAGS=--xla_force_host_platform_device_count=N before the first use of JAX") from None


def ordered_devices(platform: str | None = None) -> list:
    """Every JAX device (of ``platform``, default backend if None), ordered by process, then id:
    the plan's global numbering."""
    import jax
    return sorted(jax.devices(platform), key=lambda d: (d.process_index, d.id))


def plan_devices(plan, platform: str | None = None) -> list:
    """The JAX device for each global index the plan uses (indexed by that number)."""
    devices = ordered_devices(platform)
    used = sorted({i for r in plan.replicas for s in r.stages for i in s.devices})
    if used and used[-1] >= len(devices):
        platform = devices[0].platform if devices else "none"
        raise PlanError(
            f"the plan uses device index {used[-1]} ({len(used)} devices in all) but only "
            f"{len(devices)} {platform} device(s) exist; run it on a cluster that big, or simulate "
            f"it with --virtual-devices {used[-1] + 1} (XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{used[-1] + 1})")
    return devices
