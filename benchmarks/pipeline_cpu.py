"""Overhead of running a model as an uneven pipeline on virtual CPU devices.

llama-125m (random weights), batch 8, greedy: tokens/s of
  * single-device generation (``LlamaModel.generate``: one jitted decode loop),
  * the runtime on a one-stage plan (the pipeline machinery on one device),
  * the runtime on a 3-stage uneven plan over 8 virtual devices
    (layers 0-4 on tp=2, 5-8 on one device, 9-11 on tp=2), with one microbatch and
    with one microbatch per stage,
  * Hugging Face transformers' ``generate`` (torch, CPU).
All devices share this machine's cores, so the pipeline cannot be faster than
one device; the figure of merit is its overhead (goal: within 1.3x).

    python benchmarks/pipeline_cpu.py [--prompt-len 64] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def best_of(fn, repeats: int) -> tuple[float, object]:
    """(fastest wall time, result) over ``repeats`` calls after one warm-up call."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-125m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args()

    import jax
    import numpy as np

    from hexjax.models import LlamaModel, ModelConfig
    from hexjax.plan import Plan, Replica, Stage
    from hexjax.runtime import RunOptions, run_plan

    cfg = ModelConfig.preset(args.model)
    lm = LlamaModel.random(cfg, seed=0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, args.prompt_len).tolist() for _ in range(args.batch)]
    n, tokens = args.new_tokens, args.batch * args.new_tokens
    L = cfg.num_layers
    cuts = (0, round(L * 5 / 12), round(L * 9 / 12), L)
    uneven = Plan(cfg.name, "", (Replica((Stage((cuts[0], cuts[1]), (0, 1), tp=2), Stage((cuts[1], cuts[2]), (2,)),
                                          Stage((cuts[2], cuts[3]), (3, 4), tp=2))),), dtype_bytes=4)
    one = dataclasses.replace(Plan.single_device(cfg.name, L), dtype_bytes=4)   # float32, as the baselines
    print(f"{cfg.name}: {lm.num_params / 1e6:.0f}M parameters, batch {args.batch}, prompt {args.prompt_len}, "
          f"{n} new tokens; {len(jax.devices())} {jax.devices()[0].platform} devices, {os.cpu_count()} cores")

    rows = []
    t, ref = best_of(lambda: lm.generate(prompts, n), args.repeats)
    rows.append(("single device (LlamaModel.generate)", t, True))
    for name, plan, micro in [("runtime, 1-stage plan", one, 1),
                              ("runtime, 3-stage uneven plan, 1 microbatch", uneven, 1),
                              ("runtime, 3-stage uneven plan, 3 microbatches", uneven, 3)]:
        t, res = best_of(lambda: run_plan(lm, plan, prompts, n, options=RunOptions(micro_batches=micro)),
                         args.repeats)
        rows.append((name, res.seconds, res.tokens == ref))
    if not args.no_transformers:
        import tempfile

        import torch
        import transformers
        with tempfile.TemporaryDirectory() as d:
            lm.save_hf(d)
            hf = transformers.LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
        ids = torch.tensor(prompts)

        def hf_generate():
            with torch.no_grad():
                return hf.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)[:, args.prompt_len:].tolist()
        t, out = best_of(hf_generate, args.repeats)
        rows.append((f"transformers generate (torch {torch.__version__}, {torch.get_num_threads()} threads)", t,
                     out == ref))

    base = rows[0][1]
    print(f"{'':<48} {'seconds':>8} {'tokens/s':>9} {'x single':>9}  same tokens")
    for name, t, same in rows:
        print(f"{name:<48} {t:8.3f} {tokens / t:9.1f} {t / base:9.2f}  {same}")


if __name__ == "__main__":
    main()
