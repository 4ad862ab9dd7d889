"""Plans run on 8 virtual CPU devices give the tokens and logits of one device."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

import hexjax
from hexjax.errors import ConfigError, PlanError
from hexjax.models import LlamaModel, ModelConfig, Sampling
from hexjax.models.prompts import cut_at_eos, eos_lengths
from hexjax.models.sampling import request_key, sample
from hexjax.plan import Plan, Replica, Stage
from hexjax.runtime import PagesExhaustedError, RunOptions, run_plan

# five layers so that splits are uneven; tied embeddings so the last stage holds the embedding too
TIED5 = ModelConfig("tiny5-tied", 256, 64, 128, 5, 4, 2, tie_word_embeddings=True, max_position_embeddings=256)
MODELS = {"tiny": ModelConfig.preset("tiny"), "tiny-mha": ModelConfig.preset("tiny-mha"), "tiny5-tied": TIED5}
# ragged; the 14-token prompt grows into a second KV page while decoding
PROMPTS = [[5, 17, 200, 3], [9], list(range(30, 47)), [1, 2, 3, 4, 5, 6, 7, 8], [250, 251], list(range(100, 114))]
NEW = 5


@functools.lru_cache(maxsize=None)
def oracle(name: str):
    """Single-device model, its greedy tokens, and teacher-forced logits of those tokens."""
    model = LlamaModel.random(MODELS[name], seed=1)
    tokens = model.generate(PROMPTS, NEW)
    full = teacher_forced(model, [p + g for p, g in zip(PROMPTS, tokens)])
    return model, tokens, [f[len(p) - 1:len(p) + NEW - 1] for f, p in zip(full, PROMPTS)]


def teacher_forced(model, seqs):
    """Logits [S,V] of each sequence from one cache-free forward pass (right padding is causal-safe)."""
    width = 32
    ids = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
    return np.asarray(model(ids))


def plan_of(*replicas, dtype_bytes: int = 4) -> Plan:
    """Plan from replicas given as lists of (start, stop, devices, dp, tp); float32 (runs take the
    plan's dtype), as the single-device oracle."""
    return Plan("test", "", tuple(Replica(tuple(Stage((a, b), tuple(d), dp, tp) for a, b, d, dp, tp in r))
                                   for r in replicas), dtype_bytes=dtype_bytes)


def check_against_oracle(name: str, plan: Plan, micro_batches):
    model, want, want_logits = oracle(name)
    res = run_plan(model, plan, PROMPTS, NEW, options=RunOptions(micro_batches=micro_batches), keep_logits=True)
    assert res.tokens == want, plan
    for got, ref in zip(res.logits, want_logits):
        np.testing.assert_allclose(got, ref, atol=5e-5, rtol=1e-4)


# three uneven stages with different tp, one with dp, on scattered devices, pipelined
UNEVEN = [[(0, 1, [7], 1, 1), (1, 4, [2, 5, 0, 3], 2, 2), (4, 5, [6, 1], 1, 2)]]
# tp=4 beyond the 2 KV heads (replicated KV), and two unequal replicas side by side
TWO_REPLICAS = [[(0, 3, [4, 5, 6, 7], 1, 4), (3, 4, [0], 1, 1)], [(0, 4, [1, 2], 2, 1)]]
ONE_DEVICE = [[(0, 4, [0], 1, 1)]]


@pytest.mark.parametrize("name,replicas,micro", [("tiny5-tied", UNEVEN, 3), ("tiny", TWO_REPLICAS, 2)])
def test_fixed_plans_match_single_device(name, replicas, micro):
    check_against_oracle(name, plan_of(*replicas), micro)


# random plans: tests/test_random_plans.py


def test_sampling_is_one_rule_for_every_plan_and_the_single_device_model():
    model, _, _ = oracle("tiny")
    sampling = Sampling(temperature=0.9, top_k=50, top_p=0.95, seed=7)
    a = hexjax.generate(model, plan_of(*ONE_DEVICE), PROMPTS, NEW, sampling)
    b = hexjax.generate(model, plan_of(*TWO_REPLICAS), PROMPTS, NEW, sampling, options=RunOptions(micro_batches=2))
    assert a == b
    # one rule on both paths: single-device generation samples the same tokens for the seed
    assert model.generate(PROMPTS, NEW, sampling) == a
    greedy = model.generate(PROMPTS, NEW)
    assert a != greedy  # sampling really sampled
    # teacher-forced: each token is the draw of its (request, step) key from the model's own logits
    full = teacher_forced(model, [p + g for p, g in zip(PROMPTS, a)])
    for r, (p, g) in enumerate(zip(PROMPTS, a)):
        for t in range(NEW):
            key = request_key(sampling.seed, jnp.int32(r), t)
            assert int(sample(jnp.asarray(full[r, len(p) - 1 + t])[None], key, sampling)[0]) == g[t]
    c = hexjax.generate(model, plan_of(*ONE_DEVICE), PROMPTS, NEW, Sampling(0.9, 50, 0.95, seed=8))
    assert c != a


def test_against_transformers_on_a_saved_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    LlamaModel.random(MODELS["tiny5-tied"], seed=3).save_hf(tmp_path)
    model = hexjax.load_hf(tmp_path)
    got = hexjax.generate(model, plan_of(*UNEVEN), PROMPTS, NEW, options=RunOptions(micro_batches=3))
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    for p, g in zip(PROMPTS, got):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        assert out[0, len(p):].tolist() == g


def test_eos_cuts_each_sequence_like_single_device_generation():
    model, want, want_logits = oracle("tiny")
    eos = want[0][2]                      # a token the first request generates third
    res = run_plan(model, plan_of(*TWO_REPLICAS), PROMPTS, NEW, eos_id=eos, keep_logits=True,
                   options=RunOptions(micro_batches=2))
    assert res.tokens == model.generate(PROMPTS, NEW, eos_id=eos) == cut_at_eos(want, eos)
    assert len(res.tokens[0]) <= 3
    # the logits are cut with their tokens
    assert [len(lg) for lg in res.logits] == eos_lengths(want, eos) == [len(t) for t in res.tokens]
    for got, ref in zip(res.logits, want_logits):
        np.testing.assert_allclose(got, ref[:len(got)], atol=5e-5, rtol=1e-4)


def test_out_of_pages_is_a_clear_error():
    model, _, _ = oracle("tiny")
    with pytest.raises(PagesExhaustedError, match=r"pages of 16 tokens were needed but only \d+ of 3 are free"):
        run_plan(model, plan_of(*ONE_DEVICE), PROMPTS, NEW, options=RunOptions(num_pages=4))


def test_plan_needing_more_devices_than_exist():
    with pytest.raises(PlanError, match="only 8 cpu device.*--virtual-devices 10"):
        hexjax.generate(MODELS["tiny"], plan_of([(0, 2, [0], 1, 1), (2, 4, [9], 1, 1)]), PROMPTS, 2)


def test_bad_plans_and_inputs_are_refused():
    cfg = MODELS["tiny"]
    with pytest.raises(PlanError, match="should start at layer 2"):
        hexjax.generate(cfg, plan_of([(0, 2, [0], 1, 1), (3, 4, [1], 1, 1)]), PROMPTS, 2)
    with pytest.raises(PlanError, match="stages end at layer 3"):
        hexjax.generate(cfg, plan_of([(0, 3, [0], 1, 1)]), PROMPTS, 2)
    with pytest.raises(PlanError, match="device 0 is also used"):
        hexjax.generate(cfg, plan_of([(0, 2, [0], 1, 1), (2, 4, [0], 1, 1)]), PROMPTS, 2)
    with pytest.raises(ConfigError, match="prompt 1 is empty"):
        hexjax.generate(cfg, plan_of([(0, 4, [0], 1, 1)]), [[1], []], 2)
    with pytest.raises(ConfigError, match="outside"):
        hexjax.generate(cfg, plan_of([(0, 4, [0], 1, 1)]), [[1, 256]], 2)


def test_memory_budget_caps_the_page_pool():
    from hexjax.cluster import Cluster
    from hexjax.runtime.build import page_budget
    from hexjax.search import cost
    from hexjax.workload import Workload

    cfg = MODELS["tiny"]

    def cluster(memory_bytes):
        return Cluster.from_dict({"device": {"mini": {"base": "A4000", "memory_GiB": memory_bytes / 2**30}},
                                  "host": [{"name": "h", "device": "mini", "count": 8}]})

    plan = plan_of(*ONE_DEVICE, dtype_bytes=2)   # pages of 2-byte elements
    big = cluster(2**30)
    # without a workload in the plan, the run's own: longest prompt, new tokens, all six requests at once
    wl = Workload(max(map(len, PROMPTS)), NEW, len(PROMPTS))
    c = cost.stage_cost(cfg, big.device(0), 1e11, 0, 4, 1, 1, True, True, 1, len(PROMPTS), wl, 2)
    page_bytes = 4 * 2 * cfg.num_kv_heads * cfg.head_dim * 16 * 2
    want = int((c.capacity_bytes - c.weight_bytes - c.activation_bytes) // page_bytes)
    assert page_budget(plan.replicas[0], cfg, big, 2, 16, wl) == [want]
    # room for 3 pages (one of them reserved); the six prompts need 8 (two of them take two pages)
    small = cluster((c.weight_bytes + c.activation_bytes + 3.5 * page_bytes) / (1 - cost.MEMORY_RESERVE_FRACTION))
    assert page_budget(plan.replicas[0], cfg, small, 2, 16, wl) == [3]
    # the run is refused before anything is placed, with the shortfall
    with pytest.raises(PlanError, match=r"does not fit in bfloat16: r0\.s0 on h needs .* short"):
        run_plan(MODELS["tiny"], plan, PROMPTS, NEW, cluster=small)


def test_pallas_kernels_inside_the_stage_meshes():
    """The GPU path: Pallas kernels (interpret mode here) per device inside shard_map, with dp and a
    replicated KV head (tp 2 > 1 KV head), give the single-device tokens."""
    cfg = ModelConfig("tiny-d64", 256, 128, 256, 2, 2, 1, max_position_embeddings=256)   # head dim 64
    model = LlamaModel.random(cfg, seed=0)
    prompts = [[1, 2, 3], list(range(4, 22)), [7]]
    plan = plan_of([(0, 1, [0, 1], 1, 2), (1, 2, [2, 3], 2, 1)])
    got = run_plan(model, plan, prompts, 4, options=RunOptions(attention_impl="pallas", micro_batches=1))
    assert got.tokens == model.generate(prompts, 4)
