"""Cost model against hand arithmetic on a model small enough to count by hand."""

import math

import pytest

from hexjax.cluster import Cluster, Host
from hexjax.devices import DeviceSpec
from hexjax.models.config import ModelConfig
from hexjax.plan import Plan, Replica, Stage
from hexjax.search import cost
from hexjax.workload import Workload

# h=8, f=16, 2 layers, 2 heads of 4, 1 KV head, vocab 100
CFG = ModelConfig("hand", 100, 8, 16, 2, 2, 1)
DEV = DeviceSpec("dev", 2**20, 1e9, 1e8, 1e7, 2.0)
SLOW = DeviceSpec("slow", 2**20, 5e8, 5e7, 1e7, 1.0)


def cluster(net_bw=1e6, net_lat=1e-4):
    hosts = (Host("a", DEV, 2, "z", 0, 4e6, 2e-5), Host("b", SLOW, 1, "z", 2, 4e6, 2e-5))
    return Cluster(hosts, network_bandwidth_Bps=net_bw, network_latency_s=net_lat)


def test_sizes_match_the_model_config():
    assert cost.layer_params_per_device(CFG, 1) == CFG.layer_params == 592
    for ctx in (1, 7.5, 100):
        assert cost.layer_flops_per_device(CFG, 1, ctx) == pytest.approx(CFG.layer_flops_per_token(ctx))
    big = ModelConfig.preset("llama-2-70b")
    assert cost.layer_params_per_device(big, 1) == big.layer_params


def test_kv_heads_split_or_replicated():
    # 1 KV head and tp=2: every device keeps it (replicated), queries and MLP are split
    assert cost.kv_heads_per_device(CFG, 2) == 1
    assert cost.layer_params_per_device(CFG, 2) == 8 * 8 // 2 + 2 * 8 * 4 + 8 * 8 // 2 + 3 * 8 * 16 // 2 + 2 * 8
    l70 = ModelConfig.preset("llama-2-70b")   # 8 KV heads
    assert cost.kv_heads_per_device(l70, 4) == 2
    assert cost.kv_heads_per_device(l70, 16) == 8


def test_one_stage_by_hand():
    wl = Workload(prompt_len=4, output_len=3, batch=2)
    plan = Plan("hand", "", (Replica((Stage((0, 2), (0,)),)),))
    pred = cost.predict(plan, CFG, cluster(), wl)
    (rep,) = pred.replicas
    (st,) = rep.stages
    e, h, f, q, kv, V, s, n, r, l = 2, 8, 16, 8, 4, 100, 4, 3, 2, 2
    layer = h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h
    weights = (l * layer + V * h + h + V * h) * e
    kv_cache = l * (1 * r * 1 + 1) * 16 * 2 * kv * e   # s + n = 7 tokens: one page each, plus a reserved page
    act = r * s * (2 * h + 2 * q + 2 * kv + 3 * f) * e + r * 2 * s * s * 4 + r * V * 4
    assert st.weight_bytes == weights
    assert st.kv_bytes == kv_cache
    assert st.activation_bytes == act
    matmul = 2 * (h * q + 2 * h * kv + q * h + 3 * h * f)
    pre_flops = l * r * s * (matmul + 4 * 2 * 4 * (s + 1) / 2) + r * 2 * h * V
    streamed = weights - V * h * e            # the embedding table is gathered: r * s rows of it are read
    pre_bytes = streamed + r * s * h * e + l * r * s * 2 * kv * e
    prefill = max(pre_flops / (1e9 * 0.7), pre_bytes / (1e8 * 0.8))
    # each decode step at its own context s + t, t = 1 .. n - 1, then averaged
    steps = []
    for ctx in range(s + 1, s + n):
        dec_flops = l * r * (matmul + 4 * 2 * 4 * ctx) + r * 2 * h * V
        dec_bytes = streamed + r * h * e + l * r * ctx * 2 * kv * e
        steps.append(max(dec_flops / (1e9 * 0.7), dec_bytes / (1e8 * 0.8)))
    decode = sum(steps) / len(steps)
    assert st.prefill_s == pytest.approx(prefill, rel=1e-12)
    assert st.decode_s == pytest.approx(decode, rel=1e-12)
    cycle = prefill + (n - 1) * decode
    assert rep.microbatches == 1
    assert pred.latency_s == pytest.approx(cycle)
    assert pred.ttft_s == pytest.approx(prefill)
    assert pred.tpot_s == pytest.approx(decode)
    assert pred.throughput_tokens_per_s == pytest.approx(2 * 3 / cycle)
    assert pred.price_per_hour == 2.0
    assert pred.tokens_per_dollar == pytest.approx(3600 * 6 / cycle / 2.0)


def test_tensor_parallel_collectives_by_hand():
    wl = Workload(prompt_len=4, output_len=3, batch=1)
    c1 = cost.stage_cost(CFG, DEV, 4e6, 2e-5, 1, 1, 2, False, False, 1, 1, wl)
    # the same stage with an infinitely fast, latency-free link: compute only
    c0 = cost.stage_cost(CFG, DEV, math.inf, 0.0, 1, 1, 2, False, False, 1, 1, wl)
    msg_prefill, msg_decode = 1 * 4 * 8 * 2, 1 * 1 * 8 * 2   # r * tokens * h * e
    ring = lambda m: 2 * (2 - 1) / 2 * m / (4e6 * 0.8) + 2 * (2 - 1) * 2e-5
    assert c1.prefill_s - c0.prefill_s == pytest.approx(2 * 1 * ring(msg_prefill))
    assert c1.decode_s - c0.decode_s == pytest.approx(2 * 1 * ring(msg_decode))


def test_two_stage_pipeline_hops_and_microbatches():
    wl = Workload(prompt_len=4, output_len=3, batch=2)
    c = cluster()
    plan = Plan("hand", "", (Replica((Stage((0, 1), (0, 1), 1, 2), Stage((1, 2), (2,)))),))
    pred = cost.predict(plan, CFG, c, wl)
    (rep,) = pred.replicas
    options = []
    for mb, b in ((1, 2), (2, 1)):
        s0 = cost.stage_cost(CFG, DEV, 4e6, 2e-5, 1, 1, 2, True, False, mb, b, wl)
        s1 = cost.stage_cost(CFG, SLOW, 4e6, 2e-5, 1, 1, 1, False, True, mb, b, wl)
        hop_pre = 1e-4 + b * 4 * 8 * 2 / (1e6 * 0.8)
        hop_dec = 1e-4 + b * 8 * 2 / (1e6 * 0.8)
        back = 1e-4 + b * 4 / (1e6 * 0.8)
        p0, p1 = s0.prefill_s, hop_pre + s1.prefill_s
        d0, d1 = s0.decode_s, hop_dec + s1.decode_s + back
        ttft = p0 + p1 + (mb - 1) * max(p0, p1)          # the last microbatch's prefill leaves stage 1
        tpot = max(d0 + d1, mb * max(d0, d1))             # one decode round
        options.append((ttft + 2 * tpot, ttft, tpot))
    best = min(options)
    assert rep.latency_s == pytest.approx(best[0])
    assert (rep.ttft_s, rep.tpot_s) == pytest.approx(best[1:])
    assert rep.microbatches == (1 if options[0][0] <= options[1][0] else 2)
    assert pred.price_per_hour == 2 * 2.0 + 1.0


def test_two_microbatches_by_hand():
    # two requests on two stages, each request a microbatch of its own
    wl = Workload(prompt_len=4, output_len=5, batch=2)
    rep = Replica((Stage((0, 1), (0, 1), 1, 2), Stage((1, 2), (2,))))
    pred = cost._predict_replica(rep, CFG, cluster(), wl, 2, 2, 1)
    (p0, p1), (d0, d1) = [s.prefill_s for s in pred.stages], [s.decode_s for s in pred.stages]
    assert pred.ttft_s == pytest.approx(p0 + p1 + max(p0, p1))
    assert pred.tpot_s == pytest.approx(max(d0 + d1, 2 * max(d0, d1)))
    assert pred.latency_s == pytest.approx(pred.ttft_s + 4 * pred.tpot_s)
    assert pred.throughput_tokens_per_s == pytest.approx(2 * 5 / pred.latency_s)
    # never below the period of a pipeline that overlapped batches, the bound the search uses
    busy = [s.busy_s for s in pred.stages]
    assert pred.latency_s >= max(sum(busy), 2 * max(busy))


def test_microbatches_hold_the_batch_without_empty_ones():
    assert cost.microbatch_options(1, 4) == [(1, 1)]
    assert cost.microbatch_options(5, 4) == [(1, 5), (3, 2)]      # 2 + 2 + 1, not a fourth, empty one
    assert cost.microbatch_options(8, 3) == [(1, 8), (3, 3)]
    assert cost.microbatch_requests(5, 3, 2) == [2, 2, 1]
    # a device of a dp=2 stage keeps its share of each microbatch: 1 + 1 + 1 sequences
    assert cost.kv_sequences_per_device(5, 3, 2, 2) == 3
    assert cost.kv_sequences_per_device(3, 1, 3, 2) == 2


def test_memory_rule_uses_the_workload():
    c = cluster()
    plan = Plan("hand", "", (Replica((Stage((0, 2), (0,)),)),))
    assert plan.violations(CFG, c, Workload(4, 4, 1)) == []
    # 2000 requests of 600 tokens do not fit 1 MiB
    problems = plan.violations(CFG, c, Workload(100, 500, 2000))
    assert len(problems) == 1 and "needs" in problems[0] and "KV cache" in problems[0]


def test_kv_pages_are_sized_like_the_runtime():
    from hexjax.runtime import RunOptions
    assert RunOptions().page_size == cost.KV_PAGE_TOKENS


# ---- decode integrated over the growing context, link contention, measured profiles ----

def test_mean_of_max_linear_equals_the_sum_step_by_step():
    import random
    rng = random.Random(0)
    for _ in range(300):
        a0, a1, b0, b1 = (rng.uniform(-2, 2) for _ in range(4))
        n = rng.randint(1, 40)
        want = sum(max(a0 + a1 * t, b0 + b1 * t) for t in range(n)) / n
        assert cost.mean_of_max_linear(a0, a1, b0, b1, n) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_decode_step_is_averaged_over_its_contexts():
    # KV-heavy decode on a device whose bounds cross along the way: weight reads bound the early steps,
    # attention FLOPs the late ones
    big = ModelConfig("ctx", 100, 64, 128, 1, 2, 2, max_position_embeddings=4096)
    wl = Workload(prompt_len=8, output_len=1500, batch=4)
    dev = DeviceSpec("x", 2**34, 1.6e7, 2e7, 1e9, 1.0)     # the two bounds cross near context 500
    c = cost.stage_cost(big, dev, 1e9, 0.0, 1, 1, 1, False, False, 1, 4, wl, 4)
    steps = []
    for ctx in range(wl.prompt_len + 1, wl.prompt_len + wl.output_len):
        f = cost.stage_figures(big, 1, 1, 1, False, False, 1, 4, wl, 4, decode_context=ctx)
        steps.append(max(f.decode_flops / (1.6e7 * cost.FLOPS_EFFICIENCY),
                         f.decode_bytes / (2e7 * cost.MEMORY_BANDWIDTH_EFFICIENCY)))
    assert c.decode_s == pytest.approx(sum(steps) / len(steps), rel=1e-9)
    at_mean = cost.stage_figures(big, 1, 1, 1, False, False, 1, 4, wl, 4)
    mean_only = max(at_mean.decode_flops / (1.6e7 * cost.FLOPS_EFFICIENCY),
                    at_mean.decode_bytes / (2e7 * cost.MEMORY_BANDWIDTH_EFFICIENCY))
    assert c.decode_s > mean_only * 1.01      # the crossing makes the mean of the max exceed the max at the mean


def test_replicas_sharing_a_wide_area_link_share_its_bandwidth():
    # two replicas, each a pipeline from zone x to zone y: their hops cross the one x-y link
    hosts = (Host("x0", DEV, 2, "x", 0, 4e6, 2e-5), Host("y0", SLOW, 2, "y", 2, 4e6, 2e-5))
    c = Cluster(hosts, cross_zone_bandwidth_Bps=1e5, cross_zone_latency_s=1e-3)
    wl = Workload(prompt_len=4, output_len=3, batch=1)
    rep = lambda a, b: Replica((Stage((0, 1), (a,)), Stage((1, 2), (b,))))
    one = Plan("hand", "", (rep(0, 2),))
    two = Plan("hand", "", (rep(0, 2), rep(1, 3)))
    assert cost.link_shares(two, c) == {("zones", frozenset({"x", "y"})): 2}
    free = cost.predict(two, CFG, c, wl)
    shared = cost.predict(two, CFG, c, wl, contention=True)
    alone = cost.predict(one, CFG, c, wl, contention=True)
    assert free.replicas[0].ttft_s == pytest.approx(alone.replicas[0].ttft_s)
    # the hop into stage 1 carries 4 tokens * 8 hidden * 2 bytes; at half the bandwidth it takes twice as long
    hop = lambda bw: 1e-3 + 4 * 8 * 2 / (bw * cost.LINK_EFFICIENCY)
    got = shared.replicas[1].stages[1].prefill_s - free.replicas[1].stages[1].prefill_s
    assert got == pytest.approx(hop(0.5e5) - hop(1e5), rel=1e-9)
    assert shared.throughput_tokens_per_s < free.throughput_tokens_per_s


def test_a_profile_replaces_the_efficiency_constants():
    from hexjax.devices import DeviceProfile
    prof = DeviceProfile((("bfloat16", ((1.0, 0.1), (64.0, 0.4), (4096.0, 0.9))),), 0.5, 0.25, 3e-4)
    dev = DeviceSpec("measured", 2**30, 1e9, 1e8, 1e7, 1.0, "cpu", prof)
    wl = Workload(prompt_len=16, output_len=2, batch=4)
    c = cost.stage_cost(CFG, dev, 4e6, 2e-5, 2, 1, 2, True, True, 1, 4, wl)
    f = cost.stage_figures(CFG, 2, 1, 2, True, True, 1, 4, wl)
    eff_p = 0.1 + (0.4 - 0.1) * math.log(64) / math.log(64)     # 4 rows x 16 tokens = 64 rows: a measured point
    eff_d = 0.1 + (0.4 - 0.1) * math.log(4) / math.log(64)      # 4 rows: log-linear between 1 and 64
    ring = lambda m: 2 * (2 - 1) / 2 * m / (4e6 * 0.25) + 2 * (2 - 1) * 2e-5
    gather = (2 - 1) / 2 * 4 * 100 * 4 / (4e6 * 0.25) + (2 - 1) * 2e-5
    # two all-reduces per layer (2 layers), the split embedding's all-reduce, the logits' all-gather
    comm = lambda tok: 2 * 2 * ring(4 * tok * 8 * 2) + ring(4 * tok * 8 * 2) + gather
    prefill = max(f.prefill_flops / (1e9 * eff_p), f.prefill_bytes / (1e8 * 0.5)) + 3e-4 + comm(16)
    decode = max(f.decode_flops / (1e9 * eff_d), f.decode_bytes / (1e8 * 0.5)) + 3e-4 + comm(1)
    assert c.prefill_s == pytest.approx(prefill, rel=1e-9)
    assert c.decode_s == pytest.approx(decode, rel=1e-9)
    assert prof.efficiency(2, 0.5) == 0.1 and prof.efficiency(2, 1e6) == 0.9
    assert prof.efficiency(4, 64) == pytest.approx(0.4)          # float32 not measured: the nearest width's curve


def test_serving_mesh_terms_by_hand():
    """A profile's stage overhead, all-reduce and chunk-attention figures by mesh size enter a serving step
    as the docstring says, against the planner's step of the same stage: the overhead replaces the launch,
    each collective's latency is the measured one at tp devices instead of the ring's, and a prefill adds
    l r s (T - s) heads/tp key seconds. Without them (or outside serving) the step is the planner's."""
    import dataclasses
    from hexjax.devices import DeviceProfile
    plain = DeviceProfile((("bfloat16", ((1.0, 0.1), (64.0, 0.4))),), 0.5, 0.25, 3e-4)
    prof = dataclasses.replace(plain, stage_overhead_s=((1, 1e-4), (4, 7e-4)), allreduce_s=((2, 5e-5), (4, 9e-5)),
                               chunk_key_s=((1, 2e-9), (2, 3e-9)))
    dev = DeviceSpec("measured", 2**30, 1e9, 1e8, 1e7, 1.0, "cpu", prof)
    bare = dataclasses.replace(dev, profile=plain)
    wl = Workload(prompt_len=16, output_len=2, batch=4)
    lat = 2e-5
    for first, last in ((True, True), (False, False), (True, False)):
        args = (CFG, 4e6, lat, 2, 1, 2, first, last, 1, 4, wl)
        planner = cost.stage_cost(args[0], dev, *args[1:])
        served = cost.stage_cost(args[0], dev, *args[1:], serving=True, table_tokens=64)
        # collectives: 2 per layer, the split embedding's all-reduce, the logits' all-gather
        n_ar, n_ag = 2 * 2 + first, int(last)
        overhead = (1e-4 + (7e-4 - 1e-4) * (2 - 1) / (4 - 1)) - 3e-4      # 2 devices: between 1 and 4
        comm = n_ar * (5e-5 - 2 * (2 - 1) * lat) + n_ag * (5e-5 - (2 - 1) * lat)
        chunk = 2 * 4 * 16 * (64 - 16) * (2 / 2) * 3e-9
        assert served.decode_s - planner.decode_s == pytest.approx(overhead + comm, rel=1e-9)
        assert served.prefill_s - planner.prefill_s == pytest.approx(overhead + comm + chunk, rel=1e-9)
        # no block table given: no chunk term; a profile without the fields: the planner's step, bit for bit
        nochunk = cost.stage_cost(args[0], dev, *args[1:], serving=True)
        assert nochunk.prefill_s - planner.prefill_s == pytest.approx(overhead + comm, rel=1e-9)
        assert cost.stage_cost(args[0], bare, *args[1:], serving=True, table_tokens=64) == \
            cost.stage_cost(args[0], bare, *args[1:])
    assert DeviceProfile.by_devices(prof.stage_overhead_s, 8) == 7e-4 and DeviceProfile.by_devices((), 2) is None
