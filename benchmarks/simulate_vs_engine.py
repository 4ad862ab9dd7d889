"""`hexjax simulate`'s cost model against the serving engine, on uneven multi-stage plans of virtual CPU devices.

A device profile from `hexjax calibrate --quick` (read from --profile, or measured here first) drives the
simulator's step times through the cost model alone: its layer efficiencies, launch cost, all-reduce fit and,
for the serving engine's steps, its measured host work per pass, copies between stages, and the terms by mesh
size (stage program overhead, all-reduce inside a program, chunk attention over the block table, copies issued
behind a stage program). The serving engine (`hexjax.serve.Engine`) then serves the same Poisson trace on the
same plan in real time, and the script prints throughput and TTFT / TPOT medians of both, with the ratio
simulated / measured, for the full profile and with its serving terms taken out one at a time (host work x0,
copies x0, mesh terms x0, all of them: the planner's step), and the engine's median step times beside the
simulated ones.

    python benchmarks/simulate_vs_engine.py [--profile cpu.toml] [--requests 48] [--rounds 3]

A profile for --profile must come from 8 devices, as here:
`XLA_FLAGS=--xla_force_host_platform_device_count=8 hexjax calibrate --quick --model tiny --out cpu.toml`.

Run on this machine's CPU with 8 virtual devices (set here). Nothing of the engine run feeds the simulation:
the profile comes from calibrate's micro-benchmarks, the simulation only from the profile, the plan and the trace.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# uneven plans of the tiny model (4 layers) over the local devices, float32 (the engine's CPU dtype)
PLANS = {
    "tp2+tp1": [{"layers": [0, 2], "devices": [0, 1], "dp": 1, "tp": 2},
                {"layers": [2, 4], "devices": [2], "dp": 1, "tp": 1}],
    "1+tp2+1": [{"layers": [0, 1], "devices": [0], "dp": 1, "tp": 1},
                {"layers": [1, 3], "devices": [1, 2], "dp": 1, "tp": 2},
                {"layers": [3, 4], "devices": [3], "dp": 1, "tp": 1}],
}


def plan_of(stages, model: str = "tiny"):
    from hexjax.plan import Plan
    return Plan.from_dict({"version": 1, "model": model, "cluster_fingerprint": "", "objective": "hand-written",
                           "dtype_bytes": 4, "replicas": [{"stages": stages}]})


def summary(ttft, tpot, tokens: int, span: float) -> dict:
    return {"tok/s": tokens / span, "ttft_p50": statistics.median(ttft), "tpot_p50": statistics.median(tpot)}


def serving_engine(cfg, plan, trace, max_batch: int, max_len: int):
    """An engine for ``plan`` with every shape a step may take compiled and one replay of ``trace`` done, so
    that nothing compiles inside a timed run."""
    from hexjax.serve import Engine
    from hexjax.trace import replay
    engine = Engine(cfg, plan, max_batch=max_batch, max_model_len=max_len, dtype="float32")
    for rep in engine.replicas:
        rep.warmup(full=True)
    replay(engine, trace)
    return engine


def engine_run(engine, trace) -> dict:
    """Serve ``trace`` in real time: throughput over first arrival to last token, TTFT and TPOT medians."""
    from hexjax.trace import replay
    run = replay(engine, trace)
    ttft = [f - r.arrival_s for f, r in zip(run.first_token_s, trace.requests)]
    tpot = [(e - f) / (r.output_len - 1) for f, e, r in zip(run.first_token_s, run.finish_s, trace.requests)
            if r.output_len > 1]
    span = max(run.finish_s) - min(r.arrival_s for r in trace.requests)
    out = summary(ttft, tpot, sum(r.output_len for r in trace.requests), span)
    # the engine's own step times: steps that only decoded (all rows) and steps that gave first tokens
    decode = [dt for dt, outs in run.steps if outs and all(n > 1 for _, n in outs)]
    first = [dt for dt, outs in run.steps if any(n == 1 for _, n in outs)]
    out["decode_step"] = statistics.median(decode) if decode else float("nan")
    out["prefill_step"] = statistics.median(first) if first else float("nan")
    out["steps"], out["busy"] = len(run.steps), sum(dt for dt, _ in run.steps)
    return out


def simulated(cfg, plan, cluster, trace, max_batch: int, max_len: int, step_tokens: int, serving: bool = True,
              padded: bool = True) -> dict:
    from hexjax.search.simulate import CostModelStepTimes, engine_shapes, simulate
    shapes = engine_shapes(max_batch, max_len, step_tokens) if padded else {}
    res = simulate(trace, 1, CostModelStepTimes(plan, cfg, cluster, serving=serving, **shapes), max_batch=max_batch,
                   max_step_tokens=step_tokens)
    out = summary([r.ttft_s for r in res.served], [r.tpot_s for r in res.served if r.output_len > 1],
                  sum(r.output_len for r in res.served), res.makespan_s)
    out["steps"] = sum(res.iterations)
    return out


def _us(table, scale: float = 1e6) -> str:
    return ", ".join(f"{n}: {v * scale:.3g}" for n, v in table) or "not measured"


def with_profile(cluster, **changes):
    """``cluster`` with its device's profile changed (e.g. the host work x0)."""
    host = cluster.hosts[0]
    dev = dataclasses.replace(host.device, profile=dataclasses.replace(host.device.profile, **changes))
    return dataclasses.replace(cluster, hosts=(dataclasses.replace(host, device=dev),) + cluster.hosts[1:],
                               custom_devices=tuple(dev if d.name == dev.name else d for d in cluster.custom_devices))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", type=Path, help="profile written by `hexjax calibrate --quick --model tiny --out "
                                                 "FILE` (default: calibrate now)")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--load", type=float, default=4.0,
                    help="offered rate over a rough capacity estimate (2 ms decode steps): a queue builds, so "
                         "throughput is what the replica serves, not what arrives")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of a calibration (without --profile) and one engine run per plan; the profile "
                         "keeps each figure at its best, the ratios are against the fastest engine run and the "
                         "median one")
    ap.add_argument("--plans", default=",".join(PLANS))
    args = ap.parse_args()

    import jax
    import tomllib

    from hexjax.search.simulate import CostModelStepTimes, engine_shapes

    import hexjax
    from hexjax.cluster import Cluster
    from hexjax.trace import Trace, load_trace

    cfg = hexjax.ModelConfig.preset("tiny")
    t0 = time.perf_counter()
    B, max_len = args.max_batch, 128
    sizes = tuple(r for r in load_trace(ROOT / "examples/traces/small-mixed.jsonl").requests
                  if r.prompt_len <= 64)[:args.requests]
    # offered well beyond what the replica serves (a decode step takes 1-4 ms here): throughput is its capacity
    rate = args.load * B / (statistics.mean(r.output_len for r in sizes) * 2e-3)
    trace = Trace(sizes).with_rate(rate, seed=3)
    plans = {name: plan_of(PLANS[name]) for name in args.plans.split(",")}
    print(f"{jax.devices()[0].device_kind} x {jax.device_count()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; trace: {len(sizes)} requests of examples/traces/small-mixed.jsonl "
          f"(prompts <= 64), Poisson {rate:.0f}/s, seed 3; {B} slots")

    def row(name, label, s, ref=None):
        r = (lambda k: f"{s[k] / ref[k]:6.2f}" if ref else f"{'':>6s}")
        return (f"{name:>8s} {label:>16s} {s['tok/s']:8.1f} {r('tok/s')} {s['ttft_p50'] * 1e3:7.2f}ms {r('ttft_p50')} "
                f"{s['tpot_p50'] * 1e3:7.3f}ms {r('tpot_p50')}")

    # rounds of (calibration unless --profile, then one engine run per plan), each keeping its best: on a
    # shared machine the least disturbed calibration and engine run are the closest to the machine alone
    cal, cluster, runs = None, None, {name: [] for name in plans}
    engines = {name: serving_engine(cfg, plan, trace, B, max_len) for name, plan in plans.items()}
    for k in range(args.rounds):
        if args.profile is None:
            from hexjax.calibrate import calibrate
            c = calibrate(quick=True, model=cfg)
            cal = c if cal is None else cal.best_of(c)
            print(f"calibration {k + 1}: host {c.host_work()[0] * 1e6:.0f} us/pass + {c.host_work()[1] * 1e6:.0f} "
                  f"us/row, stage copies {c.copy_latency_s * 1e6:.0f} us, stage overhead (devices: us) "
                  f"{_us(c.profile().stage_overhead_s)}  (load {os.getloadavg()[0]:.1f})")
        for name in plans:
            measured = engine_run(engines[name], trace)
            runs[name].append(measured)
            print(row(name, f"engine run {k + 1}", measured) + f"  (load {os.getloadavg()[0]:.1f})")
    if args.profile is None:
        cluster = Cluster.from_dict(tomllib.loads(cal.to_toml()), source="<calibration>")
        how = f"best of {args.rounds} calibrate(quick=True, model='tiny') runs, alternating with the engine runs"
    else:
        cluster = Cluster.load(args.profile)
        how = str(args.profile)
    need = 1 + max(d for plan in plans.values() for st in plan.replicas[0].stages for d in st.devices)
    if cluster.num_devices < need:
        raise SystemExit(f"error: {how} describes {cluster.num_devices} device(s), the plans need {need}. Fix: "
                         "write it with `XLA_FLAGS=--xla_force_host_platform_device_count=8 hexjax calibrate "
                         "--quick --model tiny --out FILE`")
    p = cluster.hosts[0].device.profile
    print(f"profile mesh terms (devices: us): stage overhead {_us(p.stage_overhead_s)}; all-reduce "
          f"{_us(p.allreduce_s)}; chunk attention per key {_us(p.chunk_key_s, 1e9)} ns" if p is not None else "")
    if p is None or not (p.host_pass_s or p.copy_Bps):
        raise SystemExit(f"error: {how} has no serving terms (host_pass_us, copy_GBps). Fix: rewrite it with "
                         "`hexjax calibrate --quick --model tiny --out FILE`")
    print(f"profile: {how} ({p.source})")
    print(f"profile serving terms: host {p.host_pass_s * 1e6:.0f} us/pass + {p.host_row_s * 1e6:.0f} us/row, "
          f"stage copies {p.copy_latency_s * 1e6:.0f} us + {p.copy_Bps / 1e9:.3g} GB/s; launch "
          f"{p.step_overhead_s * 1e6:.1f} us; all-reduce latency {cluster.hosts[0].intra_latency_s * 1e6:.1f} us")
    # the last: the planner's step at exact shapes (no serving terms, no padding), as simulate ran before
    variants = [("calibrated", cluster, True),
                ("host x0", with_profile(cluster, host_pass_s=0.0, host_row_s=0.0), True),
                ("copies x0", with_profile(cluster, copy_latency_s=0.0, copy_Bps=0.0, chained_copy_s=0.0), True),
                ("mesh terms x0", with_profile(cluster, stage_overhead_s=(), allreduce_s=(), chunk_key_s=(),
                                               chained_copy_s=0.0), True),
                ("planner step", cluster, False)]
    print(f"{'plan':>8s} {'run':>16s} {'tok/s':>8s} {'ratio':>6s} {'TTFT p50':>9s} {'ratio':>6s} "
          f"{'TPOT p50':>9s} {'ratio':>6s}   (ratios: simulated / the fastest engine run; then / the median run)")
    for name, plan in plans.items():
        fastest = max(runs[name], key=lambda m: m["tok/s"])
        median = sorted(runs[name], key=lambda m: m["tok/s"])[len(runs[name]) // 2]
        print(row(name, "engine fastest", fastest))
        st = CostModelStepTimes(plan, cfg, cluster, **engine_shapes(B, max_len, engines[name].max_step_tokens))
        tokens = sum(r.output_len for r in trace.requests)
        print(f"{'':>8s} step medians of the fastest run: decode-only {fastest['decode_step'] * 1e3:.3f} ms, with "
              f"first tokens {fastest['prefill_step'] * 1e3:.3f} ms; simulated decode of 4 rows "
              f"{st.decode_s(0, [64] * 4) * 1e3:.3f} ms, a 32-token chunk and 3 decoding rows "
              f"{(st.prefill_s(0, [32]) + st.decode_s(0, [64] * 3)) * 1e3:.3f} ms; {fastest['steps']} steps taking "
              f"{fastest['busy'] * 1e3:.0f} ms of the run's {tokens / fastest['tok/s'] * 1e3:.0f} ms")
        for label, cl, serving in variants:
            s = simulated(cfg, plan, cl, trace, B, max_len, engines[name].max_step_tokens, serving, padded=serving)
            print(row(name, "sim " + label, s, fastest) + "   median run: "
                  + " ".join(f"{s[k] / median[k]:.2f}" for k in ("tok/s", "ttft_p50", "tpot_p50"))
                  + f"; {s['steps']} iterations")
    print(f"done in {time.perf_counter() - t0:.1f} s; load average {os.getloadavg()[0]:.1f}")

if __name__ == "__main__":
    main()
