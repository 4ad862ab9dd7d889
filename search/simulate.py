"""Discrete-event simulation of a plan serving a request trace with continuous batching.

Each replica runs iterations back to back, as the serving engine does: an
iteration takes one decode step of every request already decoding and
prefills prompt tokens, and lasts::

    prefill_s(prompt chunks) + decode_s(decoding contexts)

(0 for a part with no requests). With ``max_step_tokens`` an iteration
feeds at most that many tokens (the engine's chunked prefill): one per
decoding request, then the next chunk of prompts already being prefilled,
then waiting requests that have arrived, which join free slots
(``max_batch`` per replica) while their KV pages fit; a prompt longer than
what is left goes on in the next iterations. Without it, whole prompts join.
At the end of an iteration every request whose prompt is done has its first
token and every decoding one its next; a request with all its tokens leaves
and frees its pages. A replica with nothing to do waits for the next arrival.
Replicas run independently (their own devices); when several are free at one
moment, each waiting request goes, in arrival order, to the allowed free
replica with the most free slots, then the most free pages, then the lowest
index (the engine's rule), and a replica whose head request does not fit
takes no later one (first come, first served per replica).

A request reserves the pages of its whole sequence (prompt plus output, in
``page_tokens`` pages) when it joins, so the simulation never preempts; one
that no allowed replica could hold even when empty is rejected and counts
as a miss. Which replicas may serve a request: the plan's routing table when
``routing="plan"`` and it has one, else any.

Step times come from a :class:`StepTimes`: :class:`CostModelStepTimes` (the
cost model's per-stage times at the rows actually running, summed over the
stages with their hops: the engine sends each iteration through the stages
as one microbatch) or :class:`FixedStepTimes` (constants, for closed-form
checks and measured profiles). The cost model costs each part as the serving
engine runs it (``serving=True``): where a device profile measured them
(``hexjax calibrate``), the engine's host work per pass and per request row
is added to the prefill part and to the decode part (an iteration that does
both runs two passes), and hops between stages of one host take the measured
copy figures.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Protocol, Sequence

import numpy as np

from hexjax.errors import ConfigError
from hexjax.search import cost
from hexjax.trace import Trace
from hexjax.workload import Workload


DEFAULT_STEP_TOKENS = 2048
"""Tokens one iteration feeds by default in :func:`simulate_plan` (decode rows plus prefill chunks)."""


# ---------------------------------------------------------------------------- step times

class StepTimes(Protocol):
    """Seconds one replica's iteration parts take."""

    def prefill_s(self, replica: int, prompt_lens: Sequence[int]) -> float:
        """Prefill of requests with these prompt lengths, together."""

    def decode_s(self, replica: int, contexts: Sequence[int]) -> float:
        """One decode step of requests whose caches hold these many tokens."""


@dataclasses.dataclass(frozen=True)
class FixedStepTimes:
    """Every prefill takes ``prefill`` s and every decode step ``decode`` s, whatever the batch
    (one value for all replicas, or a tuple with one per replica)."""

    prefill: float | tuple[float, ...]
    decode: float | tuple[float, ...]

    def prefill_s(self, replica: int, prompt_lens: Sequence[int]) -> float:
        return self.prefill[replica] if isinstance(self.prefill, tuple) else self.prefill

    def decode_s(self, replica: int, contexts: Sequence[int]) -> float:
        return self.decode[replica] if isinstance(self.decode, tuple) else self.decode


class CostModelStepTimes:
    """The cost model's times of one replica's iteration at the batch running.

    A prefill of ``r`` requests is costed as ``r`` rows of their mean prompt
    (rounded up to a multiple of ``quantum``); a decode step as ``r`` rows at
    their mean context (rounded to ``quantum``): decode FLOPs and KV bytes are
    linear in the context, so the mean is exact for a batch up to the
    rounding. Both are the replica's time (``cost.replica_times``: TTFT for
    prefill, TPOT for one step), hops included, with one microbatch, as the
    serving engine runs an iteration; ``pipelined=True`` instead takes the
    better of the cost model's microbatch cuts (``cost.microbatch_options``),
    as a runtime that streams an iteration's microbatches through the stages
    would (HexGen's does). ``serving=False`` leaves out the serving engine's
    host work and measured copies (the planner's cost of a step).

    ``prefill_widths``, ``row_buckets`` and ``chunk_row_buckets`` cost the
    padded shapes a runtime compiles instead of the exact ones (see
    :func:`engine_shapes`): a prefill of ``r`` chunks as the smallest of
    ``chunk_row_buckets`` (default: ``row_buckets``) holding ``r`` rows, each
    of the narrowest width holding the longest chunk (the serving engine pads
    every chunk of a step to one width), and a decode step at the smallest of
    ``row_buckets`` holding its rows. Empty: exact shapes. ``table_tokens``:
    the keys of the engine's block tables, which its chunk attention reads
    (the profile's chunk term; None: no such term).
    """

    def __init__(self, plan, cfg, cluster, quantum: int = 8, pipelined: bool = False, serving: bool = True,
                 prefill_widths: Sequence[int] = (), row_buckets: Sequence[int] = (),
                 chunk_row_buckets: Sequence[int] = (), table_tokens: int | None = None):
        self.plan, self.cfg, self.cluster, self.quantum = plan, cfg, cluster, quantum
        self.table_tokens = table_tokens
        self.pipelined, self.serving = pipelined, serving
        self.widths, self.rows = tuple(sorted(prefill_widths)), tuple(sorted(row_buckets))
        self.chunk_rows = tuple(sorted(chunk_row_buckets)) or self.rows
        self._memo: dict[tuple, float] = {}

    @staticmethod
    def _bucket(n: int, buckets: tuple[int, ...]) -> int:
        return next((b for b in buckets if b >= n), max(n, buckets[-1])) if buckets else n

    def _time(self, replica: int, rows: int, prompt: int, output: int, field: str) -> float:
        rep = self.plan.replicas[replica]
        cuts = cost.microbatch_options(rows, len(rep.stages)) if self.pipelined else [(1, rows)]
        return min(getattr(cost._predict_replica(rep, self.cfg, self.cluster, Workload(prompt, output, rows),
                                                 self.plan.dtype_bytes, mb, b, serving=self.serving,
                                                 table_tokens=self.table_tokens), field)
                   for mb, b in cuts)

    def prefill_s(self, replica: int, prompt_lens: Sequence[int]) -> float:
        q = self.quantum
        if self.widths:
            s = self._bucket(max(prompt_lens), self.widths)
        else:
            s = max(q, -(-math.ceil(sum(prompt_lens) / len(prompt_lens)) // q) * q)
        rows = self._bucket(len(prompt_lens), self.chunk_rows)
        key = ("p", replica, rows, s)
        if key not in self._memo:
            self._memo[key] = self._time(replica, rows, s, 1, "ttft_s")
        return self._memo[key]

    def decode_s(self, replica: int, contexts: Sequence[int]) -> float:
        q = self.quantum
        c = max(q, int(round(sum(contexts) / len(contexts) / q)) * q)
        rows = self._bucket(len(contexts), self.rows)
        key = ("d", replica, rows, c)
        if key not in self._memo:
            # a workload of prompt c - 1 and 2 outputs has its one decode step at context c
            self._memo[key] = self._time(replica, rows, c - 1, 2, "tpot_s")
        return self._memo[key]


def engine_shapes(max_batch: int, max_model_len: int, max_step_tokens: int, page_tokens: int = cost.KV_PAGE_TOKENS,
                  unit: int = 1) -> dict:
    """The padded shapes ``hexjax.serve.Engine`` compiles, as :class:`CostModelStepTimes` arguments: prefill
    chunk widths are page multiples doubling up to ``max_model_len`` (in pages); decode rows are ``unit``
    (the stages' dp least common multiple) times a power of two, prefill rows times a power of four, capped
    at ``max_batch``; block tables span ``max_model_len`` in whole pages. (Chunks of a step are also cut to
    at most ``max_step_tokens / rows`` wide, which the narrowest bucket holding them reflects.)"""
    top = -(-min(max_step_tokens, max_model_len) // page_tokens) * page_tokens
    widths, w = [], page_tokens
    while w < top:
        widths.append(w)
        w *= 2
    steps = range((max_batch // unit).bit_length() + 1)
    return {"prefill_widths": tuple(widths + [top]),
            "row_buckets": tuple(sorted({min(unit << k, max_batch) for k in steps})),
            "chunk_row_buckets": tuple(sorted({min(unit << 2 * k, max_batch) for k in steps})),
            "table_tokens": -(-max_model_len // page_tokens) * page_tokens}


ENGINE_MAX_BATCH = 32
"""Rows per replica of :class:`hexjax.serve.Engine` unless told (its ``DEFAULT_MAX_BATCH``; kept here so that
costing the engine's shapes does not load JAX)."""


def engine_settings(plan, cfg, max_batch: int | None = None, max_model_len: int | None = None,
                    max_step_tokens: int | None = None) -> tuple[int, int, int]:
    """``(max_batch, max_model_len, max_step_tokens)`` as :class:`hexjax.serve.Engine` settles them for
    ``plan`` and ``cfg`` from these arguments (None: the engine's defaults: ``ENGINE_MAX_BATCH`` rows rounded
    up to a multiple of every stage's dp, the model's context, ``max(512, 2 max_batch)`` tokens), with the
    engine's checks."""
    unit = math.lcm(*(st.dp for rep in plan.replicas for st in rep.stages))
    if max_batch is None:
        max_batch = -(-ENGINE_MAX_BATCH // unit) * unit
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ConfigError(f"max_batch must be a positive number of rows, got {max_batch!r}")
    if max_batch % unit:
        raise ConfigError(f"the serving engine needs max_batch ({max_batch}) to be a multiple of every stage's dp "
                          f"(here {unit}); give a multiple of {unit}")
    if max_model_len is not None and (isinstance(max_model_len, bool) or not isinstance(max_model_len, int)
                                      or max_model_len < 1):
        raise ConfigError(f"max_model_len must be a positive number of tokens, got {max_model_len!r}")
    length = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    tokens = max(512, 2 * max_batch) if max_step_tokens is None else max_step_tokens
    if tokens <= max_batch:
        raise ConfigError(f"max_step_tokens ({tokens}) must exceed max_batch ({max_batch}): every decoding row "
                          "takes one token of a step")
    return max_batch, length, tokens


class _ByReplica:
    """Step times of each replica from its own :class:`StepTimes`."""

    def __init__(self, times: Sequence[StepTimes]):
        self.times = list(times)

    def prefill_s(self, replica: int, prompt_lens: Sequence[int]) -> float:
        return self.times[replica].prefill_s(replica, prompt_lens)

    def decode_s(self, replica: int, contexts: Sequence[int]) -> float:
        return self.times[replica].decode_s(replica, contexts)


def engine_step_times(plan, cfg, cluster, max_batch: int, max_model_len: int, max_step_tokens: int,
                      **kw) -> StepTimes:
    """:class:`CostModelStepTimes` (``kw``: its other arguments) at the padded shapes
    :class:`hexjax.serve.Engine` compiles for ``plan`` with these settings (:func:`engine_settings` gives its
    defaults): :func:`engine_shapes`, each replica's rows in multiples of its own stages' dp."""
    by_unit: dict[int, CostModelStepTimes] = {}
    times = []
    for rep in plan.replicas:
        unit = math.lcm(*(st.dp for st in rep.stages))
        if unit not in by_unit:
            by_unit[unit] = CostModelStepTimes(plan, cfg, cluster, **kw, **engine_shapes(
                max_batch, max_model_len, max_step_tokens, unit=unit))
        times.append(by_unit[unit])
    return times[0] if len(by_unit) == 1 else _ByReplica(times)


class MeasuredStepTimes:
    """Step times measured on a serving engine: one decode step (whatever the rows: the engine's programs
    always run every slot), and a prefill per padded prompt width (a prefill takes the time of the
    narrowest measured width that holds its longest chunk)."""

    def __init__(self, decode_s: float, prefill_by_width: dict[int, float]):
        if not prefill_by_width:
            raise ConfigError("measured step times need at least one prefill width")
        self.decode, self.prefill = decode_s, dict(sorted(prefill_by_width.items()))

    @staticmethod
    def from_replay(replay, widths: Sequence[int]) -> "MeasuredStepTimes":
        """Mean step times of a replayed run (``hexjax.trace.replay``), by what each step did: steps that
        only decoded give the decode step; a step that gave first tokens prefilled its new prompts at the
        width of the longest (less one decode step when it also decoded). Means, not medians: a run's
        length is the sum of its steps."""
        steps = replay.steps
        decode = [dt for dt, outs in steps if outs and all(n > 1 for _, n in outs)]
        if not decode:
            raise ConfigError("the replayed run has no step that only decoded; replay more requests")
        d = sum(decode) / len(decode)
        prefill: dict[int, list[float]] = {}
        for dt, outs in steps:
            new = [p for p, n in outs if n == 1]
            if new:
                w = next((w for w in sorted(widths) if w >= max(new)), max(widths))
                prefill.setdefault(w, []).append(dt - (d if any(n > 1 for _, n in outs) else 0.0))
        return MeasuredStepTimes(d, {w: sum(v) / len(v) for w, v in prefill.items()})

    def prefill_s(self, replica: int, prompt_lens: Sequence[int]) -> float:
        longest = max(prompt_lens)
        return next((t for w, t in self.prefill.items() if w >= longest), list(self.prefill.values())[-1])

    def decode_s(self, replica: int, contexts: Sequence[int]) -> float:
        return self.decode


def kv_capacity_pages(plan, cfg, cluster, step_tokens: int, page_tokens: int = cost.KV_PAGE_TOKENS) -> list[int]:
    """KV pages each replica can hold: per stage, the memory its devices have left after weights and the
    activation workspace of one iteration's prefill (``step_tokens`` tokens as one row, the cost model's
    workspace of a prefill), in pages of every layer, times its ``dp`` rows (less one reserved page per
    row); the replica's is its stages' least."""
    out = []
    e = plan.dtype_bytes
    for rep in plan.replicas:
        least = math.inf
        for k, st in enumerate(rep.stages):
            host = cluster.hosts[cluster.host_of(st.devices[0])]
            f = cost.stage_figures(cfg, st.num_layers, st.dp, st.tp, k == 0, k == len(rep.stages) - 1, 1, 1,
                                   Workload(step_tokens, 1, 1), e)
            free = cost.usable_memory_bytes(host.device) - f.weight_bytes - f.activation_bytes
            page = st.num_layers * page_tokens * 2 * cost.kv_heads_per_device(cfg, st.tp) * cfg.head_dim * e
            least = min(least, st.dp * max(0, int(free // page) - 1))
        out.append(int(least))
    return out


# ---------------------------------------------------------------------------- results

@dataclasses.dataclass(frozen=True)
class SLO:
    """Bounds a request must meet to count as served in time (None: not checked)."""

    latency_s: float | None = None
    """End-to-end: arrival to last token."""
    ttft_s: float | None = None
    """Arrival to first token."""
    tpot_s: float | None = None
    """Mean time per output token after the first."""

    def met(self, r: "RequestRecord") -> bool:
        if r.replica < 0:
            return False
        return ((self.latency_s is None or r.latency_s <= self.latency_s)
                and (self.ttft_s is None or r.ttft_s <= self.ttft_s)
                and (self.tpot_s is None or r.output_len < 2 or r.tpot_s <= self.tpot_s))

    def describe(self) -> str:
        parts = [f"{name} <= {v * 1e3:g} ms" for name, v in
                 (("latency", self.latency_s), ("TTFT", self.ttft_s), ("TPOT", self.tpot_s)) if v is not None]
        return ", ".join(parts) or "none"


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """What happened to one request (``replica`` -1: rejected, times NaN)."""

    prompt_len: int
    output_len: int
    arrival_s: float
    replica: int
    first_token_s: float
    finish_s: float

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def latency_s(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        """Mean gap between output tokens (NaN with one output token)."""
        return (self.finish_s - self.first_token_s) / (self.output_len - 1) if self.output_len > 1 else math.nan


@dataclasses.dataclass(frozen=True)
class SimResult:
    """A simulated run: every request's record and the SLO it is judged by."""

    records: tuple[RequestRecord, ...]
    slo: SLO
    iterations: tuple[int, ...] = ()
    """Iterations each replica ran."""

    @property
    def served(self) -> list[RequestRecord]:
        return [r for r in self.records if r.replica >= 0]

    @property
    def rejected(self) -> int:
        return sum(r.replica < 0 for r in self.records)

    @property
    def attainment(self) -> float:
        """Share of all requests (rejected ones included) that met the SLO."""
        return sum(self.slo.met(r) for r in self.records) / len(self.records)

    @property
    def makespan_s(self) -> float:
        """First arrival to last finish."""
        served = self.served
        if not served:
            return 0.0
        return max(r.finish_s for r in served) - min(r.arrival_s for r in self.records)

    @property
    def throughput_tokens_per_s(self) -> float:
        span = self.makespan_s
        return sum(r.output_len for r in self.served) / span if span > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        span = self.makespan_s
        return len(self.served) / span if span > 0 else 0.0

    def percentile(self, what: str, q: float) -> float:
        """``q``-th percentile (0-100) of ``ttft``, ``tpot`` or ``latency`` over served requests, seconds."""
        xs = [getattr(r, f"{what}_s") for r in self.served]
        xs = [x for x in xs if not math.isnan(x)]
        return float(np.percentile(xs, q)) if xs else math.nan

    def per_replica(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for r in self.served:
            out[r.replica] = out.get(r.replica, 0) + 1
        return dict(sorted(out.items()))

    def to_dict(self) -> dict:
        return {"requests": len(self.records), "rejected": self.rejected, "slo": self.slo.describe(),
                "attainment": self.attainment, "throughput_tokens_per_s": self.throughput_tokens_per_s,
                "requests_per_s": self.requests_per_s, "makespan_s": self.makespan_s,
                **{f"{w}_{q}_s": _finite(self.percentile(w, q)) for w in ("ttft", "tpot", "latency")
                   for q in (50, 99)},
                "requests_per_replica": {str(k): v for k, v in self.per_replica().items()}}


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


# ---------------------------------------------------------------------------- the simulation

@dataclasses.dataclass
class _Replica:
    index: int
    pages: int
    prefilling: dict = dataclasses.field(default_factory=dict)  # request -> prompt tokens computed (join order)
    decoding: dict = dataclasses.field(default_factory=dict)    # request -> tokens produced
    used_pages: int = 0
    busy: bool = False
    chunks: list = dataclasses.field(default_factory=list)      # this iteration's (request, prompt tokens)
    stepping: list = dataclasses.field(default_factory=list)    # this iteration's decoding requests

    def slots(self, max_batch: int) -> int:
        return max_batch - len(self.prefilling) - len(self.decoding)


def simulate(trace: Trace, num_replicas: int, step_times: StepTimes, *, max_batch: int,
             kv_pages: Sequence[int] | None = None, route=None, slo: SLO = SLO(),
             max_step_tokens: int | None = None, page_tokens: int = cost.KV_PAGE_TOKENS) -> SimResult:
    """Serve ``trace`` (with arrival times) on ``num_replicas`` replicas; see the module docstring.

    ``kv_pages``: pages per replica (None: unlimited); ``route(prompt_len, output_len)`` returns the
    replicas allowed to serve a request (None: any); ``max_step_tokens`` bounds the tokens one
    iteration feeds (one per decoding request, the rest prompt chunks; None: whole prompts).
    """
    if not trace.timed:
        raise ConfigError(f"{trace.name}: the requests carry no arrival times; give a rate (--rate) "
                          "or a trace with arrival_s on every line")
    if max_batch < 1:
        raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
    if max_step_tokens is not None and max_step_tokens <= max_batch:
        raise ConfigError(f"max_step_tokens ({max_step_tokens}) must exceed max_batch ({max_batch}): every "
                          "decoding request takes one token of an iteration")
    reqs = trace.requests
    pages = [math.inf] * num_replicas if kv_pages is None else list(kv_pages)
    if len(pages) != num_replicas:
        raise ConfigError(f"kv_pages has {len(pages)} entries for {num_replicas} replicas")
    reps = [_Replica(i, p) for i, p in enumerate(pages)]
    need = [-(-r.context_len // page_tokens) for r in reqs]
    allowed = []
    for r in reqs:
        a = None if route is None else route(r.prompt_len, r.output_len)
        allowed.append(tuple(range(num_replicas)) if a is None else tuple(a))
    first = [math.nan] * len(reqs)
    finish = [math.nan] * len(reqs)
    where = [-1] * len(reqs)
    waiting: list[int] = []
    next_arrival, done = 0, 0
    ends: list[tuple[float, int]] = []          # (iteration end, replica)
    unbounded = max_step_tokens is None
    iterations = [0] * num_replicas
    while done < len(reqs):
        t = min(ends[0][0] if ends else math.inf,
                reqs[next_arrival].arrival_s if next_arrival < len(reqs) else math.inf)
        if t == math.inf:
            raise AssertionError("simulation stalled with requests waiting")   # cannot happen: see rejection
        # iterations that end now hand out their tokens
        while ends and ends[0][0] == t:
            _, ri = heapq.heappop(ends)
            rep = reps[ri]
            produced = list(rep.stepping)
            for i in rep.stepping:
                rep.decoding[i] += 1
            for i, n in rep.chunks:
                rep.prefilling[i] += n
                if rep.prefilling[i] == reqs[i].prompt_len:
                    del rep.prefilling[i]
                    rep.decoding[i] = 1
                    first[i] = t
                    produced.append(i)
            for i in produced:
                if rep.decoding[i] >= reqs[i].output_len:
                    finish[i] = t
                    del rep.decoding[i]
                    rep.used_pages -= need[i]
                    done += 1
            rep.chunks, rep.stepping, rep.busy = [], [], False
        while next_arrival < len(reqs) and reqs[next_arrival].arrival_s <= t:
            i = next_arrival
            next_arrival += 1
            if not any(need[i] <= reps[r].pages for r in allowed[i]):
                done += 1                       # no allowed replica could ever hold it
                continue
            waiting.append(i)
        free = [rep for rep in reps if not rep.busy]
        if not free:
            continue
        # each free replica's budget: decoding rows first, then the prompts it is already prefilling
        budget = {}
        for rep in free:
            rep.stepping = list(rep.decoding)
            left = math.inf if unbounded else max_step_tokens - len(rep.stepping)
            for i, done_tokens in rep.prefilling.items():
                n = min(reqs[i].prompt_len - done_tokens, left)
                if n < 1:
                    break
                rep.chunks.append((i, n))
                left -= n
            budget[rep.index] = left
        # then waiting requests join (the engine's rule: most free slots, then pages, then lowest index)
        closed: set[int] = set()
        admitted = set()
        for i in waiting:
            best = None
            for ri in allowed[i]:
                rep = reps[ri]
                if rep.busy or ri in closed:
                    continue
                slots = rep.slots(max_batch)
                if slots < 1 or budget[ri] < 1 or rep.used_pages + need[i] > rep.pages:
                    closed.add(ri)              # first come, first served on this replica
                    continue
                score = (slots, rep.pages - rep.used_pages, -ri)
                if best is None or score > best[0]:
                    best = (score, rep)
            if best is None:
                continue
            rep = best[1]
            n = min(reqs[i].prompt_len, budget[rep.index])
            rep.prefilling[i] = 0
            rep.chunks.append((i, n))
            budget[rep.index] -= n
            rep.used_pages += need[i]
            where[i] = rep.index
            admitted.add(i)
        if admitted:
            waiting = [i for i in waiting if i not in admitted]
        for rep in free:
            if not rep.chunks and not rep.stepping:
                continue
            dur = 0.0
            if rep.chunks:
                dur += step_times.prefill_s(rep.index, [n for _, n in rep.chunks])
            if rep.stepping:
                dur += step_times.decode_s(rep.index, [reqs[i].prompt_len + rep.decoding[i] for i in rep.stepping])
            if not dur > 0:
                raise ConfigError(f"replica {rep.index}: an iteration took {dur!r} s; step times must be positive")
            rep.busy = True
            iterations[rep.index] += 1
            heapq.heappush(ends, (t + dur, rep.index))
    records = tuple(RequestRecord(r.prompt_len, r.output_len, r.arrival_s, where[i], first[i], finish[i])
                    for i, r in enumerate(reqs))
    return SimResult(records, slo, tuple(iterations))


# ---------------------------------------------------------------------------- a plan on a cluster

def simulate_plan(plan, cfg, cluster, trace: Trace, slo: SLO = SLO(), *, max_batch: int | None = None,
                  routing: str = "plan", step_times: StepTimes | None = None,
                  max_step_tokens: int = DEFAULT_STEP_TOKENS, pipelined: bool = False) -> SimResult:
    """Simulate ``plan`` serving ``trace`` with the cost model's step times and KV capacity.

    ``max_batch``: slots per replica (default: the plan's workload batch, else 8). ``routing``:
    ``"plan"`` follows the plan's routing table if it has one, ``"load"`` lets any replica serve any request.
    ``max_step_tokens``: tokens one iteration feeds (chunked prefill); it also sets the activation workspace
    that the KV capacity leaves room for. ``pipelined``: see :class:`CostModelStepTimes`.
    """
    if routing not in ("plan", "load"):
        raise ConfigError(f"routing must be 'plan' or 'load', got {routing!r}")
    trace.check_model(cfg)
    if max_batch is None:
        max_batch = plan.workload.batch if plan.workload is not None else 8
    if max_step_tokens <= max_batch:
        raise ConfigError(f"max_step_tokens ({max_step_tokens}) must exceed max_batch ({max_batch}): every "
                          "decoding request takes one token of an iteration")
    pages = kv_capacity_pages(plan, cfg, cluster, max_step_tokens)
    st = step_times or CostModelStepTimes(plan, cfg, cluster, pipelined=pipelined)
    route = plan.route if routing == "plan" and plan.routing is not None else None
    return simulate(trace, len(plan.replicas), st, max_batch=max_batch, kv_pages=pages, route=route, slo=slo,
                    max_step_tokens=max_step_tokens)


def attainment_curve(plan, cfg, cluster, trace: Trace, rates: Sequence[float], slo: SLO, *,
                     num_requests: int | None = None, seed: int = 0, **kw) -> list[tuple[float, SimResult]]:
    """:func:`simulate_plan` at each Poisson rate (the trace's sizes, arrivals drawn with ``seed``)."""
    return [(r, simulate_plan(plan, cfg, cluster, trace.with_rate(r, seed, num_requests), slo, **kw))
            for r in rates]


def draw_curves(curves: dict[str, list[tuple[float, SimResult]]], path, title: str = "") -> str:
    """SLO attainment against request rate, one line per plan, saved to ``path`` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in curves.items():
        ax.plot([r for r, _ in pts], [100 * res.attainment for _, res in pts], marker="o", label=label)
    slo = next(iter(curves.values()))[0][1].slo.describe() if curves else ""
    ax.set_xlabel("request rate (requests/s)")
    ax.set_ylabel(f"SLO attainment (%)  [{slo}]")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
