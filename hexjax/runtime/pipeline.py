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


def assign_rows(num_requests: int, layout: Layout, dps: list[int]) -> list[list[int | None]]:
    """Rows of each microbatch: request index, or None for a padding row.

    Microbatches are filled in order.  Inside one, each request takes the free
    row whose data-parallel groups (one per stage: row ``i`` of a stage with
    ``dp`` groups is in group ``i // (micro_batch / dp)``) hold the fewest
    requests so far, so every stage's groups get at most ``ceil(requests / dp)``
    sequences where that is possible, as the cost model assumes, even when the
    stages' ``dp`` differ and rows are padded to a multiple of all of them.
    """
    mb = layout.micro_batch
    rows: list[list[int | None]] = []
    for m in range(layout.num_micro):
        reqs = range(m * mb, min((m + 1) * mb, num_requests))
        counts = [[0] * dp for dp in dps]
        row: list[int | None] = [None] * mb
        for k in reqs:
            def load(i):
                groups = [c[i // (mb // dp)] for c, dp in zip(counts, dps)]
                return max(groups), sum(groups), i
            best = min((i for i in range(mb) if row[i] is None), key=load)
            row[best] = k
            for c, dp in zip(counts, dps):
                c[best // (mb // dp)] += 1
        rows.append(row)
    return rows


def group_pages(rows: list[list[int | None]], lengths: list[int], max_new_tokens: int, dp: int,
                page_size: int) -> list[int]:
    """Pages each data-parallel group of a stage needs over all microbatches (its reserved page included)."""
    need = [1] * dp
    for row in rows:
        per = len(row) // dp
        for i, r in enumerate(row):
            if r is not None:
                need[i // per] += pages_for(lengths[r] + max_new_tokens, page_size)
    return need


def pool_pages(need: list[int], dp: int, page_size: int, budget: int | None = None) -> int:
    """Pages of a stage's pool (``dp`` equal ranges) for the groups' ``need``.

    A power of two per range keeps the cache shape, and so the compiled code,
    the same across similar runs; ``budget`` (pages per device that its memory
    holds beside the weights) caps it, and a shortfall is an error.
    """
    per = 1 << (max(need) - 1).bit_length()
    if budget is not None:
        per = max(2, min(per, budget))
    if max(need) > per:
        raise PagesExhaustedError(
            f"KV cache too small for the requests: a data-parallel group needs {max(need) - 1} pages of "
            f"{page_size} tokens but the devices' memory budget holds {per - 1} beside the weights; "
            "serve fewer or shorter sequences per replica, or use a plan with more memory per stage")
    return dp * per


class ReplicaRunner:
    """A replica's stages with their parameters and caches, driving its requests."""

    def __init__(self, cfg: ModelConfig, replica, devices: list, params: dict, requests: list[int],
                 prompts: list[list[int]], max_new_tokens: int, sampling: Sampling, *, dtype: str,
                 page_size: int, num_pages: int | None, attention_impl: str,
                 micro_batches: int | None = None, keep_logits: bool = False,
                 max_pages: list[int] | None = None):
        from hexjax.models.llama import stage_params
        self.cfg, self.sampling, self.keep_logits = cfg, sampling, keep_logits
        self.requests, self.prompts = requests, prompts
        self.max_new_tokens = max_new_tokens
        stages = list(replica.stages)
        self.dps = [s.dp for s in stages]
        lengths = [len(p) for p in prompts]
        self.layout = lay = plan_layout(len(requests), lengths, max_new_tokens, len(stages), self.dps,
                                        page_size, micro_batches)
        self.rows = assign_rows(len(requests), lay, self.dps)
        # every stage has its own page pool, cut into one range per data-parallel group, and its own
        # allocator: a sequence takes pages in the range of the group that serves it at that stage
        self.allocators: list[PageAllocator] = []
        self.programs: list[StagePrograms] = []
        self.params, self.caches = [], []
        # the name does not change the program; dropping it lets equal models share compiled code
        anon = dataclasses.replace(cfg, name="")
        for si, st in enumerate(stages):
            start, stop = st.layers
            if num_pages is None:
                need = group_pages(self.rows, lengths, max_new_tokens, st.dp, page_size)
                try:
                    pages = pool_pages(need, st.dp, page_size, max_pages[si] if max_pages else None)
                except PagesExhaustedError as e:
                    raise PagesExhaustedError(f"stage {si} (layers {start}-{stop - 1}): {e}") from None
            else:
                pages = num_pages
            self.allocators.append(PageAllocator(pages, page_size, st.dp))
            kind = StageKind(anon, start, stop - start, embed=si == 0, head=si == len(stages) - 1,
                             dp=st.dp, tp=st.tp, dtype=dtype, attention_impl=attention_impl)
            shape = StageShape(lay.micro_batch, lay.prompt_len, pages, page_size, lay.table_width)
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

    # ---- host-side bookkeeping ----

    def _grow(self, m: int, num_tokens) -> list[np.ndarray]:
        """Give every sequence of microbatch ``m`` room for its ``num_tokens`` at every stage;
        return each stage's block table."""
        rows, tables = self.rows[m], []
        for si, (alloc, dp) in enumerate(zip(self.allocators, self.dps)):
            groups = [i // (len(rows) // dp) for i in range(len(rows))]
            try:
                alloc.reserve({r: (int(num_tokens[i]), groups[i]) for i, r in enumerate(rows) if r is not None})
            except PagesExhaustedError as e:
                raise PagesExhaustedError(f"stage {si}: {e}") from None
            tables.append(alloc.block_table(rows, self.layout.table_width, groups))
        return tables

    def _lengths(self, m: int) -> np.ndarray:
        return np.array([len(self.prompts[r]) if r is not None else 1 for r in self.rows[m]], np.int32)

    def _request_ids(self, m: int) -> np.ndarray:
        return np.array([self.requests[r] if r is not None else -1 for r in self.rows[m]], np.int32)

    # ---- issuing work ----

    def _through_stages(self, m: int, x, phase: str, args: tuple, tables: list[np.ndarray]):
        for si, prog in enumerate(self.programs):
            x = jax.device_put(x, prog.input_sharding)
            x, self.caches[si] = prog.compiled(phase)(self.params[si], self.caches[si], x, *args, tables[si])
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
        tables = self._grow(m, lengths)
        positions = np.broadcast_to(np.arange(lay.prompt_len, dtype=np.int32), ids.shape)
        logits = self._through_stages(m, ids, "prefill", (positions, lengths - 1), tables)
        self._finish(m, logits, 0)

    def decode(self, m: int, step: int) -> None:
        """Generate token ``step`` (>= 1) of microbatch ``m``."""
        lengths = self._lengths(m)
        positions = lengths + (step - 1)   # position of the token being fed
        tables = self._grow(m, positions + 1)
        logits = self._through_stages(m, self._last[m], "decode", (positions,), tables)
        self._finish(m, logits, step)

    def release(self) -> None:
        """Return every sequence's pages."""
        for alloc in self.allocators:
            for rows in self.rows:
                for r in rows:
                    if r is not None and alloc.tokens(r):
                        alloc.free(r)

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
