"""Benchmark of the plan search (not a test): speed, optimality, and what the plans predict.

    python benchmarks/search.py [--quick]

1. Search time for Llama-2-70B and Llama-3-70B on hexgen-8gpu, hexgen-full
   (58 GPUs) and synthetic-320 (goals on 2 cores: 1 s, 10 s, 60 s).
2. Optimality gap against the exhaustive search on 50 random small clusters
   (goal: 0).
3. On hexgen-8gpu: the best asymmetric plan, the best symmetric plan (one tp
   everywhere, even layer split) and HexGen's hand plan (TP 4/2/2, layers
   44/20/16), for several workloads.
4. hexgen-full against a100-16 at the same workload.
5. Training (``--train`` for these alone): search time for Llama-2-7B/13B/70B on
   hexgen-8gpu, hexgen-full and synthetic-320 (goals 1 s, 10 s, 60 s), each run
   stopped after ``--train-limit-s``.
6. Training, asymmetric gain for Llama-2-13B and 7B on hexgen-8gpu, hexgen-full and
   hexiscale-mix (and 13B at sequence length 2048, where it fits hexiscale-mix;
   ``--train-gain`` for this section alone): the best plan against constrained
   searches, (a) every replica the same layout and (b) symmetric (dp 1, one
   tp, even split).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import time
from pathlib import Path

from hexjax.cluster import Cluster, Host, Link
from hexjax.devices import DeviceSpec
from hexjax.errors import PlanError
from hexjax.models.config import ModelConfig
from hexjax.search import cost, plan
from hexjax.search.baselines import hexgen_hand_plan, symmetric_plan
from hexjax.search.planner import objective_value
from hexjax.workload import Workload

CLUSTERS = Path(__file__).resolve().parents[1] / "examples" / "clusters"


def load(name: str) -> Cluster:
    return Cluster.load(CLUSTERS / f"{name}.toml")


def search_times(models, clusters, wl: Workload) -> None:
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"## 1. search time (workload: prompt {wl.prompt_len}, output {wl.output_len}, batch {wl.batch}; "
          f"{os.cpu_count()} CPU cores, load average {busy:.1f} at the start; CPU s is this process's own time)")
    print(f"{'model':<12} {'cluster':<14} {'GPUs':>4} {'objective':<10} {'wall s':>7} {'CPU s':>7} {'stages<=':>8} "
          f"{'cands':>6} {'replicas':>8} {'tok/s':>9} {'latency s':>9}")
    for m in models:
        cfg = ModelConfig.preset(m)
        for name in clusters:
            c = load(name)
            for objective in ("throughput", "latency"):
                t0, c0 = time.perf_counter(), time.process_time()
                p = plan(cfg, c, wl, objective)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                s = p.prediction["search"]
                print(f"{m:<12} {name:<14} {c.num_devices:>4} {objective:<10} {dt:>7.2f} {dc:>7.2f} {s['max_stages']:>8} "
                      f"{s['candidates']:>6} {len(p.replicas):>8} {p.prediction['throughput_tokens_per_s']:>9.1f} "
                      f"{p.prediction['latency_s']:>9.2f}")
    print()


def random_problem(rng: random.Random):
    heads, kv = rng.choice([(4, 2), (4, 1), (2, 2)])
    cfg = ModelConfig("rand", 256, 64, 128, rng.choice([2, 3, 4, 5, 6]), heads, kv)
    size = cfg.num_params * 2
    kinds = [DeviceSpec(f"d{i}", int(size * rng.choice([0.3, 0.45, 0.7, 1.2, 3.0])), rng.choice([2e8, 5e8, 2e9]),
                        rng.choice([2e7, 5e7, 2e8]), 1e7, rng.choice([0.1, 0.25, 1.0]))
             for i in range(rng.randint(1, 3))]
    hosts, first = [], 0
    for k in range(rng.randint(2, 4)):
        count = rng.randint(1, 4)
        if first + count > 9:
            break
        hosts.append(Host(f"h{k}", rng.choice(kinds), count, rng.choice("xy"), first, rng.choice([1e7, 5e7]),
                          rng.choice([1e-5, 4e-5])))
        first += count
    links = (Link("h0", "h1", rng.choice([2e6, 3e7]), 3e-5),) if len(hosts) > 1 and rng.random() < 0.5 else ()
    cluster = Cluster(tuple(hosts), network_bandwidth_Bps=rng.choice([5e6, 2e7]),
                      network_latency_s=rng.choice([2e-5, 1e-4]), cross_zone_bandwidth_Bps=1e6,
                      cross_zone_latency_s=1e-3, links=links)
    wl = Workload(rng.choice([4, 16]), rng.choice([1, 4, 16]), rng.choice([1, 2, 3, 4, 8]))
    return cluster, cfg, wl


def optimality_gap(n: int, seed: int = 0) -> None:
    print(f"## 2. optimality gap against the exhaustive search ({n} random clusters of up to 9 devices, "
          "pipelines of up to 4 stages)")
    rng = random.Random(seed)
    objectives = ("throughput", "latency", "cost")
    worst, exact, infeasible, done, t_fast, t_exh, devs, stages = 0.0, 0, 0, 0, 0.0, 0.0, [], []
    while done < n:
        cluster, cfg, wl = random_problem(rng)
        objective = objectives[done % 3]
        try:
            t0 = time.perf_counter()
            oracle = plan(cfg, cluster, wl, objective, exhaustive=True, max_stages=4)
            t_exh += time.perf_counter() - t0
        except PlanError:
            infeasible += 1
            if infeasible > 5 * n:
                break
            continue
        t0 = time.perf_counter()
        fast = plan(cfg, cluster, wl, objective, max_stages=4)
        t_fast += time.perf_counter() - t0
        vo = objective_value(cost.predict(oracle, cfg, cluster, wl), objective, wl)[0]
        vf = objective_value(cost.predict(fast, cfg, cluster, wl), objective, wl)[0]
        gap = abs(vf - vo) / abs(vo)
        worst = max(worst, gap)
        exact += gap <= 1e-9
        done += 1
        devs.append(cluster.num_devices)
        stages.append(max(len(r.stages) for r in fast.replicas))
    print(f"clusters {done} (plus {infeasible} random draws with no feasible plan, skipped), "
          f"{min(devs)}-{max(devs)} devices; longest pipelines chosen: "
          + ", ".join(f"{k} stage(s) x{stages.count(k)}" for k in sorted(set(stages))))
    print(f"optimum matched in {exact}/{done}; largest relative gap {worst:.2e}")
    print(f"time: fast search {t_fast:.2f} s in all, exhaustive {t_exh:.2f} s in all")
    print()


def real_model_oracle() -> None:
    cfg = ModelConfig.preset("llama-2-70b")
    c = load("hexgen-8gpu")
    wl = Workload(512, 128, 64)
    t0 = time.perf_counter()
    oracle = plan(cfg, c, wl, "throughput", exhaustive=True)
    t_exh = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = plan(cfg, c, wl, "throughput")
    t_fast = time.perf_counter() - t0
    vo, vf = oracle.prediction["throughput_tokens_per_s"], fast.prediction["throughput_tokens_per_s"]
    meta = oracle.prediction["search"]
    print(f"Llama-2-70B on hexgen-8gpu, throughput, batch 64: exhaustive {vo:.3f} tok/s in {t_exh:.1f} s "
          f"({meta['replicas']:,} replicas evaluated, {meta['plans']} packings of the fastest replica per device "
          f"usage); fast search {vf:.3f} tok/s in {t_fast:.2f} s; gap {abs(vo - vf) / vo:.1e}")
    print()


def describe(p) -> str:
    return " | ".join("+".join(f"{s.host}:L{s.layers[0]}-{s.layers[1] - 1}@{s.dp}x{s.tp}" for s in r.stages)
                      for r in p.replicas[:3]) + (f" (+{len(p.replicas) - 3} more)" if len(p.replicas) > 3 else "")


def hexgen8(workloads) -> None:
    print("## 3. hexgen-8gpu, Llama-2-70B: searched asymmetric vs best symmetric vs HexGen's hand plan")
    cfg = ModelConfig.preset("llama-2-70b")
    c = load("hexgen-8gpu")
    for wl, objective in workloads:
        print(f"- workload prompt {wl.prompt_len}, output {wl.output_len}, batch {wl.batch}; objective {objective}")
        rows = [("asymmetric", plan(cfg, c, wl, objective)), ("symmetric", symmetric_plan(cfg, c, wl, objective)),
                ("HexGen hand", hexgen_hand_plan(c, wl))]
        base = None
        for name, p in rows:
            pr = cost.predict(p, cfg, c, wl)
            if base is None:
                base = pr
            fit = "" if pr.fits else "  DOES NOT FIT (memory)"
            print(f"    {name:<12} {pr.throughput_tokens_per_s:8.1f} tok/s  latency {pr.latency_s:6.2f} s  "
                  f"TTFT {pr.ttft_s:6.2f} s  TPOT {pr.tpot_s * 1e3:6.1f} ms  ${pr.price_per_hour:.2f}/h  "
                  f"{describe(p)}{fit}")
    print()


def full_vs_a100(wl: Workload) -> None:
    print(f"## 4. hexgen-full (58 GPUs) vs a100-16, Llama-2-70B, prompt {wl.prompt_len}, output {wl.output_len}, "
          f"batch {wl.batch}")
    cfg = ModelConfig.preset("llama-2-70b")
    res = {}
    for name in ("hexgen-full", "a100-16"):
        c = load(name)
        for objective in ("latency", "throughput"):
            p = plan(cfg, c, wl, objective)
            pr = cost.predict(p, cfg, c, wl)
            res[name, objective] = pr
            print(f"    {name:<12} {objective:<10} latency {pr.latency_s:6.2f} s  TTFT {pr.ttft_s:5.2f} s  "
                  f"TPOT {pr.tpot_s * 1e3:6.1f} ms  {pr.throughput_tokens_per_s:8.1f} tok/s  "
                  f"{pr.requests_per_s:6.3f} req/s  ${pr.price_per_hour:6.2f}/h (cluster "
                  f"${c.price_per_hour:.2f}/h)  {pr.tokens_per_dollar:9.0f} tok/$")
    lat = res["a100-16", "latency"].latency_s / res["hexgen-full", "latency"].latency_s
    rate = res["hexgen-full", "throughput"].requests_per_s / res["a100-16", "throughput"].requests_per_s
    print(f"    hexgen-full vs a100-16: best latency {lat:.2f}x lower (>1 means hexgen-full is faster), "
          f"sustainable rate {rate:.2f}x higher")
    print()


class _Timeout(Exception):
    pass


def _within(seconds: int, fn):
    """``fn()``, or None when it runs past ``seconds`` (reported as such: the search is exact, not bounded)."""
    import signal

    def stop(*_):
        raise _Timeout

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        return fn()
    except _Timeout:
        return None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def train_search_times(models, clusters, twl, limit_s: int) -> None:
    from hexjax.search.train_search import plan_train
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"## 5. training search time (seq_len {twl.seq_len}, global batch {twl.global_batch}, microbatches "
          f"{'/'.join(map(str, twl.microbatches))}, remat {twl.remat}, {twl.dtype}; {os.cpu_count()} CPU cores, load "
          f"average {busy:.1f}; runs stopped after {limit_s} s; CPU s is this process's own time, load the 1-minute "
          "load average at the end, stages<= the automatic max_stages, programs the (M, n) integer programs settled "
          "by the class program / needing the program over concrete hosts, unproven those stopped by the time "
          "limit, gap s the plan's gap_bound_s)")
    print(f"{'model':<12} {'cluster':<14} {'GPUs':>4} {'wall s':>8} {'CPU s':>7} {'load':>5} {'stages<=':>8} "
          f"{'cands':>6} {'programs':>9} {'unproven':>8} {'gap s':>6} {'replicas':>8} {'stages':>10} {'rows':>14} "
          f"{'M':>3} {'tok/s':>9} {'step s':>8}")
    for m in models:
        cfg = ModelConfig.preset(m)
        for name in clusters:
            c = load(name)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                p = _within(limit_s, lambda: plan_train(cfg, c, twl))
            except PlanError as e:
                print(f"{m:<12} {name:<14} {c.num_devices:>4} {time.perf_counter() - t0:>8.2f}  no plan: {str(e)[:90]}")
                continue
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if p is None:
                print(f"{m:<12} {name:<14} {c.num_devices:>4} {'>' + str(limit_s):>8}  (stopped: not finished)")
                continue
            s, pr = p.prediction["search"], p.prediction
            now = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            # programs settled by the class program / by the program over concrete hosts after it
            progs = s.get("programs", {})
            progs = f"{progs.get('by_classes', '-')}/{progs.get('on_hosts', '-')}"
            print(f"{m:<12} {name:<14} {c.num_devices:>4} {dt:>8.2f} {dc:>7.2f} {now:>5.1f} {s['max_stages']:>8} "
                  f"{s['candidates']:>6} {progs:>9} {s.get('unproven_programs', 0):>8} "
                  f"{s.get('gap_bound_s', 0.0):>6.2f} "
                  f"{len(p.replicas):>8} {str([len(r.stages) for r in p.replicas]):>10} "
                  f"{str(list(p.replica_rows)):>14} {p.microbatches:>3} {pr['tokens_per_s']:>9.0f} "
                  f"{pr['step_s']:>8.2f}")
    print()


def train_asymmetric_gain(clusters, model: str, twl) -> None:
    """Best plan vs (a) every replica the same layout and (b) symmetric, even split: constrained searches."""
    from hexjax.search.train_search import Constraints, plan_train
    cfg = ModelConfig.preset(model)
    print(f"## 6. training, asymmetric gain ({model}, seq_len {twl.seq_len}, global batch {twl.global_batch}, "
          f"remat {twl.remat}): tokens/s of the best plan vs (a) the best with every replica the same layout "
          f"and (b) the best symmetric plan (dp 1, one tp, even split, equal shares)")
    print(f"{'cluster':<14} {'best tok/s':>10} {'step s':>8} {'(a) tok/s':>10} {'gain':>6} {'(b) tok/s':>10} {'gain':>6}"
          f"  best plan")
    for name in clusters:
        c = load(name)
        row = []
        for cons in (Constraints(), Constraints(same_layout=True), Constraints(symmetric=True)):
            try:
                row.append(plan_train(cfg, c, twl, constraints=cons))
            except PlanError:
                row.append(None)
        best, same, sym = row
        if best is None:
            print(f"{name:<14} no plan")
            continue
        tb = best.prediction["tokens_per_s"]
        fig = lambda p: (f"{p.prediction['tokens_per_s']:>10.0f} {tb / p.prediction['tokens_per_s']:>5.2f}x"
                         if p is not None else f"{'none':>10} {'-':>6}")
        shape = "; ".join(f"{r}: " + "|".join(f"{s.host}:{s.num_layers}L dp{s.dp}tp{s.tp}" for s in rep.stages)
                          for rep, r in zip(best.replicas, best.replica_rows))
        print(f"{name:<14} {tb:>10.0f} {best.prediction['step_s']:>8.2f} {fig(same)} {fig(sym)}  M={best.microbatches} "
              f"{shape}")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer random clusters, Llama-2-70B only")
    ap.add_argument("--train", action="store_true", help="only the training figures (sections 5 and 6)")
    ap.add_argument("--train-limit-s", type=int, default=600, help="stop a training search after this long")
    ap.add_argument("--train-gain", action="store_true", help="only the training asymmetric gain (section 6)")
    args = ap.parse_args()
    from hexjax.workload import TrainWorkload
    twl = TrainWorkload(seq_len=4096, global_batch=32, remat="full")
    if args.train or args.train_gain:
        if args.train:
            train_search_times(["llama-2-7b", "llama-2-13b", "llama-2-70b"],
                               ["hexgen-8gpu", "hexgen-full", "synthetic-320"], twl, args.train_limit_s)
        for m in ("llama-2-13b", "llama-2-7b"):
            train_asymmetric_gain(["hexgen-8gpu", "hexgen-full", "hexiscale-mix"], m, twl)
        # 13B fits hexiscale-mix up to seq 2048 only
        train_asymmetric_gain(["hexgen-8gpu", "hexgen-full", "hexiscale-mix"], "llama-2-13b",
                              dataclasses.replace(twl, seq_len=2048))
        return
    models = ["llama-2-70b"] if args.quick else ["llama-2-70b", "llama-3-70b"]
    search_times(models, ["hexgen-8gpu", "hexgen-full", "synthetic-320"], Workload(512, 128, 16))
    optimality_gap(10 if args.quick else 50)
    if not args.quick:
        real_model_oracle()
    hexgen8([(Workload(512, 128, 64), "throughput"), (Workload(512, 128, 16), "throughput"),
             (Workload(1024, 32, 16), "throughput"), (Workload(128, 128, 1), "latency")])
    full_vs_a100(Workload(512, 128, 16))
    train_search_times(["llama-2-7b", "llama-2-13b", "llama-2-70b"], ["hexgen-8gpu", "hexgen-full", "synthetic-320"],
                       twl, args.train_limit_s)
    for m in ("llama-2-13b", "llama-2-7b"):
        train_asymmetric_gain(["hexgen-8gpu", "hexgen-full", "hexiscale-mix"], m, twl)
    train_asymmetric_gain(["hexgen-8gpu", "hexgen-full", "hexiscale-mix"], "llama-2-13b",
                          dataclasses.replace(twl, seq_len=2048))


if __name__ == "__main__":
    main()
