"""``hexjax serve`` in one process vs. the same plan over two processes (``hexjax launch``, loopback).

Both servers compile the common step shapes at start and get the same batches of concurrent greedy
requests over HTTP (after two untimed batches); the script prints each one's tokens per second, the two-process run's cost per
token, and whether both returned the same tokens.  The plan has a replica whose stages span both processes,
one on each process's devices (the plan of ``tests/test_multihost_serve.py``).

    python benchmarks/multihost_serve.py [--model tiny] [--requests 12] [--max-tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

HEXJAX = [sys.executable, "-c", "from hexjax.cli import main; main()"]


def start(kind: str, plan_file: Path, model: str, port: int) -> subprocess.Popen:
    serve = ["serve", "--model", model, "--plan", str(plan_file), "--virtual-devices", "8", "--port", str(port),
             "--max-batch", "4", "--max-model-len", "128", "--dtype", "float32"]
    argv = HEXJAX + serve if kind == "one" else \
        HEXJAX + ["launch", "-n", "2", "-k", "4", "--grace", "30", "--", "hexjax", *serve]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not come up")


def batch(url: str, model: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    def one(p):
        r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": p, "max_tokens": max_tokens,
                                                      "temperature": 0, "ignore_eos": True}, timeout=600)
        r.raise_for_status()
        return r.json()["choices"][0]["token_ids"]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as ex:
        return list(ex.map(one, prompts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from hexjax.cli.launch import free_port
    from test_multihost_serve import PLAN
    plan = PLAN if args.model == "tiny" else type(PLAN)(args.model, "", PLAN.replicas)
    prompts = [[(7 * i + j) % 200 + 1 for j in range(3 + 5 * (i % 4))] for i in range(args.requests)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        plan_file = Path(tmp) / "plan.json"
        plan.save(plan_file)
        for kind in ("one", "two"):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = start(kind, plan_file, args.model, port)
            try:
                wait_up(url, proc)
                for _ in range(2):   # compiles what the warm-up left and these batches use
                    batch(url, args.model, prompts, args.max_tokens)
                times = []
                for _ in range(args.rounds):
                    t = time.perf_counter()
                    tokens = batch(url, args.model, prompts, args.max_tokens)
                    times.append(time.perf_counter() - t)
            finally:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            best = min(times)
            n = sum(map(len, tokens))
            results[kind] = (best, n, tokens)
            label = "one process, 8 devices" if kind == "one" else "two processes x 4 devices"
            print(f"{label:28s} {n} tokens in {best:.3f} s (best of {args.rounds}): {n / best:8.1f} tokens/s; "
                  f"rounds {', '.join(f'{t:.3f}' for t in times)} s", flush=True)
    (t1, n, tok1), (t2, _, tok2) = results["one"], results["two"]
    print(f"two processes / one process: {t2 / t1:.2f}x the time ({(t2 - t1) / n * 1e3:.2f} ms more per token); "
          f"same tokens: {tok1 == tok2}")


if __name__ == "__main__":
    main()
