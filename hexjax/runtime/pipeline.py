"""Run one replica's pipeline: microbatches flowing through per-stage meshes.

Work is only *issued* here; nothing waits for a device until the caller reads
the results.  Because JAX dispatch is asynchronous, issuing every stage's
step for every microbatch in order keeps all stages busy at once: while stage
1 works on microbatch 0, stage 0 already works on microbatch 1.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np

from hexjax.models.config import ModelConfig
from hexjax.models.sampling import Sampling, sample, step_key
from hexjax.runtime.pages import PageAllocator, PagesExhaustedError, pages_for
from hexjax.runtime.stage import StageKind, StagePrograms, StageShape, stage_programs


def request_key(seed: int, request: jax.Array, step: int | jax.Array) -> jax.Array:
    """Key of request ``request``'s generated token ``step``: ``fold_in(step_key(seed, step), request)``.

    A function of (seed, request, step) only, so sampled tokens do not depend
    on the plan: which replica, microbatch or row serves the request.
    """
    return jax.random.fold_in(step_key(seed, step), request)


@functools.partial(jax.jit, static_argnames=("sampling",))
def _sample_rows(logits, requests, step, sampling: Sampling):
    """Next token of each row as [rows, 1] (the next decode step's input)."""
    if sampling.greedy:
        return sample(logits, None, sampling)[:, None]
    keys = jax.vmap(lambda r: request_key(sampling.seed, r, step))(requests)
    return jax.vmap(lambda row, k: sample(row[None], k, sampling))(logits, keys)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a replica's requests are cut into microbatches and padded."""

    micro_batch: int
    """Rows per microbatch (a multiple of every stage's dp)."""
    num_micro: int
    """Microbatches in flight."""
    prompt_len: int
    """Padded prompt length (prefill program width)."""
    table_width: int
    """Block-table slots per sequence."""


def plan_layout(num_requests: int, prompt_lens: list[int], max_new_tokens: int, num_stages: int,
                dps: list[int], page_size: int, micro_batches: int | None = None) -> Layout:
    """Microbatches for a replica: ``micro_batches`` of them (default one per stage) when there are
    enough requests, each a whole multiple of every stage's ``dp`` rows."""
    rows_unit = math.lcm(*dps)
    want = micro_batches or num_stages
    num_micro = max(1, min(want, -(-num_requests // rows_unit)))
    micro = -(-num_requests // num_micro)
    micro = -(-micro // rows_unit) * rows_unit
    num_micro = -(-num_requests // micro)
    # pad prompts to whole pages so that runs with similar prompts share compiled code
    prompt_len = max(1, pages_for(max(prompt_lens), page_size)) * page_size
    longest = max(len_ + max_new_tokens for len_ in prompt_lens)
    width = pages_for(max(prompt_len, longest), page_size)
    return Layout(micro, num_micro, prompt_len, width)


def shard_pages(prompt_lens: list[int], max_new_tokens: int, layout: Layout, num_shards: int,
                page_size: int) -> list[int]:
    """Pages each data-parallel page range needs (its reserved page included).

    Request ``k`` sits in row ``k % micro_batch`` of microbatch ``k // micro_batch``;
    row ``i`` belongs to range ``i // (micro_batch / num_shards)``.
    """
    per = layout.micro_batch // num_shards
    need = [1] * num_shards
    for k, n in enumerate(prompt_lens):
        need[(k % layout.micro_batch) // per] += pages_for(n + max_new_tokens, page_size)
    return need


class ReplicaRunner:
    """A replica's stages with their parameters and caches, driving its requests."""

    def __init__(self, cfg: ModelConfig, replica, devices: list, params: dict, requests: list[int],
                 prompts: list[list[int]], max_new_tokens: int, sampling: Sampling, *, dtype: str,
                 page_size: int, num_pages: int | None, attention_impl: str,
                 micro_batches: int | None = None, keep_logits: bool = False, max_pages: int | None = None):
        from hexjax.models.llama import stage_params
        self.cfg, self.sampling, self.keep_logits = cfg, sampling, keep_logits
        self.requests, self.prompts = requests, prompts
        self.max_new_tokens = max_new_tokens
        stages = list(replica.stages)
        self.layout = lay = plan_layout(len(requests), [len(p) for p in prompts], max_new_tokens,
                                        len(stages), [s.dp for s in stages], page_size, micro_batches)
        # rows of each microbatch: request position in this replica, or None for padding
        self.rows = [[i if i < len(requests) else None for i in range(m * lay.micro_batch, (m + 1) * lay.micro_batch)]
                     for m in range(lay.num_micro)]
        # pages are split into one range per data-parallel group (lcm over the stages' dp):
        # row i of a microbatch belongs to range i // (rows per range)
        self.num_shards = math.lcm(*(s.dp for s in stages))
        self.rows_per_shard = lay.micro_batch // self.num_shards
        need = shard_pages([len(p) for p in prompts], max_new_tokens, lay, self.num_shards, page_size)
        if num_pages is None:
            # a power of two keeps the cache shape (and so the compiled code) stable across similar runs
            per_shard = 1 << (max(need) - 1).bit_length()
            if max_pages is not None:
                # the memory budget caps the pool; a shortfall is reported by the allocator below
                per_shard = max(2, min(per_shard, max_pages // self.num_shards))
            if max(need) > per_shard:
                raise PagesExhaustedError(
                    f"KV cache too small for the requests: a data-parallel range needs {max(need) - 1} pages of "
                    f"{page_size} tokens but the devices' memory budget holds {per_shard - 1} beside the weights; "
                    "serve fewer or shorter sequences per replica, or use a plan with more memory per stage")
            pages = self.num_shards * per_shard
        else:
            pages = num_pages
        self.allocator = PageAllocator(pages, page_size, self.num_shards)
        shape = StageShape(lay.micro_batch, lay.prompt_len, pages, page_size, lay.table_width)
        self.programs: list[StagePrograms] = []
        self.params, self.caches = [], []
        # the name does not change the program; dropping it lets equal models share compiled code
        anon = dataclasses.replace(cfg, name="")
        for si, st in enumerate(stages):
            start, stop = st.layers
            kind = StageKind(anon, start, stop - start, embed=si == 0, head=si == len(stages) - 1,
                             dp=st.dp, tp=st.tp, dtype=dtype, attention_impl=attention_impl)
            prog = stage_programs(kind, shape, tuple(devices[i] for i in st.devices))
            for phase in ("prefill", "decode") if max_new_tokens > 1 else ("prefill",):
                prog.compiled(phase)   # compile now, not inside the timed run
            self.programs.append(prog)
            self.params.append(prog.place_params(stage_params(
                params, cfg, start, stop - start, embed=kind.embed, head=kind.head)))
            self.caches.append(prog.empty_cache())
        self.tokens = [[] for _ in range(lay.num_micro)]   # per microbatch: [mb] arrays per step
        self.logits = [[] for _ in range(lay.num_micro)]
        self._last = [None] * lay.num_micro                # last sampled tokens, on stage 0's mesh
        self._tables = [None] * lay.num_micro              # block tables as numpy, per microbatch

    # ---- host-side bookkeeping ----

    def _grow(self, m: int, num_tokens) -> np.ndarray:
        """Give every sequence of microbatch ``m`` room for its ``num_tokens``; return its block table."""
        rows = self.rows[m]
        shards = [i // self.rows_per_shard for i in range(len(rows))]
        self.allocator.reserve({r: (int(num_tokens[i]), shards[i]) for i, r in enumerate(rows) if r is not None})
        return self.allocator.block_table(rows, self.layout.table_width, shards)

    def _lengths(self, m: int) -> np.ndarray:
        return np.array([len(self.prompts[r]) if r is not None else 1 for r in self.rows[m]], np.int32)

    def _request_ids(self, m: int) -> np.ndarray:
        return np.array([self.requests[r] if r is not None else -1 for r in self.rows[m]], np.int32)

    # ---- issuing work ----

    def _through_stages(self, m: int, x, step_fn_args):
        for si, prog in enumerate(self.programs):
            x = jax.device_put(x, prog.input_sharding)
            fn = prog.compiled(step_fn_args[0])
            x, self.caches[si] = fn(self.params[si], self.caches[si], x, *step_fn_args[1:])
        return x

    def _finish(self, m: int, logits, step: int):
        tok = _sample_rows(logits, self._request_ids(m), step, self.sampling)
        self.tokens[m].append(tok)
        if self.keep_logits:
            self.logits[m].append(logits)
        self._last[m] = tok

    def prefill(self, m: int) -> None:
        lay = self.layout
        lengths = self._lengths(m)
        ids = np.zeros((lay.micro_batch, lay.prompt_len), np.int32)
        for i, r in enumerate(self.rows[m]):
            if r is not None:
                ids[i, :len(self.prompts[r])] = self.prompts[r]
        table = self._grow(m, lengths)
        self._tables[m] = table
        positions = np.broadcast_to(np.arange(lay.prompt_len, dtype=np.int32), ids.shape)
        logits = self._through_stages(m, ids, ("prefill", positions, lengths - 1, table))
        self._finish(m, logits, 0)

    def decode(self, m: int, step: int) -> None:
        """Generate token ``step`` (>= 1) of microbatch ``m``."""
        lengths = self._lengths(m)
        positions = lengths + (step - 1)   # position of the token being fed
        table = self._grow(m, positions + 1)
        self._tables[m] = table
        x = self._last[m]
        logits = self._through_stages(m, x, ("decode", positions, table))
        self._finish(m, logits, step)

    def release(self) -> None:
        """Return every sequence's pages."""
        for rows in self.rows:
            for r in rows:
                if r is not None and self.allocator.tokens(r):
                    self.allocator.free(r)

    # ---- results ----

    def results(self) -> tuple[list[list[int]], list[np.ndarray] | None]:
        """Generated tokens per request of this replica (in order), and logits [steps, V] if kept."""
        out: list[list[int]] = [None] * len(self.requests)
        logits: list[np.ndarray] = [None] * len(self.requests)
        for m, rows in enumerate(self.rows):
            toks = np.concatenate([np.asarray(t) for t in self.tokens[m]], axis=1)
            lg = np.stack([np.asarray(x) for x in self.logits[m]], axis=1) if self.keep_logits else None
            for i, r in enumerate(rows):
                if r is not None:
                    out[r] = toks[i].tolist()
                    if lg is not None:
                        logits[r] = lg[i]
        return out, (logits if self.keep_logits else None)
