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
    forward, plus one more forward with full remat. Time is the larger of FLOPs
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
    Every replica holds every layer, so each layer's group is every replica,
    on whatever host and mesh each keeps it: the group all-reduces the layer's
    ``e``-byte gradient (ring, ``n`` replicas), ``2 (n - 1) / n`` of its bytes
    over the slowest link the group crosses plus ``2 (n - 1)`` link latencies,
    one layer (and embedding, head) after another. The model takes, for every
    layer, the slowest link among the hosts the plan uses (the intra-host link
    of each used host included, since replicas may share a host): exact when
    the replicas keep a layer on hosts joined by that link, pessimistic when a
    layer's holders happen to sit on a faster subset. One replica: none.

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
    microbatches (1F1B keeps that many in flight on stage ``s`` of ``S``):
    per layer and token ``(2h + 2q/tp + 2 kv_dev + 3f/tp) e`` plus the float32
    attention scores ``(heads/tp) T 4`` without remat, the layer input ``h e``
    with full remat; workspace: one microbatch's activations of one layer
    (the backward's live set) and on the last stage the float32 logits and
    their gradient ``2 r T V_dev 4``.
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
    """Bytes of one token's activations in one layer: everything the backward needs (``full``), or
    with remat only the layer input."""
    e = wl.dtype_bytes
    if not full:
        return cfg.hidden_size * e
    kv = cost.kv_heads_per_device(cfg, tp) * cfg.head_dim
    per = (2 * cfg.hidden_size + 2 * cfg.q_size / tp + 2 * kv + 3 * cfg.intermediate_size / tp) * e
    return per + (cfg.num_heads / tp) * wl.seq_len * 4


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
    passes = 3 + (1 if remat else 0)               # forward, backward = 2 forwards, recompute
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
    stash_b = stash * l * r * T * activation_bytes_per_token_layer(cfg, tp, wl, full=not remat)
    work = r * T * activation_bytes_per_token_layer(cfg, tp, wl, full=True)
    if last:
        work = work + 2 * r * T * vocab_dev * cost.LOGIT_BYTES
    return StageTrainCost(compute, comm, params * pb, params * gb, params * ob, stash_b, work + 0 * l,
                          cost.usable_memory_bytes(device))


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


def sync_s(cfg: ModelConfig, wl: TrainWorkload, replicas: int, bandwidth: float, latency: float) -> float:
    """Gradient synchronisation of ``replicas`` replicas over a link of ``bandwidth`` and ``latency``."""
    if replicas <= 1:
        return 0.0
    return sum(_allreduce(b, replicas, bandwidth, latency, cost.LINK_EFFICIENCY)
               for b in grad_bytes_per_layer(cfg, wl))


def slowest_link(cluster, hosts) -> tuple[float, float]:
    """``(bandwidth, latency)`` the gradient sync of replicas on ``hosts`` is charged: the least bandwidth
    and the largest latency among the used hosts' own links and the links between them."""
    hosts = sorted(set(hosts))
    bws = [cluster.hosts[h].intra_bandwidth_Bps for h in hosts]
    lats = [cluster.hosts[h].intra_latency_s for h in hosts]
    for i, a in enumerate(hosts):
        for b in hosts[i + 1:]:
            bws.append(cluster.host_bandwidth(a, b))
            lats.append(cluster.host_latency(a, b))
    return min(bws), max(lats)


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
    hosts = {cluster.host_of(d) for d in plan.devices}
    sync = sync_s(cfg, wl, len(reps), *slowest_link(cluster, hosts)) if len(reps) > 1 else 0.0
    step = max(r.pipeline_s for r in reps) + sync
    tps = wl.tokens_per_step / step
    price = sum(r.price_per_hour for r in reps)
    return TrainPrediction(reps, M, sync, step, tps, price, dollars_per_million_tokens(price, tps))


def even_rows(batch: int, replicas: int) -> tuple[int, ...]:
    return tuple(batch // replicas + (1 if i < batch % replicas else 0) for i in range(replicas))
