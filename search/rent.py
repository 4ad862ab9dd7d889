"""What to rent: the cheapest devices, and the plan on them, that serve a request mix at a rate within an SLO.

Offers (a TOML file) list device types on sale by zone, with how many are
available, their price and how many share one machine; the network between
zones is given as in cluster files::

    name = "cloud"
    [network]                        # optional, as in cluster files
    cross_zone_bandwidth_GBps = 1.25
    [[network.zone_link]]            # optional: the link between two zones (every host pair across them)
    a = "us-east"
    b = "eu-west"
    bandwidth_GBps = 0.125
    latency_us = 40000
    [[offer]]
    device = "A100-80G"              # catalogue name or a [device.NAME] below (profiles = [...] too)
    zone = "us-east"                 # optional, default "default"
    available = 8                    # devices on offer
    per_host = 8                     # devices per machine (share its fast links); default: all of them
    price_per_hour = 1.79            # optional: the offer's price per device (default: the device's)

The offers become one cluster (:func:`offers_cluster`): each offer gives
``ceil(available / per_host)`` hosts. Renting is paying for the devices a
plan uses, so the cheapest rental is the cheapest plan on that cluster. A
request mix is a list of :class:`Bucket` (prompt length, output length,
share of the requests); each replica serves one bucket (requests are routed
by size) at one batch size from ``batches``. The integer program

    minimise  Σ price_c x_ca
    s.t.      Σ_{c,a} devices_{c,a,h} x_ca <= count_h              for every host h
              Σ_{c in bucket b, a} requests/s_c x_ca >= share_b rate   for every bucket b
              x_ca ∈ {0, 1, 2, ...}

over every candidate pipeline ``c`` (the exact per-footprint DP of
:mod:`hexjax.search.planner`, for each bucket and batch, within the SLO) and
assignment ``a`` to hosts is solved to optimality by HiGHS. With
``share=False`` that is the program: exact over the plan space
``S(max_stages)`` with one bucket and batch per replica.

By default (``share=True``) a replica may serve several buckets, as a
Mélange GPU serves slices of several request sizes: its time is divided
among them, so the loads add up. Each candidate is valued on every bucket
(:func:`hexjax.search.cost.predict_replica`: requests/s ``r_jb``, kept where
it fits and meets the SLOs), ``f_jb >= 0`` is bucket ``b``'s requests/s sent
to candidate ``j``'s replicas, and the bucket constraint becomes

    Σ_b f_jb / r_jb <= x_j   for every candidate j,      Σ_j f_jb >= share_b rate   for every bucket b.

Without it every bucket rounds its replicas up on its own, which at low rates
costs a whole replica per bucket (three buckets: at least three replicas).
``tpot_slo_s`` bounds the time per output token, Mélange's SLO; the layouts
are still the DP's best end-to-end ones per footprint, filtered by it.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from hexjax.cluster import Cluster, _describe, _Reader
from hexjax.errors import ConfigError, PlanError
from hexjax.plan import Plan
from hexjax.search import cost
from hexjax.search.packing import assignments, prune_dominated
from hexjax.search.planner import TIE, auto_max_stages, candidates, resolve_model
from hexjax.search.space import DEFAULT_MAX_STAGES, free_devices, host_classes, place_replica
from hexjax.workload import Workload

DEFAULT_BATCHES = (1, 4, 16)
"""Batch sizes a replica may run at when none are given."""


@dataclasses.dataclass(frozen=True)
class Offer:
    """Devices of one type on sale in one zone."""

    device: str
    """Device name (catalogue or the file's ``[device.NAME]``)."""
    zone: str
    """Where they are."""
    available: int
    """How many devices can be rented."""
    per_host: int
    """Devices per machine."""
    price_per_hour: float | None
    """Price per device-hour; ``None``: the device's own."""


@dataclasses.dataclass(frozen=True)
class Offers:
    """An offers file: the offers and the cluster of everything on offer."""

    offers: tuple[Offer, ...]
    cluster: Cluster
    """Every offered device; host ``k`` belongs to offer ``offer_of_host[k]``."""
    offer_of_host: tuple[int, ...]
    name: str

    def restricted(self, keep) -> "Offers":
        """Only the offers whose index ``keep(k, offer)`` accepts (e.g. one device type)."""
        idx = [k for k, o in enumerate(self.offers) if keep(k, o)]
        if not idx:
            raise ConfigError(f"{self.name}: no offer left to rent from")
        d = self.cluster.to_dict()
        d["host"] = [h for h, o in zip(d["host"], self.offer_of_host) if o in idx]
        names = {h["name"] for h in d["host"]}
        if "link" in d["network"]:
            d["network"]["link"] = [l for l in d["network"]["link"] if l["a"] in names and l["b"] in names]
        used = {h["device"] for h in d["host"]}
        if "device" in d:
            d["device"] = {k: v for k, v in d["device"].items() if k in used}
        return Offers(tuple(self.offers[k] for k in idx), Cluster.from_dict(d, source=self.cluster.source),
                      tuple(idx.index(o) for o in self.offer_of_host if o in idx), self.name)


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Requests of one size and their share of the mix."""

    prompt_len: int
    output_len: int
    share: float
    """Fraction of the requests (the shares of a mix add up to 1)."""


@dataclasses.dataclass(frozen=True)
class Rental:
    """What to rent and the plan on it."""

    devices: tuple[int, ...]
    """Devices rented per offer."""
    price_per_hour: float
    """Dollars per hour of the rented devices."""
    plans: tuple[tuple[Bucket, int, Plan], ...]
    """Per bucket served: the bucket, its batch sizes' replicas as one plan on the offers' cluster (the plan's
    workload carries the bucket's rate)."""
    requests_per_s: tuple[float, ...]
    """Requests/s of each bucket the rented replicas sustain (at least its share of the rate; a replica's spare
    time counted for its buckets in proportion to what they send it)."""
    shared_requests_per_s: tuple[float, ...]
    """The same with every network link's bandwidth shared among the replicas whose hops cross it (all buckets'
    replicas together, :func:`hexjax.search.cost.link_shares`); the program itself counts links unshared."""
    shared_latency_s: float
    """Worst replica latency with shared links."""
    candidates: int
    """Candidate pipelines the program chose among."""
    served: tuple[tuple[float, ...], ...] = ()
    """Per entry of ``plans``: the requests/s of each bucket its replicas serve (with ``share``, a replica may
    serve several buckets; otherwise only its own)."""


_OFFER_KEYS = ("device", "zone", "available", "per_host", "price_per_hour")
_TOP_KEYS = ("name", "network", "offer", "device", "profiles")
_NETWORK_KEYS = ("bandwidth_GBps", "latency_us", "cross_zone_bandwidth_GBps", "cross_zone_latency_us", "zone_link")


def load_offers(path: str | Path) -> Offers:
    """Read an offers file (see the module docstring); errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {'is a directory, not an offers file' if path.is_dir() else 'no such offers file'}."
                          " Fix: pass a .toml file of [[offer]] tables (examples are in examples/offers/)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}; fix the syntax there") from None
    return offers_from_dict(data, str(path))


def offers_from_dict(d: Any, source: str = "<dict>") -> Offers:
    """Offers from the dict an offers file parses to."""
    r = _Reader(source)
    top = r.table(d, "", _TOP_KEYS, "an offers file has [[offer]] tables, [network] and [device.NAME]")
    raw = top.get("offer")
    if not isinstance(raw, list) or not raw:
        raise r.fail("offer", f"expected [[offer]] tables, got {_describe(raw) if raw is not None else 'none'}",
                     "add at least one [[offer]] with device and available")
    offers, hosts, owner = [], [], []
    devices = dict(top.get("device", {})) if isinstance(top.get("device", {}), dict) else top.get("device")
    seen = set()
    for k, t in enumerate(raw):
        where = f"offer[{k}]"
        t = r.table(t, where, _OFFER_KEYS, "write each offer as an [[offer]] table")
        dev = r.string(t, "device", f"{where}.device")
        zone = r.string(t, "zone", f"{where}.zone", "default")
        if (dev, zone) in seen:
            raise r.fail(where, f"a second offer of {dev} in zone {zone!r}", "merge them into one offer")
        seen.add((dev, zone))
        available = r.number(t, "available", f"{where}.available", integer=True)
        per_host = r.number(t, "per_host", f"{where}.per_host", available, integer=True)
        price = r.number(t, "price_per_hour", f"{where}.price_per_hour", -1.0, positive=False)
        price = None if price == -1.0 else float(price)
        name = dev
        if price is not None:   # an offer's own price: a device of its own, based on the named one
            name = f"{dev}@{zone}"
            devices[name] = {"base": dev, "price_per_hour": price} if not isinstance(devices.get(dev), dict) \
                else {**devices[dev], "price_per_hour": price}
        offers.append(Offer(dev, zone, available, per_host, price))
        left, i = available, 0
        while left > 0:
            n = min(per_host, left)
            hosts.append({"name": f"{zone}/{dev}/{i}", "device": name, "count": n, "zone": zone})
            owner.append(k)
            left -= n
            i += 1
    cluster_d = {"name": top.get("name", Path(source).stem), "host": hosts}
    if "network" in top:
        net = r.table(top["network"], "network", _NETWORK_KEYS, "write a [network] table as in cluster files")
        net = dict(net)
        links = []
        for k, zl in enumerate(net.pop("zone_link", [])):
            where = f"network.zone_link[{k}]"
            zl = r.table(zl, where, ("a", "b", "bandwidth_GBps", "latency_us"), "write [[network.zone_link]] tables")
            za, zb = r.string(zl, "a", f"{where}.a"), r.string(zl, "b", f"{where}.b")
            if za == zb:
                raise r.fail(f"{where}.b", f"a link from zone {za!r} to itself", "use [network] bandwidth_GBps for "
                             "hosts of one zone")
            zones = {o.zone for o in offers}
            for z, key in ((za, "a"), (zb, "b")):
                if z not in zones:
                    raise r.fail(f"{where}.{key}", f"no offer in zone {z!r}", f"zones on offer: {', '.join(sorted(zones))}")
            extra = {key: zl[key] for key in ("bandwidth_GBps", "latency_us") if key in zl}
            links += [{"a": ha["name"], "b": hb["name"], **extra}
                      for ha in hosts for hb in hosts if ha["zone"] == za and hb["zone"] == zb and ha is not hb]
        if links:
            net["link"] = list(net.get("link", [])) + links
        cluster_d["network"] = net
    if devices:
        cluster_d["device"] = devices
    if "profiles" in top:
        cluster_d["profiles"] = top["profiles"]
    try:
        cluster = Cluster.from_dict(cluster_d, source=source)
    except ConfigError as e:
        # a device the base lookup failed on is an offer's device: say which offer
        raise ConfigError(str(e).replace("host[", "offer host[")) from None
    return Offers(tuple(offers), cluster, tuple(owner), cluster.name)


def check_mix(buckets) -> tuple[Bucket, ...]:
    """The mix as buckets whose shares add up to 1 (refused otherwise)."""
    buckets = tuple(buckets)
    if not buckets or not all(isinstance(b, Bucket) for b in buckets):
        raise ConfigError("a request mix is a non-empty list of Bucket(prompt_len, output_len, share)")
    for b in buckets:
        if not (b.share > 0 and math.isfinite(b.share)):
            raise ConfigError(f"bucket {b.prompt_len}/{b.output_len}: share must be positive, got {b.share!r}")
        Workload(b.prompt_len, b.output_len)   # checks the lengths
    total = sum(b.share for b in buckets)
    if abs(total - 1) > 1e-6:
        raise ConfigError(f"the shares of the request mix add up to {total:.6g}, not 1; scale them")
    return buckets


def mix_from_trace(trace, buckets: int = 4) -> tuple[Bucket, ...]:
    """At most ``buckets`` buckets of a :class:`hexjax.trace.Trace`: its requests sorted by prompt length and
    cut into groups of equal count, each costed at its longest prompt (so memory and prefill are never
    undercounted) and its mean output length rounded up (the decode work a replica does on average), with
    its share of the requests."""
    if not isinstance(buckets, int) or buckets < 1:
        raise ConfigError(f"buckets must be a positive integer, got {buckets!r}")
    reqs = sorted(trace.requests, key=lambda r: (r.prompt_len, r.output_len))
    n = len(reqs)
    out = []
    for part in np.array_split(np.arange(n), min(buckets, n)):
        rs = [reqs[i] for i in part]
        out.append(Bucket(max(r.prompt_len for r in rs), math.ceil(sum(r.output_len for r in rs) / len(rs)),
                          len(rs) / n))
    return tuple(out)


def rent(model, offers: Offers, buckets, rate_per_s: float, slo_s: float | None = None,
         batches: tuple[int, ...] = DEFAULT_BATCHES, max_stages: int | None = None, dtype_bytes: int = 2,
         share: bool = True, tpot_slo_s: float | None = None) -> Rental:
    """The cheapest rental serving ``rate_per_s`` requests/s of the mix ``buckets`` within ``slo_s`` (end to
    end) and ``tpot_slo_s`` (time per output token); ``share``: replicas may serve several buckets."""
    out = rent_rates(model, offers, buckets, [rate_per_s], slo_s, batches, max_stages, dtype_bytes, share, tpot_slo_s)
    if isinstance(out[0], PlanError):
        raise out[0]
    return out[0]


def rent_rates(model, offers: Offers, buckets, rates, slo_s: float | None = None,
               batches: tuple[int, ...] = DEFAULT_BATCHES, max_stages: int | None = None, dtype_bytes: int = 2,
               share: bool = True, tpot_slo_s: float | None = None) -> list:
    """:func:`rent` at each of ``rates`` (the candidates are found once): per rate a :class:`Rental`, or the
    :class:`PlanError` saying why none serves it."""
    cfg = resolve_model(model)
    buckets = check_mix(buckets)
    rates = list(rates)
    for rate_per_s in rates:
        if not (isinstance(rate_per_s, (int, float)) and math.isfinite(rate_per_s) and rate_per_s > 0):
            raise ConfigError(f"rent needs a positive rate in requests/s, got {rate_per_s!r}")
    for name, v in (("SLO", slo_s), ("time-per-output-token SLO", tpot_slo_s)):
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise ConfigError(f"the {name} must be a positive number of seconds, got {v!r}")
    batches = tuple(sorted(set(batches)))
    if not batches or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in batches):
        raise ConfigError(f"batch sizes must be positive integers, got {batches!r}")
    cluster = offers.cluster
    sym = host_classes(cluster)
    if max_stages is None:
        max_stages = auto_max_stages(sym, cluster.num_devices)
    cols = []          # (bucket index, workload, candidate, hosts per stage)
    col_price = []
    seen = set()
    for bi, b in enumerate(buckets):
        for batch in batches:
            wl = Workload(b.prompt_len, b.output_len, batch)
            if b.prompt_len + b.output_len > cfg.max_position_embeddings:
                raise ConfigError(f"bucket {b.prompt_len}/{b.output_len} is longer than {cfg.name}'s "
                                  f"{cfg.max_position_embeddings} positions; shorten it")
            cands, _ = candidates(cfg, cluster, wl, max_stages, dtype_bytes, sym=sym)
            cands = [c for c in cands if slo_s is None or c.cycle_s <= slo_s]
            for c in prune_dominated(cands, sym):
                price = sum(cluster.hosts[sym.classes[cls].hosts[0]].device.price_per_hour * u for cls, u in c.pieces)
                for hosts in assignments(c, sym):
                    key = (batch, c.pieces, c.layer_counts, c.meshes, tuple(hosts))
                    if share and key in seen:     # the same replica found for another bucket: valued on all anyway
                        continue
                    seen.add(key)
                    cols.append((bi, wl, c, hosts))
                    col_price.append(price)
    R = _rates(cfg, cluster, buckets, cols, slo_s, tpot_slo_s, share, dtype_bytes)
    keep = _undominated(cols, col_price, R, cluster)
    cols, col_price, R = [cols[j] for j in keep], [col_price[j] for j in keep], R[keep]
    missing = [b for bi, b in enumerate(buckets) if not R[:, bi].any()]
    if missing:
        b = missing[0]
        within = [f"{slo_s * 1e3:.1f} ms end to end" if slo_s is not None else "",
                  f"{tpot_slo_s * 1e3:.1f} ms per output token" if tpot_slo_s is not None else ""]
        within = " and ".join(w for w in within if w)
        raise PlanError(f"no pipeline on the offers serves requests of {b.prompt_len}+{b.output_len} tokens "
                        + (f"within the SLO of {within}" if within else "at all")
                        + f" (batch sizes {', '.join(map(str, batches))}); relax the SLO, try batch 1 or offer "
                        "larger or faster devices")
    out = []
    for rate_per_s in rates:
        try:
            x, f = _solve(cols, col_price, R, cluster, buckets, rate_per_s)
        except PlanError as e:
            out.append(e)
            continue
        out.append(_rental(cfg, offers, buckets, cols, col_price, R, x, f, dtype_bytes, rate_per_s, slo_s))
    return out


def _rates(cfg, cluster, buckets, cols, slo_s, tpot_slo_s, share, dtype_bytes) -> np.ndarray:
    """``[column, bucket]`` requests/s one replica of the column sustains on the bucket's requests (0: it may
    not serve them). Without ``share`` only the column's own bucket, at the DP's latency."""
    R = np.zeros((len(cols), len(buckets)))
    empty = free_devices(cluster)
    for j, (bi, wl, c, hosts) in enumerate(cols):
        if not share and tpot_slo_s is None:
            R[j, bi] = wl.batch / c.cycle_s
            continue
        rep = place_replica(cluster, {h: list(d) for h, d in empty.items()}, hosts, c.layer_counts, c.meshes)
        for b2, b in enumerate(buckets):
            if not share and b2 != bi:
                continue
            pred = cost.predict_replica(rep, cfg, cluster, Workload(b.prompt_len, b.output_len, wl.batch), dtype_bytes)
            if not pred.fits or (slo_s is not None and pred.latency_s > slo_s) \
                    or (tpot_slo_s is not None and pred.tpot_s > tpot_slo_s):
                continue
            R[j, b2] = wl.batch / c.cycle_s if (b2 == bi and not share) else pred.requests_per_s
    return R


def _usage(cols, cluster) -> np.ndarray:
    """``[column, host]`` devices one replica of the column takes."""
    U = np.zeros((len(cols), cluster.num_hosts))
    for j, (_, _, c, hosts) in enumerate(cols):
        for h, (_, u) in zip(hosts, c.pieces):
            U[j, h] += u
    return U


def _undominated(cols, col_price, R, cluster) -> list[int]:
    """Columns no other column beats: one taking no more devices of any host, costing no more and serving every
    bucket at least as fast (strictly better somewhere, or equal and earlier) could replace it in any rental,
    so dropping it keeps the optimum."""
    U = _usage(cols, cluster)
    P = np.asarray(col_price, float)
    live = np.flatnonzero(R.max(axis=1) > 0)
    keep = []
    for j in live:
        no_worse = (U[live] <= U[j]).all(1) & (P[live] <= P[j]) & (R[live] >= R[j]).all(1)
        better = (U[live] < U[j]).any(1) | (P[live] < P[j]) | (R[live] > R[j]).any(1) | (live < j)
        if not (no_worse & better & (live != j)).any():
            keep.append(int(j))
    return keep


def _solve(cols, col_price, R, cluster, buckets, rate_per_s) -> tuple[np.ndarray, np.ndarray]:
    """Integer replicas per column ``x`` and requests/s per (column, bucket) ``f`` of the cheapest rental."""
    from scipy.optimize import Bounds, LinearConstraint

    from hexjax.search.milp import milp

    n, H, K = len(cols), cluster.num_hosts, len(buckets)
    pairs = [(j, b) for j in range(n) for b in range(K) if R[j, b] > 0]
    m = len(pairs)
    A = np.zeros((H, n + m))            # devices per host
    L = np.zeros((n, n + m))            # replica time: Σ_b f_jb / r_jb - x_j <= 0
    C = np.zeros((K, n + m))            # requests/s per bucket
    ub = np.zeros(n + m)
    for j, (bi, _, c, hosts) in enumerate(cols):
        use = defaultdict(int)
        for h, (_, u) in zip(hosts, c.pieces):
            use[h] += u
        for h, u in use.items():
            A[h, j] += u
        ub[j] = min(cluster.hosts[h].count // u for h, u in use.items())
        L[j, j] = -1.0
    for k, (j, b) in enumerate(pairs):
        L[j, n + k] = 1.0 / R[j, b]
        C[b, n + k] = 1.0
        ub[n + k] = R[j, b] * ub[j]
    caps = np.array([h.count for h in cluster.hosts], float)
    need = np.array([b.share * rate_per_s * (1 - TIE) for b in buckets])
    # most each bucket could get with every device to itself: says which bucket is short, if one is
    for bi, b in enumerate(buckets):
        if need[bi] > 0 and max((R[j, bi] * ub[j] for j in range(n)), default=0.0) == 0:
            raise PlanError(f"bucket {b.prompt_len}+{b.output_len} has no pipeline that fits the offers")
    cost_vec = np.concatenate([np.array(col_price, float), np.zeros(m)])
    res = milp(cost_vec, constraints=[LinearConstraint(A, -np.inf, caps), LinearConstraint(L, -np.inf, 0.0),
                                      LinearConstraint(C, need, np.inf)],
               integrality=np.concatenate([np.ones(n), np.zeros(m)]), bounds=Bounds(0, ub),
               options={"mip_rel_gap": 0.0, "presolve": True})
    if res.status != 0 or res.x is None:
        raise PlanError(f"the offers cannot serve {rate_per_s:g} requests/s of this mix within the constraints "
                        f"({res.message.rstrip('.')}); lower the rate, relax the SLO or offer more devices")
    x = np.round(res.x[:n]).astype(int)
    f = np.zeros((n, K))
    for k, (j, b) in enumerate(pairs):
        f[j, b] = max(res.x[n + k], 0.0) if x[j] > 0 else 0.0
    # what the rented replicas sustain: each one's spare time goes to its buckets in proportion
    for j in np.flatnonzero(x):
        busy = sum(f[j, b] / R[j, b] for b in range(K) if R[j, b] > 0)
        if busy > 0:
            f[j] *= x[j] / busy
        else:
            b = cols[j][0] if R[j, cols[j][0]] > 0 else int(np.argmax(R[j]))
            f[j, b] = x[j] * R[j, b]
    return x, f


def _rental(cfg, offers, buckets, cols, col_price, R, x, f, dtype_bytes, rate_per_s, slo_s) -> Rental:
    cluster = offers.cluster
    free = free_devices(cluster)
    used = [0] * len(offers.offers)
    per_bucket: dict = defaultdict(list)
    carried: dict = defaultdict(lambda: np.zeros(len(buckets)))
    order = sorted((j for j in range(len(cols)) if x[j] > 0), key=lambda j: (cols[j][0], cols[j][1].batch, j))
    for j in order:
        bi, wl, c, hosts = cols[j]
        carried[(bi, wl.batch)] += f[j]
        for _ in range(x[j]):
            for h, (_, u) in zip(hosts, c.pieces):
                used[offers.offer_of_host[h]] += u
            per_bucket[(bi, wl.batch)].append((j, place_replica(cluster, free, hosts, c.layer_counts, c.meshes)))
    plans, served = [], []
    for (bi, batch), reps in sorted(per_bucket.items()):
        b = buckets[bi]
        wl = Workload(b.prompt_len, b.output_len, batch, b.share * rate_per_s, slo_s)
        p = Plan(cfg.name, cluster.fingerprint(), tuple(r for _, r in reps), wl, "cost", dtype_bytes)
        pred = cost.predict(p, cfg, cluster, wl)
        plans.append((b, batch, Plan(p.model, p.cluster_fingerprint, p.replicas, wl, "cost", dtype_bytes,
                                     pred.to_dict()), [j for j, _ in reps]))
        served.append(tuple(float(v) for v in carried[(bi, batch)]))
    rates = f.sum(axis=0)
    price = float(sum(x[j] * col_price[j] for j in range(len(cols))))
    everything = Plan(cfg.name, cluster.fingerprint(), tuple(r for _, _, p, _ in plans for r in p.replicas))
    shares = cost.link_shares(everything, cluster)
    shared = np.zeros(len(buckets))
    worst = 0.0
    for (b, batch, p, js) in plans:
        for rep, j in zip(p.replicas, js):
            own = cost.predict_replica(rep, cfg, cluster, p.workload, dtype_bytes)
            rp = cost.predict_replica(rep, cfg, cluster, p.workload, dtype_bytes, shares)
            # a shared link slows the replica on every bucket it serves alike (the hops scale with the work)
            shared += f[j] / x[j] * (rp.requests_per_s / own.requests_per_s)
            worst = max(worst, rp.latency_s)
    return Rental(tuple(used), price, tuple((b, batch, p) for b, batch, p, _ in plans), tuple(float(r) for r in rates),
                  tuple(float(r) for r in shared), worst, len(cols), tuple(served))


def price_all(offers: Offers) -> float:
    """Dollars per hour of renting every offered device."""
    return offers.cluster.price_per_hour


__all__ = ["Offer", "Offers", "Bucket", "Rental", "load_offers", "offers_from_dict", "rent", "rent_rates", "check_mix",
           "mix_from_trace", "price_all", "DEFAULT_BATCHES", "DEFAULT_MAX_STAGES"]
