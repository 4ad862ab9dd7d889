"""What to rent: the chooser's integer program against renting every possible set of devices and planning on
each with the planner (an independent route to the same minimum), plus offers-file errors and the CLI."""

import itertools
import json
import random
import sys

import numpy as np
import pytest

from hexjax.cluster import Cluster
from hexjax.errors import ConfigError, PlanError
from hexjax.models.config import ModelConfig
from hexjax.search.planner import plan
from hexjax.search.rent import Bucket, load_offers, offers_from_dict, rent
from hexjax.workload import Workload

CFG = ModelConfig.preset("tiny")
MODEL_BYTES = CFG.num_params * 2
KiB = 1024


def random_offers(seed: int, max_hosts: int):
    rng = random.Random(seed)
    kinds = {}
    for i in range(rng.randint(2, 3)):
        kinds[f"d{i}"] = {"memory_GiB": MODEL_BYTES * rng.choice([0.9, 1.6, 3.0, 5.0]) / 2**30,
                          "tflops": rng.choice([5e8, 2e9, 8e9]) / 1e12,
                          "memory_bandwidth_GBps": rng.choice([5e7, 2e8, 8e8]) / 1e9,
                          "intra_bandwidth_GBps": 0.01, "price_per_hour": rng.choice([0.2, 0.5, 1.0, 2.0])}
    offers, hosts = [], 0
    for name in kinds:
        for zone in rng.sample(["a", "b"], rng.randint(1, 2)):
            avail = rng.randint(1, 2)
            per = rng.choice([1, avail])
            n_hosts = -(-avail // per)
            if hosts + n_hosts > max_hosts:
                continue
            hosts += n_hosts
            offers.append({"device": name, "zone": zone, "available": avail, "per_host": per})
    net = {"bandwidth_GBps": 0.05, "latency_us": 100, "cross_zone_bandwidth_GBps": 0.005, "cross_zone_latency_us": 2000}
    return offers_from_dict({"name": f"r{seed}", "network": net, "device": kinds, "offer": offers})


def sub_cluster(cluster: Cluster, counts) -> Cluster | None:
    """The cluster with host ``k`` cut to ``counts[k]`` devices (hosts with none left out)."""
    d = cluster.to_dict()
    d["host"] = [{**h, "count": c} for h, c in zip(d["host"], counts) if c > 0]
    if not d["host"]:
        return None
    names = {h["name"] for h in d["host"]}
    if "link" in d["network"]:
        d["network"]["link"] = [l for l in d["network"]["link"] if l["a"] in names and l["b"] in names]
    return Cluster.from_dict(d)


def cheapest_plan(cluster: Cluster | None, wl: Workload, slo, max_stages: int) -> float:
    if cluster is None:
        return float("inf")
    try:
        p = plan(CFG, cluster, wl, objective="cost", slo_s=slo, max_stages=max_stages)
    except PlanError:
        return float("inf")
    return p.prediction["price_per_hour"]


def most_requests(cluster, wl, max_stages) -> float:
    return plan(CFG, cluster, wl, objective="throughput", max_stages=max_stages).prediction["requests_per_s"]


@pytest.mark.parametrize("seed", range(4))
def test_single_size_rental_equals_the_cheapest_plan_over_every_rental(seed):
    offers = random_offers(seed, max_hosts=4)
    c = offers.cluster
    wl = Workload(32, 16, 2)
    most = most_requests(c, wl, 2)
    feasible = 0
    for frac, slo in ((0.15, None), (0.35, None), (0.6, None), (0.85, None), (0.5, "tight")):
        rate = frac * most
        if slo == "tight":
            slo = 1.5 * plan(CFG, c, wl, objective="latency", max_stages=2).prediction["latency_s"]
        oracle = min(cheapest_plan(sub_cluster(c, counts), Workload(32, 16, 2, rate), slo, 2)
                     for counts in itertools.product(*(range(h.count + 1) for h in c.hosts)))
        try:
            got = rent(CFG, offers, [Bucket(32, 16, 1.0)], rate, slo, batches=(2,), max_stages=2)
        except PlanError:
            assert oracle == float("inf"), (seed, frac)
            continue
        feasible += 1
        assert got.price_per_hour == pytest.approx(oracle, rel=1e-9), (seed, frac, slo)
        # what it rents is what its plans use, and they sustain the rate
        used = sum(len(st.devices) for _, _, p in got.plans for r in p.replicas for st in r.stages)
        assert sum(got.devices) == used
        assert sum(got.requests_per_s) >= rate * (1 - 1e-9)
    assert feasible


@pytest.mark.parametrize("seed", [11, 13, 15])
def test_two_size_mix_equals_the_cheapest_split_of_every_rental(seed):
    # without sharing (each replica serves one bucket): every way to give each host's devices to the short
    # bucket, the long one or nobody, planned per bucket
    offers = random_offers(seed, max_hosts=2)
    c = offers.cluster
    mix = [Bucket(16, 8, 0.85), Bucket(64, 16, 0.15)]
    wls = [Workload(b.prompt_len, b.output_len, 2) for b in mix]
    splits = [[(a, b) for a in range(h.count + 1) for b in range(h.count + 1 - a)] for h in c.hosts]
    feasible = 0
    for frac in (0.1, 0.25, 0.4, 0.55, 0.7, 0.9):
        rate = frac * min(most_requests(c, w, 2) for w in wls)
        best = float("inf")
        for split in itertools.product(*splits):
            total = 0.0
            for k, (b, w) in enumerate(zip(mix, wls)):
                total += cheapest_plan(sub_cluster(c, [s[k] for s in split]),
                                       Workload(w.prompt_len, w.output_len, 2, b.share * rate), None, 2)
            best = min(best, total)
        try:
            got = rent(CFG, offers, mix, rate, None, batches=(2,), max_stages=2, share=False)
        except PlanError:
            assert best == float("inf"), (seed, frac)
            continue
        feasible += 1
        assert got.price_per_hour == pytest.approx(best, rel=1e-9), (seed, frac)
        assert all(r >= b.share * rate * (1 - 1e-9) for r, b in zip(got.requests_per_s, mix))
    assert feasible


def one_device_offers(seed: int):
    """2-3 device kinds that each hold the model alone, one device per machine, so every replica is one device."""
    rng = random.Random(seed)
    kinds, offers = {}, []
    for i in range(rng.randint(2, 3)):
        kinds[f"d{i}"] = {"memory_GiB": MODEL_BYTES * rng.choice([1.6, 3.0, 5.0]) / 2**30,
                          "tflops": rng.choice([5e8, 2e9, 8e9]) / 1e12,
                          "memory_bandwidth_GBps": rng.choice([5e7, 2e8, 8e8]) / 1e9,
                          "intra_bandwidth_GBps": 0.01, "price_per_hour": rng.choice([0.2, 0.5, 1.0, 2.0])}
        offers.append({"device": f"d{i}", "zone": "a", "available": rng.randint(1, 3), "per_host": 1})
    return offers_from_dict({"name": f"one{seed}", "device": kinds, "offer": offers})


def cheapest_shared_rental(offers, mix, rate, batch, slo, tpot_slo) -> float:
    """Every number of devices of each offer; per device kind and bucket the requests/s one device serves (the
    cost model on a one-device plan); a rental serves the mix if its devices' time can be divided among the
    buckets (a linear program). The least price of a rental that does."""
    from scipy.optimize import linprog

    from hexjax.plan import Plan, Replica, Stage
    from hexjax.search import cost
    c = offers.cluster
    first = [offers.offer_of_host.index(k) for k in range(len(offers.offers))]
    r = np.zeros((len(offers.offers), len(mix)))
    for k, h in enumerate(first):
        host = c.hosts[h]
        dev = sum(x.count for x in c.hosts[:h])
        for b, bk in enumerate(mix):
            wl = Workload(bk.prompt_len, bk.output_len, batch)
            p = Plan(CFG.name, c.fingerprint(), (Replica((Stage((0, CFG.num_layers), (dev,), 1, 1, host.name),)),), wl)
            pred = cost.predict(p, CFG, c, wl)
            if pred.fits and (slo is None or pred.latency_s <= slo) and (tpot_slo is None or pred.tpot_s <= tpot_slo):
                r[k, b] = pred.requests_per_s
    K, B = r.shape
    best = float("inf")
    for counts in itertools.product(*(range(o.available + 1) for o in offers.offers)):
        price = sum(n * c.hosts[h].device.price_per_hour for n, h in zip(counts, first))
        if price >= best:
            continue
        # variables f[k, b] >= 0 (requests/s of bucket b on kind k): Σ_b f/r <= n_k, Σ_k f >= share * rate
        A, rhs = [], []
        for k in range(K):
            A.append([1 / r[k, b] if r[k, b] > 0 and kk == k else 0.0 for kk in range(K) for b in range(B)])
            rhs.append(counts[k])
        for b in range(B):
            A.append([-1.0 if bb == b else 0.0 for k in range(K) for bb in range(B)])
            rhs.append(-mix[b].share * rate)
        bounds = [(0, None) if r[k, b] > 0 else (0, 0) for k in range(K) for b in range(B)]
        if linprog(np.zeros(K * B), A_ub=A, b_ub=rhs, bounds=bounds).status == 0:
            best = price
    return best


@pytest.mark.parametrize("seed", [3, 5, 6, 7])
def test_shared_replicas_equal_the_cheapest_of_every_rental(seed):
    # replicas serving several buckets (time divided among them, Mélange's packing) against every rental
    offers = one_device_offers(seed)
    mix = [Bucket(16, 8, 0.6), Bucket(64, 16, 0.25), Bucket(128, 32, 0.15)]
    c = offers.cluster
    most = 1 / sum(b.share / most_requests(c, Workload(b.prompt_len, b.output_len, 2), 1) for b in mix)
    feasible = cheaper = 0
    tight = 1.5 * plan(CFG, c, Workload(128, 32, 2), objective="latency", max_stages=1).prediction["tpot_s"]
    for frac, tpot in ((0.05, None), (0.2, None), (0.45, None), (0.7, None), (0.3, tight)):
        rate = frac * most
        oracle = cheapest_shared_rental(offers, mix, rate, 2, None, tpot)
        try:
            got = rent(CFG, offers, mix, rate, None, batches=(2,), max_stages=1, tpot_slo_s=tpot)
        except PlanError:
            assert oracle == float("inf"), (seed, frac)
            continue
        feasible += 1
        assert got.price_per_hour == pytest.approx(oracle, rel=1e-9), (seed, frac, tpot)
        assert all(r >= b.share * rate * (1 - 1e-6) for r, b in zip(got.requests_per_s, mix))
        try:
            split = rent(CFG, offers, mix, rate, None, batches=(2,), max_stages=1, tpot_slo_s=tpot,
                         share=False).price_per_hour
        except PlanError:       # one bucket per replica may not fit the offers at all where sharing does
            split = float("inf")
        assert got.price_per_hour <= split * (1 + 1e-9)
        cheaper += got.price_per_hour < split * (1 - 1e-9)
    assert feasible >= 3
    assert cheaper        # at a low rate one replica per bucket is the waste sharing removes


def test_rental_plans_are_valid_on_the_offers_cluster():
    offers = load_offers("examples/offers/two-zones.toml")
    got = rent("llama-2-7b", offers, [Bucket(512, 128, 0.8), Bucket(1536, 256, 0.2)], 3.0, 40.0)
    seen = set()
    for b, batch, p in got.plans:
        p.validate(ModelConfig.preset("llama-2-7b"), offers.cluster, p.workload)
        assert not seen & set(p.devices)
        seen |= set(p.devices)
        assert p.prediction["latency_s"] <= 40.0
    assert got.price_per_hour <= offers.cluster.price_per_hour


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d.pop("offer"), ["offer", "[[offer]]"]),
    (lambda d: d["offer"][0].update(available=0), ["offer[0].available", "positive"]),
    (lambda d: d["offer"][0].update(device="H1000"), ["H1000"]),
    (lambda d: d["offer"][0].update(count=3), ["offer[0].count", "unknown field"]),
    (lambda d: d["offer"].append(dict(d["offer"][0])), ["second offer"]),
    (lambda d: d["network"].update(zone_link=[{"a": "eu", "b": "mars", "bandwidth_GBps": 1}]), ["mars", "zone_link"]),
])
def test_bad_offers_files_say_what_is_wrong(mutate, words):
    d = {"network": {}, "offer": [{"device": "L4", "zone": "eu", "available": 2}, {"device": "A6000", "available": 1}]}
    mutate(d)
    with pytest.raises(ConfigError) as e:
        offers_from_dict(d, "offers.toml")
    for w in words:
        assert w in str(e.value)


def run_cli(monkeypatch, capsys, *args):
    from hexjax.cli import main
    monkeypatch.setattr(sys, "argv", ["hexjax", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_rent_json_and_errors(monkeypatch, capsys):
    args = ["rent", "examples/offers/two-zones.toml", "--model", "llama-2-7b", "--prompt-len", "512",
            "--output-len", "128", "--rate", "2", "--slo-ms", "30000"]
    code, out, err = run_cli(monkeypatch, capsys, *args, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["price_per_hour"] > 0 and d["rent"]
    assert sum(sum(b["served_requests_per_s"]) for b in d["buckets"]) >= 2 * (1 - 1e-6)
    for extra, word in ((["--slo-ms", "1"], "SLO"), (["--batch", "0"], "--batch"), (["--rate", "-1"], "--rate"),
                        (["--tpot-slo-ms", "0"], "--tpot-slo-ms"), (["--tpot-slo-ms", "0.001"], "per output token")):
        code, out, err = run_cli(monkeypatch, capsys, *args, *extra)
        assert code == 2 and err.startswith("error:") and "Traceback" not in err, (extra, err)
        assert word in err, (extra, err)


def test_plan_rent_is_the_rent_command(monkeypatch, capsys):
    args = ["--model", "llama-2-7b", "--prompt-len", "512", "--output-len", "128", "--rate", "2", "--batch", "8",
            "--json"]
    code, out, err = run_cli(monkeypatch, capsys, "plan", "--rent", "examples/offers/two-zones.toml", *args)
    assert code == 0, err
    via_plan = json.loads(out)
    code, out, err = run_cli(monkeypatch, capsys, "rent", "examples/offers/two-zones.toml", *args)
    assert code == 0, err
    assert json.loads(out)["price_per_hour"] == via_plan["price_per_hour"]
    code, out, err = run_cli(monkeypatch, capsys, "plan", "--rent", "examples/offers/two-zones.toml",
                             "--cluster", "examples/clusters/a100-16.toml", *args)
    assert code == 2 and "not both" in err
