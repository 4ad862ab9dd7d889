"""Chunked prefill: long prompts fed in chunks over several steps, beside running rows."""

import numpy as np
import pytest

import hexjax
from hexjax.models.hf import LlamaModel
from hexjax.serve import Engine, SamplingParams

from test_serve_engine import TINY_UNEVEN

BUDGET = 12   # tokens per replica step: 4 rows decoding leave 8 for prefill chunks
LONG = [[(7 * i + 3 * k) % 250 + 1 for i in range(n)] for k, n in enumerate((45, 30, 52, 17, 38, 60))]


@pytest.fixture(scope="module")
def model():
    return LlamaModel.random(hexjax.ModelConfig.preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, hexjax.Plan.from_dict(TINY_UNEVEN), max_batch=4, max_model_len=64,
                  max_step_tokens=BUDGET)


def test_chunked_prefill_matches_generate(engine, model):
    """Prompts of up to 60 tokens in chunks of at most 12 (several chunks per prompt, continuing ones
    attending over their cached pages, on a tp2 | dp2 x tp2 replica and a single-device one) give
    single-device generation's greedy tokens."""
    n_new = [4, 10, 6, 12, 8, 3]
    outs = engine.generate(LONG, [SamplingParams(max_tokens=n) for n in n_new])
    want = model.generate(LONG, max(n_new))
    assert [o.token_ids for o in outs] == [w[:n] for w, n in zip(want, n_new)]
    assert max(engine.stats.step_tokens) <= BUDGET
    assert engine.stats.prefill_tokens == sum(map(len, LONG))


def test_long_prompt_does_not_stall_decoding(engine, model):
    """While a 60-token prompt is fed in chunks, the running requests get a token every step."""
    short = [[5, 6, 7], [9, 10]]
    ids = [engine.add_request(p, SamplingParams(max_tokens=30)) for p in short]
    counts = {i: 0 for i in ids}
    while min(counts.values()) < 2:   # both running
        for out in engine.step():
            counts[out.request_id] = len(out.token_ids)
    long_id = engine.add_request(LONG[5], SamplingParams(max_tokens=3))
    steps_to_first, long_out = 0, None
    while long_out is None:
        before = dict(counts)
        outs = {o.request_id: o for o in engine.step()}
        steps_to_first += 1
        for i in ids:   # each running request got exactly one token this step
            assert len(outs[i].new_token_ids) == 1, (steps_to_first, outs.get(i))
            counts[i] = before[i] + 1
        if long_id in outs:
            long_out = outs[long_id]
        assert steps_to_first < 50
    # the prompt took several steps: at most BUDGET - 2 (running rows) of its tokens per step
    assert steps_to_first >= -(-len(LONG[5]) // (BUDGET - 2))
    while engine.has_work():
        engine.step()
    want = model.generate(short + [LONG[5]], 30)
    assert engine.requests == {}
    assert long_out.token_ids == want[2][:1]


@pytest.mark.parametrize("dp,tp", [(2, 2), (1, 4)])   # (1, 4): tp above the 2 KV heads, pages replicated
def test_extend_equals_whole_prefill(model, dp, tp):
    """The stage ``extend`` program fed a prompt in chunks writes the same cache and gives the same
    last-token logits as ``prefill`` of the whole prompt (two rows)."""
    import jax
    from hexjax.models.llama import stage_params
    from hexjax.runtime.build import stage_kinds
    from hexjax.runtime.pages import PageAllocator
    from hexjax.runtime.stage import StageShape, stage_programs
    cfg = model.cfg
    plan = hexjax.Plan.from_dict({**TINY_UNEVEN, "replicas": [
        {"stages": [{"layers": [0, 4], "devices": [0, 1, 2, 3], "dp": dp, "tp": tp}]}]})
    kind = stage_kinds(cfg, plan.replicas[0], "float32")[0]
    devs = tuple(jax.devices()[:4])
    prompts = [LONG[0][:37], LONG[2][:29]]

    def run(phase, cuts):
        prog = stage_programs(kind, StageShape(2, 48, 10, 16, 4), devs)
        params = prog.place_params(stage_params(model.params, cfg, 0, 4, embed=True, head=True))
        cache = prog.empty_cache()
        alloc = PageAllocator(10, 16, dp)
        groups = [0, dp - 1]
        alloc.reserve({0: (len(prompts[0]), groups[0]), 1: (len(prompts[1]), groups[1])})
        table = alloc.block_table([0, 1], 4, groups)
        start = [0, 0]
        for cut in cuts:
            ids = np.zeros((2, 48), np.int32)
            last = np.zeros(2, np.int32)
            for b, p in enumerate(prompts):
                n = min(cut, len(p) - start[b])
                ids[b, :n] = p[start[b]:start[b] + n]
                last[b] = max(n - 1, 0)
            pos = np.array(start, np.int32)[:, None] + np.arange(48, dtype=np.int32)[None]
            logits, cache = prog.compiled(phase)(params, cache, ids, pos, last, table)
            start = [min(s + cut, len(p)) for s, p in zip(start, prompts)]
        pages = [np.asarray(k)[:, alloc.pages(b)].reshape(k.shape[0], -1, k.shape[-1])[:, :len(prompts[b])]
                 for k, _ in cache for b in range(2)]
        return np.asarray(logits), pages

    whole, whole_pages = run("prefill", [48])
    chunked, chunk_pages = run("extend", [16, 13, 8])   # row 1 ends in the second chunk
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(whole_pages, chunk_pages):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_chunk_attention_equals_contiguous_attention():
    """``paged_chunk_attention_reference`` over scattered pages equals plain causal attention of the chunk's
    queries over the contiguous keys 0..end (GQA, chunks at different offsets per row, random page order)."""
    import jax.numpy as jnp
    from hexjax.kernels import flash_attention_reference, paged_chunk_attention_reference, write_kv_reference
    rng = np.random.default_rng(0)
    b, s, hq, hkv, d, ps, width = 3, 8, 4, 2, 16, 4, 8
    starts = np.array([0, 5, 17], np.int32)
    total = starts + s
    keys = jnp.asarray(rng.normal(size=(b, width * ps, hkv, d)), jnp.float32)
    vals = jnp.asarray(rng.normal(size=(b, width * ps, hkv, d)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(b, s, hq, d)), jnp.float32)
    tables = rng.permutation(np.arange(1, 1 + b * width)).reshape(b, width).astype(np.int32)
    pages = jnp.zeros((hkv, 1 + b * width, ps, d), jnp.float32)
    kp, vp = write_kv_reference(pages, pages, keys, vals, tables, np.zeros(b, np.int32))
    got = np.asarray(paged_chunk_attention_reference(q, kp, vp, tables, starts))
    for i in range(b):
        want = flash_attention_reference(q[i:i + 1], keys[i:i + 1, :total[i]], vals[i:i + 1, :total[i]],
                                         causal=True)   # bottom-right aligned: query j sees keys <= start + j
        np.testing.assert_allclose(got[i], np.asarray(want[0]), rtol=1e-5, atol=1e-5)
