"""`hexjax plan` and `hexjax explain` through the typer app."""

import json
from pathlib import Path

from typer.testing import CliRunner

from hexjax.cli import app
from hexjax.cluster import Cluster
from hexjax.models.config import ModelConfig
from hexjax.plan import Plan
from hexjax.search import evaluate
from hexjax.workload import Workload

ROOT = Path(__file__).resolve().parents[1]
C8 = str(ROOT / "examples/clusters/hexgen-8gpu.toml")
runner = CliRunner()


def test_plan_json_out_and_pictures(tmp_path):
    out, svg, png = tmp_path / "p.json", tmp_path / "p.svg", tmp_path / "p.png"
    res = runner.invoke(app, ["plan", "--cluster", C8, "--model", "llama-2-70b", "--prompt-len", "512",
                              "--output-len", "128", "--batch", "160", "--objective", "throughput",
                              "--out", str(out), "--json", "--svg", str(svg), "--png", str(png)])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["objective"] == "throughput" and len(d["stages"]) == 3
    assert {s["host"] for s in d["stages"]} == {"a6000", "a5000", "a4000"}
    assert all(s["memory_bytes"] <= s["capacity_bytes"] for s in d["stages"])
    plan = Plan.load(out)
    cluster = Cluster.load(C8)
    pred = evaluate(plan, "llama-2-70b", cluster, Workload(512, 128, 160))
    assert d["prediction"]["throughput_tokens_per_s"] == pred.throughput_tokens_per_s
    assert svg.read_text().lstrip().startswith("<?xml") and png.read_bytes()[:4] == b"\x89PNG"


def test_plan_table():
    res = runner.invoke(app, ["plan", "--cluster", C8, "--model", "llama-2-7b", "--prompt-len", "128",
                              "--output-len", "32", "--objective", "latency"])
    assert res.exit_code == 0, res.output
    for words in ("TTFT", "TPOT", "tokens/s", "tokens per dollar", "a6000"):
        assert words in res.output


def test_explain_hand_written_plan(tmp_path):
    path = tmp_path / "hexgen.json"
    path.write_text(json.dumps({"version": 1, "model": "llama-2-70b", "replicas": [{"stages": [
        {"layers": [0, 44], "devices": [0, 1, 2, 3], "tp": 4},
        {"layers": [44, 64], "devices": [4, 5], "tp": 2},
        {"layers": [64, 80], "devices": [6, 7], "tp": 2}]}]}))
    res = runner.invoke(app, ["explain", str(path), "--cluster", C8, "--model", "llama-2-70b",
                              "--prompt-len", "512", "--output-len", "128", "--batch", "8", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["valid"] and [s["layers"] for s in d["stages"]] == [[0, 44], [44, 64], [64, 80]]
    want = evaluate(Plan.load(path), ModelConfig.preset("llama-2-70b"), Cluster.load(C8), Workload(512, 128, 8))
    assert d["prediction"]["latency_s"] == want.latency_s


def test_explain_lists_every_violation(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"version": 1, "model": "llama-2-70b", "replicas": [{"stages": [
        {"layers": [0, 40], "devices": [0, 1, 2], "tp": 3},
        {"layers": [41, 80], "devices": [3, 4], "tp": 2}]}]}))
    res = runner.invoke(app, ["explain", str(path), "--cluster", C8, "--model", "llama-2-70b",
                              "--prompt-len", "512", "--output-len", "128"])
    assert res.exit_code == 1
    for words in ("does not divide the 64 attention heads", "should start at layer 40", "span hosts"):
        assert words in res.output
    res = runner.invoke(app, ["explain", str(path), "--cluster", C8, "--model", "llama-2-70b",
                              "--prompt-len", "512", "--output-len", "128", "--json"])
    assert res.exit_code == 1
    assert len(json.loads(res.output)["violations"]) >= 3


def test_explain_needs_a_workload(tmp_path):
    path = tmp_path / "p.json"
    Plan.single_device("tiny", 4).save(path)
    res = runner.invoke(app, ["explain", str(path), "--cluster", C8, "--model", "tiny"])
    assert res.exit_code != 0 and "--prompt-len" in str(res.exception)


def test_plan_verify_compiles_the_chosen_plan():
    res = runner.invoke(app, ["plan", "--cluster", C8, "--model", "llama-125m", "--prompt-len", "64",
                              "--output-len", "16", "--batch", "4", "--objective", "latency", "--json", "--verify"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    v = d["verify"]
    assert v["ok"] and len(v["stages"]) == len(d["stages"])
    for s, pred in zip(v["stages"], d["stages"]):
        assert s["fits"] and s["compiled_bytes"] <= s["usable_bytes"] < s["capacity_bytes"]
        # XLA's per-device need holds at least the stage's weights, and is of the cost model's order
        assert 0.5 * pred["memory_bytes"] < s["compiled_bytes"] < 2 * pred["memory_bytes"]
