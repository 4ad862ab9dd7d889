"""One pipeline stage as compiled programs on its own mesh.

A stage runs a contiguous range of decoder layers (plus the embedding on the
first stage, the final norm and LM head on the last) on a ``(dp, tp)`` mesh.
Its KV cache is paged: per layer, key and value pages
``[Hkv, num_pages, page_size, D]`` shared by every sequence the stage serves,
addressed through per-sequence block tables.  Three jitted steps exist:

* ``prefill(params, cache, x, positions, logits_index, block_tables)``: a
  right-padded batch of prompts; writes their keys/values into the pages and
  attends causally within the prompt.
* ``decode(params, cache, x, positions, block_tables)``: one new token per
  sequence at ``positions``; writes it, then attends over the sequence's pages.
* ``extend(params, cache, x, positions, logits_index, block_tables)``: the
  arguments of ``prefill``, but each row's tokens may start at any position
  (``positions[b, 0]``) and attend over the row's cached pages as well as to
  each other: one chunk of a prompt whose earlier chunks are already cached
  (chunked prefill).  ``StageShape.prompt_len`` is then the chunk width.

The cache argument is donated, so XLA updates the pages in place.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from hexjax.models.config import ModelConfig
from hexjax.runtime import sharding


@dataclasses.dataclass(frozen=True)
class StageKind:
    """What a stage computes and on which mesh: everything its programs depend on but shapes."""

    cfg: ModelConfig
    """The model."""
    first_layer: int
    """First decoder layer of the stage."""
    num_layers: int
    """Number of decoder layers."""
    embed: bool
    """Takes token ids through the embedding (first stage)."""
    head: bool
    """Ends with the final norm and LM head, returning logits (last stage)."""
    dp: int
    """Data-parallel degree: the batch is split over this many device groups."""
    tp: int
    """Tensor-parallel degree inside each group."""
    dtype: str = "float32"
    """Parameter, activation and KV-cache dtype."""
    attention_impl: str = "auto"
    """Kernel choice, resolved by ``hexjax.kernels.dispatch.stage_kernels`` for the mesh's platform."""


@dataclasses.dataclass(frozen=True)
class StageShape:
    """Static array sizes a stage's programs are compiled for."""

    batch: int
    """Rows of one microbatch (a multiple of ``dp``)."""
    prompt_len: int
    """Padded prompt length of the prefill program."""
    num_pages: int
    """KV-cache pages per layer."""
    page_size: int
    """Tokens per page."""
    table_width: int
    """Block-table slots per sequence (pages of the longest sequence)."""


def stage_module(kind: StageKind, attention_fn=None):
    from hexjax.models.llama import LlamaStage
    dt = jnp.dtype(kind.dtype)
    return LlamaStage(kind.cfg, kind.first_layer, kind.num_layers, embed=kind.embed, head=kind.head,
                      dtype=dt, param_dtype=dt, attention_fn=attention_fn)


def _local_attention(kind: StageKind, mesh, num_pages: int, phase: str):
    """Attention with the paged cache, run per device on its own heads, rows and pages.

    Inside ``shard_map`` every device sees its data-parallel group's rows and
    pages (block tables are made local to the group's page range) and its
    tensor-parallel share of the heads, so the attention kernels, Pallas
    ones included, run on plain local arrays.  When ``tp`` exceeds the KV
    heads, the keys and values (and pages) are replicated: every device
    writes all heads, so the copies stay equal, and reads the one head its
    query heads use.

    Returns ``fn(block_tables, q, k, v, k_pages, v_pages, positions) -> (out, k_pages, v_pages)``
    with q [B,S,Hq,D], k/v [B,S,Hkv,D], positions [B] (of the first token).
    """
    from hexjax.kernels.dispatch import stage_chunk_attention, stage_kernels
    cfg, dp, tp = kind.cfg, kind.dp, kind.tp
    device = mesh.devices.flat[0]
    write_kv, attention, decode_attention = stage_kernels(kind.attention_impl, cfg.head_dim, device.platform,
                                                          device_kind=device.device_kind)
    chunk_attention = stage_chunk_attention(kind.attention_impl, cfg.head_dim, device.platform,
                                            device_kind=device.device_kind)
    kv_split = cfg.num_kv_heads % tp == 0
    kv_axis = "tp" if kv_split else None
    group = tp // cfg.num_kv_heads if not kv_split else 1   # tp ranks sharing one replicated KV head
    local_pages = num_pages // dp

    def own_head(x, axis):
        if kv_split or tp == 1:
            return x
        return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index("tp") // group, 1, axis=axis)

    def body(tables, q, k, v, k_pages, v_pages, pos):
        if dp > 1:
            tables = tables % local_pages
        k_pages, v_pages = write_kv(k_pages, v_pages, k, v, tables, pos)
        if phase == "prefill":   # prompts start at position 0: attend within the prompt
            out = attention(q, own_head(k, 2), own_head(v, 2))
        elif phase == "extend":  # a chunk after cached tokens: attend over the pages just written to
            out = chunk_attention(q, own_head(k_pages, 0), own_head(v_pages, 0), tables, pos)
        else:
            out = decode_attention(q[:, 0], own_head(k_pages, 0), own_head(v_pages, 0), tables, pos + 1)[:, None]
        return out, k_pages, v_pages

    if dp == 1 and tp == 1:
        return body
    rows = P("dp", None)
    heads, kv_heads, pages = P("dp", None, "tp", None), P("dp", None, kv_axis, None), P(kv_axis, "dp", None, None)
    return jax.shard_map(body, mesh=mesh, in_specs=(rows, heads, kv_heads, kv_heads, pages, pages, P("dp")),
                         out_specs=(heads, pages, pages), check_vma=False)


def _paged_attention_fn(kind: StageKind, mesh, num_pages: int, phase: str, block_tables):
    """The model's ``attention_fn`` for one phase, bound to this step's block tables."""
    local = _local_attention(kind, mesh, num_pages, phase)

    def attention_fn(q, k, v, layer_cache, positions):
        k_pages, v_pages = layer_cache
        out, k_pages, v_pages = local(block_tables, q, k, v, k_pages, v_pages, positions[:, 0])
        return out, (k_pages, v_pages)
    return attention_fn


class StagePrograms:
    """Shardings, abstract arguments and jitted steps of one stage for one shape.

    Build through ``stage_programs`` so equal stages share compiled code.
    """

    def __init__(self, kind: StageKind, shape: StageShape, devices: tuple):
        from hexjax.models import llama
        if shape.batch % kind.dp or shape.num_pages % kind.dp:
            raise ValueError(f"a microbatch of {shape.batch} rows and {shape.num_pages} pages cannot be "
                             f"split over dp={kind.dp}")
        self.kind, self.shape, self.devices = kind, shape, devices
        self.mesh = mesh = sharding.make_mesh(list(devices), kind.dp, kind.tp)
        module = stage_module(kind)
        self.param_specs = sharding.param_specs(llama.logical_axes(module), kind.cfg, kind.tp)
        self.param_shardings = sharding.named(self.mesh, self.param_specs)
        self.abstract_params = llama.abstract_params(module)
        kv = NamedSharding(self.mesh, sharding.kv_cache_spec(kind.cfg, kind.tp))
        self.cache_shardings = tuple((kv, kv) for _ in range(kind.num_layers))
        self.batch_sharding = NamedSharding(self.mesh, P("dp"))
        self.rows_sharding = NamedSharding(self.mesh, P("dp", None))
        self.hidden_sharding = NamedSharding(self.mesh, P("dp", None, None))
        self.input_sharding = self.rows_sharding if kind.embed else self.hidden_sharding
        self.output_sharding = self.rows_sharding if kind.head else self.hidden_sharding
        dt = jnp.dtype(kind.dtype)

        def prefill(params, cache, x, positions, logits_index, block_tables):
            m = stage_module(kind, _paged_attention_fn(kind, mesh, shape.num_pages, "prefill", block_tables))
            return m.apply({"params": params}, x, positions, cache,
                           logits_index=logits_index if kind.head else None)

        def extend(params, cache, x, positions, logits_index, block_tables):
            m = stage_module(kind, _paged_attention_fn(kind, mesh, shape.num_pages, "extend", block_tables))
            return m.apply({"params": params}, x, positions, cache,
                           logits_index=logits_index if kind.head else None)

        def decode(params, cache, x, positions, block_tables):
            m = stage_module(kind, _paged_attention_fn(kind, mesh, shape.num_pages, "decode", block_tables))
            return m.apply({"params": params}, x, positions[:, None], cache,
                           logits_index=jnp.zeros_like(positions) if kind.head else None)

        ps, cs = self.param_shardings, self.cache_shardings
        self.prefill = jax.jit(
            prefill, donate_argnums=(1,),
            in_shardings=(ps, cs, self.input_sharding, self.rows_sharding, self.batch_sharding,
                          self.rows_sharding),
            out_shardings=(self.output_sharding, cs))
        self.extend = jax.jit(
            extend, donate_argnums=(1,),
            in_shardings=(ps, cs, self.input_sharding, self.rows_sharding, self.batch_sharding,
                          self.rows_sharding),
            out_shardings=(self.output_sharding, cs))
        self.decode = jax.jit(
            decode, donate_argnums=(1,),
            in_shardings=(ps, cs, self.input_sharding, self.batch_sharding, self.rows_sharding),
            out_shardings=(self.output_sharding, cs))
        self._dtype = dt
        self._zeros = None
        self._compiled: dict = {}
        self.compile_seconds: dict[str, float] = {}
        self.stablehlo: dict[str, str] = {}

    # ---- abstract arguments (ahead-of-time compiles, no memory) ----

    def cache_shape(self) -> tuple[int, ...]:
        c, s = self.kind.cfg, self.shape
        return (c.num_kv_heads, s.num_pages, s.page_size, c.head_dim)

    def abstract_args(self, phase: str) -> tuple:
        """``ShapeDtypeStruct``s (with shardings) of ``prefill``'s, ``extend``'s or ``decode``'s arguments."""
        s, c = self.shape, self.kind.cfg
        sds = jax.ShapeDtypeStruct
        params = jax.tree.map(lambda a, sh: sds(a.shape, a.dtype, sharding=sh),
                              self.abstract_params, self.param_shardings)
        page = sds(self.cache_shape(), self._dtype, sharding=self.cache_shardings[0][0]) \
            if self.kind.num_layers else None
        cache = tuple((page, page) for _ in range(self.kind.num_layers))
        tokens = 1 if phase == "decode" else s.prompt_len
        if self.kind.embed:
            x = sds((s.batch, tokens), jnp.int32, sharding=self.rows_sharding)
        else:
            x = sds((s.batch, tokens, c.hidden_size), self._dtype, sharding=self.hidden_sharding)
        tables = sds((s.batch, s.table_width), jnp.int32, sharding=self.rows_sharding)
        if phase in ("prefill", "extend"):
            return (params, cache, x, sds((s.batch, tokens), jnp.int32, sharding=self.rows_sharding),
                    sds((s.batch,), jnp.int32, sharding=self.batch_sharding), tables)
        if phase == "decode":
            return (params, cache, x, sds((s.batch,), jnp.int32, sharding=self.batch_sharding), tables)
        raise ValueError(f"phase must be 'prefill', 'extend' or 'decode', got {phase!r}")

    def lower(self, phase: str):
        """``jax.stages.Lowered`` of one phase, from abstract arguments."""
        args = self.abstract_args(phase)
        return {"prefill": self.prefill, "extend": self.extend, "decode": self.decode}[phase].lower(*args)

    def compiled(self, phase: str):
        """The compiled executable of one phase (compiled once, ahead of time, then kept).

        Calling it runs the step; compiling up front keeps compile time out of
        generation timings.  ``compile_seconds[phase]`` and ``stablehlo[phase]``
        record how long it took and what was compiled.
        """
        if phase not in self._compiled:
            t0 = time.perf_counter()
            lowered = self.lower(phase)
            self._compiled[phase] = lowered.compile()
            self.compile_seconds[phase] = time.perf_counter() - t0
            self.stablehlo[phase] = lowered.as_text()
        return self._compiled[phase]

    # ---- real arrays ----

    def empty_cache(self):
        """Zeroed pages for every layer, placed on the mesh."""
        if self._zeros is None:
            shape, n, dt = self.cache_shape(), self.kind.num_layers, self._dtype
            self._zeros = jax.jit(lambda: tuple((jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in range(n)),
                                  out_shardings=self.cache_shardings)
        return self._zeros()

    def place_params(self, params: dict):
        """Put a stage's parameter tree onto the mesh (cast to the stage dtype)."""
        params = jax.tree.map(lambda a: a.astype(self._dtype) if a.dtype != self._dtype else a, params)
        return jax.device_put(params, self.param_shardings)


@functools.lru_cache(maxsize=256)
def stage_programs(kind: StageKind, shape: StageShape, devices: tuple) -> StagePrograms:
    """Programs of a stage, shared by every runner with the same kind, shape and devices."""
    return StagePrograms(kind, shape, devices)
