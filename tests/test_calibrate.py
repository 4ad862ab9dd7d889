"""Device profiles from ``hexjax calibrate``: file round trips and errors, the CLI, and (slow) the calibrated
cost model against independent timings of the real single-device runtime."""

import json
import os
import sys
import tomllib

import pytest

from hexjax.calibrate import Calibration, LayerRun, StageRun, calibrate, load_profile, predict_generation
from hexjax.cluster import Cluster
from hexjax.errors import ConfigError
from hexjax.models.config import ModelConfig


def synthetic() -> Calibration:
    """A calibration with made-up measurements (nothing timed), for the file tests."""
    layers = (LayerRun("prefill", 1, 64, 64, "float32", 2e-3, 4e8, 2e7),
              LayerRun("prefill", 4, 128, 128, "float32", 12e-3, 3.2e9, 2.1e7),
              LayerRun("decode", 1, 1, 128, "float32", 2.0e-3, 1e7, 2.5e7),    # read-bound: no point
              LayerRun("decode", 8, 1, 128, "float32", 3e-3, 8e7, 2.6e7))
    return Calibration("my-cpu", "cpu", "cpu", 4, 8 * 2**30, (("float32", 512, 1024, 5e11),), 1.2e10, layers,
                       ((1 << 16, 1e-4), (1 << 22, 2e-3)), 3e-5, 2e9, 3e9, "llama-125m", 0.5, "synthetic")


def test_profile_reproduces_its_layer_runs_and_round_trips(tmp_path):
    cal = synthetic()
    spec = cal.device_spec()
    pts = dict(spec.profile.flops_efficiency)["float32"]
    assert [r for r, _ in pts] == [8.0, 64.0, 512.0]          # the read-bound decode at 1 row gives no point
    # the decode at 1 row read faster than the streaming benchmark: its rate is the device's
    assert spec.memory_bandwidth_Bps == pytest.approx(2.5e7 / 2e-3, rel=1e-12) and 2.5e7 / 2e-3 > cal.read_Bps
    for run in cal.layers:                                    # so every run, read-bound or not, is reproduced
        assert cal.predicted_layer_s(run) == pytest.approx(run.seconds, rel=1e-9)
    # ring fit: 2 (n-1)/n * bytes / bw + 2 (n-1) alpha reproduces both all-reduce runs
    bw, alpha = cal.link()
    for nbytes, t in cal.allreduce:
        assert 2 * 3 / 4 * nbytes / bw + 2 * 3 * alpha == pytest.approx(t, rel=1e-9)
    path = tmp_path / "my-cpu.toml"
    path.write_text(cal.to_toml())
    c = Cluster.load(path)                                    # a cluster file of this host on its own
    assert c.hosts[0].device == spec and c.hosts[0].count == 4
    assert Cluster.from_dict(tomllib.loads(c.to_toml())) == c
    assert load_profile(path)["my-cpu"] == spec
    # another cluster file takes the device from the profile
    other = tmp_path / "sub" / "mine.toml"
    other.parent.mkdir()
    other.write_text('profiles = ["../my-cpu.toml"]\n[[host]]\nname = "a"\ndevice = "my-cpu"\ncount = 2\n'
                     '[[host]]\nname = "b"\ndevice = "A6000"\ncount = 1\n')
    mine = Cluster.load(other)
    assert mine.hosts[0].device == spec and mine.hosts[1].device.profile is None


BASE = {"host": [{"name": "h", "device": "c", "count": 1}],
        "device": {"c": {"memory_GiB": 4, "tflops": 0.1, "memory_bandwidth_GBps": 10, "price_per_hour": 0,
                         "kind": "cpu", "profile": {"flops_efficiency": {"float32": [[1, 0.1], [64, 0.8]]}}}}}


@pytest.mark.parametrize("mutate, words", [
    (lambda p: p.update(flops_efficiency={"float32": [[0, 0.5]]}), ["flops_efficiency.float32", "rows >= 1"]),
    (lambda p: p.update(flops_efficiency={"float32": [[4, 9.0]]}), ["efficiency in (0, 4]"]),
    (lambda p: p.update(flops_efficiency={"float32": "fast"}), ["flops_efficiency.float32"]),
    (lambda p: p.pop("flops_efficiency"), ["profile.flops_efficiency", "dtype ="]),
    (lambda p: p.update(memory_efficiency=-1), ["memory_efficiency", "positive"]),
    (lambda p: p.update(step_overhead_us="1us"), ["step_overhead_us", "number"]),
    (lambda p: p.update(speed=3), ["device.c.profile.speed", "unknown field"]),
])
def test_malformed_profiles_say_what_is_wrong(mutate, words):
    d = json.loads(json.dumps(BASE))
    mutate(d["device"]["c"]["profile"])
    with pytest.raises(ConfigError) as e:
        Cluster.from_dict(d, "c.toml")
    for w in words:
        assert w in str(e.value)


def test_missing_or_wrong_profile_files(tmp_path):
    d = dict(BASE, profiles=["nope.toml"])
    with pytest.raises(ConfigError, match=r"profiles\[0\].*no such profile file.*hexjax calibrate"):
        Cluster.from_dict(d, str(tmp_path / "c.toml"))
    (tmp_path / "empty.toml").write_text('name = "x"\n')
    with pytest.raises(ConfigError, match=r"profiles\[0\].*no \[device.NAME\] table"):
        Cluster.from_dict(dict(BASE, profiles=["empty.toml"]), str(tmp_path / "c.toml"))
    with pytest.raises(ConfigError, match="array of file paths"):
        Cluster.from_dict(dict(BASE, profiles="empty.toml"), str(tmp_path / "c.toml"))


def test_cli_calibrate_quick_writes_a_profile_the_planner_uses(tmp_path, monkeypatch, capsys):
    from hexjax.cli import main
    from hexjax.search.planner import plan
    from hexjax.workload import Workload
    out = tmp_path / "cpu.toml"
    monkeypatch.setattr(sys, "argv", ["hexjax", "calibrate", "--quick", "--out", str(out), "--json",
                                      "--model", "small", "--no-serving"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code in (0, None)
    report = json.loads(capsys.readouterr().out)
    assert report["num_devices"] >= 1 and report["peak_flops"] > 0 and report["memory_bandwidth_Bps"] > 0
    c = Cluster.load(out)
    dev = c.hosts[0].device
    assert dev.kind == "cpu" and dev.profile is not None and c.hosts[0].count == report["num_devices"]
    if report["num_devices"] > 1:          # the all-reduce ran and set the host's link
        assert c.hosts[0].intra_bandwidth_Bps == pytest.approx(report["link_bandwidth_Bps"])
    assert report["serving_steps"] == [] and dev.profile.host_pass_s == 0 and dev.profile.copy_Bps == 0
    assert "version" not in tomllib.loads(out.read_text())["device"][dev.name]["profile"]   # stays a version 1
    p = plan("small", c, Workload(32, 8, 2), objective="throughput")
    assert p.prediction["throughput_tokens_per_s"] > 0
    # bad input: one error line, exit 2
    monkeypatch.setattr(sys, "argv", ["hexjax", "calibrate", "--quick", "--dtypes", "fp8"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: --dtypes 'fp8'")


@pytest.mark.slow
def test_calibrated_cpu_predicts_llama_125m_generation_within_20_percent():
    # calibrate this CPU (decoder layers of llama-125m at a few shapes, the launch cost, streaming reads),
    # then time the whole model through the single-device runtime's jitted prefill and decode loop at
    # a shape the calibration did not run, and compare with the cost model's TTFT and TPOT. Calibration and
    # measurement alternate over three rounds and each keeps its best figures, so both see the machine
    # at its quietest moments rather than one of them a busy one.
    import dataclasses
    from hexjax.calibrate import QUICK, generation_timer
    cfg = ModelConfig.preset("llama-125m")
    shapes = ((1, 96, 24),)
    timers = {s: generation_timer(cfg, *s) for s in shapes}
    cal, measured = None, {s: (float("inf"), float("inf")) for s in shapes}
    for _ in range(3):
        c = calibrate(quick=True, model=cfg, shapes=dataclasses.replace(QUICK, repeats=5), serving=False)
        cal = c if cal is None else cal.best_of(c)
        for _ in range(5):
            for s, run in timers.items():
                m = run()
                measured[s] = (min(measured[s][0], m[0]), min(measured[s][1], m[1]))
    for (batch, prompt, new), meas in measured.items():
        predicted = predict_generation(cfg, cal.device_spec(), batch, prompt, new)
        ratios = [p / m for p, m in zip(predicted, meas)]
        print(f"llama-125m b{batch} prompt {prompt}: prefill {meas[0] * 1e3:.1f} ms measured, "
              f"{predicted[0] * 1e3:.1f} predicted; decode step {meas[1] * 1e3:.2f} measured, "
              f"{predicted[1] * 1e3:.2f} predicted; load average {os.getloadavg()[0]:.1f}")
        assert 0.8 <= ratios[0] <= 1.2, (batch, prompt, ratios)
        assert 0.8 <= ratios[1] <= 1.2, (batch, prompt, ratios)


def test_best_of_keeps_each_figure_at_its_best():
    import dataclasses
    a = synthetic()
    slower = dataclasses.replace(a, read_Bps=a.read_Bps / 2, launch_s=a.launch_s * 3,
                                 layers=tuple(dataclasses.replace(r, seconds=r.seconds * 2) for r in a.layers[:2])
                                 + tuple(dataclasses.replace(r, seconds=r.seconds / 2) for r in a.layers[2:]),
                                 matmul=(("float32", 512, 1024, 6e11),))
    m = a.best_of(slower)
    assert m.read_Bps == a.read_Bps and m.launch_s == a.launch_s and m.matmul == (("float32", 512, 1024, 6e11),)
    assert [r.seconds for r in m.layers] == [r.seconds for r in a.layers[:2]] + [r.seconds / 2 for r in a.layers[2:]]


def test_interleaved_timing_spreads_a_slow_stretch_over_every_program(monkeypatch):
    """Two programs of known cost (on a fake clock) during a stretch that runs everything 5x slower for a
    third of the time: timed in turns, each comes out at its own cost, while timed one after the other the
    first takes most of the slow stretch (its figure at least doubled, the second's exact)."""
    import types
    import hexjax.calibrate as C
    clock = [0.0]
    monkeypatch.setattr(C, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def program(cost):
        def run():
            clock[0] += cost * (5 if 0.003 <= clock[0] < 0.028 else 1)
        return run
    assert C.interleaved_time_s([program(1e-4), program(3e-4)], rounds=10, runs=6) == pytest.approx([1e-4, 3e-4])
    clock[0] = 0.0
    apart = [C.interleaved_time_s([program(c)], rounds=10, runs=6)[0] for c in (1e-4, 3e-4)]
    assert apart[0] >= 2e-4 and apart[1] == pytest.approx(3e-4)


def test_best_of_keeps_one_calibrations_stage_runs_together():
    """The stage overheads are differences between stage runs timed in turns: best_of keeps the stage runs of
    the calibration whose runs took less in all, not each run's faster figure from either."""
    import dataclasses
    runs = (StageRun(1, 1, 1, 64, 4e-4), StageRun(2, 1, 1, 64, 1.5e-3))
    a = dataclasses.replace(synthetic(), model="tiny", stages=runs)
    b = dataclasses.replace(a, stages=(dataclasses.replace(runs[0], seconds=3e-4),
                                       dataclasses.replace(runs[1], seconds=2e-3)))
    assert a.best_of(b).stages == runs and b.best_of(a).stages == runs
    assert dataclasses.replace(a, stages=()).best_of(b).stages == b.stages


# ---- the serving engine's host work and the copies between stages ----

def test_serving_terms_fit_round_trip_and_need_version_2(tmp_path):
    import dataclasses
    # engine decode steps (rows, step, program alone): host work 0.3 ms + 0.02 ms per row, by construction
    runs = ((1, 0.3e-3 + 0.02e-3 + 0.2e-3, 0.2e-3), (4, 0.3e-3 + 0.08e-3 + 0.25e-3, 0.25e-3))
    cal = dataclasses.replace(synthetic(), copy_latency_s=1.2e-4, copy_Bps=3e10, serving=runs)
    assert cal.host_work() == pytest.approx((0.3e-3, 0.02e-3), rel=1e-9)
    p = cal.device_spec().profile
    assert (p.host_pass_s, p.host_row_s, p.copy_latency_s, p.copy_Bps) == (*cal.host_work(), 1.2e-4, 3e10)
    assert p.host_s(3) == pytest.approx(0.36e-3, rel=1e-12)
    path = tmp_path / "serving.toml"
    path.write_text(cal.to_toml())
    table = tomllib.loads(path.read_text())["device"]["my-cpu"]["profile"]
    assert table["version"] == 2 and table["host_pass_us"] == pytest.approx(300) and table["copy_GBps"] == 30
    assert load_profile(path)["my-cpu"] == cal.device_spec()
    assert Cluster.from_dict(tomllib.loads(Cluster.load(path).to_toml())) == Cluster.load(path)
    # without runs nothing is measured and the figures stay 0 (no term)
    assert synthetic().host_work() == (0.0, 0.0) and synthetic().device_spec().profile.host_pass_s == 0
    # best_of keeps the quieter calibration's engine runs (together) and the faster copies
    noisy = dataclasses.replace(cal, copy_latency_s=3e-4, serving=((1, 1e-3, 0.2e-3), runs[1]))
    assert cal.best_of(noisy).serving == runs and cal.best_of(noisy).copy_latency_s == 1.2e-4


@pytest.mark.parametrize("mutate, words", [
    (lambda p: p.update(host_pass_us=300), ["profile.version", "host_pass_us need version = 2"]),
    (lambda p: p.update(version=4), ["profile.version", "unknown profile version 4"]),
    (lambda p: p.update(version=2, allreduce_us=[[2, 15.0]]), ["profile.version", "allreduce_us need version = 3"]),
    (lambda p: p.update(version=3, stage_overhead_us=[[0, 5.0]]), ["profile.stage_overhead_us", "devices >= 1"]),
    (lambda p: p.update(version=3, chunk_key_ns=[[1, -2.0]]), ["profile.chunk_key_ns", "nanoseconds >= 0"]),
    (lambda p: p.update(version=3, allreduce_us=[[2, 1.0], [2, 3.0]]), ["profile.allreduce_us", "distinct"]),
    (lambda p: p.update(version=3, allreduce_us=[[2.5, 1.0]]), ["profile.allreduce_us", "devices >= 1"]),
    (lambda p: p.update(version=2, copy_GBps=-1), ["profile.copy_GBps", "must be >= 0"]),
])
def test_malformed_serving_terms_say_what_is_wrong(mutate, words):
    import copy
    d = copy.deepcopy(BASE)
    mutate(d["device"]["c"]["profile"])
    with pytest.raises(ConfigError) as e:
        Cluster.from_dict(d)
    for w in words:
        assert w in str(e.value)


def test_measured_serving_host_work_is_the_step_less_its_program():
    """The serving engine's decode steps on one device against the same stage program run alone: every step
    costs more than its program (the host's share is what the profile keeps), and the copies between
    stages have a positive fixed time and rate."""
    import jax
    from hexjax.calibrate import measure_serving_host, measure_stage_copies
    runs = measure_serving_host(0, (1, 2), steps=12)
    assert [r for r, *_ in runs] == [1, 2]
    for _, step, alone in runs:
        assert 0 < alone < step
    fixed, rate = measure_stage_copies(jax.devices(), (1 << 10, 1 << 20), 3)
    assert fixed > 0 and rate > 0


def test_mesh_terms_fit_round_trip_and_need_version_3(tmp_path):
    """Stage overheads, in-program all-reduces, the chunk-attention key cost by mesh size and the chained
    copy: derived from made-up runs as their definitions say (a stage run's time less the serving cost
    model's time of that step without overhead; the extend runs' slope over the block table's keys; a
    chain's time less its programs alone, per copy, averaged over the chains), written as version 3,
    read back equal; a profile without them keeps version 2 and its exact figures."""
    import dataclasses
    from hexjax.search import cost
    from hexjax.workload import Workload
    cfg = ModelConfig.load("tiny")
    base = dataclasses.replace(synthetic(), model="tiny", copy_latency_s=1.2e-4, copy_Bps=3e10,
                               serving=((1, 5e-4, 2e-4), (4, 6e-4, 2.5e-4)))
    decode = (StageRun(1, 1, 1, 64, 4e-4), StageRun(1, 2, 4, 64, 9e-4), StageRun(2, 1, 1, 64, 1.5e-3),
              StageRun(2, 2, 4, 64, 2.5e-3))
    extend = (StageRun(1, 1, 1, 32, 2e-4, "extend", 128), StageRun(1, 1, 1, 32, 8e-4, "extend", 512),
              StageRun(2, 1, 1, 32, 5e-4, "extend", 128), StageRun(2, 1, 1, 32, 9e-4, "extend", 512))
    chains = (("1->1", 5e-4, 3e-4, 1), ("1->2->1", 1.2e-3, 6e-4, 2))      # 200 and 300 us per copy
    cal = dataclasses.replace(base, collectives=((2, 2e-5), (4, 5e-5)), stages=decode + extend, chains=chains)
    p = cal.device_spec().profile
    assert p.allreduce_s == ((2, 2e-5), (4, 5e-5)) and p.chained_copy_s == pytest.approx(2.5e-4, abs=1e-9)
    heads = cfg.num_heads
    keys = dict(p.chunk_key_s)
    assert keys[1] == pytest.approx(6e-4 / (32 * 384 * heads), abs=1e-12)
    assert keys[2] == pytest.approx(4e-4 / (32 * 384 * heads / 2), abs=1e-12)
    # each mesh size's overhead brings the serving cost model to the mean of its runs
    spec, (bw, lat) = cal.device_spec(), cal.link()
    for n in (1, 2):
        runs = [r for r in decode if r.devices == n]
        got = [cost.stage_cost(cfg, spec, bw, lat, r.layers, 1, n, False, False, 1, r.rows,
                               Workload(r.context - 1, 2, r.rows), 4, serving=True).decode_s for r in runs]
        # (the figures are kept at whole nanoseconds)
        assert sum(got) / len(got) == pytest.approx(sum(r.seconds for r in runs) / len(runs), abs=1e-9)
    path = tmp_path / "mesh.toml"
    path.write_text(cal.to_toml())
    table = tomllib.loads(path.read_text())["device"]["my-cpu"]["profile"]
    assert table["version"] == 3 and [n for n, _ in table["allreduce_us"]] == [2, 4]
    assert [us for _, us in table["allreduce_us"]] == pytest.approx([20, 50], rel=1e-12)
    assert load_profile(path)["my-cpu"] == cal.device_spec()
    assert Cluster.from_dict(tomllib.loads(Cluster.load(path).to_toml())) == Cluster.load(path)
    # without the runs: no such fields, version 2 as before
    path.write_text(base.to_toml())
    table = tomllib.loads(path.read_text())["device"]["my-cpu"]["profile"]
    assert table["version"] == 2 and not {"allreduce_us", "stage_overhead_us", "chunk_key_ns"} & set(table)
    # best_of keeps each run's fastest
    slower = dataclasses.replace(cal, collectives=((2, 4e-5), (4, 1e-5)), chains=(("1->1", 4e-4, 3.5e-4, 1),),
                                 stages=tuple(dataclasses.replace(r, seconds=r.seconds * 2) for r in cal.stages))
    both = cal.best_of(slower)
    assert dict(both.collectives) == {2: 2e-5, 4: 1e-5} and set(both.stages) == set(cal.stages)
    assert set(both.chains) == {("1->1", 4e-4, 3e-4, 1), chains[1]}


@pytest.mark.slow  # real timings: noisy on a loaded machine
def test_measured_mesh_terms_are_positive_and_grow_with_the_table():
    """calibrate's own stage-program and all-reduce benchmarks on the virtual devices: a two-layer stage step
    takes longer than a one-layer one on one device (on two, the gap is within a loaded machine's noise),
    an extend over a larger block table longer than over a smaller one, and chained all-reduces cost more
    than one."""
    import jax
    from hexjax.calibrate import measure_collectives, measure_stage_programs
    cfg = ModelConfig.load("tiny")
    runs = measure_stage_programs(cfg, jax.devices(), (1, 2), (2,), 3)
    t = {(r.phase, r.devices, r.layers, r.table_tokens): r.seconds for r in runs}
    assert 0 < t["decode", 1, 1, 128] < t["decode", 1, 2, 128] and t["decode", 2, 1, 128] > 0
    for n in (1, 2):
        assert 0 < t["extend", n, 1, 128] < t["extend", n, 1, 512]
    (n, s), = measure_collectives(jax.devices(), (1, 2), 3)
    assert n == 2 and s > 0
