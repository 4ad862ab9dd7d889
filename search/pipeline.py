"""Exact search for the best pipeline on a given set of host slices.

A *footprint* is a multiset of pieces ``(host class, devices)``: the replica
takes that many devices from one host of that class per piece, each piece on
a different host, one stage per piece. For a footprint the search chooses
the order of the pieces, each stage's ``(dp, tp)`` shape with
``dp * tp`` equal to the piece's devices, the layer split and the
microbatching, minimising the replica's latency (see
:mod:`hexjax.search.cost`)::

    F = Σ p + (mb - 1) max p + (n - 1) max(Σ d, mb max d)

where ``p_j`` and ``d_j`` are stage ``j``'s prefill and decode step per
microbatch, hops included (the hop into the stage depends only on the
previous piece's host class; the last stage also sends the token back to
the first). Every term of a stage depends only on its own piece, shape,
layer count, position flags and neighbours.

- One microbatch: ``F = Σ W`` with ``W = p + (n - 1) d``, additive; each
  stage takes the shape of least ``W`` and a DP over the layers placed so
  far, vectorised over layer counts and over all orders at once, is exact::

      D_1[a] = W_1(a);   D_j[a'] = min over a < a' of  D_{j-1}[a] + W_j(a' - a)

- Several microbatches: ``F`` has two maxima over the stages (of ``p`` and
  of ``d``), so the split and the shapes are searched together by branch
  and bound. Since ``F >= Σ p + max_j V_j`` with
  ``V = (mb - 1) p + (n - 1) mb d`` (and ``F >= Σ W``), each order gets the
  lower bound ``min Σ p + min max V`` (two exact DPs on each stage's least
  values; with ``min Σ W`` too when ``mb < P``), and ``F`` at those DPs'
  splits, with each stage's least-``W`` shape, as incumbents. Orders whose
  bound does not beat the best value so far are skipped; the others are
  branched stage by stage over (layer count, shape), a partial pipeline
  being dropped as soon as its value plus the least the remaining stages
  can add (exact DPs over them of ``Σ p``, ``Σ d`` and ``Σ W``, and of
  their largest ``p`` and ``d``, each on the layers left) reaches the best
  value so far. Each of these is a least value over every completion, so
  nothing that could beat the best is dropped: the result is exact.

``lower_bound`` gives a value no pipeline on a footprint can beat (cheapest
per-layer work, prefill and decode step of each piece, filled greedily
within each piece's memory, plus the least latency of a path through the
pieces' hosts for a prefill and of a cycle for every decode step); the
search uses it to skip footprints that a smaller footprint already beats.
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
    """The replica's latency ``F`` (the end-to-end latency of a batch's last request; batches are served
    one after another, so also the time per batch)."""
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

    @property
    def latency_s(self) -> float:
        return self.cycle_s


@dataclasses.dataclass(frozen=True)
class Position:
    """One piece at one place of an order: its per-shape times with hops, for l = 0..L layers."""

    meshes: tuple[tuple[int, int], ...]
    """``(dp, tp)`` per shape."""
    pre: np.ndarray
    """``[shape, l]`` prefill of one microbatch (inf where it does not fit, and at l = 0)."""
    dec: np.ndarray
    """``[shape, l]`` decode step of one microbatch."""
    busy: np.ndarray
    """``[l]`` least work ``W = p + (n - 1) d`` over the shapes."""
    arg: np.ndarray
    """``[l]`` the shape giving ``busy``."""
    pmin: np.ndarray
    """``[l]`` least prefill over the shapes."""
    dmin: np.ndarray
    """``[l]`` least decode step over the shapes."""
    opt_l: np.ndarray
    """Layer counts of the ``(layers, shape)`` options that fit."""
    opt_s: np.ndarray
    """Their shapes."""
    opt_p: np.ndarray
    """Their prefills."""
    opt_d: np.ndarray
    """Their decode steps."""
    extra: dict
    """Cached derived vectors."""

    def vmin(self, mb: int, n: int) -> np.ndarray:
        """``[l]`` least ``(mb - 1) p + (n - 1) mb d`` over the shapes."""
        key = ("v", mb, n)
        got = self.extra.get(key)
        if got is None:
            v = (mb - 1) * self.pre if n == 1 else (mb - 1) * self.pre + (n - 1) * mb * self.dec
            got = self.extra[key] = v.min(axis=0)
        return got


class PipelineSearch:
    """Best pipeline per footprint, with the per-stage vectors cached across footprints."""

    def __init__(self, cfg, cluster, sym: Symmetry, workload, dtype_bytes: int = 2):
        self.cfg, self.cluster, self.sym, self.wl, self.e = cfg, cluster, sym, workload, dtype_bytes
        self.L = cfg.num_layers
        self.layers = np.arange(self.L + 1)
        self._stage: dict = {}
        self._pos: dict = {}
        self._busy: dict = {}
        self._rest: dict = {}
        self._memos: dict = {}
        self._last_bounds: tuple = (None, {})
        self.evaluated = 0
        # min-plus convolution helper: out[m] = min over l = 1..m of v[l] + R[m - l]
        m, l = np.meshgrid(self.layers, np.arange(1, self.L + 1), indexing="ij")
        self._mp_rest = np.clip(m - l, 0, None)
        self._mp_ok = m - l >= 0

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

    def position(self, cls: int, devices: int, mb: int, b: int, first: bool, last: bool,
                 prev: int | None, ret: int | None) -> Position:
        """The piece's times at a place of an order: hop from class ``prev`` in, token back to ``ret``."""
        key = (cls, devices, mb, b, first, last, prev, ret)
        if key not in self._pos:
            n = self.wl.output_len
            pre_b, dec_b, tok_b = cost.hop_bytes(self.cfg, self.wl, b, self.e)
            pres, decs, meshes = [], [], []
            for dp, tp, pre, dec in self.stage_vectors(cls, devices, mb, b, first, last):
                if prev is not None:
                    bw, lat = self.sym.link[(prev, cls)]
                    pre = cost.hop_s(pre_b, bw, lat) + pre
                    dec = cost.hop_s(dec_b, bw, lat) + dec
                if ret is not None:
                    bw, lat = self.sym.link[(cls, ret)]
                    dec = dec + cost.hop_s(tok_b, bw, lat)
                pres.append(pre)
                decs.append(dec)
                meshes.append((dp, tp))
            pre, dec = np.stack(pres), np.stack(decs)
            work = pre if n == 1 else pre + (n - 1) * dec
            opt_s, opt_l = np.nonzero(np.isfinite(pre))
            self._pos[key] = Position(tuple(meshes), pre, dec, work.min(axis=0), work.argmin(axis=0),
                                      pre.min(axis=0), dec.min(axis=0), opt_l, opt_s, pre[opt_s, opt_l],
                                      dec[opt_s, opt_l], {})
        return self._pos[key]

    def busy_vector(self, cls: int, devices: int, mb: int, b: int, first: bool, last: bool,
                    prev: int | None, ret: int | None):
        """``(W[l], shape index[l])``: the stage's work with its hops, minimised over shapes."""
        pos = self.position(cls, devices, mb, b, first, last, prev, ret)
        return pos.busy, pos.arg

    # ---- a lower bound, to skip footprints that a smaller one already beats ----

    def piece_bound(self, cls: int, devices: int, mb: int, b: int) -> tuple[float, int, float, float]:
        """``(a, cap, a_p, a_d)``: a middle stage on the piece works at least ``a`` per layer (``W``), prefills
        in at least ``a_p`` and decodes in at least ``a_d`` per layer, and holds at most ``cap`` layers."""
        key = ("bound", cls, devices, mb, b)
        if key not in self._busy:
            n = self.wl.output_len
            a, a_p, a_d, cap = INF, INF, INF, 0
            ls = self.layers[1:]
            for _, _, pre, dec in self.stage_vectors(cls, devices, mb, b, False, False):
                w = (pre if n == 1 else pre + (n - 1) * dec)[1:]
                ok = w < INF
                if ok.any():
                    a = min(a, float((w[ok] / ls[ok]).min()))
                    a_p = min(a_p, float((pre[1:][ok] / ls[ok]).min()))
                    a_d = min(a_d, float((dec[1:][ok] / ls[ok]).min()))
                    cap = max(cap, int(ls[ok].max()))
            self._busy[key] = (a, cap, a_p, a_d)
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
        lat, path, cycle = self._hop_latencies(tuple(cls for cls, _ in footprint))
        out = {}
        for mb, b in cost.microbatch_options(self.wl.batch, P):
            bounds = [self.piece_bound(cls, u, mb, b) for cls, u in footprint]
            caps = [t[1] for t in bounds]
            if 0 in caps or sum(caps) < L:
                continue
            # F >= Σ W: the prefill crosses the hops of a path through the pieces, every decode step a cycle
            work = [t[:2] for t in bounds]
            total = _fill(work, L) + path + (n - 1) * cycle
            if mb > 1:
                # F >= mb max W: the busiest stage does at least tau, where sum_s min(cap_s, tau / a_s) = L;
                # the last stage also receives its input and returns the token on every decode step
                total = max(total, mb * max(_balanced_tau(work, L), 2 * (n - 1) * lat))
                # F = TTFT + (n - 1) TPOT, each bounded the same way on prefills and decode steps alone
                pre = [(t[2], t[1]) for t in bounds]
                ttft = _fill(pre, L) + path + (mb - 1) * _balanced_tau(pre, L)
                if n > 1:
                    dec = [(t[3], t[1]) for t in bounds]
                    tpot = max(_fill(dec, L) + cycle, mb * max(_balanced_tau(dec, L), 2 * lat))
                    ttft += (n - 1) * tpot
                total = max(total, ttft)
            out[(mb, b)] = total
        return out

    def _hop_latencies(self, classes: tuple[int, ...]) -> tuple[float, float, float]:
        """``(least link latency, least path, least cycle)`` between the pieces' hosts: a prefill crosses a
        path through every piece, a decode step (with the token sent back) a cycle."""
        key = ("hops", tuple(sorted(classes)))
        if key not in self._busy:
            P = len(classes)
            if P == 1:
                self._busy[key] = (0.0, 0.0, 0.0)
            else:
                link = self.sym.link
                lat = min(link[(classes[i], classes[j])][1] for i in range(P) for j in range(P) if i != j)
                path = cycle = INF
                for order in set(itertools.permutations(classes)):
                    hops = sum(link[(order[j - 1], order[j])][1] for j in range(1, P))
                    path = min(path, hops)
                    cycle = min(cycle, hops + link[(order[-1], order[0])][1])
                self._busy[key] = (lat, path, cycle)
        return self._busy[key]

    # ---- one footprint ----

    def best(self, footprint: tuple[tuple[int, int], ...], below: float = INF) -> PipelineChoice | None:
        """Best order, shapes, layer split and microbatching for ``footprint``.

        None if nothing fits, or if nothing beats ``below`` (then a smaller
        footprint's pipeline, with latency ``below``, serves at least as well).
        """
        P = len(footprint)
        if P > self.L:
            return None
        best: PipelineChoice | None = None
        orders = sorted(set(itertools.permutations(footprint)))
        bounds = self.option_bounds(footprint)
        for (mb, b), bound in sorted(bounds.items(), key=lambda t: (t[1], t[0])):
            limit = min(below, best.cycle_s if best else INF)
            if bound >= limit:
                continue
            table = [[self.position(cls, u, mb, b, j == 0, j == P - 1,
                                    order[j - 1][0] if j > 0 else None,
                                    order[0][0] if (j == P - 1 and P > 1) else None)
                      for j, (cls, u) in enumerate(order)] for order in orders]
            self.evaluated += len(orders)
            W = [np.stack([t[j].busy for t in table]) for j in range(P)]
            if mb == 1:
                total, _, counts = self._split_orders(W, "sum")
                for o in range(len(orders)):
                    if total[o] < limit:
                        shapes_ = [int(table[o][j].arg[counts[j, o]]) for j in range(P)]
                        limit = float(total[o])
                        best = self._choice(limit, orders[o], table[o], counts[:, o], shapes_, mb)
            else:
                got = self._best_microbatched(table, W, mb, limit, bound)
                if got is not None:
                    value, o, counts, shapes_ = got
                    best = self._choice(value, orders[o], table[o], counts, shapes_, mb)
        return best if best is not None and best.cycle_s < below else None

    @staticmethod
    def _choice(value, order, vecs, counts, shape_idx, mb) -> PipelineChoice:
        meshes = tuple(vecs[j].meshes[s] for j, s in enumerate(shape_idx))
        return PipelineChoice(float(value), tuple(order), tuple(int(c) for c in counts), meshes, mb)

    def _split_orders(self, V: list[np.ndarray], mode: str):
        """Best split for every order at once: ``V[j]`` holds stage j's ``W`` for each order (rows).

        ``mode`` "sum" minimises ``Σ W``, "max" minimises ``max W``. Returns ``(Σ W, max W, counts)`` of
        each order's best split (``counts[j, o]`` layers of stage j; inf where nothing fits).
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
        total, top = busy[0], busy[0]
        for j in range(1, P):
            total = total + busy[j]
            top = np.maximum(top, busy[j])
        return total, top, counts

    def _prefix(self, V: list[np.ndarray], op) -> np.ndarray:
        """``[order, a]``: the least ``Σ`` (``op`` add) or ``max`` (maximum) of ``V[j]`` over the splits of ``a``
        layers among the stages of ``V``, a layer at least each (inf where none)."""
        L, O = self.L, V[0].shape[0]
        D = V[0]
        for v in V[1:]:
            Dp = np.concatenate([np.full((O, L), INF), D], axis=1)
            S = np.lib.stride_tricks.sliding_window_view(Dp, L, axis=1)[:, :L + 1, ::-1]   # D[a' - l], l = 1..L
            D = op(S, v[:, None, 1:]).min(axis=2)
        return D

    # ---- several microbatches: branch and bound ----

    def _latency_at(self, vecs: list[Position], counts, mb: int) -> tuple[float, list[int]]:
        """``(F, shape indices)`` of one order's split ``counts`` with its least-``W`` shapes."""
        shape_idx = [int(v.arg[c]) for v, c in zip(vecs, counts)]
        pre = [float(v.pre[s, c]) for v, s, c in zip(vecs, shape_idx, counts)]
        dec = [float(v.dec[s, c]) for v, s, c in zip(vecs, shape_idx, counts)]
        if INF in pre or INF in dec:
            return INF, shape_idx
        return cost.replica_times(pre, dec, mb, self.wl.output_len)[2], shape_idx

    def _best_microbatched(self, table, W, mb: int, limit: float, bound: float = 0.0):
        """``(F, order index, counts, shape indices)`` of the least latency below ``limit``, or None.

        Orders go by their lower bound (``min Σ p + min max V``, the footprint's ``bound``, and ``min Σ W``
        when ``mb < P``); each first tries ``F`` at the splits of those DPs (with the least-``W`` shapes),
        then the branch and bound.
        """
        P, n = len(table[0]), self.wl.output_len
        memo = self._memo(W)
        # F >= Σ p + max_k V_k with V = (mb - 1) p + (n - 1) mb d: at least min Σ p + min max V (two DPs)
        if "p" not in memo:
            Vp = [np.stack([t[j].pmin for t in table]) for j in range(P)]
            memo["p"] = Vp, self._split_orders(Vp, "sum")
        Vp, (total_p, _, p_counts) = memo["p"]
        # with one token V = (mb - 1) p: the DP of max p serves every mb (scaling keeps the order of floats)
        key = ("max", 1 if n == 1 else mb)
        if key not in memo:
            V = Vp if n == 1 else [np.stack([t[j].vmin(mb, n) for t in table]) for j in range(P)]
            memo[key] = self._split_orders(V, "max")
        _, top, splits = memo[key]
        if n == 1:
            top = (mb - 1) * top
        lower = np.maximum(total_p + top, bound)
        splits = [splits, p_counts]
        if mb < P and n > 1:    # then a token's chain Σ d may outlast mb max d: F >= Σ W adds a bound and a
            # split (with one token W = p: the Σ p DP's already)
            total, _, s_counts = self._split_orders(W, "sum")
            lower = np.maximum(lower, total)
            splits.append(s_counts)
        if n == 1:      # F at those splits for every order at once: the least-W shape is the least-p one
            if "at" not in memo:
                rows, at = np.arange(len(table)), []
                for counts in splits:
                    ps = [Vp[j][rows, counts[j]] for j in range(P)]
                    total, top = ps[0], ps[0]
                    for x in ps[1:]:    # summed in the order of cost.replica_times, so the same floats
                        total, top = total + x, np.maximum(top, x)
                    at.append((total, top))
                memo["at"] = at
            at = [total + (mb - 1) * top for total, top in memo["at"]]
        best = None
        for o in np.argsort(lower, kind="stable"):
            if lower[o] >= limit:
                break
            for i, counts in enumerate(splits):
                if n == 1:
                    F = float(at[i][o])
                    if not F < limit:
                        continue
                F, shape_idx = self._latency_at(table[o], counts[:, o], mb)
                if F < limit:
                    limit = F
                    best = (F, int(o), [int(c) for c in counts[:, o]], shape_idx)
            if lower[o] >= limit:
                continue
            got = self._branch(table[o], mb, limit)
            if got is not None:
                limit = got[0]
                best = (got[0], int(o), got[1], got[2])
        return best

    def _memo(self, W: list[np.ndarray]) -> dict:
        """What the orders' DPs give at every ``mb``, for a table the caller asks about again (by identity of
        ``W``; the entries hold ``W`` so that its id is not reused while they live)."""
        got = self._memos.get(id(W[0]))
        if got is None or got[0] is not W[0]:
            if len(self._memos) >= 64:
                self._memos.clear()
            got = self._memos[id(W[0])] = (W[0], {})
        return got[1]

    def _minplus(self, v: np.ndarray, R: np.ndarray, op=np.add) -> np.ndarray:
        """``out[m] = min over l = 1..m of op(v[l], R[m - l])``."""
        cand = np.where(self._mp_ok, op(v[None, 1:], R[self._mp_rest]), INF)
        return cand.min(axis=1)

    def _rest_bounds(self, vecs: list[Position]):
        """Per place j: what stages j.. add at least when they hold m layers between them (``Σ p``, ``Σ d``,
        ``Σ W`` as exact DPs over each stage's least values), and the least their largest ``p`` and ``d`` can
        be (exact DPs of ``max`` over the same least values)."""
        P = len(vecs)
        key = tuple(id(v) for v in vecs[1:])     # positions are cached, so their ids are stable
        got = self._rest.get(key)
        if got is None:
            none = np.full(self.L + 1, INF)
            none[0] = 0.0
            rows = [self._suffix(tuple(vecs[j:])) for j in range(1, P)] + [(none,) * 5]
            got = self._rest[key] = tuple([None] + [r[i] for r in rows] for i in range(5))
        return got

    def _suffix(self, vecs: tuple) -> tuple:
        """``(Σ p, Σ d, Σ W, max p, max d)`` least over the splits of m layers among the stages ``vecs`` (the
        last of the order among them), for m = 0..L; cached per suffix, as orders share them."""
        key = ("suffix",) + tuple(id(v) for v in vecs)
        got = self._rest.get(key)
        if got is None:
            v = vecs[0]
            tokens = self.wl.output_len > 1     # with one token only Σ p and max p bound anything
            if len(vecs) == 1:      # the last stage holds exactly what is left
                Rp = np.where(self.layers > 0, v.pmin, INF)
                got = (Rp, None, None, Rp, None)
                if tokens:
                    Rd = np.where(self.layers > 0, v.dmin, INF)
                    got = (Rp, Rd, np.where(self.layers > 0, v.busy, INF), Rp, Rd)
            else:
                Rp, Rd, Rw, Mp, Md = self._suffix(vecs[1:])
                got = (self._minplus(v.pmin, Rp), None, None, self._minplus(v.pmin, Mp, np.maximum), None)
                if tokens:
                    got = (got[0], self._minplus(v.dmin, Rd), self._minplus(v.busy, Rw), got[3],
                           self._minplus(v.dmin, Md, np.maximum))
            self._rest[key] = got
        return got

    def _branch(self, vecs: list[Position], mb: int, limit: float):
        """Exact least ``F`` of one order below ``limit``: ``(F, counts, shape indices)``, or None.

        Breadth first over the stages; a partial pipeline is a state ``(layers placed, Σ p, Σ d, max p,
        max d)`` and is kept only while its bound (it plus the least the later stages add) is below the
        best value so far. After the last stage the bound is ``F`` itself.
        """
        L, P, n = self.L, len(vecs), self.wl.output_len
        alpha, beta = mb - 1, n - 1
        Rp, Rd, Rw, Mp, Md = self._rest_bounds(vecs)
        a = np.zeros(1, dtype=np.int64)
        sp, sd, A, D = (np.zeros(1) for _ in range(4))
        steps = []      # per earlier stage: (parent state, option) of each kept state
        for j, v in enumerate(vecs[:-1]):
            q = j + 1
            # any (layers, shape) that fits and leaves a layer for each later stage
            si, oi = np.nonzero(a[:, None] + v.opt_l[None, :] <= L - (P - q))
            na, p = a[si] + v.opt_l[oi], v.opt_p[oi]
            nsp, nA = sp[si] + p, np.maximum(A[si], p)
            m = L - na
            # the final max p is at least the placed stages' and the least the later ones' can be on m layers
            AA = np.maximum(nA, Mp[q][m])
            bound = nsp + Rp[q][m] + alpha * AA
            if beta:
                d = v.opt_d[oi]
                nsd, nD = sd[si] + d, np.maximum(D[si], d)
                with np.errstate(invalid="ignore"):
                    bound = np.maximum(bound + beta * np.maximum(nsd + Rd[q][m], mb * np.maximum(nD, Md[q][m])),
                                       nsp + beta * nsd + Rw[q][m] + alpha * AA)
            k = np.nonzero(bound < limit)[0]
            if not len(k):
                return None
            a, sp, A = na[k], nsp[k], nA[k]
            if beta:
                sd, D = nsd[k], nD[k]
            steps.append((si[k], oi[k]))
        # the last stage takes what is left, in any shape: F itself, [state, shape] flattened
        v = vecs[-1]
        S = len(v.meshes)
        p = v.pre[:, L - a].T
        nsp, AA = sp[:, None] + p, np.maximum(A[:, None], p)
        F = nsp + alpha * AA
        if beta:        # as the bound above with nothing left (the same sums, so the same floats)
            d = v.dec[:, L - a].T
            nsd = sd[:, None] + d
            with np.errstate(invalid="ignore"):
                F = np.maximum(F + beta * np.maximum(nsd, mb * np.maximum(D[:, None], d)),
                               nsp + beta * nsd + alpha * AA)
        F = F.ravel()
        i = int(np.argmin(F))
        value = float(F[i])
        if not value < limit:
            return None
        counts, idx = [0] * P, [0] * P
        i, idx[-1] = divmod(i, S)
        counts[-1] = L - int(a[i])
        for j in range(P - 2, -1, -1):
            si, oi = steps[j]
            o, i = int(oi[i]), int(si[i])
            counts[j], idx[j] = int(vecs[j].opt_l[o]), int(vecs[j].opt_s[o])
        return value, counts, idx


def _fill(bounds: list[tuple[float, int]], L: int) -> float:
    """Least ``Σ_s a_s l_s`` with ``1 <= l_s <= cap_s`` and ``Σ l_s = L``: a layer each, the rest on the cheapest."""
    total = sum(a for a, _ in bounds)
    left = L - len(bounds)
    for a, cap in sorted(bounds):
        take = min(cap - 1, left)
        total += take * a
        left -= take
    return total


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
