"""Load test of the OpenAI-compatible server: many clients, random prompt and output lengths.

Starts ``hexjax serve``'s app in-process on 127.0.0.1 (random weights of a
preset through a plan, on virtual CPU devices unless there are enough
accelerators), or targets a running server with ``--url``.  Fires
``--requests`` completions from ``--concurrency`` client threads (a third of
them streaming) and reports request and token throughput, TTFT / end-to-end
latency percentiles, preemptions and failures.  With ``--check`` every greedy
output is compared with single-device generation.

    python benchmarks/serve_load.py --model small --plan examples/plans/small-uneven.json \
        --requests 200 --concurrency 16 [--num-pages 64] [--check]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import re
import statistics
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--plan", default="examples/plans/small-uneven.json")
    ap.add_argument("--url", default=None, help="A running server (skips starting one).")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--num-pages", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(4, 64), metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, nargs=2, default=(8, 64), metavar=("MIN", "MAX"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="Compare greedy outputs with single-device generation.")
    args = ap.parse_args()

    import httpx
    import openai

    srv = engine = None
    if args.url is None:
        import jax
        from hexjax.cli.serve import build_app
        from hexjax.serve.api import ServerThread
        t0 = time.perf_counter()
        app, engine = build_app(args.model, args.plan, max_batch=args.max_batch, max_model_len=args.max_model_len,
                                num_pages=args.num_pages, platform="cpu" if jax.default_backend() == "cpu" else None)
        srv = ServerThread(app).start()
        url = srv.url
        print(f"server up in {time.perf_counter() - t0:.1f} s (compiles included) at {url}")
    else:
        url = args.url.rstrip("/")
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    name = client.models.list().data[0].id
    rng = random.Random(args.seed)
    vocab = 256
    jobs = []
    for k in range(args.requests):
        n = rng.randint(*args.output_len)
        p = [rng.randrange(1, vocab) for _ in range(rng.randint(*args.prompt_len))]
        jobs.append((k, p, n))

    def one(job):
        k, p, n = job
        t0 = time.perf_counter()
        ttft, gaps = None, []
        if k % 3 == 0:
            toks, last = [], None
            for c in client.completions.create(model=name, prompt=p, max_tokens=n, temperature=0, stream=True,
                                               stream_options={"include_usage": True}):
                if c.choices and (c.choices[0].model_extra or {}).get("token_ids"):
                    now, new = time.perf_counter(), c.choices[0].model_extra["token_ids"]
                    if ttft is None:
                        ttft = now - t0
                    else:   # inter-token latency: the gap spread over the tokens the chunk brought
                        gaps += [(now - last) / len(new)] * len(new)
                    last = now
                    toks += new
        else:
            r = client.completions.create(model=name, prompt=p, max_tokens=n, temperature=0)
            toks = r.choices[0].model_extra["token_ids"]
        return k, toks, ttft, gaps, time.perf_counter() - t0

    t0 = time.perf_counter()
    failures, results, itls = 0, {}, []
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as ex:
        for fut in concurrent.futures.as_completed([ex.submit(one, j) for j in jobs]):
            try:
                k, toks, ttft, gaps, e2e = fut.result()
                results[k] = (toks, ttft, e2e)
                itls += gaps
            except Exception as e:   # count, keep going
                failures += 1
                print("request failed:", e)
    wall = time.perf_counter() - t0
    tokens = sum(len(t) for t, _, _ in results.values())
    ttfts = [t for _, t, _ in results.values() if t is not None]
    e2es = [e for _, _, e in results.values()]
    metrics = httpx.get(url + "/metrics").text
    m = re.search(r"^hexjax_num_preemptions_total ([0-9.e+]+)$", metrics, re.M)
    print(f"{len(results)}/{args.requests} requests done, {failures} failed, in {wall:.1f} s: "
          f"{len(results) / wall:.2f} req/s, {tokens / wall:.1f} output tokens/s")
    print(f"TTFT (streamed) p50 {pct(ttfts, .5) * 1e3:.0f} ms p99 {pct(ttfts, .99) * 1e3:.0f} ms; "
          f"e2e p50 {pct(e2es, .5):.2f} s p99 {pct(e2es, .99):.2f} s, mean {statistics.fmean(e2es):.2f} s")
    print(f"inter-token latency (streamed) p50 {pct(itls, .5) * 1e3:.1f} ms p99 {pct(itls, .99) * 1e3:.1f} ms")
    print(f"preemptions: {m.group(1) if m else '?'}")
    if args.check:
        if engine is None:
            raise SystemExit("--check needs the in-process server (no --url)")
        from hexjax.models.generate import generate
        from hexjax.runtime.generation import model_params
        cfg, params = model_params(engine.cfg)
        # greedy: each output is a prefix of the longest run, so one batched call checks them all
        ref = generate(cfg, params, [p for _, p, _ in jobs], max(n for _, _, n in jobs))
        bad = sum(1 for (k, p, n), r in zip(jobs, ref) if k in results and r[:n] != results[k][0])
        print(f"greedy outputs equal single-device generation: {len(results) - bad}/{len(results)}")
    if srv is not None:
        srv.stop()
    if engine is not None:
        # baseline: the same prompts as one static batch through the same plan (every row runs to the
        # longest output; only each request's own tokens count)
        import hexjax
        from hexjax.plan import Plan
        plan = Plan.load(args.plan)
        prompts, longest = [p for _, p, _ in jobs], max(n for _, _, n in jobs)
        hexjax.run_plan(engine.cfg, plan, prompts[:2], 2)   # compile outside the timing
        res = hexjax.run_plan(engine.cfg, plan, prompts, longest)
        useful = sum(n for _, _, n in jobs)
        print(f"static batch through the plan: {res.seconds:.1f} s, {useful / res.seconds:.1f} useful tokens/s "
              f"(served {tokens / wall:.1f}: {tokens / wall / (useful / res.seconds):.2f}x)")


if __name__ == "__main__":
    main()
