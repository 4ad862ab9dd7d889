"""Search for training plans: pipelines by DP and branch and bound, replicas, batch shares and the gradient
sync of every layer's group by an integer program.

The plan space ``S_train(max_stages)``: replicas as for serving
(:mod:`hexjax.search.space`: pipelines of 1..``max_stages`` stages on distinct
hosts, each stage a ``(dp, tp)`` mesh of one host, devices used once), one
microbatch count ``M`` (from the workload's options) for every replica, and
replica ``r`` taking ``R_r = M b_r`` sequences per step, ``b_r`` a multiple of
every ``dp`` of the replica, ``Σ R_r`` the global batch; every device fits.
Values come from :mod:`hexjax.search.train_cost`:
``step = max_r T_r(b_r) + Σ_units sync(n, slowest link among the unit's holders)``.

1. Pipelines. For every footprint (multiset of ``(host class, devices)``
   pieces whose memory can hold the training state and whose pieces can
   hold every layer between them), every ``M`` and every ``b``: the order of
   the pieces, each stage's shape and the layer split minimising
   ``T = Σ f + (M - 1) max f`` (the serving search's machinery with the
   prefill as ``f``: an additive DP for ``M = 1``, for ``M > 1`` bounds from
   DPs and an exact branch and bound). Only what could be in a plan better
   than the best one found so far (value ``U``) is computed: a replica is
   at most ``U`` alone (``M b = B``) and ``U`` less the least sync beside
   others (for ``cost``, ``U`` over its price): each of its units waits at
   least for the link to the nearest host another replica could use, per
   piece of the footprint. ``U`` comes
   from one-replica plans as they appear (``M = B`` first) and from the
   integer programs over the shorter pipelines, searched first. A bound
   computed for all footprints at once (each piece's least work per layer
   and most layers, for each role and stash in the pipeline, the least hop
   time along any order, then the least ``Σ f`` and ``max f`` of any split)
   skips ``(M, b)`` it cannot beat, and, being monotone in ``b``, ends the
   shares of a footprint at the first ``b`` whose bound reaches the limit.
   Candidates with a smaller footprint and no larger ``T`` at the same
   ``(M, b)`` make larger ones redundant and are dropped; so a footprint's
   search is told to beat the ones found on footprints that fit into it
   (those whose least sync is no larger: the final limits keep them
   whenever they keep it), and finds the same candidates sooner.
2. Plans. For every ``M`` and every replica count ``n``, an integer program
   over copies of each candidate on concrete hosts: exactly ``n`` copies,
   shares summing to the batch, devices of each host. For ``n > 1`` it also
   prices the gradient sync exactly: per unit (layer, embedding, head; units
   that every column keeps on the same host share one variable) a binary per
   host "some copy keeps the unit here" and, on hosts with room for two
   copies, "two or more do"; the unit's sync time is at least each present
   pair's link cost and each doubly-held host's own link cost, and the
   objective is the slowest replica's ``T`` plus the units' sync times
   (``throughput``; with ``budget_per_hour`` also price <= budget), or the
   frontier of (step, price) points is enumerated (``cost``). Every plan of
   the space is feasible in its own ``(M, n)`` program, which values it
   exactly, so the least value over all programs is the optimum.
   Each program is first solved over host classes (:func:`_solve_classes`:
   a candidate per column, per segment and class a count of members, the
   hosts of a class being interchangeable), a relaxation whose value bounds
   the program's from below; the chosen candidates are then placed on hosts
   (the program above over their columns only), and when the placed plan's
   exact value meets the bound it is the program's optimum. Otherwise the
   program over every column decides, told to beat the placed plan.
   Before the exact programs, small ones over each share's few fastest
   candidates, and the few whose ``n`` copies alone would sync least beside
   their step, give a first value to cut with. Programs
   whose lower bound (least ``T`` of a replica that takes at least
   ``B / (M n)`` sequences, plus every unit's sync at the cheapest link a
   group of ``n`` of the columns' copies could have) cannot beat the best
   so far are skipped, ``n`` stops where ``n``
   copies of the training state exceed the cluster's memory, and a program
   leaves out the columns that could not improve on the best value (a
   replica slower than it less the least sync of ``n`` copies, or of ``n``
   copies one of which keeps each unit where that column does, on a stage
   of that column's devices, or one taking more sequences than the other
   ``n - 1`` leave); one whose class program without sync (the least
   slowest replica of any packing) plus the largest of those least syncs
   among the chosen candidates cannot beat it is skipped. A footprint's
   pipeline search is skipped where the closed-form bound already reaches
   the limit it is given.

Exactness and layer splits. The sync couples the replicas' layouts: a
replica that is not the slowest may do better with a slower split that keeps
its layers on the hosts where the other replicas keep theirs, and a larger
footprint stops being redundant beside a faster smaller one. Where every
(footprint order, layer split, share) choice numbers at most
``SPLIT_LIMIT`` (small problems, those the exhaustive oracle can check), all
of them are candidates (each stage on its fastest mesh) and the search is
exact over ``S_train`` (as long as the programs stay under
``EXACT_SYNC_LIMIT``; a larger one charges every unit the slowest link
among all the hosts the plan uses, an upper bound, and the plan is valued
exactly afterwards). Beyond that the candidates are each footprint's
fastest pipeline (step 1): the plan is optimal among plans whose replicas
are laid out for their own speed, and it records ``gap_bound_s``, how much
a differently split plan could be faster at most (its slowest replica is
no faster than step 1's candidates, its sync no cheaper than ``n``
members on the cluster's best-connected devices); 0 when the plan is
optimal over every split too.

``max_stages`` defaults to 4, lowered on large clusters while the footprints
of that many pieces exceed ``WORK_PER_DEVICE`` per device (hexgen-full keeps
4, synthetic-320 gets 2), and raised, whatever the count, to the fewest
hosts whose memory holds the training state and whose stages can hold every
layer with its activations (:func:`fewest_hosts`), then one more at a time
while no plan is found and the replicas that fit cannot take the global batch
between them (:func:`most_rows`: pipelines that short hold the state but only
small shares beside 1F1B's stash, as for Llama-2-70B on hexgen-full); the plan
records the value used.
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
WORK_PER_DEVICE = 1_200
"""Budget of the automatic ``max_stages``: footprints of up to that many pieces (memory not checked), per
device. Most cost a vectorised bound, a few the exact search: hexgen-8gpu and hexgen-full (62,929 footprints
at 4 pieces) keep 4 stages, synthetic-320 gets 2 (409,164 at 3)."""
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
class Share:
    """A replica's share of the batch, ``M`` microbatches of ``b`` sequences (what :func:`infeasible_message`
    reads of a candidate)."""

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
        self._piece: dict = {}
        self._path: dict = {}
        self._tables: tuple = (None, {}, [])
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

    def best(self, footprint, M: int, b: int, limit: float = INF) -> TrainChoice | None:
        """Least ``T`` over orders, shapes and layer splits of ``footprint`` (None if nothing fits, or if
        nothing is faster than ``limit``)."""
        P = len(footprint)
        if P > self.L:
            return None
        if self.cons.symmetric:
            return self._best_symmetric(footprint, M, b, limit)
        got = self._table(footprint, M, b)
        if got is None:
            return None
        orders, table, W = got
        self.evaluated += len(orders)
        if M == 1:
            total, _, counts = self.core._split_orders(W, "sum")
            o = int(np.argmin(total))
            if not total[o] < limit:
                return None
            idx = [int(table[o][j].arg[counts[j, o]]) for j in range(P)]
            return self._choice(float(total[o]), orders[o], table[o], [int(c) for c in counts[:, o]], idx, M, b)
        got = self.core._best_microbatched(table, W, M, limit, 0.0)
        if got is None:
            return None
        value, o, counts, idx = got
        return self._choice(value, orders[o], table[o], counts, idx, M, b)

    def _table(self, footprint, M: int, b: int):
        """``(orders, positions per order, W)`` of the orders whose every stage fits something, or None.

        Kept for the footprint last asked about: its ``M`` values from ``P`` up share one table per ``b``
        (``M`` matters only through the stash ``min(P - j, M)``).
        """
        if self._tables[0] != footprint:
            self._tables = (footprint, {}, sorted(set(itertools.permutations(footprint))))
        P = len(footprint)
        key = (min(M, P), b)
        cache = self._tables[1]
        if key not in cache:
            orders, table = [], []
            for order in self._tables[2]:
                row = [self.position(cls, u, M, b, j, P, order[j - 1][0] if j else None)
                       for j, (cls, u) in enumerate(order)]
                if all(r is not None for r in row):
                    orders.append(order)
                    table.append(row)
            cache[key] = (orders, table, [np.stack([t[j].busy for t in table]) for j in range(P)]) if orders else None
        return cache[key]

    def _best_symmetric(self, footprint, M: int, b: int, limit: float = INF) -> TrainChoice | None:
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
            if t < limit and (best is None or t < best.step_s):
                best = self._choice(t, order, row, counts, idx, M, b)
        return best

    @staticmethod
    def _choice(value, order, vecs, counts, idx, M, b) -> TrainChoice:
        meshes = tuple(vecs[j].meshes[s] for j, s in enumerate(idx))
        pipe = PipelineChoice(float(value), tuple(order), tuple(int(c) for c in counts), meshes, M)
        return TrainChoice(float(value), pipe, M, b)

    # ---- lower bounds, to skip footprints and shares that cannot beat a limit ----

    def piece_bound(self, cls: int, devices: int, nb: int) -> tuple[np.ndarray, ...]:
        """``(a, cap, a_up, cap_up, room, room_up)`` over microbatches ``b = 1..nb`` (index ``b - 1``): a stage
        on the piece works at least ``a[b - 1]`` per layer and holds at most ``cap[b - 1]`` layers, and at most
        ``room[role, b - 1]`` in one of the ``_ROLES`` (place in the pipeline and stash); the ``_up`` arrays
        bound every ``b' >= b`` as well (least ``a``, most ``cap`` and ``room`` over them: a measured
        efficiency curve need not make time grow with ``b``).

        Relaxed so that they bound every position: the least work and most room over the shapes (``dp``
        dividing ``b``) and, for ``a`` and ``cap``, the first/last flags with one stashed microbatch; no hop.
        """
        key = (cls, devices, nb)
        got = self._piece.get(key)
        if got is None:
            host = self.cluster.hosts[self.sym.classes[cls].hosts[0]]
            ls = self.layers[1:]
            a = np.full(nb, INF)
            room = np.zeros((len(_ROLES), nb), dtype=np.int64)
            for (dp, tp), (r, (first, last, stash)) in itertools.product(shapes(self.cfg, devices),
                                                                         enumerate(_ROLES)):
                if self.cons.symmetric and dp != 1:
                    continue
                for b in range(dp, nb + 1, dp):
                    c = train_cost.stage_train_cost(self.cfg, host.device, host.intra_bandwidth_Bps,
                                                    host.intra_latency_s, self.layers, dp, tp, first, last, b, stash,
                                                    self.wl, None)
                    ok = (c.memory_bytes <= c.capacity_bytes)[1:]
                    if ok.any():
                        if stash == 1:
                            a[b - 1] = min(a[b - 1], float((c.work_s[1:][ok] / ls[ok]).min()))
                        room[r, b - 1] = max(room[r, b - 1], int(ls[ok].max()))
            cap = room.max(axis=0)
            up = lambda x, f: f.accumulate(x[..., ::-1], axis=-1)[..., ::-1]
            got = self._piece[key] = (a, cap, up(a, np.minimum), up(cap, np.maximum), room, up(room, np.maximum))
        return got

    def path_bound(self, classes: tuple[int, ...], nb: int) -> np.ndarray:
        """``[0 or 1, b - 1]``: the least total, and the least largest, time a stage spends on the hops of a
        microbatch of ``b`` sequences (activations in, their gradient back, on every stage but the first),
        over the orders of ``classes``."""
        key = (classes, nb)
        got = self._path.get(key)
        if got is None:
            nbytes = np.arange(1, nb + 1) * (self.wl.seq_len * self.cfg.hidden_size * self.wl.dtype_bytes)
            got = np.zeros((2, nb))
            if len(classes) > 1:
                got[:] = INF
                for order in set(itertools.permutations(classes)):
                    hops = [2 * cost.hop_s(nbytes, *self.sym.link[(order[j - 1], order[j])])
                            for j in range(1, len(order))]
                    got[0] = np.minimum(got[0], sum(hops))
                    got[1] = np.minimum(got[1], np.max(hops, axis=0))
            self._path[key] = got
        return got

    def lower_bounds(self, fps: list, nb: int) -> tuple[np.ndarray, ...]:
        """``(fill, tau, fill_up, tau_up, path, hop)``, each ``[footprint, b - 1]`` for footprints of one size
        ``P``: with per-layer work ``a_s`` and room ``cap_s`` from :meth:`piece_bound`, ``fill`` is the least
        ``Σ a_s l_s`` and ``tau`` the least ``max a_s l_s`` over splits ``1 <= l_s <= cap_s``, ``Σ l_s = L``
        (inf where none exists), ``path`` and ``hop`` the least total and largest hop time of a stage
        (:meth:`path_bound`). Then with ``top = max(tau, hop)``, ``T >= fill + path + (M - 1) top`` and
        ``T >= M top`` (:func:`_share_bound`); ``fill_up`` and ``tau_up`` (from ``a_up``, ``cap_up``) make
        them hold for every larger ``b`` too (hops grow with ``b``)."""
        index: dict = {}
        idx = np.array([[index.setdefault(piece, len(index)) for piece in fp] for fp in fps], dtype=np.int64)
        rows = [self.piece_bound(cls, u, nb) for cls, u in index]
        out, fits = [], []
        for k in (0, 2):
            out += _fill_tau(np.stack([r[k] for r in rows])[idx], np.stack([r[k + 1] for r in rows])[idx], self.L)
            fits.append(_room(np.stack([r[4 + k // 2] for r in rows])[idx], self.L))
        paths: dict = {}
        hops = np.stack([paths.setdefault(c, self.path_bound(c, nb))
                         for c in (tuple(cls for cls, _ in fp) for fp in fps)])
        return tuple(out) + (hops[:, 0], hops[:, 1]) + tuple(fits)


_ROLES = ((True, False, 1), (False, False, 1), (False, True, 1), (True, True, 1), (True, False, 2), (False, False, 2))
"""``(first, last, stash)`` of the stage roles :meth:`TrainPipelines.piece_bound` gives room for: 1F1B keeps
``min(P - j, M)`` microbatches on stage ``j`` of ``P``, so with ``M >= 2`` every stage but the last keeps two or
more (memory grows with the stash); one stage is first and one last (both when ``P = 1``)."""


def _room(R: np.ndarray, L: int) -> np.ndarray:
    """``[0 or 1, footprint, b]``: whether the pieces (room ``R[footprint, stage, role, b]``) can hold ``L``
    layers with ``M = 1`` (every stash one) and with ``M >= 2``: at most the best choice of a first and a
    last piece plus the others' room in the middle."""
    N, P, _, nb = R.shape
    out = np.zeros((2, N, nb), dtype=bool)
    if P == 1:
        out[:] = R[:, 0, 3] >= L
        return out
    for m, (f, mid, last) in enumerate(((0, 1, 2), (4, 5, 2))):
        most = np.full((N, nb), -np.inf)
        for i, k in itertools.permutations(range(P), 2):
            most = np.maximum(most, R[:, i, f] - R[:, i, mid] + R[:, k, last] - R[:, k, mid])
        out[m] = R[:, :, mid].sum(axis=1) + most >= L
    return out


def _fill_tau(A: np.ndarray, C: np.ndarray, L: int) -> list[np.ndarray]:
    """``[fill, tau]`` (``[footprint, b]``) from per-layer work ``A`` and room ``C`` (``[footprint, stage, b]``):
    the least ``Σ a_s l_s`` and the least ``max a_s l_s`` over splits ``1 <= l_s <= cap_s``, ``Σ l_s = L``."""
    N, P, nb = A.shape
    ok = (C >= 1).all(axis=1) & (C.sum(axis=1) >= L) & (P <= L)
    A = np.where(np.isfinite(A), A, 1.0)                     # only where ok: keeps inf * 0 out
    # fill: a layer on every stage, the rest on the cheapest stages first, up to their room
    order = np.argsort(A, axis=1, kind="stable")
    As, extra = np.take_along_axis(A, order, axis=1), np.take_along_axis(C, order, axis=1) - 1
    before = np.cumsum(extra, axis=1) - extra
    take = np.clip(np.minimum(extra, (L - P) - before), 0, None)
    fill = As.sum(axis=1) + (As * take).sum(axis=1)
    # tau: the least t with Σ min(cap_s, t / a_s) >= L, i.e. the largest (L - cap(S)) / Σ_{s not in S} 1 / a_s
    # over proper subsets S of the stages (each min taken as either branch)
    inv = 1.0 / A
    tau = np.zeros((N, nb))
    for mask in range(2 ** P - 1):
        inside = np.array([(mask >> s) & 1 for s in range(P)], dtype=bool)
        tau = np.maximum(tau, (L - C[:, inside].sum(axis=1)) / inv[:, ~inside].sum(axis=1))
    return [np.where(ok, fill, INF), np.where(ok, tau, INF)]


def state_bytes(cfg: ModelConfig, wl: TrainWorkload) -> float:
    """Parameters, gradients and optimizer state of the whole model."""
    return cfg.num_params * sum(train_cost.state_bytes_per_param(wl))


def auto_max_stages(sym: Symmetry, num_devices: int, wl: TrainWorkload | None = None,
                    per_device: int = WORK_PER_DEVICE, floor: int = 1) -> int:
    """The longest pipelines (at most 4) whose footprints number at most ``per_device`` per device, but
    never fewer stages than ``floor`` (the fewest hosts that can hold the model at all), however many
    footprints that takes. (``wl`` is not needed: the work no longer grows with the batch.)"""
    if floor >= DEFAULT_MAX_STAGES:
        return floor
    for ms in range(DEFAULT_MAX_STAGES, floor, -1):
        if sum(count_footprints(sym, ms)[1:]) <= per_device * num_devices:
            return ms
    return max(1, floor)


def fewest_hosts(cfg, cluster, wl: TrainWorkload) -> int:
    """How many hosts a pipeline needs at least (each stage has its own): the fewest, largest first, whose
    usable memory holds the training state (weights, gradients, AdamW), and the fewest whose most layers
    per stage (with the activations and workspace of one sequence per device,
    :meth:`TrainPipelines.piece_bound`) add up to every layer. The host count when even all are short."""
    need, have, by_memory = state_bytes(cfg, wl), 0.0, cluster.num_hosts
    for k, room in enumerate(sorted((cost.usable_memory_bytes(h.device) * h.count for h in cluster.hosts),
                                    reverse=True), 1):
        have += room
        if have >= need:
            by_memory = k
            break
    sym = host_classes(cluster)
    search = TrainPipelines(cfg, cluster, sym, wl, Constraints())
    per_host = sorted((max(int(search.piece_bound(k.index, u, k.count)[3][0]) for u in range(1, k.count + 1))
                       for k in sym.classes for _ in k.hosts), reverse=True)
    by_layers = next((k for k in range(1, len(per_host) + 1) if sum(per_host[:k]) >= cfg.num_layers),
                     cluster.num_hosts)
    return max(by_memory, by_layers)


def candidates(cfg, cluster, wl: TrainWorkload, max_stages: int, sym: Symmetry, constraints: Constraints,
               progress: Progress | None = None, objective: str = "throughput",
               budget: float | None = None) -> tuple[list[TrainChoice], int]:
    """Every footprint's best pipeline for every ``(M, b)`` that a plan better than the best one found so
    far could use, less the dominated ones (see the module docstring)."""
    B = wl.global_batch
    usable = [cost.usable_memory_bytes(cluster.hosts[k.hosts[0]].device) for k in sym.classes]
    price_per = [cluster.hosts[k.hosts[0]].device.price_per_hour for k in sym.classes]
    search = TrainPipelines(cfg, cluster, sym, wl, constraints)
    # a piece holds at most this many layers at any microbatch size: footprints that cannot hold them all
    # are not enumerated (pipelines of large models on large clusters would be too many to list)
    room = {(k.index, u): int(search.piece_bound(k.index, u, B)[3][0]) for k in sym.classes
            for u in range(1, k.count + 1)}
    fps = footprints(sym, max_stages, usable, state_bytes(cfg, wl), room, cfg.num_layers)
    price = {fp: sum(price_per[cls] * u for cls, u in fp) for fp in fps}
    if budget is not None:      # a replica alone over the budget is in no plan within it
        fps = [fp for fp in fps if price[fp] <= budget * (1 + 1e-9)]
    levels: dict = defaultdict(list)
    for fp in fps:
        levels[len(fp)].append(fp)
    Ms = sorted((M for M in wl.microbatches if B % M == 0), reverse=True)   # M = B: one share, a whole plan
    sync = train_cost.least_sync_s(cfg, wl, cluster, 2)     # at least this with two or more replicas
    near = _nearest_member_s(cluster, sym, train_cost.grad_bytes_per_layer(cfg, wl))
    L = cfg.num_layers
    beside_sync: dict = {}
    incumbent = INF     # the objective's value of the best plan found so far
    found: list[TrainChoice] = []
    done = 0

    def least_beside(fp) -> float:
        """The least sync of any plan of two or more replicas in which one has footprint ``fp``: each of its
        units waits at least for the link to the nearest host another replica could use (every stage holds
        a layer, the others on the cheapest; the embedding and the head on some stage)."""
        got = beside_sync.get(fp)
        if got is None:
            m = sorted(near[piece] for piece in fp)
            got = beside_sync[fp] = max(sync, sum(x[0] for x in m) + (L - len(fp)) * m[0][0]
                                        + min(x[1] for x in m) + min(x[2] for x in m))
        return got

    def limits(fp) -> tuple[float, float]:
        """``T`` a replica of footprint ``fp`` must stay below to be in a better plan: alone, and beside
        others."""
        p = price[fp]
        alone = incumbent if objective == "throughput" or p <= 0 else incumbent / p
        return alone * (1 + 1e-9), (alone - least_beside(fp)) * (1 + 1e-9)

    offsets = np.cumsum([0] + [k.count for k in sym.classes])
    G = {}
    for fp in fps:
        g = G[fp] = np.zeros(offsets[-1], dtype=np.int16)
        for cls, u in fp:
            g[offsets[cls]:offsets[cls] + u] += 1
    smaller: dict = defaultdict(_Found)
    for P in sorted(levels):
        level = sorted(levels[P], key=lambda f: (sum(u for _, u in f), f))
        for lo in range(0, len(level), _CHUNK):
            chunk = level[lo:lo + _CHUNK]
            fill, tau, fill_up, tau_up, path, hop, fits, fits_up = search.lower_bounds(chunk, B)
            lbs = {M: (np.where(fits[min(M, 2) - 1, :, :B // M], _share_bound(
                           fill[:, :B // M], tau[:, :B // M], path[:, :B // M], hop[:, :B // M], M), INF),
                       np.where(fits_up[min(M, 2) - 1, :, :B // M], _share_bound(
                           fill_up[:, :B // M], tau_up[:, :B // M], path[:, :B // M], hop[:, :B // M], M), INF))
                   for M in Ms}
            first = np.min([up[:, 0] for _, up in lbs.values()], axis=0)
            for k, i in enumerate(np.argsort(first, kind="stable")):     # the most promising first
                fp = chunk[i]
                if progress is not None and (done + k) % 256 == 0:
                    progress(done + k, len(fps), "pipelines")
                alone, beside = limits(fp)      # until the incumbent changes
                if first[i] >= alone:
                    continue
                for M in Ms:
                    nb = B // M
                    lb, lb_up = lbs[M][0][i], lbs[M][1][i]
                    for b in range(1, nb + 1):
                        if lb_up[b - 1] >= alone:   # so is every larger b
                            break
                        limit = alone if b == nb else beside
                        if lb[b - 1] >= limit:
                            continue
                        # a pipeline no faster than one found on a footprint that fits into this one would be
                        # dropped as redundant (_undominated); if that one's least sync is no larger, the final
                        # limits drop this one whenever they drop that one: only a faster one is worth finding
                        limit = min(limit, smaller[(M, b)].least(G[fp], least_beside(fp)))
                        if lb[b - 1] >= limit:      # the bound knows already: no pipeline of fp is faster
                            continue
                        got = search.best(fp, M, b, limit)
                        if got is None:
                            continue
                        found.append(got)
                        smaller[(M, b)].add(G[fp], got.step_s, least_beside(fp))
                        if b == nb:             # one replica taking the whole batch is a plan
                            incumbent = min(incumbent, got.step_s * (1 if objective == "throughput" else price[fp]))
                            alone, beside = limits(fp)
            done += len(chunk)
        if P < max(levels) and found:
            # the best plan of the shorter pipelines found so far bounds what the longer ones must beat
            got = _combine(_undominated(found, sym), sym, cfg, cluster, wl, objective, budget, constraints,
                           exact=False)
            if got is not None:
                incumbent = min(incumbent, got[0])
    if progress is not None:
        progress(len(fps), len(fps), "pipelines")
    # what the final limits leave (the plan that set them keeps its replicas: they are below them)
    found = [g for g in found if g.step_s < limits(g.pipe.footprint)[g.microbatches * g.microbatch < B]]
    return _undominated(found, sym), search.evaluated


class _Found:
    """Pipelines found for one ``(M, b)``: footprint (pieces of each class with more than ``t`` devices, as
    in :func:`hexjax.search.packing.prune_dominated`), ``T`` and least sync beside other replicas."""

    def __init__(self):
        self.rows: list = []
        self.arrays = (np.zeros((0, 0), dtype=np.int16), np.zeros(0), np.zeros(0))

    def add(self, g: np.ndarray, step_s: float, sync: float) -> None:
        self.rows.append((g, step_s, sync))

    def least(self, g: np.ndarray, sync: float) -> float:
        """The least ``T`` of a footprint that fits into ``g`` and whose least sync is at most ``sync``."""
        if not self.rows:
            return INF
        if len(self.arrays[1]) != len(self.rows):
            self.arrays = (np.stack([r[0] for r in self.rows]), np.array([r[1] for r in self.rows]),
                           np.array([r[2] for r in self.rows]))
        K, T, S = self.arrays
        ok = (S <= sync) & np.all(K <= g, axis=1)
        return float(T[ok].min()) if ok.any() else INF


def _nearest_member_s(cluster, sym: Symmetry, unit_bytes: list[float]) -> dict:
    """``{(class, devices): (layer, embedding, head)}``: the least all-reduce time of two members (a ring of
    more is slower on every link) when one is a stage of that many devices on a host of the class: over the
    links to every other host, and the host's own when devices are left on it for another stage."""
    layer, emb, head = unit_bytes[0], unit_bytes[-2], unit_bytes[-1]
    out = {}
    for k in sym.classes:
        h = k.hosts[0]
        others = [g for g in range(cluster.num_hosts) if g != h]
        for u in range(1, k.count + 1):
            near = others + ([h] if k.count > u else [])
            out[(k.index, u)] = tuple(min((train_cost.link_allreduce_s(cluster, h, g, nbytes, 2) for g in near),
                                          default=INF) for nbytes in (layer, emb, head))
    return out


def _share_bound(fill, tau, path, hop, M: int):
    """The least ``T`` of a pipeline with these bounds (see :meth:`TrainPipelines.lower_bounds`) at ``M``:
    ``Σ f + (M - 1) max f`` with ``Σ f >= fill + path`` and ``max f >= max(tau, hop)``."""
    top = np.maximum(tau, hop)
    return np.maximum(fill + path + (M - 1) * top if M > 1 else fill + path, M * top)


_CHUNK = 4096
"""Footprints whose lower bounds are computed together (arrays of footprints x pieces x shares)."""


def _undominated(found: list[TrainChoice], sym: Symmetry) -> list[TrainChoice]:
    """``found`` less the candidates a smaller-or-equal footprint matches or beats at the same ``(M, b)``."""
    groups: dict = defaultdict(list)
    for g in found:
        groups[(g.microbatches, g.microbatch)].append(g)
    out = []
    for group in groups.values():
        keep = {id(p) for p in prune_dominated([g.pipe for g in group], sym)}
        out += [g for g in group if id(g.pipe) in keep]
    return out


# ---- every layer split (small problems) ----

SPLIT_LIMIT = 50_000
"""Most (footprint order, layer split, share) choices for which every layer split becomes a candidate."""


def _compositions(total: int, parts: int) -> np.ndarray:
    """Every split of ``total`` layers into ``parts`` positive counts, one per row."""
    rows = [np.diff((0,) + cuts + (total,)) for cuts in itertools.combinations(range(1, total), parts - 1)]
    return np.array(rows, dtype=np.int64).reshape(-1, parts)


def every_split(cfg, cluster, wl: TrainWorkload, max_stages: int, sym: Symmetry,
                constraints: Constraints) -> list[TrainChoice] | None:
    """Every footprint's every order and layer split, each stage on its fastest mesh, for every ``(M, b)``;
    None when that is more than :data:`SPLIT_LIMIT` choices.

    With the gradient sync priced per layer group, a replica that is not the slowest may do better with a
    slower split that keeps its layers beside the other replicas' copies, and a larger footprint is no longer
    redundant beside a faster smaller one; so on problems this small the integer program gets them all.
    """
    B, L = wl.global_batch, cfg.num_layers
    shares = [(M, b) for M in wl.microbatches if B % M == 0 for b in range(1, B // M + 1)]
    # footprints (memory unchecked) x orders x splits x shares, counted before anything is listed
    ways = count_footprints(sym, min(max_stages, L))
    if sum(w * math.factorial(P) * math.comb(L - 1, P - 1) for P, w in enumerate(ways) if P) * len(shares) \
            > SPLIT_LIMIT:
        return None
    usable = [cost.usable_memory_bytes(cluster.hosts[k.hosts[0]].device) for k in sym.classes]
    fps = [fp for fp in footprints(sym, max_stages, usable, state_bytes(cfg, wl)) if len(fp) <= L]
    search = TrainPipelines(cfg, cluster, sym, wl, constraints)
    splits = {P: _compositions(L, P) for P in {len(fp) for fp in fps}}
    out = []
    for fp in fps:
        P = len(fp)
        for M, b in shares:
            table = search._table(fp, M, b)
            if table is None:
                continue
            orders, positions, W = table
            K = splits[P]
            work_s = np.stack([W[j][:, K[:, j]] for j in range(P)])          # [stage, order, split]
            T = work_s.sum(axis=0) + ((M - 1) * work_s.max(axis=0) if M > 1 else 0.0)
            for o, k in zip(*np.nonzero(np.isfinite(T))):
                counts = [int(c) for c in K[k]]
                idx = [int(positions[o][j].arg[counts[j]]) for j in range(P)]
                out.append(search._choice(float(T[o, k]), orders[o], positions[o], counts, idx, M, b))
    return out


# ---- plans: integer programs ----

@dataclasses.dataclass(frozen=True)
class _Column:
    cand: int
    hosts: tuple[int, ...]
    use: dict
    step_s: float
    price: float
    rows: int
    units: tuple[int, ...]
    """The host of each synchronised unit (:func:`train_cost.unit_hosts`)."""
    widths: tuple[int, ...]
    """Devices of the stage keeping each unit."""


def _columns(cands: list[TrainChoice], sym: Symmetry, cluster) -> list[_Column]:
    cols = []
    for ci, c in enumerate(cands):
        price_per = [cluster.hosts[sym.classes[cls].hosts[0]].device.price_per_hour for cls, _ in c.pipe.pieces]
        price = sum(p * u for p, (_, u) in zip(price_per, c.pipe.pieces))
        for hosts in assignments(c.pipe, sym):
            use = defaultdict(int)
            for h, (_, u) in zip(hosts, c.pipe.pieces):
                use[h] += u
            cols.append(_Column(ci, hosts, dict(use), c.step_s, price, c.microbatches * c.microbatch,
                                train_cost.unit_hosts(c.pipe.layer_counts, hosts),
                                train_cost.unit_hosts(c.pipe.layer_counts, [u for _, u in c.pipe.pieces])))
    return cols


def _segments(cols: list[_Column], unit_bytes: list[float]) -> list[tuple[int, float, np.ndarray, np.ndarray]]:
    """Units that every column keeps on the same host and that carry the same bytes share one sync
    variable: ``[(units in the segment, bytes per unit, host per column, devices of that stage per column)]``."""
    table = np.array([c.units for c in cols], dtype=np.int64)
    widths = np.array([c.widths for c in cols], dtype=np.int64)
    groups: dict = {}
    for u, nbytes in enumerate(unit_bytes):
        key = (nbytes, table[:, u].tobytes())
        if key in groups:
            groups[key][0] += 1
        else:
            groups[key] = [1, nbytes, table[:, u], widths[:, u]]
    return [tuple(g) for g in groups.values()]


PROGRAM_TIME_LIMIT_S = 60.0
"""Time one integer program may take; a program stopped by it contributes its best solution found and the
plan says so (``unproven_programs``), its ``gap_bound_s`` still bounding how far from optimal it can be."""
_unproven = [0]
"""Programs of the current search stopped by the time limit."""
_bounded = [0]
"""Programs of the current search that charged the bounded sync (over ``EXACT_SYNC_LIMIT``)."""

EXACT_SYNC_LIMIT = 60_000
"""Largest columns x sync segments for which the integer program prices every layer group; above it each
unit is charged the slowest link among all the hosts the plan uses (an upper bound), to keep it small."""


def _sync_groups(cols: list[_Column], unit_bytes: list[float]) -> list[tuple[int, float, dict]]:
    """``[(units, bytes per unit, {host: columns whose copies count as members there})]`` for the program.

    Exact: per segment, a column's member of the group is on the host keeping the unit. Bounded (large
    programs): one group per distinct unit size whose members are on every host a column uses, so the
    program's sync is at least the plan's and the plan is valued exactly afterwards."""
    segments = _segments(cols, unit_bytes)
    if len(cols) * len(segments) <= EXACT_SYNC_LIMIT:
        return [(count, nbytes, {int(h): np.flatnonzero(holders == h).tolist() for h in set(holders.tolist())})
                for count, nbytes, holders, _ in segments]
    _bounded[0] += 1
    uses: dict = defaultdict(list)
    for j, c in enumerate(cols):
        for h in c.use:
            uses[h].append(j)
    sizes: dict = defaultdict(int)
    for nbytes in unit_bytes:
        sizes[nbytes] += 1
    return [(count, nbytes, dict(uses)) for nbytes, count in sizes.items()]


def _least_group_s(cluster, caps: dict, nbytes: float, n: int) -> float:
    """The least all-reduce time of ``n`` members on hosts that hold at most ``caps[h]`` each.

    A group whose slowest link costs ``c`` lies in one connected part of the hosts joined by links costing at
    most ``c`` (a host counting for more than one member only when its own link costs at most ``c``); the
    least ``c`` at which some part can hold ``n`` members is a lower bound (inf: none can)."""
    key = (cluster, tuple(sorted(caps.items())), nbytes, n)
    got = _group_cache.get(key)
    if got is None:
        if len(_group_cache) > 100_000:
            _group_cache.clear()
        got = _group_cache[key] = _least_group_uncached(cluster, caps, nbytes, n)
    return got


_group_cache: dict = {}
""":func:`_least_group_s` by its arguments: the bound programs and footprints ask for the same few groups."""


def _least_group_uncached(cluster, caps: dict, nbytes: float, n: int) -> float:
    from scipy.sparse.csgraph import connected_components

    hosts = sorted(caps)
    cap = np.array([caps[h] for h in hosts])
    pair = _pair_s(cluster, nbytes, n)[np.ix_(hosts, hosts)]
    own = np.diag(pair).copy()
    for c in np.unique(pair):
        near = pair <= c
        np.fill_diagonal(near, False)
        parts, label = connected_components(near, directed=False)
        members = np.where(own <= c, cap, np.minimum(cap, 1))
        if np.bincount(label, weights=members, minlength=parts).max() >= n:
            return float(c)
    return INF


def _pair_s(cluster, nbytes: float, n: int) -> np.ndarray:
    """``[a, b]``: the all-reduce time of ``n`` members over the link between hosts ``a`` and ``b`` (the host's own
    link on the diagonal), for every pair of the cluster's hosts; the bounds ask for the same few often."""
    key = ("pairs", cluster, nbytes, n)
    got = _group_cache.get(key)
    if got is None:
        H = range(cluster.num_hosts)
        got = _group_cache[key] = np.array([[train_cost.link_allreduce_s(cluster, a, b, nbytes, n) for b in H]
                                            for a in H])
    return got


def _caps(cluster, holders: np.ndarray, widths: np.ndarray) -> dict:
    """``{host: most members}`` from each column's host and devices of the stage there: a member needs a
    stage's devices, so a host holds at most its devices over the narrowest stage any column puts on it."""
    order = np.argsort(holders, kind="stable")
    hosts, first = np.unique(holders[order], return_index=True)
    least = np.minimum.reduceat(widths[order], first)
    return {int(h): cluster.hosts[int(h)].count // int(w) for h, w in zip(hosts, least)}


def _sync_bound(cols: list[_Column], cluster, n: int, unit_bytes: list[float]) -> float:
    """A lower bound on the gradient sync of any ``n`` copies of ``cols``, per segment from the hosts the
    columns keep it on (:func:`_least_group_s`)."""
    if n <= 1:
        return 0.0
    total = 0.0
    for count, nbytes, holders, widths in _segments(cols, unit_bytes):
        total += count * _least_group_s(cluster, _caps(cluster, holders, widths), nbytes, n)
    return total


def _column_sync_bounds(cols: list[_Column], cluster, n: int, unit_bytes: list[float]) -> np.ndarray:
    """Per column, a lower bound on the sync of any ``n`` copies of ``cols`` among which it is: each unit's
    group has the column's own member on the host where it keeps the unit, a stage of that many devices, so
    that host holds at most one more member per narrowest stage any column puts there in its other devices;
    the group is no cheaper than the least group of ``n`` members around that host so capped
    (:func:`_least_group_around`) on the hosts the columns use."""
    table = np.array([c.units for c in cols], dtype=np.int64)
    widths = np.array([c.widths for c in cols], dtype=np.int64)
    least = np.full(cluster.num_hosts, np.iinfo(np.int64).max)
    np.minimum.at(least, table.ravel(), widths.ravel())
    used = np.flatnonzero(least < np.iinfo(np.int64).max)
    caps = {int(h): cluster.hosts[h].count // int(least[h]) for h in used}
    wide = sorted(set(widths.ravel().tolist()))
    own = {int(h): tuple(1 + (cluster.hosts[h].count - w) // int(least[h]) for w in wide) for h in used}
    kinds = sorted(set(unit_bytes))
    G = np.full((cluster.num_hosts, len(kinds), len(wide)), INF)
    for k, nbytes in enumerate(kinds):
        G[used, k] = _least_group_around(cluster, caps, nbytes, n, own)
    kind = np.array([kinds.index(b) for b in unit_bytes])
    w_index = np.searchsorted(wide, widths)
    return G[table, kind[None, :], w_index].sum(axis=1)


def _least_group_around(cluster, caps: dict, nbytes: float, n: int, own: dict | None = None) -> np.ndarray:
    """Per host of ``caps`` (sorted), the least all-reduce time of ``n`` members, one of them on that host:
    as :func:`_least_group_s`, the least link cost ``c`` at which the host's connected part holds ``n``.
    With ``own`` (``{host: (caps)}``, one tuple length for all): ``[host, i]``, that host itself holding at most
    ``own[host][i]`` members (the others still ``caps``)."""
    key = ("around", cluster, tuple(sorted(caps.items())), nbytes, n,
           None if own is None else tuple(sorted(own.items())))
    got = _group_cache.get(key)
    if got is not None:
        return got
    from scipy.sparse.csgraph import connected_components

    hosts = sorted(caps)
    cap = np.array([caps[h] for h in hosts])
    mine = cap[:, None] if own is None else np.array([own[h] for h in hosts]).reshape(len(hosts), -1)
    pair = _pair_s(cluster, nbytes, n)[np.ix_(hosts, hosts)]
    diag = np.diag(pair).copy()
    got = np.full(mine.shape, INF)
    for c in np.unique(pair):
        near = pair <= c
        np.fill_diagonal(near, False)
        parts, label = connected_components(near, directed=False)
        members = np.where(diag <= c, cap, np.minimum(cap, 1))
        here = np.where((diag <= c)[:, None], mine, np.minimum(mine, 1))
        full = (np.bincount(label, weights=members, minlength=parts)[label] - members)[:, None] + here >= n
        got[full & ~np.isfinite(got)] = c
        if np.isfinite(got).all():
            break
    if own is None:
        got = got[:, 0]
    if len(_group_cache) > 100_000:
        _group_cache.clear()
    _group_cache[key] = got
    return got


def _sync_bound_any_cluster(cluster, n: int, unit_bytes: list[float]) -> float:
    """A lower bound on the gradient sync of any ``n`` replicas on ``cluster`` under any layout: every unit's
    group as cheap as ``n`` members on the cluster's devices can be (one device each)."""
    if n <= 1:
        return 0.0
    caps = {h: host.count for h, host in enumerate(cluster.hosts)}
    return sum(_least_group_s(cluster, caps, nbytes, n) for nbytes in unit_bytes)


class _Program:
    """A mixed-integer program built row by row for scipy's ``milp``: the first variables given (upper
    bounds, integrality, weight in the step time), more added by ``var``, rows by ``row``."""

    def __init__(self, upper: list[float], integer: list[int], weight: list[float]):
        self.ub, self.integer, self.weight = list(upper), list(integer), list(weight)
        self.ri: list[int] = []
        self.ci: list[int] = []
        self.vals: list[float] = []
        self.lo: list[float] = []
        self.hi: list[float] = []

    def var(self, upper: float, is_int: int, weight: float = 0.0) -> int:
        self.ub.append(upper)
        self.integer.append(is_int)
        self.weight.append(weight)
        return len(self.ub) - 1

    def row(self, entries, low: float, high: float) -> None:
        r = len(self.lo)
        for j, v in entries:
            self.ri.append(r)
            self.ci.append(j)
            self.vals.append(v)
        self.lo.append(low)
        self.hi.append(high)

    def solve(self, prices: list[float], budget: float | None, price_cap: float | None, time_cap: float | None,
              minimise: str):
        """scipy's result, with the price caps on the first ``len(prices)`` variables and the time cap on the
        weighted ones; minimising the step time (``minimise == "time"``) or the price."""
        from scipy.optimize import Bounds, LinearConstraint
        from scipy.sparse import coo_matrix

        from hexjax.search.milp import milp

        N = len(self.ub)
        for cap in (budget, price_cap):
            if cap is not None:
                self.row(list(enumerate(prices)), -np.inf, cap)
        if time_cap is not None:
            self.row([(j, w) for j, w in enumerate(self.weight) if w], -np.inf, time_cap)
        c = np.zeros(N)
        if minimise == "time":
            c[:] = self.weight
        else:
            c[:len(prices)] = prices
        A = coo_matrix((self.vals, (self.ri, self.ci)), shape=(len(self.lo), N)).tocsr()
        return milp(c, constraints=[LinearConstraint(A, self.lo, self.hi)], integrality=np.array(self.integer),
                    bounds=Bounds(np.zeros(N), np.array(self.ub)),
                    options={"mip_rel_gap": 0.0, "presolve": True, "time_limit": PROGRAM_TIME_LIMIT_S})


def _solve_hosts(cols: list[_Column], cluster, n: int, batch: int, unit_bytes: list[float], budget: float | None,
                 price_cap: float | None, time_cap: float | None, minimise: str):
    """The integer program over copies on concrete hosts (see the module docstring): ``({column: copies},
    objective value)`` or None."""
    C = len(cols)
    if C == 0:
        return None
    # variables: z (copies) C, y (column used) C, t (slowest replica) 1, then per sync segment s (its
    # all-reduce time) and per host holding it x (holds some member) and d (holds two or more)
    prog = _Program([0.0] * C + [1.0] * C + [0.0], [1] * (2 * C) + [0], [0.0] * (2 * C) + [1.0])
    var, row, ub, T = prog.var, prog.row, prog.ub, 2 * C

    row([(j, 1) for j in range(C)], n, n)
    row([(j, cols[j].rows) for j in range(C)], batch, batch)
    per_host = defaultdict(list)
    for j, c in enumerate(cols):
        for h, u in c.use.items():
            per_host[h].append((j, u))
    for h, entries in per_host.items():
        row(entries, -np.inf, cluster.hosts[h].count)
    for j, c in enumerate(cols):
        ub[j] = min(min(cluster.hosts[h].count // u for h, u in c.use.items()), n)
        row([(j, 1), (C + j, -n)], -np.inf, 0)                     # z <= n y
        row([(C + j, c.step_s), (T, -1)], -np.inf, 0)              # t >= T y
    ub[T] = max(c.step_s for c in cols)
    if n > 1:
        for count, nbytes, members in _sync_groups(cols, unit_bytes):
            hosts = sorted(members)
            worst = max(train_cost.link_allreduce_s(cluster, a, b, nbytes, n) for a in hosts for b in hosts)
            s = var(worst, 0, count)
            x = {}
            for h in hosts:
                held = [(j, 1) for j in members[h]]
                x[h] = var(1, 1)
                row(held + [(x[h], -n)], -np.inf, 0)               # a member on h: x_h = 1
                if cluster.hosts[h].count > 1:                     # two members on h: d = 1, h's own link
                    d = var(1, 1)
                    row(held + [(d, -(n - 1))], -np.inf, 1)
                    row([(d, train_cost.link_allreduce_s(cluster, h, h, nbytes, n)), (s, -1)], -np.inf, 0)
            for i, a in enumerate(hosts):
                for b in hosts[i + 1:]:                            # members on a and b: their link
                    c_ab = train_cost.link_allreduce_s(cluster, a, b, nbytes, n)
                    row([(x[a], c_ab), (x[b], c_ab), (s, -1)], -np.inf, c_ab)
    res = prog.solve([col.price for col in cols], budget, price_cap, time_cap, minimise)
    if res.status == 1:                 # out of time: its best solution, if any, is not proven optimal
        _unproven[0] += 1
    if res.status not in (0, 1) or res.x is None:
        return None
    z = np.round(res.x[:C]).astype(int)
    return {j: int(z[j]) for j in range(C) if z[j] > 0}, float(res.fun)


def _solve_classes(cols: list[_Column], sym: Symmetry, cluster, n: int, batch: int, unit_bytes: list[float],
                   budget: float | None, price_cap: float | None, time_cap: float | None, minimise: str,
                   sync: bool = True, floors: tuple[float, dict] | None = None):
    """The program over host classes, a relaxation of :func:`_solve_hosts`: ``({candidate: copies}, value)``,
    None when infeasible (so is the program on hosts), or ``"unknown"`` when stopped by the time limit.
    ``sync=False``: the slowest replica of the packing alone, plus with ``floors`` (``(least sync of any n
    copies, {candidate: least sync of n copies among which it is})``) the largest floor of the chosen
    candidates, a lower bound on the step in place of the sync terms.

    Hosts of a class are interchangeable (same devices, zone, own link, links to every other host), so a
    column is a candidate (not a candidate on concrete hosts) and, per sync segment and class, the members
    are the copies of the candidates keeping the segment's units there, an integer count ``m``. Exact terms:
    two classes holding members, their link; ``m`` above the class's hosts, two members share a host (its
    own link); the members' devices above one host's, two are on distinct hosts (the class's link); one
    host in the class, its own link. Otherwise two or more members cost at least the cheaper of the two
    links (whether they share a host depends on the packing, which the class program does not see).
    Devices: each class's total, and at most ``q`` pieces larger than ``1 / (q + 1)`` of a host per host."""
    cands: dict = {}
    for c in cols:
        cands.setdefault(c.cand, c)
    reps = list(cands.values())
    K = len(reps)
    if K == 0:
        return None
    prog = _Program([float(n)] * K + [1.0] * K + [0.0], [1] * (2 * K) + [0], [0.0] * (2 * K) + [1.0])
    var, row, ub, T = prog.var, prog.row, prog.ub, 2 * K

    row([(j, 1) for j in range(K)], n, n)
    row([(j, reps[j].rows) for j in range(K)], batch, batch)
    pieces = defaultdict(list)            # class -> [(candidate, devices)] of every stage
    for j, c in enumerate(reps):
        for h, u in c.use.items():
            pieces[sym.class_of[h]].append((j, u))
    for k, got in pieces.items():
        hosts, count = len(sym.classes[k].hosts), sym.classes[k].count
        row(got, -np.inf, hosts * count)
        for q in range(1, count):         # pieces of more than count / (q + 1) devices: q per host at most
            big = [(j, 1) for j, u in got if u * (q + 1) > count]
            if big:
                row(big, -np.inf, q * hosts)
    for j, c in enumerate(reps):
        row([(j, 1), (K + j, -n)], -np.inf, 0)                     # z <= n y
        row([(K + j, c.step_s), (T, -1)], -np.inf, 0)              # t >= T y
    ub[T] = max(c.step_s for c in reps)
    if n > 1 and not sync and floors is not None:
        # every plan syncs at least the pool's floor and at least each of its replicas' own floor
        u = var(max([floors[0], *floors[1].values()]), 0, 1.0)
        row([(u, 1)], floors[0], np.inf)
        for j, c in enumerate(reps):
            row([(K + j, floors[1][c.cand]), (u, -1)], -np.inf, 0)     # u >= floor y
    if n > 1 and sync:
        for count, nbytes, holders, widths in _segments(reps, unit_bytes):
            members = defaultdict(list)   # class -> [(candidate, devices of its stage)]
            for j, (h, w) in enumerate(zip(holders.tolist(), widths.tolist())):
                members[sym.class_of[h]].append((j, w))
            ks = sorted(members)
            first = {k: sym.classes[k].hosts[0] for k in ks}
            own = {k: (train_cost.link_allreduce_s(cluster, first[k], first[k], nbytes, n)
                       if sym.classes[k].count > 1 else None) for k in ks}
            between = {k: (train_cost.link_allreduce_s(cluster, first[k], sym.classes[k].hosts[1], nbytes, n)
                           if len(sym.classes[k].hosts) > 1 else None) for k in ks}
            pair = {(a, b): train_cost.link_allreduce_s(cluster, first[a], first[b], nbytes, n)
                    for i, a in enumerate(ks) for b in ks[i + 1:]}
            worst = max([*pair.values(), *(v for v in own.values() if v is not None),
                         *(v for v in between.values() if v is not None), 0.0])
            s = var(worst, 0, count)
            x = {}
            for k in ks:
                held = [(j, 1) for j, _ in members[k]]
                x[k] = var(1, 1)
                row(held + [(x[k], -n)], -np.inf, 0)               # a member in k: x_k = 1
                links = [v for v in (own[k], between[k]) if v is not None]
                hosts, cap = len(sym.classes[k].hosts), sym.classes[k].count
                if not links:                                      # one host of one device: one member
                    row(held, -np.inf, 1)
                    continue
                two = var(1, 1)                                    # two or more members in k
                row(held + [(two, -(n - 1))], -np.inf, 1)
                row([(two, min(links)), (s, -1)], -np.inf, 0)
                if own[k] is not None and between[k] is not None and n > hosts:
                    f = var(1, 1)                                  # more members than hosts: two share one
                    row(held + [(f, -(n - hosts))], -np.inf, hosts)
                    row([(f, own[k]), (s, -1)], -np.inf, 0)
                if between[k] is not None and own[k] is not None:
                    g = var(1, 1)                                  # more devices than a host has: two apart
                    row([(j, w) for j, w in members[k]] + [(g, -n * max(w for _, w in members[k]))], -np.inf, cap)
                    row([(g, between[k]), (s, -1)], -np.inf, 0)
            for (a, b), c_ab in pair.items():
                row([(x[a], c_ab), (x[b], c_ab), (s, -1)], -np.inf, c_ab)
    res = prog.solve([col.price for col in reps], budget, price_cap, time_cap, minimise)
    if res.status == 1:
        return "unknown"
    if res.status != 0 or res.x is None:
        return None
    z = np.round(res.x[:K]).astype(int)
    return {reps[j].cand: int(z[j]) for j in range(K) if z[j] > 0}, float(res.fun)


PLACED_TOLERANCE = 1e-6
"""Relative slack between a placed plan's exact value and the class program's value under which the plan
counts as optimal: the solver's own (its integrality tolerance lets a link term fall short by about this)."""
_by_classes = [0, 0]
"""Programs of the current search solved by the class program and a placement of its candidates, and
programs that needed the program on hosts after it."""


def _solve(cols: list[_Column], sym: Symmetry, cluster, n: int, batch: int, unit_bytes: list[float],
           budget: float | None, price_cap: float | None, time_cap: float | None, minimise: str):
    """The optimum of :func:`_solve_hosts` (``{column: copies}`` or None), found through the smaller class
    program where it can be.

    The class program (:func:`_solve_classes`) bounds every plan from below; its candidates placed on hosts
    (the program on hosts over their columns only) give a plan; when that plan's value meets the bound it
    is optimal. Otherwise (or when the class program ran out of time) the program on hosts over every
    column decides, told that it must beat the placed plan."""
    got = _solve_classes(cols, sym, cluster, n, batch, unit_bytes, budget, price_cap, time_cap, minimise)
    if got is None:                       # a relaxation without a solution: none on hosts either
        _by_classes[0] += 1
        return None
    placed = None
    if got != "unknown":
        copies, bound = got
        keep = [j for j, c in enumerate(cols) if c.cand in copies]
        found = _solve_hosts([cols[j] for j in keep], cluster, n, batch, unit_bytes, budget, price_cap, time_cap,
                             minimise)
        if found is not None:
            chosen = {keep[j]: x for j, x in found[0].items()}
            placed = (chosen, _exact_step(chosen, cols, cluster, unit_bytes) if minimise == "time"
                      else sum(cols[j].price * x for j, x in chosen.items()))
            if placed[1] <= bound + PLACED_TOLERANCE * max(1.0, abs(bound)):
                _by_classes[0] += 1
                return placed[0]
    _by_classes[1] += 1
    cap = time_cap
    if placed is not None and minimise == "time":
        cap = placed[1] if cap is None else min(cap, placed[1])
    found = _solve_hosts(cols, cluster, n, batch, unit_bytes, budget, price_cap, cap, minimise)
    if found is None or placed is None:
        return (placed or found or (None,))[0]
    # a bounded program's value is not the plan's: compare the two exactly
    exact = lambda chosen: (_exact_step(chosen, cols, cluster, unit_bytes) if minimise == "time"
                            else sum(cols[j].price * x for j, x in chosen.items()))
    return min(found[0], placed[0], key=exact)


def _exact_step(chosen: dict, cols, cluster, unit_bytes: list[float]) -> float:
    """The step time of a solution as :func:`_step` prices it, from the units' bytes."""
    units = [cols[j].units for j, x in chosen.items() for _ in range(x)]
    sync = sum(train_cost.group_sync_s(cluster, [r[u] for r in units], nbytes) for u, nbytes in enumerate(unit_bytes))
    return max(cols[j].step_s for j in chosen) + sync


def _step(chosen: dict, cols, cfg, cluster, wl) -> float:
    """Step time of a solution: its slowest replica, then every unit's gradient sync among the hosts the
    replicas really keep it on."""
    units = [cols[j].units for j, x in chosen.items() for _ in range(x)]
    return max(cols[j].step_s for j in chosen) + train_cost.sync_s(cfg, wl, cluster, units)


def _value(chosen: dict, cols, cfg, cluster, wl, objective: str):
    """``(objective value, step_s, price)`` of a solution."""
    step = _step(chosen, cols, cfg, cluster, wl)
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
    auto = max_stages is None
    if auto:
        max_stages = DEFAULT_MAX_STAGES if exhaustive else auto_max_stages(
            sym, cluster.num_devices, wl, floor=fewest_hosts(cfg, cluster, wl))
    if not isinstance(max_stages, int) or max_stages < 1:
        raise PlanError(f"max_stages must be a positive integer, got {max_stages!r}")
    t0 = time.perf_counter()
    if exhaustive:
        from hexjax.search.train_exhaustive import exhaustive_train
        result, stats = exhaustive_train(cfg, cluster, wl, objective, budget_per_hour, max_stages, progress)
        if result is None:
            # replicas that fit but cannot make up the batch get the fast search's message, not "nothing fits"
            shares = [Share(M, b) for M, b in stats["shares"]]
            raise PlanError(infeasible_message(cfg, cluster, wl, max_stages, budget_per_hour, cands=shares))
        return _finish(result, cfg, cluster, wl, {"search_s": time.perf_counter() - t0, "max_stages": max_stages,
                                                   "exhaustive": True, **stats})

    def candidates_at(stages: int):
        """Candidates of at most ``stages`` stages, how many orders that took, and which layer splits."""
        # the baselines' replicas share one layout, so their splits stay aligned: their own fastest is kept
        got = every_split(cfg, cluster, wl, stages, sym, constraints) if constraints == Constraints() else None
        if got is not None:
            return got, len(got), "every"
        return (*candidates(cfg, cluster, wl, stages, sym, constraints, progress, objective, budget_per_hour),
                "fastest")

    def combine(cands):
        _unproven[0] = _bounded[0] = _by_classes[0] = _by_classes[1] = 0
        return _combine(cands, sym, cfg, cluster, wl, objective, budget_per_hour, constraints)

    longest = min(cluster.num_hosts, cfg.num_layers)
    cands, evaluated, splits = candidates_at(max_stages)
    # fewest_hosts is a bound: when no pipeline that short fits, the model needs longer ones
    while auto and not cands and splits == "fastest" and max_stages < longest:
        max_stages += 1
        cands, evaluated, splits = candidates_at(max_stages)
    if not cands:
        raise PlanError(infeasible_message(cfg, cluster, wl, max_stages, None))
    best = combine(cands)
    # the replicas that fit may take too few sequences between them to make up the batch (1F1B's stash grows
    # with M): longer pipelines spread the state over more hosts and leave room for larger shares
    while best is None and auto and max_stages < longest and most_rows(cands, cfg, cluster, wl) < wl.global_batch:
        max_stages += 1
        cands, evaluated, splits = candidates_at(max_stages)
        best = combine(cands)
    if best is None:
        raise PlanError(infeasible_message(cfg, cluster, wl, max_stages, budget_per_hour, cands=cands))
    value, chosen, cols, lower, bounded = best
    result = build_plan(cfg, cluster, wl, objective, [(cands[cols[j].cand], cols[j].hosts, x)
                                                        for j, x in chosen.items()])
    meta = {"search_s": time.perf_counter() - t0, "max_stages": max_stages, "exhaustive": False,
            "candidates": len(cands), "orders_evaluated": evaluated, "layer_splits": splits}
    meta["sync_pricing"] = "bounded" if bounded else "per layer group"
    meta["programs"] = {"by_classes": _by_classes[0], "on_hosts": _by_classes[1]}
    if _unproven[0]:
        meta["unproven_programs"] = _unproven[0]
    if (splits == "fastest" or bounded or _unproven[0]) and lower is not None:
        # each replica laid out for its own speed, or large programs charged an upper bound on the sync: a
        # plan of the space is faster by at most this (0: the plan is optimal over every split too)
        meta["gap_bound_s"] = max(0.0, value - lower)
    return _finish(result, cfg, cluster, wl, meta)


def _combine(cands, sym, cfg, cluster, wl, objective, budget, constraints, exact: bool = True):
    """Best ``(value, {column: copies}, columns, lower)`` over every ``(M, n)`` program, taken in the order of
    their lower bounds until none can beat the best value found; ``lower`` (throughput) bounds the step of
    any plan of the candidates' footprints and orders under every layer split from below.

    ``exact=False`` (throughput): only the small programs over each share's fastest candidates, a plan
    good enough to bound what longer pipelines must beat."""
    B = wl.global_batch
    # every replica holds the whole training state at least once
    room = sum(cost.usable_memory_bytes(h.device) * h.count for h in cluster.hosts)
    n_max = max(1, int(room // state_bytes(cfg, wl)))
    unit_bytes = train_cost.grad_bytes_per_layer(cfg, wl)
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
                t_lb = min(big) + _sync_bound(pool, cluster, n, unit_bytes)
                lb = t_lb if objective == "throughput" else n * min_price * t_lb
                jobs.append((lb, M, n, pool, min(big)))
    jobs.sort(key=lambda j: (j[0], j[1], j[2]))
    # what any plan must take at least (throughput): its slowest replica's pipeline is no faster than the
    # fastest candidate of its (M, b), whatever its layer split, and its sync no cheaper than the cluster allows
    lower = min((t + _sync_bound_any_cluster(cluster, n, unit_bytes) for _, _, n, _, t in jobs),
                default=INF) if objective == "throughput" else None
    best = None
    own_cache: dict = {}
    if objective == "throughput":
        # a first value to cut with, from small programs: per share, the few fastest candidates
        for lb, M, n, pool, _ in jobs:
            if best is not None and lb >= best[0]:
                break
            few = _warm_pool(pool, sym, cluster, n, unit_bytes, WARM_CANDIDATES, own_cache)
            for chosen in _programs(few, sym, cfg, cluster, wl, n, B, unit_bytes, budget, objective,
                                    incumbent=None if best is None else best[0]):
                value = _value(chosen, few, cfg, cluster, wl, objective)[0]
                if best is None or value < best[0] * (1 - 1e-12):
                    best = (value, chosen, few)
        if not exact:
            return None if best is None else best + (lower, _bounded[0] > 0)
    for lb, M, n, pool, _ in jobs:
        if best is not None and lb >= best[0]:
            break
        floor = n * min(c.price for c in pool)
        # columns that cannot help: a replica slower than the best value (throughput; for cost, slower than
        # what the cheapest n copies could afford), or taking more rows than the other n - 1 leave
        cut = INF if best is None else (best[0] if objective == "throughput" else best[0] / floor)
        pool = [c for c in pool if c.step_s < cut and c.rows <= B - (n - 1) * M]
        if not pool:
            continue
        if best is not None and objective == "throughput" and n > 1:     # the bound again, on what is left
            # any n copies of the pool sync at least `sync`: a column slower than the best value less that is
            # in no better plan, and fewer columns can only raise the bound
            while pool:
                sync = _sync_bound(pool, cluster, n, unit_bytes)
                own = _column_sync_bounds(pool, cluster, n, unit_bytes)
                left = [c for c, s in zip(pool, own) if c.step_s + max(sync, s) < best[0]]
                if len(left) == len(pool):
                    break
                pool = left
            share = -(-B // (M * n))
            big = [c.step_s for c in pool if c.rows >= M * share]
            if not big or min(big) + sync >= best[0]:
                continue
            # the slowest replica of n copies packed on the classes' devices (no sync): a bound on the step
            # plus the sync: at least the pool's floor, and at least each chosen column's own floor (the least
            # group around the hosts where it keeps its units), the candidate's least over its columns
            floors: dict = {}
            for c, s in zip(pool, own):
                floors[c.cand] = min(floors.get(c.cand, INF), float(s))
            packed = _solve_classes(pool, sym, cluster, n, B, unit_bytes, budget, None, None, "time", sync=False,
                                    floors=(sync, floors))
            if packed is None or (packed != "unknown" and packed[1] >= best[0]):
                continue

        def hopeless(step, best=best):
            # the frontier's later points are slower: they cost at least the cheapest n copies for that long
            return best is not None and floor * step >= best[0]

        for chosen in _programs(pool, sym, cfg, cluster, wl, n, B, unit_bytes, budget, objective, hopeless,
                                None if best is None or objective != "throughput" else best[0]):
            value, _, price = _value(chosen, pool, cfg, cluster, wl, objective)
            if budget is not None and price > budget * (1 + 1e-9):      # beyond the solver's tolerance
                continue
            if best is None or value < best[0] * (1 - 1e-12):
                best = (value, chosen, pool)
    return None if best is None else best + (lower, _bounded[0] > 0)


WARM_CANDIDATES = 3
"""Candidates per share in the small programs that give the exact ones a first value to beat."""


def _warm_pool(cols: list[_Column], sym: Symmetry, cluster, n: int, unit_bytes: list[float], k: int,
               cache: dict) -> list[_Column]:
    """The columns of the ``k`` fastest candidates of every share and of the ``k`` whose ``n`` copies alone
    would take least with their sync (:func:`_own_sync_s`): where slow links between zones dominate, the
    best plan's replicas are seldom the fastest ones. Only a first value to cut with: any choice is sound."""
    if n <= 1:
        return _fastest_per_share(cols, k)
    steps: dict = defaultdict(dict)
    own: dict = {}
    for c in cols:
        if c.cand not in own:
            own[c.cand] = c.step_s + _own_sync_s(c, sym, cluster, n, unit_bytes, cache)
            steps[c.rows][c.cand] = c.step_s
    keep = set()
    for got in steps.values():
        keep.update(sorted(got, key=lambda x: (got[x], x))[:k])
        keep.update(sorted(got, key=lambda x: (own[x], x))[:k])
    return [c for c in cols if c.cand in keep]


def _own_sync_s(col: _Column, sym: Symmetry, cluster, n: int, unit_bytes: list[float], cache: dict) -> float:
    """The least sync of ``n`` copies of one candidate: every unit's group among the hosts of the class that
    keeps it, each host with room for as many members as the stage's devices allow (``cache``: per class,
    stage devices, bytes and ``n``)."""
    total = 0.0
    for h, w, nbytes in zip(col.units, col.widths, unit_bytes):
        k = sym.class_of[h]
        key = (k, w, nbytes, n)
        got = cache.get(key)
        if got is None:
            caps = {g: cluster.hosts[g].count // w for g in sym.classes[k].hosts}
            got = cache[key] = _least_group_s(cluster, caps, nbytes, n)
        total += got
    return total


def _fastest_per_share(cols: list[_Column], k: int) -> list[_Column]:
    """The columns of the ``k`` fastest candidates of every share (rows)."""
    steps: dict = defaultdict(dict)
    for c in cols:
        steps[c.rows][c.cand] = c.step_s
    keep = {cand for got in steps.values() for cand in sorted(got, key=lambda x: (got[x], x))[:k]}
    return [c for c in cols if c.cand in keep]


def _programs(cols, sym, cfg, cluster, wl, n, B, unit_bytes, budget, objective, hopeless=lambda t: False,
              incumbent: float | None = None):
    """Solutions worth valuing: the least-step one (throughput; only one faster than ``incumbent``), or the
    (step, price) frontier (cost)."""
    if n == 1:      # one replica takes the whole batch: the best single column
        ok = [j for j, c in enumerate(cols) if c.rows == B and (budget is None or c.price <= budget * (1 + 1e-9))]
        if ok:
            key = (lambda j: cols[j].step_s) if objective == "throughput" else (lambda j: cols[j].price * cols[j].step_s)
            yield {min(ok, key=key): 1}
        return
    if objective == "throughput":
        got = _solve(cols, sym, cluster, n, B, unit_bytes, budget, None, incumbent, "time")
        if got is not None:
            yield got
        return
    cap = last = None
    while True:
        got = _solve(cols, sym, cluster, n, B, unit_bytes, budget, cap, None, "time")
        if got is None:
            return
        step = _step(got, cols, cfg, cluster, wl)
        if hopeless(step):
            return
        cheap = _solve(cols, sym, cluster, n, B, unit_bytes, budget, cap, step * (1 + 1e-9), "price")
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


def max_replicas(cfg, cluster, wl: TrainWorkload) -> int:
    """The most replicas the cluster's usable memory holds (each holds the whole training state)."""
    room = sum(cost.usable_memory_bytes(h.device) * h.count for h in cluster.hosts)
    return max(1, int(room // state_bytes(cfg, wl)))


def most_rows(cands: list[TrainChoice], cfg, cluster, wl: TrainWorkload) -> int:
    """At most this many sequences per step over replicas that fit: the largest share of any candidate
    (``M b``) times the most replicas the cluster's memory holds."""
    return max((c.microbatches * c.microbatch for c in cands), default=0) * max_replicas(cfg, cluster, wl)


def infeasible_message(cfg, cluster, wl: TrainWorkload, max_stages: int, budget: float | None,
                       cands=None) -> str:
    state = state_bytes(cfg, wl)
    pb, gb, ob = train_cost.state_bytes_per_param(wl)
    hosts = sorted((cost.usable_memory_bytes(h.device) * h.count for h in cluster.hosts), reverse=True)
    reach = sum(hosts[:max_stages])
    if cands and budget is not None:
        return (f"no training plan of {cfg.name} on {cluster.name} costs at most ${budget:g}/h; raise "
                "--budget-per-hour or use cheaper devices")
    rows = most_rows(cands, cfg, cluster, wl) if cands else 0
    if cands and rows < wl.global_batch:
        # memory, not divisibility: the replicas that fit take too few sequences between them
        top = max(cands, key=lambda c: c.microbatches * c.microbatch)
        n = max_replicas(cfg, cluster, wl)
        return (f"no training plan of {cfg.name} on {cluster.name} takes the global batch of {wl.global_batch}: "
                f"pipelines of at most {max_stages} stages that fit take at most "
                f"{top.microbatches * top.microbatch} sequences per step each (M = {top.microbatches} microbatches of "
                f"{top.microbatch}; stage s of S stashes min(S - s, M) of them: larger shares do not fit), "
                f"and the cluster's usable memory holds at most {n} cop{'y' if n == 1 else 'ies'} of the "
                f"{format_bytes(state)} training state: {rows} of {wl.global_batch} sequences per step at most. Use "
                "a larger --max-stages, " + ("--remat full, " if wl.remat == "none" else "") +
                "a shorter --seq-len, a smaller --global-batch, or more devices")
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
