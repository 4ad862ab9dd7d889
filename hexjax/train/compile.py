"""XLA's view of training over a plan: every stage's forward, backward and update programs,
compiled ahead of time from abstract arguments (no weights).

Parameters, optimizer state, gradients and activations are ``ShapeDtypeStruct``s with
the shardings the ``Trainer`` places them with, so the programs compiled here are the
ones a training step runs (the same ``StageStep`` jits), and a plan for a cluster one
does not have compiles on virtual CPU devices.  XLA's figures (``cost_analysis``,
``memory_analysis``) are per device, for one run of the program: the forward and
backward run once per microbatch, the update once per step.

Beside XLA's figures each record carries hexjax's own accounting per device
(``param_bytes``; the update's arguments are parameters + 2 AdamW moments + gradients)
and the 1F1B bound on stashed activations: stage ``s`` of ``S`` keeps at most
``min(S - s, M)`` microbatches' stashes (the forward's outputs but ``y``: what the
backward reads) alive between their forward and backward. The last stage runs
its forward inside its backward program, so its one microbatch's residuals are
among that program's temporaries and its stash is the stage input alone.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from hexjax.models.config import ModelConfig
from hexjax.runtime.compile import XlaRecord
from hexjax.plan import format_layers, format_mesh

PROGRAMS = ("fwd", "bwd", "update")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainCompile(XlaRecord):
    """XLA's view of one stage's training program (per device of the stage's mesh)."""

    replica: int
    stage: int
    program: str
    """"fwd" (forward and stash; the loss on the last stage), "bwd" (vjp from the stash; the fused forward
    and backward on the last stage) or "update" (AdamW)."""
    devices: tuple[int, ...]
    dp: int
    tp: int
    layers: tuple[int, int]
    micro_batch: int
    """Rows of one microbatch of the replica (over the stage's dp groups)."""
    microbatches: int
    seq_len: int
    param_bytes: int
    """Parameters of the stage per device (hexjax's accounting of the shardings)."""
    stash_microbatches: int
    """1F1B bound on microbatches stashed between forward and backward: min(S - s, M)."""
    stash_bytes: int
    """That many microbatches' stashes per device: the forward's residual outputs (the stage input on the
    last stage, whose backward program recomputes nothing but keeps its residuals as temporaries)."""

    @property
    def name(self) -> str:
        return f"r{self.replica}_s{self.stage}_{self.program}"


def _abstract(tree, shardings):
    import jax
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _per_device_bytes(abstract_tree) -> int:
    """Bytes of one device's shard of every leaf (``ShapeDtypeStruct``s with shardings)."""
    import jax
    import numpy as np
    total = 0
    for a in jax.tree.leaves(abstract_tree):
        shape = a.sharding.shard_shape(a.shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
    return total


def compile_train(plan, cfg: ModelConfig, seq_len: int, global_batch: int, microbatches: int, *,
                  config=None, dtype: str = "float32", replica_rows=None, programs=PROGRAMS,
                  keep_text: bool = False, progress=None) -> list[TrainCompile]:
    """Compile the training programs of every stage of every replica (see the module docstring).

    Stages of later replicas with the same kind and shape as an earlier one reuse its compile.
    ``progress(done, total, label)`` is called before each compile."""
    import jax
    import jax.numpy as jnp

    from hexjax.runtime.build import stage_kinds
    from hexjax.runtime.compile import compile_devices, xla_fields
    from hexjax.train.config import TrainConfig
    from hexjax.train.step import stage_step
    from hexjax.train.trainer import check_batch_shape

    config = config or TrainConfig()
    plan.check_layout(cfg)
    rows = check_batch_shape(cfg, plan, global_batch, seq_len, microbatches, replica_rows)
    used = max(i for r in plan.replicas for s in r.stages for i in s.devices) + 1
    devices = compile_devices(used)
    cfg1 = dataclasses.replace(config, keep_checkpoints=1)
    total = sum(len(r.stages) for r in plan.replicas) * len(programs)
    out: list[TrainCompile] = []
    done: dict = {}
    per_mb: dict = {}     # one microbatch's stash per device, per stage shape
    for ri, rep in enumerate(plan.replicas):
        mb = rows[ri] // microbatches
        n_stages = len(rep.stages)
        for si, (st, kind) in enumerate(zip(rep.stages, stage_kinds(cfg, rep, dtype))):
            step = stage_step(kind, tuple(devices[i] for i in st.devices), cfg1)
            params = _abstract(step.abstract_params, step.param_shardings)
            dt = jnp.dtype(dtype)
            if kind.embed:
                x = jax.ShapeDtypeStruct((mb, seq_len), jnp.int32, sharding=step.input_sharding)
            else:
                x = jax.ShapeDtypeStruct((mb, seq_len, cfg.hidden_size), dt, sharding=step.input_sharding)
            hidden = jax.ShapeDtypeStruct((mb, seq_len, cfg.hidden_size), dt, sharding=step.hidden_sharding)
            targets = jax.ShapeDtypeStruct((mb, seq_len), jnp.int32, sharding=step.rows_sharding)
            scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=step.replicated)
            stash = min(n_stages - si, microbatches)
            shape_key = (kind, mb, seq_len)
            stash_args, stash_mb, fwd_done = None, per_mb.get(shape_key, _per_device_bytes(x)), None
            if not kind.head and ("fwd" in programs or "bwd" in programs) and shape_key not in per_mb:
                # the backward's stash arguments are the forward's outputs, laid out as XLA chose
                t0 = time.perf_counter()
                lowered = step.fwd.lower(params, x)
                fwd_done = (lowered, lowered.compile(), time.perf_counter() - t0)
                stash_args = _abstract(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                                    fwd_done[1].out_info[1]), fwd_done[1].output_shardings[1])
                stash_mb = per_mb[shape_key] = _per_device_bytes(stash_args)
            for prog in programs:
                if progress is not None:
                    progress(len(out), total, f"r{ri}.s{si} {prog}")
                key = shape_key + (prog,)
                if key in done:
                    out.append(dataclasses.replace(done[key], replica=ri, stage=si, devices=tuple(st.devices),
                                                   stash_microbatches=stash, stash_bytes=stash * stash_mb))
                    continue
                if prog == "fwd":
                    fn, args = step.fwd, (params, x, targets) if kind.head else (params, x)
                elif prog == "bwd":
                    fn = step.bwd
                    args = (params, x, targets, scalar, params) if kind.head else (params, stash_args, hidden, params)
                elif prog == "update":
                    state = _abstract(step.abstract_state, step.state_shardings)
                    fn, args = step.update, (params, state, params, scalar)
                else:
                    raise ValueError(f"unknown program {prog!r}; known: {', '.join(PROGRAMS)}")
                if prog == "fwd" and fwd_done is not None:
                    lowered, compiled, secs = fwd_done
                else:
                    lowered = fn.lower(*args)
                    t0 = time.perf_counter()
                    compiled = lowered.compile()
                    secs = time.perf_counter() - t0
                rec = TrainCompile(
                    replica=ri, stage=si, program=prog, devices=tuple(st.devices), dp=st.dp, tp=st.tp,
                    layers=(st.layers[0], st.layers[1]), micro_batch=mb, microbatches=microbatches,
                    seq_len=seq_len, param_bytes=_per_device_bytes(params), stash_microbatches=stash,
                    stash_bytes=stash * stash_mb, compile_s=secs, platform=step.devices[0].platform,
                    stablehlo=lowered.as_text() if keep_text else "", hlo=compiled.as_text() if keep_text else "",
                    **xla_fields(compiled))
                done[key] = rec
                out.append(rec)
    if progress is not None:
        progress(total, total, "done")
    return out


def _fmt(n: float) -> str:
    from hexjax.models.config import format_bytes
    return format_bytes(n)


def summary_markdown(plan, cfg: ModelConfig, compiles: list[TrainCompile], seq_len: int, global_batch: int,
                     microbatches: int, dtype: str) -> str:
    """A markdown table of XLA's per-device figures beside hexjax's own accounting."""
    lines = [f"# {cfg.name}: training programs per device", "",
             f"seq_len {seq_len}, global batch {global_batch}, {microbatches} microbatches per replica, {dtype}, "
             "AdamW (2 moments per parameter).", "",
             "`fwd` and `bwd` run once per microbatch, `update` once per step. *expected args* is hexjax's "
             "accounting: fwd = params + input (+ targets), bwd = 2 x params (weights and the donated gradient "
             "accumulator) + one microbatch's stash + cotangent (last stage: + input + targets), update = params + "
             "2 moments + gradients. *stash* is 1F1B's bound on what the stage keeps for its backward: min(S - s, M) "
             "microbatches of the forward's outputs (the last stage: of its input).", "",
             "| stage | program | layers | mesh | XLA FLOPs | XLA args | expected args | ratio | XLA temp | "
             "XLA peak | stash | compile s |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in compiles:
        want = expected_argument_bytes(c, cfg, dtype)
        ratio = f"{c.argument_bytes / want:.3f}" if want else "-"
        lines.append(f"| r{c.replica}.s{c.stage} | {c.program} | {format_layers(*c.layers)} | "
                     f"{format_mesh(c.dp, c.tp)} | {c.flops:.3g} | {_fmt(c.argument_bytes)} | {_fmt(want)} | {ratio} | "
                     f"{_fmt(c.temp_bytes)} | {_fmt(c.peak_bytes)} | {c.stash_microbatches} x = "
                     f"{_fmt(c.stash_bytes)} | {c.compile_s:.1f} |")
    lines.append("")
    return "\n".join(lines)


def expected_argument_bytes(c: TrainCompile, cfg: ModelConfig, dtype: str) -> int:
    """hexjax's accounting of a program's argument bytes per device (see ``summary_markdown``)."""
    import numpy as np
    item = np.dtype(dtype).itemsize
    rows = c.micro_batch // c.dp
    x = rows * c.seq_len * (4 if c.stage == 0 else cfg.hidden_size * item)
    if c.program == "update":
        return 4 * c.param_bytes
    targets = rows * c.seq_len * 4
    hidden = rows * c.seq_len * cfg.hidden_size * item
    if c.program == "fwd":
        return c.param_bytes + x + (targets if c.layers[1] == cfg.num_layers else 0)
    if c.layers[1] == cfg.num_layers:     # the fused forward and backward of the last stage
        return 2 * c.param_bytes + x + targets + 4
    unused = 0
    if c.stage == 0:    # the embedding's gradient needs only the token ids: jit drops the table's argument
        from hexjax.search.cost import vocab_per_device
        unused = vocab_per_device(cfg, c.tp) * cfg.hidden_size * 4      # float32 master weights
    return 2 * c.param_bytes - unused + c.stash_bytes // max(c.stash_microbatches, 1) + hidden


def dump_train_hlo(plan, cfg: ModelConfig, out_dir, seq_len: int, global_batch: int, microbatches: int, *,
                   config=None, dtype: str = "float32", replica_rows=None, progress=None) -> list[TrainCompile]:
    """Compile (``compile_train``) and write per program ``NAME.stablehlo.mlir``, ``NAME.hlo.txt``,
    ``NAME.cost.json``, ``NAME.memory.json``, and ``summary.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    compiles = compile_train(plan, cfg, seq_len, global_batch, microbatches, config=config, dtype=dtype,
                             replica_rows=replica_rows, keep_text=True, progress=progress)
    for c in compiles:
        (out / f"{c.name}.stablehlo.mlir").write_text(c.stablehlo)
        (out / f"{c.name}.hlo.txt").write_text(c.hlo)
        (out / f"{c.name}.cost.json").write_text(json.dumps(c.cost, indent=1, sort_keys=True))
        (out / f"{c.name}.memory.json").write_text(json.dumps(c.memory, indent=1, sort_keys=True))
    (out / "summary.md").write_text(summary_markdown(plan, cfg, compiles, seq_len, global_batch, microbatches,
                                                     dtype))
    return compiles
