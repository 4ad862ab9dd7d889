"""``hexjax plan --task train`` and ``hexjax explain`` of a training plan, through the entry point."""

import json
from pathlib import Path

import pytest

from hexjax.plan import Plan

from clitools import refused

ROOT = Path(__file__).resolve().parents[1]
MIX = ROOT / "examples/clusters/hexiscale-mix.toml"
HEX8 = ROOT / "examples/clusters/hexgen-8gpu.toml"


def test_plan_train_json_then_explain(hexjax, tmp_path):
    out = tmp_path / "t.json"
    code, stdout, err = hexjax("plan", "--task", "train", "--cluster", MIX, "--model", "llama-2-13b",
                               "--seq-len", 512, "--global-batch", 32, "--remat", "full", "--out", out, "--json")
    assert code == 0, err
    d = json.loads(stdout)
    assert d["task"] == "train" and sum(d["replica_rows"]) == 32
    assert d["prediction"]["tokens_per_s"] == pytest.approx(32 * 512 / d["prediction"]["step_s"])
    plan = Plan.load(out)
    assert plan.training.replica_rows == tuple(d["replica_rows"])
    for s in d["stages"]:
        parts = sum(s[k] for k in ("param_bytes", "grad_bytes", "optimizer_bytes", "stash_bytes", "workspace_bytes"))
        assert parts == pytest.approx(s["memory_bytes"]) and s["memory_bytes"] <= s["capacity_bytes"]
    code, stdout, err = hexjax("explain", out, "--cluster", MIX)
    assert code == 0, err
    for word in ("bubble ms", "params", "grads", "optim", "stash", "work", "tokens/s", "per million tokens"):
        assert word in stdout, word
    code, stdout, err = hexjax("explain", out, "--cluster", MIX, "--json")
    assert json.loads(stdout)["prediction"]["step_s"] == pytest.approx(d["prediction"]["step_s"])


def test_plan_train_cost_and_budget(hexjax):
    runs = {}
    for extra in ((), ("--objective", "cost"), ("--budget-per-hour", "4")):
        code, stdout, err = hexjax("plan", "--task", "train", "--cluster", MIX, "--model", "llama-2-7b",
                                   "--seq-len", 1024, "--global-batch", 16, "--microbatches", "1,2,4,8", "--json",
                                   *extra)
        assert code == 0, err
        runs[extra[:1]] = json.loads(stdout)["prediction"]
    best, cheap, budget = runs[()], runs[("--objective",)], runs[("--budget-per-hour",)]
    assert cheap["dollars_per_million_tokens"] <= best["dollars_per_million_tokens"] * (1 + 1e-9)
    assert budget["price_per_hour"] <= 4 and budget["tokens_per_s"] <= best["tokens_per_s"] * (1 + 1e-9)


def test_plan_train_bad_inputs(hexjax):
    base = ("plan", "--task", "train", "--cluster", HEX8, "--model", "llama-2-7b")
    refused(hexjax(*base, "--global-batch", 8), "--seq-len")
    refused(hexjax(*base, "--seq-len", 512, "--global-batch", 8, "--remat", "some"), "remat")
    refused(hexjax(*base, "--seq-len", 512, "--global-batch", 8, "--microbatches", "two"), "--microbatches")
    refused(hexjax(*base, "--seq-len", 9000, "--global-batch", 8), "--seq-len 9000", "4096")
    refused(hexjax(*base, "--seq-len", 512, "--global-batch", 8, "--objective", "latency"), "objective")
    refused(hexjax(*base, "--seq-len", 512, "--global-batch", 8, "--budget-per-hour", "-1"), "--budget-per-hour")
    refused(hexjax("plan", "--task", "fly", "--cluster", HEX8, "--model", "llama-2-7b"), "--task")
    refused(hexjax("plan", "--task", "train", "--cluster", HEX8, "--model", "llama-2-70b", "--seq-len", 4096,
                   "--global-batch", 8), "shortfall", "GiB")


def _shares_plan(path, rows, microbatches):
    """Two replicas of tiny: dp3 on devices 0-2 and one device, with the given batch shares."""
    d = {"version": 1, "model": "tiny", "objective": "train throughput", "dtype_bytes": 4,
         "training": {"version": 1, "microbatches": microbatches, "replica_rows": list(rows),
                      "workload": {"seq_len": 8, "global_batch": sum(rows), "microbatches": [microbatches],
                                   "remat": "none", "optimizer": "adamw", "dtype": "float32"}},
         "replicas": [{"stages": [{"layers": [0, 4], "devices": [0, 1, 2], "dp": 3, "tp": 1}]},
                      {"stages": [{"layers": [0, 2], "devices": [3], "dp": 1, "tp": 1},
                                  {"layers": [2, 4], "devices": [4], "dp": 1, "tp": 1}]}]}
    path.write_text(json.dumps(d))
    return path


def test_train_takes_batch_shares_and_microbatches_from_the_plan(hexjax, tmp_path):
    import numpy as np
    np.save(tmp_path / "tok.npy", np.random.default_rng(0).integers(0, 256, 4000).astype(np.uint16))
    args = ("--model", "tiny", "--virtual-devices", 8, "--data", tmp_path / "tok.npy", "--seq-len", 8,
            "--steps", 1, "--json")
    # rows 6/2 with 2 microbatches: an equal split (4/4) would not divide into dp3 microbatches
    plan = _shares_plan(tmp_path / "p.json", (6, 2), 1)
    code, out, err = hexjax("train", "--plan", plan, "--global-batch", 8, *args)
    assert code == 0, err
    assert json.loads(out)["steps"][0]["tokens"] == 8 * 8
    refused(hexjax("train", "--plan", plan, "--global-batch", 12, *args), "global batch of 8", "6/2 rows",
            "--global-batch 8")
    # without the plan's shares the same layout cannot split 8 rows: the shares above were the plan's
    bare = json.loads(plan.read_text())
    del bare["training"]
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    refused(hexjax("train", "--plan", tmp_path / "bare.json", "--global-batch", 8, *args), "dp=3")
