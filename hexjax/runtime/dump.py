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
    predictions = predict_stages(plan, model_cfg, workload, compiles, cluster=cluster, dtype=dtype)
    (out / "summary.md").write_text(summary_markdown(plan, model_cfg, workload, compiles, predictions, dtype))
    return compiles



@dataclasses.dataclass(frozen=True)
class StagePredict:
    """The cost model's per-device figures for one compiled stage program (``cost.stage_figures``)."""

    weight_bytes: float
    """Parameters per device."""
    kv_bytes: float
    """KV cache per device."""
    activation_bytes: float
    """Activation workspace per device."""
    flops: float
    """FLOPs of one run of the program (one microbatch), per device."""
    capacity_bytes: float | None
    """Usable memory per device (None without a cluster)."""

    @property
    def memory_bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes


def predict_stages(plan, cfg: ModelConfig, workload, compiles: list[StageCompile], *, cluster=None,
                   dtype: str = "bfloat16") -> dict[tuple[int, int, str], StagePredict]:
    """The cost model's figures for each compiled (replica, stage, phase), from ``cost.stage_figures``.

    Fed the microbatching, padded rows and attended context of the compiled
    program (the padded prompt in a prefill, every block-table slot in a
    decode step), so both sides describe the same program.
    """
    import numpy as np

    from hexjax.search import cost
    e = np.dtype(dtype).itemsize
    out = {}
    for c in compiles:
        rep = plan.replicas[c.replica]
        st = rep.stages[c.stage]
        f = cost.stage_figures(cfg, st.num_layers, st.dp, st.tp, c.stage == 0, c.stage == len(rep.stages) - 1,
                               c.num_micro, c.micro_requests, workload, e, micro_batch_rows=c.micro_batch,
                               prefill_tokens=c.prompt_len, prefill_context=c.prompt_len,
                               decode_context=c.table_width * c.page_size)
        capacity = None
        if cluster is not None:
            capacity = min(cost.usable_memory_bytes(cluster.device(i)) for i in st.devices)
        out[(c.replica, c.stage, c.phase)] = StagePredict(
            f.weight_bytes, f.kv_bytes, f.activation_bytes,
            f.prefill_flops if c.phase == "prefill" else f.decode_flops, capacity)
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "-"


def _num(x: float) -> str:
    return f"{x:.3g}"


def summary_markdown(plan, cfg: ModelConfig, workload, compiles: list[StageCompile],
                     predictions: dict[tuple[int, int, str], StagePredict], dtype: str) -> str:
    """Markdown tables: the cost model's per-device predictions beside XLA's, with ratios."""
    lines = [
        f"# Compiled stages of {cfg.name}",
        "",
        f"Workload per replica: batch {workload.batch}, prompt {workload.prompt_len}, output "
        f"{workload.output_len}; dtype {dtype}. Figures are per device. XLA FLOPs are one run of the "
        "program (one microbatch); the cost model's (`search.cost.stage_figures`) are for the same "
        "program: its padded rows, a prefill attending over the padded prompt and a decode step over every "
        "page slot of the block table (the model's own time predictions use the causal mean and the mean "
        "context instead). `XLA args` is "
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
        p = predictions[(c.replica, c.stage, c.phase)]
        pf = p.flops
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
        p = predictions[(c.replica, c.stage, c.phase)]
        wkv = p.weight_bytes + p.kv_bytes
        cap = format_bytes(p.capacity_bytes) if p.capacity_bytes else "-"
        lines.append(
            f"| r{c.replica}.s{c.stage} | {c.phase} | {format_bytes(p.weight_bytes)} | "
            f"{format_bytes(p.kv_bytes)} | {c.num_pages} | {format_bytes(wkv)} | "
            f"{format_bytes(c.argument_bytes)} | {_ratio(c.argument_bytes, wkv)} | {format_bytes(p.memory_bytes)} | "
            f"{format_bytes(c.peak_bytes)} | {_ratio(c.peak_bytes, p.memory_bytes)} | {cap} |")
    lines += ["", "Compile times: " + ", ".join(f"{c.name} {c.compile_s:.1f} s" for c in compiles), ""]
    return "\n".join(lines)
