"""The serving engine: continuous batching over an uneven plan agrees with single-device generation."""

import asyncio

import numpy as np
import pytest

import hexjax
from hexjax.errors import ConfigError
from hexjax.models.hf import LlamaModel
from hexjax.models.sampling import Sampling
from hexjax.serve import Engine, SamplingParams

# an uneven plan for the tiny preset: replica 0 is tp=2 then dp=2 x tp=2, replica 1 one device
TINY_UNEVEN = {
    "version": 1, "model": "tiny", "cluster_fingerprint": "", "objective": "hand-written", "dtype_bytes": 4,
    "replicas": [
        {"stages": [{"layers": [0, 1], "devices": [0, 1], "dp": 1, "tp": 2},
                    {"layers": [1, 4], "devices": [2, 3, 4, 5], "dp": 2, "tp": 2}]},
        {"stages": [{"layers": [0, 4], "devices": [6], "dp": 1, "tp": 1}]},
    ],
}
PROMPTS = [[1, 2, 3], [4, 5], [7, 8, 9, 10, 11], [3] * 20, [5, 6], [9], [100, 101, 102], [42] * 7,
           [11, 12, 13, 14], [200, 1]]


@pytest.fixture(scope="module")
def cfg():
    return hexjax.ModelConfig.preset("tiny")


@pytest.fixture(scope="module")
def plan():
    return hexjax.Plan.from_dict(TINY_UNEVEN)


@pytest.fixture(scope="module")
def model(cfg):
    return LlamaModel.random(cfg, seed=0)


@pytest.fixture(scope="module")
def engine(model, plan):
    return Engine(model, plan, max_batch=4, max_model_len=64)


@pytest.fixture(scope="module")
def want(model):
    """Single-device greedy tokens, 40 per prompt (prefixes serve shorter runs)."""
    return model.generate(PROMPTS, 40)


def _all_pages_free(eng):
    for rep in eng.replicas:
        for a in rep.allocators:
            assert a.num_free() == a.num_pages - a.num_shards
        assert all(s is None for s in rep.slots)


def test_greedy_matches_generate(engine, cfg, plan, want):
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=12))
    assert [o.token_ids for o in outs] == [w[:12] for w in want]
    assert all(o.finished and o.finish_reason == "length" for o in outs)
    # the runtime's static-batch generation through the same plan agrees too
    assert hexjax.generate(cfg, plan, PROMPTS[:4], max_new_tokens=12) == [w[:12] for w in want[:4]]
    _all_pages_free(engine)
    assert engine.stats.preemptions == 0


def test_requests_join_between_steps(engine, want):
    lengths = [5, 17, 9, 30, 3, 12, 21, 8, 14, 6]
    ids = {}
    pending = list(range(len(PROMPTS)))
    final = {}
    step = 0
    while pending or len(final) < len(PROMPTS):
        if pending and step % 2 == 0:   # a new request every other step
            i = pending.pop(0)
            ids[engine.add_request(PROMPTS[i], SamplingParams(max_tokens=lengths[i]))] = i
        for out in engine.step():
            if out.finished:
                final[ids[out.request_id]] = out.token_ids
        step += 1
        assert step < 500
    assert [final[i] for i in range(len(PROMPTS))] == [w[:n] for w, n in zip(want, lengths)]
    _all_pages_free(engine)


def test_prefill_leaves_other_rows_untouched(engine):
    rep = engine.replicas[1]   # one stage on one device: its pages can be read directly

    def written(r):
        """Keys and values of every position request ``r`` has fed so far, per layer."""
        pages = rep.allocators[0].pages(r.id)
        n = len(r.prompt) + len(r.output) - 1
        return [np.asarray(c)[:, pages].reshape(c.shape[0], -1, c.shape[-1])[:, :n]
                for layer in rep.caches[0] for c in layer]

    engine.add_request([1, 2, 3, 4, 5], SamplingParams(max_tokens=20))
    engine.add_request([6, 7], SamplingParams(max_tokens=20))
    for _ in range(3):
        engine.step()
    running = [r for r in rep.slots if r is not None]
    assert running
    before = {r.id: written(r) for r in running}
    for _ in range(6):
        engine.add_request([9, 9, 9], SamplingParams(max_tokens=2))
    engine.step()   # prefills new rows on both replicas and decodes the old rows
    assert sum(r is not None for r in rep.slots) > len(running)
    for r in running:
        for b, a in zip(before[r.id], written(r)):
            np.testing.assert_array_equal(b, a[:, :b.shape[1]])
    while engine.has_work():
        engine.step()
    _all_pages_free(engine)


def test_tiny_page_pool_preempts_and_matches(model, plan, want):
    # 3 pages per data-parallel range (2 usable): 4 rows of up to 60 tokens cannot all fit
    eng = Engine(model, plan, max_batch=4, max_model_len=64, num_pages=[8, 6])
    outs = eng.generate(PROMPTS[:8], SamplingParams(max_tokens=40))
    assert eng.stats.preemptions > 0
    assert [o.token_ids for o in outs] == [w[:40] for w in want[:8]]
    _all_pages_free(eng)


def test_sampling_seed_ignores_batch_mates(engine, model):
    sp = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, top_k=50, seed=1234)
    alone = engine.generate([PROMPTS[2]], sp)[0].token_ids
    mixed = engine.generate([PROMPTS[0], PROMPTS[2], PROMPTS[5]],
                            [SamplingParams(max_tokens=7, temperature=1.0, seed=5), sp,
                             SamplingParams(max_tokens=12)])
    assert mixed[1].token_ids == alone
    # the same draws as single-device generation of that one prompt with that seed
    ref = model.generate([PROMPTS[2]], 10, Sampling(temperature=0.8, top_k=50, top_p=0.9, seed=1234))[0]
    assert alone == ref
    assert engine.generate([PROMPTS[2]], sp)[0].token_ids == alone


def test_min_p_matches_single_device_and_one_means_greedy(engine, model, want):
    sp = SamplingParams(max_tokens=10, temperature=1.5, top_k=40, min_p=0.3, seed=77)
    got = engine.generate([PROMPTS[1]], sp)[0].token_ids
    assert got == model.generate([PROMPTS[1]], 10, Sampling(temperature=1.5, top_k=40, min_p=0.3, seed=77))[0]
    # min_p = 1 keeps only the most likely token: hot sampling becomes greedy (and is not greedy without it)
    hot = dict(max_tokens=10, temperature=2.0, seed=3)
    assert engine.generate([PROMPTS[3]], SamplingParams(**hot, min_p=1.0))[0].token_ids == want[3][:10]
    assert engine.generate([PROMPTS[3]], SamplingParams(**hot))[0].token_ids != want[3][:10]


def test_stop_tokens_and_eos(engine, want):
    w = want[0]
    stop = w[4]
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=30, stop_token_ids=[stop]))[0]
    assert out.token_ids == w[:w.index(stop) + 1] and out.finish_reason == "stop"
    engine.eos_token_id = w[2]
    try:
        out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=30))[0]
        assert out.token_ids == w[:w.index(w[2]) + 1] and out.finish_reason == "stop"
        out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=8, ignore_eos=True))[0]
        assert out.token_ids == w[:8] and out.finish_reason == "length"
    finally:
        engine.eos_token_id = None
    _all_pages_free(engine)


def test_bad_requests(engine):
    with pytest.raises(ConfigError):
        engine.add_request([1, 2], SamplingParams(max_tokens=63))   # over the 64-token context
    with pytest.raises(ConfigError):
        engine.add_request([], SamplingParams())
    with pytest.raises(ConfigError):
        engine.add_request([1, 10 ** 6], SamplingParams())
    with pytest.raises(ConfigError):
        SamplingParams(max_tokens=0)
    with pytest.raises(ConfigError):
        SamplingParams(top_p=0)
    assert not engine.has_work()


def test_stream_background_loop(engine, want):
    async def main():
        async def one(i, n):
            toks = []
            async for t in engine.stream_tokens(PROMPTS[i], SamplingParams(max_tokens=n)):
                toks.append(t)
            return toks
        return await asyncio.gather(*(one(i, 6 + i) for i in range(6)))
    try:
        got = asyncio.run(asyncio.wait_for(main(), 120))
        assert got == [want[i][:6 + i] for i in range(6)]
        # generate goes through the background loop while it runs
        assert [o.token_ids for o in engine.generate(PROMPTS[:3], SamplingParams(max_tokens=5))] == \
            [w[:5] for w in want[:3]]
    finally:
        engine.stop()
    _all_pages_free(engine)


def test_preempted_sampled_requests_keep_their_draws(model, plan, engine):
    prompts = PROMPTS[:8]
    params = [SamplingParams(max_tokens=40, temperature=0.7, top_k=20, seed=100 + i) for i in range(len(prompts))]
    tiny = Engine(model, plan, max_batch=4, max_model_len=64, num_pages=[6, 6])
    got = tiny.generate(prompts, params)
    assert tiny.stats.preemptions > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in engine.generate(prompts, params)]
    _all_pages_free(tiny)


def test_abort_frees_pages(engine):
    rid = engine.add_request(PROMPTS[3], SamplingParams(max_tokens=30))
    other = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=3))
    engine.step()
    engine.step()
    engine.abort(rid)
    outs = []
    while engine.has_work():
        outs += engine.step()
    aborted = [o for o in outs if o.request_id == rid]
    assert aborted and aborted[-1].finished and aborted[-1].finish_reason == "abort"
    assert any(o.request_id == other and o.finish_reason == "length" for o in outs)
    _all_pages_free(engine)


def test_min_tokens_and_penalties(engine, model, want):
    w = want[0]
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=12, min_tokens=5, stop_token_ids=[w[1]]))[0]
    assert w[1] not in out.token_ids[:5]
    assert out.finish_reason == "length" or out.token_ids[-1] == w[1]
    # greedy with penalties, against a full-forward reference on one device
    sp = SamplingParams(max_tokens=10, presence_penalty=0.5, frequency_penalty=1.5)
    got = engine.generate([PROMPTS[2]], sp)[0].token_ids
    ctx, ref = list(PROMPTS[2]), []
    for _ in range(10):
        padded = np.zeros((1, 32), np.int32)   # one compile: causal, so right padding changes nothing
        padded[0, :len(ctx)] = ctx
        logits = np.asarray(model(padded))[0, len(ctx) - 1]
        counts = np.bincount(ref, minlength=logits.shape[-1]).astype(np.float32) if ref else 0 * logits
        tok = int(np.argmax(logits - 0.5 * (counts > 0) - 1.5 * counts))
        ref.append(tok)
        ctx.append(tok)
    assert got == ref
    assert got != want[2][:10]   # the penalties changed something (want[2] repeats a token)
    _all_pages_free(engine)


def test_logprobs(engine, model, want):
    out = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=6, logprobs=3))[0]
    assert out.token_ids == want[1][:6] and len(out.logprobs) == 6
    padded = np.zeros((1, 32), np.int32)
    seq = PROMPTS[1] + out.token_ids
    padded[0, :len(seq)] = seq
    logits = np.asarray(model(padded), np.float64)[0]
    for k, (lp, top) in enumerate(out.logprobs):
        row = logits[len(PROMPTS[1]) - 1 + k]
        ref = row - row.max() - np.log(np.exp(row - row.max()).sum())
        assert abs(lp - ref[out.token_ids[k]]) < 1e-4
        assert len(top) == 3 and top[0][0] == out.token_ids[k]   # greedy: the chosen token is the likeliest
        assert [i for i, _ in top] == list(np.argsort(-ref)[:3])
