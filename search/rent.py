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
assignment ``a`` to hosts is solved to optimality by HiGHS. So the rental is
exact over the plan space ``S(max_stages)`` with one bucket and batch per
replica: Mélange's further freedom of letting one device serve a fraction of
several buckets is not used.
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
    """Requests/s each bucket's replicas sustain (at least its share of the rate)."""
    shared_requests_per_s: tuple[float, ...]
    """The same with every network link's bandwidth shared among the replicas whose hops cross it (all buckets'
    replicas together, :func:`hexjax.search.cost.link_shares`); the program itself counts links unshared."""
    shared_latency_s: float
    """Worst replica latency with shared links."""
    candidates: int
    """Candidate pipelines the program chose among."""


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
         batches: tuple[int, ...] = DEFAULT_BATCHES, max_stages: int | None = None, dtype_bytes: int = 2) -> Rental:
    """The cheapest rental serving ``rate_per_s`` requests/s of the mix ``buckets`` within ``slo_s``."""
    cfg = resolve_model(model)
    buckets = check_mix(buckets)
    if not (isinstance(rate_per_s, (int, float)) and math.isfinite(rate_per_s) and rate_per_s > 0):
        raise ConfigError(f"rent needs a positive rate in requests/s, got {rate_per_s!r}")
    if slo_s is not None and not (slo_s > 0 and math.isfinite(slo_s)):
        raise ConfigError(f"the SLO must be a positive number of seconds, got {slo_s!r}")
    batches = tuple(sorted(set(batches)))
    if not batches or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in batches):
        raise ConfigError(f"batch sizes must be positive integers, got {batches!r}")
    cluster = offers.cluster
    sym = host_classes(cluster)
    if max_stages is None:
        max_stages = auto_max_stages(sym, cluster.num_devices)
    cols = []          # (bucket index, workload, candidate, hosts per stage)
    col_price, col_rate = [], []
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
                    cols.append((bi, wl, c, hosts))
                    col_price.append(price)
                    col_rate.append(batch / c.cycle_s)
    missing = [b for bi, b in enumerate(buckets) if not any(c[0] == bi for c in cols)]
    if missing:
        b = missing[0]
        raise PlanError(f"no pipeline on the offers serves requests of {b.prompt_len}+{b.output_len} tokens "
                        + (f"within the SLO of {slo_s * 1e3:.1f} ms" if slo_s is not None else "at all")
                        + f" (batch sizes {', '.join(map(str, batches))}); relax the SLO, try batch 1 or offer "
                        "larger or faster devices")
    x = _solve(cols, col_price, col_rate, cluster, buckets, rate_per_s)
    return _rental(cfg, offers, buckets, cols, col_price, col_rate, x, dtype_bytes, rate_per_s, slo_s)


def _solve(cols, col_price, col_rate, cluster, buckets, rate_per_s) -> np.ndarray:
    from scipy.optimize import Bounds, LinearConstraint

    from hexjax.search.milp import milp

    n, H = len(cols), cluster.num_hosts
    A = np.zeros((H, n))
    C = np.zeros((len(buckets), n))
    ub = np.zeros(n)
    for j, (bi, _, c, hosts) in enumerate(cols):
        use = defaultdict(int)
        for h, (_, u) in zip(hosts, c.pieces):
            use[h] += u
        for h, u in use.items():
            A[h, j] += u
        ub[j] = min(cluster.hosts[h].count // u for h, u in use.items())
        C[bi, j] = col_rate[j]
    caps = np.array([h.count for h in cluster.hosts], float)
    need = np.array([b.share * rate_per_s * (1 - TIE) for b in buckets])
    # most each bucket could get with every device to itself: says which bucket is short, if one is
    for bi, b in enumerate(buckets):
        most = max((col_rate[j] * ub[j] for j in range(n) if cols[j][0] == bi), default=0.0)
        if C[bi].any() and need[bi] > 0 and most == 0:
            raise PlanError(f"bucket {b.prompt_len}+{b.output_len} has no pipeline that fits the offers")
    res = milp(np.array(col_price), constraints=[LinearConstraint(A, -np.inf, caps), LinearConstraint(C, need, np.inf)],
               integrality=np.ones(n), bounds=Bounds(0, ub), options={"mip_rel_gap": 0.0, "presolve": True})
    if res.status != 0 or res.x is None:
        raise PlanError(f"the offers cannot serve {rate_per_s:g} requests/s of this mix within the constraints "
                        f"({res.message.rstrip('.')}); lower the rate, relax the SLO or offer more devices")
    return np.round(res.x).astype(int)


def _rental(cfg, offers, buckets, cols, col_price, col_rate, x, dtype_bytes, rate_per_s, slo_s) -> Rental:
    cluster = offers.cluster
    free = free_devices(cluster)
    used = [0] * len(offers.offers)
    per_bucket: dict = defaultdict(list)
    rates = [0.0] * len(buckets)
    order = sorted((j for j in range(len(cols)) if x[j] > 0), key=lambda j: (cols[j][0], cols[j][1].batch, j))
    for j in order:
        bi, wl, c, hosts = cols[j]
        rates[bi] += x[j] * col_rate[j]
        for _ in range(x[j]):
            for h, (_, u) in zip(hosts, c.pieces):
                used[offers.offer_of_host[h]] += u
            per_bucket[(bi, wl.batch)].append(place_replica(cluster, free, hosts, c.layer_counts, c.meshes))
    plans = []
    for (bi, batch), reps in sorted(per_bucket.items()):
        b = buckets[bi]
        wl = Workload(b.prompt_len, b.output_len, batch, b.share * rate_per_s, slo_s)
        p = Plan(cfg.name, cluster.fingerprint(), tuple(reps), wl, "cost", dtype_bytes)
        pred = cost.predict(p, cfg, cluster, wl)
        plans.append((b, batch, Plan(p.model, p.cluster_fingerprint, p.replicas, wl, "cost", dtype_bytes,
                                     pred.to_dict())))
    price = float(sum(x[j] * col_price[j] for j in range(len(cols))))
    everything = Plan(cfg.name, cluster.fingerprint(), tuple(r for _, _, p in plans for r in p.replicas))
    shares = cost.link_shares(everything, cluster)
    shared = [0.0] * len(buckets)
    worst = 0.0
    for (b, batch, p) in plans:
        for rep in p.replicas:
            rp = cost.predict_replica(rep, cfg, cluster, p.workload, dtype_bytes, shares)
            shared[buckets.index(b)] += rp.requests_per_s
            worst = max(worst, rp.latency_s)
    return Rental(tuple(used), price, tuple(plans), tuple(float(r) for r in rates), tuple(shared), worst, len(cols))


def price_all(offers: Offers) -> float:
    """Dollars per hour of renting every offered device."""
    return offers.cluster.price_per_hour


__all__ = ["Offer", "Offers", "Bucket", "Rental", "load_offers", "offers_from_dict", "rent", "check_mix",
           "mix_from_trace", "price_all", "DEFAULT_BATCHES", "DEFAULT_MAX_STAGES"]
