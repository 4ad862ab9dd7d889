"""SLO attainment against request rate (HexGen's headline figure), simulated, for Llama-2-70B plans.

    python benchmarks/slo_attainment.py [--trace examples/traces/conversational.jsonl] [--requests 500]
        [--batch 8] [--slo-scale 5] [--png-dir slo_out]
    python benchmarks/slo_attainment.py --engine-check [--profile cpu-profile.toml]

For each cluster (hexgen-8gpu, hexgen-full, a100-16) it compares, on the same
request sizes and Poisson arrivals:

- **ours**: the plan the search finds for the throughput objective, costed
  at the trace's mean prompt and output (``hexjax plan --trace``);
- **symmetric**: the best plan whose stages all share one tp and split the
  layers evenly (``search.baselines.symmetric_plan``), same workload;
- **HexGen** (hexgen-8gpu only): HexGen's published plan,
  ``examples/plans/hexgen-8gpu-llama-2-70b.json`` (TP 4/2/2, layers
  44/20/16, from ``benchmark/hexgen_documents/README.md`` of
  github.com/Relaxed-System-Lab/HexGen). For the full-budget cluster that
  repository holds only its scheduler's inputs (the GPU groups
  ``[[8, 8, 8, 4], [8, 8], [3, 3], [8]]`` with 48/48/24/48, 24, 24 and 24 GiB
  in ``experimental/optimizer/genetic_algorithm.py``, removed after commit
  c18c224: the 58 GPUs of ``hexgen-full.toml``), not the layout it chose,
  and no request rates or SLO scales of the evaluation; the paper's
  appendix (arXiv 2311.11514) could not be read here. So hexgen-full and
  a100-16 have no HexGen line.

The latency SLO is ``--slo-scale`` times the end-to-end latency of one
request of the trace's mean size alone on the cluster's best latency plan,
in the spirit of HexGen's SLO scales (the paper's exact deadlines and rates
are not reproduced here: rates are swept from 10% to 150% of our plan's
predicted request rate). Every plan serves with ``--batch`` slots per
replica; every simulation uses the cost model's step times (datasheet peaks,
not measured GPUs). An iteration goes through a replica's stages as one
microbatch, as hexjax's serving engine runs it, which costs long pipelines
(HexGen's three stages) the most; ``--pipelined`` cuts each iteration into
microbatches streamed through the stages, as HexGen's runtime does. Prints
one table per cluster and saves one PNG each.

``--plan CLUSTER=LABEL=PLAN.json`` adds any plan file (validated against the
cluster) to that cluster's comparison.

``--engine-check`` instead replays a Poisson trace through the serving engine
(the ``tiny`` preset, one replica of two stages on virtual CPU devices, 4
slots) and prints its throughput beside the simulator's, once with the step
times measured in that run and, with ``--profile`` (a ``hexjax calibrate``
file, which is also a cluster file of this machine), once with the cost
model's step times for the calibrated CPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hexjax.cluster import Cluster
from hexjax.models.config import ModelConfig
from hexjax.plan import Plan
from hexjax.search import cost, plan as search_plan
from hexjax.search.baselines import symmetric_plan
from hexjax.search.simulate import SLO, attainment_curve, draw_curves
from hexjax.trace import load_trace

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


ENGINE_PLAN = {"version": 1, "model": "tiny", "cluster_fingerprint": "", "objective": "hand-written",
               "dtype_bytes": 4, "replicas": [{"stages": [{"layers": [0, 2], "devices": [0, 1], "tp": 2},
                                                          {"layers": [2, 4], "devices": [2], "tp": 1}]}]}


def engine_check(profile: Path | None, rate: float, requests: int) -> None:
    import statistics

    import hexjax
    from hexjax.search.simulate import CostModelStepTimes, MeasuredStepTimes, simulate
    from hexjax.serve import Engine, SamplingParams
    from hexjax.trace import Trace, replay
    hexjax.use_virtual_cpu_devices(8)
    cfg = ModelConfig.preset("tiny")
    plan = Plan.from_dict(ENGINE_PLAN)
    B, widths = 4, [16, 32, 64]
    engine = Engine(cfg, plan, max_batch=B, max_model_len=128)
    for w in widths:                            # compile before timing: a prefill per width, then mixed steps
        engine.add_request([3] * w, SamplingParams(max_tokens=3, ignore_eos=True))
        while engine.has_work():
            engine.step()
    sizes = [r for r in load_trace(ROOT / "examples/traces/small-mixed.jsonl").requests if r.prompt_len <= 64]
    replay(engine, Trace(tuple(sizes)).with_rate(rate, seed=7, num_requests=24))
    trace = Trace(tuple(sizes)).with_rate(rate, seed=3, num_requests=requests)
    run = replay(engine, trace)
    measured = run.throughput_tokens_per_s(trace)
    steps = MeasuredStepTimes.from_replay(run, widths)
    rows = [("engine (measured)", measured, len(run.steps),
             statistics.mean(f - r.arrival_s for f, r in zip(run.first_token_s, trace.requests)))]
    sims = [("simulated, step times of this run", steps)]
    if profile is not None:
        sims.append((f"simulated, cost model on {profile.name}", CostModelStepTimes(plan, cfg, Cluster.load(profile))))
    for label, st in sims:
        res = simulate(trace, 1, st, max_batch=B, max_step_tokens=engine.max_step_tokens)
        rows.append((label, res.throughput_tokens_per_s, sum(res.iterations),
                     statistics.mean(r.ttft_s for r in res.records)))
    print(f"{len(trace)} requests of small-mixed (prompt <= 64) at {rate:g}/s, tiny, tp2 | tp1 on virtual CPU "
          f"devices, {B} slots; measured decode step {steps.decode * 1e3:.2f} ms")
    if profile is not None:
        cm = sims[-1][1]
        print(f"cost model step times: decode (4 rows, context 64) {cm.decode_s(0, [64] * 4) * 1e3:.2f} ms, "
              f"prefill (4 x 32) {cm.prefill_s(0, [32] * 4) * 1e3:.2f} ms")
    for label, thr, its, ttft in rows:
        print(f"   {label:48s} {thr:8.1f} tok/s  {its:4d} iterations  mean TTFT {ttft * 1e3:8.1f} ms  "
              f"ratio to engine {thr / measured:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=ROOT / "examples/traces/conversational.jsonl")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--slo-scale", type=float, default=5.0)
    ap.add_argument("--clusters", default="hexgen-8gpu,hexgen-full,a100-16")
    ap.add_argument("--plan", action="append", default=[], metavar="CLUSTER=LABEL=PLAN.json",
                    help="Also compare this plan file on that cluster (repeatable), e.g. a published layout.")
    ap.add_argument("--png-dir", type=Path, default=Path("slo_out"))
    ap.add_argument("--pipelined", action="store_true", help="Cut each iteration into microbatches that stream "
                                                             "through the stages (as HexGen's runtime does).")
    ap.add_argument("--engine-check", action="store_true", help="Simulator against the engine on CPU instead.")
    ap.add_argument("--profile", type=Path, default=None, help="With --engine-check: a `hexjax calibrate` file.")
    ap.add_argument("--rate", type=float, default=150.0, help="With --engine-check: requests/s offered.")
    args = ap.parse_args()
    if args.engine_check:
        return engine_check(args.profile, args.rate, min(args.requests, 96))
    cfg = ModelConfig.preset("llama-2-70b")
    trace = load_trace(args.trace)
    wl = trace.workload(batch=args.batch)
    args.png_dir.mkdir(parents=True, exist_ok=True)
    print(f"trace {trace.name}: {len(trace)} sizes, mean prompt {wl.prompt_len}, mean output {wl.output_len}; "
          f"{args.requests} requests per point, {args.batch} slots per replica")
    for name in args.clusters.split(","):
        t0 = time.perf_counter()
        cluster = Cluster.load(ROOT / f"examples/clusters/{name}.toml")
        alone = search_plan(cfg, cluster, trace.workload(batch=1), "latency")
        slo = SLO(latency_s=args.slo_scale * cost.predict(alone, cfg, cluster, trace.workload(batch=1)).latency_s)
        plans = {"ours": search_plan(cfg, cluster, wl, "throughput"),
                 "symmetric": symmetric_plan(cfg, cluster, wl, "throughput")}
        if name == "hexgen-8gpu":
            plans["HexGen"] = Plan.load(ROOT / "examples/plans/hexgen-8gpu-llama-2-70b.json")
        for spec in args.plan:
            parts = spec.split("=", 2)
            if len(parts) != 3:
                ap.error(f"--plan {spec!r}: write CLUSTER=LABEL=PLAN.json")
            if parts[0] == name:
                extra = Plan.load(parts[2])
                extra.validate(cfg, cluster, wl)
                plans[parts[1]] = extra
        base = cost.predict(plans["ours"], cfg, cluster, wl).requests_per_s
        rates = [round(f * base, 4) for f in FRACTIONS]
        curves = {label: attainment_curve(p, cfg, cluster, trace, rates, slo, num_requests=args.requests,
                                          max_batch=args.batch, pipelined=args.pipelined)
                  for label, p in plans.items()}
        print(f"\n== {name}: SLO {slo.describe()} ({args.slo_scale:g}x one mean request alone, "
              f"{alone.replicas[0].stages[0].tp}-way first stage); our plan predicts {base:.3f} req/s")
        for label, p in plans.items():
            pred = cost.predict(p, cfg, cluster, wl)
            print(f"   {label:9s} {len(p.replicas)} replicas on {len(p.devices)} devices, predicted "
                  f"{pred.throughput_tokens_per_s:,.1f} tok/s, {pred.requests_per_s:.3f} req/s")
        print("   rate req/s  " + "  ".join(f"{label:>22s}" for label in plans))
        print("               " + "  ".join(f"{'attain  tok/s  p99 TTFT':>22s}" for _ in plans))
        for k, r in enumerate(rates):
            cells = []
            for label in plans:
                res = curves[label][k][1]
                cells.append(f"{100 * res.attainment:5.1f}% {res.throughput_tokens_per_s:6.1f} "
                             f"{res.percentile('ttft', 99):7.2f}s")
            print(f"   {r:9.4f}   " + "  ".join(f"{c:>22s}" for c in cells))
        png = draw_curves(curves, args.png_dir / f"{name}.png",
                          f"llama-2-70b on {name}, {trace.name}")
        print(f"   wrote {png} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
