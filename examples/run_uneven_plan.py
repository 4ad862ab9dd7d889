"""Plan a model for a heterogeneous cluster, run the plan, and check it against one device.

    python examples/run_uneven_plan.py                       # small model, built-in 8-GPU cluster
    python examples/run_uneven_plan.py --model llama-125m --objective latency
    python examples/run_uneven_plan.py --cluster my.toml --no-shrink   # real GPUs, real memory

Without GPUs the plan's devices become virtual CPU devices (8 are made before
JAX starts), and the cluster's memory is shrunk to the model so that even a
small model is cut into uneven stages.  On a machine with the cluster's GPUs
the same script maps plan device i onto GPU i.
"""

from __future__ import annotations

import argparse
import os
import sys

# must happen before JAX starts; only affects the CPU backend, so GPUs still win where present
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="model preset (random weights)")
    ap.add_argument("--cluster", default=None, help="cluster TOML (default: built-in hexgen-8gpu)")
    ap.add_argument("--objective", default="throughput", choices=["latency", "throughput", "cost"])
    ap.add_argument("--batch", type=int, default=8, help="requests in flight per replica")
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--no-shrink", action="store_true", help="plan for the cluster's real memory")
    args = ap.parse_args(argv)

    import jax

    from hexjax.cluster import Cluster
    from hexjax.models.config import format_bytes
    from hexjax.runtime.simulate import describe_stages, needed_devices, plan_and_run

    cluster = Cluster.load(args.cluster) if args.cluster else None
    run = plan_and_run(args.model, cluster=cluster, objective=args.objective, batch=args.batch,
                       prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens,
                       shrink=not args.no_shrink)
    dev = jax.devices()
    print(f"{args.model} on {run.cluster.name}; {len(dev)} {dev[0].platform} devices, plan uses "
          f"{needed_devices(run.plan)}")
    print(f"{'stage':<7} {'layers':<10} {'mesh':<10} {'devices':<9} {'device type':<18} {'predicted memory':>16}")
    mem = [s.memory_bytes for r in run.prediction.replicas for s in r.stages]
    for row, m in zip(describe_stages(run.plan, run.cluster), mem):
        print(f"{row[0]:<7} {row[1]:<10} {row[2]:<10} {row[3]:<9} {row[4]:<18} {format_bytes(m):>16}")
    for i, (p, t) in enumerate(zip(run.prompts[:4], run.tokens[:4])):
        print(f"[{i}] {len(p)} prompt tokens -> {t}")
    if len(run.prompts) > 4:
        print(f"... {len(run.prompts) - 4} more")
    n = sum(map(len, run.tokens))
    print(f"{n} tokens in {run.seconds:.3f} s = {run.tokens_per_s:.1f} tokens/s through the plan "
          f"(first run with compiling: {run.setup_seconds:.1f} s)")
    if run.reference is not None:
        print(f"single device: {n / run.reference_seconds:.1f} tokens/s; tokens identical: {run.matches}")
    return 0 if run.matches in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
