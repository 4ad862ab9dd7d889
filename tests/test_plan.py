"""Plan JSON (round trip, hand-written files) and validate's rules, one bad plan per rule."""

import json
from pathlib import Path

import pytest

from hexjax.cluster import Cluster
from hexjax.errors import PlanError
from hexjax.models.config import ModelConfig
from hexjax.plan import Plan, Replica, Stage
from hexjax.workload import Workload

ROOT = Path(__file__).resolve().parents[1]
C8 = Cluster.load(ROOT / "examples/clusters/hexgen-8gpu.toml")   # a6000: 0-3, a5000: 4-5, a4000: 6-7
TINY = ModelConfig.preset("tiny")        # 4 layers, 4 heads, 2 KV heads, MLP 128
L70 = ModelConfig.preset("llama-2-70b")


def hexgen_hand_plan() -> Plan:
    return Plan("llama-2-70b", C8.fingerprint(), (Replica((
        Stage((0, 44), (0, 1, 2, 3), 1, 4, "a6000"),
        Stage((44, 64), (4, 5), 1, 2, "a5000"),
        Stage((64, 80), (6, 7), 1, 2, "a4000"))),),
        Workload(512, 128, 8), "throughput", 2, {"throughput_tokens_per_s": 1.5})


def test_json_round_trip(tmp_path):
    plan = hexgen_hand_plan()
    path = tmp_path / "p.json"
    plan.save(path)
    assert Plan.load(path) == plan
    d = json.loads(path.read_text())
    assert d["version"] == 1 and d["replicas"][0]["stages"][1] == {
        "layers": [44, 64], "devices": [4, 5], "dp": 1, "tp": 2, "host": "a5000"}


def test_minimal_hand_written_plan_loads_with_defaults(tmp_path):
    path = tmp_path / "hand.json"
    path.write_text('{"version":1,"model":"tiny","replicas":[{"stages":[{"layers":[0,4],"devices":[0,1],"tp":2}]}]}')
    plan = Plan.load(path)
    (st,) = plan.replicas[0].stages
    assert (st.layers, st.devices, st.dp, st.tp, st.host) == ((0, 4), (0, 1), 1, 2, "")
    assert plan.workload is None and plan.objective == "" and plan.dtype_bytes == 2
    assert plan.cluster_fingerprint == "" and plan.prediction is None
    plan.validate(TINY, C8)


@pytest.mark.parametrize("text, words", [
    ('{"model": "tiny", "replicas": []}', "version"),
    ('{"version": 1, "replicas": [{"stages": [{"layers": [0, 4], "devices": [0]}]}]}', "model"),
    ('{"version": 1, "model": "tiny", "replicas": [{"stages": [{"layers": [0], "devices": [0]}]}]}', "layers"),
    ('{"version": 1, "model": "tiny", "replicas": [{"stages": [{"layers": [0, 4], "devices": [0], "tpp": 2}]}]}',
     "tpp"),
    ('{"version": 1, "model": "tiny", "replicas": [{"stages": [{"layers": [0, 4], "devices": [0], "tp": 0}]}]}',
     "positive"),
    ('{"version": 1, "model": "tiny", "replicas": [{"stages": [{"layers": [0, 4], "devices": [0]}]}], '
     '"workload": {"prompt_len": 4}}', "output_len"),
    ('{"version": 1, "model": "tiny", "replicas": [{"stages": []}]}', "stages"),
    ('not json', "not valid JSON"),
])
def test_malformed_files_say_where(tmp_path, text, words):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(PlanError, match=words) as e:
        Plan.load(path)
    assert str(path) in str(e.value)


def one(model, *stages, fp=""):
    return Plan(model.name, fp, (Replica(tuple(stages)),))


@pytest.mark.parametrize("plan, cfg, words", [
    (one(TINY, Stage((0, 4), (0,)), fp="0123456789ab"), TINY, "made for cluster 0123456789ab"),
    (one(TINY, Stage((1, 4), (0,))), TINY, "should start at layer 0"),
    (one(TINY, Stage((0, 2), (0,)), Stage((3, 4), (1,))), TINY, "should start at layer 2"),
    (one(TINY, Stage((0, 0), (0,)), Stage((0, 4), (1,))), TINY, "is empty"),
    (one(TINY, Stage((0, 2), (0,)), Stage((2, 3), (1,))), TINY, "last stage must stop at 4"),
    (one(TINY, Stage((0, 4), (0, 1, 2), 1, 2)), TINY, "a dp1 x tp2 mesh needs 2"),
    (one(TINY, Stage((0, 4), (8,))), TINY, "do not exist"),
    (one(TINY, Stage((0, 2), (0,)), Stage((2, 4), (0,))), TINY, "device 0 is also used"),
    (one(TINY, Stage((0, 4), (3, 4), 1, 2)), TINY, "span hosts a6000, a5000"),
    (one(TINY, Stage((0, 4), (4,), host="a6000")), TINY, "says host 'a6000'"),
    (one(TINY, Stage((0, 4), (0, 1, 2), 1, 3)), TINY, "does not divide the 4 attention heads"),
    (one(ModelConfig("odd", 64, 32, 96, 2, 8, 8), Stage((0, 2), (0, 1, 2, 3), 1, 4)),
     ModelConfig("odd", 64, 32, 90, 2, 8, 8), "MLP width 90"),
    (one(ModelConfig("kv3", 64, 48, 96, 2, 12, 3), Stage((0, 2), (0, 1), 1, 2)),
     ModelConfig("kv3", 64, 48, 96, 2, 12, 3), "does not divide the 3 KV heads"),
    (one(ModelConfig("kv2", 64, 48, 96, 2, 6, 2), Stage((0, 2), (0, 1, 2), 1, 3)),
     ModelConfig("kv2", 64, 48, 96, 2, 6, 2), "not a multiple of them"),
    (one(L70, Stage((0, 80), (0,))), L70, "needs"),
])
def test_each_rule_has_its_message(plan, cfg, words):
    problems = plan.violations(cfg, C8)
    assert any(words in p for p in problems), problems
    with pytest.raises(PlanError, match="invalid plan"):
        plan.validate(cfg, C8)


def test_every_violation_is_listed():
    plan = Plan("tiny", "", (
        Replica((Stage((0, 2), (0,)), Stage((3, 4), (9,)))),
        Replica((Stage((0, 4), (0, 1, 2), 1, 3),)),
    ))
    with pytest.raises(PlanError) as e:
        plan.validate(TINY, C8)
    text = str(e.value)
    for words in ("should start at layer 2", "do not exist", "device 0 is also used", "attention heads"):
        assert words in text
    assert text.count("\n  - ") >= 4


def test_valid_hand_plan_and_memory_check():
    hexgen_hand_plan().validate(L70, C8)
    # the same plan with a batch whose KV cache cannot fit
    with pytest.raises(PlanError, match="KV cache"):
        hexgen_hand_plan().validate(L70, C8, Workload(4096, 4096, 64))


def test_helpers():
    p = Plan.single_device("tiny", 4)
    p.validate(TINY, C8)
    q = Plan("tiny", "", (Replica((Stage((0, 1), (0, 1), 1, 2), Stage((1, 4), (4, 5), 2, 1))),))
    q.validate(TINY, C8)
    assert q.devices == (0, 1, 4, 5)
