"""The one stage builder: how a replica's requests become stage programs, rows and page pools.

Everything that runs or compiles a plan (the serving runtime, ``compile_plan``
behind ``--verify`` and ``dump-hlo``, training next) asks ``build_replica``
what to build: the microbatch layout, which request sits in which row, and per
stage its ``StageKind`` (what it computes), ``StageShape`` (array sizes,
KV-page pool included) and devices.  Nothing else derives them, so a plan
compiled for a workload and a run of the same workload place the same arrays.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from hexjax.models.config import ModelConfig
from hexjax.plan import format_layers
from hexjax.runtime.pages import PagesExhaustedError, pages_for
from hexjax.runtime.stage import StageKind, StageShape
from hexjax.search.cost import KV_PAGE_TOKENS as PAGE_SIZE   # one page size for the plan and the run


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How the runtime lays out a run (what the plan does not decide)."""

    dtype: str | None = None
    """Parameter, activation and KV-cache dtype; None takes the plan's (``Plan.dtype``)."""
    page_size: int = PAGE_SIZE
    """Tokens per KV-cache page (the cost model sizes plans with the same ``KV_PAGE_TOKENS``)."""
    num_pages: int | None = None
    """KV-cache pages per stage pool; None sizes each pool to the requests (capped by the plan's
    memory budget when a cluster is given)."""
    micro_batches: int | None = None
    """Microbatches per replica.  None: on accelerators, the plan's choice (saved with its
    prediction) or else one per stage, so stages overlap; on CPU devices one, since they
    share the host's cores (overlap gains nothing, and each microbatch re-reads the weights)."""
    attention_impl: str = "auto"
    """Attention kernels: "auto" (Pallas on GPU, jnp elsewhere), or a choice of ``hexjax.kernels``."""
    seed: int = 0
    """Seed of the random weights when the model is given as a config."""
    platform: str | None = None
    """Run on this JAX platform's devices ("cpu", "gpu"); None: the default backend."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a replica's requests are cut into microbatches and padded."""

    micro_batch: int
    """Rows per microbatch (a multiple of every stage's dp)."""
    num_micro: int
    """Microbatches in flight."""
    micro_requests: int
    """Requests per microbatch (the last takes the rest); the other rows are padding."""
    prompt_len: int
    """Padded prompt length (prefill program width)."""
    table_width: int
    """Block-table slots per sequence."""


@dataclasses.dataclass(frozen=True)
class StageBuild:
    """One stage of a replica as it will be compiled."""

    kind: StageKind
    """What the stage computes, on which mesh shape."""
    shape: StageShape
    """Array sizes, the KV-page pool included."""
    devices: tuple[int, ...]
    """The plan's global device indices, in mesh order."""


@dataclasses.dataclass(frozen=True)
class ReplicaBuild:
    """A replica's microbatches, rows and stages for one set of requests."""

    layout: Layout
    """Microbatch layout."""
    rows: tuple[tuple[int | None, ...], ...]
    """Per microbatch, the request (index into the replica's prompts) of each row, None for padding."""
    stages: tuple[StageBuild, ...]
    """The stages, in pipeline order."""


def plan_layout(num_requests: int, prompt_lens: Sequence[int], max_new_tokens: int, num_stages: int,
                dps: Sequence[int], page_size: int, micro_batches: int | None = None) -> Layout:
    """Microbatches for a replica, cut as the cost model cuts them (``search.cost.microbatch_options``):
    ``micro_batches`` of them (default one per stage) of ``ceil(requests / micro_batches)`` requests,
    as many as that takes; each padded to a whole multiple of every stage's ``dp`` rows."""
    want = max(1, min(micro_batches or num_stages, num_requests))
    per = -(-num_requests // want)
    rows_unit = math.lcm(*dps)
    # pad prompts to whole pages so that runs with similar prompts share compiled code
    prompt_len = max(1, pages_for(max(prompt_lens), page_size)) * page_size
    longest = max(n + max_new_tokens for n in prompt_lens)
    width = pages_for(max(prompt_len, longest), page_size)
    return Layout(-(-per // rows_unit) * rows_unit, -(-num_requests // per), per, prompt_len, width)


def assign_rows(num_requests: int, layout: Layout, dps: Sequence[int]) -> tuple[tuple[int | None, ...], ...]:
    """Rows of each microbatch: request index, or None for a padding row.

    Microbatches take ``micro_requests`` requests each, in order.  Inside one, each request takes the free
    row whose data-parallel groups (one per stage: row ``i`` of a stage with
    ``dp`` groups is in group ``i // (micro_batch / dp)``) hold the fewest
    requests so far, so every stage's groups get at most ``ceil(requests / dp)``
    sequences where that is possible, as the cost model assumes, even when the
    stages' ``dp`` differ and rows are padded to a multiple of all of them.
    """
    mb, per = layout.micro_batch, layout.micro_requests
    rows = []
    for m in range(layout.num_micro):
        counts = [[0] * dp for dp in dps]
        row: list[int | None] = [None] * mb
        for k in range(m * per, min((m + 1) * per, num_requests)):
            def load(i):
                groups = [c[i // (mb // dp)] for c, dp in zip(counts, dps)]
                return max(groups), sum(groups), i
            best = min((i for i in range(mb) if row[i] is None), key=load)
            row[best] = k
            for c, dp in zip(counts, dps):
                c[best // (mb // dp)] += 1
        rows.append(tuple(row))
    return tuple(rows)


def group_pages(rows, lengths: Sequence[int], max_new_tokens: int, dp: int, page_size: int) -> list[int]:
    """Pages each data-parallel group of a stage needs over all microbatches (its reserved page included)."""
    need = [1] * dp
    for row in rows:
        per = len(row) // dp
        for i, r in enumerate(row):
            if r is not None:
                need[i // per] += pages_for(lengths[r] + max_new_tokens, page_size)
    return need


def pool_pages(need: Sequence[int], dp: int, page_size: int, budget: int | None = None) -> int:
    """Pages of a stage's pool: ``dp`` equal ranges, each as large as the neediest group's.

    Exactly what the cost model counts (whole pages per sequence plus one
    reserved page per device); ``budget`` (pages per device that its memory
    holds beside the weights and workspace) is a ceiling, and a shortfall is
    an error.
    """
    if budget is not None and max(need) > budget:
        raise PagesExhaustedError(
            f"KV cache too small for the requests: a data-parallel group needs {max(need) - 1} pages of "
            f"{page_size} tokens but the devices' memory holds {max(0, budget - 1)} beside the weights; "
            "serve fewer or shorter sequences per replica, or use a plan with more memory per stage")
    return dp * max(2, max(need))


def stage_kinds(cfg: ModelConfig, replica, dtype: str, attention_impl: str = "auto") -> list[StageKind]:
    """What each stage of ``replica`` computes: its layers, embedding or head, mesh and dtype.

    The model's name is dropped: it does not change a program, so equal stages
    of equal models share compiled code.
    """
    anon = dataclasses.replace(cfg, name="")
    last = len(replica.stages) - 1
    return [StageKind(anon, st.layers[0], st.num_layers, embed=si == 0, head=si == last, dp=st.dp, tp=st.tp,
                      dtype=dtype, attention_impl=attention_impl) for si, st in enumerate(replica.stages)]


def build_replica(cfg: ModelConfig, replica, prompt_lens: Sequence[int], max_new_tokens: int, dtype: str,
                  options: RunOptions = RunOptions(), *, micro_batches: int | None = None,
                  page_budget: Sequence[int] | None = None) -> ReplicaBuild:
    """What to build for ``replica`` serving prompts of ``prompt_lens`` plus ``max_new_tokens`` each.

    ``micro_batches`` overrides ``options.micro_batches``; ``page_budget``
    (pages per device, per stage) caps the pools sized to the requests.
    """
    stages = list(replica.stages)
    dps = [s.dp for s in stages]
    ps = options.page_size
    layout = plan_layout(len(prompt_lens), prompt_lens, max_new_tokens, len(stages), dps, ps,
                         micro_batches or options.micro_batches)
    rows = assign_rows(len(prompt_lens), layout, dps)
    built = []
    for si, (st, kind) in enumerate(zip(stages, stage_kinds(cfg, replica, dtype, options.attention_impl))):
        if options.num_pages is not None:
            pages = options.num_pages
        else:
            need = group_pages(rows, prompt_lens, max_new_tokens, st.dp, ps)
            try:
                pages = pool_pages(need, st.dp, ps, page_budget[si] if page_budget else None)
            except PagesExhaustedError as e:
                raise PagesExhaustedError(f"stage {si} (layers {format_layers(*st.layers)}): {e}") from None
        shape = StageShape(layout.micro_batch, layout.prompt_len, pages, ps, layout.table_width)
        built.append(StageBuild(kind, shape, tuple(st.devices)))
    return ReplicaBuild(layout, rows, tuple(built))


def page_budget(replica, cfg: ModelConfig, cluster, dtype_bytes: int, page_size: int, workload) -> list[int]:
    """KV-cache pages each stage's devices hold beside their weights and workspace (per device).

    Per stage, from the cost model's prediction for ``workload`` (the plan's,
    so that a plan the search found to fit gets the pages it was planned
    with): usable memory of its smallest device (the reserve taken off) minus
    the stage's weights and activation workspace, over one page's bytes on one
    device, in the run's dtype (``dtype_bytes``).
    """
    from hexjax.search import cost
    pred = cost.predict_replica(replica, cfg, cluster, workload, dtype_bytes)
    budget = []
    for st, sp in zip(replica.stages, pred.stages):
        layers = st.layers[1] - st.layers[0]
        page_bytes = layers * 2 * cost.kv_heads_per_device(cfg, st.tp) * cfg.head_dim * page_size * dtype_bytes
        free = sp.capacity_bytes - sp.weight_bytes - sp.activation_bytes
        budget.append(max(0, int(free // page_bytes)) if page_bytes else 1 << 30)
    return budget
