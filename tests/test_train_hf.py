"""Fine-tuning round trip: HF checkpoint -> Trainer over an uneven plan -> HF checkpoint -> transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hexjax  # noqa: E402
from hexjax.models import LlamaModel  # noqa: E402
from hexjax.plan import Plan, Replica, Stage  # noqa: E402
from hexjax.train import Trainer  # noqa: E402

from test_train import CFG, TCFG, TEMPLATES  # noqa: E402  (same model and layout: shares their compiles)

# uneven, three stages: layer 0 on one device, layers 1-2 with tp=2, layer 3 with tp=4 (KV heads replicated)
PLAN = Plan(CFG.name, "", (Replica(tuple(Stage(*s) for s in TEMPLATES["A"][0])),))


def hf_loss(path, batch) -> float:
    model = transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    ids = torch.as_tensor(np.asarray(batch, np.int64))
    with torch.no_grad():
        return float(model(ids, labels=ids).loss)


def test_finetune_round_trip_through_transformers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    LlamaModel.random(CFG, seed=3).save_hf(tmp_path / "start")
    (tmp_path / "start").rename(tmp_path / CFG.name)
    start = hexjax.load_hf(CFG.name)          # a config named like CFG, so the stage programs are shared
    assert start.cfg == CFG
    tr = Trainer(start, PLAN, config=TCFG, microbatches=2)
    rng = np.random.default_rng(0)
    data = [rng.integers(0, CFG.vocab_size, (4, 17)) for _ in range(2)]
    metrics = [tr.step(data[0]) for _ in range(3)]        # the same batch: the loss must fall
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.05
    tr.save_hf(tmp_path / "tuned")
    assert json.loads((tmp_path / "tuned" / "config.json").read_text())["num_hidden_layers"] == 4
    # the starting checkpoint agrees too (the oracle sees the weights we trained from)
    assert hf_loss(tmp_path / CFG.name, data[0]) == pytest.approx(metrics[0]["loss"], rel=1e-5)
    for b in data:
        want, got = hf_loss(tmp_path / "tuned", b), tr.evaluate(b)
        print(f"transformers {want:.7f} hexjax {got:.7f} rel {abs(got - want) / want:.2e}")
        assert got == pytest.approx(want, rel=1e-5)
    # and it loads back into hexjax unchanged
    back = hexjax.load_hf(tmp_path / "tuned")
    got = tr.params()
    for a, b in zip(jax_leaves(back.params), jax_leaves(got)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)
