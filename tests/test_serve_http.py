"""The OpenAI-compatible server, driven by the official ``openai`` client over loopback."""

import concurrent.futures
import json
import re

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")

import hexjax  # noqa: E402
from hexjax.models.hf import LlamaModel  # noqa: E402
from hexjax.serve import Engine  # noqa: E402
from hexjax.serve.api import ServerThread, create_app  # noqa: E402
from hexjax.serve.metrics import ServeMetrics  # noqa: E402

from test_serve_engine import PROMPTS, TINY_UNEVEN  # noqa: E402

MAX_LEN = 64


@pytest.fixture(scope="module")
def model():
    return LlamaModel.random(hexjax.ModelConfig.preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def want(model):
    return model.generate(PROMPTS, 40)


@pytest.fixture(scope="module")
def server(model):
    """A server with tiny page pools: 5 usable pages per stage (2 per dp range) for 4 rows of up to 4 pages,
    and 8 tokens a step, so longer prompts are prefilled in chunks (preempted ones too)."""
    metrics = ServeMetrics()
    engine = Engine(model, hexjax.Plan.from_dict(TINY_UNEVEN), max_batch=4, max_model_len=MAX_LEN,
                    num_pages=[6, 6], metrics=metrics, max_step_tokens=8)
    app = create_app(engine, model_name="tiny", metrics=metrics)
    with ServerThread(app, "127.0.0.1", 0) as srv:
        srv.engine = engine
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _ids(choice):
    return getattr(choice, "token_ids", None) or (choice.model_extra or {}).get("token_ids")


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_completion_greedy(client, want):
    r = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=12, temperature=0)
    assert _ids(r.choices[0]) == want[2][:12]
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (len(PROMPTS[2]), 12, len(PROMPTS[2]) + 12)
    # several prompts in one request
    r = client.completions.create(model="tiny", prompt=PROMPTS[:3], max_tokens=5, temperature=0)
    assert [_ids(c) for c in sorted(r.choices, key=lambda c: c.index)] == [w[:5] for w in want[:3]]
    assert r.usage.completion_tokens == 15


def test_completion_stream_with_usage(client, want):
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=9, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    toks = [t for c in chunks if c.choices for t in _ids(c.choices[0]) or []]
    assert toks == want[3][:9]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert chunks[-1].usage.prompt_tokens == len(PROMPTS[3])
    # without include_usage, no usage chunk
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=3, temperature=0,
                                            stream=True))
    assert all(c.choices for c in chunks)
    assert [t for c in chunks for t in _ids(c.choices[0]) or []] == want[0][:3]


def test_seeded_sampling_repeats(client):
    kw = dict(model="tiny", prompt=PROMPTS[1], max_tokens=8, temperature=0.9, top_p=0.95, seed=7)
    a = _ids(client.completions.create(**kw).choices[0])
    b = _ids(client.completions.create(**kw).choices[0])
    assert a == b and len(a) == 8


@pytest.mark.parametrize("kw, pattern", [
    (dict(extra_body={"bogus": 1}), "unknown field"),
    (dict(n=2), "n=1"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=MAX_LEN), "context length"),
    (dict(prompt="hello"), "no tokenizer"),
    (dict(prompt=[]), "empty"),
    (dict(stop=["x"]), "stop"),
    (dict(temperature=-1), "temperature"),
])
def test_bad_requests_get_400(client, want, kw, pattern):
    args = dict(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0) | kw
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args)
    assert e.value.status_code == 400
    assert re.search(pattern, e.value.body["message"]), e.value.body
    # the server keeps serving
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert _ids(r.choices[0]) == want[0][:4]


def test_malformed_json_and_chat_without_template(server, client):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert "chat template" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt=[1, 2], max_tokens=2)


@pytest.fixture(scope="module")
def pool(model):
    """40 random prompts of 1-28 tokens and their single-device greedy continuations (32 tokens)."""
    rng = np.random.default_rng(2024)
    prompts = [rng.integers(0, model.cfg.vocab_size, rng.integers(1, 29)).tolist() for _ in range(40)]
    return prompts, model.generate(prompts, 32)


def _load(client, pool, num_requests: int, workers: int):
    """``num_requests`` requests from ``workers`` threads, each a random prompt of the pool with a random
    output length (1-32), a third of them streamed: every one completes with the single-device tokens."""
    prompts, want = pool

    def one(k):
        rng = np.random.default_rng(k)
        i, n = int(rng.integers(len(prompts))), int(rng.integers(1, 33))
        if k % 3 == 0:
            chunks = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=n, temperature=0,
                                               stream=True, stream_options={"include_usage": True})
            chunks = list(chunks)
            toks = [t for c in chunks if c.choices for t in _ids(c.choices[0]) or []]
            assert chunks[-1].usage.completion_tokens == n
        else:
            r = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=n, temperature=0)
            toks = _ids(r.choices[0])
            assert r.usage.completion_tokens == n
        return k, toks == want[i][:n]

    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        results = dict(ex.map(one, range(num_requests)))
    assert len(results) == num_requests and all(results.values())


def _metric(server, name):
    text = httpx.get(server.url + "/metrics").text
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else None


@pytest.mark.parametrize("num_requests", [250, pytest.param(1000, marks=pytest.mark.slow)])
def test_load_tiny_pool_preempts(server, client, pool, num_requests):
    """Many requests from 16 clients through pools too small for the load: preemptions, nothing lost."""
    before = _metric(server, "hexjax_num_preemptions_total")
    _load(client, pool, num_requests, 16)
    assert _metric(server, "hexjax_num_preemptions_total") > before
    text = httpx.get(server.url + "/metrics").text
    for name in ("hexjax_time_to_first_token_seconds_count", "hexjax_inter_token_latency_seconds_count",
                 "hexjax_e2e_request_latency_seconds_count", "hexjax_num_requests_running",
                 "hexjax_num_requests_waiting", "hexjax_kv_cache_usage_perc"):
        assert name in text
    assert _metric(server, "hexjax_num_requests_running") == 0
    assert _metric(server, "hexjax_num_requests_waiting") == 0
    eng = server.engine
    assert not eng.has_work() and eng.kv_usage() == 0
    assert max(eng.stats.step_tokens) <= 8   # the 20-token prompt went in chunks


def test_sse_wire_format(server):
    body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_client_disconnect_aborts(server):
    import time
    body = {"model": "tiny", "prompt": [1, 2], "max_tokens": 60, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        first = next(ln for ln in r.iter_lines() if ln)
        assert first.startswith("data: ")
    deadline = time.time() + 20
    while server.engine.has_work() and time.time() < deadline:
        time.sleep(0.05)
    assert not server.engine.has_work() and server.engine.kv_usage() == 0
    assert 'finished_reason="abort"' in httpx.get(server.url + "/metrics").text


def test_completion_logprobs(client, want):
    r = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(x <= 0 for x in lp.token_logprobs)
    assert lp.tokens == [f"token_id:{t}" for t in want[1][:4]]
    assert all(len(d) == 2 for d in lp.top_logprobs)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=4, temperature=0,
                                            logprobs=1, stream=True))
    streamed = [x for c in chunks for x in c.choices[0].logprobs.token_logprobs]
    assert np.allclose(streamed, lp.token_logprobs, atol=1e-5)
