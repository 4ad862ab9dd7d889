"""Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) in Flax Linen.

A ``LlamaStage`` is a contiguous range of decoder layers, optionally with the token
embedding in front and the final norm + LM head behind, so that a pipeline stage
and the whole model are the same module. Parameters are plain nested dicts keyed
by *global* layer index (``layer_{i}``), so a stage's tree is a sub-dict of the
full model's tree (``stage_params``). Attention is pluggable: ``attention_fn``
receives RoPE'd q/k, v, the layer's cache entry and the absolute positions, and
returns the attention output and the updated cache entry.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from hexjax.errors import ConfigError
from hexjax.models.config import ModelConfig

Array = jax.Array

# initial values for random models: small normal weights, unit norm scales, zero biases
_WEIGHT_INIT = nn.initializers.normal(stddev=0.02)
_ONES = nn.initializers.ones
_ZEROS = nn.initializers.zeros


# ----------------------------------------------------------------------------- RoPE

def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Rotary inverse frequencies [head_dim // 2] (float32), with the config's scaling.

    Follows Hugging Face's float32 computation so logits agree to ~1e-6.
    """
    d = cfg.head_dim
    exponents = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    inv = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s.kind == "linear":
        return (inv / np.float32(s.factor)).astype(np.float32)
    if s.kind == "llama3":
        old = float(s.original_max_position_embeddings)
        low_wavelen = old / s.low_freq_factor
        high_wavelen = old / s.high_freq_factor
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ConfigError(f"{cfg.name}: rope scaling kind {s.kind!r} is not supported (linear, llama3)")


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotate x [B,S,N,D] by its positions [B,S] (half-split layout, as Hugging Face Llama)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B,S,D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------- KV cache

@flax.struct.dataclass
class KVCache:
    """Contiguous key/value cache of one layer; slot ``t`` holds the token at position ``t``."""

    k: Array
    """Keys [batch, max_len, kv_heads, head_dim]."""
    v: Array
    """Values [batch, max_len, kv_heads, head_dim]."""

    @property
    def max_len(self) -> int:
        return self.k.shape[1]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, num_layers: int | None = None,
               dtype: Any = jnp.float32) -> tuple[KVCache, ...]:
    """Zeroed contiguous caches, one ``KVCache`` per layer (``num_layers`` defaults to all)."""
    n = cfg.num_layers if num_layers is None else num_layers
    if batch <= 0 or max_len <= 0 or n <= 0:
        raise ConfigError(f"init_cache: batch ({batch}), max_len ({max_len}) and num_layers ({n}) must be positive")
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return tuple(KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(n))


def write_cache(layer_cache: KVCache, k: Array, v: Array, positions: Array) -> KVCache:
    """Store k/v [B,S,Hkv,D] at slots ``positions`` [B,S]; positions >= max_len are dropped."""
    b = jnp.arange(k.shape[0])[:, None]
    ck = layer_cache.k.at[b, positions].set(k.astype(layer_cache.k.dtype), mode="drop")
    cv = layer_cache.v.at[b, positions].set(v.astype(layer_cache.v.dtype), mode="drop")
    return KVCache(ck, cv)


def attend(q: Array, k: Array, v: Array, valid: Array) -> Array:
    """Grouped-query softmax attention; q [B,S,Hq,D], k/v [B,T,Hkv,D], valid [B,S,T] bool."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, s, hkv, hq // hkv, d)
    scores = jnp.einsum("bsngd,btnd->bngst", qg, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) * (d ** -0.5)
    # a finite floor keeps rows with no valid key (dropped padding) free of NaN
    scores = jnp.where(valid[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bngst,btnd->bsngd", probs, v.astype(q.dtype))
    return out.reshape(b, s, hq, d)


def default_attention(q: Array, k: Array, v: Array, layer_cache: KVCache | None,
                      positions: Array) -> tuple[Array, KVCache | None]:
    """Causal attention: within the input when ``layer_cache`` is None, else over the
    contiguous cache after writing this input at ``positions``.

    A query at position p sees keys at positions <= p, so ragged batches need only
    their own positions (right padding writes past a sequence's end, where later
    tokens overwrite it before any query can see it).
    """
    if layer_cache is None:
        valid = positions[:, None, :] <= positions[:, :, None]
        return attend(q, k, v, valid), None
    new_cache = write_cache(layer_cache, k, v, positions)
    slots = jnp.arange(new_cache.max_len)
    valid = slots[None, None, :] <= positions[:, :, None]
    return attend(q, new_cache.k, new_cache.v, valid), new_cache


# ----------------------------------------------------------------------------- modules

def _param(module: nn.Module, name: str, init, shape: tuple[int, ...], axes: tuple[str, ...], dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, scaled in the compute dtype."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = _param(self, "scale", _ONES, (x.shape[-1],), ("norm",), self.param_dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * xf.astype(self.dtype)


class Embed(nn.Module):
    """Token embedding [vocab, embed]; ``attend`` is its transpose (tied LM head)."""

    vocab_size: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.embedding = _param(self, "embedding", _WEIGHT_INIT, (self.vocab_size, self.features),
                                ("vocab", "embed"), self.param_dtype)

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        return jnp.einsum("bsh,vh->bsv", x, self.embedding.astype(self.dtype),
                          preferred_element_type=jnp.float32)


class LMHead(nn.Module):
    """Untied output projection [embed, vocab] to float32 logits."""

    vocab_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = _param(self, "kernel", _WEIGHT_INIT, (x.shape[-1], self.vocab_size),
                        ("embed", "vocab"), self.param_dtype)
        return jnp.einsum("bsh,hv->bsv", x, kernel.astype(self.dtype),
                          preferred_element_type=jnp.float32)


class Attention(nn.Module):
    """Grouped-query self-attention with heads kept as their own axis."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_fn: Callable | None = None

    @nn.compact
    def __call__(self, x: Array, positions: Array, layer_cache):
        c, dt, pdt = self.cfg, self.dtype, self.param_dtype
        h, nq, nkv, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        wq = _param(self, "wq", _WEIGHT_INIT, (h, nq, d), ("embed", "heads", "head_dim"), pdt)
        wk = _param(self, "wk", _WEIGHT_INIT, (h, nkv, d), ("embed", "kv_heads", "head_dim"), pdt)
        wv = _param(self, "wv", _WEIGHT_INIT, (h, nkv, d), ("embed", "kv_heads", "head_dim"), pdt)
        wo = _param(self, "wo", _WEIGHT_INIT, (nq, d, h), ("heads", "head_dim", "embed"), pdt)
        q = jnp.einsum("bsh,hnd->bsnd", x, wq.astype(dt))
        k = jnp.einsum("bsh,hnd->bsnd", x, wk.astype(dt))
        v = jnp.einsum("bsh,hnd->bsnd", x, wv.astype(dt))
        if c.attention_bias:
            q = q + _param(self, "bq", _ZEROS, (nq, d), ("heads", "head_dim"), pdt).astype(dt)
            k = k + _param(self, "bk", _ZEROS, (nkv, d), ("kv_heads", "head_dim"), pdt).astype(dt)
            v = v + _param(self, "bv", _ZEROS, (nkv, d), ("kv_heads", "head_dim"), pdt).astype(dt)
        inv_freq = rope_inv_freq(c)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        fn = self.attention_fn or default_attention
        out, new_cache = fn(q, k, v, layer_cache, positions)
        # contract over heads*head_dim as one axis: with two contracting axes XLA's CPU
        # backend copies wo into another order on every call
        b, s_ = out.shape[:2]
        y = jnp.einsum("bsk,kh->bsh", out.astype(dt).reshape(b, s_, nq * d), wo.astype(dt).reshape(nq * d, h))
        if c.attention_bias:
            y = y + _param(self, "bo", _ZEROS, (h,), ("embed",), pdt).astype(dt)
        return y, new_cache


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c, dt, pdt = self.cfg, self.dtype, self.param_dtype
        h, f = c.hidden_size, c.intermediate_size
        gate = jnp.einsum("bsh,hf->bsf", x, _param(self, "gate", _WEIGHT_INIT, (h, f), ("embed", "mlp"), pdt).astype(dt))
        up = jnp.einsum("bsh,hf->bsf", x, _param(self, "up", _WEIGHT_INIT, (h, f), ("embed", "mlp"), pdt).astype(dt))
        if c.mlp_bias:
            gate = gate + _param(self, "bgate", _ZEROS, (f,), ("mlp",), pdt).astype(dt)
            up = up + _param(self, "bup", _ZEROS, (f,), ("mlp",), pdt).astype(dt)
        down = _param(self, "down", _WEIGHT_INIT, (f, h), ("mlp", "embed"), pdt).astype(dt)
        y = jnp.einsum("bsf,fh->bsh", nn.silu(gate) * up, down)
        if c.mlp_bias:
            y = y + _param(self, "bdown", _ZEROS, (h,), ("embed",), pdt).astype(dt)
        return y


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with residual connections."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_fn: Callable | None = None

    @nn.compact
    def __call__(self, x: Array, positions: Array, layer_cache):
        # named scopes put the block names into HLO dumps and profiles
        c = self.cfg
        with jax.named_scope("attn_norm"):
            y = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="attn_norm")(x)
        with jax.named_scope("attention"):
            a, new_cache = Attention(c, self.dtype, self.param_dtype, self.attention_fn, name="attn")(
                y, positions, layer_cache)
        x = x + a
        with jax.named_scope("mlp_norm"):
            y = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="mlp_norm")(x)
        with jax.named_scope("mlp"):
            x = x + MLP(c, self.dtype, self.param_dtype, name="mlp")(y)
        return x, new_cache


class LlamaStage(nn.Module):
    """Decoder layers ``[first_layer, first_layer + num_layers)``, with the embedding
    in front when ``embed`` and the final norm + LM head behind when ``head``.

    ``__call__(x, positions, cache=None, logits_index=None) -> (out, new_cache)``:
    x is token ids [B,S] int32 (embed) or hidden [B,S,H]; positions [B,S] int32 are
    absolute; cache is None or a tuple with one entry per layer of this stage.
    out is float32 logits [B,S,V] (head), or [B,V] at ``logits_index`` [B] (an index
    into S, so prefill computes only the logits it samples from), else hidden [B,S,H].
    """

    cfg: ModelConfig
    first_layer: int = 0
    num_layers: int | None = None
    embed: bool = True
    head: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_fn: Callable | None = None

    @property
    def layer_range(self) -> range:
        n = self.cfg.num_layers - self.first_layer if self.num_layers is None else self.num_layers
        if self.first_layer < 0 or n < 0 or self.first_layer + n > self.cfg.num_layers:
            raise ConfigError(
                f"{self.cfg.name}: stage layers [{self.first_layer}, {self.first_layer + n}) fall outside "
                f"the model's {self.cfg.num_layers} layers")
        return range(self.first_layer, self.first_layer + n)

    @nn.compact
    def __call__(self, x: Array, positions: Array, cache=None, logits_index: Array | None = None):
        c, dt, pdt = self.cfg, self.dtype, self.param_dtype
        layers = self.layer_range
        if cache is not None and len(cache) != len(layers):
            raise ConfigError(f"cache has {len(cache)} layer entries but the stage runs {len(layers)} layers")
        embed = None
        if self.embed or (self.head and c.tie_word_embeddings):
            embed = Embed(c.vocab_size, c.hidden_size, dt, pdt, name="embed")
        with jax.named_scope("embed"):
            h = embed(x) if self.embed else x.astype(dt)
        new_cache = []
        for local, i in enumerate(layers):
            with jax.named_scope(f"layer_{i}"):
                h, lc = DecoderLayer(c, dt, pdt, self.attention_fn, name=f"layer_{i}")(
                    h, positions, None if cache is None else cache[local])
            new_cache.append(lc)
        new_cache = None if cache is None else tuple(new_cache)
        if not self.head:
            return h, new_cache
        if logits_index is not None:
            h = jnp.take_along_axis(h, logits_index[:, None, None].astype(jnp.int32), axis=1)
        with jax.named_scope("head"):
            h = RMSNorm(c.rms_norm_eps, dt, pdt, name="final_norm")(h)
            logits = embed.attend(h) if c.tie_word_embeddings else LMHead(c.vocab_size, dt, pdt, name="lm_head")(h)
        if logits_index is not None:
            logits = logits[:, 0]
        return logits, new_cache


# ----------------------------------------------------------------------------- parameter helpers

def _dummy_inputs(stage: LlamaStage):
    x = (jnp.zeros((1, 1), jnp.int32) if stage.embed
         else jnp.zeros((1, 1, stage.cfg.hidden_size), stage.dtype))
    return x, jnp.zeros((1, 1), jnp.int32)


def _boxed_init(stage: LlamaStage, key):
    x, pos = _dummy_inputs(stage)
    return stage.init(key, x, pos)["params"]


_BIASES = {"bq", "bk", "bv", "bo", "bgate", "bup", "bdown"}


def init_params(stage: LlamaStage, key: jax.Array | int) -> dict:
    """Random parameters of ``stage`` as a plain nested dict of arrays.

    Drawn on the host with numpy (XLA's CPU compile of the random ops takes seconds)
    from a stream per parameter path, so a stage's parameters equal the matching
    sub-tree of the full model's for the same key. Same distributions as the
    modules' initialisers: normal(0.02) weights, unit norm scales, zero biases.
    """
    words = [int(key)] if isinstance(key, int) else np.asarray(jax.random.key_data(key)).ravel().tolist()

    def draw(path, leaf):
        names = [p.key for p in path]
        dt = np.dtype(leaf.dtype)
        if names[-1] == "scale":
            return jnp.ones(leaf.shape, dt)
        if names[-1] in _BIASES:
            return jnp.zeros(leaf.shape, dt)
        rng = np.random.default_rng([*words, zlib.crc32("/".join(names).encode())])
        return jnp.asarray((0.02 * rng.standard_normal(leaf.shape, np.float32)).astype(dt))

    shapes = abstract_params(stage)
    from hexjax.host import require_host_bytes
    # the largest leaf is also drawn in float32 before the cast
    nbytes = sum(a.size * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(shapes))
    require_host_bytes(nbytes + max(a.size * 4 for a in jax.tree.leaves(shapes)),
                       f"drawing random weights for {stage.cfg.name or 'the model'}",
                       "use a smaller preset (hexjax.ModelConfig.preset), or load a checkpoint on a machine "
                       "with more memory")
    return jax.tree_util.tree_map_with_path(draw, shapes)


def abstract_params(stage: LlamaStage) -> dict:
    """Shapes and dtypes of ``stage``'s parameters (``jax.ShapeDtypeStruct``), no memory used."""
    stage.layer_range
    return flax.core.unfreeze(jax.eval_shape(lambda k: nn.meta.unbox(_boxed_init(stage, k)), jax.random.key(0)))


def logical_axes(stage: LlamaStage) -> dict:
    """``PartitionSpec`` of logical axis names for each parameter (same tree as the params)."""
    stage.layer_range
    boxed = jax.eval_shape(lambda k: _boxed_init(stage, k), jax.random.key(0))
    return flax.core.unfreeze(nn.get_partition_spec(boxed))


def stage_params(full_params: dict, cfg: ModelConfig, first_layer: int = 0, num_layers: int | None = None,
                 embed: bool = True, head: bool = True) -> dict:
    """The sub-tree of the full model's parameters that a stage with these settings uses."""
    n = cfg.num_layers - first_layer if num_layers is None else num_layers
    if first_layer < 0 or n < 0 or first_layer + n > cfg.num_layers:
        raise ConfigError(f"{cfg.name}: stage layers [{first_layer}, {first_layer + n}) fall outside "
                          f"the model's {cfg.num_layers} layers")
    names = [f"layer_{i}" for i in range(first_layer, first_layer + n)]
    if embed or (head and cfg.tie_word_embeddings):
        names.insert(0, "embed")
    if head:
        names.append("final_norm")
        if not cfg.tie_word_embeddings:
            names.append("lm_head")
    missing = [k for k in names if k not in full_params]
    if missing:
        raise ConfigError(f"stage_params: the parameter tree lacks {', '.join(missing)} "
                          f"(has {', '.join(sorted(full_params))})")
    return {k: full_params[k] for k in names}
