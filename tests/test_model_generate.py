"""Single-device generation: the jitted loop against a step-by-step oracle, seeding, eos, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hexjax.errors import ConfigError
from hexjax.models import LlamaModel, ModelConfig, Sampling, sample, step_key

TINY = ModelConfig.preset("tiny")
_sample = jax.jit(sample, static_argnums=2)


@pytest.fixture(scope="module")
def model():
    return LlamaModel.random(TINY, seed=1)


def _oracle(model, prompt, n, sampling, width=32):
    """No cache: re-run the whole (right-padded) sequence for every new token."""
    seq, out = list(prompt), []
    for i in range(n):
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(seq)] = seq
        logits = np.asarray(model(padded))[:, len(seq) - 1]
        tok = int(_sample(jnp.asarray(logits), step_key(sampling.seed, i)[None], sampling)[0])
        out.append(tok)
        seq.append(tok)
    return out


def test_sampled_generation_matches_step_by_step_oracle(model):
    s = Sampling(temperature=0.9, top_k=40, top_p=0.9, seed=11)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7], [1, 8, 2, 8, 1]]
    got = model.generate(prompts, 6, s)
    assert got == [_oracle(model, p, 6, s) for p in prompts]
    assert model.generate(prompts[1:2], 6, s) == got[1:2]  # alone or batched: same tokens
    assert len({tuple(g) for g in got}) == 3


def test_greedy_matches_oracle_and_eos_cuts(model):
    prompt = [5, 6, 7, 8, 9, 10, 11]
    want = _oracle(model, prompt, 10, Sampling())
    assert model.generate([prompt], 10) == [want]
    eos = want[3]
    cut = want[:want.index(eos) + 1]
    assert model.generate([prompt], 10, eos_id=eos) == [cut]


@pytest.mark.parametrize("prompts,n,match", [
    ([], 4, "no prompts"), ([[1], []], 4, "prompt 1 is empty"), ([[1, 999]], 4, "outside"),
    ([[1]], 0, "max_new_tokens"), ([[1] * 500], 20, "max_position_embeddings")])
def test_bad_requests(model, prompts, n, match):
    with pytest.raises(ConfigError, match=match):
        model.generate(prompts, n)

