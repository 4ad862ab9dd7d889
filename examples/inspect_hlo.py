"""Compile every stage of a plan ahead of time and compare XLA's view with the cost model's.

    python examples/inspect_hlo.py                                  # Llama-2-70B on hexgen-8gpu, batch 160
    python examples/inspect_hlo.py --model small --out /tmp/hlo-small
    python examples/inspect_hlo.py --plan plan.json --cluster my.toml

No weights are needed: parameters and KV pages are abstract arrays with their
shardings, so a 70B plan compiles on 8 virtual CPU devices in about a minute.
For each stage and phase (prefill, decode) the output folder gets the
StableHLO, the optimised per-device HLO, cost_analysis() and memory_analysis()
as JSON, and summary.md with predicted and compiled figures side by side.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-2-70b")
    ap.add_argument("--cluster", default=str(HERE / "clusters" / "hexgen-8gpu.toml"))
    ap.add_argument("--plan", default=None, help="plan JSON (default: search one)")
    ap.add_argument("--objective", default="throughput", choices=["latency", "throughput", "cost"])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=160)
    ap.add_argument("--out", default="hlo-dump")
    args = ap.parse_args(argv)

    from hexjax import search
    from hexjax.cluster import Cluster
    from hexjax.models import ModelConfig
    from hexjax.plan import Plan
    from hexjax.runtime import dump_hlo, plan_dtype, verify_plan
    from hexjax.workload import Workload

    cfg = ModelConfig.load(args.model)
    cluster = Cluster.load(args.cluster)
    workload = Workload(args.prompt_len, args.output_len, args.batch)
    plan = Plan.load(args.plan) if args.plan else search.plan(cfg, cluster, workload, objective=args.objective)
    out = Path(args.out)
    compiles = dump_hlo(plan, cfg, workload, out, cluster=cluster, dtype=plan_dtype(plan))
    print((out / "summary.md").read_text())
    report = verify_plan(plan, cfg, cluster, workload)    # reuses the compiles above
    print(report.table())
    print("every stage fits its devices" if report.ok else "some stage does NOT fit its devices")
    # a glance at the partitioned program: collectives XLA inserted for tensor parallelism
    for c in compiles:
        if c.phase == "decode":
            hlo = (out / f"{c.name}.hlo.txt").read_text()
            ops = {op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo)) for op in ("all-reduce", "all-gather")}
            print(f"{c.name}: dp{c.dp} x tp{c.tp}, {ops['all-reduce']} all-reduce, {ops['all-gather']} all-gather")
    print(f"wrote {len(list(out.iterdir()))} files to {out}/")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
