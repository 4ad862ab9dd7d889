"""Exact search for training plans: pipelines by DP and branch and bound, replicas and batch shares by an
integer program.

The plan space ``S_train(max_stages)``: replicas as for serving
(:mod:`hexjax.search.space`: pipelines of 1..``max_stages`` stages on distinct
hosts, each stage a ``(dp, tp)`` mesh of one host, devices used once), one
microbatch count ``M`` (from the workload's options) for every replica, and
replica ``r`` taking ``R_r = M b_r`` sequences per step, ``b_r`` a multiple of
every ``dp`` of the replica, ``Σ R_r`` the global batch; every device fits.
Values come from :mod:`hexjax.search.train_cost`:
``step = max_r T_r(b_r) + sync(n, slowest link of the used hosts)``.

1. Pipelines. For every footprint (multiset of ``(host class, devices)``
   pieces whose memory can hold the training state), every ``M`` and every
   ``b``: the order of the pieces, each stage's shape and the layer split
   minimising ``T = Σ f + (M - 1) max f`` (the serving search's machinery
   with the prefill as ``f``: an additive DP for ``M = 1``, for ``M > 1``
   bounds from DPs and an exact branch and bound). Candidates with a smaller
   footprint and no larger ``T`` at the same ``(M, b)`` make larger ones
   redundant and are dropped.
2. Plans. For every ``M``, every replica count ``n`` and every bound on the
   link the synchronisation crosses (a pair of bandwidth and latency met by
   the cluster), an integer program over copies of each candidate on concrete
   hosts: exactly ``n`` copies, shares summing to the batch, devices of each
   host, hosts joined by a slower link never used together (``n > 1``);
   minimise the slowest replica's ``T`` (``throughput``; with
   ``budget_per_hour`` also price <= budget), or enumerate the frontier of
   (``T``, price) points (``cost``). The plan's value is computed from the
   hosts it really uses. Every plan of the space is feasible in the program
   of its own ``(M, n, link)``, where its value is at most what the program
   charges, so the least value over all programs is the optimum. Programs
   whose lower bound (least ``T`` of a replica that takes at least
   ``B / (M n)`` sequences, plus the sync at that link) cannot beat the best
   so far are skipped, ``n`` stops where ``n`` copies of the training state
   exceed the cluster's memory, and a program leaves out the columns that
   could not improve on the best value (a replica slower than it, or one
   taking more sequences than the other ``n - 1`` leave).

``max_stages`` defaults to 4, lowered on large clusters while the estimated
work (footprints times orders times batch shares) exceeds a budget per device,
but never below the fewest hosts that can hold the training state; the plan
records the value used. The work grows with the batch (every share ``b`` is
a separate DP), so large clusters with long pipelines take minutes to hours:
the search is exact, not fast, there.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections import defaultdict
from typing import Callable

import numpy as np

from hexjax.errors import PlanError
from hexjax.models.config import ModelConfig, format_bytes
from hexjax.plan import Plan, TrainSpec
from hexjax.search import cost, train_cost
from hexjax.search.packing import assignments, prune_dominated
from hexjax.search.pipeline import PipelineChoice, PipelineSearch, Position
from hexjax.search.planner import count_footprints, footprints, resolve_model
from hexjax.search.space import DEFAULT_MAX_STAGES, Symmetry, free_devices, host_classes, place_replica, shapes
from hexjax.workload import TrainWorkload, Workload

OBJECTIVES = ("throughput", "cost")
WORK_PER_DEVICE = 1_500
"""Budget of the automatic ``max_stages``: footprints x orders x (M, b) choices, per device (about 3 ms
each on one core: hexgen-8gpu keeps 4 stages, larger clusters drop to the fewest hosts that hold the state)."""
INF = math.inf
Progress = Callable[[int, int, str], None]


@dataclasses.dataclass(frozen=True)
class TrainChoice:
    """The best pipeline of one footprint for one ``(M, b)``."""

    step_s: float
    """``T``: the replica's 1F1B time for its share of ``M b`` sequences."""
    pipe: PipelineChoice
    microbatches: int
    microbatch: int


@dataclasses.dataclass(frozen=True)
class Constraints:
    """Restrictions that turn the search into a baseline (the plan space minus what they forbid)."""

    same_layout: bool = False
    """Every replica has the same pieces, order, layer split and meshes (Metis/Sailor's space)."""
    symmetric: bool = False
    """Every stage has ``dp = 1`` and one ``tp`` throughout, layers split evenly, replicas equal
    (so equal batch shares): what homogeneous systems run."""


class TrainPipelines:
    """Best pipeline per (footprint, M, b), with per-stage vectors cached."""

    def __init__(self, cfg: ModelConfig, cluster, sym: Symmetry, wl: TrainWorkload, constraints: Constraints):
        self.cfg, self.cluster, self.sym, self.wl, self.cons = cfg, cluster, sym, wl, constraints
        self.L = cfg.num_layers
        self.layers = np.arange(self.L + 1)
        # the serving machinery minimises Σ p + (mb - 1) max p when a request emits one token
        self.core = PipelineSearch(cfg, cluster, sym, Workload(1, 1, 1))
        self._pos: dict = {}
        self.evaluated = 0

    def position(self, cls: int, devices: int, M: int, b: int, j: int, P: int, prev: int | None):
        key = (cls, devices, min(P - j, M), b, j, P, prev)     # M matters only through the stash
        if key in self._pos:
            return self._pos[key]
        host = self.cluster.hosts[self.sym.classes[cls].hosts[0]]
        link = None if prev is None else self.sym.link[(prev, cls)]
        meshes, works = [], []
        for dp, tp in shapes(self.cfg, devices):
            if b % dp or (self.cons.symmetric and dp != 1):
                continue
            c = train_cost.stage_train_cost(self.cfg, host.device, host.intra_bandwidth_Bps, host.intra_latency_s,
                                            self.layers, dp, tp, j == 0, j == P - 1, b, min(P - j, M), self.wl,
                                            link)
            bad = (c.memory_bytes > c.capacity_bytes) | (self.layers == 0)
            works.append(np.where(bad, INF, c.work_s))
            meshes.append((dp, tp))
        if not meshes or not any(np.isfinite(w).any() for w in works):
            self._pos[key] = None
            return None
        pre = np.stack(works)
        dec = np.zeros_like(pre)
        opt_s, opt_l = np.nonzero(np.isfinite(pre))
        pos = Position(tuple(meshes), pre, dec, pre.min(axis=0), pre.argmin(axis=0), pre.min(axis=0),
                       np.zeros(self.L + 1), opt_l, opt_s, pre[opt_s, opt_l], dec[opt_s, opt_l], {})
        self._pos[key] = pos
        return pos

    def best(self, footprint, M: int, b: int) -> TrainChoice | None:
        """Least ``T`` over orders, shapes and layer splits of ``footprint`` (None if nothing fits)."""
        P = len(footprint)
        if P > self.L:
            return None
        if self.cons.symmetric:
            return self._best_symmetric(footprint, M, b)
        orders, table = [], []
        for order in sorted(set(itertools.permutations(footprint))):
            row = [self.position(cls, u, M, b, j, P, order[j - 1][0] if j else None)
                   for j, (cls, u) in enumerate(order)]
            if all(r is not None for r in row):
                orders.append(order)
                table.append(row)
        if not orders:
            return None
        self.evaluated += len(orders)
        W = [np.stack([t[j].busy for t in table]) for j in range(P)]
        if M == 1:
            total, _, counts = self.core._split_orders(W, "sum")
            o = int(np.argmin(total))
            if not math.isfinite(total[o]):
                return None
            idx = [int(table[o][j].arg[counts[j, o]]) for j in range(P)]
            return self._choice(float(total[o]), orders[o], table[o], [int(c) for c in counts[:, o]], idx, M, b)
        got = self.core._best_microbatched(table, W, M, INF, 0.0)
        if got is None:
            return None
        value, o, counts, idx = got
        return self._choice(value, orders[o], table[o], counts, idx, M, b)

    def _best_symmetric(self, footprint, M: int, b: int) -> TrainChoice | None:
        """Pieces of one size, tp = size, layers split evenly (the first ``L mod P`` stages one more)."""
        P = len(footprint)
        u = footprint[0][1]
        if any(x != u for _, x in footprint):
            return None
        base, extra = divmod(self.L, P)
        counts = [base + (1 if k < extra else 0) for k in range(P)]
        best = None
        for order in sorted(set(itertools.permutations(footprint))):
            row = [self.position(cls, x, M, b, j, P, order[j - 1][0] if j else None)
                   for j, (cls, x) in enumerate(order)]
            if any(r is None or (1, u) not in r.meshes for r in row):
                continue
            idx = [r.meshes.index((1, u)) for r in row]
            work = [float(r.pre[s, c]) for r, s, c in zip(row, idx, counts)]
            t = train_cost.pipeline_time(work, M)
            if math.isfinite(t) and (best is None or t < best.step_s):
                best = self._choice(t, order, row, counts, idx, M, b)
        return best

    @staticmethod
    def _choice(value, order, vecs, counts, idx, M, b) -> TrainChoice:
        meshes = tuple(vecs[j].meshes[s] for j, s in enumerate(idx))
        pipe = PipelineChoice(float(value), tuple(order), tuple(int(c) for c in counts), meshes, M)
        return TrainChoice(float(value), pipe, M, b)


def state_bytes(cfg: ModelConfig, wl: TrainWorkload) -> float:
    """Parameters, gradients and optimizer state of the whole model."""
    return cfg.num_params * sum(train_cost.state_bytes_per_param(wl))


def auto_max_stages(sym: Symmetry, num_devices: int, wl: TrainWorkload, per_device: int = WORK_PER_DEVICE,
                    floor: int = 1) -> int:
    """The longest pipelines (at most 4) whose estimated work fits ``per_device`` per device, but never
    fewer stages than ``floor`` (the fewest hosts that can hold the training state at all)."""
    shares = sum(wl.global_batch // m for m in wl.microbatches)
    for ms in range(DEFAULT_MAX_STAGES, floor, -1):
        ways = count_footprints(sym, ms)
        work = sum(w * math.factorial(p) for p, w in enumerate(ways) if p) * shares
        if work <= per_device * num_devices:
            return ms
    return max(1, min(floor, DEFAULT_MAX_STAGES))


def fewest_hosts(cfg, cluster, wl: TrainWorkload) -> int:
    """How many hosts, the largest first, it takes to hold the training state (weights, grads, AdamW)."""
    need, have = state_bytes(cfg, wl), 0.0
    for k, room in enumerate(sorted((cost.usable_memory_bytes(h.device) * h.count for h in cluster.hosts),
                                    reverse=True), 1):
        have += room
        if have >= need:
            return k
    return cluster.num_hosts


def candidates(cfg, cluster, wl: TrainWorkload, max_stages: int, sym: Symmetry, constraints: Constraints,
               progress: Progress | None = None) -> tuple[list[TrainChoice], int]:
    """Every footprint's best pipeline for every ``(M, b)``, less the dominated ones."""
    usable = [cost.usable_memory_bytes(cluster.hosts[k.hosts[0]].device) for k in sym.classes]
    fps = footprints(sym, max_stages, usable, state_bytes(cfg, wl))
    fps.sort(key=lambda f: (sum(u for _, u in f), len(f), f))
    search = TrainPipelines(cfg, cluster, sym, wl, constraints)
    groups: dict = defaultdict(list)
    for i, fp in enumerate(fps):
        if progress is not None and i % 64 == 0:
            progress(i, len(fps), "pipelines")
        for M in wl.microbatches:
            if wl.global_batch % M:
                continue
            for b in range(1, wl.global_batch // M + 1):
                got = search.best(fp, M, b)
                if got is not None:
                    groups[(M, b)].append(got)
    if progress is not None:
        progress(len(fps), len(fps), "pipelines")
    out = []
    for key, group in groups.items():
        pipes = prune_dominated([g.pipe for g in group], sym)
        keep = {id(p) for p in pipes}
        out += [g for g in group if id(g.pipe) in keep]
    return out, search.evaluated


# ---- plans: integer programs ----

@dataclasses.dataclass(frozen=True)
class _Column:
    cand: int
    hosts: tuple[int, ...]
    use: dict
    step_s: float
    price: float
    rows: int


def _columns(cands: list[TrainChoice], sym: Symmetry, cluster) -> list[_Column]:
    cols = []
    for ci, c in enumerate(cands):
        price_per = [cluster.hosts[sym.classes[cls].hosts[0]].device.price_per_hour for cls, _ in c.pipe.pieces]
        price = sum(p * u for p, (_, u) in zip(price_per, c.pipe.pieces))
        for hosts in assignments(c.pipe, sym):
            use = defaultdict(int)
            for h, (_, u) in zip(hosts, c.pipe.pieces):
                use[h] += u
            cols.append(_Column(ci, hosts, dict(use), c.step_s, price, c.microbatches * c.microbatch))
    return cols


def _link_levels(cluster) -> list[tuple[float, float]]:
    """Every (bandwidth, latency) bound worth trying: pairs of values the cluster's links take."""
    bws, lats = set(), set()
    H = cluster.num_hosts
    for a in range(H):
        bws.add(cluster.hosts[a].intra_bandwidth_Bps)
        lats.add(cluster.hosts[a].intra_latency_s)
        for b in range(a + 1, H):
            bws.add(cluster.host_bandwidth(a, b))
            lats.add(cluster.host_latency(a, b))
    return [(bw, lat) for bw in sorted(bws, reverse=True) for lat in sorted(lats)]


def _solve(cols: list[_Column], cluster, n: int, batch: int, link: tuple[float, float] | None,
           budget: float | None, price_cap: float | None, time_cap: float | None, minimise: str):
    """One integer program (see the module docstring): the chosen ``{column: copies}`` or None."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    H = cluster.num_hosts
    C = len(cols)
    if C == 0:
        return None
    # variables: z (copies) C, y (column used) C, u (host used) H, t (slowest replica) 1
    N = 2 * C + H + 1
    ri, ci, vals, lo, hi = [], [], [], [], []

    def row(entries, low, high):
        r = len(lo)
        for j, v in entries:
            ri.append(r)
            ci.append(j)
            vals.append(v)
        lo.append(low)
        hi.append(high)

    row([(j, 1) for j in range(C)], n, n)
    row([(j, cols[j].rows) for j in range(C)], batch, batch)
    per_host = defaultdict(list)
    for j, c in enumerate(cols):
        for h, u in c.use.items():
            per_host[h].append((j, u))
    for h, entries in per_host.items():
        row(entries + [(2 * C + h, -cluster.hosts[h].count)], -np.inf, 0)
    ub = np.zeros(N)
    for j, c in enumerate(cols):
        ub[j] = min(min(cluster.hosts[h].count // u for h, u in c.use.items()), n)
        row([(j, 1), (C + j, -n)], -np.inf, 0)                     # z <= n y
        row([(C + j, c.step_s), (N - 1, -1)], -np.inf, 0)          # t >= T y
    ub[C:2 * C] = 1
    ub[2 * C:2 * C + H] = 1
    ub[N - 1] = max(c.step_s for c in cols)
    if link is not None and n > 1:
        bw, lat = link
        for h in range(H):
            hh = cluster.hosts[h]
            if hh.intra_bandwidth_Bps < bw or hh.intra_latency_s > lat:
                ub[2 * C + h] = 0
        for a in range(H):
            for b in range(a + 1, H):
                if cluster.host_bandwidth(a, b) < bw or cluster.host_latency(a, b) > lat:
                    row([(2 * C + a, 1), (2 * C + b, 1)], -np.inf, 1)
    for cap in (budget, price_cap):
        if cap is not None:
            row([(j, cols[j].price) for j in range(C)], -np.inf, cap)
    if time_cap is not None:
        ub[N - 1] = min(ub[N - 1], time_cap)
    c = np.zeros(N)
    if minimise == "time":
        c[N - 1] = 1.0
    else:
        c[:C] = [col.price for col in cols]
    integrality = np.ones(N)
    integrality[N - 1] = 0
    A = coo_matrix((vals, (ri, ci)), shape=(len(lo), N)).tocsr()
    res = milp(c, constraints=[LinearConstraint(A, lo, hi)], integrality=integrality,
               bounds=Bounds(np.zeros(N), ub), options={"mip_rel_gap": 0.0, "presolve": True})
    if res.status != 0 or res.x is None:
        return None
    z = np.round(res.x[:C]).astype(int)
    return {j: int(z[j]) for j in range(C) if z[j] > 0}


def _value(chosen: dict, cols, cfg, cluster, wl, objective: str):
    """``(objective value, step_s, price)`` of a solution, from the hosts it really uses."""
    n = sum(chosen.values())
    hosts = {h for j in chosen for h in cols[j].use}
    t = max(cols[j].step_s for j in chosen)
    sync = train_cost.sync_s(cfg, wl, n, *train_cost.slowest_link(cluster, hosts)) if n > 1 else 0.0
    step = t + sync
    price = sum(cols[j].price * x for j, x in chosen.items())
    value = step if objective == "throughput" else price * step
    return value, step, price


def plan_train(model, cluster, wl: TrainWorkload, objective: str = "throughput", budget_per_hour: float | None = None,
               exhaustive: bool = False, max_stages: int | None = None, constraints: Constraints = Constraints(),
               progress: Progress | None = None) -> Plan:
    """The best training plan for ``objective`` over ``S_train(max_stages)`` (see the module docstring).

    ``throughput``: the least step time (most tokens/s), within ``budget_per_hour`` when given;
    ``cost``: the fewest dollars per million tokens. ``exhaustive=True`` enumerates every plan instead
    (small clusters only).
    """
    cfg = resolve_model(model)
    if objective not in OBJECTIVES:
        raise PlanError(f"unknown training objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    if not isinstance(wl, TrainWorkload):
        raise PlanError(f"workload must be a hexjax TrainWorkload, got {type(wl).__name__}")
    if budget_per_hour is not None and not budget_per_hour > 0:
        raise PlanError(f"budget_per_hour must be positive, got {budget_per_hour!r}")
    if wl.seq_len > cfg.max_position_embeddings:
        raise PlanError(f"seq_len {wl.seq_len} exceeds {cfg.name}'s {cfg.max_position_embeddings} positions; "
                        f"use a seq_len of at most {cfg.max_position_embeddings}")
    sym = host_classes(cluster)
    if max_stages is None:
        max_stages = DEFAULT_MAX_STAGES if exhaustive else auto_max_stages(
            sym, cluster.num_devices, wl, floor=fewest_hosts(cfg, cluster, wl))
    if not isinstance(max_stages, int) or max_stages < 1:
        raise PlanError(f"max_stages must be a positive integer, got {max_stages!r}")
    t0 = time.perf_counter()
    if exhaustive:
        from hexjax.search.train_exhaustive import exhaustive_train
        got = exhaustive_train(cfg, cluster, wl, objective, budget_per_hour, max_stages, progress)
        if got is None:
            raise PlanError(infeasible_message(cfg, cluster, wl, max_stages, budget_per_hour))
        result, stats = got
        return _finish(result, cfg, cluster, wl, {"search_s": time.perf_counter() - t0, "max_stages": max_stages,
                                                   "exhaustive": True, **stats})
    cands, evaluated = candidates(cfg, cluster, wl, max_stages, sym, constraints, progress)
    if not cands:
        raise PlanError(infeasible_message(cfg, cluster, wl, max_stages, None))
    best = _combine(cands, sym, cfg, cluster, wl, objective, budget_per_hour, constraints)
    if best is None:
        raise PlanError(infeasible_message(cfg, cluster, wl, max_stages, budget_per_hour, cands=cands))
    _, chosen, cols = best
    result = build_plan(cfg, cluster, wl, objective, [(cands[cols[j].cand], cols[j].hosts, x)
                                                        for j, x in chosen.items()])
    return _finish(result, cfg, cluster, wl, {"search_s": time.perf_counter() - t0, "max_stages": max_stages,
                                               "exhaustive": False, "candidates": len(cands),
                                               "orders_evaluated": evaluated})


def _combine(cands, sym, cfg, cluster, wl, objective, budget, constraints):
    """Best ``(value, {column: copies}, columns)`` over every ``(M, n, link)`` program, taken in the order
    of their lower bounds until none can beat the best value found."""
    B = wl.global_batch
    # every replica holds the whole training state at least once
    room = sum(cost.usable_memory_bytes(h.device) * h.count for h in cluster.hosts)
    n_max = max(1, int(room // state_bytes(cfg, wl)))
    levels = sorted(set(_link_levels(cluster)))
    jobs = []
    for M in wl.microbatches:
        mine = [i for i, c in enumerate(cands) if c.microbatches == M]
        if not mine:
            continue
        cols = [dataclasses.replace(col, cand=mine[col.cand])
                for col in _columns([cands[i] for i in mine], sym, cluster)]
        if constraints.same_layout or constraints.symmetric:
            by_cand = defaultdict(list)       # every copy one candidate: one program per candidate
            for c in cols:
                by_cand[c.cand].append(c)
            pools = list(by_cand.values())
        else:
            pools = [cols]
        for pool in pools:
            min_price = min(c.price for c in pool)
            for n in range(1, min(B // M, n_max) + 1):
                share = -(-B // (M * n))
                big = [c.step_s for c in pool if c.rows >= M * share]
                if not big or (len(pools) > 1 and pool[0].rows * n != B):
                    continue
                t_lb = min(big)
                for link in ([None] if n == 1 else levels):
                    sync = train_cost.sync_s(cfg, wl, n, *link) if link is not None else 0.0
                    lb = t_lb + sync if objective == "throughput" else n * min_price * (t_lb + sync)
                    jobs.append((lb, M, n, link, pool))
    jobs.sort(key=lambda j: (j[0], j[1], j[2]))
    best = None
    for lb, M, n, link, pool in jobs:
        if best is not None and lb >= best[0]:
            break
        floor = n * min(c.price for c in pool)
        sync = train_cost.sync_s(cfg, wl, n, *link) if link is not None else 0.0
        # columns that cannot help: a replica slower than the best value (throughput; for cost, slower than
        # what the cheapest n copies could afford), or taking more rows than the other n - 1 leave
        cut = INF if best is None else (best[0] if objective == "throughput" else best[0] / floor)
        pool = [c for c in pool if c.step_s < cut and c.rows <= B - (n - 1) * M]
        if not pool:
            continue

        def hopeless(t, best=best):
            # the frontier's later points are slower: they cost at least the cheapest n copies for t + sync
            return best is not None and floor * (t + sync) >= best[0]

        for chosen in _programs(pool, cluster, n, B, link, budget, objective, lambda t: hopeless(t, best)):
            value, _, price = _value(chosen, pool, cfg, cluster, wl, objective)
            if budget is not None and price > budget * (1 + 1e-9):      # beyond the solver's tolerance
                continue
            if best is None or value < best[0] * (1 - 1e-12):
                best = (value, chosen, pool)
    return best


def _programs(cols, cluster, n, B, link, budget, objective, hopeless=lambda t: False):
    """Solutions worth valuing: the least-time one (throughput), or the (time, price) frontier (cost)."""
    if n == 1:      # one replica takes the whole batch: the best single column
        ok = [j for j, c in enumerate(cols) if c.rows == B and (budget is None or c.price <= budget * (1 + 1e-9))]
        if ok:
            key = (lambda j: cols[j].step_s) if objective == "throughput" else (lambda j: cols[j].price * cols[j].step_s)
            yield {min(ok, key=key): 1}
        return
    if objective == "throughput":
        got = _solve(cols, cluster, n, B, link, budget, None, None, "time")
        if got is not None:
            yield got
        return
    cap = last = None
    while True:
        got = _solve(cols, cluster, n, B, link, budget, cap, None, "time")
        if got is None:
            return
        t = max(cols[j].step_s for j in got)
        if hopeless(t):
            return
        cheap = _solve(cols, cluster, n, B, link, budget, cap, t * (1 + 1e-12), "price")
        got = cheap or got
        yield got
        price = sum(cols[j].price * x for j, x in got.items())
        if last is not None and price >= last:       # the solver's tolerance let the cap through
            return
        last = price
        # strictly cheaper next, by more than the solver's feasibility tolerance (prices are cents apart)
        cap = price - 1e-5 * max(1.0, price)
        if cap <= 0:
            return


def build_plan(cfg, cluster, wl: TrainWorkload, objective: str, chosen) -> Plan:
    """Concrete replicas from ``[(TrainChoice, hosts per stage, copies)]``: lowest free devices per host."""
    free = free_devices(cluster)
    replicas, rows = [], []
    M = None
    for choice, hosts, copies in sorted(chosen, key=lambda t: (t[0].step_s, t[1])):
        M = choice.microbatches
        for _ in range(copies):
            replicas.append(place_replica(cluster, free, hosts, choice.pipe.layer_counts, choice.pipe.meshes))
            rows.append(choice.microbatches * choice.microbatch)
    return Plan(cfg.name, cluster.fingerprint(), tuple(replicas), None, f"train {objective}", wl.dtype_bytes,
                training=TrainSpec(wl, M, tuple(rows)))


def _finish(result: Plan, cfg, cluster, wl, meta: dict) -> Plan:
    pred = train_cost.predict(result, cfg, cluster, wl)
    d = pred.to_dict()
    d["search"] = meta
    return dataclasses.replace(result, prediction=d)


def infeasible_message(cfg, cluster, wl: TrainWorkload, max_stages: int, budget: float | None,
                       cands=None) -> str:
    state = state_bytes(cfg, wl)
    pb, gb, ob = train_cost.state_bytes_per_param(wl)
    hosts = sorted((cost.usable_memory_bytes(h.device) * h.count for h in cluster.hosts), reverse=True)
    reach = sum(hosts[:max_stages])
    if cands and budget is not None:
        return (f"no training plan of {cfg.name} on {cluster.name} costs at most ${budget:g}/h; raise "
                "--budget-per-hour or use cheaper devices")
    if cands:
        return (f"no training plan of {cfg.name} on {cluster.name} splits the global batch of {wl.global_batch} "
                f"into {'/'.join(map(str, wl.microbatches))} microbatches over replicas that fit; try another "
                "--global-batch or --microbatches")
    short = state - reach
    why = (f"shortfall {format_bytes(short)}" if short > 0 else
           f"that holds the state ({format_bytes(reach)} usable), but not with the stashed activations and "
           f"workspace of even one sequence of {wl.seq_len} tokens per microbatch on every split")
    return (f"no training plan fits {cfg.name} on {cluster.name}: parameters, gradients and AdamW state take "
            f"{format_bytes(state)} ({pb + gb + ob} bytes per parameter, {wl.dtype}), and a pipeline over at most "
            f"{max_stages} hosts offers at most {format_bytes(reach)} usable after the "
            f"{cost.MEMORY_RESERVE_FRACTION:.0%} reserve; {why}. Use "
            + ("--remat full, " if wl.remat == "none" else "") + "a shorter --seq-len, more or larger devices, "
            "or a larger max_stages")
