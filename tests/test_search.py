"""The fast search against the exhaustive oracle, and the search's errors."""

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hexjax.cluster import Cluster, Host, Link
from hexjax.devices import DeviceSpec
from hexjax.errors import PlanError
from hexjax.models.config import ModelConfig
from hexjax.search import evaluate, plan
from hexjax.search import cost
from hexjax.search.pipeline import PipelineSearch
from hexjax.search.planner import footprints, objective_value, same_value
from hexjax.search.space import host_classes
from hexjax.workload import Workload

ROOT = Path(__file__).resolve().parents[1]
KiB = 1024


@st.composite
def small_problem(draw, max_devices=8, max_hosts=4, layers=(2, 3, 4, 5), latencies=(2e-5, 1e-4)):
    """A random uneven cluster of tiny devices, a tiny model and a workload.

    Device memory is drawn relative to the model's size so that single
    devices, hosts and pipelines over several hosts all get their turn.
    """
    heads, kv = draw(st.sampled_from([(4, 2), (4, 1), (2, 2)]))
    cfg = ModelConfig("rand", 256, 64, 128, draw(st.sampled_from(layers)), heads, kv)
    model_bytes = cfg.num_params * 2
    kinds = [DeviceSpec(f"d{i}", int(model_bytes * draw(st.sampled_from([0.3, 0.45, 0.7, 1.2, 3.0]))),
                        draw(st.sampled_from([2e8, 5e8, 2e9])), draw(st.sampled_from([2e7, 5e7, 2e8])),
                        1e7, draw(st.sampled_from([0.1, 0.25, 1.0])))
             for i in range(draw(st.integers(1, 3)))]
    hosts, first = [], 0
    for k in range(draw(st.integers(1, max_hosts))):
        count = draw(st.integers(1, 4))
        if first + count > max_devices:
            break
        hosts.append(Host(f"h{k}", draw(st.sampled_from(kinds)), count, draw(st.sampled_from(["x", "y"])), first,
                          draw(st.sampled_from([1e7, 5e7])), draw(st.sampled_from([1e-5, 4e-5]))))
        first += count
    links = ()
    if len(hosts) >= 2 and draw(st.booleans()):
        links = (Link(hosts[0].name, hosts[1].name, draw(st.sampled_from([2e6, 3e7])), 3e-5),)
    cluster = Cluster(tuple(hosts), network_bandwidth_Bps=draw(st.sampled_from([5e6, 2e7])),
                      network_latency_s=draw(st.sampled_from(latencies)), cross_zone_bandwidth_Bps=1e6,
                      cross_zone_latency_s=1e-3, links=links)
    wl = Workload(draw(st.sampled_from([4, 16])), draw(st.sampled_from([1, 4, 16])),
                  draw(st.sampled_from([1, 2, 3, 4, 8])))
    return cluster, cfg, wl


def outcome(cfg, cluster, wl, objective, **kw):
    try:
        return plan(cfg, cluster, wl, objective, max_stages=4, **kw)
    except PlanError as e:
        return e


def check_equal(cluster, cfg, wl, objective, record=True):
    fast = outcome(cfg, cluster, wl, objective)
    oracle = outcome(cfg, cluster, wl, objective, exhaustive=True)
    if isinstance(oracle, PlanError):
        assert isinstance(fast, PlanError), (str(oracle), fast)
        if record:
            event("no plan")
        return None
    assert not isinstance(fast, PlanError), (str(fast), oracle)
    fast.validate(cfg, cluster)
    oracle.validate(cfg, cluster)
    pf, po = evaluate(fast, cfg, cluster, wl), evaluate(oracle, cfg, cluster, wl)
    assert same_value(objective_value(pf, objective, wl), objective_value(po, objective, wl)), (
        objective, objective_value(pf, objective, wl), objective_value(po, objective, wl), fast, oracle)
    assert fast.prediction["throughput_tokens_per_s"] == pytest.approx(pf.throughput_tokens_per_s)
    if record:
        event(f"longest pipeline {max(len(r.stages) for r in fast.replicas)}")
        event(f"replicas {min(len(fast.replicas), 3)}{'+' if len(fast.replicas) >= 3 else ''}")
    return fast


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_problem(), st.sampled_from(["latency", "throughput", "cost"]))
def test_fast_search_matches_exhaustive(problem, objective):
    cluster, cfg, wl = problem
    check_equal(cluster, cfg, wl, objective)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_problem(), st.sampled_from([0.5, 1.0, 2.0]), st.sampled_from(["throughput", "cost"]))
def test_fast_search_matches_exhaustive_with_slo_and_rate(problem, slo_factor, objective):
    cluster, cfg, wl = problem
    try:
        fastest = plan(cfg, cluster, wl, "latency", max_stages=4).prediction["latency_s"]
    except PlanError:
        return
    wl = Workload(wl.prompt_len, wl.output_len, wl.batch, rate_per_s=(wl.batch / fastest) * slo_factor,
                  slo_s=fastest * (slo_factor + 0.5))
    check_equal(cluster, cfg, wl, objective)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_problem(max_devices=10, max_hosts=5, layers=(3, 4, 6)),
       st.sampled_from(["latency", "throughput", "cost"]))
def test_fast_search_matches_exhaustive_sweep(problem, objective):
    cluster, cfg, wl = problem
    check_equal(cluster, cfg, wl, objective)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_problem(layers=(2, 3, 4), latencies=(2e-5, 1e-4, 1e-3, 4e-3, 1e-2)))
def test_lower_bound_never_exceeds_the_best_pipeline(problem):
    # the bound lets the search skip footprints; it must hold for every footprint
    cluster, cfg, wl = problem
    sym = host_classes(cluster)
    usable = [cost.usable_memory_bytes(cluster.hosts[k.hosts[0]].device) for k in sym.classes]
    search = PipelineSearch(cfg, cluster, sym, wl)
    for fp in footprints(sym, 4, usable, 0.0):
        best = search.best(fp)
        if best is not None:
            assert search.lower_bound(fp) <= best.cycle_s * (1 + 1e-12), (fp, best)


def test_a_known_case_needs_a_pipeline_over_uneven_hosts():
    # neither host holds the model alone; together they do
    big = DeviceSpec("big", 420 * KiB, 4e9, 4e8, 1e7, 1.0)
    small = DeviceSpec("small", 150 * KiB, 5e8, 5e7, 1e7, 0.5)
    cluster = Cluster((Host("a", big, 1, "z", 0, 1e7, 1e-5), Host("b", small, 2, "z", 1, 1e7, 1e-5)))
    cfg = ModelConfig("rand", 256, 64, 128, 6, 4, 2)
    wl = Workload(4, 4, 2)
    fast = check_equal(cluster, cfg, wl, "throughput", record=False)
    assert len(fast.replicas[0].stages) == 2
    counts = [s.num_layers for s in fast.replicas[0].stages]
    assert counts[0] != counts[1]        # uneven split for uneven devices


def test_identical_hosts_form_classes():
    c = Cluster.load(ROOT / "examples/clusters/hexgen-full.toml")
    sym = host_classes(c)
    names = [[c.hosts[h].name for h in k.hosts] for k in sym.classes]
    assert ["iceland-3090ti-0", "iceland-3090ti-1"] in names
    assert ["norway-3090ti-0", "norway-3090ti-1"] in names
    assert ["illinois-a6000-0", "illinois-a6000-1"] in names
    assert ["nevada-a5000"] in names and ["illinois-a5000"] in names
    for (a, b), (bw, lat) in sym.link.items():
        for ha in sym.classes[a].hosts:
            for hb in sym.classes[b].hosts:
                if ha != hb:
                    assert (c.host_bandwidth(ha, hb), c.host_latency(ha, hb)) == (bw, lat)


def test_hexgen_8gpu_is_fast_valid_and_deterministic():
    c = Cluster.load(ROOT / "examples/clusters/hexgen-8gpu.toml")
    cfg = ModelConfig.preset("llama-2-70b")
    # 160 requests' KV cache does not fit beside the weights on the four A6000s alone
    wl = Workload(512, 128, 160)
    t0 = time.perf_counter()
    a = plan(cfg, c, wl, "throughput")
    assert time.perf_counter() - t0 < 5.0
    a.validate(cfg, c)
    b = plan(cfg, c, wl, "throughput")
    assert a.replicas == b.replicas
    # an uneven pipeline over all three hosts, different tp per stage
    (rep,) = a.replicas
    assert len(rep.stages) == 3 and len({s.tp for s in rep.stages}) == 2


def test_infeasible_model_says_the_shortfall():
    c = Cluster.from_dict({"host": [{"name": "a5000", "device": "A5000", "count": 2},
                                    {"name": "a4000", "device": "A4000", "count": 2}]})
    with pytest.raises(PlanError, match=r"needs 128\.\d GiB of weights.*shortfall 56\.7 GiB") as e:
        plan("llama-2-70b", c, Workload(512, 128, 1), "latency")
    assert "offers at most 72.0 GiB" in str(e.value)


def test_unmeetable_slo_reports_the_best_latency():
    c = Cluster.load(ROOT / "examples/clusters/hexgen-8gpu.toml")
    best = plan("llama-2-7b", c, Workload(128, 16, 1), "latency").prediction["latency_s"]
    with pytest.raises(PlanError, match=f"best end-to-end latency found is {best * 1e3:.1f} ms"):
        plan("llama-2-7b", c, Workload(128, 16, 1), "throughput", slo_s=best / 2)


def test_unreachable_rate_reports_the_most_possible():
    c = Cluster.load(ROOT / "examples/clusters/hexgen-8gpu.toml")
    with pytest.raises(PlanError, match="the most any plan serves is"):
        plan("llama-2-7b", c, Workload(128, 16, 1, rate_per_s=1e6), "cost")


def test_cost_objective_meets_the_rate_at_least_price():
    c = Cluster.load(ROOT / "examples/clusters/hexgen-8gpu.toml")
    wl = Workload(128, 16, 4, rate_per_s=1.0)
    p = plan("llama-2-7b", c, wl, "cost")
    pred = evaluate(p, "llama-2-7b", c, wl)
    assert pred.requests_per_s >= 1.0
    most = plan("llama-2-7b", c, Workload(128, 16, 4), "throughput")
    assert pred.price_per_hour <= evaluate(most, "llama-2-7b", c, wl).price_per_hour


def test_bad_objective():
    c = Cluster.load(ROOT / "examples/clusters/hexgen-8gpu.toml")
    with pytest.raises(PlanError, match="unknown objective 'speed'"):
        plan("tiny", c, Workload(4, 4), "speed")
