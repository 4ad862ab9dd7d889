"""``verify_plan``: does each stage's compiled program fit its devices?"""

from __future__ import annotations

import dataclasses

from hexjax.errors import PlanError
from hexjax.models.config import ModelConfig, format_bytes
from hexjax.runtime.build import PAGE_SIZE
from hexjax.runtime.compile import StageCompile, compile_plan
from hexjax.runtime.generation import plan_dtype


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
                page_size: int = PAGE_SIZE, progress=None) -> VerifyReport:
    """Compile each stage of ``plan`` ahead of time and compare XLA's per-device memory with capacity.

    A stage is flagged (``fits`` False, ``report.ok`` False) when its largest
    compiled per-device need, over prefill and decode, exceeds the usable
    memory (capacity less ``search.cost.MEMORY_RESERVE_FRACTION``) of the
    smallest device in its mesh.  ``workload`` defaults to the plan's;
    ``dtype`` to the plan's ``dtype_bytes`` (bfloat16 for 2, float32 for 4);
    ``progress`` is passed to ``compile_plan``.
    """
    workload = workload or plan.workload
    if workload is None:
        raise PlanError("verify_plan: the plan carries no workload; pass one (prompt_len, output_len, batch)")
    dtype = dtype or plan_dtype(plan)
    from hexjax.search import cost
    compiles = compile_plan(plan, model_cfg, workload, dtype=dtype, page_size=page_size, progress=progress)
    fits = []
    for ri, rep in enumerate(plan.replicas):
        for si, st in enumerate(rep.stages):
            need = max(c.peak_bytes for c in compiles if c.replica == ri and c.stage == si)
            small = min((cluster.device(i) for i in st.devices), key=lambda d: d.memory_bytes)
            fits.append(StageFit(ri, si, tuple(st.devices), small.name, need, small.memory_bytes,
                                 cost.usable_memory_bytes(small)))
    return VerifyReport(tuple(fits), tuple(compiles))
