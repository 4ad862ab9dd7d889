"""Single-device generation: the jitted loop against a step-by-step oracle, seeding, eos, prompt checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hexjax
from hexjax.errors import ConfigError
from hexjax.models import LlamaModel, ModelConfig, Sampling, sample
from hexjax.models.prompts import check_prompts, cut_at_eos, eos_lengths
from hexjax.models.sampling import request_key
from hexjax.plan import Plan

TINY = ModelConfig.preset("tiny")
_sample = jax.jit(sample, static_argnums=2)


@pytest.fixture(scope="module")
def model():
    return LlamaModel.random(TINY, seed=1)


def _oracle(model, prompt, n, sampling, request=0, width=32):
    """No cache: re-run the whole (right-padded) sequence for every new token; token ``i`` of
    ``prompts[request]`` is drawn with ``request_key(seed, request, i)``."""
    seq, out = list(prompt), []
    for i in range(n):
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(seq)] = seq
        logits = np.asarray(model(padded))[:, len(seq) - 1]
        tok = int(_sample(jnp.asarray(logits), request_key(sampling.seed, request, i)[None], sampling)[0])
        out.append(tok)
        seq.append(tok)
    return out


def test_sampled_generation_matches_step_by_step_oracle(model):
    s = Sampling(temperature=0.9, top_k=40, top_p=0.9, seed=11)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7], [1, 8, 2, 8, 1]]
    got = model.generate(prompts, 6, s)
    assert got == [_oracle(model, p, 6, s, request=r) for r, p in enumerate(prompts)]
    # a request's draws depend on its index in the call, not on the rest of the batch
    assert model.generate([prompts[0], [7, 7, 7, 7, 7, 7, 7, 7, 7], prompts[2]], 6, s)[::2] == got[::2]
    assert len({tuple(g) for g in got}) == 3
    # equal prompts at different indices are different requests: they draw different tokens
    same = model.generate([prompts[0]] * 3, 6, s)
    assert same[0] == got[0] and len({tuple(g) for g in same}) > 1


def test_greedy_matches_oracle_and_eos_cuts(model):
    prompt = [5, 6, 7, 8, 9, 10, 11]
    want = _oracle(model, prompt, 10, Sampling())
    assert model.generate([prompt], 10) == [want]
    eos = want[3]
    cut = want[:want.index(eos) + 1]
    assert model.generate([prompt], 10, eos_id=eos) == [cut]


BAD_REQUESTS = {   # name: (prompts, max_new_tokens, the error's message)
    "no-prompts": ([], 4, "no prompts given"),
    "empty-prompt": ([[1], []], 4, "prompt 1 is empty"),
    "id-too-big": ([[1, 999]], 4, r"prompt 0 has token ids \[999\] outside \[0, 256\)"),
    "id-negative": ([[3], [1, -1, 2]], 4, r"prompt 1 has token ids \[-1\] outside \[0, 256\)"),
    "id-float": ([[1, 2.5]], 4, "prompt 0 has non-integer token ids"),
    "flat-list": ([1, 2, 3], 4,
                  r"prompt 0 is not a sequence of token ids but int 1; pass a list of prompts, e\.g\. \[\[1, 2, 3\]\]"),
    "string": (["hello"], 4, "prompt 0 is not a sequence of token ids but str 'hello'"),
    "float-array": (np.zeros((1, 3), np.float32), 4, "integer token ids"),
    "zero-new": ([[1]], 0, "max_new_tokens must be a positive integer, got 0"),
    "negative-new": ([[1]], -3, "max_new_tokens must be a positive integer, got -3"),
    "float-new": ([[1]], 2.0, "max_new_tokens must be a positive integer"),
    "too-long": ([[1], [1] * 500], 20,
                 r"prompt 1 \(500 tokens\) plus max_new_tokens \(20\) exceeds .* max_position_embeddings \(512\)"),
    "just-too-long": ([[1] * 500], 13, "max_position_embeddings"),
}
BAD = pytest.mark.parametrize("prompts,n,match", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())


@BAD
def test_check_prompts_refuses_bad_requests(prompts, n, match):
    with pytest.raises(ConfigError, match=match):
        check_prompts(prompts, TINY, n)


@BAD
def test_single_device_and_runtime_refuse_bad_requests_alike(model, prompts, n, match):
    """One check for both paths: the same error, word for word, before anything compiles."""
    with pytest.raises(ConfigError, match=match) as single:
        model.generate(prompts, n)
    plan = Plan.single_device(TINY.name, TINY.num_layers)
    with pytest.raises(ConfigError, match=match) as runtime:
        hexjax.generate(model, plan, prompts, n)
    assert str(runtime.value) == str(single.value)


def test_check_prompts_accepts_arrays_and_returns_int_lists():
    got = check_prompts([np.array([3, 4], np.int64), jnp.array([5], jnp.int32), (6, np.int32(7))], TINY, 4)
    assert got == [[3, 4], [5], [6, 7]] and all(type(t) is int for row in got for t in row)
    assert check_prompts(np.array([[1, 2], [3, 4]]), TINY, 1) == [[1, 2], [3, 4]]
    assert check_prompts([[255] * 500], TINY, 12) == [[255] * 500]   # exactly max_position_embeddings


def test_eos_lengths_and_cut():
    rows = [[4, 2, 9, 2], [1, 1], [], [2]]
    assert eos_lengths(rows, 2) == [2, 2, 0, 1]
    assert cut_at_eos(rows, 2) == [[4, 2], [1, 1], [], [2]]
    assert eos_lengths(rows, None) == [4, 2, 0, 1] and cut_at_eos(rows, None) == rows
    # numpy rows, and aligned per-step values (logits) cut by the same lengths
    arr = np.array([[5, 7, 7], [7, 5, 5]])
    n = eos_lengths(arr, 7)
    assert n == [2, 1] and cut_at_eos(arr, 7) == [[5, 7], [7]]
    logits = np.arange(6 * 3).reshape(2, 3, 3)
    assert [lg[:k].shape[0] for lg, k in zip(logits, n)] == [2, 1]

