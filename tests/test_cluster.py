"""Cluster files: loading, numbering, link lookups, round trips, fingerprints and error messages."""

import copy
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hexjax.cluster import Cluster, Host, Link
from hexjax.devices import DEVICES, DeviceSpec
from hexjax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "examples" / "clusters"
FIXTURES = sorted(CLUSTERS.glob("*.toml"))
GiB = 2**30


def raw(name: str) -> dict:
    return tomllib.loads((CLUSTERS / name).read_text())


# ---- an independent oracle: answers straight from the parsed TOML, no Cluster involved ----

def oracle_host(d: dict, i: int) -> dict:
    for h in d["host"]:
        if i < h["count"]:
            return h
        i -= h["count"]
    raise IndexError(i)


def oracle_link(d: dict, i: int, j: int) -> tuple[float, float]:
    """(bytes/s, seconds) between global devices i and j per the file's own rules."""
    if i == j:
        return math.inf, 0.0
    a, b = oracle_host(d, i), oracle_host(d, j)
    net = d.get("network", {})
    if a is b:
        bw_GBps = a.get("intra_bandwidth_GBps", DEVICES[a["device"]].intra_bandwidth_Bps / 1e9)
        return bw_GBps * 1e9, a.get("intra_latency_us", 5) / 1e6
    for link in net.get("link", []):
        if {link["a"], link["b"]} == {a["name"], b["name"]}:
            return link["bandwidth_GBps"] * 1e9, link["latency_us"] / 1e6
    if a.get("zone", "default") == b.get("zone", "default"):
        return net.get("bandwidth_GBps", 12.5) * 1e9, net.get("latency_us", 20) / 1e6
    return net.get("cross_zone_bandwidth_GBps", 1.25) * 1e9, net.get("cross_zone_latency_us", 30000) / 1e6


# ---- the example files ----

EXPECTED = {  # file: (devices, hosts, zones, {device: count})
    "hexgen-8gpu.toml": (8, 3, 1, {"A6000": 4, "A5000": 2, "A4000": 2}),
    "hexgen-full.toml": (58, 9, 4, {"RTX-3090Ti": 22, "A5000": 16, "A6000": 16, "A40": 4}),
    "hexgen-half.toml": (30, 5, 3, {"RTX-3090Ti": 22, "A5000": 8}),
    "a100-16.toml": (16, 2, 1, {"A100-40G": 16}),
    "hexiscale-mix.toml": (8, 3, 1, {"A800": 3, "RTX-4090": 3, "RTX-3090": 2}),
    "synthetic-320.toml": (320, 40, 4, None),
}


def test_every_fixture_is_checked():
    assert {p.name for p in FIXTURES} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_loads_with_expected_shape(name):
    c = Cluster.load(CLUSTERS / name)
    devices, hosts, zones, per_type = EXPECTED[name]
    assert (c.num_devices, c.num_hosts, len(c.zones)) == (devices, hosts, zones)
    assert (CLUSTERS / name).read_text().startswith("#"), "each example starts with a comment saying what it models"
    counts: dict[str, int] = {}
    for i in range(c.num_devices):
        counts[c.device(i).name] = counts.get(c.device(i).name, 0) + 1
    if per_type is not None:
        assert counts == per_type
    # numbering: host by host, in file order
    d = raw(name)
    for i in range(c.num_devices):
        assert c.hosts[c.host_of(i)].name == oracle_host(d, i)["name"]
    assert [h.first_device for h in c.hosts] == [sum(h.count for h in c.hosts[:k]) for k in range(c.num_hosts)]
    assert list(c.hosts[-1].devices)[-1] == c.num_devices - 1
    assert c.price_per_hour == pytest.approx(sum(h["count"] * DEVICES[h["device"]].price_per_hour for h in d["host"]))
    assert c.name == d["name"] == Path(name).stem


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_links_match_oracle(name):
    c = Cluster.load(CLUSTERS / name)
    d = raw(name)
    # every pair of hosts (first and last device of each), both directions, plus the diagonal
    probes = sorted({h.first_device for h in c.hosts} | {h.devices[-1] for h in c.hosts})
    for i in probes:
        for j in probes:
            bw, lat = oracle_link(d, i, j)
            assert c.bandwidth(i, j) == bw, (i, j)
            assert c.latency(i, j) == lat, (i, j)
            assert c.host_bandwidth(c.host_of(i), c.host_of(j)) == (bw if i != j else c.hosts[c.host_of(i)].intra_bandwidth_Bps)


@st.composite
def random_cluster(draw) -> dict:
    n = draw(st.integers(1, 6))
    hosts = [{"name": f"h{k}", "device": draw(st.sampled_from(sorted(DEVICES))), "count": draw(st.integers(1, 4)),
              "zone": draw(st.sampled_from(["x", "y", "z"]))} for k in range(n)]
    for h in hosts:
        if draw(st.booleans()):
            h["intra_bandwidth_GBps"] = draw(st.floats(1, 500))
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    chosen = draw(st.lists(st.sampled_from(pairs), unique=True, max_size=4)) if pairs else []
    links = [{"a": f"h{a}", "b": f"h{b}", "bandwidth_GBps": draw(st.floats(0.01, 100)),
              "latency_us": draw(st.floats(0, 1e5))} for a, b in chosen]
    net = {"bandwidth_GBps": draw(st.floats(0.1, 100)), "cross_zone_latency_us": draw(st.floats(0, 1e5)),
           "link": links}
    return {"network": net, "host": hosts}


@settings(max_examples=80, deadline=None)
@given(random_cluster())
def test_random_clusters_match_oracle(d):
    c = Cluster.from_dict(d)
    assert c.num_devices == sum(h["count"] for h in d["host"])
    for i in range(c.num_devices):
        assert c.device(i) is DEVICES[oracle_host(d, i)["device"]]
        for j in range(c.num_devices):
            assert (c.bandwidth(i, j), c.latency(i, j)) == oracle_link(d, i, j)
    assert Cluster.from_dict(c.to_dict()) == c


def test_format_reference_in_module_docstring_is_valid():
    import hexjax.cluster

    example = hexjax.cluster.__doc__.split("::", 1)[1]
    d = tomllib.loads("\n".join(line[4:] for line in example.splitlines()))
    d["host"].append({"name": "nevada-a5000", "device": "MyCard", "count": 2, "zone": "nevada"})
    c = Cluster.from_dict(d)
    assert c.bandwidth(0, 4) == 2e9 and c.latency(0, 4) == 900e-6
    assert c.device(0) == dataclasses.replace(DEVICES["A6000"], price_per_hour=0.45)
    assert c.device(4).intra_bandwidth_Bps == 16e9


def test_hexgen_8gpu_lookups():
    c = Cluster.load(CLUSTERS / "hexgen-8gpu.toml")
    assert [c.device(i).name for i in range(8)] == ["A6000"] * 4 + ["A5000"] * 2 + ["A4000"] * 2
    assert [c.host_of(i) for i in range(8)] == [0, 0, 0, 0, 1, 1, 2, 2]
    assert c.bandwidth(0, 3) == 25e9 and c.latency(0, 3) == 5e-6          # inside a host: PCIe 4
    assert c.bandwidth(3, 4) == 12.5e9 and c.latency(3, 4) == 20e-6       # same zone
    assert c.bandwidth(5, 5) == math.inf and c.latency(5, 5) == 0.0
    assert c.host_bandwidth(1, 1) == 25e9 and c.host_latency(0, 2) == 20e-6
    assert c.total_memory_bytes == (4 * 48 + 2 * 24 + 2 * 16) * GiB
    for bad in (-1, 8, 1.0):
        with pytest.raises(IndexError):
            c.device(bad)
    with pytest.raises(IndexError):
        c.host_bandwidth(0, 3)


def test_hexgen_full_zones_and_overrides():
    c = Cluster.load(CLUSTERS / "hexgen-full.toml")
    ice, nor, nev = c.host_index("iceland-3090ti-0"), c.host_index("norway-3090ti-1"), c.host_index("nevada-a5000")
    ill, ill2 = c.host_index("illinois-a6000-0"), c.host_index("illinois-a40")
    assert c.host_bandwidth(ice, nor) == c.host_bandwidth(nor, ice) == 0.125e9   # override
    assert c.host_latency(ice, nor) == 15e-3
    assert c.host_bandwidth(ice, ill) == 0.0625e9                                # cross-zone default
    assert c.host_latency(ice, ill) == 55e-3
    assert c.host_bandwidth(nev, ill) == 0.125e9                                 # override
    assert c.host_bandwidth(ill, ill2) == 3.125e9                                # same zone
    assert c.host_bandwidth(ill, ill) == 25e9                                    # inside a host
    # the half-budget cluster is the full one without Illinois
    half = Cluster.load(CLUSTERS / "hexgen-half.toml")
    assert [h.name for h in half.hosts] == [h.name for h in c.hosts if h.zone != "illinois"]


def test_synthetic_fixture_is_what_its_script_writes():
    spec = importlib.util.spec_from_file_location("make_synthetic", CLUSTERS / "make_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (CLUSTERS / "synthetic-320.toml").read_text() == module.HEADER + module.synthetic().to_toml()
    c = Cluster.load(CLUSTERS / "synthetic-320.toml")
    assert len({h.device.name for h in c.hosts}) >= 5
    assert all(h.count == 8 for h in c.hosts)
    slow = c.hosts[c.host_index("asia-east-rtx-4090-0")]
    assert slow.intra_bandwidth_Bps == 12e9 != DEVICES["RTX-4090"].intra_bandwidth_Bps


# ---- equivalence, round trips, fingerprints ----

@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_from_dict_equals_load_and_round_trips(path):
    c = Cluster.load(path)
    d = tomllib.loads(path.read_text())
    same = Cluster.from_dict(d)
    assert same == c and hash(same) == hash(c) and same.fingerprint() == c.fingerprint()
    assert same.source == "<dict>" and c.source == str(path)
    again = Cluster.from_dict(c.to_dict())
    assert again == c and again.to_dict() == c.to_dict()
    assert all(again.bandwidth(i, j) == c.bandwidth(i, j) for i in (0, c.num_devices - 1) for j in range(0, c.num_devices, 7))
    text = Cluster.from_dict(tomllib.loads(c.to_toml()))
    assert text == c and text.name == c.name
    json.dumps(c.to_dict())  # plain data


def test_round_trip_of_custom_devices_and_overrides(tmp_path):
    d = {
        "name": "custom",
        "network": {"bandwidth_GBps": 0.1, "latency_us": 0.7, "cross_zone_bandwidth_GBps": 1 / 3,
                    "link": [{"a": "x", "b": "y", "bandwidth_GBps": 2.2}]},
        "host": [
            {"name": "x", "device": "my-card", "count": 3, "zone": "a", "intra_latency_us": 1.1},
            {"name": "y", "device": "A6000", "count": 2, "zone": "b", "intra_bandwidth_GBps": 64.1},
            {"name": "z", "device": "A5000", "count": 1, "zone": "b"},
        ],
        "device": {
            "MyCard": {"memory_GiB": 20.3, "tflops": 100.7, "memory_bandwidth_GBps": 800.1, "price_per_hour": 0.5},
            "A6000": {"price_per_hour": 0.33},  # overrides only the price of the catalogue entry
            "A5000": {"price_per_hour": DEVICES["A5000"].price_per_hour},  # identical: adds nothing
        },
    }
    c = Cluster.from_dict(d)
    card = c.device(0)
    assert card.name == "MyCard" and card.memory_bytes == round(20.3 * GiB) and card.peak_flops == 100.7e12
    assert card.intra_bandwidth_Bps == 16e9                      # default for custom devices
    assert c.device(3) == dataclasses.replace(DEVICES["A6000"], price_per_hour=0.33)
    assert c.device(5) is DEVICES["A5000"]
    assert [x.name for x in c.custom_devices] == ["MyCard", "A6000"]
    assert c.bandwidth(0, 3) == 2.2 * 1e9 and c.latency(0, 3) == 30e-3  # link keeps the cross-zone latency
    assert c.bandwidth(3, 5) == 0.1e9 and c.latency(3, 5) == 0.7 / 1e6
    assert c.bandwidth(3, 4) == 64.1 * 1e9 and c.latency(0, 1) == 1.1 / 1e6
    assert c.price_per_hour == pytest.approx(3 * 0.5 + 2 * 0.33 + DEVICES["A5000"].price_per_hour)
    assert Cluster.from_dict(c.to_dict()) == c
    f = tmp_path / "custom.toml"
    f.write_text(c.to_toml())
    assert Cluster.load(f) == c


def test_device_base_fills_missing_fields():
    c = Cluster.from_dict({"host": [{"name": "h", "device": "Slow", "count": 1}],
                           "device": {"Slow": {"base": "a100-80g", "tflops": 200}}})
    assert c.device(0) == dataclasses.replace(DEVICES["A100-80G"], name="Slow", peak_flops=200e12)
    assert c.name == "cluster" and c.zones == ("default",)


def test_python_built_cluster_round_trips():
    card = DeviceSpec("Odd", 3 * GiB + 5, 1.234567e13, 3.0e11 + 1, 7e9, 0.0)
    hosts = (Host("p", card, 2, "z", 0, 7e9, 5e-6), Host("q", DEVICES["L4"], 1, "z", 2, 1.0e10 / 3, 2e-6))
    c = Cluster(hosts, links=(Link("p", "q", 1e9 / 7, 1e-3 / 3),), name="built")
    assert c.custom_devices == (card,)
    assert Cluster.from_dict(c.to_dict()) == c


@settings(max_examples=60, deadline=None)
@given(st.floats(1e-3, 1e4), st.floats(0, 1e6), st.floats(1e-3, 1e3))
def test_unit_round_trip_is_exact(bw_GBps, lat_us, tflops):
    d = {"network": {"bandwidth_GBps": bw_GBps, "latency_us": lat_us},
         "host": [{"name": "a", "device": "C", "count": 1}, {"name": "b", "device": "T4", "count": 1}],
         "device": {"C": {"memory_GiB": 1, "tflops": tflops, "memory_bandwidth_GBps": bw_GBps, "price_per_hour": 0}}}
    c = Cluster.from_dict(d)
    back = Cluster.from_dict(c.to_dict())
    assert back == c and back.bandwidth(0, 1) == c.bandwidth(0, 1) == bw_GBps * 1e9


def test_fingerprint_is_stable_and_sensitive():
    d = raw("hexgen-8gpu.toml")
    c = Cluster.from_dict(d)
    fp = c.fingerprint()
    assert len(fp) == 12 and int(fp, 16) >= 0
    assert Cluster.load(CLUSTERS / "hexgen-8gpu.toml").fingerprint() == fp
    assert Cluster.from_dict({**d, "name": "renamed"}, source="elsewhere").fingerprint() == fp
    # another process, another hash seed, same answer
    code = ("from hexjax.cluster import Cluster; "
            f"print(Cluster.load({str(CLUSTERS / 'hexgen-8gpu.toml')!r}).fingerprint())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == fp

    def changed(edit):
        e = copy.deepcopy(d)
        edit(e)
        return Cluster.from_dict(e).fingerprint()

    variants = [
        changed(lambda e: e["host"][0].update(count=3)),
        changed(lambda e: e["host"][1].update(zone="elsewhere")),
        changed(lambda e: e["host"][2].update(device="A5000")),
        changed(lambda e: e["host"][0].update(name="big")),
        changed(lambda e: e["host"][0].update(intra_bandwidth_GBps=24)),
        changed(lambda e: e["host"][0].update(intra_latency_us=6)),
        changed(lambda e: e["network"].update(bandwidth_GBps=12.4)),
        changed(lambda e: e["network"].update(latency_us=21)),
        changed(lambda e: e["network"].update(cross_zone_latency_us=1)),
        changed(lambda e: e["network"].update(link=[{"a": "a6000", "b": "a4000", "bandwidth_GBps": 1}])),
        changed(lambda e: e.update(device={"A4000": {"price_per_hour": 0.01}})),
        changed(lambda e: e.update(host=[e["host"][1], e["host"][0], e["host"][2]])),
    ]
    assert fp not in variants and len(set(variants)) == len(variants)


# ---- bad input: every case names the field and says how to fix it ----

def base() -> dict:
    return {
        "network": {"bandwidth_GBps": 12.5, "link": [{"a": "a", "b": "b", "bandwidth_GBps": 2.0}]},
        "host": [{"name": "a", "device": "A6000", "count": 4, "zone": "z"},
                 {"name": "b", "device": "A5000", "count": 2, "zone": "z"},
                 {"name": "c", "device": "MyCard", "count": 2}],
        "device": {"MyCard": {"memory_GiB": 20, "tflops": 100, "memory_bandwidth_GBps": 800, "price_per_hour": 0.5}},
    }


def test_base_is_valid():
    assert Cluster.from_dict(base()).num_devices == 8


BAD = [
    # (edit, words the message must contain)
    (lambda d: d["host"][1].pop("count"), ["host[1].count", "missing"]),
    (lambda d: d["host"][1].update(cont=2), ["host[1].cont", "unknown field", "'count'"]),
    (lambda d: d.update(hosts=[]), ["hosts", "unknown field", "'host'"]),
    (lambda d: d["network"].update(bandwith_GBps=1), ["network.bandwith_GBps", "'bandwidth_GBps'"]),
    (lambda d: d["network"]["link"][0].update(bw=1), ["network.link[0].bw", "Allowed fields"]),
    (lambda d: d["device"]["MyCard"].update(memory_GB=20), ["device.MyCard.memory_GB", "'memory_GiB'"]),
    (lambda d: d["host"][0].update(count="4"), ["host[0].count", "integer", "string"]),
    (lambda d: d["host"][0].update(count=True), ["host[0].count", "integer", "boolean"]),
    (lambda d: d["host"][0].update(count=2.5), ["host[0].count", "integer"]),
    (lambda d: d["host"][0].update(count=0), ["host[0].count", "positive"]),
    (lambda d: d["host"][2].update(count=-1), ["host[2].count", "positive"]),
    (lambda d: d["host"][0].update(name=3), ["host[0].name", "string"]),
    (lambda d: d["host"][0].pop("name"), ["host[0].name", "missing"]),
    (lambda d: d["host"][0].update(zone=""), ["host[0].zone", "non-empty"]),
    (lambda d: d["host"][0].update(intra_bandwidth_GBps=0), ["host[0].intra_bandwidth_GBps", "positive"]),
    (lambda d: d["host"][0].update(intra_latency_us=-1), ["host[0].intra_latency_us", ">= 0"]),
    (lambda d: d["network"].update(bandwidth_GBps=0), ["network.bandwidth_GBps", "positive"]),
    (lambda d: d["network"].update(cross_zone_bandwidth_GBps=-2), ["network.cross_zone_bandwidth_GBps", "positive"]),
    (lambda d: d["network"].update(bandwidth_GBps="fast"), ["network.bandwidth_GBps", "number"]),
    (lambda d: d["network"].update(latency_us=float("nan")), ["network.latency_us", "number"]),
    (lambda d: d["network"].update(cross_zone_latency_us=-5), ["network.cross_zone_latency_us", ">= 0"]),
    (lambda d: d["host"][1].update(name="a"), ["host[1].name", "duplicate", "'a'"]),
    (lambda d: d["network"]["link"][0].update(b="bb"), ["network.link[0].b", "'bb'", "'b'"]),
    (lambda d: d["network"]["link"][0].update(a="b"), ["network.link[0].b", "itself"]),
    (lambda d: d["network"]["link"].append({"a": "b", "b": "a", "latency_us": 3}), ["network.link[1]", "second link"]),
    (lambda d: d["network"]["link"].append({"a": "a", "b": "c"}), ["network.link[1]", "overrides nothing"]),
    (lambda d: d["network"]["link"][0].update(bandwidth_GBps=0), ["network.link[0].bandwidth_GBps", "positive"]),
    (lambda d: d["network"]["link"][0].pop("a"), ["network.link[0].a", "missing"]),
    (lambda d: d["network"].update(link={"a": "a"}), ["network.link", "[[network.link]]"]),
    (lambda d: d["host"][0].update(device="A600"), ["host[0].device", "'A600'", "A6000"]),
    (lambda d: d["host"][2].update(device="MyCrad"), ["host[2].device", "MyCard"]),
    (lambda d: d["device"]["MyCard"].update(memory_GiB=0), ["device.MyCard.memory_GiB", "positive"]),
    (lambda d: d["device"]["MyCard"].pop("tflops"), ["device.MyCard.tflops", "missing"]),
    (lambda d: d["device"]["MyCard"].update(memory_bandwidth_GBps=-1), ["device.MyCard.memory_bandwidth_GBps"]),
    (lambda d: d["device"]["MyCard"].update(price_per_hour=-1), ["device.MyCard.price_per_hour", ">= 0"]),
    (lambda d: d["device"]["MyCard"].update(kind="fpga"), ["device.MyCard.kind", "gpu"]),
    (lambda d: d["device"]["MyCard"].update(base="B100"), ["device.MyCard.base", "'B100'"]),
    (lambda d: d["device"].update({"my_card": {"base": "T4"}}), ["device.my_card", "MyCard"]),
    (lambda d: d.update(device=["x"]), ["device", "[device.NAME]"]),
    (lambda d: d.update(host={"name": "x"}), ["host", "[[host]]"]),
    (lambda d: d.update(host=[]), ["host", "[[host]]"]),
    (lambda d: d.pop("host"), ["host", "[[host]]"]),
    (lambda d: d["host"].append("h"), ["host[3]", "table"]),
    (lambda d: d.update(network=[1]), ["network", "table"]),
    (lambda d: d.update(name=7), ["name", "string"]),
]


@pytest.mark.parametrize("edit,words", BAD, ids=[f"{k}-{w[0]}" for k, (_, w) in enumerate(BAD)])
def test_bad_input_names_the_field(edit, words, tmp_path):
    d = base()
    edit(d)
    with pytest.raises(ConfigError) as e:
        Cluster.from_dict(d, source="my-cluster.toml")
    message = str(e.value)
    assert message.startswith("my-cluster.toml: ")
    for word in words:
        assert word in message, (word, message)


def test_bad_file_errors_name_the_file(tmp_path):
    f = tmp_path / "broken.toml"
    f.write_text('[[host]]\nname = "a"\ndevice = "A6000"\ncount = 4\nzone = "z\n')
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML.*line 5"):
        Cluster.load(f)
    f.write_text('[[host]]\nname = "a"\ndevice = "A6000"\ncount = 0\n')
    with pytest.raises(ConfigError, match=r"broken\.toml: host\[0\]\.count: must be positive"):
        Cluster.load(f)
    with pytest.raises(ConfigError, match=r"brokn\.toml: no such cluster file.*broken\.toml"):
        Cluster.load(tmp_path / "brokn.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        Cluster.load(tmp_path)
    f.write_bytes(b"name = \"\xff\"\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        Cluster.load(f)
    # the file's stem names the cluster when the file does not
    f.write_text('[[host]]\nname = "a"\ndevice = "T4"\ncount = 1\n')
    assert Cluster.load(f).name == "broken"


def test_direct_construction_checks_invariants():
    a = Host("a", DEVICES["T4"], 2, "z", 0, 12e9, 5e-6)
    with pytest.raises(ConfigError, match="numbered host by host"):
        Cluster((a, Host("b", DEVICES["T4"], 1, "z", 3, 12e9, 5e-6)))
    with pytest.raises(ConfigError, match="unique"):
        Cluster((a, Host("a", DEVICES["T4"], 1, "z", 2, 12e9, 5e-6)))
    with pytest.raises(ConfigError, match="unknown host 'c'"):
        Cluster((a,), links=(Link("a", "c", 1e9, 0.0),))
    with pytest.raises(ConfigError, match="at least one host"):
        Cluster(())
    with pytest.raises(ConfigError, match="count"):
        Host("a", DEVICES["T4"], 0, "z", 0, 12e9, 5e-6)
    with pytest.raises(ConfigError, match="no host named 'x'"):
        Cluster((a,)).host_index("x")


# ---- command line ----

def test_cli_cluster_show_and_devices():
    from typer.testing import CliRunner

    from hexjax.cli import app

    runner = CliRunner()
    path = CLUSTERS / "hexgen-8gpu.toml"
    result = runner.invoke(app, ["cluster", "show", str(path)], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    c = Cluster.load(path)
    for text in ("a6000", "a5000", "a4000", "A4000", c.fingerprint(), "8 devices", "$4.08/h", "12.5", "20 us"):
        assert text in result.output, text

    result = runner.invoke(app, ["cluster", "show", str(path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["num_devices"] == 8 and summary["fingerprint"] == c.fingerprint()
    assert Cluster.from_dict(summary["cluster"]) == c

    result = runner.invoke(app, ["cluster", "show", str(CLUSTERS / "synthetic-320.toml")], env={"COLUMNS": "160"})
    assert result.exit_code == 0 and "320 devices" in result.output and "asia-east" in result.output

    result = runner.invoke(app, ["cluster", "show", str(CLUSTERS / "missing.toml")])
    assert result.exit_code != 0 and isinstance(result.exception, ConfigError)

    result = runner.invoke(app, ["devices"], env={"COLUMNS": "160"})
    assert result.exit_code == 0
    for name in DEVICES:
        assert name in result.output
