"""A serving engine over a plan's stage programs: continuous batching with a paged KV cache.

Each replica of the plan has ``max_batch`` rows (slots) and per stage one page
pool.  One scheduling iteration (``Engine.step``):

1. running rows that need another page for their next token get it; when a
   stage's pool (its data-parallel range) is out of pages, the youngest request
   there is **preempted**: its pages are freed and it goes back to the head of
   the queue, to be recomputed (prompt plus the tokens it already has) later;
2. each replica's step feeds at most ``max_step_tokens`` tokens (chunked
   prefill): one per decoding row, then the next chunk of prompts being
   prefilled, then waiting requests, which join free slots on the replica with
   the most free slots (then pages) when their pages fit; a prompt longer than
   the budget left is cut into chunks over several steps, so a long prompt
   never holds back the running rows' next token;
3. per replica, the chunks are fed with the stage ``extend`` program (it
   attends over each row's cached pages and its chunk) and the decoding rows
   take one ``decode`` step, each packed into as few rows as hold them (a
   power-of-two row bucket, rows in the data-parallel groups of their slots;
   unused rows point at the reserved page, so other caches are untouched);
   every replica's work is issued before any result is read;
4. each row's next token is sampled with its own parameters (key
   ``request_key(seed, 0, step)``, so a seed gives the same tokens whatever the
   batch mates), and finished sequences (EOS, stop token ids, ``max_tokens``,
   the context limit) free their pages at once.

``Engine.generate`` runs requests to the end; ``Engine.stream`` is an async
iterator fed by a background thread (``Engine.start``).

Steps 1-2 only decide; what the programs take from the host is gathered into
``StepCall``s first and then run (``Engine.run``), so that with stages on
several processes, process 0 can hand each step's calls to the others
(``hexjax.serve.multiprocess``).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import itertools
import math
import random
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hexjax.errors import ConfigError
from hexjax.models.config import ModelConfig
from hexjax.models.sampling import request_key
from hexjax.runtime.pages import PageAllocator, pages_for
from hexjax.serve.text import TextStream


# ----------------------------------------------------------------------------- parameters and results

@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded and when it stops."""

    max_tokens: int = 16
    """Most new tokens."""
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one (after top-k and top-p); 0: off."""
    seed: int | None = None
    """Seed of the request's random stream (token ``t`` uses ``request_key(seed, 0, t)``); None: a random one."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end the sequence (kept in the output, as the EOS token is)."""
    stop: tuple[str, ...] = ()
    """Strings that end the sequence: the text is cut before the first one (which is not returned; the
    tokens stay).  Needs an engine with a ``detokenize`` function."""
    ignore_eos: bool = False
    """Do not stop at the engine's EOS token."""
    min_tokens: int = 0
    """Tokens generated before EOS or a stop token may come (they are masked until then)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated (OpenAI's presence penalty)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was already generated."""
    logprobs: int | None = None
    """Return each generated token's log-probability (under the model's unmodified distribution) and
    the ``logprobs`` most likely alternatives (0-20); None: none."""

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(x, str) and x for x in stop):
            raise ConfigError(f"stop must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ConfigError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ConfigError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ConfigError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ConfigError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.seed is not None and not 0 <= self.seed < 2 ** 31:
            raise ConfigError(f"seed must be in [0, 2**31), got {self.seed}")


@dataclasses.dataclass
class RequestOutput:
    """What one step produced for one request (or its final state)."""

    request_id: int
    new_token_ids: list[int]
    """Tokens generated since the last output of this request."""
    token_ids: list[int]
    """Every token generated so far."""
    prompt_len: int
    finished: bool
    finish_reason: str | None = None
    """"stop" (EOS or a stop token), "length" (max_tokens or the context), "abort"."""
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    """With ``SamplingParams.logprobs``: per token of ``token_ids``, (its logprob, [(token, logprob)] of
    the most likely ones)."""
    new_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    """The same for ``new_token_ids``."""
    text: str | None = None
    """With an engine that detokenizes: the text sent so far (all of it, cut at a stop string, once
    finished); text that may still begin a stop string is held back until it cannot."""
    new_text: str | None = None
    """The text added since the last output of this request."""


@dataclasses.dataclass(eq=False)
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    order: int
    """Arrival order; the largest running one is the youngest, preempted first."""
    arrival: float
    output: list[int] = dataclasses.field(default_factory=list)
    replica: int | None = None
    slot: int | None = None
    finished: bool = False
    finish_reason: str | None = None
    preemptions: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    emitted: int = 0
    computed: int = 0
    """Tokens of ``context`` whose keys and values are cached (prefill chunks done so far)."""
    decoding: bool = False
    """Prefill is done: each step feeds the last generated token."""
    logprobs: list = dataclasses.field(default_factory=list)
    callback: Callable[[RequestOutput], None] | None = None
    text: TextStream | None = None

    @property
    def context(self) -> list[int]:
        return self.prompt + self.output


# ----------------------------------------------------------------------------- sampling

def _filter_row(x, temp, k, p, m):
    """``hexjax.models.sampling.filter_logits`` for one row with traced parameters (same float ops)."""
    v = x.shape[-1]
    neg = jnp.float32(-jnp.inf)
    x = x.astype(jnp.float32) / jnp.where(temp > 0, temp, jnp.float32(1.0))
    kth = jnp.sort(x)[::-1][jnp.clip(k - 1, 0, v - 1)]
    x = jnp.where((k > 0) & (k < v) & (x < kth), neg, x)
    sorted_x = jnp.sort(x)[::-1]
    probs = jax.nn.softmax(sorted_x)
    before = jnp.cumsum(probs) - probs
    cutoff = jnp.min(jnp.where(before < p, sorted_x, jnp.inf))
    x = jnp.where((p < 1.0) & (x < cutoff), neg, x)
    return jnp.where((m > 0) & (x < jnp.max(x) + jnp.log(m)), neg, x)


@functools.partial(jax.jit, static_argnames=("top",))
def token_logprobs(logits, tokens, top: int):
    """Log-probabilities [B] of ``tokens`` and the ``top`` most likely (values [B, top], ids [B, top])."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    vals, ids = jax.lax.top_k(lp, max(top, 1))
    return chosen, vals, ids


@functools.partial(jax.jit, static_argnames=("any_sampled",))
def sample_rows(logits, seeds, steps, temps, top_ks, top_ps, any_sampled: bool, banned=None, counts=None,
                presence=None, frequency=None, min_ps=None):
    """Next token [B] of each row, each with its own parameters; greedy rows take the argmax.

    ``banned`` [B, N] (token ids, -1 = none) are masked; ``counts`` [B, V] (times each token was
    generated) with ``presence`` / ``frequency`` [B] penalise repeats.  Left out, the logits are untouched.
    """
    if counts is not None:
        logits = logits.astype(jnp.float32) - presence[:, None] * (counts > 0) - frequency[:, None] * counts
    if banned is not None:
        hit = (jnp.arange(logits.shape[-1])[None, None, :] == banned[:, :, None]).any(axis=1)
        logits = jnp.where(hit, jnp.asarray(-jnp.inf, logits.dtype), logits)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not any_sampled:
        return greedy

    def one(row, seed, step, t, k, p, m):
        return jax.random.categorical(request_key(seed, 0, step), _filter_row(row, t, k, p, m)).astype(jnp.int32)

    if min_ps is None:
        min_ps = jnp.zeros_like(top_ps)
    drawn = jax.vmap(one)(logits, seeds, steps, temps, top_ks, top_ps, min_ps)
    return jnp.where(temps > 0, drawn, greedy)


# ----------------------------------------------------------------------------- one replica

def _buckets(page_size: int, max_len: int) -> list[int]:
    """Prefill chunk widths: page multiples doubling up to ``max_len`` (rounded up to a page)."""
    top = pages_for(max_len, page_size) * page_size
    out, b = [], page_size
    while b < top:
        out.append(b)
        b *= 2
    return out + [top]


class ReplicaEngine:
    """One replica's stages, caches, page pools and ``max_batch`` slots."""

    def __init__(self, index: int, replica, cfg: ModelConfig, params: dict, devices: list, dtype: str, *,
                 max_batch: int, max_model_len: int, page_size: int, num_pages, attention_impl: str,
                 max_chunk: int):
        from hexjax.models.llama import stage_params
        from hexjax.runtime.build import stage_kinds
        from hexjax.runtime.stage import StageShape, stage_programs
        self.index = index
        stages = list(replica.stages)
        self.dps = [s.dp for s in stages]
        unit = math.lcm(*self.dps)
        if max_batch % unit:
            raise ConfigError(f"max_batch {max_batch} must be a multiple of every stage's dp (replica {index}: "
                              f"dp {self.dps}, so a multiple of {unit})")
        self.max_batch, self.page_size, self.unit = max_batch, page_size, unit
        self.width = pages_for(max_model_len, page_size)
        self.buckets = _buckets(page_size, min(max_chunk, max_model_len))
        # rows of a program: the unit (one row per finest data-parallel group) times a power of two (of four
        # for prefill chunks: fewer shapes to compile), up to max_batch; a step packs its rows into the
        # smallest that holds them
        steps = range((max_batch // unit).bit_length() + 1)
        self.row_buckets = sorted({min(unit << k, max_batch) for k in steps})
        self.chunk_row_buckets = sorted({min(unit << 2 * k, max_batch) for k in steps})
        self.max_chunk = max_chunk
        self.kinds, self.devs, self.allocators, self.params, self.caches = [], [], [], [], []
        self.num_pages = []
        self._programs: dict[tuple[int, int, int], object] = {}
        for si, (st, kind) in enumerate(zip(stages, stage_kinds(cfg, replica, dtype, attention_impl))):
            start, stop = st.layers
            per_group = max_batch // st.dp
            if num_pages is None:
                pages = st.dp * (per_group * self.width + 1)
            else:
                pages = num_pages[si] if isinstance(num_pages, (list, tuple)) else int(num_pages)
                pages = -(-pages // st.dp) * st.dp
            devs = tuple(devices[i] for i in st.devices)
            prog = stage_programs(kind, StageShape(max_batch, self.buckets[0], pages, page_size, self.width), devs)
            self.kinds.append(kind)
            self.devs.append(devs)
            self.num_pages.append(pages)
            self.allocators.append(PageAllocator(pages, page_size, st.dp))
            self.params.append(prog.place_params(stage_params(
                params, cfg, start, stop - start, embed=kind.embed, head=kind.head)))
            self.caches.append(prog.empty_cache())
        self.slots: list[Request | None] = [None] * max_batch

    # ---- programs ----

    def program(self, si: int, rows: int, width: int):
        """Stage ``si``'s programs for ``rows`` rows and prefill chunks of ``width`` tokens."""
        from hexjax.runtime.stage import StageShape, stage_programs
        key = (si, rows, width)
        if key not in self._programs:
            shape = StageShape(rows, width, self.num_pages[si], self.page_size, self.width)
            self._programs[key] = stage_programs(self.kinds[si], shape, self.devs[si])
        return self._programs[key]

    def chunk_widths(self, rows: int) -> list[int]:
        """Chunk widths a prefill of ``rows`` rows may use: rows x width stays within the step's token
        budget (the narrowest width always allowed), which also bounds the shapes to compile."""
        return [w for w in self.buckets if w == self.buckets[0] or rows * w <= self.max_chunk]

    def warmup(self, full: bool = False) -> None:
        """Compile now what most steps use: decode at every row count, prefill chunks of every width for
        the fewest rows (one request joining) and of the narrowest width for every row count; ``full``:
        every shape a step may use.  Others compile when first used."""
        shapes = {(r, self.buckets[0], "decode") for r in self.row_buckets}
        shapes |= {(r, w, "extend") for r in self.chunk_row_buckets for w in self.chunk_widths(r)
                   if full or r == self.unit or w == self.buckets[0]}
        for si in range(len(self.kinds)):
            for rows, width, phase in sorted(shapes):
                self.program(si, rows, width).compiled(phase)

    # ---- pages ----

    def group(self, slot: int, si: int) -> int:
        return slot // (self.max_batch // self.dps[si])

    def free_slots(self) -> list[int]:
        return [i for i, r in enumerate(self.slots) if r is None]

    def capacity_pages(self, si: int) -> int:
        """Usable pages of one data-parallel range of stage ``si``."""
        return self.allocators[si].pages_per_shard - 1

    def free_pages_fraction(self) -> float:
        return min(a.num_free() / (a.num_pages - a.num_shards) for a in self.allocators)

    def fits_slot(self, slot: int, num_tokens: int) -> bool:
        return all(a.num_free(self.group(slot, si)) >= pages_for(num_tokens, self.page_size)
                   for si, a in enumerate(self.allocators))

    def reserve(self, req: Request, num_tokens: int) -> int | None:
        """Give ``req`` room for ``num_tokens`` at every stage; on a shortage, the stage index short."""
        for si, a in enumerate(self.allocators):
            g = self.group(req.slot, si)
            need = pages_for(num_tokens, self.page_size) - len(a.pages(req.id))
            if need > a.num_free(g):
                return si
        for si, a in enumerate(self.allocators):
            a.reserve({req.id: (num_tokens, self.group(req.slot, si))})
        return None

    def release(self, req: Request) -> None:
        for a in self.allocators:
            if a.tokens(req.id):
                a.free(req.id)
        if req.slot is not None and self.slots[req.slot] is req:
            self.slots[req.slot] = None
        req.slot = req.replica = None
        req.computed, req.decoding = 0, False

    def tables(self, rows: Sequence[Request | None]) -> list[np.ndarray]:
        """Block tables of packed ``rows`` (see ``pack``): row ``i`` of ``n`` is in data-parallel group
        ``i // (n / dp)`` of a stage, the group of its request's slot."""
        out = []
        for si, (a, dp) in enumerate(zip(self.allocators, self.dps)):
            groups = [i // (len(rows) // dp) for i in range(len(rows))]
            out.append(a.block_table([r.id if r is not None else None for r in rows], self.width, groups))
        return out

    def pack(self, reqs: Sequence[Request], buckets: Sequence[int] | None = None) -> list[Request | None]:
        """Rows for a step's requests: as few as hold them (a row bucket), each request in a row of the same
        data-parallel groups as its slot, at every stage.

        A slot's finest group ``slot // (max_batch / unit)`` decides its group at every stage (each dp
        divides ``unit``), so the rows are cut into ``unit`` equal blocks, one per finest group.
        """
        per_slot_group = self.max_batch // self.unit
        blocks: list[list[Request]] = [[] for _ in range(self.unit)]
        for r in sorted(reqs, key=lambda r: r.slot):
            blocks[r.slot // per_slot_group].append(r)
        need = max(len(b) for b in blocks) * self.unit
        n = next(b for b in buckets or self.row_buckets if b >= need)
        rows: list[Request | None] = [None] * n
        for f, block in enumerate(blocks):
            rows[f * (n // self.unit):f * (n // self.unit) + len(block)] = block
        return rows

    def kv_usage(self) -> float:
        return max(1 - a.num_free() / (a.num_pages - a.num_shards) for a in self.allocators)

    # ---- issuing work ----

    def prefill_call(self, chunks: list[tuple[Request, int]]) -> tuple[list[Request | None], "StepCall"]:
        """One prefill chunk per row: ``(request, n)`` feeds the next ``n`` tokens of its context after the
        ``request.computed`` already cached (pages reserved); returns the packed rows and the host inputs.

        Every chunk goes through the stage ``extend`` program (it attends over the rows' cached pages and
        the chunk), whether or not it starts its sequence: one program per shape, not two, so fewer compiles.
        """
        size = dict((r.id, n) for r, n in chunks)
        rows = self.pack([r for r, _ in chunks], self.chunk_row_buckets)
        bucket = next(b for b in self.chunk_widths(len(rows)) if b >= max(size.values()))
        ids = np.zeros((len(rows), bucket), np.int32)
        start = np.zeros((len(rows),), np.int32)
        last = np.zeros((len(rows),), np.int32)
        for i, r in enumerate(rows):
            if r is not None:
                n = size[r.id]
                ids[i, :n] = r.context[r.computed:r.computed + n]
                start[i], last[i] = r.computed, n - 1
        positions = start[:, None] + np.arange(bucket, dtype=np.int32)[None, :]
        return rows, StepCall(self.index, "extend", bucket, ids, (positions, last), tuple(self.tables(rows)))

    def decode_call(self, running: list[Request]) -> tuple[list[Request | None], "StepCall"]:
        """One decode step of ``running`` (pages for the fed token reserved): (rows, host inputs)."""
        rows = self.pack(running)
        x = np.zeros((len(rows), 1), np.int32)
        pos = np.zeros((len(rows),), np.int32)
        for i, r in enumerate(rows):
            if r is not None:
                x[i, 0] = r.output[-1]
                pos[i] = len(r.prompt) + len(r.output) - 1
        return rows, StepCall(self.index, "decode", self.buckets[0], x, (pos,), tuple(self.tables(rows)))

    def issue(self, call: "StepCall", move=jax.device_put):
        """Run ``call`` through every stage (asynchronously); the last stage's logits [rows, V].

        ``move`` carries the input and the activations onto each stage's devices (``jax.device_put``, or
        across processes ``hexjax.runtime.distributed.move``)."""
        x = call.x
        for si in range(len(self.kinds)):
            prog = self.program(si, x.shape[0], call.width)
            x = move(x, prog.input_sharding)
            x, self.caches[si] = prog.compiled(call.phase)(self.params[si], self.caches[si], x, *call.args,
                                                           call.tables[si])
        return x


@dataclasses.dataclass
class StepCall:
    """The host inputs of one replica's program run in a step: all a process needs to run the same step
    (several processes each issue it for their own stages; ``hexjax.serve.multiprocess``)."""

    replica: int
    phase: str
    """"extend" (prefill chunks) or "decode"."""
    width: int
    """Chunk width the programs are compiled for."""
    x: np.ndarray
    """Token ids [rows, width] (extend) or [rows, 1] (decode)."""
    args: tuple
    """extend: positions [rows, width], last chunk index [rows]; decode: positions [rows]."""
    tables: tuple
    """Per stage, block tables [rows, table width]."""
    sample: dict | None = None
    """Inputs of ``sample_rows`` (None: no row takes a token from this call)."""
    any_sampled: bool = False
    top: int | None = None
    """Alternatives of ``token_logprobs`` (None: no logprobs)."""


def _sample_inputs(call: StepCall, rows: list[Request | None], reqs: list[Request], vocab: int,
                   eos: int | None = None) -> None:
    """Fill ``call``'s sampling inputs for the rows of ``reqs`` (requests among ``rows``)."""
    b = len(rows)
    at = {r.id: i for i, r in enumerate(rows) if r is not None}
    seeds = np.zeros(b, np.int32)
    steps = np.zeros(b, np.int32)
    temps = np.zeros(b, np.float32)
    ks = np.zeros(b, np.int32)
    ps = np.ones(b, np.float32)
    ms = np.zeros(b, np.float32)
    for r in reqs:
        i = at[r.id]
        seeds[i], steps[i] = r.seed, len(r.output)
        temps[i], ks[i], ps[i], ms[i] = r.params.temperature, r.params.top_k, r.params.top_p, r.params.min_p
    extra = {}
    bans = {at[r.id]: list(r.params.stop_token_ids) + ([eos] if eos is not None and not r.params.ignore_eos else [])
            for r in reqs if len(r.output) < r.params.min_tokens}
    bans = {k: v for k, v in bans.items() if v}
    if bans:
        banned = np.full((b, max(map(len, bans.values()))), -1, np.int32)
        for i, ids in bans.items():
            banned[i, :len(ids)] = ids
        extra["banned"] = banned
    pen = [r for r in reqs if r.params.presence_penalty or r.params.frequency_penalty]
    if pen:
        counts = np.zeros((b, vocab), np.float32)
        presence = np.zeros(b, np.float32)
        frequency = np.zeros(b, np.float32)
        for r in pen:
            i = at[r.id]
            if r.output:
                counts[i] = np.bincount(r.output, minlength=vocab)[:vocab]
            presence[i], frequency[i] = r.params.presence_penalty, r.params.frequency_penalty
        extra.update(counts=counts, presence=presence, frequency=frequency)
    if ms.any():
        extra["min_ps"] = ms
    call.sample = dict(seeds=seeds, steps=steps, temps=temps, top_ks=ks, top_ps=ps, **extra)
    call.any_sampled = any(r.params.temperature > 0 for r in reqs)
    call.top = max((r.params.logprobs for r in reqs if r.params.logprobs is not None), default=None)


def _sample(logits, call: StepCall):
    """Issue the sampling of ``call``'s rows from its ``logits``: device arrays (tokens [rows], logprobs or
    None)."""
    toks = sample_rows(logits, any_sampled=call.any_sampled, **call.sample)
    return toks, (token_logprobs(logits, toks, call.top) if call.top is not None else None)


# ----------------------------------------------------------------------------- the engine

@dataclasses.dataclass
class EngineStats:
    preemptions: int = 0
    finished: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    step_tokens: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=4096))
    """Tokens fed per replica step (decode rows plus prefill chunks), the most recent ones."""


DEFAULT_MAX_BATCH = 32
"""Rows per replica unless told: decode steps cost little more for 32 rows than for 8 (the weights are
read once a step either way) and a step packs only the rows it uses (benchmarks/serve_load.py)."""


class Engine:
    """Continuous-batching generation through a plan's replicas.

    ``model`` is a ``ModelConfig`` (random weights from ``seed``) or a loaded
    model (``hexjax.load_hf``).  ``max_batch`` rows per replica (a multiple of
    every stage's dp; default ``DEFAULT_MAX_BATCH``); ``num_pages`` pages per stage pool (an int, or a list per
    stage; default: enough for every row at ``max_model_len``); ``eos_token_id``
    ends sequences unless a request sets ``ignore_eos``.  ``metrics`` receives
    events (``hexjax.serve.metrics.ServeMetrics``).  ``max_step_tokens``: tokens
    one replica step feeds at most (decoding rows plus prefill chunks).
    ``detokenize`` (token ids -> text, e.g. a tokenizer's decode) gives outputs
    their text and enables stop strings.

    Stages on several processes (``hexjax.serve.multiprocess``): ``move``
    replaces ``jax.device_put`` between stages, ``read`` turns sampled tokens
    into numpy on this process, and ``publish`` receives each step's
    ``StepCall``s before they run, so that the other processes can run them too
    (``follow``).  One process leaves them out.
    """

    def __init__(self, model, plan, *, max_batch: int | None = None, max_model_len: int | None = None,
                 num_pages=None, page_size: int | None = None, eos_token_id: int | None = None,
                 max_step_tokens: int | None = None, dtype: str | None = None, seed: int = 0,
                 attention_impl: str = "auto", platform: str | None = None, metrics=None,
                 warmup: bool = False, params: dict | None = None,
                 detokenize: Callable[[list[int]], str] | None = None, move=None, read=None,
                 publish: Callable[[list[StepCall]], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None):
        from hexjax.runtime.build import PAGE_SIZE
        from hexjax.runtime.devices import plan_devices
        from hexjax.runtime.generation import check_plan, model_params, plan_dtype
        cfg = model if isinstance(model, ModelConfig) else getattr(model, "cfg", None)
        if not isinstance(cfg, ModelConfig):
            raise ConfigError(f"Engine: model must be a ModelConfig or a loaded model, got {type(model).__name__}")
        check_plan(plan, cfg)
        if params is None:
            cfg, params = model_params(model, seed)
        self.cfg, self.plan = cfg, plan
        self.model_name = cfg.name
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.page_size = page_size or PAGE_SIZE
        if max_batch is None:   # DEFAULT_MAX_BATCH rows, rounded up to a multiple of every stage's dp
            unit = math.lcm(*(st.dp for rep in plan.replicas for st in rep.stages))
            max_batch = -(-DEFAULT_MAX_BATCH // unit) * unit
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be a positive number of rows, got {max_batch!r}. "
                              "Fix: give --max-batch 1 or more (or leave it out)")
        self.max_batch = max_batch
        self.eos_token_id = eos_token_id
        self.max_step_tokens = max(512, 2 * max_batch) if max_step_tokens is None else max_step_tokens
        if self.max_step_tokens < max_batch + 1:
            raise ConfigError(f"max_step_tokens ({self.max_step_tokens}) must exceed max_batch ({max_batch}): "
                              "every running row decodes one token a step and prefill needs room beside them. "
                              f"Fix: give max_step_tokens at least {max_batch + 1}, or a smaller max_batch")
        self.dtype = dtype or plan_dtype(plan)
        self.metrics = metrics
        self.detokenize = detokenize
        self._move = move or jax.device_put
        self._read = read or np.asarray
        self._publish = publish
        self.on_error = on_error
        """Called with the exception when the background loop fails (after failing every request)."""
        devices = plan_devices(plan, platform)
        self.replicas = [ReplicaEngine(i, rep, cfg, params, devices, self.dtype, max_batch=max_batch,
                                       max_model_len=self.max_model_len, page_size=self.page_size,
                                       num_pages=num_pages, attention_impl=attention_impl,
                                       max_chunk=self.max_step_tokens)
                         for i, rep in enumerate(plan.replicas)]
        if warmup:
            for r in self.replicas:
                r.warmup()
        self.waiting: collections.deque[Request] = collections.deque()
        self.requests: dict[int, Request] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._order = itertools.count()
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._id_lock = threading.Lock()
        self._inbox: collections.deque = collections.deque()
        self._event = threading.Event()
        self._aborted: list[RequestOutput] = []
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: BaseException | None = None

    # ---- requests ----

    def check_request(self, prompt, params: SamplingParams) -> list[int]:
        """The prompt as a list of ints, or a ``ConfigError`` saying why the request cannot be served."""
        if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__iter__"):
            raise ConfigError("prompt must be a list of token ids")
        ids = list(prompt)
        if not ids:
            raise ConfigError("prompt is empty; give at least one token")
        if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in ids):
            raise ConfigError("prompt must be a list of integer token ids")
        ids = [int(t) for t in ids]
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ConfigError(f"token ids {bad[:3]} outside the vocabulary [0, {self.cfg.vocab_size})")
        if params.stop and self.detokenize is None:
            raise ConfigError("stop strings need the model's tokenizer, and this engine has none; "
                              "use stop_token_ids")
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise ConfigError(f"this model's maximum context length is {self.max_model_len} tokens, but the "
                              f"prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) is {total}")
        need = pages_for(total, self.page_size)
        if not any(all(need <= rep.capacity_pages(si) for si in range(len(rep.kinds))) for rep in self.replicas):
            raise ConfigError(f"a sequence of {total} tokens needs {need} KV pages but no replica's page pool "
                              "holds that many per data-parallel range; ask for fewer tokens")
        return ids

    def add_request(self, prompt_ids, params: SamplingParams | None = None, *,
                    callback: Callable[[RequestOutput], None] | None = None) -> int:
        """Queue a request; returns its id.  ``callback`` gets each ``RequestOutput`` (engine thread)."""
        params = params or SamplingParams()
        ids = self.check_request(prompt_ids, params)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(31)
        with self._id_lock:
            req = Request(next(self._ids), ids, params, seed, next(self._order), time.perf_counter(),
                          callback=callback,
                          text=TextStream(self.detokenize, params.stop) if self.detokenize else None)
            self._inbox.append(("add", req))
        self._event.set()
        return req.id

    def abort(self, request_id: int) -> None:
        """Drop a request (queued or running) at the next step; its pages are freed then."""
        self._inbox.append(("abort", request_id))
        self._event.set()

    def _drain(self) -> None:
        """Take the requests added and aborted since the last step (engine thread, lock held)."""
        while self._inbox:
            what, x = self._inbox.popleft()
            if what == "add":
                self.requests[x.id] = x
                self.waiting.append(x)
                if self.metrics is not None:
                    self.metrics.on_arrival(x)
            else:
                self._abort(x)

    def _abort(self, request_id: int) -> None:
        with self._lock:
            req = self.requests.get(request_id)
            if req is None or req.finished:
                return
            if req in self.waiting:
                self.waiting.remove(req)
            if req.replica is not None:
                self.replicas[req.replica].release(req)
            self._finish(req, "abort")
            self.requests.pop(req.id, None)
            self._aborted.append(self._emit(req))

    # ---- state ----

    def running(self) -> list[Request]:
        return [r for rep in self.replicas for r in rep.slots if r is not None]

    @property
    def num_running(self) -> int:
        return sum(r is not None for rep in self.replicas for r in rep.slots)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + sum(w == "add" for w, _ in list(self._inbox))

    def kv_usage(self) -> float:
        """Fullest stage pool's used fraction, over the replicas' worst."""
        return max(rep.kv_usage() for rep in self.replicas)

    def has_work(self) -> bool:
        return bool(self._inbox) or bool(self.waiting) or self.num_running > 0

    # ---- scheduling ----

    def _preempt(self, req: Request) -> None:
        self.replicas[req.replica].release(req)
        req.preemptions += 1
        self.stats.preemptions += 1
        if self.metrics is not None:
            self.metrics.on_preemption(req)
        # back to the queue in arrival order (ahead of anything that came later)
        items = list(self.waiting)
        idx = next((i for i, w in enumerate(items) if w.order > req.order), len(items))
        self.waiting.insert(idx, req)

    def _grow_running(self, rep: ReplicaEngine) -> list[Request]:
        """Pages for every decoding row's next token, preempting the youngest on a shortage."""
        for req in sorted((r for r in rep.slots if r is not None and r.decoding), key=lambda r: r.order):
            while req.slot is not None:
                short = rep.reserve(req, len(req.prompt) + len(req.output))
                if short is None:
                    break
                g = rep.group(req.slot, short)
                victims = [r for r in rep.slots if r is not None and rep.group(r.slot, short) == g]
                self._preempt(max(victims, key=lambda r: r.order))
        return [r for r in rep.slots if r is not None and r.decoding]

    def _chunks(self, decoding: dict[int, list[Request]]) -> dict[int, list[tuple[Request, int]]]:
        """Prefill work of this step per replica, as (request, tokens) chunks, within the step's token budget.

        Each replica's step feeds at most ``max_step_tokens`` tokens: one per decoding row first (they never
        wait for a prefill), then the next chunk of the prompts already being prefilled (oldest first), then
        new requests; a prompt longer than what is left is cut and goes on next step.
        """
        budget = {rep.index: self.max_step_tokens - len(decoding[rep.index]) for rep in self.replicas}
        chunks: dict[int, list[tuple[Request, int]]] = {}
        for rep in self.replicas:
            for req in sorted((r for r in rep.slots if r is not None and not r.decoding), key=lambda r: r.order):
                n = min(len(req.context) - req.computed, budget[rep.index])
                if n < 1:
                    break
                chunks.setdefault(rep.index, []).append((req, n))
                budget[rep.index] -= n
        for rep, req in self._admit(budget):
            n = min(len(req.context), budget[rep.index])
            chunks.setdefault(rep.index, []).append((req, n))
            budget[rep.index] -= n
        for ri, work in chunks.items():   # chunks no wider than the packed rows' shape allows
            rep = self.replicas[ri]
            widest = rep.chunk_widths(len(rep.pack([r for r, _ in work], rep.chunk_row_buckets)))[-1]
            chunks[ri] = [(r, min(n, widest)) for r, n in work]
        return chunks

    def _admit(self, budget: dict[int, int]) -> list[tuple[ReplicaEngine, Request]]:
        """Waiting requests that join a replica this step (slot taken, pages for their context reserved)."""
        new = []
        budget = dict(budget)
        while self.waiting:
            req = self.waiting[0]
            n = len(req.context)
            best = None
            allowed = self.plan.route(len(req.prompt), req.params.max_tokens)   # the plan's size routing
            for rep in self.replicas:   # choose a replica
                free = rep.free_slots()
                if (allowed is not None and rep.index not in allowed) or not free or budget[rep.index] < 1 or any(
                        pages_for(len(req.prompt) + req.params.max_tokens, self.page_size)
                        > rep.capacity_pages(si) for si in range(len(rep.kinds))):
                    continue
                slot = max((s for s in free if rep.fits_slot(s, n + 1)),
                           key=lambda s: min(a.num_free(rep.group(s, si)) for si, a in enumerate(rep.allocators)),
                           default=None)
                if slot is None:
                    continue
                score = (len(free), rep.free_pages_fraction(), -rep.index)
                if best is None or score > best[0]:
                    best = (score, rep, slot)
            if best is None:
                break
            _, rep, slot = best
            self.waiting.popleft()
            req.replica, req.slot = rep.index, slot
            rep.slots[slot] = req
            assert rep.reserve(req, n) is None
            budget[rep.index] -= min(n, budget[rep.index])
            new.append((rep, req))
        return new

    def _finish(self, req: Request, reason: str) -> None:
        req.finished, req.finish_reason = True, reason
        self.stats.finished += 1
        if self.metrics is not None:
            self.metrics.on_finish(req)

    def _emit(self, req: Request) -> RequestOutput:
        out = RequestOutput(req.id, req.output[req.emitted:], list(req.output), len(req.prompt), req.finished,
                            req.finish_reason, *((list(req.logprobs), req.logprobs[req.emitted:])
                                                 if req.params.logprobs is not None else (None, None)))
        if req.text is not None:
            out.new_text = req.text.take(req.finished)
            out.text = req.text.text[:req.text.sent]
        req.emitted = len(req.output)
        if req.callback is not None:
            try:
                req.callback(out)
            except Exception:   # a consumer that went away (closed event loop) must not stop the engine
                pass
        return out

    def _accept(self, req: Request, token: int, now: float) -> None:
        req.output.append(token)
        self.stats.generated_tokens += 1
        if req.first_token_time is None:
            req.first_token_time = now
            if self.metrics is not None:
                self.metrics.on_first_token(req, now)
        elif self.metrics is not None:
            self.metrics.on_token(req, now)
        req.last_token_time = now
        p = req.params
        if len(req.output) > p.min_tokens - 1 and (
                (self.eos_token_id is not None and token == self.eos_token_id and not p.ignore_eos)
                or token in p.stop_token_ids):
            reason = "stop"
        elif req.text is not None and req.text.update(req.output, stops=len(req.output) >= p.min_tokens):
            reason = "stop"
        elif len(req.output) >= p.max_tokens or len(req.prompt) + len(req.output) >= self.max_model_len:
            reason = "length"
        else:
            return
        self.replicas[req.replica].release(req)
        self._finish(req, reason)

    def step(self) -> list[RequestOutput]:
        """One scheduling iteration; returns the outputs of every request that got a token."""
        with self._lock:
            self._drain()
            decoding = {rep.index: self._grow_running(rep) for rep in self.replicas}
            chunks = self._chunks(decoding)
            calls, issued = [], []
            for rep in self.replicas:
                work = chunks.get(rep.index)
                if work:
                    rows, call = rep.prefill_call(work)
                    for r, n in work:
                        r.computed += n
                        self.stats.prefill_tokens += n
                    # rows whose whole context is now cached take their next token from this chunk's logits
                    done = [r for r, _ in work if r.computed == len(r.context)]
                    if done:
                        _sample_inputs(call, rows, done, self.cfg.vocab_size, self.eos_token_id)
                        issued.append((done, rows, len(calls)))
                    calls.append(call)
                reqs = decoding[rep.index]
                if reqs:
                    rows, call = rep.decode_call(reqs)
                    _sample_inputs(call, rows, reqs, self.cfg.vocab_size, self.eos_token_id)
                    issued.append((reqs, rows, len(calls)))
                    calls.append(call)
                if work or reqs:
                    self.stats.step_tokens.append(sum(n for _, n in work or ()) + len(reqs))
            if calls and self._publish is not None:
                self._publish(calls)
            results = self.run(calls)
            for reqs, _, _ in issued:
                for r in reqs:
                    r.decoding = True
            outs, self._aborted = self._aborted, []
            for reqs, rows, ci in issued:
                at = {r.id: i for i, r in enumerate(rows) if r is not None}
                toks, lps = results[ci]
                if lps is not None:
                    chosen, vals, ids = lps
                now = time.perf_counter()
                for r in reqs:
                    i = at[r.id]
                    if r.params.logprobs is not None:
                        n = r.params.logprobs
                        r.logprobs.append((float(chosen[i]),
                                           [(int(t), float(v)) for t, v in zip(ids[i, :n], vals[i, :n])]))
                    self._accept(r, int(toks[i]), now)
                    outs.append(self._emit(r))
                    if r.finished:
                        self.requests.pop(r.id, None)
            self.stats.steps += 1
            if self.metrics is not None:
                self.metrics.on_step(self)
            return outs

    def run(self, calls: Sequence[StepCall]) -> list[tuple | None]:
        """Issue every call of a step (all before any result is read), then read the sampled ones: per call,
        (tokens [rows], (chosen, top values, top ids) or None) as numpy, or None when it samples nothing.

        Every process of a run spread over several calls it with the same calls in the same order; ``read``
        gives None on the processes that do not schedule."""
        sampled = []
        for call in calls:
            logits = self.replicas[call.replica].issue(call, self._move)
            sampled.append(_sample(logits, call) if call.sample is not None else None)
        out = []
        for s in sampled:
            if s is None:
                out.append(None)
                continue
            toks, lps = s
            toks = self._read(toks)
            lps = tuple(self._read(a) for a in lps) if lps is not None else None
            out.append(None if toks is None else (toks, lps))
        return out

    # ---- whole requests ----

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None
                 = None) -> list[RequestOutput]:
        """Run ``prompts`` to the end (one params for all, or one each); final outputs in order."""
        params = params if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        if self._thread is not None:
            done: dict[int, RequestOutput] = {}
            ev = threading.Event()
            count = [0]

            def cb(out, ev=ev):
                if out.finished:
                    done[out.request_id] = out
                    if len(done) == count[0]:
                        ev.set()
            count[0] = len(prompts)
            ids = [self.add_request(p, sp, callback=cb) for p, sp in zip(prompts, params)]
            ev.wait()
            return [done[i] for i in ids]
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        final: dict[int, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    # ---- background loop and streaming ----

    def start(self) -> None:
        """Run ``step`` in a background thread whenever there is work."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="hexjax-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30) -> None:
        """Stop the background loop after its current step (waiting at most ``timeout`` s; None: as long
        as that step takes)."""
        if self._thread is None:
            return
        self._stop = True
        self._event.set()
        self._thread.join(timeout=timeout)
        self._thread = None

    def _loop(self) -> None:
        while True:
            self._event.clear()
            if self._stop:
                return
            if not self.has_work():
                self._event.wait(timeout=1.0)
                continue
            try:
                self.step()
            except BaseException as e:   # fail every request rather than hang their streams
                self.error = e
                with self._lock:
                    self._drain()
                    for req in list(self.requests.values()):
                        if not req.finished:
                            self._abort(req.id)
                if self.on_error is not None:
                    self.on_error(e)
                raise

    async def stream(self, prompt_ids, params: SamplingParams | None = None):
        """Async iterator of ``RequestOutput``s of one request as its tokens come (starts the loop)."""
        self.start()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        rid = self.add_request(prompt_ids, params,
                               callback=lambda out: loop.call_soon_threadsafe(queue.put_nowait, out))
        try:
            while True:
                out = await queue.get()
                yield out
                if out.finished:
                    return
        finally:
            self.abort(rid)

    def stream_tokens(self, prompt_ids, params: SamplingParams | None = None):
        """Async iterator of the token ids of one request."""
        async def gen():
            async for out in self.stream(prompt_ids, params):
                for t in out.new_token_ids:
                    yield t
        return gen()
