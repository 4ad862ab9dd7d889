"""Run a plan for a described cluster on one machine's virtual CPU devices.

A small model fits on any one GPU of a real cluster, so its plans are boring.
``miniature`` shrinks every device's memory by one factor, keeping the
cluster's shape (which devices, how many, which links, the ratios between
them), until the model no longer fits on its largest device: the search must
then cut it into uneven stages, as it would a 70B model on the real cluster.
"""

from __future__ import annotations

import dataclasses

from hexjax.models.config import ModelConfig
from hexjax.plan import format_layers, format_mesh

HEXGEN_8GPU = {
    "name": "hexgen-8gpu",
    "network": {"bandwidth_GBps": 12.5, "latency_us": 20},
    "host": [
        {"name": "a6000", "device": "A6000", "count": 4, "zone": "dc"},
        {"name": "a5000", "device": "A5000", "count": 2, "zone": "dc"},
        {"name": "a4000", "device": "A4000", "count": 2, "zone": "dc"},
    ],
}
"""HexGen's eight uneven GPUs (as ``examples/clusters/hexgen-8gpu.toml``): the built-in example."""


def example_cluster():
    """The built-in example cluster (``HEXGEN_8GPU``)."""
    from hexjax.cluster import Cluster
    return Cluster.from_dict(HEXGEN_8GPU, source="built-in hexgen-8gpu")


def shrink_memory(cluster, factor: float):
    """The same cluster with every device's memory multiplied by ``factor``."""
    from hexjax.cluster import Cluster
    d = cluster.to_dict()
    devices = {}
    for host_d, host in zip(d["host"], cluster.hosts):
        spec = host.device
        name = f"{spec.name}-x{factor:.3g}"
        devices[name] = {"base": spec.name, "memory_GiB": spec.memory_bytes * factor / 2**30}
        host_d["device"] = name
    d["device"] = {**d.get("device", {}), **devices}
    d["name"] = f"{cluster.name} (memory x{factor:.3g})"
    return Cluster.from_dict(d, source=f"{cluster.source}, memory x{factor:.3g}")


def miniature(cluster, cfg: ModelConfig, workload=None, *, dtype_bytes: int = 2,
              per_largest_device: float = 1.5):
    """``cluster`` with memory shrunk so that ``cfg`` needs ``per_largest_device`` of its largest
    devices: plans for a small model then look like plans for a large one.

    The need is the weights, plus, for a ``workload``, what the cost model adds for serving it
    on one device (KV cache and activation workspace, which weigh much more beside a tiny
    model's weights than beside a large one's).
    """
    largest = max((h.device for h in cluster.hosts), key=lambda d: d.memory_bytes)
    need = cfg.num_params * dtype_bytes
    if workload is not None:
        from hexjax.search import cost
        c = cost.stage_cost(cfg, largest, 1e11, 0.0, cfg.num_layers, 1, 1, True, True, 1, workload.batch,
                            workload, dtype_bytes)
        need = c.memory_bytes
    return shrink_memory(cluster, need / (per_largest_device * largest.memory_bytes))


@dataclasses.dataclass
class SimulatedRun:
    """A plan searched for a (miniature) cluster and run on virtual devices."""

    cluster: object
    """The cluster the plan was made for."""
    plan: object
    """The plan."""
    prediction: object
    """The cost model's prediction for it."""
    prompts: list[list[int]]
    """Prompt token ids."""
    tokens: list[list[int]]
    """Tokens generated through the plan."""
    reference: list[list[int]] | None
    """Tokens of single-device generation (when checked)."""
    seconds: float
    """Generation time through the plan (after compiling)."""
    setup_seconds: float
    """Placement and compile time of the first run."""
    reference_seconds: float | None
    """Single-device generation time (after compiling)."""

    @property
    def matches(self) -> bool | None:
        return None if self.reference is None else self.tokens == self.reference

    @property
    def tokens_per_s(self) -> float:
        return sum(map(len, self.tokens)) / self.seconds


def plan_and_run(model: str = "small", *, cluster=None, objective: str = "throughput", batch: int = 8,
                 prompt_len: int = 24, max_new_tokens: int = 16, seed: int = 0, shrink: bool = True,
                 check: bool = True) -> SimulatedRun:
    """Plan ``model`` (random weights) for ``cluster`` (default: the built-in example, shrunk to the
    model), run the plan on this machine's devices, and optionally compare with one device."""
    import time

    import numpy as np

    from hexjax import search
    from hexjax.models.hf import LlamaModel
    from hexjax.runtime.generation import RunOptions, run_plan
    from hexjax.workload import Workload

    cfg = ModelConfig.preset(model)
    base = cluster or example_cluster()
    workload = Workload(prompt_len=prompt_len, output_len=max_new_tokens, batch=batch)
    # float32 on CPU devices, so the check against one device is exact
    target = miniature(base, cfg, workload, dtype_bytes=4) if shrink else base
    plan = search.plan(cfg, target, workload, objective=objective, dtype_bytes=4)
    prediction = search.evaluate(plan, cfg, target, workload)
    lm = LlamaModel.random(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    # ragged prompts around the planned length, as many as the replicas serve at once
    num = batch * len(plan.replicas)
    prompts = [rng.integers(0, cfg.vocab_size, int(n)).tolist()
               for n in rng.integers(max(1, prompt_len // 2), prompt_len + 1, num)]
    import jax
    # too few accelerators for the plan: simulate it on virtual CPU devices
    platform = None if len(jax.devices()) >= needed_devices(plan) else "cpu"
    options = RunOptions(platform=platform)
    first = run_plan(lm, plan, prompts, max_new_tokens, cluster=target, options=options)
    again = run_plan(lm, plan, prompts, max_new_tokens, cluster=target, options=options)   # time the compiled run
    if again.tokens != first.tokens:
        raise RuntimeError("greedy generation through the plan gave different tokens on a second run")
    ref = ref_s = None
    if check:
        ref = lm.generate(prompts, max_new_tokens)
        t0 = time.perf_counter()
        lm.generate(prompts, max_new_tokens)
        ref_s = time.perf_counter() - t0
    return SimulatedRun(target, plan, prediction, prompts, again.tokens, ref, again.seconds,
                        first.compile_seconds + first.seconds, ref_s)


def describe_stages(plan, cluster=None) -> list[tuple[str, ...]]:
    """Rows (replica.stage, layers, mesh, devices, device type) for printing a plan."""
    rows = []
    for ri, rep in enumerate(plan.replicas):
        for si, st in enumerate(rep.stages):
            kind = cluster.device(st.devices[0]).name if cluster is not None else ""
            rows.append((f"r{ri}.s{si}", format_layers(*st.layers), format_mesh(st.dp, st.tp),
                         ",".join(map(str, st.devices)), kind))
    return rows


def needed_devices(plan) -> int:
    """Virtual devices a plan needs: one more than its highest device index."""
    return 1 + max(i for r in plan.replicas for s in r.stages for i in s.devices)


__all__ = ["HEXGEN_8GPU", "example_cluster", "shrink_memory", "miniature", "plan_and_run", "SimulatedRun",
           "describe_stages", "needed_devices"]
