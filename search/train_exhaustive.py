"""Exhaustive oracle for training plans: every plan of ``S_train(max_stages)``, enumerated directly.

It shares nothing with :mod:`hexjax.search.train_search` but the cost model
(:func:`hexjax.search.train_cost.predict_replica`, ``unit_hosts``, ``sync_s``)
and the space's definition:

1. every replica: each sequence of 1..``max_stages`` distinct hosts, each
   stage's ``(dp, tp)`` with ``dp * tp`` at most the host's devices, each split
   of the layers into positive parts; for every microbatch count ``M`` and
   every microbatch of ``b`` sequences (a multiple of every stage's ``dp``,
   ``M b`` at most the batch) its 1F1B time, kept when every device fits;
2. replicas with the same devices per host, ``M``, ``b`` and host of every
   synchronised unit are interchangeable (the gradient sync sees only where
   each unit lives), so only the fastest of each such group is kept;
3. every plan: each multiset of those replicas with one ``M`` whose shares sum
   to the global batch and that fits every host's device count, scored as
   the objective defines it. Multisets are grown from the fastest replicas
   up and a branch stops once its slowest replica alone (times its price so
   far, for ``cost``) reaches the best value: adding replicas never lowers the
   step (sync only grows) nor the price.

Use it on clusters of a few devices and models of a few layers.
"""

from __future__ import annotations

import itertools
import math

from hexjax.errors import PlanError
from hexjax.plan import Plan, Replica, Stage, TrainSpec
from hexjax.search import train_cost
from hexjax.search.space import free_devices, place_replica, stage_shapes
from hexjax.workload import TrainWorkload

REPLICA_LIMIT = 2_000_000
"""Refuse to evaluate more (replica, M, b) combinations than this."""


def _compositions(total: int, parts: int):
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0,) + cuts + (total,)
        yield tuple(bounds[i + 1] - bounds[i] for i in range(parts))


def _replicas(cfg, cluster, max_stages: int):
    H = cluster.num_hosts
    for P in range(1, min(max_stages, H, cfg.num_layers) + 1):
        for seq in itertools.permutations(range(H), P):
            per_stage = [stage_shapes(cfg, cluster.hosts[h].count) for h in seq]
            for meshes in itertools.product(*per_stage):
                for counts in _compositions(cfg.num_layers, P):
                    yield seq, meshes, counts


def count_evaluations(cfg, cluster, wl: TrainWorkload, max_stages: int) -> int:
    shares = sum(wl.global_batch // m for m in wl.microbatches)
    H = cluster.num_hosts
    n = 0
    for P in range(1, min(max_stages, H, cfg.num_layers) + 1):
        per = sum(math.prod(len(stage_shapes(cfg, cluster.hosts[h].count)) for h in seq)
                  for seq in itertools.permutations(range(H), P))
        n += per * math.comb(cfg.num_layers - 1, P - 1)
    return n * shares


def best_replicas(cfg, cluster, wl: TrainWorkload, max_stages: int, progress=None) -> dict:
    """``{(usage per host, M, b, unit hosts): (time, price, hosts, meshes, layer counts)}``: the fastest fitting
    replica."""
    total = count_evaluations(cfg, cluster, wl, max_stages)
    if total > REPLICA_LIMIT:
        raise PlanError(f"the exhaustive training search would evaluate {total:,} replicas (limit "
                        f"{REPLICA_LIMIT:,}); it is meant for clusters of a few devices: drop --exhaustive")
    B = wl.global_batch
    best: dict = {}
    done = 0
    for seq, meshes, counts in _replicas(cfg, cluster, max_stages):
        usage = [0] * cluster.num_hosts
        for h, (dp, tp) in zip(seq, meshes):
            usage[h] += dp * tp
        usage = tuple(usage)
        stages, a = [], 0
        for h, (dp, tp), l in zip(seq, meshes, counts):
            stages.append(Stage((a, a + l), tuple(cluster.hosts[h].devices)[:dp * tp], dp, tp, cluster.hosts[h].name))
            a += l
        rep = Replica(tuple(stages))
        step = math.lcm(*(dp for dp, _ in meshes))
        for M in wl.microbatches:
            if B % M:
                continue
            for b in range(step, B // M + 1, step):
                done += 1
                if progress is not None and done % 5000 == 0:
                    progress(done, total, "replicas")
                pred = train_cost.predict_replica(rep, cfg, cluster, wl, M * b, M)
                if not pred.fits:
                    continue
                key = (usage, M, b, train_cost.unit_hosts(counts, seq))
                old = best.get(key)
                if old is None or pred.pipeline_s < old[0]:
                    best[key] = (pred.pipeline_s, pred.price_per_hour, seq, meshes, counts)
    return best


def exhaustive_train(cfg, cluster, wl: TrainWorkload, objective: str, budget: float | None, max_stages: int,
                     progress=None):
    """``(plan, statistics)`` of the optimum; the plan None when no plan fits, the statistics then naming the
    ``(M, b)`` shares of the replicas that fit (``shares``, empty when not even one does)."""
    table = best_replicas(cfg, cluster, wl, max_stages, progress)
    caps = tuple(h.count for h in cluster.hosts)
    B = wl.global_batch
    best = None
    plans = 0
    for M in wl.microbatches:
        items = sorted(((k, v) for k, v in table.items() if k[1] == M), key=lambda kv: (kv[1][0], kv[0]))

        def rec(start, rows_left, left, chosen, slowest, price):
            nonlocal best, plans
            if rows_left == 0:
                plans += 1
                sync = train_cost.sync_s(cfg, wl, cluster, [items[i][0][3] for i in chosen])
                step = slowest + sync
                if budget is not None and price > budget * (1 + 1e-9):   # sums of cents, rounded
                    return
                value = step if objective == "throughput" else price * step
                if best is None or value < best[0] * (1 - 1e-12):
                    best = (value, M, tuple(chosen), items)
                return
            for i in range(start, len(items)):
                (usage, _, b, _), (t, p, *_) = items[i]
                if best is not None:
                    if objective == "throughput" and t >= best[0]:
                        break                   # items are sorted by time: the rest are slower still
                    if objective == "cost" and (price + p) * max(slowest, t) >= best[0]:
                        continue
                if budget is not None and price + p > budget * (1 + 1e-9):
                    continue
                if M * b <= rows_left and all(u <= c for u, c in zip(usage, left)):
                    chosen.append(i)
                    rec(i, rows_left - M * b, tuple(c - u for u, c in zip(usage, left)), chosen,
                        max(slowest, t), price + p)
                    chosen.pop()

        rec(0, B, caps, [], 0.0, 0.0)
    if best is None:
        return None, {"replicas": len(table), "plans": plans, "shares": sorted({(k[1], k[2]) for k in table})}
    _, M, chosen, items = best
    free = free_devices(cluster)
    replicas, rows = [], []
    for i in sorted(chosen, key=lambda i: (items[i][1][0], i)):
        (_, _, b, _), (_, _, seq, meshes, counts) = items[i]
        replicas.append(place_replica(cluster, free, seq, counts, meshes))
        rows.append(M * b)
    plan = Plan(cfg.name, cluster.fingerprint(), tuple(replicas), None, f"train {objective}", wl.dtype_bytes,
                training=TrainSpec(wl, M, tuple(rows)))
    return plan, {"replicas": len(table), "plans": plans}
