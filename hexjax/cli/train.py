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

from hexjax.errors import ConfigError, PlanError


def train_cmd(model: str, plan_file: Path, virtual_devices: int | None, data: Path, data_dtype: str, seq_len: int,
              global_batch: int, microbatches: int, steps: int, lr: float, warmup_steps: int,
              decay_steps: int | None, weight_decay: float, clip_norm: float, remat: bool, seed: int,
              checkpoint_dir: Path | None, save_every: int, keep: int, resume: bool, as_json: bool) -> dict:
    if virtual_devices:
        from hexjax.runtime.devices import use_virtual_cpu_devices
        use_virtual_cpu_devices(virtual_devices)
    from hexjax.cli.plan import load_config
    from hexjax.plan import Plan
    from hexjax.train import TrainConfig, Trainer, check_batch_shape
    from hexjax.train.checkpoint import check_model, latest_step, read_meta
    from hexjax.train.data import TokenWindows, open_tokens

    if steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    if save_every < 0:
        raise ConfigError(f"--save-every must not be negative, got {save_every}")
    if (save_every or resume) and checkpoint_dir is None:
        raise ConfigError("--save-every and --resume need --checkpoint-dir")
    cfg = load_config(model)
    plan = Plan.load(plan_file)
    plan.check_model(cfg, where=str(plan_file))
    problems = plan.layout_problems(cfg, virtual_devices)
    if problems:
        raise PlanError(f"{plan_file}: the plan cannot train {cfg.name}:\n" + "\n".join(f"  - {p}" for p in problems))
    check_batch_shape(cfg, plan, global_batch, seq_len, microbatches)
    meta = None
    if resume and latest_step(checkpoint_dir) is not None:
        meta = read_meta(checkpoint_dir)
        check_model(meta, cfg, checkpoint_dir)
        if decay_steps is None:   # keep the schedule the run started with
            decay_steps = meta["extra"].get("decay_steps")
    if decay_steps is None:
        decay_steps = steps if steps > warmup_steps else 0
    config = TrainConfig(lr=lr, warmup_steps=warmup_steps, decay_steps=decay_steps, weight_decay=weight_decay,
                         clip_norm=clip_norm if clip_norm > 0 else None, remat=remat, keep_checkpoints=keep)
    windows = TokenWindows(open_tokens(data, data_dtype), seq_len, seed)

    source = cfg
    if Path(model).is_dir():
        from hexjax.models.hf import load_hf
        source = load_hf(Path(model), dtype="float32")
    trainer = Trainer(source, plan, config=config, microbatches=microbatches, seed=seed)
    position = 0
    if meta is not None:
        meta = trainer.restore(checkpoint_dir)
        position = int(meta["extra"].get("position", trainer.step_count * global_batch))
    history = []

    def extra():
        return {"position": position, "seed": seed, "decay_steps": decay_steps}
    saved = None
    while trainer.step_count < steps:
        m = trainer.step(windows.batch(position, global_batch))
        position += global_batch
        m["step"] = trainer.step_count
        history.append(m)
        if not as_json:
            typer.echo(f"step {m['step']:>5}  loss {m['loss']:.4f}  grad_norm {m['grad_norm']:.3f}  "
                       f"lr {m['lr']:.3g}  {m['tokens'] / m['seconds']:.0f} tok/s")
        if save_every and trainer.step_count % save_every == 0:
            saved = trainer.save(checkpoint_dir, extra=extra())
    if checkpoint_dir is not None and saved != trainer.step_count and history:
        saved = trainer.save(checkpoint_dir, extra=extra())
    out = {"model": cfg.name, "plan": str(plan_file), "resumed_from": None if meta is None else meta["step"],
           "steps": history, "final_loss": history[-1]["loss"] if history else None,
           "step": trainer.step_count, "checkpoint": None if saved is None else str(checkpoint_dir)}
    if as_json:
        typer.echo(json.dumps(out))
    return out


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        model: str = typer.Option(..., "--model", help="Preset name (random start) or Hugging Face model directory."),
        plan: Path = typer.Option(..., "--plan", help="Plan JSON (from `hexjax plan`)."),
        virtual_devices: int | None = typer.Option(
            None, "--virtual-devices", help="Simulate the plan's devices as N virtual CPU devices."),
        data: Path = typer.Option(..., "--data", help="Token file: a 1-D .npy array or a raw .bin of token ids."),
        data_dtype: str = typer.Option("uint16", "--data-dtype", help="Integer type of a .bin token file."),
        seq_len: int = typer.Option(..., "--seq-len", help="Tokens per training sequence."),
        global_batch: int = typer.Option(..., "--global-batch", help="Sequences per step over all replicas."),
        microbatches: int = typer.Option(1, "--microbatches", help="Microbatches per replica (1F1B pipeline)."),
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
    ) -> None:
        """Train a model over a plan's replicas and pipeline stages (AdamW, 1F1B)."""
        train_cmd(model, plan, virtual_devices, data, data_dtype, seq_len, global_batch, microbatches, steps, lr,
                  warmup_steps, decay_steps, weight_decay, clip_norm, remat, seed, checkpoint_dir, save_every,
                  keep, resume, as_json)
