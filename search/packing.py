"""Choose how many copies of each candidate pipeline to run: an integer program.

Candidates are pipelines described by host classes; a copy is placed on
concrete hosts by an *assignment* (its pieces of one class go to distinct
hosts of that class). Variables count copies per (candidate, assignment);
each host gives at most its devices::

    maximise  Σ value_c x_ca
    s.t.      Σ_{c,a} devices_{c,a,h} x_ca <= count_h   for every host h
              (optionally Σ rate_c x_ca >= target)
              x_ca ∈ {0, 1, 2, ...}

solved exactly by HiGHS through ``scipy.optimize.milp`` (relative gap 0).
Dropping a candidate that another one dominates (it takes, class by class,
no more devices on no more hosts, and is at least as fast) never loses an
optimum of any objective here, since the better one can take its place.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np

from hexjax.errors import PlanError
from hexjax.search.pipeline import PipelineChoice
from hexjax.search.space import Symmetry


def assignments(choice: PipelineChoice, sym: Symmetry) -> list[tuple[int, ...]]:
    """Distinct ways to put the choice's stages on hosts: a host index per stage."""
    by_class = defaultdict(list)
    for k, (cls, _) in enumerate(choice.pieces):
        by_class[cls].append(k)
    per_class = []
    for cls, stages in sorted(by_class.items()):
        hosts = sym.classes[cls].hosts
        seen, opts = set(), []
        for pick in itertools.permutations(hosts, len(stages)):
            key = tuple(sorted((h, choice.pieces[k][1]) for h, k in zip(pick, stages)))
            if key not in seen:
                seen.add(key)
                opts.append(dict(zip(stages, pick)))
        per_class.append(opts)
    out = []
    for combo in itertools.product(*per_class):
        m = {}
        for d in combo:
            m.update(d)
        out.append(tuple(m[k] for k in range(len(choice.pieces))))
    return out


def prune_dominated(cands: list[PipelineChoice], sym: Symmetry) -> list[PipelineChoice]:
    """Drop every candidate that a faster-or-equal one with a smaller-or-equal footprint makes redundant."""
    if len(cands) < 2:
        return list(cands)
    offsets, off = [], 0
    for k in sym.classes:
        offsets.append(off)
        off += k.count
    # G[c, class, t] = pieces of the class with >= t+1 devices: footprint B fits into A iff G_B <= G_A
    G = np.zeros((len(cands), off), dtype=np.int16)
    for i, c in enumerate(cands):
        for cls, u in c.pieces:
            G[i, offsets[cls]:offsets[cls] + u] += 1
    order = sorted(range(len(cands)), key=lambda i: (cands[i].cycle_s, G[i].sum(), i))
    kept: list[int] = []
    for i in order:
        if kept:
            K = G[kept]
            if np.any(np.all(K <= G[i], axis=1)):
                continue
        kept.append(i)
    return [cands[i] for i in sorted(kept)]


def pack(cands: list[PipelineChoice], sym: Symmetry, cluster, value: list[float], *,
         maximise: bool = True, cover: tuple[list[float], float] | None = None):
    """Copies per (candidate, assignment): ``[(candidate index, host per stage, copies)]`` and the objective."""
    from scipy.optimize import Bounds, LinearConstraint

    from hexjax.search.milp import milp

    cols, col_val, col_rate = [], [], []
    H = cluster.num_hosts
    rows, vals, colidx = [], [], []
    ub = []
    for ci, c in enumerate(cands):
        for hosts in assignments(c, sym):
            use = defaultdict(int)
            for h, (_, u) in zip(hosts, c.pieces):
                use[h] += u
            j = len(cols)
            cols.append((ci, hosts))
            col_val.append(value[ci])
            if cover is not None:
                col_rate.append(cover[0][ci])
            for h, u in use.items():
                rows.append(h)
                colidx.append(j)
                vals.append(u)
            ub.append(min(cluster.hosts[h].count // u for h, u in use.items()))
    if not cols:
        return [], 0.0
    n = len(cols)
    A = np.zeros((H, n))
    A[rows, colidx] = vals
    caps = np.array([h.count for h in cluster.hosts], dtype=float)
    constraints = [LinearConstraint(A, -np.inf, caps)]
    if cover is not None:
        constraints.append(LinearConstraint(np.array([col_rate]), cover[1], np.inf))
    c = -np.array(col_val) if maximise else np.array(col_val)
    res = milp(c, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, np.array(ub, dtype=float)),
               options={"mip_rel_gap": 0.0, "presolve": True})
    if res.status != 0 or res.x is None:
        raise PlanError(f"the packing program found no solution ({res.message})")
    x = np.round(res.x).astype(int)
    chosen = [(cols[j][0], cols[j][1], int(x[j])) for j in range(n) if x[j] > 0]
    return chosen, float(np.dot(col_val, x))
