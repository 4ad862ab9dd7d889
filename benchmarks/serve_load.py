"""Offered-rate sweep of the OpenAI-compatible server, against static-batch generation of the same requests.

Starts ``hexjax serve``'s app in-process on 127.0.0.1 (random weights of a
preset through a plan, on virtual CPU devices unless there are enough
accelerators), or targets a running server with ``--url``.  For each rate of
``--rates`` (requests per second; ``inf`` sends them all at once) it sends the
same ``--requests`` streamed completions, random prompt and output lengths,
at Poisson arrival times (exponential gaps, seeded), each from its own client
thread, and reports per rate: output token throughput, TTFT and inter-token
latency p50/p99, end-to-end p50/p99, preemptions (from ``/metrics``) and
failures.  The baseline is the same prompts as one static batch through the
same plan (``hexjax.run_plan``: every row runs to the longest output; only each
request's own tokens count), timed in the same invocation.  ``--check``
compares every greedy output with single-device generation.

    python benchmarks/serve_load.py --model small --plan examples/plans/small-uneven.json \
        --requests 200 --rates 4 16 64 inf [--max-batch 32] [--num-pages 64] [--check] [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import random
import re
import threading
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def preemptions(url: str) -> float:
    import httpx
    m = re.search(r"^hexjax_num_preemptions_total ([0-9.e+]+)$", httpx.get(url + "/metrics").text, re.M)
    return float(m.group(1)) if m else float("nan")


def make_jobs(n: int, prompt_len, output_len, seed: int, vocab: int = 256):
    rng = random.Random(seed)
    return [([rng.randrange(1, vocab) for _ in range(rng.randint(*prompt_len))], rng.randint(*output_len))
            for _ in range(n)]


def arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Poisson arrival times (seconds from the start) of ``n`` requests at ``rate`` per second."""
    if math.isinf(rate):
        return [0.0] * n
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def run_rate(client, name: str, jobs, times: list[float]) -> dict:
    """Send ``jobs`` at ``times``; per request: tokens, TTFT, inter-token gaps, end-to-end seconds."""
    start = time.perf_counter() + 0.05

    def one(k):
        prompt, n = jobs[k]
        delay = start + times[k] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t0 = time.perf_counter()
        toks, ttft, gaps, last = [], None, [], None
        for c in client.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
            new = (c.choices[0].model_extra or {}).get("token_ids") if c.choices else None
            if new:
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - t0
                else:   # a chunk of several tokens spreads its gap over them
                    gaps += [(now - last) / len(new)] * len(new)
                last = now
                toks += new
        return k, toks, ttft, gaps, time.perf_counter() - t0

    results, failures, errors = {}, 0, []
    lock = threading.Lock()
    with concurrent.futures.ThreadPoolExecutor(min(len(jobs), 512)) as ex:
        for fut in concurrent.futures.as_completed([ex.submit(one, k) for k in range(len(jobs))]):
            try:
                k, toks, ttft, gaps, e2e = fut.result()
                with lock:
                    results[k] = (toks, ttft, gaps, e2e)
            except Exception as e:   # count, keep going
                failures += 1
                errors.append(str(e))
    wall = time.perf_counter() - start
    return {"results": results, "failures": failures, "errors": errors[:3], "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--plan", default="examples/plans/small-uneven.json")
    ap.add_argument("--url", default=None, help="A running server (skips starting one; no static baseline).")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rates", type=float, nargs="+", default=[4.0, 16.0, 64.0, math.inf],
                    help="Offered request rates per second (inf: all at once).")
    ap.add_argument("--max-batch", type=int, default=None, help="Rows per replica (default: the engine's).")
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--num-pages", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(4, 64), metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, nargs=2, default=(8, 64), metavar=("MIN", "MAX"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="Compare greedy outputs with single-device generation.")
    ap.add_argument("--json", default=None, help="Also write the figures to this file.")
    args = ap.parse_args()

    import openai

    srv = engine = None
    if args.url is None:
        import jax
        from hexjax.cli.serve import build_app
        from hexjax.serve.api import ServerThread
        t0 = time.perf_counter()
        kw = {"max_batch": args.max_batch} if args.max_batch else {}
        app, engine = build_app(args.model, args.plan, max_model_len=args.max_model_len, num_pages=args.num_pages,
                                platform="cpu" if jax.default_backend() == "cpu" else None, **kw)
        for rep in engine.replicas:   # every shape a step may use: no compile inside the timings
            rep.warmup(full=True)
        srv = ServerThread(app).start()
        url = srv.url
        print(f"server up in {time.perf_counter() - t0:.1f} s (compiles included) at {url}, "
              f"{len(engine.replicas)} replicas x {engine.max_batch} rows, {engine.max_step_tokens} tokens/step")
    else:
        url = args.url.rstrip("/")
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=900)
    name = client.models.list().data[0].id
    jobs = make_jobs(args.requests, args.prompt_len, args.output_len, args.seed)
    run_rate(client, name, jobs[:8], [0.0] * min(8, len(jobs)))   # first requests outside the timing

    rows, ref = [], None
    if args.check:
        if engine is None:
            raise SystemExit("--check needs the in-process server (no --url)")
        from hexjax.models.generate import generate
        from hexjax.runtime.generation import model_params
        cfg, params = model_params(engine.cfg)
        # greedy: each output is a prefix of the longest run, so one batched call checks them all
        ref = generate(cfg, params, [p for p, _ in jobs], max(n for _, n in jobs))
    for rate in args.rates:
        before = preemptions(url)
        r = run_rate(client, name, jobs, arrivals(len(jobs), rate, args.seed + 1))
        res = r["results"].values()
        tokens = sum(len(t) for t, _, _, _ in res)
        ttfts = [t for _, t, _, _ in res if t is not None]
        itls = [g for _, _, gaps, _ in res for g in gaps]
        e2es = [e for _, _, _, e in res]
        row = {"rate": rate, "done": len(r["results"]), "failed": r["failures"], "wall_s": r["wall"],
               "output_tok_s": tokens / r["wall"], "req_s": len(r["results"]) / r["wall"],
               "ttft_p50_ms": pct(ttfts, .5) * 1e3, "ttft_p99_ms": pct(ttfts, .99) * 1e3,
               "itl_p50_ms": pct(itls, .5) * 1e3, "itl_p99_ms": pct(itls, .99) * 1e3,
               "e2e_p50_s": pct(e2es, .5), "e2e_p99_s": pct(e2es, .99),
               "preemptions": preemptions(url) - before}
        if ref is not None:
            row["greedy_equal"] = sum(1 for k, (p, n) in enumerate(jobs)
                                      if k in r["results"] and ref[k][:n] == r["results"][k][0])
        for e in r["errors"]:
            print("request failed:", e)
        rows.append(row)
        print(f"rate {rate:g}/s done ({row['done']}/{len(jobs)}, {row['output_tok_s']:.0f} tok/s)", flush=True)
    if srv is not None:
        srv.stop()

    static = None
    if engine is not None:
        import hexjax
        from hexjax.plan import Plan
        plan = Plan.load(args.plan)
        prompts, longest = [p for p, _ in jobs], max(n for _, n in jobs)
        hexjax.run_plan(engine.cfg, plan, prompts, 2)   # compile outside the timing
        res = hexjax.run_plan(engine.cfg, plan, prompts, longest)
        useful = sum(n for _, n in jobs)
        static = {"seconds": res.seconds, "useful_tok_s": useful / res.seconds}

    head = (f"{'rate/s':>7} {'done':>9} {'tok/s':>7} {'vs static':>9} {'TTFT p50':>9} {'p99':>7} "
            f"{'ITL p50':>8} {'p99':>7} {'e2e p50':>8} {'p99':>6} {'preempt':>7}" + ("  greedy=" if ref else ""))
    print(f"\n{args.requests} requests, prompts {args.prompt_len[0]}-{args.prompt_len[1]} tokens, outputs "
          f"{args.output_len[0]}-{args.output_len[1]}, streamed; latencies in ms (e2e in s)")
    print(head)
    for row in rows:
        vs = f"{row['output_tok_s'] / static['useful_tok_s']:.2f}x" if static else "-"
        print(f"{row['rate']:>7g} {row['done']:>4}/{len(jobs):<4} {row['output_tok_s']:>7.0f} {vs:>9} "
              f"{row['ttft_p50_ms']:>9.0f} {row['ttft_p99_ms']:>7.0f} {row['itl_p50_ms']:>8.1f} "
              f"{row['itl_p99_ms']:>7.1f} {row['e2e_p50_s']:>8.2f} {row['e2e_p99_s']:>6.2f} "
              f"{row['preemptions']:>7g}" + (f"  {row['greedy_equal']}/{row['done']}" if ref else ""))
    if static:
        print(f"static batch through the plan (hexjax.run_plan, all {len(jobs)} at once): {static['seconds']:.2f} s, "
              f"{static['useful_tok_s']:.0f} useful tok/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"requests": args.requests, "rates": rows, "static": static}, f, indent=1,
                      default=lambda x: None)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
