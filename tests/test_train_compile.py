"""XLA's view of training: per-stage fwd/bwd/update compiled from abstract arguments (no weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hexjax.errors import ConfigError
from hexjax.models.config import ModelConfig
from hexjax.plan import Plan, Replica, Stage
from hexjax.search import train_cost
from hexjax.train import one_f_one_b
from hexjax.train.schedule import max_live_activations
from hexjax.workload import TrainWorkload

TINY = ModelConfig.load("tiny")
# uneven: 1 layer + embed on one device, 2 layers with tp=2, 1 layer + head with dp=2
PLAN = Plan("tiny", "", (Replica((Stage((0, 1), (0,)), Stage((1, 3), (1, 2), 1, 2), Stage((3, 4), (3, 4), 2, 1))),))


def params_per_device(cfg: ModelConfig, layers: tuple[int, int], tp: int, embed: bool, head: bool) -> int:
    """Parameters one device holds, from the config alone (matrices split over tp, norms whole)."""
    h, d = cfg.hidden_size, cfg.head_dim
    assert cfg.num_heads % tp == 0 and cfg.num_kv_heads % tp == 0 and cfg.intermediate_size % tp == 0
    layer = (2 * h * cfg.num_heads * d + 2 * h * cfg.num_kv_heads * d + 3 * h * cfg.intermediate_size) // tp + 2 * h
    n = (layers[1] - layers[0]) * layer
    if embed:
        n += cfg.vocab_size * h // tp
    if head:
        n += h + h * cfg.vocab_size // tp
    return n


def test_dump_hlo_task_train(tmp_path, capsys):
    from hexjax.cli.run import dump_hlo_cmd
    PLAN.save(tmp_path / "plan.json")
    seq, batch, m = 16, 8, 4
    out = dump_hlo_cmd(None, tmp_path / "plan.json", None, tmp_path / "hlo", None, None, None, None, None,
                       as_json=True, task="train", seq_len=seq, global_batch=batch, microbatches=m)
    assert json.loads(capsys.readouterr().out)["task"] == "train"
    recs = {c["stage"]: {} for c in out["compiles"]}
    for c in out["compiles"]:
        recs[c["stage"]][c["program"]] = c
        assert c["flops"] > 0 and c["argument_bytes"] > 0
        assert f"r0_s{c['stage']}_{c['program']}.hlo.txt" in c["files"]
    assert "summary.md" in out["files"] and "| r0.s1 | update |" in (tmp_path / "hlo" / "summary.md").read_text()
    live = max_live_activations(one_f_one_b(3, m), 3)
    for s, st in enumerate(PLAN.replicas[0].stages):
        p = params_per_device(TINY, st.layers, st.tp, s == 0, s == 2) * 4           # fp32 bytes
        up = recs[s]["update"]
        # update arguments: params + 2 AdamW moments + gradients (+ a few step counters)
        assert up["argument_bytes"] == pytest.approx(4 * p, rel=0.01), (s, up["argument_bytes"] / p)
        assert up["param_bytes"] == p
        # params and both moments are donated and reused by the outputs
        assert up["alias_bytes"] == pytest.approx(3 * p, rel=0.01)
        for prog in ("fwd", "bwd"):
            assert recs[s][prog]["argument_bytes"] == pytest.approx(recs[s][prog]["expected_argument_bytes"], rel=0.01)
        # the 1F1B stash bound the records carry holds in the schedule
        assert recs[s]["bwd"]["stash_microbatches"] == min(3 - s, m) == live[s]
        rows = batch // m // st.dp
        if s < 2:   # the forward's outputs the backward reads: the cost model's stash, from the layer's ops
            wl = TrainWorkload(seq_len=seq, global_batch=batch, microbatches=(m,), dtype="float32")
            l = st.layers[1] - st.layers[0]
            per_token = l * train_cost.activation_bytes_per_token_layer(TINY, st.tp, wl, full=True) + (4 if s == 0 else 0)
            assert recs[s]["bwd"]["stash_bytes"] == live[s] * rows * seq * per_token
        else:       # the last stage keeps its input until its fused forward and backward
            assert recs[s]["bwd"]["stash_bytes"] == live[s] * rows * seq * TINY.hidden_size * 4
    # the backward reads the forward's matmul outputs and recomputes none: about 2x the forward's FLOPs;
    # the last stage's backward program runs its forward too
    for s in (0, 1):
        assert 1.5 * recs[s]["fwd"]["flops"] < recs[s]["bwd"]["flops"] < 2.5 * recs[s]["fwd"]["flops"], s
    assert recs[2]["bwd"]["flops"] > 2.5 * recs[2]["fwd"]["flops"]
    with pytest.raises(ConfigError, match="needs --seq-len and --global-batch"):
        dump_hlo_cmd(None, tmp_path / "plan.json", None, tmp_path / "x", None, None, None, None, None,
                     as_json=True, task="train")
    with pytest.raises(ConfigError, match="multiple of"):
        dump_hlo_cmd(None, tmp_path / "plan.json", None, tmp_path / "x", None, None, None, None, None,
                     as_json=True, task="train", seq_len=seq, global_batch=6, microbatches=m)
    assert np.isfinite(sum(c["peak_bytes"] for c in out["compiles"]))
