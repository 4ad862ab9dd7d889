"""Train a model over a ``Plan``: 1F1B pipelines, asymmetric data parallelism, AdamW.

Every replica of the plan is a pipeline of stages, each on its own ``(dp, tp)``
mesh (``StageStep``).  A step splits the global batch ``[B, S+1]`` into one
share per replica (equal rows unless ``replica_rows`` says otherwise) and each
share into ``microbatches``; each replica runs them in 1F1B order, moving
activations forward and cotangents backward with ``jax.device_put`` onto the
next stage's mesh.  Then, per parameter key (``layer_3``, ``embed``, ...), the
gradients of every stage that holds it (in every replica; the tied embedding
can also sit on two stages of one replica) are moved onto the first holder's
sharding and summed; the global norm over all keys gives the clipping factor,
and each holder applies the same AdamW update to the summed gradient, so all
copies stay identical.  The loss is normalised by the global token count, so a
step equals single-device training on the whole batch.

All work of a step is issued before anything is read back.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hexjax.errors import ConfigError, HexjaxError, PlanError
from hexjax.models.config import ModelConfig
from hexjax.plan import Plan
from hexjax.runtime.build import stage_kinds
from hexjax.train.config import TrainConfig
from hexjax.train.optimizer import clip_scale, lr_schedule
from hexjax.train.schedule import one_f_one_b
from hexjax.train.step import StageStep, stage_step, tree_sum


@dataclasses.dataclass
class _Stage:
    step: StageStep
    params: dict
    state: dict


def _host_copy(tree):
    """Host arrays that own their memory: the update donates device buffers a host view could alias,
    and an asynchronous save reads the arrays after the step loop has moved on."""
    return jax.tree.map(lambda a: np.array(a, copy=True), tree)


def _model_config(cfg_or_model) -> tuple[ModelConfig, Any]:
    if isinstance(cfg_or_model, ModelConfig):
        return cfg_or_model, None
    if isinstance(cfg_or_model, str):
        return ModelConfig.load(cfg_or_model), None
    cfg = getattr(cfg_or_model, "cfg", None)
    if isinstance(cfg, ModelConfig) and hasattr(cfg_or_model, "params"):
        return cfg, cfg_or_model.params
    raise ConfigError(f"Trainer: expected a ModelConfig, a preset name or a model with .cfg and .params, "
                      f"got {type(cfg_or_model).__name__}")


def check_batch_shape(cfg: ModelConfig, plan: Plan, global_batch: int, seq_len: int, microbatches: int,
                      replica_rows: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Rows of each replica for a ``[global_batch, seq_len + 1]`` batch; raises ``ConfigError`` when
    the batch cannot be split (checked before any device memory is used)."""
    if seq_len < 1:
        raise ConfigError(f"seq_len must be at least 1 (batches are [B, seq_len + 1] tokens), got {seq_len}")
    if seq_len > cfg.max_position_embeddings:
        raise ConfigError(f"seq_len {seq_len} exceeds {cfg.name}'s max_position_embeddings "
                          f"({cfg.max_position_embeddings}); use --seq-len {cfg.max_position_embeddings} or less")
    if microbatches < 1:
        raise ConfigError(f"microbatches must be at least 1, got {microbatches}")
    n = len(plan.replicas)
    if replica_rows is None:
        if global_batch % n:
            raise ConfigError(f"global batch {global_batch} does not split evenly over the plan's {n} replicas; "
                              f"use a multiple of {n} (or give replica_rows)")
        rows = (global_batch // n,) * n
    else:
        rows = tuple(int(r) for r in replica_rows)
        if len(rows) != n or sum(rows) != global_batch or min(rows) < 1:
            raise ConfigError(f"replica_rows {list(rows)} must give each of the {n} replicas a positive share "
                              f"summing to the global batch {global_batch}")
    for i, (rep, r) in enumerate(zip(plan.replicas, rows)):
        dp = math.lcm(*(s.dp for s in rep.stages))
        if r % (microbatches * dp):
            raise ConfigError(f"replica {i} gets {r} rows per step, which do not split into {microbatches} "
                              f"microbatches of a multiple of dp={dp} rows; make its share a multiple of "
                              f"{microbatches * dp} (global batch a multiple of {n * microbatches * dp} "
                              "for equal shares)")
    return rows


class Trainer:
    """Trains ``cfg_or_model`` over ``plan`` (see the module docstring).

    ``cfg_or_model``: a ``ModelConfig`` or preset name (random weights from
    ``seed``), or a model with ``.cfg`` and ``.params`` (e.g. ``LlamaModel``);
    ``params`` overrides the starting weights (a full tree keyed by global layer).
    ``microbatches`` and ``replica_rows`` (each replica's rows of the global batch) default to a training
    plan's own (``plan.training``), else 1 and equal rows.
    ``devices`` are the devices the plan's indices refer to (default ``jax.devices()``).
    ``dtype`` is the compute dtype (matmuls, activations moved between stages); parameters, gradients and
    optimizer state are kept in ``config.master_dtype`` (float32 by default, so ``dtype="bfloat16"`` is
    mixed precision). With ``global_batch`` and ``seq_len`` the batch split is
    checked before any weights are placed (``step`` checks every batch anyway).
    ``move``/``read`` replace ``jax.device_put`` between stages and ``np.asarray`` for values read back
    (``hexjax.runtime.distributed``'s when the plan's stages live on several processes).
    """

    def __init__(self, cfg_or_model, plan: Plan, *, config: TrainConfig | None = None,
                 microbatches: int | None = None, seed: int = 0, params: dict | None = None, replica_rows: tuple[int, ...] | None = None,
                 devices: list | None = None, dtype: str = "float32", global_batch: int | None = None,
                 seq_len: int | None = None, move=None, read=None):
        cfg, model_params = _model_config(cfg_or_model)
        self._move = move or jax.device_put
        self._read = read or np.asarray
        self.cfg, self.plan = cfg, plan
        self.config = config or TrainConfig()
        if microbatches is None:     # a training plan carries its microbatches and batch shares
            microbatches = plan.microbatches or 1
        if replica_rows is None:
            replica_rows = plan.replica_rows
        if microbatches < 1:
            raise ConfigError(f"microbatches must be at least 1, got {microbatches}")
        self.microbatches = microbatches
        self.replica_rows = None if replica_rows is None else tuple(replica_rows)
        problems = plan.layout_problems(cfg)
        devices = list(jax.devices()) if devices is None else list(devices)
        used = [d for r in plan.replicas for s in r.stages for d in s.devices]
        if used and max(used) >= len(devices):
            problems.append(f"the plan uses device {max(used)} but only {len(devices)} devices exist "
                            "(run with --virtual-devices on CPU)")
        if problems:
            raise PlanError(f"the plan cannot train {cfg.name} ({len(problems)} problem"
                            f"{'s' if len(problems) > 1 else ''}):\n" + "\n".join(f"  - {p}" for p in problems))
        if global_batch is not None and seq_len is not None:
            check_batch_shape(cfg, plan, global_batch, seq_len, microbatches, self.replica_rows)
        self.schedule = lr_schedule(self.config)
        self.step_count = 0
        self._writer = None        # the CheckpointWriter of the last directory saved into

        # stages, and for every key the (replica, stage) pairs holding it; the first is its owner
        self.replicas: list[list[_Stage]] = []
        self.holders: dict[str, list[tuple[int, int]]] = {}
        steps = {}
        for r, rep in enumerate(plan.replicas):
            row = []
            for s, (st, kind) in enumerate(zip(rep.stages, stage_kinds(cfg, rep, dtype))):
                key = (kind, st.devices)
                if key not in steps:
                    steps[key] = stage_step(kind, tuple(devices[i] for i in st.devices),
                                            dataclasses.replace(self.config, keep_checkpoints=1))
                row.append(_Stage(steps[key], {}, {}))
                for k in steps[key].keys:
                    self.holders.setdefault(k, []).append((r, s))
            self.replicas.append(row)

        if params is None:
            params = model_params
        if params is None:
            from hexjax.models.llama import LlamaStage, init_params
            params = init_params(LlamaStage(cfg), jax.random.key(seed))
        self._place(params, None)

    # ---- placement ----

    def _stages(self):
        for r, row in enumerate(self.replicas):
            for s, st in enumerate(row):
                yield r, s, st

    def _place(self, params: dict, state: dict | None):
        missing = sorted(set(self.holders) - set(params))
        if missing:
            raise ConfigError(f"the parameter tree lacks {', '.join(missing)}")
        for _, _, st in self._stages():
            st.params = st.step.place_params(params)
            if state is None:
                st.state = st.step.init_state(st.params)
            else:
                st.state = jax.device_put({k: state[k] for k in st.step.keys}, st.step.state_shardings)

    # ---- one step ----

    def check_batch(self, batch_shape) -> tuple[int, ...]:
        """Rows per replica for a batch of this shape; raises before touching device memory."""
        if len(batch_shape) != 2:
            raise ConfigError(f"a batch is [global_batch, seq_len + 1] token ids, got shape {tuple(batch_shape)}")
        return check_batch_shape(self.cfg, self.plan, batch_shape[0], batch_shape[1] - 1, self.microbatches,
                                 self.replica_rows)

    def _split_batch(self, batch_tokens):
        batch = np.asarray(batch_tokens)
        rows = self.check_batch(batch.shape)
        if not np.issubdtype(batch.dtype, np.integer):
            raise ConfigError(f"batch tokens must be integers, got {batch.dtype}")
        ids = batch[:, :-1].astype(np.int32)
        targets = batch[:, 1:].astype(np.int32)
        n_tokens = int((targets >= 0).sum())
        if n_tokens == 0:
            raise ConfigError("the batch has no targets to train on (all are negative)")
        if ids.size and (ids.max() >= self.cfg.vocab_size or ids.min() < 0):
            raise ConfigError(f"token ids must lie in [0, {self.cfg.vocab_size}) for {self.cfg.name}")
        return rows, ids, targets, n_tokens

    def _issue_grads(self, batch_tokens):
        """Issue every replica's forward and backward and the sum over holders; nothing is read.

        The replicas' 1F1B sequences are issued one operation per replica in turn, and the sum of a group
        of keys is issued as soon as the last backward of every stage holding them has been issued: the
        last stages' gradients are reduced while the earlier stages still run their backward."""
        rows, ids, targets, n_tokens = self._split_batch(batch_tokens)
        inv = np.float32(1.0 / n_tokens)
        grads = [[st.step.zeros() for st in row] for row in self.replicas]
        losses: list[list] = [[] for _ in self.replicas]
        runs, start = [], 0
        for r, row in enumerate(self.replicas):
            runs.append((r, self._replica_ops(row, ids[start:start + rows[r]], targets[start:start + rows[r]],
                                              inv, grads[r], losses[r])))
            start += rows[r]
        groups = self._key_groups()
        waiting = {hs: set(hs) for hs in groups}
        summed: dict = {}
        while runs:
            going = []
            for r, run in runs:
                finished = next(run, StopIteration)
                if finished is StopIteration:
                    continue
                going.append((r, run))
                if finished is None:
                    continue
                for hs in groups:
                    if (r, finished) in waiting[hs]:
                        waiting[hs].discard((r, finished))
                        if not waiting[hs]:
                            summed.update(self._sum_group(hs, groups[hs], grads))
            runs = going
        norm = self._global_norm(summed)
        loss = sum(self._move(x, norm.sharding) for ls in losses for x in ls) * inv
        return summed, norm, loss, n_tokens

    def step(self, batch_tokens) -> dict:
        """One optimizer step on ``batch_tokens`` [B, S+1] (inputs ``[:, :-1]``, targets ``[:, 1:]``;
        targets < 0 are not counted). Returns loss (mean over the batch's tokens), grad_norm (before
        clipping), lr (of this step), tokens and seconds."""
        t0 = time.perf_counter()
        summed, norm, loss, n_tokens = self._issue_grads(batch_tokens)
        scale = clip_scale(norm, self.config.clip_norm)
        for r, s, st in self._stages():
            g = {k: summed[k] if self.holders[k][0] == (r, s) else self._move(summed[k], st.step.param_shardings[k])
                 for k in st.step.keys}
            sc = self._move(scale, st.step.replicated)
            st.params, st.state = st.step.update(st.params, st.state, g, sc)
        lr = float(self.schedule(self.step_count))
        self.step_count += 1
        out = {"loss": float(self._read(loss)), "grad_norm": float(self._read(norm)), "lr": lr, "tokens": n_tokens}
        out["seconds"] = time.perf_counter() - t0
        return out

    def grads(self, batch_tokens) -> tuple[float, dict]:
        """``(loss, gradients)`` of the mean token loss of ``batch_tokens`` at the current parameters,
        summed over replicas, on the host and keyed by global layer; no update is made."""
        summed, _, loss, _ = self._issue_grads(batch_tokens)
        return float(self._read(loss)), {k: jax.tree.map(self._read, v) for k, v in summed.items()}

    def evaluate(self, batch_tokens) -> float:
        """Mean token loss of ``batch_tokens`` [B, S+1] through the forward programs only (no gradients)."""
        rows, ids, targets, n_tokens = self._split_batch(batch_tokens)
        losses, start = [], 0
        for r, row in enumerate(self.replicas):
            mb = rows[r] // self.microbatches
            for m in range(self.microbatches):
                lo = start + m * mb
                x = self._move(ids[lo:lo + mb], row[0].step.input_sharding)
                for s, st in enumerate(row[:-1]):
                    x = self._move(st.step.infer(st.params, x), row[s + 1].step.input_sharding)
                last = row[-1]
                tgt = self._move(targets[lo:lo + mb], last.step.rows_sharding)
                losses.append(last.step.fwd(last.params, x, tgt)[0])
            start += rows[r]
        dev = losses[0].sharding
        return float(self._read(sum(self._move(x, dev) for x in losses[1:]) + losses[0])) / n_tokens

    def _replica_ops(self, row: list[_Stage], ids: np.ndarray, targets: np.ndarray, inv, acc: list, losses: list):
        """Issue one replica's 1F1B step one operation per ``next``, adding gradients into ``acc`` (one tree
        per stage) and loss sums to ``losses``; yields the stage whose last backward was just issued, else None."""
        n_stages, m_count = len(row), self.microbatches
        mb = ids.shape[0] // m_count
        inbox: list[dict[int, Any]] = [dict() for _ in row]   # stage inputs (the last stage's kept until its backward)
        stash: list[dict[int, Any]] = [dict() for _ in row]   # what each backward reads of its forward
        cots: list[dict[int, Any]] = [dict() for _ in row]
        last = row[-1].step
        for op, s, m in one_f_one_b(n_stages, m_count):
            st = row[s]
            if op == "F":
                if s == 0:
                    inbox[0][m] = self._move(ids[m * mb:(m + 1) * mb], st.step.input_sharding)
                if s < n_stages - 1:
                    y, stash[s][m] = st.step.fwd(st.params, inbox[s].pop(m))
                    inbox[s + 1][m] = self._move(y, row[s + 1].step.input_sharding)
                yield None
                continue
            if s == n_stages - 1:
                tgt = self._move(targets[m * mb:(m + 1) * mb], last.rows_sharding)
                acc[s], dx, loss, _ = st.step.bwd(st.params, inbox[s].pop(m), tgt, inv, acc[s])
                losses.append(loss)
            else:
                acc[s], dx = st.step.bwd(st.params, stash[s].pop(m), cots[s].pop(m), acc[s])
            if s > 0:
                cots[s - 1][m] = self._move(dx, row[s - 1].step.hidden_sharding)
            yield s if m == m_count - 1 else None

    def _key_groups(self) -> dict[tuple, list[str]]:
        """Keys grouped by their holders (``(replica, stage)`` pairs, owner first); one sum program per group."""
        groups: dict[tuple, list[str]] = {}
        for k, hs in self.holders.items():
            groups.setdefault(tuple(hs), []).append(k)
        return groups

    def _sum_group(self, hs: tuple, keys: list[str], grads: list[list[dict]]) -> dict:
        """The sum of ``keys``' gradients over their holders ``hs`` (in holder order), on the owner's sharding."""
        r0, s0 = hs[0]
        if len(hs) == 1:
            return {k: grads[r0][s0][k] for k in keys}
        owner = self.replicas[r0][s0].step.param_shardings
        parts = [{k: grads[r][s][k] if (r, s) == (r0, s0) else self._move(grads[r][s][k], owner[k])
                  for k in keys} for r, s in hs]
        return tree_sum(parts)

    def _sum_grads(self, grads: list[list[dict]]) -> dict:
        """Per key, the sum over its holders' gradients (in holder order), on the owner's sharding."""
        out: dict = {}
        for hs, keys in self._key_groups().items():
            out.update(self._sum_group(hs, keys, grads))
        return out

    def grad_sync_bytes(self) -> int:
        """Bytes the gradient sum moves per step: every non-owner holder's gradients to the owner's sharding
        and the summed gradients back (whole arrays, counted once per move, before resharding)."""
        total = 0
        for k, hs in self.holders.items():
            r0, s0 = hs[0]
            size = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                       for a in jax.tree.leaves(self.replicas[r0][s0].step.abstract_params[k]))
            total += 2 * (len(hs) - 1) * size
        return total

    def time_grad_sync(self, batch_tokens, repeats: int = 3) -> dict:
        """Measure the gradient sum apart from the rest of a step (no update is made): the forward and
        backward of every replica are run and waited for, then the sum over holders and the moves back to
        every holder are timed alone (best of ``repeats``). Returns ``backward_s`` (issue to ready of the
        forward/backward work), ``sync_s`` and ``sync_bytes``."""
        rows, ids, targets, n_tokens = self._split_batch(batch_tokens)
        inv = np.float32(1.0 / n_tokens)
        t0 = time.perf_counter()
        grads = [[st.step.zeros() for st in row] for row in self.replicas]
        losses: list = []
        start = 0
        for r, row in enumerate(self.replicas):
            for _ in self._replica_ops(row, ids[start:start + rows[r]], targets[start:start + rows[r]], inv,
                                       grads[r], losses):
                pass
            start += rows[r]
        jax.block_until_ready((grads, losses))
        backward_s = time.perf_counter() - t0
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            summed = self._sum_grads(grads)
            back = [self._move(summed[k], self.replicas[r][s].step.param_shardings[k])
                    for k, hs in self.holders.items() for r, s in hs[1:]]
            jax.block_until_ready((summed, back))
            best = min(best, time.perf_counter() - t0)
        return {"backward_s": backward_s, "sync_s": best, "sync_bytes": self.grad_sync_bytes()}

    def _global_norm(self, summed: dict) -> jax.Array:
        """L2 norm of every gradient (each key once), gathered on the first device of the first stage."""
        by_stage: dict[tuple[int, int], list[str]] = {}
        for k, hs in self.holders.items():
            by_stage.setdefault(hs[0], []).append(k)
        dev = jax.sharding.SingleDeviceSharding(self.replicas[0][0].step.devices[0])
        parts = [self._move(self.replicas[r][s].step.sum_squares(summed, ks), dev)
                 for (r, s), ks in sorted(by_stage.items())]
        return jnp.sqrt(sum(parts[1:], parts[0]))

    # ---- host views ----

    def params(self) -> dict:
        """The full parameter tree on the host (numpy), keyed by global layer."""
        return {k: jax.tree.map(self._read, self.replicas[r][s].params[k]) for k, ((r, s), *_) in self.holders.items()}

    def opt_state(self) -> dict:
        """The optimizer state on the host, keyed by global layer (one optax state per key)."""
        return {k: jax.tree.map(self._read, self.replicas[r][s].state[k]) for k, ((r, s), *_) in self.holders.items()}

    @property
    def num_params(self) -> int:
        """Parameters of the model (each key once)."""
        return sum(int(np.prod(a.shape)) for k, ((r, s), *_) in self.holders.items()
                   for a in jax.tree.leaves(self.replicas[r][s].step.abstract_params[k]))

    def model(self):
        """The current weights as a single-device ``LlamaModel`` (host copies, float32)."""
        from hexjax.models.hf import LlamaModel
        return LlamaModel(self.cfg, self.params())

    def save_hf(self, directory) -> None:
        """Write the current weights as a Hugging Face Llama checkpoint (``config.json`` +
        ``model.safetensors``) that ``hexjax.load_hf`` and transformers' ``LlamaForCausalLM`` load.
        Across processes, process 0 writes the files (the same as one process writes) and every process
        returns once they are written."""
        if jax.process_count() == 1:
            self.model().save_hf(directory)
            return
        from hexjax.models.hf import LlamaModel
        from hexjax.train.checkpoint import agree_outcome
        params = self._on_process_0(self._owned("params"))
        error = None
        if jax.process_index() == 0:
            try:
                LlamaModel(self.cfg, params).save_hf(directory)
            except Exception as e:   # told to every process, so none waits in vain
                error = f"{type(e).__name__}: {e}"
        agree_outcome(f"writing {directory}", error)

    def _owned(self, what: str) -> dict:
        """The owner's device arrays of every key: ``params`` or ``state``."""
        return {k: getattr(self.replicas[r][s], what)[k] for k, ((r, s), *_) in self.holders.items()}

    def _on_process_0(self, tree):
        """Host copies of ``tree``'s arrays on process 0 (None on the others), one array at a time.

        Every process calls it in the same order. A sharded array is first gathered onto its first device
        (a copy inside its process), then sent device to device to process 0 (jax's cross-process transfer),
        so nothing goes through the coordination service's key-value store."""
        from jax.sharding import SingleDeviceSharding
        me = jax.process_index()
        target = SingleDeviceSharding(min((d for d in jax.devices() if d.process_index == 0), key=lambda d: d.id))

        def fetch(x):
            first = min(x.sharding.device_set, key=lambda d: d.id)
            if len(x.sharding.device_set) > 1:
                x = self._move(x, SingleDeviceSharding(first))
            if first.process_index != 0:
                x = self._move(x, target)
            return np.array(x, copy=True) if me == 0 else None
        return jax.tree.map(fetch, tree)

    def replicas_in_sync(self) -> bool:
        """Whether every copy of every key holds the same parameters (reads them back)."""
        for k, hs in self.holders.items():
            ref = [self._read(a) for a in jax.tree.leaves(self.replicas[hs[0][0]][hs[0][1]].params[k])]
            for r, s in hs[1:]:
                other = [self._read(a) for a in jax.tree.leaves(self.replicas[r][s].params[k])]
                if not all(np.array_equal(a, b) for a, b in zip(ref, other)):
                    return False
        return True

    # ---- checkpoints ----

    def save(self, directory, step: int | None = None, extra: dict | None = None, wait: bool = False) -> int:
        """Save parameters and optimizer state (keyed by global layer) as checkpoint ``step``
        (default: steps taken) under ``directory``; ``extra`` is JSON saved with it (e.g. the data position).

        Asynchronous: returns once host copies are taken and the previous save has been committed; orbax
        writes this one while training goes on. ``wait=True`` (or ``wait_for_saves``) blocks until it is
        committed; a step is listed in the directory only then. Across processes every process calls it;
        each key's arrays are gathered onto process 0, which writes, and ``wait`` returns everywhere once
        the step is committed."""
        from hexjax.train.checkpoint import CheckpointWriter, agree
        step = self.step_count if step is None else step
        target = Path(directory).absolute()
        if self._writer is not None and self._writer.directory != target:
            self.wait_for_saves(close=True)
        if jax.process_count() > 1:
            # process 0 writes what every process gathers to it; all must be saving the same step
            steps = agree("checkpoint save", f"{int(step)} {self.step_count}")
            if len(set(steps)) > 1:
                raise HexjaxError("the processes disagree on the checkpoint to save (step, steps taken: "
                                  + "; ".join(f"process {p}: {v}" for p, v in enumerate(steps))
                                  + "). Fix: give every process the same command and checkpoint directory")
            params, state = self._on_process_0(self._owned("params")), self._on_process_0(self._owned("state"))
            if self._writer is None:
                self._writer = CheckpointWriter(target, keep=self.config.keep_checkpoints,
                                                write=jax.process_index() == 0)
            self._writer.save(step, self.cfg, params, state, self.step_count, extra)
        else:
            if self._writer is None:
                self._writer = CheckpointWriter(target, keep=self.config.keep_checkpoints)
            self._writer.save(step, self.cfg, _host_copy(self.params()), _host_copy(self.opt_state()),
                              self.step_count, extra)
        if wait:
            self._writer.wait()
        return step

    def wait_for_saves(self, close: bool = False) -> None:
        """Block until every checkpoint saved so far is committed; ``close`` also releases the writer."""
        if self._writer is None:
            return
        if close:
            writer, self._writer = self._writer, None
            writer.close()
        else:
            self._writer.wait()

    def restore(self, directory, step: int | None = None) -> dict:
        """Restore the latest (or given) checkpoint under ``directory`` onto this trainer's plan;
        returns its metadata (``step``, ``steps_taken``, ``extra``)."""
        from hexjax.train.checkpoint import restore_on_every_process
        self.wait_for_saves()
        abstract = {k: self.replicas[r][s].step.abstract_state[k] for k, ((r, s), *_) in self.holders.items()}
        params, state, meta = restore_on_every_process(directory, step, self.cfg, abstract)
        self._place(params, state)
        self.step_count = int(meta["steps_taken"])
        return meta
