"""Train a small Llama on the Python standard library through an asymmetric two-replica plan.

    python examples/train_uneven_plan.py                   # 2-4 minutes on 2 CPU cores
    python examples/train_uneven_plan.py --steps 500 --out-dir runs/stdlib

The text is the source of this Python's standard library (every machine with
Python has it); a byte-level BPE tokenizer is trained on it on the fly. The
plan has two data-parallel replicas of different layouts on 8 virtual CPU
devices:

* replica 0, a two-stage pipeline cut unevenly: layer 0 on devices 0-1
  (tp2), layers 1-3 on devices 2-5 (dp2 x tp2); it takes 12 of the 16 rows
  of every batch, in two 1F1B microbatches;
* replica 1, the whole model on devices 6-7 (tp2), taking the other 4 rows.

Every layer's gradient is summed over both replicas (each holds it on a
different mesh), so both apply the same AdamW update. The script prints the
plan, a progress bar, the gradient-sync share of a step, and writes the loss
curve as a PNG.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# 8 virtual CPU devices, before JAX starts (only the CPU backend is affected)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def stdlib_files(max_bytes: int) -> list:
    """The standard library's top-level ``*.py`` files, in name order, up to ``max_bytes`` of text."""
    import sysconfig
    from pathlib import Path
    files, total = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if total >= max_bytes:
            break
        files.append(f)
        total += f.stat().st_size
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--vocab", type=int, default=4096, help="ids of the BPE tokenizer trained on the text")
    ap.add_argument("--text-mb", type=float, default=2.0, help="megabytes of standard-library source to use")
    ap.add_argument("--out-dir", default="train-stdlib", help="tokenizer, token cache and loss curve go here")
    args = ap.parse_args(argv)

    from pathlib import Path

    import jax
    import numpy as np

    from hexjax.models.config import ModelConfig
    from hexjax.plan import Plan, Replica, Stage, format_layers, format_mesh
    from hexjax.train import TrainConfig, Trainer
    from hexjax.train.data import TokenWindows, tokenize_text, train_tokenizer
    from hexjax.train.progress import TrainProgress

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig("stdlib-llama", vocab_size=args.vocab, hidden_size=128, intermediate_size=384, num_layers=4,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=args.seq_len)
    files = stdlib_files(int(args.text_mb * 1e6))
    t0 = time.perf_counter()
    tok = train_tokenizer(files, cfg.vocab_size)
    tok.save(str(out / "tokenizer.json"))
    tokens = np.load(tokenize_text(files, tok, out / "tokens", cfg.vocab_size), mmap_mode="r")
    print(f"{len(files)} standard-library files ({sum(f.stat().st_size for f in files) / 1e6:.1f} MB) -> "
          f"{len(tokens):,} tokens with a {tok.get_vocab_size()}-id byte-level BPE trained here "
          f"({time.perf_counter() - t0:.1f} s)")

    plan = Plan(cfg.name, "", (
        Replica((Stage((0, 1), (0, 1), 1, 2), Stage((1, 4), (2, 3, 4, 5), 2, 2))),
        Replica((Stage((0, 4), (6, 7), 1, 2),)),
    ))
    rows, global_batch, microbatches = (12, 4), 16, 2
    print(f"{cfg.name}: {cfg.num_layers} layers, hidden {cfg.hidden_size}; {len(jax.devices())} "
          f"{jax.devices()[0].platform} devices; global batch {global_batch} x {args.seq_len} tokens")
    for r, (rep, n) in enumerate(zip(plan.replicas, rows)):
        stages = "  |  ".join(f"layers {format_layers(*s.layers)} on {format_mesh(s.dp, s.tp)} (devices "
                              f"{','.join(map(str, s.devices))})" for s in rep.stages)
        print(f"  replica {r}: {n:>2} rows in {microbatches} microbatches: {stages}")

    config = TrainConfig(lr=args.lr, warmup_steps=10, decay_steps=args.steps, weight_decay=0.1, clip_norm=1.0)
    trainer = Trainer(cfg, plan, config=config, microbatches=microbatches, replica_rows=rows, seed=0,
                      global_batch=global_batch, seq_len=args.seq_len)
    windows = TokenWindows(tokens, args.seq_len, seed=0)
    losses, t_start = [], time.perf_counter()
    with TrainProgress(args.steps) as bar:
        for i in range(args.steps):
            m = trainer.step(windows.batch(i * global_batch, global_batch))
            m["step"], m["tokens_per_s"] = trainer.step_count, m["tokens"] / m["seconds"]
            losses.append(m["loss"])
            bar.update(m)
    wall = time.perf_counter() - t_start
    sync = trainer.time_grad_sync(windows.batch(0, global_batch))
    # one step's loss is noisy (16 windows): judge the fall by the mean of the last 10 steps
    final = float(np.mean(losses[-10:]))
    print(f"loss {losses[0]:.3f} -> {final:.3f} (mean of the last 10 steps: {100 * final / losses[0]:.0f}% of the "
          f"first) in {args.steps} steps, {wall:.0f} s including compiles; replicas identical: "
          f"{trainer.replicas_in_sync()}")
    print(f"gradient sum over the replicas: {sync['sync_bytes'] / 1e6:.2f} MB moved per step, "
          f"{1e3 * sync['sync_s']:.1f} ms alone vs {1e3 * sync['backward_s']:.0f} ms of forward and backward")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.axhline(0.6 * losses[0], color="grey", linestyle=":", label="60% of the first loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(f"{cfg.name} on the standard library, two asymmetric replicas")
    ax.legend()
    fig.tight_layout()
    png = out / "loss.png"
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")
    return 0 if final < 0.6 * losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
