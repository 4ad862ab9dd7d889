"""A routing table from a trace: long prompts only to the replicas with room for them.

Replicas of one shape (same stages' device types, meshes and layer counts)
form a class. Classes are ordered by the KV pages they hold per slot (the
room a long request needs), least first; the trace's requests, ordered by
prompt length, are cut into one bucket per class so that each bucket's share
of the decode work (output tokens: a request holds its slot for that many
iterations) equals the class's share of the plan's predicted throughput.
A bucket may be served by its class and every class with more room, so
short requests still fill in anywhere while long ones stay off the replicas
with the least room. The last bucket is unbounded: every request has a place.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from hexjax.plan import Plan, RouteBucket, Routing
from hexjax.search import cost
from hexjax.trace import Trace


def replica_classes(plan: Plan, cluster) -> list[list[int]]:
    """Replica indices grouped by shape, in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, rep in enumerate(plan.replicas):
        key = tuple((cluster.hosts[cluster.host_of(st.devices[0])].device.name, st.layers, st.dp, st.tp)
                    for st in rep.stages)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def size_routing(plan: Plan, cfg, cluster, trace: Trace, max_batch: int) -> Routing | None:
    """A routing table for ``plan`` serving ``trace``'s sizes (None when every replica has one shape)."""
    from hexjax.search.simulate import DEFAULT_STEP_TOKENS, kv_capacity_pages
    classes = replica_classes(plan, cluster)
    if len(classes) < 2:
        return None
    wl = trace.workload(batch=max_batch)
    sizes = trace.sizes()
    pages = kv_capacity_pages(plan, cfg, cluster, DEFAULT_STEP_TOKENS)
    thr = [cost.predict_replica(r, cfg, cluster, wl, plan.dtype_bytes).throughput_tokens_per_s
           for r in plan.replicas]
    room = [min(pages[i] for i in c) / max_batch for c in classes]
    share = np.array([sum(thr[i] for i in c) for c in classes])
    order = np.argsort(room, kind="stable")
    share = share[order] / share.sum()
    by_prompt = sizes[np.argsort(sizes[:, 0], kind="stable")]
    work = np.cumsum(by_prompt[:, 1]) / by_prompt[:, 1].sum()
    buckets, cut = [], 0.0
    for k, ci in enumerate(order):
        # a bucket may use its class and every class with more room: short requests fill in anywhere
        reps = tuple(sorted(i for cj in order[k:] for i in classes[cj]))
        if k == len(order) - 1:
            buckets.append(RouteBucket(reps))
            break
        cut += share[k]
        j = int(np.searchsorted(work, cut))
        bound = int(by_prompt[min(j, len(by_prompt) - 1), 0])
        if buckets and bound <= buckets[-1].max_prompt_len:
            continue
        buckets.append(RouteBucket(reps, max_prompt_len=bound))
    return Routing(tuple(buckets))


def routing_rows(routing: Routing) -> list[tuple[str, str]]:
    """``(requests, replicas)`` per bucket, as ``plan`` and ``explain`` print them."""
    rows = []
    for b in routing.buckets:
        bounds = [f"prompt <= {b.max_prompt_len}" if b.max_prompt_len is not None else "",
                  f"output <= {b.max_output_len}" if b.max_output_len is not None else ""]
        what = " and ".join(x for x in bounds if x) or ("any other" if len(routing.buckets) > 1 else "any")
        rows.append((what, ", ".join(f"r{i}" for i in b.replicas)))
    return rows


def routing_text(routing: Routing) -> str:
    """One line: ``routing: prompt <= 512 -> r0, r1; any other -> r2``."""
    return "routing: " + "; ".join(f"{what} -> {reps}" for what, reps in routing_rows(routing))


@dataclasses.dataclass(frozen=True)
class RoutingChoice:
    """A size-routing table and how the trace fared with and without it (simulated)."""

    routing: Routing | None
    """The table kept (None: routing by load did at least as well, or every replica has one shape)."""
    table: Routing | None
    """The table that was tried."""
    rate_per_s: float
    """Poisson rate of the trial: ``load`` times the plan's predicted requests/s."""
    p99_latency_s: dict[str, float]
    """p99 end-to-end latency with ``"table"`` and with ``"load"`` routing."""


def choose_routing(plan: Plan, cfg, cluster, trace: Trace, max_batch: int, load: float = 0.8,
                   seed: int = 0) -> RoutingChoice:
    """:func:`size_routing`'s table, kept only if it serves ``trace`` with a lower p99 latency than routing
    by load, both simulated at ``load`` times the plan's predicted request rate (its mean workload)."""
    from hexjax.search.simulate import simulate_plan
    table = size_routing(plan, cfg, cluster, trace, max_batch)
    wl = trace.workload(batch=max_batch)
    rate = load * cost.predict(plan, cfg, cluster, wl).requests_per_s
    if table is None or not rate > 0:
        return RoutingChoice(None, table, rate, {})
    timed = trace.with_rate(rate, seed)
    with_table = dataclasses.replace(plan, routing=table)
    p99 = {name: simulate_plan(p, cfg, cluster, timed, max_batch=max_batch).percentile("latency", 99)
           for name, p in (("table", with_table), ("load", dataclasses.replace(plan, routing=None)))}
    return RoutingChoice(table if p99["table"] < p99["load"] else None, table, rate, p99)
