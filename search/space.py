"""The plan space both searches explore, and the symmetry of identical hosts.

The plan space ``S(max_stages)`` for a model, a cluster and a workload:

- A plan is a set of replicas on pairwise disjoint sets of devices; devices
  may stay idle.
- A replica is a pipeline of 1 to ``max_stages`` stages on pairwise
  distinct hosts (a replica visits a host at most once; several replicas
  may share a host).
- A stage holds at least one layer, consecutive ones, and runs on a
  ``(dp, tp)`` mesh of ``dp * tp`` devices of its host, where ``tp``
  divides the attention heads and the MLP width and is a divisor or a
  multiple of the KV heads, and ``dp >= 1``.
- Every device's predicted memory fits its capacity less the reserve.

Which devices of a host a stage takes does not change any prediction (a
host's devices are identical and share its links), so both searches name
the lowest free device indices of the host, in replica order. Plans outside
``S`` (two stages of one replica on one host, hand-written ones) are still
valid plans: ``validate`` and ``evaluate`` accept them.

Hosts with the same device, count, zone, local link and links to every other
host are interchangeable: the search works on *host classes* and counts
their members instead of listing them.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from hexjax.plan import Replica, Stage, valid_tp

DEFAULT_MAX_STAGES = 4
"""Longest pipeline the searches consider (distinct hosts per replica)."""
SLO_TOLERANCE = 1 + 1e-9
"""A latency within this factor of the SLO meets it: the same pipeline's latency summed in another order
(the search's tables, the cost model's prediction) can differ in the last bit."""


@dataclasses.dataclass(frozen=True)
class HostClass:
    """Interchangeable hosts."""

    index: int
    """Position in the class list."""
    hosts: tuple[int, ...]
    """Host indices, ascending."""
    count: int
    """Devices per host."""

    @property
    def size(self) -> int:
        return len(self.hosts)


@dataclasses.dataclass(frozen=True)
class Symmetry:
    """Host classes and the link between any two hosts of two classes."""

    classes: tuple[HostClass, ...]
    """Classes ordered by their first host."""
    class_of: tuple[int, ...]
    """Class index of each host."""
    link: dict
    """``(class a, class b) -> (bandwidth_Bps, latency_s)`` between distinct hosts of the two classes."""


def host_classes(cluster) -> Symmetry:
    """Group interchangeable hosts; links between two classes are uniform by construction."""
    n = cluster.num_hosts
    hosts = cluster.hosts

    def link(a, b):
        return cluster.host_bandwidth(a, b), cluster.host_latency(a, b)

    key = {}
    label = []
    for h in hosts:
        k = (h.device, h.count, h.zone, h.intra_bandwidth_Bps, h.intra_latency_s)
        label.append(key.setdefault(k, len(key)))
    while True:
        # refine by the multiset of links to each class until stable
        while True:
            sig = []
            for a in range(n):
                prof = defaultdict(list)
                for b in range(n):
                    if b != a:
                        prof[label[b]].append(link(a, b))
                sig.append((label[a], tuple(sorted((c, tuple(sorted(v))) for c, v in prof.items()))))
            ids: dict = {}
            new = [ids.setdefault(s, len(ids)) for s in sig]
            if len(ids) == len(set(label)):
                break
            label = new
        # links must be uniform between (distinct) members of two classes; split where they are not
        members = defaultdict(list)
        for a in range(n):
            members[label[a]].append(a)
        bad = set()
        for ca, ma in members.items():
            for cb, mb in members.items():
                seen = {link(a, b) for a in ma for b in mb if a != b}
                if len(seen) > 1:
                    bad |= {ca, cb}
        if not bad:
            break
        nxt = max(label) + 1
        for a in range(n):
            if label[a] in bad:
                label[a] = nxt
                nxt += 1
    # number classes by first host
    order: dict = {}
    for a in range(n):
        order.setdefault(label[a], len(order))
    class_of = tuple(order[label[a]] for a in range(n))
    groups = defaultdict(list)
    for a in range(n):
        groups[class_of[a]].append(a)
    classes = tuple(HostClass(k, tuple(groups[k]), hosts[groups[k][0]].count) for k in range(len(groups)))
    links = {}
    for ka in classes:
        for kb in classes:
            pairs = [(a, b) for a in ka.hosts for b in kb.hosts if a != b]
            if pairs:
                links[(ka.index, kb.index)] = link(*pairs[0])
    return Symmetry(classes, class_of, links)


def shapes(cfg, devices: int) -> list[tuple[int, int]]:
    """``(dp, tp)`` meshes of exactly ``devices`` devices valid for ``cfg``, ascending tp."""
    return [(devices // tp, tp) for tp in range(1, devices + 1) if devices % tp == 0 and valid_tp(cfg, tp)]


def stage_shapes(cfg, count: int) -> list[tuple[int, int]]:
    """Every valid ``(dp, tp)`` mesh that fits a host of ``count`` devices."""
    return [s for u in range(1, count + 1) for s in shapes(cfg, u)]


def free_devices(cluster) -> dict[int, list[int]]:
    """Each host's device indices, for ``place_replica`` to take from."""
    return {h: list(host.devices) for h, host in enumerate(cluster.hosts)}


def place_replica(cluster, free: dict[int, list[int]], hosts, layer_counts, meshes) -> Replica:
    """A pipeline whose stage ``i`` holds the next ``layer_counts[i]`` layers on the lowest free
    ``dp x tp`` devices of host ``hosts[i]`` (taken out of ``free``)."""
    stages, a = [], 0
    for h, n, (dp, tp) in zip(hosts, layer_counts, meshes):
        devs = free[h][:dp * tp]
        del free[h][:dp * tp]
        stages.append(Stage((a, a + n), tuple(devs), dp, tp, cluster.hosts[h].name))
        a += n
    return Replica(tuple(stages))
