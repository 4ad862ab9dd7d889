"""The one stage builder: a run, a compile and a verify of the same plan and workload place the
same arrays; a run uses the plan's dtype; runs that cannot fit are refused before placing anything."""

import re

import numpy as np
import pytest

from hexjax.cluster import Cluster
from hexjax.errors import PlanError
from hexjax.models import ModelConfig
from hexjax.plan import Plan, Replica, Stage
from hexjax.runtime import compile_plan, run_plan, verify_plan
from hexjax.workload import Workload

CFG = ModelConfig("core", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=512)
WORKLOAD = Workload(prompt_len=20, output_len=6, batch=5)   # odd batch over dp 2: uneven groups


def plan_of(*replicas, dtype_bytes=4) -> Plan:
    return Plan("core", "", tuple(Replica(tuple(Stage((a, b), tuple(d), dp, tp) for a, b, d, dp, tp in r))
                                  for r in replicas), dtype_bytes=dtype_bytes)


# stages with different dp (pools cut into different ranges), tp above the KV heads, two replicas
PLAN = plan_of([(0, 1, [0, 1], 1, 2), (1, 3, [2, 3, 4, 5], 2, 2), (3, 4, [6], 1, 1)],
               [(0, 4, [7], 1, 1)])
PLAN_TP4 = plan_of([(0, 2, [0, 1, 2, 3], 1, 4), (2, 4, [4, 5], 2, 1)])


def cluster(memory_GiB: float) -> Cluster:
    return Cluster.from_dict({
        "name": "tiny-gpus",
        "device": {"T": {"base": "A4000", "memory_GiB": memory_GiB}},
        "host": [{"name": "h", "device": "T", "count": 8}],
    })


def workload_prompts(wl: Workload, replicas: int):
    rng = np.random.default_rng(0)
    return [rng.integers(0, CFG.vocab_size, wl.prompt_len).tolist() for _ in range(wl.batch * replicas)]


@pytest.mark.parametrize("plan", [PLAN, PLAN_TP4], ids=["uneven-dp", "tp4"])
def test_run_compile_and_verify_place_the_same_kv_pages(plan):
    prompts = workload_prompts(WORKLOAD, len(plan.replicas))
    run = run_plan(CFG, plan, prompts, WORKLOAD.output_len)
    compiled = compile_plan(plan, CFG, WORKLOAD, dtype="float32", micro_batches=1)
    assert {(c.replica, c.stage): c.num_pages for c in compiled} == run.kv_pages
    report = verify_plan(plan, CFG, cluster(1.0), WORKLOAD, dtype="float32")
    assert {(c.replica, c.stage): c.num_pages for c in report.compiles} == run.kv_pages
    # and the pools are what the cost model counts: whole pages per sequence plus one reserved page
    per_seq = -(-(WORKLOAD.prompt_len + WORKLOAD.output_len) // 16)
    for ri, rep in enumerate(plan.replicas):
        for si, st in enumerate(rep.stages):
            rows = -(-WORKLOAD.batch // st.dp)
            assert run.kv_pages[(ri, si)] == st.dp * (rows * per_seq + 1)


def test_a_run_uses_the_plan_dtype_unless_told_otherwise():
    prompts = [[1, 2, 3], [4, 5]]
    from hexjax.runtime import RunOptions
    assert run_plan(CFG, plan_of([(0, 4, [0], 1, 1)], dtype_bytes=2), prompts, 2).dtype == "bfloat16"
    assert run_plan(CFG, plan_of([(0, 4, [0], 1, 1)], dtype_bytes=4), prompts, 2).dtype == "float32"
    assert run_plan(CFG, plan_of([(0, 4, [0], 1, 1)], dtype_bytes=2), prompts, 2,
                    options=RunOptions(dtype="float32")).dtype == "float32"


def test_a_dtype_override_that_no_longer_fits_is_refused_with_the_shortfall():
    from hexjax.runtime import RunOptions
    from hexjax.search import cost
    bf16 = plan_of([(0, 4, [0], 1, 1)], dtype_bytes=2)
    wl = Workload(prompt_len=16, output_len=16, batch=2)
    # a device that holds the bf16 run with room to spare, but not the float32 one
    need = {e: cost.predict_replica(bf16.replicas[0], CFG, cluster(1.0), wl, e).stages[0].memory_bytes
            for e in (2, 4)}
    mem = (need[2] + need[4]) / 2 / (1 - cost.MEMORY_RESERVE_FRACTION)
    small = cluster(mem / 2**30)
    prompts = [[1] * 16, [2] * 16]
    assert run_plan(CFG, bf16, prompts, 16, cluster=small).dtype == "bfloat16"
    with pytest.raises(PlanError) as e:
        run_plan(CFG, bf16, prompts, 16, cluster=small, options=RunOptions(dtype="float32"))
    msg = str(e.value)
    assert "does not fit in float32" in msg and "short" in msg and "bfloat16" in msg
    short = re.search(r"([\d.]+) (KiB|MiB) short", msg)
    assert short, msg


def test_random_weights_too_big_for_the_host_are_refused_before_drawing():
    from hexjax.models.llama import LlamaStage, init_params
    with pytest.raises(PlanError, match=r"drawing random weights for llama-2-70b needs .* GiB of host memory"):
        init_params(LlamaStage(ModelConfig.preset("llama-2-70b")), 0)


def test_named_scopes_reach_the_hlo():
    compiled = compile_plan(plan_of([(0, 4, [0], 1, 1)]), CFG, Workload(16, 2, 1), dtype="float32",
                            phases=("decode",), keep_text=True)
    hlo = compiled[0].hlo
    for scope in ("layer_0/attention", "layer_3/mlp", "head"):
        assert scope in hlo, scope


@pytest.mark.parametrize("dps", [[1], [2], [1, 2, 1], [2, 1], [4, 2], [1, 4, 2, 1]])
def test_pools_and_microbatches_are_the_cost_models(dps):
    """For every batch and microbatching the cost model offers, the builder cuts the same microbatches
    and sizes every stage's pool to the cost model's KV pages per device (independent formulas)."""
    from hexjax.runtime.build import RunOptions, build_replica
    from hexjax.search import cost
    rep = Replica(tuple(Stage((i, i + 1), tuple(range(8 * i, 8 * i + dp)), dp, 1) for i, dp in enumerate(dps)))
    cfg = ModelConfig("pools", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=len(dps),
                      num_heads=4, num_kv_heads=2, max_position_embeddings=512)
    for batch in range(1, 14):
        for prompt, out in ((20, 6), (32, 32)):
            for micro, per in cost.microbatch_options(batch, len(dps)):
                build = build_replica(cfg, rep, [prompt] * batch, out, "float32", RunOptions(), micro_batches=micro)
                assert (build.layout.num_micro, build.layout.micro_requests) == (micro, per)
                for st, sb in zip(rep.stages, build.stages):
                    seqs = cost.kv_sequences_per_device(batch, micro, per, st.dp)
                    assert sb.shape.num_pages // st.dp == cost.kv_pages_per_device(prompt + out, seqs), \
                        (batch, micro, st.dp)
