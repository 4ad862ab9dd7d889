"""Compile every stage of a plan ahead of time, from abstract arguments, and read XLA's analyses.

Nothing here needs weights: parameters and caches are ``ShapeDtypeStruct``s with
their shardings, so a 70B plan compiles on a laptop's virtual CPU devices.
XLA's figures (``cost_analysis``, ``memory_analysis``) are per device, for the
partitioned program of one device of the stage's mesh.
"""

from __future__ import annotations

import dataclasses

from hexjax.errors import PlanError
from hexjax.models.config import ModelConfig
from hexjax.runtime.build import PAGE_SIZE

PHASES = ("prefill", "decode")


@dataclasses.dataclass(frozen=True, kw_only=True)
class XlaRecord:
    """XLA's own figures for one compiled program, per device of its mesh."""

    flops: float
    """``cost_analysis()['flops']`` of one run of the program."""
    bytes_accessed: float
    """``cost_analysis()['bytes accessed']``."""
    argument_bytes: int
    """``memory_analysis().argument_size_in_bytes`` (weights, caches, inputs)."""
    output_bytes: int
    """Output bytes, donated buffers included."""
    alias_bytes: int
    """Output bytes that reuse donated argument buffers."""
    temp_bytes: int
    """Temporary (workspace) bytes."""
    peak_bytes: int
    """XLA's peak estimate, or argument + output - alias + temp when it gives none."""
    compile_s: float
    """Seconds XLA took to compile the program."""
    platform: str = ""
    """Platform compiled for ("cpu", "gpu", ...)."""
    stablehlo: str = dataclasses.field(default="", repr=False)
    """StableHLO of the lowered program (when kept)."""
    hlo: str = dataclasses.field(default="", repr=False)
    """Optimised, partitioned HLO of one device (when kept)."""
    cost: dict = dataclasses.field(default_factory=dict, repr=False)
    """The whole ``cost_analysis()`` dict."""
    memory: dict = dataclasses.field(default_factory=dict, repr=False)
    """The ``memory_analysis()`` fields."""


def xla_fields(compiled) -> dict:
    """``XlaRecord`` fields read from a ``jax.stages.Compiled``'s cost and memory analyses."""
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    mem = compiled.memory_analysis()
    memory = {f: int(getattr(mem, f)) for f in dir(mem)
              if f.endswith("_in_bytes") and not f.startswith("_")} if mem is not None else {}
    arg_b, out_b = memory.get("argument_size_in_bytes", 0), memory.get("output_size_in_bytes", 0)
    alias_b, temp_b = memory.get("alias_size_in_bytes", 0), memory.get("temp_size_in_bytes", 0)
    return dict(flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)),
                argument_bytes=arg_b, output_bytes=out_b, alias_bytes=alias_b, temp_bytes=temp_b,
                peak_bytes=memory.get("peak_memory_in_bytes", 0) or (arg_b + out_b - alias_b + temp_b),
                cost={k: float(v) for k, v in cost.items()}, memory=memory)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageCompile(XlaRecord):
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
    micro_requests: int
    """Requests per microbatch (the rest of ``micro_batch`` rows are padding)."""
    tokens: int
    """Tokens per row of the compiled step (padded prompt length, or 1 for decode)."""
    prompt_len: int
    """Padded prompt length the replica's prefill program is compiled for."""
    table_width: int
    """Block-table slots per sequence: a decode step attends over ``table_width * page_size`` positions."""
    page_size: int
    """Tokens per KV-cache page."""
    num_pages: int
    """KV-cache pages in the stage's pool (all dp ranges, reserved pages included)."""

    @property
    def name(self) -> str:
        return f"r{self.replica}_s{self.stage}_{self.phase}"


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


def compile_plan(plan, cfg: ModelConfig, workload, *, dtype: str = "bfloat16", page_size: int = PAGE_SIZE,
                 micro_batches: int | dict[int, int] | None = None, phases=PHASES, keep_text: bool = False,
                 attention_impl: str = "auto", progress=None) -> list[StageCompile]:
    """Compile every stage of every replica for each phase, as the runtime would run ``workload``.

    Each replica serves ``workload.batch`` sequences of ``workload.prompt_len``
    prompt tokens and ``workload.output_len`` new tokens, laid out by the same
    ``build_replica`` as a run, so the compiled page pools are the ones a run
    of that workload places.  Replicas whose stages have the same shape as an
    earlier replica's share its compile (the program is the same, only the
    devices differ).  ``micro_batches`` (one count, or one per replica)
    defaults to the plan's saved prediction, else one microbatch per stage.
    ``progress(done, total, label)`` is called before each compile.
    """
    from hexjax.runtime.build import RunOptions, build_replica
    from hexjax.runtime.generation import check_plan, plan_microbatches
    from hexjax.runtime.stage import stage_programs

    check_plan(plan, cfg)
    batch, prompt_len, output_len = int(workload.batch), int(workload.prompt_len), int(workload.output_len)
    if min(batch, prompt_len, output_len) < 1:
        raise PlanError(f"workload needs batch, prompt_len and output_len >= 1, got {workload}")
    used = max(i for r in plan.replicas for s in r.stages for i in s.devices) + 1
    devices = compile_devices(used)
    if micro_batches is None:
        micro_batches = plan_microbatches(plan)
    options = RunOptions(dtype=dtype, page_size=page_size, attention_impl=attention_impl)
    builds = [build_replica(cfg, rep, [prompt_len] * batch, output_len, dtype, options,
                            micro_batches=micro_batches.get(ri) if isinstance(micro_batches, dict)
                            else micro_batches)
              for ri, rep in enumerate(plan.replicas)]
    total = sum(len(b.stages) for b in builds) * len(phases)
    out: list[StageCompile] = []
    done: dict = {}
    for ri, build in enumerate(builds):
        for si, sb in enumerate(build.stages):
            for phase in phases:
                key = (sb.kind, sb.shape, phase)
                if progress is not None:
                    progress(len(out), total, f"r{ri}.s{si} {phase}")
                if key in done:
                    out.append(dataclasses.replace(done[key], replica=ri, stage=si, devices=sb.devices))
                    continue
                prog = stage_programs(sb.kind, sb.shape, tuple(devices[i] for i in sb.devices))
                done[key] = rec = _record(prog, phase, ri, si, sb, build.layout, keep_text)
                out.append(rec)
    if progress is not None:
        progress(total, total, "done")
    return out


def _record(prog, phase: str, ri: int, si: int, sb, layout, keep_text: bool) -> StageCompile:
    """XLA's analyses of one compiled stage program."""
    compiled = prog.compiled(phase)
    k = sb.kind
    return StageCompile(
        replica=ri, stage=si, phase=phase, devices=sb.devices, dp=k.dp, tp=k.tp,
        layers=(k.first_layer, k.first_layer + k.num_layers), micro_batch=layout.micro_batch,
        num_micro=layout.num_micro, micro_requests=layout.micro_requests,
        tokens=1 if phase == "decode" else layout.prompt_len, prompt_len=layout.prompt_len,
        table_width=layout.table_width, page_size=sb.shape.page_size, num_pages=sb.shape.num_pages,
        compile_s=prog.compile_seconds[phase], platform=prog.devices[0].platform,
        stablehlo=prog.stablehlo[phase] if keep_text else "", hlo=compiled.as_text() if keep_text else "",
        **xla_fields(compiled))
