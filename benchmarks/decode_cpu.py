"""Single-device greedy decode speed on CPU: hexjax against transformers' generate.

Both run the same randomly initialised Llama (preset ``llama-125m`` by default, fp32):
the transformers model is built, saved with ``save_pretrained`` and loaded back with
``hexjax.load_hf``. Also measures the host's memory-read bandwidth and the batch-1
roofline (bandwidth / bytes read per generated token: every weight but the embedding
table, plus the KV cache).

    python benchmarks/decode_cpu.py [--model llama-125m] [--prompt 32] [--new 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import numpy as np


def read_bandwidth_GBps(size_bytes: int = 1 << 30, repeats: int = 5, threads: int = 1) -> float:
    """Best-of-``repeats`` rate of summing a ``size_bytes`` float32 array (numpy, split over threads)."""
    a = np.ones(size_bytes // 4, np.float32)
    parts = np.array_split(a, threads)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        if threads == 1:
            a.sum()
        else:  # numpy releases the GIL inside reductions
            ts = [threading.Thread(target=p.sum) for p in parts]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        best = min(best, time.perf_counter() - t0)
    return size_bytes / best / 1e9


def bytes_per_decode_token(cfg, context: float, dtype_bytes: int = 4) -> float:
    """Bytes one batch-1 decode step reads: layers, final norm, LM head, one embedding row, KV."""
    weights = cfg.num_layers * cfg.layer_params + cfg.hidden_size + cfg.vocab_size * cfg.hidden_size
    weights += cfg.hidden_size  # the one embedding row looked up
    kv = cfg.num_layers * cfg.kv_bytes_per_token(dtype_bytes) * context
    return weights * dtype_bytes + kv


def best_time_s(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-125m")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="new tokens per sequence")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    import hexjax
    from hexjax.models import ModelConfig, init_cache
    from hexjax.models.generate import pad_prompts, programs
    from hexjax.models.hf import hf_config_dict
    from hexjax.models.sampling import Sampling

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    load = os.getloadavg()
    print(f"host: {cores} cores, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")

    cfg = ModelConfig.preset(args.model)
    hf_cfg = hf_config_dict(cfg)
    hf_cfg.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp, safe_serialization=True)
        model = hexjax.load_hf(tmp)
    print(f"model: {args.model}, {model.num_params / 1e6:.1f} M parameters, fp32; "
          f"prompt {args.prompt} tokens, {args.new} new tokens, greedy")

    bw1 = read_bandwidth_GBps(threads=1)
    bwn = read_bandwidth_GBps(threads=cores)
    bw = max(bw1, bwn)
    context = args.prompt + (args.new - 1) / 2  # mean keys attended per decode step
    per_tok = bytes_per_decode_token(cfg, context)
    roof = bw * 1e9 / per_tok
    print(f"memory read bandwidth: {bw1:.1f} GB/s (1 thread), {bwn:.1f} GB/s ({cores} threads); "
          f"batch-1 decode reads {per_tok / 1e6:.0f} MB/token -> roofline {roof:.1f} tokens/s")

    rng = np.random.default_rng(0)
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = rng.integers(0, cfg.vocab_size, (batch, args.prompt))
        ids = torch.as_tensor(prompts)

        def run_hf():
            with torch.no_grad():
                out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                   do_sample=False, pad_token_id=0)
            return out[:, args.prompt:].tolist()

        def run_hexjax():
            return model.generate(prompts.tolist(), args.new)

        hf_tokens, hx_tokens = run_hf(), run_hexjax()  # warm-up (and compile)
        same = sum(a == b for a, b in zip(hf_tokens, hx_tokens))
        t_hf = best_time_s(run_hf, args.repeats)
        t_hx = best_time_s(run_hexjax, args.repeats)

        # hexjax's phases on their own: prefill, then the one-program decode loop
        prog = programs(cfg, Sampling(), jnp.float32, None)
        toks, lengths = pad_prompts(prompts.tolist())
        toks, lengths = jnp.asarray(toks), jnp.asarray(lengths)
        timing = {"prefill": float("inf"), "decode": float("inf")}
        for _ in range(args.repeats):
            cache = init_cache(cfg, batch, toks.shape[1] + args.new)
            jax.block_until_ready(cache)
            t0 = time.perf_counter()
            first, cache = prog.prefill(model.params, toks, lengths, cache)
            first.block_until_ready()
            t1 = time.perf_counter()
            out, _, cache = prog.decode(model.params, first, lengths, cache, args.new)
            out.block_until_ready()
            t2 = time.perf_counter()
            timing["prefill"] = min(timing["prefill"], t1 - t0)
            timing["decode"] = min(timing["decode"], t2 - t1)
        n = batch * args.new
        decode_tps = batch * (args.new - 1) / timing["decode"]
        print(f"\nbatch {batch}: {same}/{batch} sequences token-identical to transformers")
        print(f"  transformers generate: {t_hf:.3f} s  {n / t_hf:8.1f} tokens/s")
        print(f"  hexjax generate:       {t_hx:.3f} s  {n / t_hx:8.1f} tokens/s   "
              f"(prefill {timing['prefill'] * 1e3:.1f} ms, decode loop {decode_tps:.1f} tokens/s)")
        print(f"  ratio hexjax / transformers: {t_hf / t_hx:.2f}x")
        if batch == 1:
            print(f"  decode loop vs roofline: {decode_tps / roof:.0%} "
                  f"(end to end incl. prefill: {n / t_hx / roof:.0%})")


if __name__ == "__main__":
    main()
