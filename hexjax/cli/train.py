"""``hexjax train``: train a model over a plan on a token file, with orbax checkpoints.

JAX is imported inside the command, after ``--virtual-devices`` has been
applied. Everything that can be checked without device memory (the plan, the
batch split, the sequence length, the data file, a checkpoint's model) is
checked before the trainer places any weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from hexjax.cli._distributed import COORDINATOR, NUM_PROCESSES, PROCESS_ID
from hexjax.errors import ConfigError, PlanError


def plan_batch_split(plan, plan_file, global_batch: int, microbatches: int | None) -> tuple[int, tuple[int, ...] | None]:
    """Microbatches and per-replica rows: a training plan's own (``plan --task train``), unless told otherwise."""
    if microbatches is None:
        microbatches = plan.microbatches or 1
    rows = plan.replica_rows
    if rows is not None and sum(rows) != global_batch:
        raise ConfigError(f"{plan_file} splits a global batch of {sum(rows)} between its replicas "
                          f"({'/'.join(map(str, rows))} rows), not {global_batch}. Fix: --global-batch {sum(rows)}, "
                          "or plan again for this batch")
    return microbatches, rows


def train_cmd(model: str, plan_file: Path, virtual_devices: int | None, data: Path, data_dtype: str, seq_len: int,
              global_batch: int, microbatches: int, steps: int, lr: float, warmup_steps: int,
              decay_steps: int | None, weight_decay: float, clip_norm: float, remat: bool, seed: int,
              checkpoint_dir: Path | None, save_every: int, keep: int, resume: bool, as_json: bool,
              tokenizer: Path | None = None, save_hf: Path | None = None, metrics: Path | None = None,
              cluster_file: Path | None = None, coordinator: str | None = None, num_processes: int | None = None,
              process_id: int | None = None, dtype: str = "float32", master_dtype: str = "float32") -> dict:
    from hexjax.cli._distributed import across_processes, check_run, join_run
    # a process of a multi-host run joins it before JAX starts (--virtual-devices then checks the global count)
    multi = join_run(coordinator, num_processes, process_id)
    if virtual_devices:
        from hexjax.runtime.devices import use_virtual_cpu_devices
        use_virtual_cpu_devices(virtual_devices)
    from hexjax.cli.plan import load_config
    from hexjax.plan import Plan
    from hexjax.train import TrainConfig, Trainer, check_batch_shape
    from hexjax.train.checkpoint import agreed_latest_step, check_model, read_meta
    from hexjax.train.data import TokenWindows, is_text_data, open_tokens, prepare_text

    if steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    for flag, value in (("--dtype", dtype), ("--master-dtype", master_dtype)):
        if value not in ("float32", "bfloat16"):
            raise ConfigError(f"{flag} {value!r} is not a training dtype. Fix: give float32 or bfloat16")
    if save_every < 0:
        raise ConfigError(f"--save-every must not be negative, got {save_every}")
    if (save_every or resume) and checkpoint_dir is None:
        raise ConfigError("--save-every and --resume need --checkpoint-dir")
    text = is_text_data(data)          # missing path / unknown extension: before anything else
    if tokenizer is not None and not text:
        raise ConfigError(f"--tokenizer applies to text data (.txt or a folder of .txt), not the token file {data}")
    cfg = load_config(model)
    plan = Plan.load(plan_file)
    cluster = None
    if cluster_file is not None:
        from hexjax.cluster import Cluster
        cluster = Cluster.load(cluster_file)
        used = [d for r in plan.replicas for s in r.stages for d in s.devices]
        if used and max(used) >= cluster.num_devices:
            raise PlanError(f"{plan_file}: the plan uses device {max(used)} but {cluster_file} has only "
                            f"{cluster.num_devices} devices")
    plan.check_model(cfg, where=str(plan_file))
    problems = plan.layout_problems(cfg, virtual_devices)
    if problems:
        raise PlanError(f"{plan_file}: the plan cannot train {cfg.name}:\n" + "\n".join(f"  - {p}" for p in problems))
    microbatches, rows = plan_batch_split(plan, plan_file, global_batch, microbatches)
    check_batch_shape(cfg, plan, global_batch, seq_len, microbatches, rows)
    check_run(plan, cluster, "train")
    meta = None
    # several processes resume process 0's latest step (each reads it from the shared directory)
    resume_step = agreed_latest_step(checkpoint_dir) if resume else None
    if resume_step is not None:
        meta = read_meta(checkpoint_dir, resume_step)
        check_model(meta, cfg, checkpoint_dir)
        if decay_steps is None:   # keep the schedule the run started with
            decay_steps = meta["extra"].get("decay_steps")
    if decay_steps is None:
        decay_steps = steps if steps > warmup_steps else 0
    config = TrainConfig(lr=lr, warmup_steps=warmup_steps, decay_steps=decay_steps, weight_decay=weight_decay,
                         clip_norm=clip_norm if clip_norm > 0 else None, remat=remat, keep_checkpoints=keep,
                         master_dtype=master_dtype)
    trained_tokenizer = None
    if text:
        if tokenizer is None and checkpoint_dir is not None:
            from hexjax.train.checkpoint import agree
            # resume with the tokenizer trained before: as process 0 finds it, before it writes a new one
            if agree("tokenizer lookup", "1" if (Path(checkpoint_dir) / "tokenizer.json").is_file() else "")[0]:
                tokenizer = Path(checkpoint_dir) / "tokenizer.json"
        import jax
        # one writer of the trained tokenizer beside the checkpoints (the others keep theirs beside the data)
        beside = [d for d in (checkpoint_dir, save_hf) if d is not None and jax.process_index() == 0]
        data, trained_tokenizer = prepare_text(data, tokenizer, cfg.vocab_size, save_tokenizer_to=beside)
    windows = TokenWindows(open_tokens(data, data_dtype), seq_len, seed)
    if windows.num_windows < global_batch:
        raise ConfigError(f"{data}: {len(windows.tokens)} tokens make {windows.num_windows} windows of "
                          f"{seq_len + 1} tokens, fewer than one batch of {global_batch}; give more data or "
                          "a smaller --seq-len / --global-batch")

    source = cfg
    if Path(model).is_dir():
        from hexjax.models.hf import load_hf
        source = load_hf(Path(model), dtype="float32")
    trainer = Trainer(source, plan, config=config, microbatches=microbatches, seed=seed, dtype=dtype,
                      **across_processes(multi))
    position = 0
    if meta is not None:
        meta = trainer.restore(checkpoint_dir, resume_step)
        position = int(meta["extra"].get("position", trainer.step_count * global_batch))
    history = []
    n_params = trainer.num_params
    peak = None
    if cluster is not None:
        peak = sum(cluster.device(d).peak_flops for r in plan.replicas for st in r.stages for d in st.devices)
    metrics_file = None
    import jax
    if metrics is not None and jax.process_index() == 0:   # one writer in a multi-process run
        Path(metrics).parent.mkdir(parents=True, exist_ok=True)
        metrics_file = open(metrics, "a" if meta is not None else "w")

    def extra():
        return {"position": position, "seed": seed, "decay_steps": decay_steps}
    saved = None
    from hexjax.train.progress import TrainProgress
    with TrainProgress(steps, trainer.step_count, enabled=not as_json, echo=typer.echo) as bar:
        while trainer.step_count < steps:
            m = trainer.step(windows.batch(position, global_batch))
            position += global_batch
            m["step"] = trainer.step_count
            m["tokens_per_s"] = m["tokens"] / m["seconds"]
            if peak:
                m["mfu"] = 6 * n_params * m["tokens_per_s"] / peak
            history.append(m)
            if metrics_file is not None:
                keys = ("step", "loss", "grad_norm", "lr", "tokens", "seconds", "tokens_per_s", "mfu")
                metrics_file.write(json.dumps({k: m[k] for k in keys if k in m}) + "\n")
                metrics_file.flush()
            bar.update(m)
            if save_every and trainer.step_count % save_every == 0:
                saved = trainer.save(checkpoint_dir, extra=extra())   # asynchronous: training goes on
    if metrics_file is not None:
        metrics_file.close()
    if checkpoint_dir is not None and saved != trainer.step_count and history:
        saved = trainer.save(checkpoint_dir, extra=extra())
    trainer.wait_for_saves(close=True)      # every checkpoint committed before the run reports or exits
    if save_hf is not None:
        trainer.save_hf(save_hf)    # across processes: written by process 0, returns everywhere once written
        if (tokenizer is not None and jax.process_index() == 0
                and not (Path(save_hf) / "tokenizer.json").exists()):
            import shutil
            shutil.copyfile(tokenizer, Path(save_hf) / "tokenizer.json")
    tokens = sum(m["tokens"] for m in history)
    seconds = sum(m["seconds"] for m in history)
    out = {"model": cfg.name, "plan": str(plan_file), "resumed_from": None if meta is None else meta["step"],
           "steps": history, "final_loss": history[-1]["loss"] if history else None,
           "step": trainer.step_count, "checkpoint": None if saved is None else str(checkpoint_dir),
           "params": n_params, "tokens": tokens, "seconds": seconds,
           "tokens_per_s": tokens / seconds if seconds else None,
           "hf_checkpoint": None if save_hf is None else str(save_hf),
           "tokenizer": str(tokenizer or trained_tokenizer) if text else None,
           "data_tokens": str(data) if text else None}
    if peak and seconds:
        out["mfu"] = 6 * n_params * tokens / seconds / peak
    if as_json:
        typer.echo(json.dumps(out))
    return out


def dump_train_cmd(model: str | None, plan_file: Path, cluster_file: Path | None, out_dir: Path,
                   virtual_devices: int | None, seq_len: int | None, global_batch: int | None, microbatches: int | None,
                   dtype: str | None, as_json: bool) -> dict:
    """``hexjax dump-hlo --task train``: compile every stage's fwd, bwd and update programs (no weights)."""
    import dataclasses

    from hexjax.cli.plan import compile_progress, output_dir, plan_model
    from hexjax.plan import Plan
    if seq_len is None or global_batch is None:
        raise ConfigError("--task train needs --seq-len and --global-batch (and optionally --microbatches)")
    if virtual_devices:
        from hexjax.runtime.devices import use_virtual_cpu_devices
        use_virtual_cpu_devices(virtual_devices)
    plan = Plan.load(plan_file)
    cfg = plan_model(plan, plan_file, model)
    if cluster_file is not None:
        from hexjax.cluster import Cluster
        plan.validate(cfg, Cluster.load(cluster_file))
    problems = plan.layout_problems(cfg, virtual_devices)
    if problems:
        raise PlanError(f"{plan_file}: the plan cannot train {cfg.name}:\n" + "\n".join(f"  - {p}" for p in problems))
    from hexjax.train import check_batch_shape
    microbatches, rows = plan_batch_split(plan, plan_file, global_batch, microbatches)
    check_batch_shape(cfg, plan, global_batch, seq_len, microbatches, rows)
    output_dir(out_dir)
    from hexjax.runtime import compile_devices
    if not virtual_devices:
        compile_devices(max(i for r in plan.replicas for s in r.stages for i in s.devices) + 1)
    from hexjax.train.compile import dump_train_hlo, expected_argument_bytes
    dtype = dtype or "float32"
    with compile_progress(enabled=not as_json) as progress:
        compiles = dump_train_hlo(plan, cfg, out_dir, seq_len, global_batch, microbatches, dtype=dtype,
                                  replica_rows=rows, progress=progress)
    skip = ("stablehlo", "hlo", "cost", "memory")

    def fields(c):
        d = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name not in skip}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        d["expected_argument_bytes"] = expected_argument_bytes(c, cfg, dtype)
        d["files"] = sorted(p.name for p in Path(out_dir).glob(f"{c.name}.*"))
        return d
    out = {"model": cfg.name, "plan": str(plan_file), "out_dir": str(out_dir), "dtype": dtype, "task": "train",
           "seq_len": seq_len, "global_batch": global_batch, "microbatches": microbatches,
           "summary": str(Path(out_dir) / "summary.md"), "compiles": [fields(c) for c in compiles],
           "files": sorted(p.name for p in Path(out_dir).iterdir())}
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return out
    from rich.table import Table

    from hexjax.models.config import format_bytes
    from hexjax.cli._console import table_console
    con = table_console()
    t = Table(title=f"{cfg.name}: XLA's training programs, per device (seq {seq_len}, global batch {global_batch}, "
                    f"{microbatches} microbatches, {dtype})", header_style="bold")
    for col, justify in (("stage", "left"), ("program", "left"), ("layers", "left"), ("mesh", "center"),
                         ("XLA FLOPs", "right"), ("XLA args", "right"), ("expected", "right"),
                         ("XLA peak", "right"), ("1F1B stash", "right"), ("compile s", "right")):
        t.add_column(col, justify=justify)
    for c, d in zip(compiles, out["compiles"]):
        t.add_row(f"r{c.replica}.s{c.stage}", c.program, f"{c.layers[0]}-{c.layers[1] - 1}", f"dp{c.dp}·tp{c.tp}",
                  f"{c.flops:.3g}", format_bytes(c.argument_bytes), format_bytes(d["expected_argument_bytes"]),
                  format_bytes(c.peak_bytes), f"{c.stash_microbatches} x {format_bytes(c.stash_bytes // max(c.stash_microbatches, 1))}",
                  f"{c.compile_s:.1f}")
    con.print(t)
    con.print(f"wrote {len(out['files'])} files to {out_dir} (summary.md; per program .hlo.txt, .stablehlo.mlir, "
              ".cost.json, .memory.json)", highlight=False, soft_wrap=True)
    return out


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        model: str = typer.Option(..., "--model", help="Preset name (random start) or Hugging Face model directory."),
        plan: Path = typer.Option(..., "--plan", help="Plan JSON (from `hexjax plan`)."),
        virtual_devices: int | None = typer.Option(
            None, "--virtual-devices", help="Simulate the plan's devices as N virtual CPU devices."),
        data: Path = typer.Option(..., "--data", help="Token file (1-D .npy or raw .bin of ids), a .txt file or "
                                  "a folder of .txt files (tokenized once into a cached .npy)."),
        data_dtype: str = typer.Option("uint16", "--data-dtype", help="Integer type of a .bin token file."),
        seq_len: int = typer.Option(..., "--seq-len", help="Tokens per training sequence."),
        global_batch: int = typer.Option(..., "--global-batch", help="Sequences per step over all replicas."),
        microbatches: int | None = typer.Option(
            None, "--microbatches", help="Microbatches per replica (1F1B pipeline; default: the training plan's, else 1)."),
        steps: int = typer.Option(..., "--steps", help="Train until this many steps have been taken."),
        lr: float = typer.Option(3e-4, "--lr", help="Peak learning rate."),
        warmup_steps: int = typer.Option(0, "--warmup-steps", help="Linear warmup steps."),
        decay_steps: int | None = typer.Option(
            None, "--decay-steps", help="Cosine schedule length incl. warmup (default --steps; 0 = constant)."),
        weight_decay: float = typer.Option(0.1, "--weight-decay", help="AdamW weight decay (matrices)."),
        clip_norm: float = typer.Option(1.0, "--clip-norm", help="Global gradient-norm clip (0 = off)."),
        remat: bool = typer.Option(False, "--remat", metavar="", help="Recompute layer activations in backward."),
        seed: int = typer.Option(0, "--seed", help="Seed of the random start and the data order."),
        checkpoint_dir: Path | None = typer.Option(None, "--checkpoint-dir", help="Directory for orbax checkpoints."),
        save_every: int = typer.Option(0, "--save-every", help="Save every K steps (0: only at the end)."),
        keep: int = typer.Option(3, "--keep", help="Checkpoints to keep."),
        resume: bool = typer.Option(False, "--resume", metavar="", help="Continue from the latest checkpoint."),
        as_json: bool = typer.Option(False, "--json", metavar="", help="Print one JSON object."),
        tokenizer: Path | None = typer.Option(
            None, "--tokenizer", help="tokenizer.json for text --data (default: train a byte-level BPE on it)."),
        save_hf: Path | None = typer.Option(
            None, "--save-hf", help="Write the trained weights as a Hugging Face checkpoint here."),
        metrics: Path | None = typer.Option(None, "--metrics", help="Write one JSON line per step here."),
        cluster: Path | None = typer.Option(
            None, "--cluster", help="Cluster TOML of the plan's devices (for MFU in the metrics)."),
        coordinator: str | None = COORDINATOR,
        num_processes: int | None = NUM_PROCESSES,
        process_id: int | None = PROCESS_ID,
        dtype: str = typer.Option("float32", "--dtype", help="Compute dtype: float32, or bfloat16 (mixed precision "
                                  "with --master-dtype float32)."),
        master_dtype: str = typer.Option("float32", "--master-dtype", help="dtype of the master weights, "
                                         "gradients and AdamW state (bfloat16 with --dtype bfloat16: pure bf16)."),
    ) -> None:
        """Train a model over a plan's replicas and pipeline stages (AdamW, 1F1B)."""
        train_cmd(model, plan, virtual_devices, data, data_dtype, seq_len, global_batch, microbatches, steps, lr,
                  warmup_steps, decay_steps, weight_decay, clip_norm, remat, seed, checkpoint_dir, save_every,
                  keep, resume, as_json, tokenizer, save_hf, metrics, cluster, coordinator, num_processes,
                  process_id, dtype, master_dtype)
