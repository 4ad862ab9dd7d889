"""Compiler views of plans: XLA's per-device figures against the cost model, verify, dump-hlo."""

import json
import math

import pytest

from hexjax.cluster import Cluster
from hexjax.models import ModelConfig
from hexjax.plan import Plan, Replica, Stage
from hexjax.runtime.hlo import (compile_plan, compiled_layouts, dump_hlo, predict_stages, verify_plan)
from hexjax.workload import Workload

# wide enough that matmuls, not the elementwise work XLA also counts, dominate every stage's FLOPs
SMALL = ModelConfig("hlo-test", vocab_size=2048, hidden_size=256, intermediate_size=704, num_layers=4,
                    num_heads=8, num_kv_heads=4, max_position_embeddings=1024)
WORKLOAD = Workload(prompt_len=64, output_len=64, batch=8)


def plan_of(*replicas, dtype_bytes=4) -> Plan:
    return Plan("hlo-test", "", tuple(Replica(tuple(Stage((a, b), tuple(d), dp, tp) for a, b, d, dp, tp in r))
                                   for r in replicas), dtype_bytes=dtype_bytes)


PLANS = {
    # uneven three-stage pipeline: tp 2, then dp 2 x tp 2, then one device
    "uneven": plan_of([(0, 1, [0, 1], 1, 2), (1, 3, [2, 3, 4, 5], 2, 2), (3, 4, [6], 1, 1)]),
    # tp 8 beyond the 4 KV heads: every device stores, and computes, all KV heads (replicated)
    "tp8": plan_of([(0, 4, list(range(8)), 1, 8)]),
    # two replicas of different shapes
    "replicas": plan_of([(0, 4, [7], 1, 1)], [(0, 4, [0, 1, 2, 5], 2, 2)]),
}


@pytest.fixture(scope="module")
def compiled():
    out = {}
    for name, plan in PLANS.items():
        cs = compile_plan(plan, SMALL, WORKLOAD, dtype="float32")
        out[name] = (plan, cs, predict_stages(plan, SMALL, WORKLOAD, compiled_layouts(cs), dtype="float32"))
    return out


@pytest.mark.parametrize("name", sorted(PLANS))
def test_memory_and_flops_agree_with_the_cost_model(compiled, name):
    plan, compiles, pred = compiled[name]
    assert len(compiles) == 2 * sum(len(r.stages) for r in plan.replicas)
    for c in compiles:
        p = pred[(c.replica, c.stage)]
        where = f"{name} {c.name}"
        # what the runtime places equals what the cost model counts
        assert c.weight_bytes == pytest.approx(p.weight_bytes, rel=1e-9), where
        assert c.kv_bytes == pytest.approx(p.kv_bytes, rel=0.05), where
        # XLA's arguments are the weights, the KV pages and the step's inputs
        inputs = c.argument_bytes - c.weight_bytes - c.kv_bytes
        assert 0 <= inputs < 0.1 * c.argument_bytes, where
        assert c.argument_bytes - inputs == pytest.approx(p.weight_bytes + p.kv_bytes, rel=0.05), where
        if c.phase == "decode":   # decode inputs are a token or one hidden row per sequence
            assert c.argument_bytes == pytest.approx(p.weight_bytes + p.kv_bytes, rel=0.05), where
        want = p.prefill_flops if c.phase == "prefill" else p.decode_flops
        assert c.flops == pytest.approx(want, rel=0.15), where


def test_unsplit_stage_holds_exactly_its_parameters(compiled):
    _, cs, _ = compiled["replicas"]
    whole = next(c for c in cs if (c.replica, c.stage, c.phase) == (0, 0, "decode"))   # whole model, tp 1
    assert whole.weight_bytes == 4 * SMALL.num_params
    assert whole.argument_bytes > whole.weight_bytes + whole.kv_bytes


def _cluster(memory_GiB: float) -> Cluster:
    return Cluster.from_dict({
        "name": "two-hosts",
        "device": {"small-gpu": {"base": "A4000", "memory_GiB": memory_GiB}},
        "host": [{"name": "a", "device": "A6000", "count": 4}, {"name": "b", "device": "small-gpu", "count": 4}],
    })


# stage 0 on host a (A6000s), stage 1 on host b (the small devices)
TWO_HOSTS = plan_of([(0, 3, [0, 1], 1, 2), (3, 4, [4], 1, 1)])


def test_verify_flags_stages_that_do_not_fit():
    plan = TWO_HOSTS
    ok = verify_plan(plan, SMALL, _cluster(16), WORKLOAD, dtype="float32")
    assert ok.ok and [s.fits for s in ok.stages] == [True, True]
    need = ok.stages[1].compiled_bytes
    tight = verify_plan(plan, SMALL, _cluster(need * 1.05 / 2**30), WORKLOAD, dtype="float32")   # reserve: 10%
    assert not tight.ok
    assert [s.fits for s in tight.stages] == [True, False]
    assert "NO" in tight.table() and tight.stages[1].device_type == "small-gpu"


def test_dump_hlo_writes_every_stage_and_phase(tmp_path):
    compiles = dump_hlo(TWO_HOSTS, SMALL, WORKLOAD, tmp_path, cluster=_cluster(16), dtype="float32")
    for c in compiles:
        assert "stablehlo" in (tmp_path / f"{c.name}.stablehlo.mlir").read_text()
        hlo = (tmp_path / f"{c.name}.hlo.txt").read_text()
        assert hlo.startswith("HloModule") and "f32[" in hlo
        assert json.loads((tmp_path / f"{c.name}.cost.json").read_text())["flops"] > 0
        assert json.loads((tmp_path / f"{c.name}.memory.json").read_text())["argument_size_in_bytes"] > 0
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("| r0.s1 | decode |") == 2 and "capacity" in summary
    assert "all-reduce" in (tmp_path / "r0_s0_decode.hlo.txt").read_text()   # tp=2 collectives
    assert "all-reduce" not in (tmp_path / "r0_s1_decode.hlo.txt").read_text()


@pytest.mark.slow
def test_llama2_70b_plan_on_hexgen_8gpu_compiles_and_fits(tmp_path):
    from pathlib import Path
    cluster = Cluster.load(Path(__file__).parent.parent / "examples" / "clusters" / "hexgen-8gpu.toml")
    cfg = ModelConfig.preset("llama-2-70b")
    plan = Plan("llama-2-70b", "", (Replica((
        Stage((0, 46), (0, 1, 2, 3), 1, 4), Stage((46, 66), (4, 5), 1, 2), Stage((66, 80), (6, 7), 1, 2))),),
        workload=Workload(prompt_len=128, output_len=32, batch=4))
    report = verify_plan(plan, cfg, cluster)
    assert len(report.stages) == 3
    for s in report.stages:
        assert math.isfinite(s.compiled_bytes) and s.compiled_bytes > 10 * 2**30
