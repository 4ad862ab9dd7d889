"""A request's predicted latency covers its first token and every later one: latency >= TTFT + (n - 1) TPOT."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hexjax.cluster import Cluster, Host
from hexjax.devices import DeviceSpec
from hexjax.models.config import ModelConfig
from hexjax.plan import Plan, Replica, Stage
from hexjax.search import cost, plan
from hexjax.search.space import shapes
from hexjax.workload import Workload


@st.composite
def random_plan(draw):
    """A random cluster, any plan on it (fitting in memory or not) and a workload."""
    heads, kv = draw(st.sampled_from([(4, 2), (4, 1), (2, 2), (8, 8)]))
    cfg = ModelConfig("rand", 256, 64, 128, draw(st.integers(1, 12)), heads, kv)
    kinds = [DeviceSpec(f"d{i}", 2**30, draw(st.sampled_from([1e8, 2e9, 5e11])),
                        draw(st.sampled_from([1e7, 2e8, 3e10])), 1e7, draw(st.sampled_from([0.0, 0.5, 2.0])))
             for i in range(draw(st.integers(1, 3)))]
    hosts, first = [], 0
    for k in range(draw(st.integers(1, 4))):
        count = draw(st.integers(1, 4))
        hosts.append(Host(f"h{k}", draw(st.sampled_from(kinds)), count, draw(st.sampled_from(["x", "y"])), first,
                          draw(st.sampled_from([1e7, 5e9])), draw(st.sampled_from([1e-6, 4e-5]))))
        first += count
    cluster = Cluster(tuple(hosts), network_bandwidth_Bps=draw(st.sampled_from([5e6, 2e9])),
                      network_latency_s=draw(st.sampled_from([2e-5, 1e-3])), cross_zone_bandwidth_Bps=1e6,
                      cross_zone_latency_s=draw(st.sampled_from([1e-3, 3e-2])))
    free = {h: list(host.devices) for h, host in enumerate(hosts)}
    replicas = []
    for _ in range(draw(st.integers(1, 2))):
        order = draw(st.permutations(range(len(hosts))))
        P = draw(st.integers(1, min(len(order), cfg.num_layers)))
        cuts = sorted(draw(st.sets(st.integers(1, cfg.num_layers - 1), min_size=P - 1, max_size=P - 1))
                      if P > 1 else [])
        bounds = [0, *cuts, cfg.num_layers]
        stages = []
        for j, h in enumerate(order[:P]):
            if not free[h]:
                break
            u = draw(st.integers(1, len(free[h])))
            options = shapes(cfg, u)
            if not options:
                break
            dp, tp = draw(st.sampled_from(options))
            devs = tuple(free[h][:u])
            del free[h][:u]
            stages.append(Stage((bounds[j], bounds[j + 1]), devs, dp, tp, hosts[h].name))
        if len(stages) == P:
            replicas.append(Replica(tuple(stages)))
    if not replicas:
        replicas.append(Replica((Stage((0, cfg.num_layers), (0,), 1, 1, hosts[0].name),)))
    wl = Workload(draw(st.integers(1, 64)), draw(st.integers(1, 64)), draw(st.integers(1, 16)))
    return cluster, cfg, Plan("rand", "", tuple(replicas)), wl


def check_times(r: cost.ReplicaPrediction, n: int):
    assert r.ttft_s > 0
    if n > 1:
        assert r.tpot_s > 0
    # the batch's last request gets its first token at TTFT and then one every TPOT at best
    assert r.latency_s >= (r.ttft_s + (n - 1) * r.tpot_s) * (1 - 1e-12), (r.latency_s, r.ttft_s, r.tpot_s, n)
    # and every stage must do its own work for the whole batch
    assert r.latency_s >= max(s.busy_s for s in r.stages) * (1 - 1e-12)
    assert r.throughput_tokens_per_s == pytest.approx(n * r.requests_per_s)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_plan())
def test_latency_covers_first_token_and_every_step(problem):
    cluster, cfg, p, wl = problem
    n = wl.output_len
    pred = cost.predict(p, cfg, cluster, wl)
    for rep, r in zip(p.replicas, pred.replicas):
        check_times(r, n)
        # every microbatching the model may pick, not only the one it chose
        for mb, b in cost.microbatch_options(wl.batch, len(rep.stages)):
            check_times(cost._predict_replica(rep, cfg, cluster, wl, 2, mb, b), n)
    # the plan's latency is its worst request's
    assert pred.latency_s == max(r.latency_s for r in pred.replicas)
    assert pred.latency_s >= max(r.ttft_s + (n - 1) * r.tpot_s for r in pred.replicas) * (1 - 1e-12)


def test_searched_plans_report_the_latency_they_were_chosen_for():
    # the searches optimise the same figure the prediction reports
    c = Cluster.from_dict({"host": [{"name": "a", "device": "A6000", "count": 4},
                                    {"name": "b", "device": "A5000", "count": 2},
                                    {"name": "c", "device": "A4000", "count": 2}]})
    cfg = ModelConfig.preset("llama-2-7b")
    for wl in (Workload(512, 128, 64), Workload(1024, 32, 16), Workload(128, 1, 8)):
        for objective in ("latency", "throughput"):
            p = plan(cfg, c, wl, objective)
            pred = cost.predict(p, cfg, c, wl)
            assert p.prediction["latency_s"] == pytest.approx(pred.latency_s)
            for r in pred.replicas:
                check_times(r, wl.output_len)
