"""Run one replica's pipeline: microbatches flowing through per-stage meshes.

Work is only *issued* here; nothing waits for a device until the caller reads
the results.  Because JAX dispatch is asynchronous, issuing every stage's
step for every microbatch in order keeps all stages busy at once: while stage
1 works on microbatch 0, stage 0 already works on microbatch 1.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from hexjax.models.sampling import Sampling, request_keys, sample
from hexjax.runtime.build import ReplicaBuild
from hexjax.runtime.pages import PageAllocator, PagesExhaustedError
from hexjax.runtime.stage import StagePrograms, stage_programs


@functools.partial(jax.jit, static_argnames=("sampling",))
def _sample_rows(logits, requests, step, sampling: Sampling):
    """Next token of each row as [rows, 1] (the next decode step's input)."""
    if sampling.greedy:
        return sample(logits, None, sampling)[:, None]
    return sample(logits, request_keys(sampling.seed, requests, step), sampling)[:, None]


class ReplicaRunner:
    """A replica's stages with their parameters and caches, driving its requests."""

    def __init__(self, build: ReplicaBuild, devices: list, params: dict, requests: list[int],
                 prompts: list[list[int]], max_new_tokens: int, sampling: Sampling, *,
                 keep_logits: bool = False, move=None, read=None):
        from hexjax.models.llama import stage_params
        self.sampling, self.keep_logits = sampling, keep_logits
        # how activations hop between stages and how results reach the host; several processes
        # (hexjax.runtime.distributed) replace them, one process keeps jax.device_put / np.asarray
        self._move = move or jax.device_put
        self._read = read or np.asarray
        self.requests, self.prompts = requests, prompts
        self.max_new_tokens = max_new_tokens
        self.layout, self.rows = build.layout, build.rows
        self.dps = [s.kind.dp for s in build.stages]
        # every stage has its own page pool, cut into one range per data-parallel group, and its own
        # allocator: a sequence takes pages in the range of the group that serves it at that stage
        self.allocators: list[PageAllocator] = []
        self.programs: list[StagePrograms] = []
        self.params, self.caches = [], []
        for sb in build.stages:
            kind, shape = sb.kind, sb.shape
            self.allocators.append(PageAllocator(shape.num_pages, shape.page_size, kind.dp))
            prog = stage_programs(kind, shape, tuple(devices[i] for i in sb.devices))
            for phase in ("prefill", "decode") if max_new_tokens > 1 else ("prefill",):
                prog.compiled(phase)   # compile now, not inside the timed run
            self.programs.append(prog)
            self.params.append(prog.place_params(stage_params(
                params, kind.cfg, kind.first_layer, kind.num_layers, embed=kind.embed, head=kind.head)))
            self.caches.append(prog.empty_cache())
        self.tokens = [[] for _ in range(build.layout.num_micro)]   # per microbatch: [mb] arrays per step
        self.logits = [[] for _ in range(build.layout.num_micro)]
        self._last = [None] * build.layout.num_micro               # last sampled tokens, on stage 0's mesh

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
            x = self._move(x, prog.input_sharding)
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
            toks = np.concatenate([self._read(t) for t in self.tokens[m]], axis=1)
            lg = np.stack([self._read(x) for x in self.logits[m]], axis=1) if self.keep_logits else None
            for i, r in enumerate(rows):
                if r is not None:
                    out[r] = toks[i].tolist()
                    if lg is not None:
                        logits[r] = lg[i]
        return out, (logits if self.keep_logits else None)
