"""``dump_hlo``: write what XLA compiled for every stage of a plan, beside the cost model's figures."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from hexjax.models.config import ModelConfig, format_bytes
from hexjax.plan import format_layers, format_mesh
from hexjax.runtime.build import PAGE_SIZE
from hexjax.runtime.compile import StageCompile, compile_plan


def dump_hlo(plan, model_cfg: ModelConfig, workload, out_dir: str | Path, *, cluster=None,
             dtype: str = "bfloat16", page_size: int = PAGE_SIZE, progress=None) -> list[StageCompile]:
    """Write, for every stage and phase: StableHLO, optimised per-device HLO, cost and memory
    analyses as JSON; and ``summary.md`` comparing XLA's figures with the cost model's."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    compiles = compile_plan(plan, model_cfg, workload, dtype=dtype, page_size=page_size, keep_text=True,
                            progress=progress)
    for c in compiles:
        (out / f"{c.name}.stablehlo.mlir").write_text(c.stablehlo)
        (out / f"{c.name}.hlo.txt").write_text(c.hlo)
        (out / f"{c.name}.cost.json").write_text(json.dumps(c.cost, indent=1, sort_keys=True))
        (out / f"{c.name}.memory.json").write_text(json.dumps(c.memory, indent=1, sort_keys=True))
    predictions = predict_stages(plan, model_cfg, workload, compiled_layouts(compiles), cluster=cluster,
                                 dtype=dtype)
    (out / "summary.md").write_text(summary_markdown(plan, model_cfg, workload, compiles, predictions, dtype))
    return compiles



def compiled_layouts(compiles: list[StageCompile]) -> dict[int, tuple[int, int]]:
    """Replica -> (microbatches, rows per microbatch) of its compiled programs."""
    return {c.replica: (c.num_micro, c.micro_batch) for c in compiles}


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
        "| stage | phase | layers | mesh | microbatch | predicted FLOPs | XLA FLOPs | XLA / predicted |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for c in compiles:
        p = predictions[(c.replica, c.stage)]
        pf = p.prefill_flops if c.phase == "prefill" else p.decode_flops
        lines.append(f"| r{c.replica}.s{c.stage} | {c.phase} | {format_layers(*c.layers)} | {format_mesh(c.dp, c.tp)} | "
                     f"{c.micro_batch} x {c.num_micro} | {_num(pf)} | {_num(c.flops)} | {_ratio(c.flops, pf)} |")
    lines += [
        "",
        "## Memory",
        "",
        "| stage | phase | weights predicted | KV predicted | KV pages | weights+KV predicted | XLA args | "
        "args / predicted | memory predicted | XLA peak | peak / predicted | capacity |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in compiles:
        p = predictions[(c.replica, c.stage)]
        wkv = p.weight_bytes + p.kv_bytes
        cap = format_bytes(p.capacity_bytes) if p.capacity_bytes else "-"
        lines.append(
            f"| r{c.replica}.s{c.stage} | {c.phase} | {format_bytes(p.weight_bytes)} | "
            f"{format_bytes(p.kv_bytes)} | {c.num_pages} | {format_bytes(wkv)} | "
            f"{format_bytes(c.argument_bytes)} | {_ratio(c.argument_bytes, wkv)} | {format_bytes(p.memory_bytes)} | "
            f"{format_bytes(c.peak_bytes)} | {_ratio(c.peak_bytes, p.memory_bytes)} | {cap} |")
    lines += ["", "Compile times: " + ", ".join(f"{c.name} {c.compile_s:.1f} s" for c in compiles), ""]
    return "\n".join(lines)
