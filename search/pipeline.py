"""Exact dynamic program for the best pipeline on a given set of host slices.

A *footprint* is a multiset of pieces ``(host class, devices)``: the replica
takes that many devices from one host of that class per piece, each piece on
a different host, one stage per piece. For a footprint the program chooses
the order of the pieces, each stage's ``(dp, tp)`` shape with
``dp * tp`` equal to the piece's devices, the layer split and the
microbatching, minimising the replica's batch cycle
``C = max(Σ W, mb * max W)`` (see :mod:`hexjax.search.cost`). For each
microbatching and each order it runs a DP over the layers placed so far,
vectorised over layer counts and over all orders at once::

    D_1[a] = W_1(a)
    D_j[a'] = min over a < a' of  D_{j-1}[a] ⊕ W_j(a' - a)

with ``⊕`` = ``+`` when there is one microbatch (``C = Σ W``), ``max``
when there are as many microbatches as stages (``C = P * max W``), and a
Pareto set of ``(Σ, max)`` pairs in between. ``W_j(l)`` is already the
minimum over the shapes of the stage's work, including the hop into it
(which depends only on the previous piece's host class) and, for the last
stage, the token sent back to the first. Since every term of a stage
depends only on its own piece, shape, layer count, position flags and
neighbours, the program is exact for the footprint.

``lower_bound`` gives a value no pipeline on a footprint can beat (cheapest
per-layer work of each piece, filled greedily within each piece's memory,
plus the latency of the hops every decode step must cross); the search uses
it to skip footprints that a smaller footprint already beats.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from hexjax.search import cost
from hexjax.search.space import Symmetry, shapes

INF = math.inf


@dataclasses.dataclass(frozen=True)
class PipelineChoice:
    """The best replica for one footprint."""

    cycle_s: float
    """Batch cycle time C (the replica's end-to-end latency)."""
    pieces: tuple[tuple[int, int], ...]
    """``(class, devices)`` per stage, in pipeline order."""
    layer_counts: tuple[int, ...]
    """Layers per stage."""
    meshes: tuple[tuple[int, int], ...]
    """``(dp, tp)`` per stage."""
    microbatches: int = 1
    """How many microbatches the batch is split into."""

    @property
    def footprint(self) -> tuple[tuple[int, int], ...]:
        return tuple(sorted(self.pieces))


class PipelineSearch:
    """Best pipeline per footprint, with the per-stage vectors cached across footprints."""

    def __init__(self, cfg, cluster, sym: Symmetry, workload, dtype_bytes: int = 2):
        self.cfg, self.cluster, self.sym, self.wl, self.e = cfg, cluster, sym, workload, dtype_bytes
        self.L = cfg.num_layers
        self.layers = np.arange(self.L + 1)
        self._stage: dict = {}
        self._busy: dict = {}
        self._last_bounds: tuple = (None, {})
        self.evaluated = 0

    # ---- per-stage vectors ----

    def stage_vectors(self, cls: int, devices: int, mb: int, b: int, first: bool, last: bool):
        """``[(dp, tp, prefill[l], decode[l])]`` for l = 0..L (inf where it does not fit)."""
        key = (cls, devices, mb, b, first, last)
        if key not in self._stage:
            host = self.cluster.hosts[self.sym.classes[cls].hosts[0]]
            out = []
            for dp, tp in shapes(self.cfg, devices):
                c = cost.stage_cost(self.cfg, host.device, host.intra_bandwidth_Bps, host.intra_latency_s,
                                    self.layers, dp, tp, first, last, mb, b, self.wl, self.e)
                bad = (c.weight_bytes + c.kv_bytes + c.activation_bytes > c.capacity_bytes) | (self.layers == 0)
                pre = np.where(bad, INF, c.prefill_s)
                dec = np.where(bad, INF, c.decode_s)
                out.append((dp, tp, pre, dec))
            self._stage[key] = out
        return self._stage[key]

    def busy_vector(self, cls: int, devices: int, mb: int, b: int, first: bool, last: bool,
                    prev: int | None, ret: int | None):
        """``(W[l], shape index[l])``: the stage's work with its hops, minimised over shapes."""
        key = (cls, devices, mb, b, first, last, prev, ret)
        if key not in self._busy:
            n = self.wl.output_len
            pre_b, dec_b, tok_b = cost.hop_bytes(self.cfg, self.wl, b, self.e)
            best, arg = None, None
            for k, (_, _, pre, dec) in enumerate(self.stage_vectors(cls, devices, mb, b, first, last)):
                if prev is not None:
                    bw, lat = self.sym.link[(prev, cls)]
                    pre = cost.hop_s(pre_b, bw, lat) + pre
                    dec = cost.hop_s(dec_b, bw, lat) + dec
                if ret is not None:
                    bw, lat = self.sym.link[(cls, ret)]
                    dec = dec + cost.hop_s(tok_b, bw, lat)
                w = pre if n == 1 else pre + (n - 1) * dec
                if best is None:
                    best, arg = w, np.zeros(len(w), dtype=np.int64)
                else:
                    better = w < best
                    best = np.where(better, w, best)
                    arg = np.where(better, k, arg)
            self._busy[key] = (best, arg)
        return self._busy[key]

    # ---- a lower bound, to skip footprints that a smaller one already beats ----

    def piece_bound(self, cls: int, devices: int, mb: int, b: int) -> tuple[float, int]:
        """``(a, cap)``: a middle stage on the piece works at least ``a`` per layer and holds at most ``cap`` layers."""
        key = ("bound", cls, devices, mb, b)
        if key not in self._busy:
            n = self.wl.output_len
            a, cap = INF, 0
            ls = self.layers[1:]
            for _, _, pre, dec in self.stage_vectors(cls, devices, mb, b, False, False):
                w = (pre if n == 1 else pre + (n - 1) * dec)[1:]
                ok = w < INF
                if ok.any():
                    a = min(a, float((w[ok] / ls[ok]).min()))
                    cap = max(cap, int(ls[ok].max()))
            self._busy[key] = (a, cap)
        return self._busy[key]

    def lower_bound(self, footprint) -> float:
        """A value no pipeline on ``footprint`` can beat (ignores memory of first/last stages, hops' bytes)."""
        return min(self.option_bounds(footprint).values(), default=INF)

    def option_bounds(self, footprint) -> dict:
        """``{(microbatches, size): bound}`` for each microbatching option that can fit."""
        if self._last_bounds[0] != footprint:     # the search asks for the same footprint twice in a row
            self._last_bounds = (footprint, self._option_bounds(footprint))
        return self._last_bounds[1]

    def _option_bounds(self, footprint) -> dict:
        P, L, n = len(footprint), self.L, self.wl.output_len
        lat = 0.0
        if P > 1:
            lat = min(self.sym.link[(footprint[i][0], footprint[j][0])][1]
                      for i in range(P) for j in range(P) if i != j)
        out = {}
        for mb, b in cost.microbatch_options(self.wl.batch, P):
            bounds = [self.piece_bound(cls, u, mb, b) for cls, u in footprint]
            if any(cap == 0 for _, cap in bounds) or sum(cap for _, cap in bounds) < L:
                continue
            # cheapest fill: every piece at least one layer, the rest on the cheapest per-layer pieces
            fill = sum(a for a, _ in bounds)
            left = L - P
            for a, cap in sorted(bounds):
                take = min(cap - 1, left)
                fill += take * a
                left -= take
            total = fill + (n - 1) * P * lat
            if mb > 1:
                # the busiest stage does at least tau, where sum_s min(cap_s, tau / a_s) = L; the last stage
                # also receives its input and returns the token on every decode step
                tau = _balanced_tau(bounds, L)
                total = max(total, mb * max(tau, 2 * (n - 1) * lat))
            out[(mb, b)] = total
        return out

    # ---- one footprint ----

    def best(self, footprint: tuple[tuple[int, int], ...], below: float = INF) -> PipelineChoice | None:
        """Best order, shapes, layer split and microbatching for ``footprint``.

        None if nothing fits, or if nothing beats ``below`` (then a smaller
        footprint's pipeline, with cycle ``below``, serves at least as well).
        """
        P = len(footprint)
        if P > self.L:
            return None
        best: PipelineChoice | None = None
        orders = sorted(set(itertools.permutations(footprint)))
        bounds = self.option_bounds(footprint)
        for (mb, b), bound in sorted(bounds.items(), key=lambda t: (t[1], t[0])):
            if bound >= min(below, best.cycle_s if best else INF):
                continue
            mode = "sum" if mb == 1 else ("max" if mb == P else "pareto")
            table = [[self.busy_vector(cls, u, mb, b, j == 0, j == P - 1,
                                       order[j - 1][0] if j > 0 else None,
                                       order[0][0] if (j == P - 1 and P > 1) else None)
                      for j, (cls, u) in enumerate(order)] for order in orders]
            self.evaluated += len(orders)
            if mode == "pareto":
                results = [self._split_pareto(vecs, mb) for vecs in table]
            else:
                results = self._split_orders([np.stack([t[j][0] for t in table]) for j in range(P)], mode, mb)
            for order, vecs, got in zip(orders, table, results):
                if got is None:
                    continue
                value, counts = got
                if best is None or value < best.cycle_s:
                    meshes = []
                    for (cls, u), (_, arg), l in zip(order, vecs, counts):
                        dp, tp, _, _ = self.stage_vectors(cls, u, mb, b, False, False)[int(arg[l])]
                        meshes.append((dp, tp))
                    best = PipelineChoice(value, order, tuple(counts), tuple(meshes), mb)
        return best if best is not None and best.cycle_s < below else None

    def _split_orders(self, V: list[np.ndarray], mode: str, mb: int) -> list:
        """Best split for every order at once: ``V[j]`` holds stage j's ``W`` for each order (rows).

        Returns ``(C, layer counts)`` per order (None where nothing fits).
        """
        L, P, O = self.L, len(V), V[0].shape[0]
        op = np.add if mode == "sum" else np.maximum
        D = V[0]
        args = []
        for j in range(1, P - 1):
            # a stage takes l = 1..cap layers, where cap is the most any order's stage j can hold
            finite = np.nonzero(np.isfinite(V[j]).any(axis=0))[0]
            cap = int(finite.max()) if len(finite) else 1
            # S[o, a', l - 1] = D[o, a' - l] (inf for a' < l): a strided view of the padded rows
            Dp = np.concatenate([np.full((O, cap), INF), D], axis=1)
            S = np.lib.stride_tricks.sliding_window_view(Dp, cap, axis=1)[:, :L + 1, ::-1]
            cand = op(S, V[j][:, None, 1:cap + 1])                  # (orders, a', l - 1)
            take = cand.argmin(axis=2)
            D = np.take_along_axis(cand, take[:, :, None], axis=2)[:, :, 0]
            args.append(np.arange(L + 1)[None, :] - (take + 1))     # where stage j starts
        rows = np.arange(O)
        counts = np.zeros((P, O), dtype=np.int64)
        if P == 1:
            counts[0] = L
        else:
            tail = op(D[:, :L], V[P - 1][:, L - np.arange(L)])      # (orders, a)
            a = tail.argmin(axis=1)
            counts[P - 1] = L - a
            for j in range(P - 2, 0, -1):
                prev = args[j - 1][rows, a]
                counts[j] = a - prev
                a = prev
            counts[0] = a
        busy = [V[j][rows, counts[j]] for j in range(P)]
        total = busy[0]
        top = busy[0]
        for j in range(1, P):
            total = total + busy[j]
            top = np.maximum(top, busy[j])
        value = np.maximum(total, mb * top)
        return [(float(value[o]), [int(c) for c in counts[:, o]]) if value[o] < INF else None for o in range(O)]

    def _split_pareto(self, vecs, mb: int):
        """Exact split when ``1 < mb < P``: Pareto sets of (Σ W, max W) per layers placed."""
        L, P = self.L, len(vecs)
        W0 = vecs[0][0]
        F = [[[(float(W0[a]), float(W0[a]), None)] if W0[a] < INF else [] for a in range(L + 1)]]
        for j in range(1, P):
            W = vecs[j][0]
            new = [[] for _ in range(L + 1)]
            for a2 in (range(L, L + 1) if j == P - 1 else range(L + 1)):
                cands = []
                for a in range(a2):
                    w = float(W[a2 - a])
                    if w == INF:
                        continue
                    for k, (s, m, _) in enumerate(F[j - 1][a]):
                        cands.append((s + w, max(m, w), (a, k)))
                new[a2] = _pareto(cands)
            F.append(new)
        if not F[-1][L]:
            return None
        k = min(range(len(F[-1][L])), key=lambda i: max(F[-1][L][i][0], mb * F[-1][L][i][1]))
        counts, a = [], L
        for j in range(P - 1, 0, -1):
            prev_a, prev_k = F[j][a][k][2]
            counts.append(a - prev_a)
            a, k = prev_a, prev_k
        counts.append(a)
        counts.reverse()
        busy = [float(v[0][l]) for v, l in zip(vecs, counts)]
        return cost.cycle_s(busy, mb), counts


def _balanced_tau(bounds: list[tuple[float, int]], L: int) -> float:
    """Least ``tau`` with ``sum_s min(cap_s, tau / a_s) >= L`` (pieces of per-layer work ``a_s``, ``cap_s`` layers)."""
    # piecewise linear in tau: pieces drop out (saturate) at tau = a_s * cap_s
    live = sorted(bounds, key=lambda t: t[0] * t[1])
    saturated = 0.0
    inv = sum(1.0 / a for a, _ in live)
    for a, cap in live:
        edge = a * cap
        if saturated + edge * inv >= L:
            return (L - saturated) / inv
        saturated += cap
        inv -= 1.0 / a
    return live[-1][0] * live[-1][1]


def _pareto(cands):
    """Non-dominated (sum, max, back) triples, ascending sum."""
    cands.sort(key=lambda t: (t[0], t[1]))
    out = []
    best_max = INF
    for c in cands:
        if c[1] < best_max:
            out.append(c)
            best_max = c[1]
    return out
