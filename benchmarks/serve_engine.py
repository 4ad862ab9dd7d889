"""Engine throughput without HTTP: this tree's ``hexjax.serve.Engine`` against another revision's, same requests.

Every request is queued at once and run to the end (``Engine.generate``), after
one untimed round that compiles every shape the run uses; both engines run in
the same invocation, alternating, so machine load hits both alike.  The other
revision's ``hexjax/serve/engine.py`` is read with ``git show REV:...`` and
imported beside this tree's (the rest of the runtime is this tree's).

    python benchmarks/serve_engine.py --baseline-rev HEAD --baseline-max-batch 8 --max-batch 32 --requests 200
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import subprocess
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()


def load_engine_at(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:hexjax/serve/engine.py"], check=True, capture_output=True,
                         text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "engine_baseline.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("engine_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["engine_baseline"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--plan", default="examples/plans/small-uneven.json")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--baseline-rev", default="HEAD")
    ap.add_argument("--baseline-max-batch", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2, help="Timed rounds per engine (alternating).")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import hexjax
    from hexjax.plan import Plan
    from hexjax.serve import engine as current
    baseline = load_engine_at(args.baseline_rev)
    cfg = hexjax.ModelConfig.preset(args.model)
    plan = Plan.load(args.plan)
    rng = random.Random(args.seed)
    jobs = [([rng.randrange(1, 256) for _ in range(rng.randint(4, 64))], rng.randint(8, 64))
            for _ in range(args.requests)]
    engines = {}
    for name, mod, mb in ((f"{args.baseline_rev}", baseline, args.baseline_max_batch),
                          ("this tree", current, args.max_batch)):
        eng = mod.Engine(cfg, plan, max_batch=mb, max_model_len=args.max_model_len, platform="cpu")
        eng.generate([p for p, _ in jobs], [mod.SamplingParams(max_tokens=n) for _, n in jobs])   # compiles
        engines[name] = (eng, mod, mb)
    best = {}
    for _ in range(args.rounds):
        for name, (eng, mod, mb) in engines.items():
            s0 = eng.stats.steps
            t0 = time.perf_counter()
            outs = eng.generate([p for p, _ in jobs], [mod.SamplingParams(max_tokens=n) for _, n in jobs])
            dt = time.perf_counter() - t0
            toks = sum(len(o.token_ids) for o in outs)
            steps = eng.stats.steps - s0
            print(f"{name:>10} max_batch {mb:>3}: {toks} tokens in {dt:6.2f} s = {toks / dt:6.0f} tok/s, "
                  f"{steps} steps, {dt / steps * 1e3:.1f} ms/step", flush=True)
            best[name] = max(best.get(name, 0), toks / dt)
    (b, bv), (c, cv) = best.items()
    print(f"best of {args.rounds}: {c} {cv:.0f} tok/s vs {b} {bv:.0f} tok/s: {cv / bv:.2f}x")


if __name__ == "__main__":
    main()
