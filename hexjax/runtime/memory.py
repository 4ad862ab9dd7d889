"""Will a run fit?  Checked from the cost model before any device memory is touched."""

from __future__ import annotations

import numpy as np

from hexjax.errors import PlanError
from hexjax.host import require_host_bytes
from hexjax.models.config import ModelConfig, format_bytes


def check_fits(plan, cfg: ModelConfig, cluster, workloads, dtype: str) -> None:
    """Refuse a run whose stages do not fit their devices in ``dtype``, with the shortfall.

    ``workloads`` holds, per replica, the workload it will serve (None for an
    idle replica).  Figures are the cost model's per-device weights, KV cache
    and workspace against the usable memory of the stage's smallest device.
    """
    from hexjax.search import cost
    dtype_bytes = np.dtype(dtype).itemsize
    short = []
    for ri, (rep, wl) in enumerate(zip(plan.replicas, workloads)):
        if wl is None:
            continue
        pred = cost.predict_replica(rep, cfg, cluster, wl, dtype_bytes)
        for si, sp in enumerate(pred.stages):
            if sp.memory_bytes > sp.capacity_bytes:
                short.append(f"r{ri}.s{si} on {sp.host} needs {format_bytes(sp.memory_bytes)} per device "
                             f"(weights {format_bytes(sp.weight_bytes)}, KV {format_bytes(sp.kv_bytes)}, "
                             f"workspace {format_bytes(sp.activation_bytes)}) but has "
                             f"{format_bytes(sp.capacity_bytes)} usable: "
                             f"{format_bytes(sp.memory_bytes - sp.capacity_bytes)} short")
    if short:
        from hexjax.runtime.generation import plan_dtype
        fix = (f"run in the plan's {plan_dtype(plan)} (drop the dtype override)" if dtype_bytes != plan.dtype_bytes
               else "serve fewer or shorter requests per replica, or plan again for this workload")
        raise PlanError(f"the run does not fit in {dtype}: " + "; ".join(short) + f". Fix: {fix}")


def check_devices_hold(builds, devices, cfg: ModelConfig) -> None:
    """Refuse a run whose placed arrays exceed what the JAX devices themselves have.

    Accelerators report their limit (``memory_stats()['bytes_limit']``); CPU
    devices share the host's memory.
    """
    from hexjax.devices import DEVICES
    from hexjax.search import cost
    from hexjax.workload import Workload
    any_device, one = next(iter(DEVICES.values())), Workload(1, 1, 1)
    per_device: dict[int, float] = {}
    for build in builds:
        for sb in build.stages:
            k, s = sb.kind, sb.shape
            e = np.dtype(k.dtype).itemsize
            weights = cost.stage_cost(cfg, any_device, 1.0, 0.0, k.num_layers, k.dp, k.tp, k.embed, k.head, 1, 1,
                                      one, e).weight_bytes
            kv = k.num_layers * 2 * cost.kv_heads_per_device(cfg, k.tp) * cfg.head_dim * \
                (s.num_pages // k.dp) * s.page_size * e
            for i in sb.devices:
                per_device[i] = per_device.get(i, 0.0) + weights + kv
    host_total = 0.0
    for i, need in sorted(per_device.items()):
        d = devices[i]
        if d.platform == "cpu":
            host_total += need
            continue
        stats = getattr(d, "memory_stats", lambda: None)() or {}
        limit = stats.get("bytes_limit")
        if limit and need > limit:
            raise PlanError(f"device {i} ({d.device_kind}) would hold {format_bytes(need)} of weights and KV "
                            f"cache but has {format_bytes(limit)}; use a plan with more devices or a smaller "
                            "dtype")
    if host_total:
        require_host_bytes(host_total, "placing the plan on CPU devices",
                           "run a smaller model or fewer replicas on this machine, or run on the accelerators "
                           "the plan was made for")
