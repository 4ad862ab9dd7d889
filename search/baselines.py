"""Reference plans to compare the search against.

- :func:`symmetric_plan`: the best *symmetric* plan, the kind homogeneous
  systems make: every stage of every replica has the same ``tp`` (``dp = 1``)
  and the layers are split evenly (the first ``L mod P`` stages take one
  more). Over the same hosts, pipeline lengths and objectives as the search,
  with the stage order and the packing still optimised.
- :func:`hexgen_hand_plan`: HexGen's published plan for Llama-2-70B on its
  eight-GPU cluster (TP 4/2/2 over A6000/A5000/A4000, layers 44/20/16).
"""

from __future__ import annotations

import itertools

from hexjax.errors import PlanError
from hexjax.plan import Plan, Replica, Stage, valid_tp
from hexjax.search import cost
from hexjax.search.packing import pack
from hexjax.search.pipeline import PipelineChoice, PipelineSearch
from hexjax.search.planner import build_plan, replica_rates, resolve_model
from hexjax.search.space import DEFAULT_MAX_STAGES, host_classes
from hexjax.workload import Workload


def even_split(layers: int, stages: int) -> tuple[int, ...]:
    base, extra = divmod(layers, stages)
    return tuple(base + (1 if k < extra else 0) for k in range(stages))


def symmetric_plan(model, cluster, workload: Workload, objective: str = "throughput",
                   max_stages: int = DEFAULT_MAX_STAGES, tp: int | None = None) -> Plan:
    """The best plan whose stages all share one ``tp`` and split the layers evenly."""
    cfg = resolve_model(model)
    sym = host_classes(cluster)
    search = PipelineSearch(cfg, cluster, sym, workload)
    results = []
    for t in ([tp] if tp else range(1, max(h.count for h in cluster.hosts) + 1)):
        if not valid_tp(cfg, t):
            continue
        classes = [k.index for k in sym.classes if k.count >= t]
        cands = []
        for P in range(1, max_stages + 1):
            counts = even_split(cfg.num_layers, P)
            if min(counts) < 1:
                break
            for combo in itertools.combinations_with_replacement(classes, P):
                if any(combo.count(k) > sym.classes[k].size for k in set(combo)):
                    continue
                best = None
                for order in sorted(set(itertools.permutations(combo))):
                    for mb, b in cost.microbatch_options(workload.batch, P):
                        pre, dec = [], []
                        for j, k in enumerate(order):
                            prev = order[j - 1] if j else None
                            ret = order[0] if (j == P - 1 and P > 1) else None
                            pos = search.position(k, t, mb, b, j == 0, j == P - 1, prev, ret)
                            shape = pos.meshes.index((1, t))      # dp = 1: the symmetric plan's mesh
                            pre.append(float(pos.pre[shape, counts[j]]))
                            dec.append(float(pos.dec[shape, counts[j]]))
                        if any(x == float("inf") for x in pre + dec):
                            continue
                        value = cost.replica_times(pre, dec, mb, workload.output_len)[2]
                        if best is None or value < best.cycle_s:
                            best = PipelineChoice(value, tuple((k, t) for k in order), counts,
                                                  tuple((1, t) for _ in order), mb)
                if best is not None:
                    cands.append(best)
        if not cands:
            continue
        thr, req = replica_rates(cands, workload)
        if objective == "latency":
            top = min(c.cycle_s for c in cands)
            keep = [i for i, c in enumerate(cands) if c.cycle_s <= top * (1 + 1e-9)]
            chosen, _ = pack([cands[i] for i in keep], sym, cluster, [thr[i] for i in keep])
            chosen = [(cands[keep[i]], h, x) for i, h, x in chosen]
        else:
            chosen, _ = pack(cands, sym, cluster, thr)
            chosen = [(cands[i], h, x) for i, h, x in chosen]
        p = build_plan(cfg, cluster, workload, f"symmetric {objective}", chosen, 2)
        results.append((cost.predict(p, cfg, cluster, workload), p))
    if not results:
        raise PlanError(f"no symmetric plan fits {cfg.name} on {cluster.name}")
    if objective == "latency":
        return min(results, key=lambda r: (r[0].latency_s, -r[0].throughput_tokens_per_s))[1]
    return max(results, key=lambda r: r[0].throughput_tokens_per_s)[1]


def hexgen_hand_plan(cluster, workload: Workload | None = None) -> Plan:
    """HexGen's README plan for Llama-2-70B on ``hexgen-8gpu`` (4×A6000, 2×A5000, 2×A4000)."""
    hosts = {h.device.name: h for h in cluster.hosts}
    try:
        a6000, a5000, a4000 = (hosts[n] for n in ("A6000", "A5000", "A4000"))
    except KeyError:
        raise PlanError("HexGen's hand plan needs hosts of A6000, A5000 and A4000 (hexgen-8gpu)") from None
    stages = (Stage((0, 44), tuple(a6000.devices)[:4], 1, 4, a6000.name),
              Stage((44, 64), tuple(a5000.devices)[:2], 1, 2, a5000.name),
              Stage((64, 80), tuple(a4000.devices)[:2], 1, 2, a4000.name))
    return Plan("llama-2-70b", cluster.fingerprint(), (Replica(stages),), workload, "HexGen hand plan")
