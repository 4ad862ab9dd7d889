"""Analytic cost model of serving a Llama-family model with a plan.

Every figure is in bytes, seconds, FLOPs and dollars. Symbols: ``h`` hidden
size, ``f`` MLP width, ``q = heads * head_dim``, ``d_h`` head dim, ``V``
vocabulary, ``e`` bytes per parameter/activation element (``dtype_bytes``),
``s`` prompt length, ``n`` output length, ``B`` requests in flight per
replica, ``L`` layers. A stage holds ``l`` layers on a ``(dp, tp)`` mesh of
one host whose devices have peak FLOP/s ``c``, memory bandwidth ``m``,
memory ``M``, and intra-host link bandwidth ``β`` and latency ``α``.

Sharding (as the runtime lays it out)
    Attention heads and the MLP width are split over ``tp``; KV heads are
    split when ``tp`` divides them and replicated otherwise, so a device holds
    ``k_dev = kv_heads / tp`` or ``kv_heads`` KV heads. The vocabulary
    (embedding and LM head) is split over ``tp`` when ``tp`` divides it.
    Each of the ``dp`` rows holds a full copy of the stage's layers.

Microbatches
    A replica of ``P`` stages either sends its ``B`` requests through as one
    microbatch, or cuts them into microbatches of ``b = ceil(B / min(B, P))``
    requests, ``mb = ceil(B / b)`` of them (the last holds the rest), so that
    the pipeline is kept full whenever ``B >= P``; the model takes whichever
    of the two fits in memory and gives the lower latency (splitting pays off
    when stages are compute-bound; when they are bound by reading weights,
    every extra microbatch reads them again). Inside a stage each microbatch
    is split over the ``dp`` rows: a row works on ``r = ceil(b / dp)``
    requests and keeps the KV cache of its share of every microbatch,
    ``Σ_m ceil(B_m / dp)`` sequences.

Per-device FLOPs of one layer for one token attending to ``x`` keys
    ``2 (h q / tp + 2 h k_dev d_h + q h / tp + 3 h f / tp) + 4 (heads / tp) d_h x``
    (the model's ``layer_flops_per_token`` at ``tp = 1``). The last stage adds
    ``2 h V_dev`` per token that gets logits (the LM head).
    :func:`stage_figures` gives a stage's per-device figures of one
    microbatch (bytes held, FLOPs and bytes read per prefill and decode step)
    and is what the times below, and every comparison with XLA, are made of;
    the attended context is a parameter so that a compiled program can be
    matched at the context it really reads.

Stage compute time (per microbatch)
    Prefill: ``r s`` tokens with mean context ``(s + 1) / 2`` (exact for the
    causal sum, since attention FLOPs are linear in the context); logits for
    the last position only. Bytes read: the stage's weights once plus the KV
    cache written. Decode step: ``r`` tokens at the mean context
    ``s + n / 2`` of the ``n - 1`` decode steps; bytes: weights plus the KV
    cache read (``r (s + n/2) l 2 k_dev d_h e``). Of the embedding table only
    the rows looked up are read (a tied LM head on the same stage reads all
    of it). FLOPs and bytes are kept apart and the slower bound wins::

        t = max(flops / (c * FLOPS_EFFICIENCY), bytes / (m * MEMORY_BANDWIDTH_EFFICIENCY))

    A decode step's bound is taken step by step at its own context ``s + t``
    and averaged over the ``n - 1`` steps (:func:`mean_of_max_linear`): equal
    to the bound at the mean context while one bound dominates throughout,
    larger when a step crosses from weight-read bound to compute bound.

Calibrated devices
    A device with a measured profile (``hexjax calibrate``,
    :class:`hexjax.devices.DeviceProfile`) replaces the three efficiency
    constants by its own figures: the matmul efficiency read off its curve at
    the matmul's rows (``r s`` tokens in a prefill, ``r`` in a decode step),
    its memory and link efficiencies, and adds its fixed time of launching a
    stage's program (dispatch) to each prefill and decode step.

Serving engine steps
    Costed as the serving engine runs them (``_predict_replica(...,
    serving=True)``, what ``hexjax simulate`` uses), a step takes further
    terms from a profile that measured them. The engine's host work
    (``host_pass_s`` plus ``host_row_s`` per request row: scheduling,
    building inputs, sampling, reading tokens back) is added to the first
    stage's prefill and decode step, which then also carries the token's way
    back on that host. Copies between meshes of one host (``copy_latency_s``,
    ``copy_Bps``) cost a hop between two stages of that host as
    ``copy_latency + bytes * tp / copy_Bps`` instead of the host's link
    figures. A profile that measured the runtime's stage programs by mesh
    size (``stage_overhead_s``) charges each stage step its figure at the
    stage's ``dp * tp`` devices instead of ``step_overhead_s``, and one that
    measured all-reduces by degree (``allreduce_s``) charges every collective
    of a ``tp`` stage its figure at ``tp`` devices instead of the ring's
    latency term (the bandwidth term stays). A profile that measured the
    runtime's chunk attention (``chunk_key_s``) adds, when the engine's
    block-table size ``T`` is given, ``l r s (T - s) (heads / tp)`` times its
    figure to a prefill: the keys of the table beyond the chunk's own, which
    the runtime's chunk attention reads and the layer curve never saw. A
    profile that measured copies issued behind the sending stage's program
    (``chained_copy_s``) takes that as the hop's fixed time instead of
    ``copy_latency_s``.
    Without a profile, with one
    lacking these fields, or outside ``serving`` (the planner, ``predict``),
    nothing changes.

Tensor parallelism
    Two all-reduces per layer (after attention and after the MLP) of
    ``r * tokens * h * e`` bytes, ring model over the host's link::

        2 (tp - 1) / tp * bytes / (β * LINK_EFFICIENCY) + 2 (tp - 1) α

    plus, when the vocabulary is split, one all-reduce of the embedding
    output on the first stage and an all-gather of the ``r V`` float32
    logits on the last: ``(tp - 1) / tp * bytes / β' + (tp - 1) α``.

Pipeline hops
    A stage receives its microbatch from the previous stage over the link
    between their hosts (bandwidth ``β_ij``, latency ``α_ij``):
    ``α_ij + b * tokens * h * e / (β_ij * LINK_EFFICIENCY)``; the last stage
    sends the ``b`` sampled token ids (4 bytes each) back to the first stage
    for every decode step. The receiving (or, for the token, the sending)
    stage is busy during the transfer: communication does not overlap
    compute. A one-stage replica has no hops. With ``predict(...,
    contention=True)`` a network link shared by ``k`` replicas' hops gives
    each ``β_ij / k`` (the links are those of :func:`link_key`: an explicit
    link, else the wide-area link between two zones, else the host pair).

Replica times
    Per stage and microbatch: ``p_s`` (prefill) and ``d_s`` (one decode
    step), each = hop + compute + tensor-parallel collectives. The runtime
    issues every microbatch's prefill, then the decode steps round by round
    (step ``t`` of every microbatch before step ``t + 1`` of any), and a
    replica serves one batch at a time. So::

        TTFT    = Σ_s p_s + (mb - 1) max_s p_s          (the last microbatch's prefill leaves the pipeline)
        TPOT    = max(Σ_s d_s, mb max_s d_s)             (one decode round: a token's chain, or the busiest stage
                                                          serving every microbatch)
        latency = TTFT + (n - 1) TPOT                    (the last request's end-to-end latency)

    ``latency`` is what every objective and the SLO use; a replica serves
    ``B n / latency`` output tokens/s and ``B / latency`` requests/s. With
    one microbatch it is ``Σ_s W_s``, ``W_s = p_s + (n - 1) d_s`` being a
    stage's work for the batch's whole life (``busy_s``, for reading). It is
    never below ``max(Σ_s W_s, mb max_s W_s)``, the period of a pipeline that
    would overlap one batch's prefill with another's decode, which the search
    uses as a lower bound. A plan's throughput is the sum over replicas; its
    latencies are the worst replica's.

Memory per device
    Weights ``e (l * layer_dev + [first] V_dev h + [last] (V_dev h + h))``
    where ``layer_dev`` counts ``q/tp`` query and output columns, ``k_dev``
    KV heads, ``f/tp`` MLP columns and the two norms (a tied LM head is
    stored again on the last stage unless it is also the first); KV cache
    in whole pages of ``p = KV_PAGE_TOKENS`` tokens, as the runtime
    allocates it, plus the one page per device it keeps as a target for
    padding writes: ``l * (Σ_m ceil(B_m / dp) * ceil((s + n) / p) + 1) * p * 2 k_dev d_h e``;
    activation workspace of the
    largest step (a prefill of one row, one layer at a time:
    ``r s (2h + 2q/tp + 2 k_dev d_h + 3f/tp) e`` plus float32 attention
    scores ``r (heads/tp) s^2 * 4`` and the last stage's float32 logits
    ``r V_dev * 4``). It must fit ``M * (1 - MEMORY_RESERVE_FRACTION)``.

Cost
    Price per hour = sum of the used devices' prices; tokens per dollar =
    ``3600 * throughput / price``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

from hexjax.devices import DeviceSpec
from hexjax.models.config import ModelConfig
from hexjax.workload import Workload

FLOPS_EFFICIENCY = 0.7
"""Fraction of peak dense FLOP/s that large bf16 matmuls reach in practice."""
MEMORY_BANDWIDTH_EFFICIENCY = 0.8
"""Fraction of the vendor memory bandwidth that streaming reads reach."""
LINK_EFFICIENCY = 0.8
"""Fraction of a link's nominal bandwidth that collectives and transfers reach."""
MEMORY_RESERVE_FRACTION = 0.1
"""Share of device memory kept free for the runtime, compiler scratch and fragmentation."""
KV_PAGE_TOKENS = 16
"""Tokens per KV-cache page (the runtime's default ``RunOptions.page_size``)."""
TOKEN_ID_BYTES = 4
"""Bytes of one sampled token id sent back to the first stage."""
LOGIT_BYTES = 4
"""Logits are float32."""


# ---- sharded sizes ----

def kv_heads_per_device(cfg: ModelConfig, tp: int) -> int:
    """KV heads a device holds: split when ``tp`` divides them, else all of them."""
    return cfg.num_kv_heads // tp if cfg.num_kv_heads % tp == 0 else cfg.num_kv_heads


def vocab_per_device(cfg: ModelConfig, tp: int) -> int:
    """Vocabulary rows a device holds: split when ``tp`` divides the vocabulary."""
    return cfg.vocab_size // tp if cfg.vocab_size % tp == 0 else cfg.vocab_size


def layer_params_per_device(cfg: ModelConfig, tp: int) -> int:
    """Parameters of one decoder layer on one device of a ``tp``-way stage."""
    h, f, q, dh = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.head_dim
    kv = kv_heads_per_device(cfg, tp) * dh
    params = h * q // tp + 2 * h * kv + q * h // tp + 3 * h * f // tp + 2 * h
    if cfg.attention_bias:
        params += q // tp + 2 * kv + h
    if cfg.mlp_bias:
        params += 2 * f // tp + h
    return params


def layer_flops_per_device(cfg: ModelConfig, tp: int, context: float) -> float:
    """Forward FLOPs of one layer for one token attending to ``context`` keys, on one device."""
    h, f, q, dh = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.head_dim
    kv = kv_heads_per_device(cfg, tp) * dh
    matmul = 2 * (h * q / tp + 2 * h * kv + q * h / tp + 3 * h * f / tp)
    return matmul + 4 * (cfg.num_heads / tp) * dh * context


def usable_memory_bytes(device: DeviceSpec) -> float:
    """Memory a plan may fill on ``device``."""
    return device.memory_bytes * (1.0 - MEMORY_RESERVE_FRACTION)


def microbatch_options(batch: int, num_stages: int) -> list[tuple[int, int]]:
    """``(microbatches, requests per microbatch)`` a replica of ``num_stages`` stages may use.

    One microbatch of the whole batch, or microbatches of ``b = ceil(batch / min(batch, stages))``
    requests, as many as that takes (``ceil(batch / b)``; the last holds the rest).
    """
    mb = min(batch, num_stages)
    if mb <= 1:
        return [(1, batch)]
    b = -(-batch // mb)
    return [(1, batch), (-(-batch // b), b)]


def microbatch_requests(batch: int, microbatches: int, microbatch: int) -> list[int]:
    """Requests in each of the ``microbatches`` microbatches of ``microbatch`` requests (the last the rest)."""
    return [max(0, min(microbatch, batch - m * microbatch)) for m in range(microbatches)]


def kv_sequences_per_device(batch: int, microbatches: int, microbatch: int, dp: int) -> int:
    """Sequences whose KV cache one device of a ``dp``-row stage keeps: its rows' share of every microbatch."""
    return sum(-(-k // dp) for k in microbatch_requests(batch, microbatches, microbatch))


def kv_pages_per_device(context_len: int, sequences: int, page_tokens: int = KV_PAGE_TOKENS) -> int:
    """KV pages per layer one device holds: whole pages per sequence plus the one reserved page."""
    return sequences * -(-context_len // page_tokens) + 1


def prefill_flops(cfg: ModelConfig, num_layers, tp: int, last: bool, rows: int, tokens: int,
                  context: float) -> float:
    """Per-device FLOPs of a prefill of ``rows`` rows of ``tokens`` tokens that attend to ``context`` keys
    each (on average); the last stage's LM head makes logits for one position per row."""
    head = 2 * cfg.hidden_size * vocab_per_device(cfg, tp) if last else 0.0
    return num_layers * rows * tokens * layer_flops_per_device(cfg, tp, context) + rows * head


def decode_flops(cfg: ModelConfig, num_layers, tp: int, last: bool, rows: int, context: float) -> float:
    """Per-device FLOPs of one decode step of ``rows`` rows, each token attending to ``context`` keys."""
    head = 2 * cfg.hidden_size * vocab_per_device(cfg, tp) if last else 0.0
    return num_layers * rows * layer_flops_per_device(cfg, tp, context) + rows * head


@dataclasses.dataclass(frozen=True)
class StageFigures:
    """Per-device figures of one stage's programs for one microbatch (what :func:`stage_cost` is made of).

    With ``num_layers`` an array, every size and FLOP field holds one value per entry.
    """

    rows: int
    """Rows one device computes in one microbatch."""
    kv_sequences: int
    """Sequences whose KV cache one device keeps (its rows of every microbatch)."""
    kv_pages: int
    """KV pages per layer on one device, the reserved page included."""
    weight_bytes: Any
    """Parameters per device."""
    kv_bytes: Any
    """KV cache per device (``kv_pages`` pages of every layer)."""
    activation_bytes: Any
    """Activation workspace per device (the largest step: a prefill, one layer at a time)."""
    prefill_tokens: int
    """Tokens per row of the prefill."""
    prefill_context: float
    """Keys each prefill token attends to (mean)."""
    decode_context: float
    """Keys the decode step's token attends to."""
    prefill_flops: Any
    """FLOPs of one microbatch's prefill, per device."""
    decode_flops: Any
    """FLOPs of one microbatch's decode step at ``decode_context``, per device."""
    prefill_bytes: Any
    """Bytes one prefill reads and writes: the weights once (of the embedding table only the rows looked up)
    plus the KV cache written."""
    decode_bytes: Any
    """Bytes one decode step reads: the weights (embedding: the rows looked up) plus the KV cache of
    ``decode_context`` positions."""


def stage_figures(cfg: ModelConfig, num_layers, dp: int, tp: int, first: bool, last: bool, microbatches: int,
                  microbatch: int, workload: Workload, dtype_bytes: int = 2, *, micro_batch_rows: int | None = None,
                  prefill_tokens: int | None = None, prefill_context: float | None = None,
                  decode_context: float | None = None) -> StageFigures:
    """Per-device figures of one microbatch on a stage of ``num_layers`` layers on a ``(dp, tp)`` mesh.

    ``microbatches`` x ``microbatch`` is how the replica's ``workload.batch``
    requests are cut (:func:`microbatch_options`); the KV cache holds every
    real request's pages. The rest describe one microbatch's programs and
    default to the cost model's own view: ``micro_batch_rows`` rows (default
    ``microbatch``; a compiled program may pad it) split over ``dp``,
    ``prefill_tokens`` (default ``workload.prompt_len``) per row attending to
    ``prefill_context`` keys on average (default ``(s + 1) / 2``, the causal
    mean), and a decode step attending to ``decode_context`` keys (default
    ``s + n / 2``, the mean over the decode steps). To compare with a compiled
    program, pass the context it really reads: its padded prompt for the
    prefill (a masked dense attention computes every key), and every slot of
    the block table (``table_width * page_size``) for a decode step.
    """
    e = dtype_bytes
    h, dh, l = cfg.hidden_size, cfg.head_dim, num_layers
    s, n = workload.prompt_len, workload.output_len
    rows = -(-(microbatch if micro_batch_rows is None else micro_batch_rows) // dp)
    tokens = s if prefill_tokens is None else prefill_tokens
    pre_ctx = (tokens + 1) / 2 if prefill_context is None else prefill_context
    dec_ctx = s + n / 2 if decode_context is None else decode_context
    kv_dev = kv_heads_per_device(cfg, tp) * dh
    vocab_dev = vocab_per_device(cfg, tp)

    weights = l * layer_params_per_device(cfg, tp) * e
    if first:
        weights += vocab_dev * h * e
    if last:
        weights += h * e
        if not (cfg.tie_word_embeddings and first):
            weights += vocab_dev * h * e
    kv_token_bytes = 2 * kv_dev * e                # one token, one layer, this device
    seqs = kv_sequences_per_device(workload.batch, microbatches, microbatch, dp)
    pages = kv_pages_per_device(workload.context_len, seqs)
    kv = l * pages * KV_PAGE_TOKENS * kv_token_bytes
    act = rows * tokens * (2 * h + 2 * cfg.q_size / tp + 2 * kv_dev + 3 * cfg.intermediate_size / tp) * e
    act += rows * (cfg.num_heads / tp) * tokens * tokens * 4
    if last:
        act += rows * vocab_dev * LOGIT_BYTES
    # the embedding table is gathered row by row, not streamed (unless the tied LM head on this stage reads it)
    streamed = weights
    if first and not (cfg.tie_word_embeddings and last):
        streamed = weights - vocab_dev * h * e
    return StageFigures(
        rows, seqs, pages, weights, kv, act, tokens, pre_ctx, dec_ctx,
        prefill_flops(cfg, l, tp, last, rows, tokens, pre_ctx), decode_flops(cfg, l, tp, last, rows, dec_ctx),
        streamed + (rows * tokens * h * e if first else 0) + l * rows * tokens * kv_token_bytes,
        streamed + (rows * h * e if first else 0) + l * rows * dec_ctx * kv_token_bytes)


# ---- one stage ----

@dataclasses.dataclass(frozen=True)
class StageCost:
    """Predicted time and memory of one stage (per microbatch), excluding hops."""

    prefill_s: float
    """Prefill of one microbatch: compute plus tensor-parallel collectives."""
    decode_s: float
    """One decode step of one microbatch: compute plus collectives."""
    weight_bytes: float
    """Parameters per device."""
    kv_bytes: float
    """KV cache per device."""
    activation_bytes: float
    """Activation workspace per device."""
    capacity_bytes: float
    """Memory a plan may use on one of its devices."""

    @property
    def memory_bytes(self) -> float:
        """Peak memory per device."""
        return self.weight_bytes + self.kv_bytes + self.activation_bytes

    @property
    def fits(self) -> bool:
        return self.memory_bytes <= self.capacity_bytes


def _allreduce_s(nbytes: float, tp: int, bandwidth_Bps: float, latency_s: float,
                 efficiency: float = LINK_EFFICIENCY) -> float:
    return 2 * (tp - 1) / tp * nbytes / (bandwidth_Bps * efficiency) + 2 * (tp - 1) * latency_s


def _allgather_s(nbytes: float, tp: int, bandwidth_Bps: float, latency_s: float,
                 efficiency: float = LINK_EFFICIENCY) -> float:
    return (tp - 1) / tp * nbytes / (bandwidth_Bps * efficiency) + (tp - 1) * latency_s


def rates(device: DeviceSpec, dtype_bytes: int, rows: float) -> tuple[float, float, float, float]:
    """``(FLOP/s, bytes/s, link efficiency, overhead per program step)`` of ``device`` for matmuls of
    ``rows`` rows: a calibrated profile's measured curve where the device has one, else the datasheet
    peaks times the constants above."""
    p = device.profile
    if p is None:
        return (device.peak_flops * FLOPS_EFFICIENCY, device.memory_bandwidth_Bps * MEMORY_BANDWIDTH_EFFICIENCY,
                LINK_EFFICIENCY, 0.0)
    return (device.peak_flops * p.efficiency(dtype_bytes, rows), device.memory_bandwidth_Bps * p.memory_efficiency,
            p.link_efficiency, p.step_overhead_s)


def mean_of_max_linear(a0, a1, b0, b1, steps: int):
    """Mean over ``t = 0 .. steps - 1`` of ``max(a0 + a1 t, b0 + b1 t)``, exactly (elementwise on arrays).

    The two bounds of a decode step grow linearly with the context, so the slower one may change along
    the way; the sum splits at their crossing into two arithmetic series.
    """
    g0, g1 = np.asarray(a0 - b0, float), np.asarray(a1 - b1, float)
    N = steps
    with np.errstate(divide="ignore", invalid="ignore"):
        root = np.where(g1 != 0, -g0 / np.where(g1 != 0, g1, 1.0), 0.0)
    # g > 0 on a suffix t >= k when rising, on a prefix t < k when falling
    k_up = np.clip(np.floor(root) + 1, 0, N)
    k_dn = np.clip(np.ceil(root), 0, N)
    tri = lambda k: k * (k - 1) / 2
    up = (N - k_up) * g0 + g1 * (tri(N) - tri(k_up))
    dn = k_dn * g0 + g1 * tri(k_dn)
    pos = np.where(g1 > 0, up, np.where(g1 < 0, dn, N * np.maximum(g0, 0.0)))
    mean = b0 + b1 * (N - 1) / 2 + np.maximum(pos, 0.0) / N
    return mean if mean.ndim else float(mean)


def stage_cost(cfg: ModelConfig, device: DeviceSpec, intra_bandwidth_Bps: float, intra_latency_s: float,
               num_layers: int, dp: int, tp: int, first: bool, last: bool, microbatches: int,
               microbatch: int, workload: Workload, dtype_bytes: int = 2, serving: bool = False,
               table_tokens: int | None = None) -> StageCost:
    """Time and memory of a stage of ``num_layers`` layers on a ``(dp, tp)`` mesh of one host.

    ``num_layers`` may be an integer array: every field then holds one value per entry.
    The FLOPs and bytes are :func:`stage_figures`' at the cost model's own contexts; the decode
    step is the mean over the ``n - 1`` steps of each step's time at its own context ``s + t``
    (``t = 1 .. n - 1``), the slower of its FLOP and byte bounds taken step by step.
    ``serving``: the serving engine's step, with the profile's stage overhead and all-reduce times by
    device count where it measured them (see "Serving engine steps" above); ``table_tokens``: the keys
    a prefill chunk's attention reads (the serving engine's block table), for the profile's chunk term.
    """
    f = stage_figures(cfg, num_layers, dp, tp, first, last, microbatches, microbatch, workload, dtype_bytes)
    e, h, l, r, s = dtype_bytes, cfg.hidden_size, num_layers, f.rows, f.prefill_tokens
    n = workload.output_len
    vocab_split = vocab_per_device(cfg, tp) != cfg.vocab_size
    peak_p, bw, link_eff, overhead = rates(device, dtype_bytes, r * s)
    peak_d = rates(device, dtype_bytes, r)[0]
    prof = device.profile if serving else None
    collective = None         # measured time of one collective on the stage's tp devices (None: ring model)
    chunk = 0.0
    if prof is not None:
        measured = prof.by_devices(prof.stage_overhead_s, dp * tp)
        overhead = overhead if measured is None else measured
        collective = prof.by_devices(prof.allreduce_s, tp) if tp > 1 else None
        key = prof.by_devices(prof.chunk_key_s, dp * tp)
        if key is not None and table_tokens is not None:
            # the chunk attends over the whole block table; keys beyond its own are not in the layer curve
            heads = cfg.num_heads / tp
            chunk = l * r * s * max(table_tokens - s, 0) * heads * key
    prefill = _max(f.prefill_flops / peak_p, f.prefill_bytes / bw) + overhead
    if chunk:
        prefill = prefill + chunk
    if n > 2:
        # both bounds are linear in the context: evaluate them at the first two steps' contexts
        g = stage_figures(cfg, num_layers, dp, tp, first, last, microbatches, microbatch, workload, dtype_bytes,
                          decode_context=s + 2)
        g1 = stage_figures(cfg, num_layers, dp, tp, first, last, microbatches, microbatch, workload, dtype_bytes,
                           decode_context=s + 1)
        c0, m0 = g1.decode_flops / peak_d, g1.decode_bytes / bw
        decode = mean_of_max_linear(c0, g.decode_flops / peak_d - c0, m0, g.decode_bytes / bw - m0, n - 1)
    else:
        decode = _max(f.decode_flops / peak_d, f.decode_bytes / bw)
    decode = decode + overhead
    if tp > 1:
        for tokens in (s, 1):
            comm = 2 * l * _allreduce_s(r * tokens * h * e, tp, intra_bandwidth_Bps, intra_latency_s, link_eff)
            if first and vocab_split:
                comm += _allreduce_s(r * tokens * h * e, tp, intra_bandwidth_Bps, intra_latency_s, link_eff)
            if last and vocab_split:
                comm += _allgather_s(r * cfg.vocab_size * LOGIT_BYTES, tp, intra_bandwidth_Bps, intra_latency_s,
                                     link_eff)
            if collective is not None:
                # each collective's latency as measured on tp devices instead of the ring's (tp - 1) steps
                comm += (2 * l + (first and vocab_split)) * (collective - 2 * (tp - 1) * intra_latency_s)
                comm += (last and vocab_split) * (collective - (tp - 1) * intra_latency_s)
            if tokens == s:
                prefill += comm
            else:
                decode += comm
    return StageCost(prefill, decode, f.weight_bytes, f.kv_bytes, f.activation_bytes, usable_memory_bytes(device))


def _max(a, b):
    # elementwise when the stage is costed for a vector of layer counts at once
    return np.maximum(a, b) if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) else max(a, b)


def hop_s(nbytes: float, bandwidth_Bps: float, latency_s: float) -> float:
    """One transfer of ``nbytes`` over a link."""
    return latency_s + nbytes / (bandwidth_Bps * LINK_EFFICIENCY)


def hop_bytes(cfg: ModelConfig, workload: Workload, microbatch: int, dtype_bytes: int = 2) -> tuple[float, float, float]:
    """Bytes of one microbatch's (prefill activations, decode activations, token ids back)."""
    act = microbatch * cfg.hidden_size * dtype_bytes
    return act * workload.prompt_len, act, microbatch * TOKEN_ID_BYTES


def busy_s(prefill_s: float, decode_s: float, workload: Workload) -> float:
    """A stage's work for one microbatch's whole life: ``p + (n - 1) d``."""
    return prefill_s + (workload.output_len - 1) * decode_s


def replica_times(prefill: list, decode: list, microbatches: int, output_len: int) -> tuple:
    """``(TTFT, TPOT, latency)`` of a replica whose stages take ``prefill[s]`` and ``decode[s]`` per
    microbatch (hops included): ``TTFT = Σ p + (mb - 1) max p``, ``TPOT = max(Σ d, mb max d)``
    (0 when ``output_len`` is 1), ``latency = TTFT + (output_len - 1) TPOT``.

    Entries may be arrays (elementwise, e.g. one per candidate split).
    """
    total, top = prefill[0], prefill[0]
    for p in prefill[1:]:
        total = total + p
        top = _max(top, p)
    ttft = total + (microbatches - 1) * top
    if output_len <= 1:
        return ttft, 0.0 * ttft, ttft
    total, top = decode[0], decode[0]
    for d in decode[1:]:
        total = total + d
        top = _max(top, d)
    tpot = _max(total, microbatches * top)
    return ttft, tpot, ttft + (output_len - 1) * tpot


# ---- predictions ----

@dataclasses.dataclass(frozen=True)
class StagePrediction:
    """One stage of one replica, with its hops."""

    host: str
    """Host the stage runs on."""
    layers: tuple[int, int]
    """``[start, stop)``."""
    dp: int
    """Data-parallel rows."""
    tp: int
    """Tensor-parallel degree."""
    prefill_s: float
    """Prefill of one microbatch, including the hop into the stage."""
    decode_s: float
    """One decode step of one microbatch, including hops."""
    busy_s: float
    """Work for one microbatch's whole life: ``prefill + (n - 1) decode``."""
    memory_bytes: float
    """Peak memory per device."""
    weight_bytes: float
    """Parameters per device."""
    kv_bytes: float
    """KV cache per device."""
    activation_bytes: float
    """Activation workspace per device."""
    capacity_bytes: float
    """Usable memory per device."""


@dataclasses.dataclass(frozen=True)
class ReplicaPrediction:
    """Predicted behaviour of one pipeline."""

    stages: tuple[StagePrediction, ...]
    """Per stage."""
    microbatches: int
    """How many microbatches the batch is split into."""
    microbatch: int
    """Requests per microbatch."""
    ttft_s: float
    """Time to first token of the last microbatch: the prefills of all microbatches through the pipeline."""
    tpot_s: float
    """Time per output token in steady decoding: one round of every microbatch."""
    latency_s: float
    """End-to-end latency of the batch's last request: ``TTFT + (n - 1) TPOT``."""
    throughput_tokens_per_s: float
    """Output tokens per second with batches served back to back."""
    requests_per_s: float
    """Requests completed per second."""
    price_per_hour: float
    """Price of the replica's devices."""

    @property
    def fits(self) -> bool:
        return all(s.memory_bytes <= s.capacity_bytes for s in self.stages)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Predicted behaviour of a whole plan."""

    replicas: tuple[ReplicaPrediction, ...]
    """Per replica."""
    ttft_s: float
    """Worst replica's time to first token."""
    tpot_s: float
    """Worst replica's time per output token."""
    latency_s: float
    """Worst replica's end-to-end latency."""
    throughput_tokens_per_s: float
    """Output tokens per second, summed over replicas."""
    requests_per_s: float
    """Requests per second the plan sustains."""
    price_per_hour: float
    """Price of the devices the plan uses."""
    tokens_per_dollar: float
    """Output tokens per dollar."""
    memory_bytes: dict[int, float]
    """Peak memory per used device (global index)."""
    capacity_bytes: dict[int, float]
    """Usable memory per used device."""

    @property
    def fits(self) -> bool:
        return all(self.memory_bytes[d] <= self.capacity_bytes[d] for d in self.memory_bytes)

    def meets(self, workload: Workload) -> bool:
        """Latency within the SLO and rate covered, where the workload sets them."""
        if workload.slo_s is not None and self.latency_s > workload.slo_s:
            return False
        return workload.rate_per_s is None or self.requests_per_s >= workload.rate_per_s

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (what a saved plan carries)."""
        return {
            "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "latency_s": self.latency_s,
            "throughput_tokens_per_s": self.throughput_tokens_per_s, "requests_per_s": self.requests_per_s,
            "price_per_hour": self.price_per_hour, "tokens_per_dollar": self.tokens_per_dollar,
            "peak_memory_bytes": max(self.memory_bytes.values(), default=0.0),
            "replicas": [{
                "ttft_s": r.ttft_s, "tpot_s": r.tpot_s, "latency_s": r.latency_s,
                "throughput_tokens_per_s": r.throughput_tokens_per_s, "microbatches": r.microbatches,
                "microbatch": r.microbatch,
                "stages": [{"prefill_s": s.prefill_s, "decode_s": s.decode_s, "busy_s": s.busy_s,
                            "memory_bytes": s.memory_bytes, "capacity_bytes": s.capacity_bytes}
                           for s in r.stages],
            } for r in self.replicas],
        }


def tokens_per_dollar(throughput_tokens_per_s: float, price_per_hour: float) -> float:
    """Output tokens bought by one dollar (infinite on free devices)."""
    if price_per_hour <= 0:
        return math.inf if throughput_tokens_per_s > 0 else 0.0
    return 3600.0 * throughput_tokens_per_s / price_per_hour


def predict_replica(replica, cfg: ModelConfig, cluster, workload: Workload, dtype_bytes: int = 2,
                    link_shares: dict | None = None) -> ReplicaPrediction:
    """Evaluate one replica (a :class:`hexjax.plan.Replica`) with the formulas above.

    Of the microbatch options, the one that fits with the lowest latency wins
    (if none fits, the one with the least peak memory is reported). ``link_shares``
    (see :func:`link_shares`) divides a network link's bandwidth among the replicas
    whose hops cross it.
    """
    options = [_predict_replica(replica, cfg, cluster, workload, dtype_bytes, mb, b, link_shares)
               for mb, b in microbatch_options(workload.batch, len(replica.stages))]
    fitting = [p for p in options if p.fits]
    if fitting:
        return min(fitting, key=lambda p: p.latency_s)
    return min(options, key=lambda p: max(s.memory_bytes - s.capacity_bytes for s in p.stages))


# predictions of many plans (the exhaustive search, explain) meet the same stages again and again
_stage_cost_memo = functools.lru_cache(maxsize=1 << 16)(stage_cost)


def link_key(cluster, a: int, b: int) -> tuple:
    """The physical link a hop between hosts ``a`` and ``b`` crosses: an explicit ``[[network.link]]`` of the
    pair, else the wide-area link between their zones, else (one zone) the pair's own path."""
    ha, hb = cluster.hosts[a], cluster.hosts[b]
    pair = frozenset((ha.name, hb.name))
    if any(frozenset((l.a, l.b)) == pair for l in cluster.links):
        return ("link", pair)
    if ha.zone != hb.zone:
        return ("zones", frozenset((ha.zone, hb.zone)))
    return ("hosts", pair)


def replica_links(replica, cluster) -> set:
    """The network links (:func:`link_key`) a replica's hops cross, the token's way back included."""
    hosts = [cluster.host_of(st.devices[0]) for st in replica.stages]
    P = len(hosts)
    pairs = [(hosts[k - 1], hosts[k]) for k in range(1, P)] + ([(hosts[-1], hosts[0])] if P > 1 else [])
    return {link_key(cluster, a, b) for a, b in pairs if a != b}


def link_shares(plan, cluster) -> dict:
    """``{link: replicas}``: how many of ``plan``'s replicas send hops over each network link.

    With batches served back to back every replica keeps its hops going, so the worst case, which
    :func:`predict` assumes with ``contention=True``, is each of them getting ``1 / replicas`` of the link.
    """
    out: dict = {}
    for rep in plan.replicas:
        for key in replica_links(rep, cluster):
            out[key] = out.get(key, 0) + 1
    return out


def _predict_replica(replica, cfg, cluster, workload, dtype_bytes, mb, b, shares=None,
                     serving: bool = False, table_tokens: int | None = None) -> ReplicaPrediction:
    stages = replica.stages
    P = len(stages)
    hosts = [cluster.host_of(st.devices[0]) for st in stages]

    def bandwidth(a, c):
        bw = cluster.host_bandwidth(a, c)
        return bw / shares.get(link_key(cluster, a, c), 1) if shares and a != c else bw

    pre_b, dec_b, tok_b = hop_bytes(cfg, workload, b, dtype_bytes)
    # the serving engine's step (``serving``) on a profile with its terms: the driving host's work per pass,
    # on the first stage, and measured copies between stages of one host
    driver = cluster.hosts[hosts[0]].device.profile if serving else None
    host_work = driver.host_s(b) if driver is not None and (driver.host_pass_s or driver.host_row_s) else None
    preds, pre, dec = [], [], []
    for k, st in enumerate(stages):
        host = cluster.hosts[hosts[k]]
        c = _stage_cost_memo(cfg, host.device, host.intra_bandwidth_Bps, host.intra_latency_s,
                             st.layers[1] - st.layers[0], st.dp, st.tp, k == 0, k == P - 1, mb, b, workload,
                             dtype_bytes, **({"serving": True, "table_tokens": table_tokens} if serving else {}))
        w_pre, w_dec = c.prefill_s, c.decode_s
        if k == 0 and host_work is not None:
            w_pre, w_dec = w_pre + host_work, w_dec + host_work
        if k > 0:
            prof = host.device.profile if serving else None
            if hosts[k - 1] == hosts[k] and prof is not None and prof.copy_Bps > 0:
                # a copy between two meshes of one host, measured: a fixed cost (as the engine issues it,
                # behind the sending program, where measured), then every row goes to each of the stage's
                # tp devices, one copy after another (the host moves them all)
                fixed = prof.chained_copy_s or prof.copy_latency_s
                w_pre = fixed + pre_b * st.tp / prof.copy_Bps + w_pre
                w_dec = fixed + dec_b * st.tp / prof.copy_Bps + w_dec
            else:
                bw, lat = bandwidth(hosts[k - 1], hosts[k]), cluster.host_latency(hosts[k - 1], hosts[k])
                w_pre = hop_s(pre_b, bw, lat) + w_pre
                w_dec = hop_s(dec_b, bw, lat) + w_dec
        # the token's way back; on one host with the host term measured it is that term's (the tokens
        # are read back and fed as the next pass's input)
        if k == P - 1 and P > 1 and not (host_work is not None and hosts[k] == hosts[0]):
            bw, lat = bandwidth(hosts[k], hosts[0]), cluster.host_latency(hosts[k], hosts[0])
            w_dec = w_dec + hop_s(tok_b, bw, lat)
        w = busy_s(w_pre, w_dec, workload)
        pre.append(w_pre)
        dec.append(w_dec)
        preds.append(StagePrediction(host.name, tuple(st.layers), st.dp, st.tp, w_pre, w_dec, w,
                                     c.memory_bytes, c.weight_bytes, c.kv_bytes, c.activation_bytes,
                                     c.capacity_bytes))
    ttft, tpot, latency = replica_times(pre, dec, mb, workload.output_len)
    price = sum(cluster.device(d).price_per_hour for st in stages for d in st.devices)
    return ReplicaPrediction(tuple(preds), mb, b, ttft, tpot, latency, workload.batch * workload.output_len / latency,
                             workload.batch / latency, price)


def predict(plan, cfg: ModelConfig, cluster, workload: Workload, contention: bool = False) -> Prediction:
    """Evaluate every replica of ``plan`` and combine them.

    ``contention=True`` shares each network link's bandwidth among the replicas whose hops cross it
    (:func:`link_shares`); the search and its oracle compare replicas one by one, without it.
    """
    dtype_bytes = plan.dtype_bytes
    shares = link_shares(plan, cluster) if contention else None
    reps = tuple(predict_replica(r, cfg, cluster, workload, dtype_bytes, shares) for r in plan.replicas)
    memory, capacity = {}, {}
    for rep, rp in zip(plan.replicas, reps):
        for st, sp in zip(rep.stages, rp.stages):
            for d in st.devices:
                memory[d] = sp.memory_bytes
                capacity[d] = sp.capacity_bytes
    thr = sum(r.throughput_tokens_per_s for r in reps)
    price = sum(r.price_per_hour for r in reps)
    worst = (lambda f: max((f(r) for r in reps), default=0.0))
    return Prediction(reps, worst(lambda r: r.ttft_s), worst(lambda r: r.tpot_s), worst(lambda r: r.latency_s),
                      thr, sum(r.requests_per_s for r in reps), price, tokens_per_dollar(thr, price),
                      memory, capacity)
