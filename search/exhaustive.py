"""Exhaustive oracle: every plan of the plan space, enumerated directly.

It shares nothing with the fast search but the cost model and the space's
definition (:mod:`hexjax.search.space`):

1. every replica: each sequence of 1..``max_stages`` distinct hosts, each
   stage's ``(dp, tp)`` with ``dp * tp`` at most the host's devices, each
   split of the layers into positive parts; evaluated by
   :func:`hexjax.search.cost.predict_replica` and kept when it fits;
2. replicas that use exactly the same number of devices on every host are
   interchangeable in any plan, so only the fastest of each such group is
   kept (it is at least as good for every objective);
3. every plan: each multiset of those replicas that fits every host's
   device count, scored on the objective's definition directly.

The number of plans grows very fast: use it on clusters of about ten
devices and small models.
"""

from __future__ import annotations

import itertools
import math

from hexjax.errors import PlanError
from hexjax.plan import Plan, Replica, Stage
from hexjax.search import cost
from hexjax.search.space import SLO_TOLERANCE, free_devices, place_replica, stage_shapes
from hexjax.workload import Workload

REPLICA_LIMIT = 3_000_000
"""Refuse to enumerate more replicas than this."""
TIE = 1e-9


def _compositions(total: int, parts: int):
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0,) + cuts + (total,)
        yield tuple(bounds[i + 1] - bounds[i] for i in range(parts))


def count_replicas(cfg, cluster, max_stages: int) -> int:
    shapes = [len(stage_shapes(cfg, h.count)) for h in cluster.hosts]
    total = 0
    for P in range(1, min(max_stages, cluster.num_hosts, cfg.num_layers) + 1):
        per = 0
        for seq in itertools.permutations(range(cluster.num_hosts), P):
            per += math.prod(shapes[h] for h in seq)
        total += per * math.comb(cfg.num_layers - 1, P - 1)
    return total


def all_replicas(cfg, cluster, workload: Workload, max_stages: int, dtype_bytes: int, progress=None):
    """``{usage per host: (prediction, hosts, meshes, layer counts)}``: the fastest fitting replica per usage."""
    n_rep = count_replicas(cfg, cluster, max_stages)
    if n_rep > REPLICA_LIMIT:
        raise PlanError(f"the exhaustive search would enumerate {n_rep:,} replicas (limit {REPLICA_LIMIT:,}); "
                        "it is meant for clusters of about ten devices: drop --exhaustive or lower max_stages")
    best: dict = {}
    done = 0
    H = cluster.num_hosts
    for P in range(1, min(max_stages, H, cfg.num_layers) + 1):
        for seq in itertools.permutations(range(H), P):
            per_stage = [stage_shapes(cfg, cluster.hosts[h].count) for h in seq]
            for meshes in itertools.product(*per_stage):
                usage = [0] * H
                for h, (dp, tp) in zip(seq, meshes):
                    usage[h] += dp * tp
                usage = tuple(usage)
                for counts in _compositions(cfg.num_layers, P):
                    done += 1
                    if progress is not None and done % 5000 == 0:
                        progress(done, n_rep, "replicas")
                    stages, a = [], 0
                    for h, (dp, tp), l in zip(seq, meshes, counts):
                        devs = tuple(cluster.hosts[h].devices)[:dp * tp]
                        stages.append(Stage((a, a + l), devs, dp, tp, cluster.hosts[h].name))
                        a += l
                    pred = cost.predict_replica(Replica(tuple(stages)), cfg, cluster, workload, dtype_bytes)
                    if not pred.fits:
                        continue
                    old = best.get(usage)
                    if old is None or pred.latency_s < old[0].latency_s:
                        best[usage] = (pred, seq, meshes, counts)
    return best


def _packings(usages: list[tuple[int, ...]], caps: tuple[int, ...]):
    """Every non-empty multiset of usage vectors (indices, with repeats) that fits ``caps``."""
    out = []

    def rec(start, left, chosen):
        if chosen:
            out.append(tuple(chosen))
        for i in range(start, len(usages)):
            u = usages[i]
            if all(x <= y for x, y in zip(u, left)):
                chosen.append(i)
                rec(i, tuple(y - x for x, y in zip(u, left)), chosen)
                chosen.pop()

    rec(0, caps, [])
    return out


def exhaustive_plan(cfg, cluster, workload: Workload, objective: str, slo_s: float | None, max_stages: int,
                    dtype_bytes: int = 2, progress=None) -> Plan:
    """The optimum over every plan of ``S(max_stages)`` (same objectives as the fast search)."""
    import time
    t0 = time.perf_counter()
    table = all_replicas(cfg, cluster, workload, max_stages, dtype_bytes, progress)
    n_replicas = count_replicas(cfg, cluster, max_stages)
    if not table:
        from hexjax.search.planner import infeasible_message
        raise PlanError(infeasible_message(cfg, cluster, workload, max_stages, dtype_bytes))
    items = sorted(table.items())
    if slo_s is not None:
        fast = min(p.latency_s for _, (p, *_r) in items)
        items = [it for it in items if it[1][0].latency_s <= slo_s * SLO_TOLERANCE]
        if not items:
            raise PlanError(f"no plan meets the latency SLO of {slo_s * 1e3:.1f} ms: the best end-to-end latency "
                            f"found is {fast * 1e3:.1f} ms (short by {(fast - slo_s) * 1e3:.1f} ms)")
    usages = [u for u, _ in items]
    preds = [v[0] for _, v in items]
    caps = tuple(h.count for h in cluster.hosts)
    plans = _packings(usages, caps)

    def totals(pk):
        thr = sum(preds[i].throughput_tokens_per_s for i in pk)
        return (thr, max(preds[i].latency_s for i in pk), sum(preds[i].price_per_hour for i in pk),
                sum(preds[i].requests_per_s for i in pk))

    scored = [(pk, totals(pk)) for pk in plans]
    if objective == "latency":
        best_lat = min(t[1] for _, t in scored)
        pool = [(pk, t) for pk, t in scored if t[1] <= best_lat * (1 + TIE)]
        pick = max(pool, key=lambda x: x[1][0])
    elif objective == "throughput":
        pick = max(scored, key=lambda x: x[1][0])
    elif workload.rate_per_s is not None:
        pool = [(pk, t) for pk, t in scored if t[3] >= workload.rate_per_s * (1 - TIE)]
        if not pool:
            most = max(t[3] for _, t in scored)
            raise PlanError(f"no plan sustains {workload.rate_per_s:g} requests/s: the most any plan serves is "
                            f"{most:.4g} requests/s")
        pick = min(pool, key=lambda x: x[1][2])
    else:
        ratio = {id(pk): cost.tokens_per_dollar(t[0], t[2]) for pk, t in scored}
        top = max(ratio.values())
        pool = [(pk, t) for pk, t in scored if ratio[id(pk)] >= top * (1 - TIE) or ratio[id(pk)] == top]
        pick = max(pool, key=lambda x: x[1][0])

    free = free_devices(cluster)
    replicas = []
    for i in sorted(pick[0], key=lambda i: (preds[i].latency_s, i)):
        _, seq, meshes, counts = items[i][1]
        replicas.append(place_replica(cluster, free, seq, counts, meshes))
    plan = Plan(cfg.name, cluster.fingerprint(), tuple(replicas), workload, objective, dtype_bytes)
    pred = cost.predict(plan, cfg, cluster, workload)
    d = pred.to_dict()
    d["search"] = {"search_s": time.perf_counter() - t0, "replicas": n_replicas, "plans": len(plans),
                   "max_stages": max_stages, "exhaustive": True}
    return Plan(plan.model, plan.cluster_fingerprint, plan.replicas, workload, objective, dtype_bytes, d)
