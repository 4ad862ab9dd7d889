"""A heterogeneous cluster: hosts of devices, zones, and the links between them.

A cluster file (TOML) lists hosts in order; devices are numbered globally in
that order, host by host. Bandwidths are in GB/s (1e9 bytes/s), latencies in
microseconds and memory in GiB in the file; inside, everything is bytes,
bytes/s and seconds. A device may carry a measured ``profile`` sub-table
(``hexjax calibrate`` writes it; :class:`hexjax.devices.DeviceProfile`):
``flops_efficiency`` (per dtype, ``[[rows, efficiency], ...]``),
``memory_efficiency``, ``link_efficiency``, ``step_overhead_us``,
``host_copy_GBps``, ``source`` and the serving terms (see the README); a top-level ``profiles = ["cpu.toml"]`` takes
the ``[device.NAME]`` tables of those files (paths relative to this one; the
file's own tables win). See ``examples/clusters/`` for complete files::

    name = "my-cluster"                # optional; default: the file's stem
    [network]                          # all optional
    bandwidth_GBps = 12.5              # between hosts of one zone
    latency_us = 20
    cross_zone_bandwidth_GBps = 1.25   # between zones
    cross_zone_latency_us = 30000

    [[host]]
    name = "illinois-a6000"
    device = "A6000"                   # catalogue name (`hexjax devices`) or a [device.NAME] below
    count = 4
    zone = "illinois"                  # optional, default "default"
    # intra_bandwidth_GBps = 32        # optional, default: the device's link
    # intra_latency_us = 5             # optional
    # process = 0                      # optional: the jax.distributed process driving it (default:
                                       # host order = process order; give it on every host or none)

    [[network.link]]                   # optional override for one pair of hosts (symmetric)
    a = "illinois-a6000"
    b = "nevada-a5000"
    bandwidth_GBps = 2.0               # give either or both
    latency_us = 900

    [device.MyCard]                    # a custom device ...
    memory_GiB = 20
    tflops = 100                       # dense bf16/fp16 tensor peak
    memory_bandwidth_GBps = 800
    price_per_hour = 0.5
    # intra_bandwidth_GBps = 16        # optional
    # kind = "gpu"                     # optional

    [device.A6000]                     # ... or a catalogue device with some figures changed
    price_per_hour = 0.45              # (any other name may take `base = "A6000"`)
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import numbers
import tomllib
from pathlib import Path
from typing import Any, Callable

from hexjax.devices import DEVICES, KINDS, DeviceProfile, DeviceSpec, lookup_device, normalize_name
from hexjax.errors import ConfigError

GB = 1e9
GiB = 2**30

DEFAULT_NETWORK_BANDWIDTH_GBPS = 12.5
"""Between hosts of one zone: 100 Gbit/s Ethernet/InfiniBand."""
DEFAULT_NETWORK_LATENCY_US = 20.0
DEFAULT_CROSS_ZONE_BANDWIDTH_GBPS = 1.25
"""Between zones: 10 Gbit/s of wide-area bandwidth."""
DEFAULT_CROSS_ZONE_LATENCY_US = 30000.0
DEFAULT_INTRA_LATENCY_US = 5.0
"""Device to device inside one host (NVLink/PCIe plus launch overhead)."""
DEFAULT_CUSTOM_INTRA_BANDWIDTH_GBPS = 16.0
"""A custom device without a stated link: roughly a PCIe 4 x16 slot."""


@dataclasses.dataclass(frozen=True)
class Host:
    """One machine: ``count`` identical devices that share fast local links."""

    name: str
    """Unique name within the cluster."""
    device: DeviceSpec
    """The kind of device this host holds."""
    count: int
    """How many devices it holds."""
    zone: str
    """Location; hosts in one zone share the (fast) default network."""
    first_device: int
    """Global index of its first device."""
    intra_bandwidth_Bps: float
    """Device-to-device bandwidth inside the host, bytes/s per direction."""
    intra_latency_s: float
    """Device-to-device latency inside the host, seconds."""
    process: int | None = None
    """The ``jax.distributed`` process that drives this host (None: its position among the hosts)."""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"host name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.device, DeviceSpec):
            raise ConfigError(f"host {self.name}: device must be a DeviceSpec, got {type(self.device).__name__}")
        if not _is_int(self.count) or self.count <= 0:
            raise ConfigError(f"host {self.name}: count must be a positive integer, got {self.count!r}")
        if not isinstance(self.zone, str) or not self.zone:
            raise ConfigError(f"host {self.name}: zone must be a non-empty string, got {self.zone!r}")
        if not _is_int(self.first_device) or self.first_device < 0:
            raise ConfigError(f"host {self.name}: first_device must be a non-negative integer")
        if not _is_number(self.intra_bandwidth_Bps) or not self.intra_bandwidth_Bps > 0:
            raise ConfigError(f"host {self.name}: intra_bandwidth_Bps must be positive, got {self.intra_bandwidth_Bps!r}")
        if not _is_number(self.intra_latency_s) or not self.intra_latency_s >= 0:
            raise ConfigError(f"host {self.name}: intra_latency_s must be >= 0, got {self.intra_latency_s!r}")
        if self.process is not None and (not _is_int(self.process) or self.process < 0):
            raise ConfigError(f"host {self.name}: process must be a non-negative integer, got {self.process!r}")

    @property
    def devices(self) -> range:
        """Global indices of this host's devices."""
        return range(self.first_device, self.first_device + self.count)


@dataclasses.dataclass(frozen=True)
class Link:
    """An explicit network link between two hosts (symmetric), overriding the zone defaults."""

    a: str
    """Name of one host."""
    b: str
    """Name of the other host."""
    bandwidth_Bps: float
    """Bytes/s per direction."""
    latency_s: float
    """One-way latency, seconds."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Hosts in global device order plus the network between them.

    Equality, hashing and :meth:`fingerprint` ignore ``name`` and ``source``:
    two clusters are equal when they describe the same hardware.
    """

    hosts: tuple[Host, ...]
    """Hosts in file order; their devices are numbered consecutively."""
    network_bandwidth_Bps: float = DEFAULT_NETWORK_BANDWIDTH_GBPS * GB
    """Default bandwidth between two hosts of the same zone, bytes/s per direction."""
    network_latency_s: float = DEFAULT_NETWORK_LATENCY_US / 1e6
    """Default latency between two hosts of the same zone, seconds."""
    cross_zone_bandwidth_Bps: float = DEFAULT_CROSS_ZONE_BANDWIDTH_GBPS * GB
    """Default bandwidth between hosts of different zones, bytes/s per direction."""
    cross_zone_latency_s: float = DEFAULT_CROSS_ZONE_LATENCY_US / 1e6
    """Default latency between hosts of different zones, seconds."""
    links: tuple[Link, ...] = ()
    """Per-pair overrides of the defaults."""
    custom_devices: tuple[DeviceSpec, ...] = ()
    """Devices defined by the cluster itself (not in, or overriding, the catalogue)."""
    name: str = dataclasses.field(default="cluster", compare=False)
    """A label for reports."""
    source: str = dataclasses.field(default="<dict>", compare=False)
    """Where the description came from (a path, or ``<dict>``)."""

    # Lookup tables built once, so bandwidth/latency queries are O(1).
    _host_of: tuple[int, ...] = dataclasses.field(init=False, repr=False, compare=False)
    _host_bw: tuple[tuple[float, ...], ...] = dataclasses.field(init=False, repr=False, compare=False)
    _host_lat: tuple[tuple[float, ...], ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        where = self.source
        object.__setattr__(self, "hosts", tuple(self.hosts))
        object.__setattr__(self, "links", tuple(self.links))
        if not self.hosts:
            raise ConfigError(f"{where}: a cluster needs at least one host; add a [[host]] table")
        for field in ("network_bandwidth_Bps", "cross_zone_bandwidth_Bps"):
            if not _is_number(getattr(self, field)) or not getattr(self, field) > 0:
                raise ConfigError(f"{where}: {field} must be positive, got {getattr(self, field)!r}")
        for field in ("network_latency_s", "cross_zone_latency_s"):
            if not _is_number(getattr(self, field)) or not getattr(self, field) >= 0:
                raise ConfigError(f"{where}: {field} must be >= 0, got {getattr(self, field)!r}")

        index: dict[str, int] = {}
        next_device = 0
        for k, host in enumerate(self.hosts):
            if not isinstance(host, Host):
                raise ConfigError(f"{where}: hosts[{k}] must be a Host, got {type(host).__name__}")
            if host.name in index:
                raise ConfigError(f"{where}: two hosts are named {host.name!r}; host names must be unique")
            if host.first_device != next_device:
                raise ConfigError(
                    f"{where}: host {host.name!r} starts at device {host.first_device}, but the hosts "
                    f"before it end at {next_device}; devices are numbered host by host")
            index[host.name] = k
            next_device += host.count

        _check_processes(self.hosts, where)

        # Every non-catalogue device a host uses is listed, so to_dict can write it.
        custom = {d.name: d for d in self.custom_devices}
        if len(custom) != len(self.custom_devices):
            raise ConfigError(f"{where}: custom device names must be unique")
        for host in self.hosts:
            d = host.device
            if custom.get(d.name, d) != d:
                raise ConfigError(f"{where}: host {host.name!r} uses a device {d.name!r} that differs from "
                                  "the custom device of that name")
            if DEVICES.get(d.name) != d and d.name not in custom:
                custom[d.name] = d
        object.__setattr__(self, "custom_devices", tuple(custom.values()))

        n = len(self.hosts)
        bw = [[0.0] * n for _ in range(n)]
        lat = [[0.0] * n for _ in range(n)]
        for a, ha in enumerate(self.hosts):
            for b, hb in enumerate(self.hosts):
                if a == b:
                    bw[a][b], lat[a][b] = ha.intra_bandwidth_Bps, ha.intra_latency_s
                elif ha.zone == hb.zone:
                    bw[a][b], lat[a][b] = self.network_bandwidth_Bps, self.network_latency_s
                else:
                    bw[a][b], lat[a][b] = self.cross_zone_bandwidth_Bps, self.cross_zone_latency_s
        seen: set[frozenset[str]] = set()
        for link in self.links:
            if not isinstance(link, Link):
                raise ConfigError(f"{where}: links must be Link objects, got {type(link).__name__}")
            for end in (link.a, link.b):
                if end not in index:
                    raise ConfigError(f"{where}: link {link.a!r} - {link.b!r} names unknown host {end!r}."
                                      f"{_did_you_mean(end, index)}")
            if link.a == link.b:
                raise ConfigError(f"{where}: link of host {link.a!r} to itself; set intra_bandwidth_GBps "
                                  "on the host instead")
            pair = frozenset((link.a, link.b))
            if pair in seen:
                raise ConfigError(f"{where}: two links between {link.a!r} and {link.b!r}; keep one")
            seen.add(pair)
            if not _is_number(link.bandwidth_Bps) or not link.bandwidth_Bps > 0:
                raise ConfigError(f"{where}: link {link.a!r} - {link.b!r}: bandwidth must be positive")
            if not _is_number(link.latency_s) or not link.latency_s >= 0:
                raise ConfigError(f"{where}: link {link.a!r} - {link.b!r}: latency must be >= 0")
            a, b = index[link.a], index[link.b]
            bw[a][b] = bw[b][a] = link.bandwidth_Bps
            lat[a][b] = lat[b][a] = link.latency_s

        object.__setattr__(self, "_host_of", tuple(k for k, h in enumerate(self.hosts) for _ in range(h.count)))
        object.__setattr__(self, "_host_bw", tuple(map(tuple, bw)))
        object.__setattr__(self, "_host_lat", tuple(map(tuple, lat)))

    # ---- loading and saving ----

    @staticmethod
    def load(path: str | Path) -> "Cluster":
        """Read a cluster TOML file."""
        path = Path(path)
        if not path.is_file():
            hint = ""
            if path.parent.is_dir():
                close = difflib.get_close_matches(path.name, [p.name for p in path.parent.glob("*.toml")], n=3)
                if close:
                    hint = f" Did you mean {' or '.join(str(path.parent / c) for c in close)}?"
            what = "is a directory, not a cluster file" if path.is_dir() else "no such cluster file"
            raise ConfigError(f"{path}: {what}.{hint} Pass the path of a .toml file "
                              "(examples are in examples/clusters/)")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}; fix the syntax there") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e}); save the file as UTF-8") from None
        return Cluster.from_dict(data, source=str(path))

    @staticmethod
    def from_dict(d: dict[str, Any], source: str = "<dict>") -> "Cluster":
        """Build a cluster from the dict a cluster TOML file parses to."""
        return _parse(d, source)

    def to_dict(self) -> dict[str, Any]:
        """The cluster as a TOML-shaped dict; ``Cluster.from_dict(c.to_dict()) == c``."""
        network: dict[str, Any] = {
            "bandwidth_GBps": _export_GBps(self.network_bandwidth_Bps),
            "latency_us": _export_us(self.network_latency_s),
            "cross_zone_bandwidth_GBps": _export_GBps(self.cross_zone_bandwidth_Bps),
            "cross_zone_latency_us": _export_us(self.cross_zone_latency_s),
        }
        if self.links:
            network["link"] = [
                {"a": l.a, "b": l.b, "bandwidth_GBps": _export_GBps(l.bandwidth_Bps),
                 "latency_us": _export_us(l.latency_s)} for l in self.links]
        hosts = []
        for h in self.hosts:
            entry: dict[str, Any] = {"name": h.name, "device": h.device.name, "count": h.count, "zone": h.zone}
            if h.intra_bandwidth_Bps != h.device.intra_bandwidth_Bps:
                entry["intra_bandwidth_GBps"] = _export_GBps(h.intra_bandwidth_Bps)
            if h.intra_latency_s != DEFAULT_INTRA_LATENCY_US / 1e6:
                entry["intra_latency_us"] = _export_us(h.intra_latency_s)
            if h.process is not None:
                entry["process"] = h.process
            hosts.append(entry)
        out: dict[str, Any] = {"name": self.name, "network": network, "host": hosts}
        if self.custom_devices:
            out["device"] = {d.name: {
                "memory_GiB": _tidy(d.memory_bytes / GiB),
                "tflops": _export(d.peak_flops, lambda x: x * 1e12, lambda x: x / 1e12),
                "memory_bandwidth_GBps": _export_GBps(d.memory_bandwidth_Bps),
                "intra_bandwidth_GBps": _export_GBps(d.intra_bandwidth_Bps),
                "price_per_hour": d.price_per_hour,
                "kind": d.kind,
                **({"profile": profile_to_dict(d.profile)} if d.profile is not None else {}),
            } for d in self.custom_devices}
        return out

    def to_toml(self) -> str:
        """The cluster as cluster-file text (what :meth:`load` reads back)."""
        d = self.to_dict()
        lines = [f"name = {_toml_value(d['name'])}", "", "[network]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in d["network"].items() if k != "link"]
        for section, rows in (("host", d["host"]), ("network.link", d["network"].get("link", []))):
            for row in rows:
                lines += ["", f"[[{section}]]"] + [f"{k} = {_toml_value(v)}" for k, v in row.items()]
        for dev_name, fields in d.get("device", {}).items():
            lines += devices_toml(dev_name, fields)
        return "\n".join(lines) + "\n"

    def fingerprint(self) -> str:
        """Short stable hash of the hardware description (ignores ``name`` and ``source``).

        It covers the figures of every device used, so a plan made against
        other catalogue figures does not match.
        """
        d = self.to_dict()
        del d["name"]
        d["specs"] = {h.device.name: dataclasses.asdict(h.device) for h in self.hosts}
        text = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    # ---- queries ----

    @property
    def num_devices(self) -> int:
        """Total number of devices."""
        return len(self._host_of)

    @property
    def num_hosts(self) -> int:
        """Number of hosts."""
        return len(self.hosts)

    @property
    def zones(self) -> tuple[str, ...]:
        """Zone names in order of first appearance."""
        return tuple(dict.fromkeys(h.zone for h in self.hosts))

    @property
    def price_per_hour(self) -> float:
        """Dollars per hour for all devices."""
        return sum(h.count * h.device.price_per_hour for h in self.hosts)

    @property
    def total_memory_bytes(self) -> int:
        """Device memory summed over all devices."""
        return sum(h.count * h.device.memory_bytes for h in self.hosts)

    @property
    def total_peak_flops(self) -> float:
        """Peak dense FLOP/s summed over all devices."""
        return sum(h.count * h.device.peak_flops for h in self.hosts)

    @property
    def num_processes(self) -> int:
        """``jax.distributed`` processes the cluster needs: one per host unless hosts say ``process = K``."""
        return max(self.process_of_host(k) for k in range(len(self.hosts))) + 1

    def process_of_host(self, k: int) -> int:
        """The process driving host ``k`` (its ``process`` field, else ``k``: host order is process order)."""
        self._check_host(k)
        p = self.hosts[k].process
        return k if p is None else p

    def hosts_of_process(self, p: int) -> tuple[Host, ...]:
        """The hosts process ``p`` drives, in file order."""
        return tuple(h for k, h in enumerate(self.hosts) if self.process_of_host(k) == p)

    def host_index(self, name: str) -> int:
        """Index of the host called ``name``."""
        for k, h in enumerate(self.hosts):
            if h.name == name:
                return k
        raise ConfigError(f"{self.source}: no host named {name!r}.{_did_you_mean(name, [h.name for h in self.hosts])}")

    def host_of(self, i: int) -> int:
        """Index of the host that holds global device ``i``."""
        self._check_device(i)
        return self._host_of[i]

    def device(self, i: int) -> DeviceSpec:
        """Spec of global device ``i``."""
        return self.hosts[self.host_of(i)].device

    def bandwidth(self, i: int, j: int) -> float:
        """Bytes/s per direction between global devices ``i`` and ``j`` (``inf`` when ``i == j``)."""
        if i == j:
            self._check_device(i)
            return math.inf
        return self._host_bw[self.host_of(i)][self.host_of(j)]

    def latency(self, i: int, j: int) -> float:
        """Seconds of one-way latency between global devices ``i`` and ``j`` (0 when ``i == j``)."""
        if i == j:
            self._check_device(i)
            return 0.0
        return self._host_lat[self.host_of(i)][self.host_of(j)]

    def host_bandwidth(self, a: int, b: int) -> float:
        """Bytes/s per direction between a device of host ``a`` and one of host ``b`` (intra-host when equal)."""
        self._check_host(a)
        self._check_host(b)
        return self._host_bw[a][b]

    def host_latency(self, a: int, b: int) -> float:
        """Seconds of latency between a device of host ``a`` and one of host ``b`` (intra-host when equal)."""
        self._check_host(a)
        self._check_host(b)
        return self._host_lat[a][b]

    def _check_device(self, i: int) -> None:
        if not isinstance(i, numbers.Integral) or not 0 <= i < len(self._host_of):  # numpy ints too
            raise IndexError(f"device {i!r} is out of range: {self.name} has devices 0..{len(self._host_of) - 1}")

    def _check_host(self, a: int) -> None:
        if not isinstance(a, numbers.Integral) or not 0 <= a < len(self.hosts):
            raise IndexError(f"host {a!r} is out of range: {self.name} has hosts 0..{len(self.hosts) - 1}")


# ---- parsing with precise error messages ----

_TOP_KEYS = ("name", "network", "host", "device", "profiles")
_NETWORK_KEYS = ("bandwidth_GBps", "latency_us", "cross_zone_bandwidth_GBps", "cross_zone_latency_us", "link")
_HOST_KEYS = ("name", "device", "count", "zone", "intra_bandwidth_GBps", "intra_latency_us", "process")
_LINK_KEYS = ("a", "b", "bandwidth_GBps", "latency_us")
_DEVICE_KEYS = ("base", "memory_GiB", "tflops", "memory_bandwidth_GBps", "intra_bandwidth_GBps",
                "price_per_hour", "kind", "profile")
_PROFILE_KEYS = ("flops_efficiency", "memory_efficiency", "link_efficiency", "step_overhead_us", "host_copy_GBps",
                 "source", "version", "copy_latency_us", "copy_GBps", "host_pass_us", "host_row_us",
                 "stage_overhead_us", "allreduce_us", "chunk_key_ns", "chained_copy_us")
PROFILE_VERSION = 3
"""Profile tables carry ``version = 2`` from the serving terms on (copies between stages, host work per
pass) and ``version = 3`` with the figures by mesh size (stage overhead, all-reduce); a table without
it is version 1 (no such terms)."""
_BY_DEVICES = ("stage_overhead_us", "allreduce_us", "chunk_key_ns")


class _Reader:
    """Typed access to one table of the file, with errors that name file and field."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, field: str, problem: str, fix: str) -> ConfigError:
        return ConfigError(f"{self.source}: {field or 'top level'}: {problem}; {fix}")

    def table(self, value: Any, field: str, allowed: tuple[str, ...], fix: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(field, f"expected a table, got {_describe(value)}", fix)
        for key in value:
            if key not in allowed:
                hint = _did_you_mean(key, allowed).strip()
                raise self.fail(f"{field}.{key}" if field else key, "unknown field",
                                f"{hint + ' ' if hint else ''}Allowed fields: {', '.join(allowed)}")
        return value

    def string(self, t: dict, key: str, field: str, default: str | None = None) -> str:
        if key not in t:
            if default is None:
                raise self.fail(field, "missing required field", f"add {key} = \"...\"")
            return default
        v = t[key]
        if not isinstance(v, str) or not v.strip():
            raise self.fail(field, f"expected a non-empty string, got {_describe(v)}", f"write {key} = \"...\"")
        return v

    def number(self, t: dict, key: str, field: str, default: float | None = None, *,
               positive: bool = True, integer: bool = False) -> Any:
        if key not in t:
            if default is None:
                raise self.fail(field, "missing required field", f"add {key} = <number>")
            return default
        v = t[key]
        ok_type = _is_int(v) if integer else _is_number(v)
        if not ok_type or not math.isfinite(v):
            kind = "an integer" if integer else "a number"
            raise self.fail(field, f"expected {kind}, got {_describe(v)}", f"write {key} = <{kind[2:].strip()}>")
        if positive and not v > 0:
            raise self.fail(field, f"must be positive, got {v!r}", "use a value above 0")
        if not positive and not v >= 0:
            raise self.fail(field, f"must be >= 0, got {v!r}", "use 0 or more")
        return v


def _parse(d: Any, source: str) -> Cluster:
    r = _Reader(source)
    top = r.table(d, "", _TOP_KEYS, "the file must be a TOML document")
    default_name = Path(source).stem if not source.startswith("<") else "cluster"
    name = r.string(top, "name", "name", default_name)

    raw_devices = _included_devices(r, top.get("profiles", []), source)
    own = top.get("device", {})
    if isinstance(own, dict):
        raw_devices.update(own)   # the file's own tables win over included profiles
    else:
        raw_devices = own         # let _parse_devices say what is wrong
    devices = _parse_devices(r, raw_devices)

    net = r.table(top.get("network", {}), "network", _NETWORK_KEYS, "write a [network] table")
    net_bw = r.number(net, "bandwidth_GBps", "network.bandwidth_GBps", DEFAULT_NETWORK_BANDWIDTH_GBPS) * GB
    net_lat = r.number(net, "latency_us", "network.latency_us", DEFAULT_NETWORK_LATENCY_US, positive=False) / 1e6
    cz_bw = r.number(net, "cross_zone_bandwidth_GBps", "network.cross_zone_bandwidth_GBps",
                     DEFAULT_CROSS_ZONE_BANDWIDTH_GBPS) * GB
    cz_lat = r.number(net, "cross_zone_latency_us", "network.cross_zone_latency_us",
                      DEFAULT_CROSS_ZONE_LATENCY_US, positive=False) / 1e6

    if "host" not in top:
        raise r.fail("host", "the cluster has no hosts", "add at least one [[host]] table")
    raw_hosts = top["host"]
    if not isinstance(raw_hosts, list) or not raw_hosts:
        raise r.fail("host", f"expected an array of tables, got {_describe(raw_hosts)}",
                     "write each host as a [[host]] table (double brackets)")
    hosts: list[Host] = []
    names: dict[str, int] = {}
    first = 0
    for k, raw in enumerate(raw_hosts):
        where = f"host[{k}]"
        t = r.table(raw, where, _HOST_KEYS, "write each host as a [[host]] table")
        host_name = r.string(t, "name", f"{where}.name")
        if host_name in names:
            raise r.fail(f"{where}.name", f"duplicate host name {host_name!r} (also host[{names[host_name]}])",
                         "give every host a unique name")
        names[host_name] = k
        dev_name = r.string(t, "device", f"{where}.device")
        try:
            device = lookup_device(dev_name, devices)
        except ConfigError as e:
            raise r.fail(f"{where}.device", str(e), "use a catalogue name (see `hexjax devices`)") from None
        count = r.number(t, "count", f"{where}.count", integer=True)
        zone = r.string(t, "zone", f"{where}.zone", "default")
        intra_bw = r.number(t, "intra_bandwidth_GBps", f"{where}.intra_bandwidth_GBps", -1.0)
        intra_bw = device.intra_bandwidth_Bps if intra_bw == -1.0 else intra_bw * GB
        intra_lat = r.number(t, "intra_latency_us", f"{where}.intra_latency_us", DEFAULT_INTRA_LATENCY_US,
                             positive=False) / 1e6
        process = None
        if "process" in t:
            process = t["process"]
            if not _is_int(process) or process < 0:
                raise r.fail(f"{where}.process", f"expected a non-negative integer, got {_describe(process)}",
                             "write process = 0 for the first process, 1 for the next, ...")
        hosts.append(Host(host_name, device, count, zone, first, intra_bw, intra_lat, process))
        first += count

    raw_links = net.get("link", [])
    if not isinstance(raw_links, list):
        raise r.fail("network.link", f"expected an array of tables, got {_describe(raw_links)}",
                     "write each link as a [[network.link]] table")
    links: list[Link] = []
    seen: dict[frozenset, int] = {}
    for k, raw in enumerate(raw_links):
        where = f"network.link[{k}]"
        t = r.table(raw, where, _LINK_KEYS, "write each link as a [[network.link]] table")
        ends = []
        for key in ("a", "b"):
            end = r.string(t, key, f"{where}.{key}")
            if end not in names:
                hint = _did_you_mean(end, names).strip()
                raise r.fail(f"{where}.{key}", f"no host named {end!r}",
                             f"{hint + ' ' if hint else ''}Hosts: {', '.join(names)}")
            ends.append(end)
        if ends[0] == ends[1]:
            raise r.fail(f"{where}.b", f"a link from host {ends[0]!r} to itself",
                         "links join two different hosts; set intra_bandwidth_GBps on the host instead")
        pair = frozenset(ends)
        if pair in seen:
            raise r.fail(where, f"second link between {ends[0]!r} and {ends[1]!r} "
                         f"(first is network.link[{seen[pair]}])", "keep one")
        seen[pair] = k
        if "bandwidth_GBps" not in t and "latency_us" not in t:
            raise r.fail(where, "a link that overrides nothing", "give bandwidth_GBps and/or latency_us")
        same_zone = hosts[names[ends[0]]].zone == hosts[names[ends[1]]].zone
        bw = r.number(t, "bandwidth_GBps", f"{where}.bandwidth_GBps", -1.0)
        bw = (net_bw if same_zone else cz_bw) if bw == -1.0 else bw * GB
        lat = r.number(t, "latency_us", f"{where}.latency_us", -1.0, positive=False)
        lat = (net_lat if same_zone else cz_lat) if lat == -1.0 else lat / 1e6
        links.append(Link(ends[0], ends[1], bw, lat))

    # A [device.NAME] identical to the catalogue entry adds nothing.
    custom = tuple(d for d in devices.values() if DEVICES.get(d.name) != d)
    return Cluster(tuple(hosts), net_bw, net_lat, cz_bw, cz_lat, tuple(links), custom, name=name, source=source)


def _check_processes(hosts: tuple[Host, ...], where: str) -> None:
    """``process`` fields: on every host or on none; processes 0, 1, ... each drive at least one host, in
    host order (devices are numbered host by host and JAX numbers them process by process)."""
    given = [h for h in hosts if h.process is not None]
    if not given:
        return
    if len(given) != len(hosts):
        lacking = next(h.name for h in hosts if h.process is None)
        raise ConfigError(f"{where}: host {lacking!r} has no process field but other hosts do; set process = K "
                          "on every [[host]] or on none (then host order is process order)")
    prev = hosts[0]
    if prev.process != 0:
        raise ConfigError(f"{where}: the first host {prev.name!r} is process {prev.process}; processes start at 0 "
                          "and follow the host order (list process 0's hosts first)")
    for h in hosts[1:]:
        if h.process not in (prev.process, prev.process + 1):
            raise ConfigError(
                f"{where}: host {h.name!r} is process {h.process} after host {prev.name!r} of process "
                f"{prev.process}; list hosts in process order with no gaps (process {prev.process} or "
                f"{prev.process + 1} comes next), since devices are numbered host by host and JAX numbers "
                "them process by process")
        prev = h


def _parse_devices(r: _Reader, raw: Any) -> dict[str, DeviceSpec]:
    if not isinstance(raw, dict):
        raise r.fail("device", f"expected tables [device.NAME], got {_describe(raw)}",
                     "define each custom device as a [device.NAME] table")
    out: dict[str, DeviceSpec] = {}
    seen: dict[str, str] = {}
    for dev_name, t in raw.items():
        where = f"device.{dev_name}"
        key = normalize_name(dev_name)
        if not key:
            raise r.fail(where, "empty device name", "name the device, e.g. [device.MyCard]")
        if key in seen:
            raise r.fail(where, f"same name as device.{seen[key]} (names ignore case, '-', '_' and spaces)",
                         "rename one of them")
        seen[key] = dev_name
        t = r.table(t, where, _DEVICE_KEYS, f"write [device.{dev_name}] followed by its fields")
        base = None
        if "base" in t:
            try:
                base = lookup_device(r.string(t, "base", f"{where}.base"))
            except ConfigError as e:
                raise r.fail(f"{where}.base", str(e), "base must be a catalogue device") from None
        else:  # redefining a catalogue device overrides just the fields given
            base = next((d for n, d in DEVICES.items() if normalize_name(n) == key), None)

        def field(key: str, fallback: float | None, **kw) -> Any:
            return r.number(t, key, f"{where}.{key}", fallback, **kw)

        memory = field("memory_GiB", base and base.memory_bytes / GiB)
        tflops = field("tflops", base and base.peak_flops / 1e12)
        mem_bw = field("memory_bandwidth_GBps", base and base.memory_bandwidth_Bps / GB)
        intra = field("intra_bandwidth_GBps", base.intra_bandwidth_Bps / GB if base else
                      DEFAULT_CUSTOM_INTRA_BANDWIDTH_GBPS)
        price = field("price_per_hour", base and base.price_per_hour, positive=False)
        kind = r.string(t, "kind", f"{where}.kind", base.kind if base else "gpu")
        if kind not in KINDS:
            raise r.fail(f"{where}.kind", f"unknown kind {kind!r}", "use \"gpu\", \"tpu\" or \"cpu\"")
        profile = _parse_profile(r, t["profile"], f"{where}.profile") if "profile" in t else \
            (base.profile if base else None)
        # Unchanged fields keep the base's exact values (no unit round trip).
        out[dev_name] = DeviceSpec(
            name=dev_name,
            memory_bytes=base.memory_bytes if base and "memory_GiB" not in t else round(memory * GiB),
            peak_flops=base.peak_flops if base and "tflops" not in t else tflops * 1e12,
            memory_bandwidth_Bps=(base.memory_bandwidth_Bps if base and "memory_bandwidth_GBps" not in t
                                  else mem_bw * GB),
            intra_bandwidth_Bps=(base.intra_bandwidth_Bps if base and "intra_bandwidth_GBps" not in t
                                 else intra * GB),
            price_per_hour=price,
            kind=kind,
            profile=profile,
        )
        if out[dev_name] == DEVICES.get(dev_name):
            out[dev_name] = DEVICES[dev_name]
        if out[dev_name].memory_bytes <= 0:
            raise r.fail(f"{where}.memory_GiB", f"rounds to {out[dev_name].memory_bytes} bytes", "use a larger value")
    return out


def _included_devices(r: _Reader, paths: Any, source: str) -> dict[str, Any]:
    """The ``[device.NAME]`` tables of the profile files a cluster file lists in ``profiles = [...]``
    (paths relative to the cluster file), later files winning."""
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise r.fail("profiles", f"expected an array of file paths, got {_describe(paths)}",
                     'write profiles = ["my-device.toml"] (files written by `hexjax calibrate`)')
    base = Path(source).parent if not source.startswith("<") else Path.cwd()
    out: dict[str, Any] = {}
    for k, p in enumerate(paths):
        path = base / p
        if not path.is_file():
            raise r.fail(f"profiles[{k}]", f"no such profile file {str(path)!r}",
                         "write it with `hexjax calibrate --out FILE` or fix the path (relative to the cluster file)")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise r.fail(f"profiles[{k}]", f"{path} is not valid TOML ({e})", "fix or rewrite the profile") from None
        tables = data.get("device")
        if not isinstance(tables, dict) or not tables:
            raise r.fail(f"profiles[{k}]", f"{path} has no [device.NAME] table",
                         "use a file written by `hexjax calibrate`")
        out.update(tables)
    return out


def _parse_profile(r: _Reader, raw: Any, where: str) -> DeviceProfile:
    t = r.table(raw, where, _PROFILE_KEYS, f"write [{where}] with measured figures (`hexjax calibrate` does)")
    curves_raw = t.get("flops_efficiency")
    if not isinstance(curves_raw, dict) or not curves_raw:
        raise r.fail(f"{where}.flops_efficiency", f"expected a table of dtype = [[rows, efficiency], ...], "
                     f"got {_describe(curves_raw) if curves_raw is not None else 'nothing'}",
                     "write e.g. float32 = [[1, 0.05], [256, 0.9]]")
    curves = {}
    for dtype, pts in curves_raw.items():
        ok = isinstance(pts, list) and pts and all(
            isinstance(p, list) and len(p) == 2 and all(_is_number(x) and math.isfinite(x) for x in p) for p in pts)
        if not ok or any(not (p[0] >= 1 and 0 < p[1] <= 4) for p in pts):
            raise r.fail(f"{where}.flops_efficiency.{dtype}", f"expected [[rows >= 1, efficiency in (0, 4]], ...], "
                         f"got {pts!r}", "write pairs such as [[1, 0.05], [256, 0.9]]")
        curves[dtype] = tuple(tuple(p) for p in pts)
    source = t.get("source", "")
    if not isinstance(source, str):
        raise r.fail(f"{where}.source", f"expected a string, got {_describe(source)}", 'write source = "..."')
    version = r.number(t, "version", f"{where}.version", 1, integer=True)
    if version not in (1, 2, PROFILE_VERSION):
        raise r.fail(f"{where}.version", f"unknown profile version {version}",
                     f"use 1 to {PROFILE_VERSION} (rewrite it with `hexjax calibrate`)")
    serving = ("copy_latency_us", "copy_GBps", "host_pass_us", "host_row_us")
    for need, keys in ((2, serving), (3, _BY_DEVICES + ("chained_copy_us",))):
        if version < need and any(k in t for k in keys):
            raise r.fail(f"{where}.version", f"{', '.join(k for k in keys if k in t)} need version = {need} "
                         "or later", f"set version = {PROFILE_VERSION} in the profile table")
    tables = {}
    for key in _BY_DEVICES:
        pts = t.get(key, [])
        ok = isinstance(pts, list) and all(
            isinstance(p, list) and len(p) == 2 and _is_int(p[0]) and p[0] >= 1 and _is_number(p[1])
            and math.isfinite(p[1]) and p[1] >= 0 for p in pts) and len({p[0] for p in pts}) == len(pts)
        if not ok:
            unit = "nanoseconds" if key.endswith("_ns") else "microseconds"
            raise r.fail(f"{where}.{key}", f"expected [[devices >= 1, {unit} >= 0], ...] with distinct "
                         f"device counts, got {pts!r}", f"write e.g. {key} = [[1, 60.0], [2, 150.0]]")
        tables[key] = tuple((p[0], p[1] / (1e9 if key.endswith("_ns") else 1e6)) for p in pts)
    return DeviceProfile(
        flops_efficiency=tuple(curves.items()),
        memory_efficiency=r.number(t, "memory_efficiency", f"{where}.memory_efficiency", 1.0),
        link_efficiency=r.number(t, "link_efficiency", f"{where}.link_efficiency", 1.0),
        step_overhead_s=r.number(t, "step_overhead_us", f"{where}.step_overhead_us", 0.0, positive=False) / 1e6,
        host_copy_Bps=r.number(t, "host_copy_GBps", f"{where}.host_copy_GBps", 0.0, positive=False) * GB,
        source=source,
        copy_latency_s=r.number(t, "copy_latency_us", f"{where}.copy_latency_us", 0.0, positive=False) / 1e6,
        copy_Bps=r.number(t, "copy_GBps", f"{where}.copy_GBps", 0.0, positive=False) * GB,
        host_pass_s=r.number(t, "host_pass_us", f"{where}.host_pass_us", 0.0, positive=False) / 1e6,
        host_row_s=r.number(t, "host_row_us", f"{where}.host_row_us", 0.0, positive=False) / 1e6,
        stage_overhead_s=tables["stage_overhead_us"], allreduce_s=tables["allreduce_us"],
        chunk_key_s=tables["chunk_key_ns"],
        chained_copy_s=r.number(t, "chained_copy_us", f"{where}.chained_copy_us", 0.0, positive=False) / 1e6)


def profile_to_dict(p: DeviceProfile) -> dict[str, Any]:
    """A profile as the ``[device.NAME.profile]`` table it is read from."""
    out = {"flops_efficiency": {k: [list(pt) for pt in pts] for k, pts in p.flops_efficiency},
           "memory_efficiency": p.memory_efficiency, "link_efficiency": p.link_efficiency,
           "step_overhead_us": _export_us(p.step_overhead_s), "host_copy_GBps": _export_GBps(p.host_copy_Bps),
           "source": p.source}
    serving = {"copy_latency_us": _export_us(p.copy_latency_s), "copy_GBps": _export_GBps(p.copy_Bps),
               "host_pass_us": _export_us(p.host_pass_s), "host_row_us": _export_us(p.host_row_s)}
    by_devices = {"stage_overhead_us": [[n, _export_us(v)] for n, v in p.stage_overhead_s],
                  "allreduce_us": [[n, _export_us(v)] for n, v in p.allreduce_s],
                  "chunk_key_ns": [[n, _export(v, lambda g: g / 1e9, lambda x: x * 1e9)] for n, v in p.chunk_key_s]}
    by_devices = {k: v for k, v in by_devices.items() if v}
    if p.chained_copy_s:
        by_devices["chained_copy_us"] = _export_us(p.chained_copy_s)
    if by_devices:
        out = {"version": PROFILE_VERSION, **out, **serving, **by_devices}
    elif any(v for v in serving.values()):   # a version-1 or -2 profile stays as it was written
        out = {"version": 2, **out, **serving}
    return out


# ---- small helpers ----

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _describe(v: Any) -> str:
    names = {bool: "a boolean", str: "a string", int: "an integer", float: "a number", list: "an array",
             dict: "a table"}
    return f"{names.get(type(v), type(v).__name__)} ({v!r})" if not isinstance(v, (list, dict)) \
        else names[type(v)]


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=3, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _tidy(x: float) -> int | float:
    """Integral floats as ints, so files read ``count``-like values naturally."""
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else x


def _export(x: float, forward: Callable[[float], float], backward: Callable[[float], float]) -> int | float:
    """A file value ``g`` with ``forward(g) == x`` exactly, so saving and loading round-trips."""
    g = backward(x)
    if forward(g) == x:
        return _tidy(g)
    for direction in (math.inf, -math.inf):
        h = g
        for _ in range(8):
            h = math.nextafter(h, direction)
            if forward(h) == x:
                return h
    return g


def _export_GBps(x: float) -> int | float:
    return _export(x, lambda g: g * GB, lambda b: b / GB)


def _export_us(x: float) -> int | float:
    return _export(x, lambda g: g / 1e6, lambda s: s * 1e6)


def devices_toml(dev_name: str, fields: dict[str, Any]) -> list[str]:
    """Lines of one ``[device.NAME]`` table (with its profile sub-tables)."""
    key = f"device.{_toml_key(dev_name)}"
    flat = {k: v for k, v in fields.items() if not isinstance(v, dict)}
    lines = ["", f"[{key}]"] + [f"{k} = {_toml_value(v)}" for k, v in flat.items()]
    profile = fields.get("profile")
    if profile is not None:
        lines += ["", f"[{key}.profile]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in profile.items() if not isinstance(v, dict)]
        lines += ["", f"[{key}.profile.flops_efficiency]"]
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in profile["flops_efficiency"].items()]
    return lines


def _toml_key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "-_" for c in key) else json.dumps(key)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")
