"""Compiler views of a plan: compile every stage ahead of time from abstract arguments.

Nothing here needs weights: parameters and caches are ``ShapeDtypeStruct``s with
their shardings, so a 70B plan compiles on a laptop's virtual CPU devices.
XLA's figures (``cost_analysis``, ``memory_analysis``) are per device, for the
partitioned program of one device of the stage's mesh.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from hexjax.errors import PlanError
from hexjax.models.config import ModelConfig, format_bytes

PHASES = ("prefill", "decode")


@dataclasses.dataclass(frozen=True)
class StageCompile:
    """XLA's view of one stage's program for one phase."""

    replica: int
    """Replica index in the plan."""
    stage: int
    """Stage index in the replica."""
    phase: str
    """"prefill" or "decode"."""
    devices: tuple[int, ...]
    """The plan's global device indices of the stage."""
    dp: int
    """Data-parallel degree of the stage."""
    tp: int
    """Tensor-parallel degree of the stage."""
    layers: tuple[int, int]
    """Decoder layers [start, stop)."""
    micro_batch: int
    """Rows of the compiled microbatch."""
    num_micro: int
    """Microbatches the replica's batch is cut into (the program runs once per microbatch)."""
    tokens: int
    """Tokens per row of the compiled step (padded prompt length, or 1 for decode)."""
    flops: float
    """XLA ``cost_analysis()['flops']`` of one run of the program, per device."""
    bytes_accessed: float
    """XLA ``cost_analysis()['bytes accessed']``, per device."""
    weight_bytes: int
    """Parameter bytes one device holds (shard shapes of the parameter arguments)."""
    kv_bytes: int
    """KV-cache page bytes one device holds."""
    argument_bytes: int
    """XLA ``memory_analysis().argument_size_in_bytes`` (weights, cache, inputs)."""
    output_bytes: int
    """XLA output bytes (including the donated cache)."""
    alias_bytes: int
    """Output bytes that reuse donated argument buffers."""
    temp_bytes: int
    """XLA temporary (workspace) bytes."""
    peak_bytes: int
    """XLA's peak memory estimate, or argument + output - alias + temp when it gives none."""
    compile_s: float
    """Seconds XLA took to compile the program."""
    platform: str = ""
    """Platform compiled for ("cpu", "gpu", ...)."""
    stablehlo: str = dataclasses.field(default="", repr=False)
    """StableHLO of the lowered program."""
    hlo: str = dataclasses.field(default="", repr=False)
    """Optimised, partitioned HLO of one device."""
    cost: dict = dataclasses.field(default_factory=dict, repr=False)
    """The whole ``cost_analysis()`` dict."""
    memory: dict = dataclasses.field(default_factory=dict, repr=False)
    """The ``memory_analysis()`` fields."""

    @property
    def name(self) -> str:
        return f"r{self.replica}_s{self.stage}_{self.phase}"

    @property
    def device_bytes(self) -> int:
        """Bytes one device needs while the program runs."""
        return self.peak_bytes


def compile_devices(count: int) -> list:
    """``count`` JAX devices to compile for, in the plan's global order.

    The default backend's devices when there are enough; otherwise virtual
    CPU devices (asked for here if JAX has not started yet), which is how a
    plan for a cluster one does not have is checked.
    """
    import jax
    from hexjax.runtime.devices import ordered_devices
    try:
        current = jax.config.jax_num_cpu_devices
        if current < count:
            jax.config.update("jax_num_cpu_devices", max(count, _flag_device_count()))
    except RuntimeError:
        pass  # backends already started; use what exists
    devices = ordered_devices()
    if len(devices) >= count:
        return devices[:count]
    cpus = sorted(jax.devices("cpu"), key=lambda d: d.id)
    if len(cpus) >= count:
        return cpus[:count]
    raise PlanError(
        f"compiling this plan needs {count} devices but JAX has {len(devices)} "
        f"({devices[0].platform}) and {len(cpus)} CPU devices; start with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={count} (the CLI's --virtual-devices)")


def _flag_device_count() -> int:
    import os
    for f in os.environ.get("XLA_FLAGS", "").split():
        if f.startswith("--xla_force_host_platform_device_count="):
            return int(f.split("=", 1)[1])
    return 1


def _shard_bytes(abstract_tree) -> int:
    import jax
    total = 0
    for a in jax.tree.leaves(abstract_tree):
        shape = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
        total += math.prod(shape) * np.dtype(a.dtype).itemsize
    return total


def compile_plan(plan, cfg: ModelConfig, workload, *, dtype: str = "bfloat16", page_size: int = 16,
                 micro_batches: int | dict[int, int] | None = None, phases=PHASES, keep_text: bool = False,
                 attention_impl: str = "auto") -> list[StageCompile]:
    """Compile every stage of every replica for each phase, as the runtime would run ``workload``.

    Each replica serves ``workload.batch`` sequences of ``workload.prompt_len``
    prompt tokens and ``workload.output_len`` new tokens.  Replicas whose stages
    have the same shape as an earlier replica's share its compile (the
    program is the same, only the devices differ).  ``micro_batches`` (one
    count, or one per replica) defaults to the plan's saved prediction, else
    one microbatch per stage.
    """
    from hexjax.runtime.generation import check_plan
    from hexjax.runtime.pipeline import assign_rows, group_pages, plan_layout
    from hexjax.runtime.stage import StageKind, StageShape, stage_programs

    check_plan(plan, cfg)
    batch, prompt_len, output_len = int(workload.batch), int(workload.prompt_len), int(workload.output_len)
    if min(batch, prompt_len, output_len) < 1:
        raise PlanError(f"workload needs batch, prompt_len and output_len >= 1, got {workload}")
    used = max(i for r in plan.replicas for s in r.stages for i in s.devices) + 1
    devices = compile_devices(used)
    anon = dataclasses.replace(cfg, name="")   # the name does not change the program
    out: list[StageCompile] = []
    done: dict = {}
    if micro_batches is None:
        micro_batches = plan_microbatches(plan)
    for ri, rep in enumerate(plan.replicas):
        stages = list(rep.stages)
        micro = micro_batches.get(ri) if isinstance(micro_batches, dict) else micro_batches
        lay = plan_layout(batch, [prompt_len] * batch, output_len, len(stages), [s.dp for s in stages],
                          page_size, micro)
        rows = assign_rows(batch, lay, [s.dp for s in stages])
        for si, st in enumerate(stages):
            # each stage's pool holds exactly the replica batch's pages, one reserved page per group
            need = group_pages(rows, [prompt_len] * batch, output_len, st.dp, page_size)
            shape = StageShape(lay.micro_batch, lay.prompt_len, st.dp * max(need), page_size, lay.table_width)
            start, stop = st.layers
            kind = StageKind(anon, start, stop - start, embed=si == 0, head=si == len(stages) - 1,
                             dp=st.dp, tp=st.tp, dtype=dtype, attention_impl=attention_impl)
            for phase in phases:
                key = (kind, shape, phase)
                if key in done:
                    out.append(dataclasses.replace(done[key], replica=ri, stage=si, devices=tuple(st.devices)))
                    continue
                prog = stage_programs(kind, shape, tuple(devices[i] for i in st.devices))
                compiled = prog.compiled(phase)
                stablehlo, compile_s = prog.stablehlo[phase], prog.compile_seconds[phase]
                args = prog.abstract_args(phase)
                cost = compiled.cost_analysis() or {}
                if isinstance(cost, (list, tuple)):
                    cost = cost[0] if cost else {}
                mem = compiled.memory_analysis()
                memory = {f: int(getattr(mem, f)) for f in dir(mem)
                          if f.endswith("_in_bytes") and not f.startswith("_")} if mem is not None else {}
                arg_b, out_b = memory.get("argument_size_in_bytes", 0), memory.get("output_size_in_bytes", 0)
                alias_b, temp_b = memory.get("alias_size_in_bytes", 0), memory.get("temp_size_in_bytes", 0)
                peak = memory.get("peak_memory_in_bytes", 0) or (arg_b + out_b - alias_b + temp_b)
                rec = StageCompile(
                    ri, si, phase, tuple(st.devices), st.dp, st.tp, (start, stop), lay.micro_batch,
                    lay.num_micro, 1 if phase == "decode" else lay.prompt_len,
                    float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)),
                    _shard_bytes(args[0]), _shard_bytes(args[1]), arg_b, out_b, alias_b, temp_b, peak,
                    compile_s, devices[st.devices[0]].platform,
                    stablehlo=stablehlo if keep_text else "",
                    hlo=compiled.as_text() if keep_text else "",
                    cost={k: float(v) for k, v in cost.items()}, memory=memory)
                done[key] = rec
                out.append(rec)
    return out


# ----------------------------------------------------------------------------- verify

def plan_dtype(plan) -> str:
    """The dtype a plan was sized for, from its ``dtype_bytes``."""
    return {4: "float32", 2: "bfloat16"}.get(getattr(plan, "dtype_bytes", 2), "bfloat16")


@dataclasses.dataclass(frozen=True)
class StageFit:
    """Compiled memory of one stage against the smallest device of its mesh."""

    replica: int
    """Replica index."""
    stage: int
    """Stage index."""
    devices: tuple[int, ...]
    """Global device indices."""
    device_type: str
    """Name of the smallest device of the stage."""
    compiled_bytes: int
    """Largest per-device need over the phases (XLA's peak)."""
    capacity_bytes: int
    """Memory of the smallest device of the stage."""
    usable_bytes: float
    """What a plan may fill of it: capacity less the cost model's reserve (runtime, fragmentation)."""

    @property
    def fits(self) -> bool:
        return self.compiled_bytes <= self.usable_bytes


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """Whether each stage's compiled program fits its devices."""

    stages: tuple[StageFit, ...]
    """One entry per (replica, stage)."""
    compiles: tuple[StageCompile, ...]
    """The underlying compiles (per phase)."""

    @property
    def ok(self) -> bool:
        return all(s.fits for s in self.stages)

    def table(self) -> str:
        """A plain-text table, one line per stage."""
        lines = [f"{'stage':<8} {'devices':<16} {'device':<10} {'compiled':>11} {'usable':>11} {'capacity':>11} "
                 f"{'use':>6}  fits"]
        for s in self.stages:
            devs = ",".join(map(str, s.devices))
            lines.append(f"r{s.replica}.s{s.stage:<5} {devs:<16} {s.device_type:<10} "
                         f"{format_bytes(s.compiled_bytes):>11} {format_bytes(s.usable_bytes):>11} "
                         f"{format_bytes(s.capacity_bytes):>11} "
                         f"{100 * s.compiled_bytes / s.usable_bytes:5.1f}%  {'yes' if s.fits else 'NO'}")
        return "\n".join(lines)


def verify_plan(plan, model_cfg: ModelConfig, cluster, workload=None, *, dtype: str | None = None,
                page_size: int = 16) -> VerifyReport:
    """Compile each stage of ``plan`` ahead of time and compare XLA's per-device memory with capacity.

    A stage is flagged (``fits`` False, ``report.ok`` False) when its largest
    compiled per-device need, over prefill and decode, exceeds the usable
    memory (capacity less ``search.cost.MEMORY_RESERVE_FRACTION``) of the
    smallest device in its mesh.  ``workload`` defaults to the plan's;
    ``dtype`` to the plan's ``dtype_bytes`` (bfloat16 for 2, float32 for 4).
    """
    workload = workload or plan.workload
    if workload is None:
        raise PlanError("verify_plan: the plan carries no workload; pass one (prompt_len, output_len, batch)")
    dtype = dtype or plan_dtype(plan)
    from hexjax.search import cost
    compiles = compile_plan(plan, model_cfg, workload, dtype=dtype, page_size=page_size)
    fits = []
    for ri, rep in enumerate(plan.replicas):
        for si, st in enumerate(rep.stages):
            need = max(c.device_bytes for c in compiles if c.replica == ri and c.stage == si)
            small = min((cluster.device(i) for i in st.devices), key=lambda d: d.memory_bytes)
            fits.append(StageFit(ri, si, tuple(st.devices), small.name, need, small.memory_bytes,
                                 cost.usable_memory_bytes(small)))
    return VerifyReport(tuple(fits), tuple(compiles))


# ----------------------------------------------------------------------------- dump

def dump_hlo(plan, model_cfg: ModelConfig, workload, out_dir: str | Path, *, cluster=None,
             dtype: str = "bfloat16", page_size: int = 16) -> list[StageCompile]:
    """Write, for every stage and phase: StableHLO, optimised per-device HLO, cost and memory
    analyses as JSON; and ``summary.md`` comparing XLA's figures with the cost model's."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    compiles = compile_plan(plan, model_cfg, workload, dtype=dtype, page_size=page_size, keep_text=True)
    for c in compiles:
        (out / f"{c.name}.stablehlo.mlir").write_text(c.stablehlo)
        (out / f"{c.name}.hlo.txt").write_text(c.hlo)
        (out / f"{c.name}.cost.json").write_text(json.dumps(c.cost, indent=1, sort_keys=True))
        (out / f"{c.name}.memory.json").write_text(json.dumps(c.memory, indent=1, sort_keys=True))
    predictions = predict_stages(plan, model_cfg, workload, compiled_layouts(compiles), cluster=cluster,
                                 dtype=dtype)
    (out / "summary.md").write_text(summary_markdown(plan, model_cfg, workload, compiles, predictions, dtype))
    return compiles


# ----------------------------------------------------------------------------- cost-model side

def compiled_layouts(compiles: list[StageCompile]) -> dict[int, tuple[int, int]]:
    """Replica -> (microbatches, rows per microbatch) of its compiled programs."""
    return {c.replica: (c.num_micro, c.micro_batch) for c in compiles}


def plan_microbatches(plan) -> dict[int, int] | None:
    """Microbatches per replica that the plan's saved prediction chose, if it has one."""
    pred = getattr(plan, "prediction", None) or {}
    reps = pred.get("replicas") if isinstance(pred, dict) else None
    if not reps or len(reps) != len(plan.replicas):
        return None
    try:
        return {i: int(r["microbatches"]) for i, r in enumerate(reps)}
    except (KeyError, TypeError, ValueError):
        return None


@dataclasses.dataclass(frozen=True)
class StagePredict:
    """The cost model's per-device figures for one stage (``hexjax.search.cost``)."""

    weight_bytes: float
    """Parameters per device."""
    kv_bytes: float
    """KV cache per device."""
    activation_bytes: float
    """Activation workspace per device."""
    prefill_flops: float
    """FLOPs of one microbatch's prefill, per device."""
    decode_flops: float
    """FLOPs of one microbatch's decode step (at the mean context), per device."""
    capacity_bytes: float | None
    """Usable memory per device (None without a cluster)."""

    @property
    def memory_bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes


def predict_stages(plan, cfg: ModelConfig, workload, layouts: dict[int, tuple[int, int]], *, cluster=None,
                   dtype: str = "bfloat16") -> dict[tuple[int, int], StagePredict]:
    """Cost-model figures per (replica, stage), with the formulas of ``search/cost.py``.

    ``layouts`` maps a replica to the ``(microbatches, requests per microbatch)``
    it was compiled with, so both sides describe the same programs.
    """
    from hexjax.devices import DEVICES
    from hexjax.search import cost

    import jax.numpy as jnp
    e = jnp.dtype(dtype).itemsize
    out = {}
    s, n = workload.prompt_len, workload.output_len
    for ri, rep in enumerate(plan.replicas):
        P = len(rep.stages)
        mb, b = layouts[ri]
        for si, st in enumerate(rep.stages):
            if cluster is not None:
                host = cluster.hosts[cluster.host_of(st.devices[0])]
                device, bw, lat = host.device, host.intra_bandwidth_Bps, host.intra_latency_s
            else:  # memory and FLOPs do not depend on the device
                device, bw, lat = next(iter(DEVICES.values())), 1e11, 1e-6
            l = st.layers[1] - st.layers[0]
            c = cost.stage_cost(cfg, device, bw, lat, l, st.dp, st.tp, si == 0, si == P - 1, mb, b, workload, e)
            r = -(-b // st.dp)
            head = 2 * cfg.hidden_size * cost.vocab_per_device(cfg, st.tp) if si == P - 1 else 0.0
            prefill = l * r * s * cost.layer_flops_per_device(cfg, st.tp, (s + 1) / 2) + r * head
            decode = l * r * cost.layer_flops_per_device(cfg, st.tp, s + n / 2) + r * head
            out[(ri, si)] = StagePredict(c.weight_bytes, c.kv_bytes, c.activation_bytes, prefill, decode,
                                         c.capacity_bytes if cluster is not None else None)
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "-"


def _num(x: float) -> str:
    return f"{x:.3g}"


def summary_markdown(plan, cfg: ModelConfig, workload, compiles: list[StageCompile],
                     predictions: dict[tuple[int, int], StagePredict], dtype: str) -> str:
    """Markdown tables: the cost model's per-device predictions beside XLA's, with ratios."""
    lines = [
        f"# Compiled stages of {cfg.name}",
        "",
        f"Workload per replica: batch {workload.batch}, prompt {workload.prompt_len}, output "
        f"{workload.output_len}; dtype {dtype}. Figures are per device. XLA FLOPs are one run of the "
        "program (one microbatch); the cost model's are per microbatch too (decode at the mean context "
        "`prompt + output/2`; XLA's decode program reads every page slot of the block table, i.e. the "
        "full context, and its prefill attends over the padded prompt). `XLA args` is "
        "`memory_analysis().argument_size_in_bytes` (weights + KV pages + inputs); `XLA peak` its peak "
        "estimate.",
        "",
        *([f"Compiled for {compiles[0].platform}: XLA's CPU backend converts bf16 weights to f32 before "
           "each matmul, and counts the converts as FLOPs (about one per weight element per step), which "
           "shows in decode steps of few rows; a GPU compile does not.", ""]
          if compiles and compiles[0].platform == "cpu" and dtype == "bfloat16" else []),
        "## FLOPs",
        "",
        "| stage | phase | layers | dp x tp | microbatch | predicted FLOPs | XLA FLOPs | XLA / predicted |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for c in compiles:
        p = predictions[(c.replica, c.stage)]
        pf = p.prefill_flops if c.phase == "prefill" else p.decode_flops
        lines.append(f"| r{c.replica}.s{c.stage} | {c.phase} | {c.layers[0]}-{c.layers[1] - 1} | {c.dp} x {c.tp} | "
                     f"{c.micro_batch} x {c.num_micro} | {_num(pf)} | {_num(c.flops)} | {_ratio(c.flops, pf)} |")
    lines += [
        "",
        "## Memory",
        "",
        "| stage | phase | weights predicted | weights placed | KV predicted | KV placed | "
        "weights+KV predicted | XLA args | args / predicted | memory predicted | XLA peak | "
        "peak / predicted | capacity |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in compiles:
        p = predictions[(c.replica, c.stage)]
        wkv = p.weight_bytes + p.kv_bytes
        cap = format_bytes(p.capacity_bytes) if p.capacity_bytes else "-"
        lines.append(
            f"| r{c.replica}.s{c.stage} | {c.phase} | {format_bytes(p.weight_bytes)} | {format_bytes(c.weight_bytes)} | "
            f"{format_bytes(p.kv_bytes)} | {format_bytes(c.kv_bytes)} | {format_bytes(wkv)} | "
            f"{format_bytes(c.argument_bytes)} | {_ratio(c.argument_bytes, wkv)} | {format_bytes(p.memory_bytes)} | "
            f"{format_bytes(c.peak_bytes)} | {_ratio(c.peak_bytes, p.memory_bytes)} | {cap} |")
    lines += ["", "Compile times: " + ", ".join(f"{c.name} {c.compile_s:.1f} s" for c in compiles), ""]
    return "\n".join(lines)
