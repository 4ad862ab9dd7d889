"""A new user's first hour: bad inputs get one clear ``error:`` line and exit 2, never a traceback;
every command prints the same notation and takes ``--json``."""

import dataclasses
import json
from pathlib import Path

import pytest

from hexjax.cli import app
from hexjax.models.config import PRESETS, ModelConfig
from hexjax.plan import Plan, Replica, Stage, format_layers, format_mesh

from clitools import refused

ROOT = Path(__file__).resolve().parents[1]
C8 = str(ROOT / "examples/clusters/hexgen-8gpu.toml")
TINY = Plan("tiny", "", (Replica((Stage((0, 1), (5,)), Stage((1, 4), (0, 1, 2, 3), dp=2, tp=2))),))


def _plan_file(tmp_path, plan=TINY, name="plan.json"):
    path = tmp_path / name
    plan.save(path)
    return path


# ---------------------------------------------------------------- 1. prompt + output within the context

def test_plan_refuses_a_workload_longer_than_the_context(hexjax):
    refused(hexjax("plan", "--cluster", C8, "--model", "llama-2-7b", "--prompt-len", 8000, "--output-len", 128),
            "8000 + output 128 = 8128 tokens", "llama-2-7b has only 4096 positions", "max_position_embeddings",
            "--prompt-len and --output-len", "llama-3.1-8b")


def test_explain_and_dump_hlo_refuse_a_workload_longer_than_the_context(hexjax, tmp_path):
    path = _plan_file(tmp_path)
    refused(hexjax("explain", path, "--cluster", C8, "--model", "tiny", "--prompt-len", 500, "--output-len", 13),
            "513 tokens", "tiny has only 512 positions")
    refused(hexjax("dump-hlo", "--plan", path, "--out", tmp_path / "hlo", "--prompt-len", 400, "--output-len", 200),
            "600 tokens", "512 positions")
    assert not (tmp_path / "hlo").exists()


def test_generate_and_demo_refuse_more_tokens_than_the_context(hexjax, tmp_path):
    path = _plan_file(tmp_path)
    refused(hexjax("generate", "--model", "tiny", "--plan", path, "--prompt-ids", "1,2,3", "--prompt-ids", "4",
                   "--max-new-tokens", 510),
            "prompt 0 (3 tokens) plus max_new_tokens (510) exceeds", "max_position_embeddings (512)")
    refused(hexjax("demo", "--model", "tiny", "--prompt-len", 500, "--max-new-tokens", 100), "600 tokens",
            "512 positions")


# ---------------------------------------------------------------- 2. the plan's model against --model

def test_explain_refuses_a_plan_made_for_another_model(hexjax, tmp_path):
    path = _plan_file(tmp_path, Plan("llama-2-7b", "", (Replica((Stage((0, 32), (0, 1, 2, 3), tp=4),)),)))
    err = refused(hexjax("explain", path, "--cluster", C8, "--model", "llama-3-8b", "--prompt-len", 64,
                         "--output-len", 8), "was made for llama-2-7b", "not for llama-3-8b", "--model llama-2-7b")
    assert str(path) in err
    # without --model, the plan's own preset
    code, out, err = hexjax("explain", path, "--cluster", C8, "--prompt-len", 64, "--output-len", 8, "--json")
    assert code == 0, err
    assert json.loads(out)["model"] == "llama-2-7b"


def test_plan_model_checks(tmp_path, hexjax):
    plan = Plan("small", "", (Replica((Stage((0, 8), (0,)),)),))
    small = ModelConfig.preset("small")
    assert plan.model_mismatch(small) is None
    assert plan.model_mismatch(dataclasses.replace(small, name="/ckpt/small-hf")) is None   # same shape
    assert "8 layers" in plan.model_mismatch(ModelConfig.preset("tiny-mha"))
    assert "different model" in plan.model_mismatch(dataclasses.replace(small, name="ckpt", hidden_size=256))
    on_disk = Plan("./ckpt", "", (Replica((Stage((0, 4), (0,)),)),))
    assert on_disk.model_mismatch(dataclasses.replace(small, name="other-dir", num_layers=4)) is None
    assert "stages end at layer 4" in on_disk.model_mismatch(small)
    # a checkpoint directory whose shape is not the plan's preset
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    ckpt.joinpath("config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2}))
    path = _plan_file(tmp_path, plan)
    refused(hexjax("explain", path, "--cluster", C8, "--model", ckpt, "--prompt-len", 8, "--output-len", 8),
            "was made for small", "is a different model")
    # the plan's model is a directory: --model is needed
    refused(hexjax("explain", _plan_file(tmp_path, on_disk, "disk.json"), "--cluster", C8, "--prompt-len", 8,
                   "--output-len", 8), "was made for ./ckpt, which is not a preset", "pass --model")


def test_generate_and_dump_hlo_refuse_a_plan_for_another_model(hexjax, tmp_path):
    path = _plan_file(tmp_path)
    refused(hexjax("generate", "--model", "small", "--plan", path, "--prompt-ids", "1,2"),
            "was made for tiny (4 layers), not for small (8 layers)")
    refused(hexjax("dump-hlo", "--model", "tiny-mha", "--plan", path, "--out", tmp_path / "hlo"),
            "was made for tiny", "not for tiny-mha")


# ---------------------------------------------------------------- 3. paths, model names, flags

def test_plan_out_creates_missing_folders_and_refuses_a_directory(hexjax, tmp_path):
    out = tmp_path / "missing" / "dir" / "p.json"
    code, stdout, err = hexjax("plan", "--cluster", C8, "--model", "small", "--prompt-len", 16, "--output-len", 8,
                               "--out", out, "--svg", tmp_path / "pics" / "p.svg")
    assert code == 0, err
    assert Plan.load(out).model == "small" and (tmp_path / "pics" / "p.svg").is_file()
    refused(hexjax("plan", "--cluster", C8, "--model", "small", "--prompt-len", 16, "--output-len", 8,
                   "--out", tmp_path / "missing"), "is a directory; give a file name")


def test_dump_hlo_refuses_an_existing_file_as_out(hexjax, tmp_path):
    refused(hexjax("dump-hlo", "--plan", _plan_file(tmp_path), "--out", ROOT / "README.md"),
            "README.md is an existing file, not a directory")


@pytest.mark.parametrize("command", ["plan", "generate", "dump-hlo", "explain"])
def test_missing_model_directory_and_empty_model(hexjax, tmp_path, command):
    plan = _plan_file(tmp_path)
    args = {"plan": ["plan", "--cluster", C8, "--prompt-len", 16, "--output-len", 8],
            "generate": ["generate", "--plan", plan, "--prompt-ids", "1"],
            "dump-hlo": ["dump-hlo", "--plan", plan, "--out", tmp_path / "hlo"],
            "explain": ["explain", plan, "--cluster", C8]}[command]
    err = refused(hexjax(*args, "--model", "./missing-dir"), "directory ./missing-dir does not exist", "tiny")
    assert "unknown model preset" not in err
    refused(hexjax(*args, "--model", ""), "--model is empty", ", ".join(sorted(PRESETS)))


def test_model_config_messages():
    with pytest.raises(Exception, match="model directory models/llama does not exist"):
        ModelConfig.load("models/llama")
    with pytest.raises(Exception, match="the model name is empty"):
        ModelConfig.preset("")


def test_empty_directory_says_it_has_no_config(hexjax, tmp_path):
    refused(hexjax("plan", "--cluster", C8, "--model", tmp_path, "--prompt-len", 16, "--output-len", 8),
            "no config.json in this directory")


def test_verify_is_a_flag():
    import typer.main
    from typer.testing import CliRunner
    for name in ("plan", "explain"):
        cmd = typer.main.get_command(app).commands[name]
        verify = next(p for p in cmd.params if p.name == "verify")
        assert verify.is_flag and verify.opts == ["--verify"] and verify.secondary_opts == ["--no-verify"]
        text = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "200"}).output
        line = next(ln for ln in text.splitlines() if "--verify" in ln)
        assert "--no-verify" in line and "<bool>" not in line, line
        for flag in ("--json", "--exhaustive"):
            lines = [ln for ln in text.splitlines() if flag in ln]
            assert all("<bool>" not in ln for ln in lines), lines


# ---------------------------------------------------------------- 4, 8. explain shows no search; one notation

def test_explain_prints_no_search_statistics(hexjax, tmp_path):
    path = tmp_path / "p.json"
    code, out, err = hexjax("plan", "--cluster", C8, "--model", "llama-2-7b", "--prompt-len", 128,
                            "--output-len", 32, "--out", path)
    assert code == 0, err
    assert "candidate pipelines" in out                        # the search it ran now
    assert "dp1 x tp" in out and "0-31" in out and "×" not in out   # one notation: dpN x tpM, inclusive layers
    code, out, err = hexjax("explain", path, "--cluster", C8, "--model", "llama-2-7b")
    assert code == 0, err
    assert "search" not in out and "candidate" not in out
    code, out, err = hexjax("explain", path, "--cluster", C8, "--json")
    assert code == 0 and json.loads(out)["search"] is None


def test_notation_helpers():
    assert format_layers(0, 45) == "0-44" and format_layers(44, 45) == "44-44"
    assert format_mesh(2, 4) == "dp2 x tp4"


# ---------------------------------------------------------------- 5. compile progress with ETA

def test_progress_bars_have_an_eta():
    from rich.progress import TimeRemainingColumn

    from hexjax.cli.plan import _DelayedProgress, compile_progress
    for bar in (compile_progress(), _DelayedProgress(True, after_s=0.0)):
        with bar:
            bar(0, 4, "r0.s0 prefill")
            bar(1, 4, "r0.s0 decode")
            assert any(isinstance(c, TimeRemainingColumn) for c in bar.bar.columns)
    single = compile_progress()
    with single:
        single(0, 2, "r0.s0 prefill")
        single(1, 2, "r0.s1 decode")
        assert len(single.bar.tasks) == 1 and single.bar.tasks[0].description == "r0.s1 decode"


# ---------------------------------------------------------------- 6, 7. dump-hlo's table, --json everywhere

@dataclasses.dataclass(frozen=True)
class _Compile:
    replica: int
    stage: int
    phase: str
    layers: tuple
    dp: int
    tp: int
    flops: float
    argument_bytes: int
    peak_bytes: int
    compile_s: float
    hlo: str = ""

    @property
    def name(self):
        return f"r{self.replica}_s{self.stage}_{self.phase}"


@pytest.fixture
def fake_dump(monkeypatch):
    """``dump_hlo`` without XLA: the CLI's side only (the real one is tested in test_runtime_cli/test_hlo)."""
    import hexjax.runtime.dump
    calls = []

    def dump_hlo(plan, cfg, wl, out_dir, *, cluster=None, dtype="bfloat16", progress=None):
        recs = [_Compile(ri, si, ph, st.layers, st.dp, st.tp, 2e9, 3 << 20, 4 << 20, 0.5)
                for ri, r in enumerate(plan.replicas) for si, st in enumerate(r.stages) for ph in ("prefill", "decode")]
        for i, c in enumerate(recs):
            progress(i, len(recs), f"r{c.replica}.s{c.stage} {c.phase}")
            for ext in ("stablehlo.mlir", "hlo.txt", "cost.json", "memory.json"):
                (Path(out_dir) / f"{c.name}.{ext}").write_text("")
        (Path(out_dir) / "summary.md").write_text("| r0.s0 | prefill |")
        calls.append(len(recs))
        return recs

    monkeypatch.setattr(hexjax.runtime.dump, "dump_hlo", dump_hlo)
    return calls


def test_dump_hlo_prints_a_table_and_the_files(hexjax, tmp_path, fake_dump):
    out_dir = tmp_path / "new" / "hlo"
    code, out, err = hexjax("dump-hlo", "--plan", _plan_file(tmp_path), "--out", out_dir, "--batch", 2)
    assert code == 0, err
    assert fake_dump == [4]
    assert "| r0.s0 |" not in out                                       # not summary.md's markdown
    assert "r0.s1" in out and "1-3" in out and "dp2 x tp2" in out and "2G" in out and "4.0 MiB" in out
    assert f"wrote 17 files to {out_dir}:" in out
    assert "summary.md" in out and "r0_s1_decode.{cost.json,hlo.txt,memory.json,stablehlo.mlir}" in out


def test_dump_hlo_json(hexjax, tmp_path, fake_dump):
    out_dir = tmp_path / "hlo"
    code, out, err = hexjax("dump-hlo", "--model", "tiny", "--plan", _plan_file(tmp_path), "--out", out_dir,
                            "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["model"] == "tiny" and d["out_dir"] == str(out_dir) and len(d["compiles"]) == 4
    c = d["compiles"][3]
    assert (c["replica"], c["stage"], c["phase"], c["layers"], c["dp"], c["tp"]) == (0, 1, "decode", [1, 4], 2, 2)
    assert "hlo" not in c and len(c["files"]) == 4 and len(d["files"]) == 17


def test_devices_json(hexjax):
    from hexjax.devices import DEVICES
    code, out, err = hexjax("devices", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert [x["name"] for x in d["devices"]] == list(DEVICES)
    assert all(x["memory_bytes"] > 0 for x in d["devices"])


def test_demo_json(hexjax, monkeypatch):
    import hexjax.runtime.simulate as simulate
    from hexjax import search
    from hexjax.workload import Workload

    def fake_run(model, **kw):
        cluster = simulate.example_cluster()
        plan = Plan(model, "", (Replica((Stage((0, 2), (0,)), Stage((2, 4), (4, 5), tp=2))),))
        pred = search.evaluate(plan, ModelConfig.preset(model), cluster, Workload(4, 2, 1))
        return simulate.SimulatedRun(cluster, plan, pred, [[1, 2]], [[3, 4]], [[3, 4]], 0.5, 1.0, 0.25)

    monkeypatch.setattr(simulate, "plan_and_run", fake_run)
    code, out, err = hexjax("demo", "--model", "tiny", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["model"] == "tiny" and d["tokens"] == [[3, 4]] and d["matches_single_device"] is True
    assert [s["layers"] for s in d["stages"]] == [[0, 2], [2, 4]] and d["tokens_per_s"] == 4.0
    code, out, err = hexjax("demo", "--model", "tiny")
    assert code == 0, err
    assert "2-3" in out and "dp1 x tp2" in out and "(2)" not in out


def test_generate_refuses_a_dtype_override_that_does_not_fit(hexjax, tmp_path):
    """A bf16 plan that fits its cluster, run with --dtype float32 where it then does not: refused
    with the shortfall, before any weights are drawn."""
    from hexjax.search import cost
    from hexjax.workload import Workload
    cfg = ModelConfig.preset("tiny")
    plan = Plan("tiny", "", (Replica((Stage((0, cfg.num_layers), (0,)),)),), dtype_bytes=2)
    wl = Workload(3, 4, 1)

    def need(e, mem_GiB=1.0):
        return cost.predict_replica(plan.replicas[0], cfg, _tiny_cluster(mem_GiB), wl, e).stages[0].memory_bytes
    mem = (need(2) + need(4)) / 2 / (1 - cost.MEMORY_RESERVE_FRACTION)
    cluster = tmp_path / "c.toml"
    cluster.write_text(_tiny_cluster_toml(mem / 2**30))
    args = ["generate", "--model", "tiny", "--plan", _plan_file(tmp_path, plan), "--cluster", cluster,
            "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]
    code, out, err = hexjax(*args)
    assert code == 0, err
    err = refused(hexjax(*args, "--dtype", "float32"), "does not fit in float32", "short", "bfloat16")


def test_generate_refuses_a_model_bigger_than_this_machine(hexjax, tmp_path):
    """Llama-2-70B through a plan for 8 GPUs, on 8 virtual CPU devices: refused with the figure
    instead of drawing ~140 GB of random weights."""
    plan = Plan("llama-2-70b", "", (Replica((Stage((0, 40), (0, 1, 2, 3), 1, 4),
                                             Stage((40, 80), (4, 5, 6, 7), 1, 4))),))
    refused(hexjax("generate", "--model", "llama-2-70b", "--plan", _plan_file(tmp_path, plan),
                   "--prompt-ids", "1,2,3", "--max-new-tokens", "4"), "of host memory but", "available")


def _tiny_cluster_toml(memory_GiB: float) -> str:
    return (f'[device.T]\nbase = "A4000"\nmemory_GiB = {memory_GiB!r}\n\n'
            '[[host]]\nname = "h"\ndevice = "T"\ncount = 8\n')


def _tiny_cluster(memory_GiB: float):
    import tomllib

    from hexjax.cluster import Cluster
    return Cluster.from_dict(tomllib.loads(_tiny_cluster_toml(memory_GiB)))
