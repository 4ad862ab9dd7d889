"""Request traces, the plan's routing table, and the engine following it."""

import json
from pathlib import Path

import numpy as np
import pytest

import hexjax
from hexjax.cluster import Cluster
from hexjax.errors import ConfigError, PlanError
from hexjax.plan import Plan
from hexjax.trace import Trace, TraceRequest, load_trace, parse_histogram, parse_jsonl

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "examples/traces"


# ---------------------------------------------------------------------------- files

def test_example_traces_load_and_follow_their_distributions():
    conv = load_trace(TRACES / "conversational.jsonl").sizes()
    docs = load_trace(TRACES / "long-document.jsonl").sizes()
    mixed = load_trace(TRACES / "mixed.jsonl").sizes()
    assert len(conv) == len(docs) == len(mixed) == 1000
    # medians as make_traces.py states them (log-normal medians 256/192 and 2500/160; clipping moves them little)
    assert 200 < np.median(conv[:, 0]) < 300 and 160 < np.median(conv[:, 1]) < 220
    assert 2200 < np.median(docs[:, 0]) < 2800 and 130 < np.median(docs[:, 1]) < 190
    assert (mixed[:, 0] >= 1024).mean() == pytest.approx(0.2, abs=0.05)    # one long document in five
    assert (conv.sum(1) <= 4096).all() and (docs.sum(1) <= 4096).all()
    hist = load_trace(TRACES / "conversational-histogram.json")
    assert len(hist) == 1000 and all((r.prompt_len & (r.prompt_len - 1)) == 0 for r in hist.requests)


def test_jsonl_with_arrivals_and_the_mean_workload():
    t = parse_jsonl('{"prompt_len": 10, "output_len": 3, "arrival_s": 0}\n\n'
                    '{"prompt_len": 21, "output_len": 4, "arrival_s": 0.5}\n')
    assert t.timed and [r.arrival_s for r in t.requests] == [0.0, 0.5]
    wl = t.workload(batch=4, rate_per_s=2.0)
    assert (wl.prompt_len, wl.output_len, wl.batch, wl.rate_per_s) == (16, 4, 4, 2.0)   # ceil of the means
    assert t.summary()["rate_per_s"] == 2.0
    assert parse_jsonl(t.to_jsonl()) == Trace(t.requests, "trace")


@pytest.mark.parametrize("text, message", [
    ('{"prompt_len": 4, "output_len": 2}\n{"prompt_len": 4', "line 2: not valid JSON"),
    ('{"prompt_len": 4}', "line 1: missing 'output_len'"),
    ('{"prompt_len": 0, "output_len": 2}', "line 1: prompt_len must be a positive integer, got 0"),
    ('{"prompt_len": 4, "output_len": 2.5}', "output_len must be a positive integer"),
    ('{"prompt_len": 4, "output_len": 2, "arival_s": 1}', "line 1: unknown field(s) arival_s"),
    ('{"prompt_len": 4, "output_len": 2, "arrival_s": 1}\n{"prompt_len": 4, "output_len": 2}',
     "line 2: arrival_s is given on some lines but not on others"),
    ('{"prompt_len": 4, "output_len": 2, "arrival_s": 1}\n{"prompt_len": 4, "output_len": 2, "arrival_s": 0.5}',
     "line 2: arrival_s 0.5 is earlier than the line before"),
    ('{"prompt_len": 4, "output_len": 2, "arrival_s": -1}', "arrival_s must be a number of seconds >= 0"),
    ('[4, 2]', "line 1: must be an object"),
    ('\n\n', "no requests in the file"),
])
def test_malformed_jsonl_names_the_line(text, message):
    with pytest.raises(ConfigError) as e:
        parse_jsonl(text, "t.jsonl")
    assert str(e.value).startswith("t.jsonl: ") and message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("d, message", [
    ({"bins": []}, "must be an object {\"histogram\""),
    ({"histogram": [{"prompt_len": 4, "output_len": 2, "count": -1}]}, "histogram[0]: count must be an integer"),
    ({"histogram": [{"prompt_len": 4, "output_len": 2, "count": 0}]}, "every bin has count 0"),
    ({"histogram": [{"prompt_len": 4, "output_len": 2}, {"prompt_len": 4, "count": 2}]},
     "histogram[1]: missing 'output_len'"),
])
def test_malformed_histogram_names_the_bin(d, message):
    with pytest.raises(ConfigError, match=None) as e:
        parse_histogram(d, "h.json")
    assert message in str(e.value)


def test_histogram_expands_its_counts():
    t = parse_histogram({"histogram": [{"prompt_len": 8, "output_len": 2, "count": 3},
                                       {"prompt_len": 64, "output_len": 16, "count": 1}]})
    assert [(r.prompt_len, r.output_len) for r in t.requests] == [(8, 2)] * 3 + [(64, 16)]


def test_trace_longer_than_the_model_is_refused():
    with pytest.raises(ConfigError, match="request 2 has prompt 500 \\+ output 13 = 513 tokens"):
        Trace((TraceRequest(4, 4), TraceRequest(500, 13))).check_model(hexjax.ModelConfig.preset("tiny"))


# ---------------------------------------------------------------------------- routing tables

PLAN2 = {"version": 1, "model": "tiny", "dtype_bytes": 4,
         "replicas": [{"stages": [{"layers": [0, 4], "devices": [0], "tp": 1}]},
                      {"stages": [{"layers": [0, 4], "devices": [1], "tp": 1}]}]}


def test_routing_round_trips_and_plans_without_it_load_unchanged(tmp_path):
    plain = Plan.from_dict(PLAN2)
    assert plain.routing is None and plain.route(100, 10) is None and "routing" not in plain.to_dict()
    table = {"version": 1, "buckets": [{"max_prompt_len": 8, "replicas": [0]},
                                       {"max_output_len": 4, "replicas": [0, 1]}, {"replicas": [1]}]}
    routed = Plan.from_dict({**PLAN2, "routing": table})
    assert routed.route(8, 100) == (0,) and routed.route(9, 4) == (0, 1) and routed.route(9, 5) == (1,)
    routed.save(tmp_path / "p.json")
    again = Plan.load(tmp_path / "p.json")
    assert again == routed and json.loads((tmp_path / "p.json").read_text())["routing"] == table


@pytest.mark.parametrize("table, message", [
    ({"version": 2, "buckets": [{"replicas": [0]}]}, "routing version 1"),
    ({"version": 1, "buckets": [{"max_prompt_len": 8, "replicas": [0]}]}, "the last bucket must have no bounds"),
    ({"version": 1, "buckets": [{"replicas": [2]}]}, "replica indices 0..1"),
    ({"version": 1, "buckets": [{"max_prompt_len": 0, "replicas": [0]}, {"replicas": [1]}]},
     "max_prompt_len: must be a positive integer"),
    ({"version": 1, "buckets": [{"replicas": [0], "weight": 2}]}, "unknown field(s) weight"),
])
def test_bad_routing_table_is_refused(table, message):
    with pytest.raises(PlanError) as e:
        Plan.from_dict({**PLAN2, "routing": table}, where="p.json")
    assert str(e.value).startswith("p.json: routing: ") and message in str(e.value)


def test_explain_shows_the_routing_table(tmp_path, hexjax):
    Plan.from_dict({**PLAN2, "routing": {"version": 1, "buckets": [{"max_prompt_len": 8, "replicas": [0]},
                                                                    {"replicas": [1]}]}}).save(tmp_path / "p.json")
    code, out, err = hexjax("explain", tmp_path / "p.json", "--cluster", ROOT / "examples/clusters/hexgen-8gpu.toml",
                            "--prompt-len", 8, "--output-len", 4)
    assert code == 0, err
    assert "routing: prompt <= 8 -> r0; any other -> r1" in out


def test_size_routing_sends_long_prompts_to_the_replicas_with_room():
    from hexjax.search.routing import size_routing
    cluster = Cluster.load(ROOT / "examples/clusters/hexgen-8gpu.toml")
    cfg = hexjax.ModelConfig.preset("llama-2-7b")
    # one replica on a 16 GiB A4000, one on a 48 GiB A6000: the A6000 holds more KV per slot
    plan = Plan.from_dict({"version": 1, "model": "llama-2-7b", "replicas": [
        {"stages": [{"layers": [0, 32], "devices": [6], "tp": 1}]},
        {"stages": [{"layers": [0, 32], "devices": [0], "tp": 1}]}]})
    assert [cluster.hosts[cluster.host_of(d)].device.name for d in (6, 0)] == ["A4000", "A6000"]
    trace = load_trace(TRACES / "mixed.jsonl")
    table = size_routing(plan, cfg, cluster, trace, max_batch=8)
    assert table.buckets[-1].replicas == (1,)                   # the longest prompts only on the A6000
    assert set(table.buckets[0].replicas) == {0, 1}             # short ones anywhere
    cut = table.buckets[0].max_prompt_len
    assert 0 < cut < max(r.prompt_len for r in trace.requests)


# ---------------------------------------------------------------------------- the engine follows the table

def _serve(engine, prompts):
    """Serve ``prompts`` to the end: ({request id: replicas that held it}, request ids)."""
    from hexjax.serve import SamplingParams
    ids = [engine.add_request(p, SamplingParams(max_tokens=4, ignore_eos=True)) for p in prompts]
    seen = {}
    while engine.has_work():
        engine.step()
        for rep in engine.replicas:
            for r in rep.slots:
                if r is not None:
                    seen.setdefault(r.id, set()).add(rep.index)
    return seen, ids


def test_engine_admits_requests_only_to_their_routed_replicas():
    from hexjax.serve import Engine
    cfg = hexjax.ModelConfig.preset("tiny")
    table = {"version": 1, "buckets": [{"max_prompt_len": 8, "replicas": [1]}, {"replicas": [0]}]}
    engine = Engine(cfg, Plan.from_dict({**PLAN2, "routing": table}), max_batch=2, max_model_len=64)
    prompts = [[1, 2, 3], [4] * 12, [5, 6], [7] * 9, [8]]
    seen, ids = _serve(engine, prompts)
    assert [seen[i] for i in ids] == [{1}, {0}, {1}, {0}, {1}]
    # without the table the same requests spread by free slots
    engine.plan = Plan.from_dict(PLAN2)
    seen, ids = _serve(engine, prompts)
    assert {0} in [seen[i] for i in ids] and {1} in [seen[i] for i in ids]
    assert [seen[i] for i in ids] != [{1}, {0}, {1}, {0}, {1}]


# ---------------------------------------------------------------------------- hexjax plan --trace

def test_plan_for_a_trace(tmp_path, hexjax):
    run = hexjax
    c8 = ROOT / "examples/clusters/hexgen-8gpu.toml"
    code, out, err = run("plan", "--cluster", c8, "--model", "llama-2-7b", "--trace", TRACES / "mixed.jsonl",
                         "--batch", "4", "--objective", "throughput", "--out", tmp_path / "p.json")
    assert code == 0, err
    plan = Plan.load(tmp_path / "p.json")
    want = load_trace(TRACES / "mixed.jsonl").workload(batch=4)
    assert plan.workload == want
    assert "trace mixed.jsonl: 1000 requests, costed at mean prompt 788 / output 232" in out
    assert "simulated p99 latency" in out
    code, out, err = run("plan", "--cluster", c8, "--model", "llama-2-7b", "--trace", TRACES / "mixed.jsonl",
                         "--prompt-len", "8")
    assert code == 2 and "--trace gives the request sizes; drop --prompt-len/--output-len" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_len": 4, "output_len": 4}\n{"prompt_len": 4, "output_len": "x"}\n')
    code, out, err = run("plan", "--cluster", c8, "--model", "llama-2-7b", "--trace", bad)
    assert code == 2 and err.startswith("error: bad.jsonl: line 2: output_len must be a positive integer")
    code, out, err = run("plan", "--cluster", c8, "--model", "llama-2-7b", "--output-len", "8")
    assert code == 2 and "give the workload: --prompt-len N --output-len N" in err and "--trace" in err
