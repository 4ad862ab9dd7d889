"""GPU checks and benchmark for hexjax.kernels (not a test: run it by hand on a GPU machine).

    python benchmarks/kernels_gpu.py [--repeats 10] [--tune] [--only compile,check,flash,paged]

Without a GPU it prints why it skips and exits 0. On a GPU it
1. lowers and compiles every kernel for the GPU backend ahead of time (Triton to PTX), with
   the tuning defaults of this GPU's generation (hexjax.kernels.tuning) and the generic ones,
2. checks the kernels against their jnp references on the GPU (exit 1 on a mismatch); float32
   must match to 1e-4 under the default matmul precision (no TF32 anywhere),
3. times flash attention (bf16, B=4, S=T=4096, Hq=32, Hkv=8, D=128, causal and not),
   forward and forward+backward, in TFLOP/s beside jax.nn.dot_product_attention with
   implementation="cudnn" and "xla"; goal: forward >= 0.9x cuDNN,
4. times paged decode attention at batch 1, 8, 64 and 4k-32k context, as bytes of K/V
   read per second against the card's measured device-to-device copy bandwidth;
   goal: >= 70% of it at batch >= 8.
Timings: jit, warm-up, then the median of --repeats runs, each ended by block_until_ready.
The unit tests run natively on a GPU too: JAX_PLATFORMS=cuda python -m pytest -q tests/test_kernels_*.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def gpu_devices():
    import jax
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


def median_time_s(fn, *args, repeats: int, warmup: int = 2) -> float:
    import jax
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compile_checks() -> bool:
    """Lower + compile each kernel for the GPU from shapes alone; report what fails."""
    import jax
    import jax.numpy as jnp

    from hexjax.kernels import flash_attention, paged_attention
    from hexjax.kernels.kv_cache import write_kv
    from hexjax.kernels.tuning import FlashBlockSizes

    sds = jax.ShapeDtypeStruct
    bf = jnp.bfloat16

    def grads(q, k, v, block_sizes=None):
        loss = lambda q, k, v: jnp.sum(flash_attention(q, k, v, block_sizes=block_sizes)
                                       .astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    cases = []
    dims = ((64, jnp.float32), (128, jnp.float32), (80, jnp.float16), (96, bf), (128, bf), (256, bf))
    for dim, dtype in dims:
        q, kv = sds((2, 1000, 8, dim), dtype), sds((2, 1030, 2, dim), dtype)
        name = f"D={dim} {jnp.dtype(dtype).name}"
        cases.append((f"flash fwd {name}", flash_attention, (q, kv, kv)))
        cases.append((f"flash fwd+bwd {name}", grads, (q, kv, kv)))
        generic = FlashBlockSizes.default(None, dim)
        if generic != FlashBlockSizes.default(jax.devices()[0].device_kind, dim):
            cases.append((f"flash fwd+bwd {name} generic tiles",
                          lambda q, k, v, b=generic: grads(q, k, v, b), (q, kv, kv)))
    for dim, page_size, group in ((128, 16, 4), (128, 8, 8), (128, 32, 1), (80, 16, 4), (256, 16, 2)):
        pages = sds((8, 2000, page_size, dim), bf)
        args = (sds((4, 8 * group, dim), bf), pages, pages, sds((4, 128), jnp.int32),
                sds((4,), jnp.int32))
        cases.append((f"paged D={dim} page={page_size} group={group}", paged_attention, args))
        new = sds((4, 37, 8, dim), bf)
        cases.append((f"write_kv D={dim} page={page_size}", write_kv,
                      (pages, pages, new, new, sds((4, 128), jnp.int32), sds((4,), jnp.int32))))
    ok = True
    for name, fn, args in cases:
        start = time.perf_counter()
        try:
            jax.jit(fn).lower(*args).compile()
            print(f"  compile OK    {name:40s} {time.perf_counter() - start:6.1f} s")
        except Exception as exc:  # report every failure, not just the first
            ok = False
            print(f"  compile FAIL  {name:40s} {type(exc).__name__}: {str(exc)[:400]}")
    return ok


def correctness_checks() -> bool:
    """Kernels against their references on the GPU itself."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hexjax.kernels import (flash_attention, flash_attention_reference, paged_attention,
                                paged_attention_reference, write_kv_reference)
    from hexjax.kernels.kv_cache import write_kv
    from hexjax.kernels.tuning import PagedBlockSizes

    ok = True

    def report(name, got, want, tol):
        nonlocal ok
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
        scale = float(jnp.max(jnp.abs(want.astype(jnp.float32)))) or 1.0
        good = err <= tol * max(1.0, scale)
        ok &= good
        print(f"  {'OK  ' if good else 'FAIL'}  {name:48s} max|err| {err:.3g} (scale {scale:.3g})")

    key = jax.random.PRNGKey(0)
    for dim, dtype, tol in ((128, jnp.bfloat16, 2e-2), (80, jnp.float16, 1e-2), (64, jnp.float32, 1e-4),
                            (128, jnp.float32, 1e-4)):
        kq, kk, kv = jax.random.split(jax.random.fold_in(key, dim), 3)
        q = jax.random.normal(kq, (2, 777, 8, dim), jnp.float32).astype(dtype)
        k = jax.random.normal(kk, (2, 900, 2, dim), jnp.float32).astype(dtype)
        v = jax.random.normal(kv, (2, 900, 2, dim), jnp.float32).astype(dtype)
        lengths = jnp.array([900, 431], jnp.int32)
        for causal in (True, False):
            name = f"flash D={dim} {jnp.dtype(dtype).name} causal={causal}"
            report(name, flash_attention(q, k, v, lengths, causal=causal),
                   flash_attention_reference(q, k, v, lengths, causal=causal), tol)
        cot = jax.random.normal(key, q.shape, jnp.float32)
        loss = lambda fn: (lambda q, k, v: jnp.sum(fn(q, k, v, lengths).astype(jnp.float32) * cot))
        got = jax.grad(loss(flash_attention), argnums=(0, 1, 2))(q, k, v)
        want = jax.grad(loss(flash_attention_reference), argnums=(0, 1, 2))(q, k, v)
        for n, g, w in zip("qkv", got, want):
            report(f"flash d{n} D={dim} {jnp.dtype(dtype).name}", g, w, 4 * tol)

    rng = np.random.default_rng(0)
    kv_heads, heads, dim, page_size, max_pages, batch = 8, 32, 128, 16, 64, 5
    num_pages = batch * max_pages + 7
    k_pages = jnp.asarray(rng.normal(size=(kv_heads, num_pages, page_size, dim)), jnp.bfloat16)
    v_pages = jnp.asarray(rng.normal(size=(kv_heads, num_pages, page_size, dim)), jnp.bfloat16)
    tables = jnp.asarray(rng.permutation(num_pages)[:batch * max_pages].reshape(batch, max_pages),
                         jnp.int32)
    lengths = jnp.array([0, 1, 17, 500, 1024], jnp.int32)
    q = jnp.asarray(rng.normal(size=(batch, heads, dim)), jnp.bfloat16)
    want = paged_attention_reference(q, k_pages, v_pages, tables, lengths)
    for splits in (1, 4, None):
        report(f"paged num_splits={splits}",
               paged_attention(q, k_pages, v_pages, tables, lengths,
                               block_sizes=PagedBlockSizes(num_splits=splits)), want, 2e-2)
    f32 = [x.astype(jnp.float32) for x in (q, k_pages, v_pages)]
    report("paged float32", paged_attention(f32[0], f32[1], f32[2], tables, lengths),
           paged_attention_reference(f32[0], f32[1], f32[2], tables, lengths), 1e-4)
    new = jnp.asarray(rng.normal(size=(batch, 40, kv_heads, dim)), jnp.bfloat16)
    positions = jnp.array([0, 3, 100, 990, 1000], jnp.int32)
    want = write_kv_reference(k_pages, v_pages, new, -new, tables, positions)
    # The serving loop's form: pages donated, written in place.
    got = jax.jit(write_kv, donate_argnums=(0, 1))(k_pages, v_pages, new, -new, tables, positions)
    report("write_kv k (donated)", got[0], want[0], 0.0)
    report("write_kv v (donated)", got[1], want[1], 0.0)
    return ok


def flash_benchmark(repeats: int, tune: bool, batch: int = 4, seq: int = 4096, heads: int = 32,
                    kv_heads: int = 8, dim: int = 128) -> None:
    import jax
    import jax.numpy as jnp

    from hexjax.kernels import flash_attention
    from hexjax.kernels.tuning import FlashBlockSizes

    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(keys[0], (batch, seq, heads, dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, dim), jnp.bfloat16)

    def impls(causal):
        yield "hexjax pallas", lambda q, k, v: flash_attention(q, k, v, causal=causal)
        for name in ("cudnn", "xla"):
            yield f"jax.nn {name}", (lambda name: lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=causal, implementation=name))(name)

    print(f"flash attention bf16 B={batch} S=T={seq} Hq={heads} Hkv={kv_heads} D={dim}")
    for causal in (False, True):
        fwd_flops = 4 * batch * heads * seq * seq * dim * (0.5 if causal else 1.0)
        results = {}
        for name, fn in impls(causal):
            fwd = jax.jit(fn)
            fwd_bwd = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)),
                                       argnums=(0, 1, 2)))
            try:
                t_fwd = median_time_s(fwd, q, k, v, repeats=repeats)
                t_all = median_time_s(fwd_bwd, q, k, v, repeats=repeats)
            except Exception as exc:
                print(f"  causal={causal!s:5} {name:14s} unavailable: {type(exc).__name__}: "
                      f"{str(exc)[:200]}")
                continue
            # Backward does 2.5x the forward's matmul work (5 products against 2).
            results[name] = (fwd_flops / t_fwd / 1e12, 3.5 * fwd_flops / t_all / 1e12)
        base = results.get("jax.nn cudnn")
        for name, (fwd_tflops, all_tflops) in results.items():
            ratio = ""
            if base:
                ratio = f"  ({fwd_tflops / base[0]:.2f}x / {all_tflops / base[1]:.2f}x cuDNN)"
            print(f"  causal={causal!s:5} {name:14s} fwd {fwd_tflops:7.1f} TFLOP/s   "
                  f"fwd+bwd {all_tflops:7.1f} TFLOP/s{ratio}")
        if base and "hexjax pallas" in results:
            ratio = results["hexjax pallas"][0] / base[0]
            print(f"  goal forward >= 0.9x cuDNN (causal={causal}): {ratio:.2f}x -> "
                  f"{'MET' if ratio >= 0.9 else 'MISSED'}")
    if tune:
        print("  forward tile sweep (non-causal):")
        flops = 4 * batch * heads * seq * seq * dim
        for block_q in (64, 128):
            for block_k in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (2, 3):
                        blocks = FlashBlockSizes(block_q=block_q, block_k=block_k,
                                                 num_warps=warps, num_stages=stages)
                        fn = jax.jit(lambda q, k, v, b=blocks:
                                     flash_attention(q, k, v, causal=False, block_sizes=b))
                        try:
                            t = median_time_s(fn, q, k, v, repeats=max(3, repeats // 2))
                            print(f"    block_q={block_q:3d} block_k={block_k:3d} warps={warps} "
                                  f"stages={stages}: {flops / t / 1e12:6.1f} TFLOP/s")
                        except Exception as exc:
                            print(f"    block_q={block_q} block_k={block_k} warps={warps} "
                                  f"stages={stages}: failed {type(exc).__name__}")


def copy_bandwidth_Bps(repeats: int, size_bytes: int = 1 << 30) -> float:
    """Device-to-device bandwidth of a large elementwise copy (bytes read + written per second)."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((size_bytes // 4,), jnp.float32)
    t = median_time_s(jax.jit(lambda x: x + 1.0), x, repeats=repeats)
    return 2 * x.nbytes / t


def paged_benchmark(repeats: int, batches=(1, 8, 64), contexts=(4096, 16384, 32768),
                    copy_bytes: int = 1 << 30) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hexjax.kernels import paged_attention

    copy_Bps = copy_bandwidth_Bps(repeats, copy_bytes)
    print(f"measured copy bandwidth: {copy_Bps / 1e9:.0f} GB/s "
          f"({copy_bytes / 2**30:.3g} GiB x + 1.0, bytes read + written)")
    heads, kv_heads, dim, page_size = 32, 8, 128, 16
    rng = np.random.default_rng(0)
    print(f"paged decode attention bf16 Hq={heads} Hkv={kv_heads} D={dim} page={page_size}")
    for batch in batches:
        for context in contexts:
            max_pages = context // page_size
            num_pages = batch * max_pages
            k_pages = jnp.ones((kv_heads, num_pages, page_size, dim), jnp.bfloat16)
            v_pages = jnp.ones((kv_heads, num_pages, page_size, dim), jnp.bfloat16)
            tables = jnp.asarray(rng.permutation(num_pages).reshape(batch, max_pages), jnp.int32)
            lengths = jnp.full((batch,), context, jnp.int32)
            q = jnp.asarray(rng.normal(size=(batch, heads, dim)), jnp.bfloat16)
            fn = jax.jit(paged_attention)
            t = median_time_s(fn, q, k_pages, v_pages, tables, lengths, repeats=repeats)
            kv_bytes = 2 * batch * context * kv_heads * dim * 2
            frac = kv_bytes / t / copy_Bps
            goal = ""
            if batch >= 8:
                goal = f"  goal >= 70%: {'MET' if frac >= 0.7 else 'MISSED'}"
            print(f"  batch {batch:3d} context {context:6d}: {t * 1e6:8.1f} us  "
                  f"{kv_bytes / t / 1e9:7.0f} GB/s  = {100 * frac:5.1f}% of copy{goal}")
            del k_pages, v_pages


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement")
    parser.add_argument("--tune", action="store_true", help="also sweep forward tile sizes")
    parser.add_argument("--only", default="compile,check,flash,paged",
                        help="comma-separated sections to run")
    args = parser.parse_args(argv)
    devices = gpu_devices()
    if not devices:
        import jax
        print(f"SKIP: no GPU visible to JAX (default backend: {jax.default_backend()}); "
              "run this on a machine with a CUDA GPU and jax[cuda12] or jax[cuda13].")
        return 0
    from hexjax.kernels.tuning import gpu_generation
    print(f"device: {devices[0].device_kind} ({len(devices)} visible), tuning generation "
          f"{gpu_generation(devices[0].device_kind)!r}")
    sections = set(args.only.split(","))
    ok = True
    if "compile" in sections:
        print("ahead-of-time lower + compile for the GPU:")
        ok &= compile_checks()
    if "check" in sections:
        print("correctness on the GPU against the references:")
        ok &= correctness_checks()
    if "flash" in sections:
        flash_benchmark(args.repeats, args.tune)
    if "paged" in sections:
        paged_benchmark(args.repeats)
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
