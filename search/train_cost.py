"""Analytic cost model of training a Llama-family model with a plan: 1F1B pipelines, replicas of
different layouts, AdamW.

It shares the serving model's per-layer counts (:mod:`hexjax.search.cost`:
parameters and forward FLOPs per device of a ``tp``-way layer, sharded
vocabulary and KV heads, the device rates and link efficiency). Symbols as
there, plus ``T`` tokens per sequence, ``B`` sequences per step (the global
batch), ``M`` microbatches per replica (one count for the whole plan, as the
runtime runs it), ``R_r = M b_r`` the sequences replica ``r`` takes per step
and ``e`` the bytes of a parameter/gradient/activation element (2 under
mixed precision, 4 in float32).

Per stage and microbatch (``b`` sequences, ``r = b / dp`` per device; ``b`` is
a multiple of every stage's ``dp``, as the runtime requires)
    forward FLOPs ``l r T layer_flops(tp, (T + 1) / 2)``, plus ``2 h V_dev r T``
    for the LM head on the last stage (every position has a loss); backward 2x
    forward, plus one more forward with full remat (the runtime's backward reads
    the forward's matmul outputs from its stash, and recomputes each layer
    only under remat). Time is the larger of FLOPs
    over the device's rate at ``r T`` rows and the weights read by the forward
    and backward (and the recompute) over its memory bandwidth; the device's
    per-layer overhead is added for the forward and backward programs.
    Tensor parallelism: two all-reduces of ``r T h e`` bytes per layer in the
    forward and two in the backward (two more for the recompute), Megatron's
    layout; with a split vocabulary one more pair for the embedding on the
    first stage, and the float32 logits gathered forward and scattered back on
    the last. A ``dp > 1`` stage all-reduces its gradient shard over its host
    link after every backward (the runtime's gradient accumulator is laid out
    like the parameters, replicated over ``dp``). Every stage but the first
    receives the microbatch's activations and sends back their gradient, two
    hops of ``b T h e`` bytes over the link to the previous stage's host; the
    stage is busy during them. Together: ``f_s``, the stage's work per
    microbatch.

1F1B step of a replica (uneven stages)
    ``T_r = Σ_s f_s + (M - 1) max_s f_s``: the first microbatch fills and the
    last drains the pipeline (each crosses every stage once, forward and
    backward), and in between the slowest stage works on the other ``M - 1``
    back to back. A stage's *bubble* is ``T_r - M f_s``.

Gradient synchronisation across replicas
    Every replica holds every layer, each on the host of the stage that has
    it, so replicas of different layouts keep a layer on different hosts. Per
    *unit* (each layer, the embedding with the first stage, the final norm and
    head with the last) the ``n`` holders form a group that all-reduces the
    unit's ``e``-byte gradient in a ring: ``2 (n - 1)`` steps, each sending
    ``1/n`` of the bytes over every link of the ring at once, so a step takes
    as long as its slowest link. The group is charged at the slowest link it
    contains: between any two distinct hosts among the holders, and a host's
    own link when it holds two or more of them (replicas sharing a host),
    i.e. ``max_link 2 (n - 1) (α + bytes / (n β LINK_EFFICIENCY))``. Units are
    synchronised one after another after the step's backward work. One
    replica: none.

Step time and batch shares
    ``step = max_r T_r(b_r) + sync``: the replicas run in parallel and then
    synchronise. Each replica's share ``R_r = M b_r`` is chosen with the plan
    so that their times match as closely as the row granularity allows
    (HexiScale's per-replica batch sizes); ``Σ R_r = B``. The optimizer update
    (a pass over the state, milliseconds) is not counted.
    Throughput ``B T / step`` tokens/s; cost ``price / 3600 * step / (B T)`` dollars per token.

Memory per device (must fit ``M (1 - reserve)``, as for serving)
    parameters ``e p``, gradients ``e p``, optimizer state ``8 p`` (two float32
    AdamW moments) plus ``4 p`` float32 master weights under mixed precision,
    where ``p`` is the stage's parameters per device (sharded over ``tp``,
    replicated over ``dp``); stashed activations of ``k = min(S - s, M)``
    microbatches (1F1B keeps that many in flight on stage ``s`` of ``S``; the
    last stage runs each microbatch's forward inside its backward program, so
    it holds one): per layer and token ``(2h + 2q/tp + 2 kv_dev + 2f/tp) e`` plus
    the float32 attention scores ``(heads/tp) T 4`` without remat (the layer
    input and every matmul output the backward reads), the inputs of the
    layer's attention and MLP halves ``2 h e`` with full remat, and 4 bytes of
    token ids on the first stage (the runtime
    stashes exactly these: ``hexjax.train.step``); workspace, the temporaries
    of one microbatch's backward, which the runtime runs one layer at a time
    (``hexjax.train.step.chain_backward``): one layer's
    ``(2h + 2q/tp + 2 kv_dev + 2f/tp) 4 + 3 (heads/tp) T 4`` per token (a
    float32 cotangent or rebuilt value per stashed matmul output; the rebuilt
    probabilities, the scores' cotangent and its copy laid out for the key
    gradient). With remat the runtime recomputes and differentiates a layer's
    MLP half and then its attention half, and the larger half counts: the
    attention's ``3 (heads/tp) T 4 + (2h + 2q/tp + 3 kv_dev) 4`` or the MLP's
    ``(4h + 5f/tp) 4`` (``remat_backward_bytes_per_token_layer``). On the last
    stage the residuals are the program's own temporaries (its one
    microbatch's stash above) and the layer being differentiated frees its
    own as they are consumed, so its stashed share comes off (with remat, the
    MLP's input during the attention half); the loss's backward, first, holds
    ``(3 V + V_dev) 4`` per token (shifted logits, their exponentials, the log-probabilities'
    cotangent over whole rows, and this device's share of the logits'
    cotangent): the workspace is the larger of the two. The first stage's
    float32 embedding gradient ``V_dev h 4`` (a scatter-add table) is a
    floor.
    ``hexjax plan --task train --verify`` compares this with XLA's analysis of
    the compiled programs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from hexjax.devices import DeviceSpec
from hexjax.models.config import ModelConfig
from hexjax.search import cost
from hexjax.workload import TrainWorkload

MOMENT_BYTES = 8
"""Two float32 AdamW moments per parameter."""
MASTER_BYTES = 4
"""Float32 master weights kept beside bf16 parameters under mixed precision."""


# ---- per-device counts ----

def stage_params_per_device(cfg: ModelConfig, num_layers, tp: int, first: bool, last: bool):
    """Parameters one device of a ``tp``-way stage holds (``num_layers`` may be an array)."""
    h, v = cfg.hidden_size, cost.vocab_per_device(cfg, tp)
    p = num_layers * cost.layer_params_per_device(cfg, tp)
    if first:
        p = p + v * h
    if last:
        p = p + h
        if not (cfg.tie_word_embeddings and first):
            p = p + v * h
    return p


def state_bytes_per_param(wl: TrainWorkload) -> tuple[int, int, int]:
    """``(parameter, gradient, optimizer)`` bytes per parameter."""
    e = wl.dtype_bytes
    return e, e, MOMENT_BYTES + (MASTER_BYTES if e < 4 else 0)


def activation_bytes_per_token_layer(cfg: ModelConfig, tp: int, wl: TrainWorkload, full: bool) -> float:
    """Bytes one token stashes per layer for the backward: without remat (``full``) the layer input and
    every matmul output the backward reads, with remat the inputs of the layer's two halves (the layer's
    and the MLP's, ``2 h``: the runtime recomputes and differentiates the attention and the MLP apart).

    Without remat the runtime keeps what its backward reads of each layer's matmuls: the layer input
    ``h`` (the attention norm is rebuilt from it), q, k and v before the rotary embedding
    (``q/tp + 2 kv_dev``), the attention output ``q/tp`` and its projection ``h`` (with the input, the
    MLP's residual stream), the MLP's gate and up projections ``2 f/tp``, all in the compute dtype, and
    the float32 attention scores ``(heads/tp) T`` (softmax, norms and SiLU are rebuilt, elementwise)."""
    e = wl.dtype_bytes
    if not full:
        return 2 * cfg.hidden_size * e
    kv = cost.kv_heads_per_device(cfg, tp) * cfg.head_dim
    per = (2 * cfg.hidden_size + 2 * cfg.q_size / tp + 2 * kv + 2 * cfg.intermediate_size / tp) * e
    return per + (cfg.num_heads / tp) * wl.seq_len * 4


def backward_bytes_per_token_layer(cfg: ModelConfig, tp: int, wl: TrainWorkload) -> float:
    """Temporaries one token needs in ONE layer's backward without remat (the runtime's backward takes its
    layers one at a time: ``hexjax.train.step.chain_backward``), beside that layer's stashed activations.

    The peak is at the attention's softmax: the float32 probabilities rebuilt from the scores, the scores'
    cotangent and a second copy of it laid out for the key gradient's matmul, ``3 (heads/tp) T 4``; and one
    float32 value per stashed matmul output, its cotangent or the elementwise value rebuilt from it (norms,
    SiLU), ``(2h + 2q/tp + 2 kv_dev + 2f/tp) 4``. Float32 also under bfloat16: the scores are computed in
    float32, and XLA:CPU runs bfloat16 matmuls in float32 (on GPUs, where the cotangents stay bfloat16,
    the second term is an upper bound)."""
    scores = (cfg.num_heads / tp) * wl.seq_len * 4
    kv = cost.kv_heads_per_device(cfg, tp) * cfg.head_dim
    per = 2 * cfg.hidden_size + 2 * cfg.q_size / tp + 2 * kv + 2 * cfg.intermediate_size / tp
    return 4 * per + 3 * scores


def remat_backward_bytes_per_token_layer(cfg: ModelConfig, tp: int, wl: TrainWorkload, last: bool) -> float:
    """Temporaries one token needs in ONE layer's backward with remat, the larger of its two halves'
    (``hexjax.train.step``: each half is recomputed from its stashed input and differentiated before the
    half below is recomputed).

    The attention half peaks at the softmax's backward: the three score-sized float32 values
    (``backward_bytes_per_token_layer``), and in float32 the cotangent arriving at the half and the
    rebuilt normed input, which the weight gradients read last (``2 h``), q and the attention output's
    cotangent (``2 q/tp``), k, v and v's gradient, taken before the softmax's (``3 kv_dev``). XLA:CPU's
    schedules put a little more or less beside them: on a tp1 layer the value projection's input
    gradient (``h`` more), on a tp2 layer the scores' transposed copy in place of q. The MLP half peaks
    at its weight gradients: the rebuilt gate and up projections, SiLU's quotient, the cotangent of their
    product and its copy laid out for the down projection's weight gradient (``5 f/tp``), the arriving
    cotangent, the rebuilt normed input and the two input gradients of the gate and up projections
    (``4 h``). On the last stage the stash is the program's temporaries: the MLP input is dead by the
    attention half's backward, so it comes off there."""
    kv = cost.kv_heads_per_device(cfg, tp) * cfg.head_dim
    h, scores = cfg.hidden_size, (cfg.num_heads / tp) * wl.seq_len * 4
    attention = 3 * scores + 4 * (2 * h + 2 * cfg.q_size / tp + 3 * kv) - (h * wl.dtype_bytes if last else 0)
    mlp = 4 * (4 * h + 5 * cfg.intermediate_size / tp)
    return max(attention, mlp)


def head_backward_bytes_per_token(cfg: ModelConfig, tp: int) -> float:
    """Temporaries one token needs in the loss's backward on the last stage: over the whole vocabulary (a
    split vocabulary is gathered for the loss) the float32 logits shifted by their maximum, their
    exponentials (log-softmax's residuals) and the scattered cotangent of the log-probabilities, and the
    cotangent of this device's share of the logits laid out for the head's weight gradient,
    ``(3 V + V_dev) 4``."""
    return (3 * cfg.vocab_size + cost.vocab_per_device(cfg, tp)) * cost.LOGIT_BYTES


@dataclasses.dataclass(frozen=True)
class StageTrainCost:
    """One stage's work per microbatch and memory per device (fields are arrays over layer counts when
    ``num_layers`` is one)."""

    compute_s: Any
    """Forward + backward (+ recompute) compute of one microbatch."""
    comm_s: Any
    """Tensor-parallel collectives, the dp gradient all-reduce and the two hops of one microbatch."""
    param_bytes: Any
    grad_bytes: Any
    optimizer_bytes: Any
    stash_bytes: Any
    workspace_bytes: Any
    capacity_bytes: float

    @property
    def work_s(self):
        """``f_s``: the stage's time per microbatch."""
        return self.compute_s + self.comm_s

    @property
    def memory_bytes(self):
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.stash_bytes + self.workspace_bytes


def _allreduce(nbytes, n: int, bw: float, lat: float, eff: float):
    if n <= 1:
        return 0.0 * nbytes
    return 2 * (n - 1) / n * nbytes / (bw * eff) + 2 * (n - 1) * lat


def stage_train_cost(cfg: ModelConfig, device: DeviceSpec, intra_bw: float, intra_lat: float, num_layers,
                     dp: int, tp: int, first: bool, last: bool, microbatch: int, stash: int, wl: TrainWorkload,
                     hop_link: tuple[float, float] | None = None) -> StageTrainCost:
    """A stage of ``num_layers`` layers on a ``(dp, tp)`` mesh working on microbatches of ``microbatch``
    sequences, keeping ``stash`` of them in flight; ``hop_link`` is ``(bandwidth, latency)`` to the previous
    stage's host (None for the first stage)."""
    e, h, T, l = wl.dtype_bytes, cfg.hidden_size, wl.seq_len, num_layers
    remat = wl.remat == "full"
    r = microbatch / dp
    vocab_dev = cost.vocab_per_device(cfg, tp)
    vocab_split = vocab_dev != cfg.vocab_size
    flops_rate, bw_rate, link_eff, overhead = cost.rates(device, e, r * T)
    # as the runtime runs it: forward, backward = 2 forwards from the stash, and with remat each layer's
    # forward once more inside the backward
    passes = 3 + (1 if remat else 0)
    fwd = l * r * T * cost.layer_flops_per_device(cfg, tp, (T + 1) / 2)
    if last:
        fwd = fwd + 2 * h * vocab_dev * r * T
    params = stage_params_per_device(cfg, l, tp, first, last)
    pb, gb, ob = state_bytes_per_param(wl)
    reads = (passes - 1) * params * pb             # weights read by forward, backward (2 matmuls share a read)
    compute = np.maximum(passes * fwd / flops_rate, reads / bw_rate) if isinstance(l, np.ndarray) \
        else max(passes * fwd / flops_rate, reads / bw_rate)
    compute = compute + 2 * l * overhead
    comm = 0.0 * compute
    if tp > 1:
        act = r * T * h * e
        comm = comm + (4 + (2 if remat else 0)) * l * _allreduce(act, tp, intra_bw, intra_lat, link_eff)
        if first and vocab_split:
            comm = comm + 2 * _allreduce(act, tp, intra_bw, intra_lat, link_eff)
        if last and vocab_split:
            logits = r * T * cfg.vocab_size * cost.LOGIT_BYTES
            comm = comm + 2 * ((tp - 1) / tp * logits / (intra_bw * link_eff) + (tp - 1) * intra_lat)
    if dp > 1:
        comm = comm + _allreduce(params * gb, dp, intra_bw, intra_lat, link_eff)
    if hop_link is not None:
        comm = comm + 2 * cost.hop_s(microbatch * T * h * e, *hop_link)
    stash_b = stash * r * T * (l * activation_bytes_per_token_layer(cfg, tp, wl, full=not remat) + (4 if first else 0))
    # workspace: the larger program's temporaries for one microbatch beside the stash. The backward takes
    # one layer at a time (with remat one half of it at a time): that layer's temporaries. The last stage
    # runs its forward in the same program (its one microbatch's residuals are the stash above) and the
    # loss's backward before the layers'. The first stage's embedding gradient is a dense float32 table
    # built by scatter-add, after the layers. In the last stage's program the residuals are temporaries,
    # and the layer being differentiated frees its own as its backward consumes them (elsewhere the stash
    # is the program's argument and stays).
    if remat:
        layer = remat_backward_bytes_per_token_layer(cfg, tp, wl, last)
    else:
        layer = backward_bytes_per_token_layer(cfg, tp, wl)
        if last:
            layer = layer - activation_bytes_per_token_layer(cfg, tp, wl, full=True)
    work = r * T * layer + 0 * l
    if last:
        work = _maximum(work, r * T * head_backward_bytes_per_token(cfg, tp))
    if first:
        work = _maximum(work, vocab_dev * h * 4)
    return StageTrainCost(compute, comm, params * pb, params * gb, params * ob, stash_b, work,
                          cost.usable_memory_bytes(device))


def _maximum(a, b):
    return np.maximum(a, b) if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) else max(a, b)


def pipeline_time(work: list, microbatches: int):
    """1F1B time of a replica whose stages take ``work[s]`` per microbatch: ``Σ f + (M - 1) max f``."""
    total, top = work[0], work[0]
    for w in work[1:]:
        total = total + w
        top = np.maximum(top, w) if isinstance(w, np.ndarray) else max(top, w)
    return total + (microbatches - 1) * top


def grad_bytes_per_layer(cfg: ModelConfig, wl: TrainWorkload) -> list[float]:
    """Gradient bytes of each unit the replicas synchronise: every layer, the embedding and the head."""
    e = wl.dtype_bytes
    units = [cost.layer_params_per_device(cfg, 1) * e] * cfg.num_layers
    units.append(cfg.vocab_size * cfg.hidden_size * e)
    units.append((cfg.hidden_size + (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)) * e)
    return units


def unit_hosts(layer_counts, hosts) -> tuple[int, ...]:
    """The host holding each synchronised unit (layers in order, then the embedding, then the head) in a
    replica whose stage ``s`` has ``layer_counts[s]`` layers on host ``hosts[s]``."""
    out = [h for n, h in zip(layer_counts, hosts) for _ in range(n)]
    return tuple(out) + (hosts[0], hosts[-1])


def replica_unit_hosts(replica, cluster) -> tuple[int, ...]:
    return unit_hosts([st.layers[1] - st.layers[0] for st in replica.stages],
                      [cluster.host_of(st.devices[0]) for st in replica.stages])


def link_allreduce_s(cluster, a: int, b: int, nbytes: float, n: int) -> float:
    """A ring all-reduce of ``nbytes`` over ``n`` members, every step paced by the link between hosts ``a``
    and ``b`` (the host's own link when ``a == b``)."""
    return _allreduce(nbytes, n, cluster.host_bandwidth(a, b), cluster.host_latency(a, b), cost.LINK_EFFICIENCY)


def group_sync_s(cluster, holders, nbytes: float) -> float:
    """One unit's all-reduce among replicas keeping it on ``holders`` (a host per replica): the slowest link
    of the group."""
    n = len(holders)
    if n <= 1:
        return 0.0
    hosts = sorted(set(holders))
    worst = max((link_allreduce_s(cluster, h, h, nbytes, n) for h in hosts if holders.count(h) > 1), default=0.0)
    for i, a in enumerate(hosts):
        for b in hosts[i + 1:]:
            worst = max(worst, link_allreduce_s(cluster, a, b, nbytes, n))
    return worst


def sync_s(cfg: ModelConfig, wl: TrainWorkload, cluster, replica_units) -> float:
    """Gradient synchronisation of replicas keeping their units on ``replica_units`` (one
    :func:`unit_hosts` tuple per replica): every unit's group in turn."""
    if len(replica_units) <= 1:
        return 0.0
    return sum(group_sync_s(cluster, [r[u] for r in replica_units], nbytes)
               for u, nbytes in enumerate(grad_bytes_per_layer(cfg, wl)))


def least_sync_s(cfg: ModelConfig, wl: TrainWorkload, cluster, n: int) -> float:
    """A lower bound on the synchronisation of any ``n`` replicas: every unit over the cluster's fastest link."""
    if n <= 1:
        return 0.0
    H = cluster.num_hosts
    pairs = [(a, b) for a in range(H) for b in range(a, H) if a != b or cluster.hosts[a].count > 1]
    return sum(min((link_allreduce_s(cluster, a, b, nbytes, n) for a, b in pairs), default=0.0)
               for nbytes in grad_bytes_per_layer(cfg, wl))


def dollars_per_million_tokens(price_per_hour: float, tokens_per_s: float) -> float:
    if tokens_per_s <= 0:
        return math.inf
    return price_per_hour / 3600.0 / tokens_per_s * 1e6


# ---- predictions of a plan ----

@dataclasses.dataclass(frozen=True)
class StageTrainPrediction:
    host: str
    layers: tuple[int, int]
    dp: int
    tp: int
    compute_s: float
    """Per microbatch: forward + backward (+ recompute)."""
    comm_s: float
    """Per microbatch: collectives and hops."""
    bubble_s: float
    """Idle time of the stage in the replica's 1F1B step."""
    param_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    stash_bytes: float
    workspace_bytes: float
    capacity_bytes: float
    stash_microbatches: int

    @property
    def memory_bytes(self) -> float:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.stash_bytes + self.workspace_bytes

    @property
    def state_bytes(self) -> float:
        """Parameters, gradients and optimizer state."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def fits(self) -> bool:
        return self.memory_bytes <= self.capacity_bytes


@dataclasses.dataclass(frozen=True)
class ReplicaTrainPrediction:
    stages: tuple[StageTrainPrediction, ...]
    rows: int
    """Sequences per step."""
    microbatch: int
    """Sequences per microbatch."""
    pipeline_s: float
    """1F1B time of the replica's share."""
    price_per_hour: float

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)


@dataclasses.dataclass(frozen=True)
class TrainPrediction:
    replicas: tuple[ReplicaTrainPrediction, ...]
    microbatches: int
    sync_s: float
    step_s: float
    tokens_per_s: float
    price_per_hour: float
    dollars_per_mtok: float

    @property
    def fits(self) -> bool:
        return all(r.fits for r in self.replicas)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": "train", "step_s": self.step_s, "sync_s": self.sync_s, "tokens_per_s": self.tokens_per_s,
            "price_per_hour": self.price_per_hour, "dollars_per_million_tokens": self.dollars_per_mtok,
            "microbatches": self.microbatches,
            "peak_memory_bytes": max((s.memory_bytes for r in self.replicas for s in r.stages), default=0.0),
            "replicas": [{"rows": r.rows, "microbatch": r.microbatch, "pipeline_s": r.pipeline_s,
                          "stages": [{"compute_s": s.compute_s, "comm_s": s.comm_s, "bubble_s": s.bubble_s,
                                      "memory_bytes": s.memory_bytes, "capacity_bytes": s.capacity_bytes}
                                     for s in r.stages]} for r in self.replicas],
        }


def predict_replica(replica, cfg: ModelConfig, cluster, wl: TrainWorkload, rows: int,
                    microbatches: int) -> ReplicaTrainPrediction:
    """One replica taking ``rows`` sequences per step in ``microbatches`` microbatches."""
    stages = replica.stages
    S = len(stages)
    b = rows // microbatches
    hosts = [cluster.host_of(st.devices[0]) for st in stages]
    costs = []
    for s, st in enumerate(stages):
        host = cluster.hosts[hosts[s]]
        link = None if s == 0 else (cluster.host_bandwidth(hosts[s - 1], hosts[s]),
                                    cluster.host_latency(hosts[s - 1], hosts[s]))
        costs.append(stage_train_cost(cfg, host.device, host.intra_bandwidth_Bps, host.intra_latency_s,
                                      st.layers[1] - st.layers[0], st.dp, st.tp, s == 0, s == S - 1, b,
                                      min(S - s, microbatches), wl, link))
    work = [c.work_s for c in costs]
    t = pipeline_time(work, microbatches)
    preds = tuple(StageTrainPrediction(
        cluster.hosts[hosts[s]].name, tuple(st.layers), st.dp, st.tp, float(c.compute_s), float(c.comm_s),
        float(t - microbatches * c.work_s), float(c.param_bytes), float(c.grad_bytes), float(c.optimizer_bytes),
        float(c.stash_bytes), float(c.workspace_bytes), c.capacity_bytes, min(S - s, microbatches))
        for s, (st, c) in enumerate(zip(stages, costs)))
    price = sum(cluster.device(d).price_per_hour for st in stages for d in st.devices)
    return ReplicaTrainPrediction(preds, rows, b, float(t), price)


def predict(plan, cfg: ModelConfig, cluster, wl: TrainWorkload, microbatches: int | None = None,
            replica_rows: tuple[int, ...] | None = None) -> TrainPrediction:
    """Evaluate a training plan (its own microbatches and batch shares unless given)."""
    M = microbatches or plan.microbatches or 1
    rows = replica_rows or plan.replica_rows or even_rows(wl.global_batch, len(plan.replicas))
    reps = tuple(predict_replica(r, cfg, cluster, wl, n, M) for r, n in zip(plan.replicas, rows))
    sync = sync_s(cfg, wl, cluster, [replica_unit_hosts(r, cluster) for r in plan.replicas])
    step = max(r.pipeline_s for r in reps) + sync
    tps = wl.tokens_per_step / step
    price = sum(r.price_per_hour for r in reps)
    return TrainPrediction(reps, M, sync, step, tps, price, dollars_per_million_tokens(price, tps))


def even_rows(batch: int, replicas: int) -> tuple[int, ...]:
    return tuple(batch // replicas + (1 if i < batch % replicas else 0) for i in range(replicas))
