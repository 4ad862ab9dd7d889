"""The fast search: candidate pipelines by exact DP, then an integer program to pack them.

1. Identical hosts are grouped into classes (:mod:`hexjax.search.space`).
2. Every footprint (multiset of ``(class, devices)`` pieces, at most
   ``max_stages`` of them, no more pieces of a class than it has hosts) whose
   usable memory can hold the model's weights is visited, smallest first.
   If a footprint inside it (a piece removed, or a piece one device smaller,
   recursively) already has a pipeline no slower than this footprint's lower
   bound, it is skipped: that smaller pipeline serves every objective at
   least as well on fewer devices. Otherwise the exact DP of
   :mod:`hexjax.search.pipeline` gives its best pipeline.
3. Candidates that another candidate dominates are dropped
   (:func:`hexjax.search.packing.prune_dominated`).
4. Objectives, over the plan space ``S(max_stages)``:

   - ``latency``: the lowest worst-replica latency ``C*``; then as many
     replicas as fit among those with latency ``C*`` (throughput maximised).
   - ``throughput``: the most output tokens/s, every replica within the SLO.
   - ``cost``: with a rate, the lowest price per hour that sustains it (within
     the SLO); without, the most tokens per dollar, then the most tokens/s
     among plans that reach it.

   Each replica's value is additive, so steps 2-4 are exact over
   ``S(max_stages)``: a plan's replica can always be swapped for its
   footprint's best pipeline without loss, and the integer program is solved
   to optimality (HiGHS, relative gap 0).

``max_stages`` defaults to ``DEFAULT_MAX_STAGES`` (4), lowered while the
estimated work (footprints times their stage orders) exceeds
``WORK_PER_DEVICE`` per device, so the search stays within seconds on
hundreds of devices; the plan records the value used and ``max_stages=``
asks for more. Ties within a relative ``1e-9`` count as equal
(latency and tokens per dollar).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Callable

from hexjax.errors import PlanError
from hexjax.models.config import ModelConfig
from hexjax.plan import Plan
from hexjax.search import cost
from hexjax.search.packing import pack, prune_dominated
from hexjax.search.pipeline import PipelineChoice, PipelineSearch
from hexjax.search.space import (DEFAULT_MAX_STAGES, SLO_TOLERANCE, Symmetry, free_devices, host_classes,
                                 place_replica)
from hexjax.workload import Workload

OBJECTIVES = ("latency", "throughput", "cost")
WORK_PER_DEVICE = 12_000
"""Budget of the automatic ``max_stages``: footprints times stage orders, per device of the cluster."""
TIE = 1e-9
"""Relative tolerance under which two latencies or tokens-per-dollar figures are equal."""

Progress = Callable[[int, int, str], None]


def resolve_model(model) -> ModelConfig:
    return model if isinstance(model, ModelConfig) else ModelConfig.load(model)


def check_inputs(cfg, workload, objective: str, max_stages: int) -> None:
    if objective not in OBJECTIVES:
        raise PlanError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    if not isinstance(workload, Workload):
        raise PlanError(f"workload must be a hexjax.Workload, got {type(workload).__name__}")
    if not isinstance(max_stages, int) or max_stages < 1:
        raise PlanError(f"max_stages must be a positive integer, got {max_stages!r}")


def evaluate(plan: Plan, model, cluster, workload: Workload | None = None) -> cost.Prediction:
    """Predictions for any valid plan (raises :class:`PlanError` listing every rule it breaks)."""
    cfg = resolve_model(model)
    workload = workload or plan.workload
    if workload is None:
        raise PlanError("evaluate needs a workload: pass one, or use a plan saved with its workload")
    plan.validate(cfg, cluster, workload)
    return cost.predict(plan, cfg, cluster, workload)


def footprints(sym: Symmetry, max_stages: int, usable: list[float], need_bytes: float,
               room: dict | None = None, layers: int = 0):
    """Every footprint of at most ``max_stages`` pieces whose usable memory reaches ``need_bytes``.

    With ``room`` (``{(class, devices): most layers a stage on that piece can hold}``), also only those
    whose pieces can hold ``layers`` between them, each at least one; branches that cannot reach it with
    the pieces left are not explored.
    """
    pieces = [(k.index, u) for k in sym.classes for u in range(1, k.count + 1)]
    if room is not None:
        pieces = [p for p in pieces if room[p] >= 1]
    hold = [room[p] for p in pieces] if room is not None else [0] * len(pieces)
    best_after = [max(hold[i:], default=0) for i in range(len(pieces))] + [0]
    out = []

    def rec(start: int, chosen: list, per_class: dict, mem: float, held: int):
        if chosen and mem >= need_bytes and held >= layers:
            out.append(tuple(chosen))
        if len(chosen) == max_stages or held + (max_stages - len(chosen)) * best_after[start] < layers:
            return
        for i in range(start, len(pieces)):
            cls, u = pieces[i]
            if per_class[cls] >= sym.classes[cls].size:
                continue
            per_class[cls] += 1
            chosen.append(pieces[i])
            rec(i, chosen, per_class, mem + u * usable[cls], held + hold[i])
            chosen.pop()
            per_class[cls] -= 1

    rec(0, [], defaultdict(int), 0.0, 0)
    return out


def min_weight_bytes(cfg, dtype_bytes: int) -> float:
    """Bytes of the model's parameters (every layer, embedding and head once)."""
    return cfg.num_params * dtype_bytes


def candidates(cfg, cluster, workload: Workload, max_stages: int, dtype_bytes: int = 2,
               progress: Progress | None = None, sym: Symmetry | None = None):
    """Best pipeline per footprint (the DP), skipping footprints a smaller one provably beats.

    Footprints go in order of devices then pieces. For each, ``sub`` is the
    best latency of any footprint inside it (one piece removed or one device
    fewer on a piece, recursively). When ``sub`` is no worse than the
    footprint's lower bound, a smaller candidate dominates it and its DP is
    skipped; otherwise the DP runs.
    """
    sym = sym or host_classes(cluster)
    usable = [cost.usable_memory_bytes(cluster.hosts[k.hosts[0]].device) for k in sym.classes]
    fps = footprints(sym, max_stages, usable, min_weight_bytes(cfg, dtype_bytes))
    fps.sort(key=lambda f: (sum(u for _, u in f), len(f), f))
    search = PipelineSearch(cfg, cluster, sym, workload, dtype_bytes)
    sub: dict = {}
    out = []
    skipped = 0
    for i, fp in enumerate(fps):
        if progress is not None and i % 256 == 0:
            progress(i, len(fps), "pipelines")
        below = math.inf
        for k in range(len(fp)):
            if k and fp[k] == fp[k - 1]:
                continue
            rest = fp[:k] + fp[k + 1:]
            below = min(below, sub.get(rest, math.inf))
            cls, u = fp[k]
            if u > 1:
                below = min(below, sub.get(tuple(sorted(rest + ((cls, u - 1),))), math.inf))
        if below <= search.lower_bound(fp):
            sub[fp] = below
            skipped += 1
            continue
        choice = search.best(fp, below)
        if choice is not None:
            out.append(choice)
            below = min(below, choice.cycle_s)
        sub[fp] = below
    if progress is not None:
        progress(len(fps), len(fps), "pipelines")
    return out, sym


def count_footprints(sym: Symmetry, max_stages: int) -> list[int]:
    """How many footprints of each number of pieces ``0..max_stages`` exist (memory not checked)."""
    ways = [1] + [0] * max_stages
    for k in sym.classes:
        # a class of `size` hosts offers multisets of at most `size` pieces over `count` device numbers
        per = [math.comb(k.count + j - 1, j) for j in range(min(k.size, max_stages) + 1)]
        new = [0] * (max_stages + 1)
        for a, wa in enumerate(ways):
            if wa:
                for j, wj in enumerate(per):
                    if a + j <= max_stages:
                        new[a + j] += wa * wj
        ways = new
    return ways


def auto_max_stages(sym: Symmetry, num_devices: int, per_device: int = WORK_PER_DEVICE) -> int:
    """The longest pipelines (at most the default) whose estimated DP work fits the cluster's budget.

    Work is estimated as footprints times their stage orders (``P!``); the
    budget is ``per_device`` per device, so a search takes about a second on
    eight devices, seconds on sixty and well under a minute on hundreds.
    """
    for ms in range(DEFAULT_MAX_STAGES, 1, -1):
        ways = count_footprints(sym, ms)
        if sum(w * math.factorial(p) for p, w in enumerate(ways) if p) <= per_device * num_devices:
            return ms
    return 1


def infeasible_message(cfg, cluster, workload: Workload, max_stages: int, dtype_bytes: int) -> str:
    from hexjax.models.config import format_bytes as fb
    weights = min_weight_bytes(cfg, dtype_bytes)
    kv = workload.batch * workload.context_len * cfg.kv_bytes_per_token(dtype_bytes) * cfg.num_layers
    best_hosts = sorted((cost.usable_memory_bytes(h.device) * h.count for h in cluster.hosts), reverse=True)
    reach = sum(best_hosts[:max_stages])
    total = sum(best_hosts)
    short = weights + kv - reach
    why = (f"shortfall {fb(short)}" if short > 0 else
           "that is enough in total, but no split leaves every device room for its share of the weights, "
           "KV cache and activation workspace")
    return (f"no plan fits {cfg.name} on {cluster.name}: it needs {fb(weights)} of weights plus "
            f"{fb(kv)} of KV cache for {workload.batch} request(s) of {workload.context_len} tokens "
            f"({fb(weights + kv)}) in one replica, and a pipeline over at most {max_stages} hosts "
            f"offers at most {fb(reach)} usable (the whole cluster {fb(total)}, after the "
            f"{cost.MEMORY_RESERVE_FRACTION:.0%} reserve); {why}. "
            "Use a smaller batch or context, more or larger devices, or a larger max_stages")


def plan(model, cluster, workload: Workload, objective: str = "latency", slo_s: float | None = None,
         exhaustive: bool = False, max_stages: int | None = None, dtype_bytes: int = 2,
         progress: Progress | None = None) -> Plan:
    """The best plan for ``objective`` over the plan space ``S(max_stages)``.

    ``slo_s`` (or ``workload.slo_s``) bounds every replica's end-to-end latency;
    ``workload.rate_per_s`` is the rate the ``cost`` objective must sustain.
    ``exhaustive=True`` enumerates every plan instead (small clusters only).
    ``max_stages=None`` takes ``DEFAULT_MAX_STAGES``, lowered on large clusters
    (see :func:`auto_max_stages`; the plan records the value used).
    """
    cfg = resolve_model(model)
    sym = host_classes(cluster)
    if max_stages is None:
        max_stages = DEFAULT_MAX_STAGES if exhaustive else auto_max_stages(sym, cluster.num_devices)
    check_inputs(cfg, workload, objective, max_stages)
    slo = slo_s if slo_s is not None else workload.slo_s
    if exhaustive:
        from hexjax.search.exhaustive import exhaustive_plan
        return exhaustive_plan(cfg, cluster, workload, objective, slo, max_stages, dtype_bytes, progress)
    t0 = time.perf_counter()
    cands, sym = candidates(cfg, cluster, workload, max_stages, dtype_bytes, progress, sym)
    if not cands:
        raise PlanError(infeasible_message(cfg, cluster, workload, max_stages, dtype_bytes))
    cands = prune_dominated(cands, sym)
    chosen = choose(cands, sym, cfg, cluster, workload, objective, slo, dtype_bytes)
    result = build_plan(cfg, cluster, workload, objective, chosen, dtype_bytes)
    pred = cost.predict(result, cfg, cluster, workload)
    meta = {"search_s": time.perf_counter() - t0, "candidates": len(cands), "max_stages": max_stages,
            "exhaustive": False}
    return _with_prediction(result, pred, meta)


def _with_prediction(result: Plan, pred: cost.Prediction, meta: dict) -> Plan:
    d = pred.to_dict()
    d["search"] = meta
    return Plan(result.model, result.cluster_fingerprint, result.replicas, result.workload, result.objective,
                result.dtype_bytes, d)


def replica_rates(cands: list[PipelineChoice], workload: Workload):
    thr = [workload.batch * workload.output_len / c.cycle_s for c in cands]
    req = [workload.batch / c.cycle_s for c in cands]
    return thr, req


def choose(cands, sym, cfg, cluster, workload: Workload, objective: str, slo: float | None,
           dtype_bytes: int):
    """The packing for ``objective``: ``[(candidate, hosts per stage, copies)]``."""
    best_latency = min(c.cycle_s for c in cands)
    if slo is not None:
        cands = [c for c in cands if c.cycle_s <= slo * SLO_TOLERANCE]   # rounding of equal sums
        if not cands:
            raise PlanError(f"no plan meets the latency SLO of {slo * 1e3:.1f} ms: the best end-to-end latency "
                            f"found is {best_latency * 1e3:.1f} ms (short by {(best_latency - slo) * 1e3:.1f} ms) "
                            "for this workload; relax the SLO, shorten prompt/output, lower the batch or add faster "
                            "devices")
    price = [sum(cluster.hosts[sym.classes[cls].hosts[0]].device.price_per_hour * u for cls, u in c.pieces)
             for c in cands]
    thr, req = replica_rates(cands, workload)
    if objective == "latency":
        best = min(c.cycle_s for c in cands)
        keep = [i for i, c in enumerate(cands) if c.cycle_s <= best * (1 + TIE)]
        chosen, _ = pack([cands[i] for i in keep], sym, cluster, [thr[i] for i in keep])
        return [(cands[keep[i]], hosts, x) for i, hosts, x in chosen]
    if objective == "throughput":
        chosen, _ = pack(cands, sym, cluster, thr)
        return [(cands[i], hosts, x) for i, hosts, x in chosen]
    # cost
    rate = workload.rate_per_s
    if rate is not None:
        cap, _ = pack(cands, sym, cluster, req)
        most = sum(req[i] * x for i, _, x in cap)
        if most < rate * (1 - TIE):
            raise PlanError(f"no plan sustains {rate:g} requests/s within the constraints: the most any plan "
                            f"serves is {most:.4g} requests/s (short by {rate - most:.4g}); lower the rate, relax "
                            "the SLO or add devices")
        chosen, _ = pack(cands, sym, cluster, price, maximise=False, cover=(req, rate * (1 - TIE)))
        return [(cands[i], hosts, x) for i, hosts, x in chosen]
    ratio = [cost.tokens_per_dollar(t, p) for t, p in zip(thr, price)]
    top = max(ratio)
    keep = [i for i in range(len(cands)) if ratio[i] >= top * (1 - TIE) or ratio[i] == top]
    chosen, _ = pack([cands[i] for i in keep], sym, cluster, [thr[i] for i in keep])
    return [(cands[keep[i]], hosts, x) for i, hosts, x in chosen]


def build_plan(cfg, cluster, workload: Workload, objective: str, chosen, dtype_bytes: int) -> Plan:
    """Concrete replicas: each stage takes the lowest free devices of its host."""
    free = free_devices(cluster)
    replicas = []
    order = sorted(chosen, key=lambda t: (t[0].cycle_s, t[1]))
    for choice, hosts, copies in order:
        for _ in range(copies):
            replicas.append(place_replica(cluster, free, hosts, choice.layer_counts, choice.meshes))
    return Plan(cfg.name, cluster.fingerprint(), tuple(replicas), workload, objective, dtype_bytes)


def objective_value(pred: cost.Prediction, objective: str, workload: Workload) -> tuple:
    """What the objectives compare, as a tuple where smaller is better."""
    if objective == "latency":
        return (pred.latency_s, -pred.throughput_tokens_per_s)
    if objective == "throughput":
        return (-pred.throughput_tokens_per_s,)
    if workload.rate_per_s is not None:
        return (pred.price_per_hour,)
    return (-pred.tokens_per_dollar, -pred.throughput_tokens_per_s)


def same_value(a: tuple, b: tuple, rel: float = 1e-7) -> bool:
    """Objective tuples equal within ``rel``."""
    return len(a) == len(b) and all(
        x == y or abs(x - y) <= rel * max(abs(x), abs(y)) or (math.isinf(x) and x == y) for x, y in zip(a, b))
