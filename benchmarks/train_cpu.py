"""Training throughput of an asymmetric two-replica plan against single-device training, on CPU.

The same model, global batch and AdamW settings are trained
  * on one device by a plain jitted optax step over the whole model (the baseline),
  * on one device through the trainer (a one-stage plan: the trainer's machinery alone),
  * through an asymmetric plan on 8 virtual CPU devices: replica 0 a two-stage pipeline
    (layer 0 on tp2, layers 1-3 on dp2 x tp2, 2 microbatches, 12 of 16 rows), replica 1
    the whole model on tp2 (4 rows); every layer's gradient summed over both replicas.
All virtual devices share this machine's cores, so the plan cannot be faster than one
device; the figure of merit is its overhead (goal: within 1.5x of the baseline's step time).
MFU is 6 x parameters x tokens/s over this machine's own float32 matmul rate (measured here:
the better of one 1024^2 matmul on one device and one on every device at once), so it says how much
of what the CPU can do the training gets; on a machine shared with other work all figures move.
The gradient-sync share is the time of the gradient sum over replicas and the moves back,
run alone after the backward work has finished, over the plan's step time.

    python benchmarks/train_cpu.py [--steps 8] [--seq-len 128] [--hidden 256]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def matmul_rate(n: int = 1024, repeats: int = 5) -> float:
    """This machine's float32 matmul FLOP/s: the better of one n x n matmul on one device and one on
    every device at once (XLA:CPU may give one device's ops a single thread), best of ``repeats``."""
    import jax
    import jax.numpy as jnp
    f = jax.jit(lambda x: x @ x)
    best = 0.0
    for devs in ([jax.devices()[0]], jax.devices()):
        xs = [jax.device_put(jnp.ones((n, n), jnp.float32), d) for d in devs]
        jax.block_until_ready([f(x) for x in xs])
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready([f(x) for x in xs])
            best = max(best, len(devs) * 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def median_step(step, batches) -> float:
    """Median wall time of ``step(batch)`` (each blocks until its result is read) after one warm-up."""
    import numpy as np
    step(batches[0])
    times = []
    for b in batches[1:]:
        t0 = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per configuration (after a warm-up)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from hexjax.models.config import ModelConfig
    from hexjax.models.llama import LlamaStage, init_params
    from hexjax.plan import Plan, Replica, Stage
    from hexjax.train import TrainConfig, Trainer
    from hexjax.train.optimizer import make_optimizer

    h = args.hidden
    cfg = ModelConfig("bench", vocab_size=2048, hidden_size=h, intermediate_size=3 * h, num_layers=args.layers,
                      num_heads=max(h // 64, 2), num_kv_heads=max(h // 128, 1),
                      max_position_embeddings=args.seq_len)
    gb, micro, rows = 16, 2, (12, 4)
    tcfg = TrainConfig(lr=1e-3, warmup_steps=0, clip_norm=1.0)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, cfg.vocab_size, (gb, args.seq_len + 1)).astype(np.int32) for _ in range(args.steps + 1)]
    tokens = gb * args.seq_len
    params = init_params(LlamaStage(cfg), jax.random.key(0))
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    peak = matmul_rate()
    print(f"{cfg.name}: {n_params / 1e6:.2f} M parameters, {cfg.num_layers} layers, hidden {h}; global batch {gb} x "
          f"{args.seq_len} = {tokens} tokens/step; {len(jax.devices())} virtual CPU devices on {os.cpu_count()} "
          f"cores; measured float32 matmul rate {peak / 1e9:.1f} GFLOP/s (all devices share these cores with "
          "anything else running: a loaded machine moves every figure)")

    # the baseline: one jitted step of value_and_grad + the same AdamW (clip by global norm in the chain)
    model = LlamaStage(cfg)
    opt = optax.chain(optax.clip_by_global_norm(tcfg.clip_norm), make_optimizer(tcfg))

    def loss_fn(p, b):
        x, y = b[:, :-1], b[:, 1:]
        logits = model.apply({"params": p}, x, jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape))[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()

    @jax.jit
    def plain_step(p, s, b):
        loss, g = jax.value_and_grad(loss_fn)(p, b)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss
    state = {"p": jax.tree.map(jnp.asarray, params), "s": opt.init(params)}

    def run_plain(b):
        state["p"], state["s"], loss = plain_step(state["p"], state["s"], b)
        return float(loss)

    one = Trainer(cfg, Plan(cfg.name, "", (Replica((Stage((0, cfg.num_layers), (0,)),)),)), config=tcfg,
                  microbatches=1, params=params)
    plan = Plan(cfg.name, "", (
        Replica((Stage((0, 1), (0, 1), 1, 2), Stage((1, cfg.num_layers), (2, 3, 4, 5), 2, 2))),
        Replica((Stage((0, cfg.num_layers), (6, 7), 1, 2),)),
    ))
    asym = Trainer(cfg, plan, config=tcfg, microbatches=micro, replica_rows=rows, params=params)

    results = {}
    for name, fn in (("single device, plain jitted optax step", run_plain),
                     ("single device through the trainer", lambda b: one.step(b)["loss"]),
                     ("asymmetric plan, 8 virtual devices", lambda b: asym.step(b)["loss"])):
        t = median_step(fn, batches)
        results[name] = t
        mfu = 6 * n_params * tokens / t / peak
        print(f"{name:<40} {1e3 * t:8.1f} ms/step {tokens / t:9.0f} tokens/s   MFU {100 * mfu:5.1f}%")
    base = results["single device, plain jitted optax step"]
    t_plan = results["asymmetric plan, 8 virtual devices"]
    print(f"plan / single device: {t_plan / base:.2f}x step time (goal <= 1.5x); trainer on one device / plain: "
          f"{results['single device through the trainer'] / base:.2f}x")
    sync = asym.time_grad_sync(batches[0])
    print(f"gradient sync: {sync['sync_bytes'] / 1e6:.2f} MB per step (each replica's gradients to the owner's "
          f"sharding and the sum back), {1e3 * sync['sync_s']:.1f} ms alone = {100 * sync['sync_s'] / t_plan:.1f}% "
          f"of the plan's step ({1e3 * sync['backward_s']:.0f} ms of forward and backward before it)")


if __name__ == "__main__":
    main()
