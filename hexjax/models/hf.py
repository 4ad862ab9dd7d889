"""Hugging Face Llama checkpoints (``config.json`` + safetensors) to and from hexjax parameters.

safetensors files are read by their documented layout (8-byte little-endian header
length, a JSON header of name -> dtype/shape/byte range, then raw little-endian
data) through ``np.memmap``, so bf16 works without torch and nothing is copied
before the final cast.
"""

from __future__ import annotations

import functools
import json
import struct
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hexjax.errors import ConfigError
from hexjax.models.config import ModelConfig
from hexjax.models.generate import generate as _generate
from hexjax.models.llama import LlamaStage, init_params
from hexjax.models.sampling import Sampling

_ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
              "BF16": np.dtype(jnp.bfloat16), "F64": np.dtype(np.float64)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# tensors some checkpoints carry that the forward pass recomputes
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------- safetensors I/O

def read_safetensors(file: str | Path) -> dict[str, np.ndarray]:
    """Memory-mapped arrays of one ``.safetensors`` file, by tensor name."""
    file = Path(file)
    if not file.exists():
        raise ConfigError(f"{file}: file not found")
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConfigError(f"{file}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file}: unreadable safetensors header ({e})") from e
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + n) if file.stat().st_size > 8 + n else np.zeros(0, np.uint8)
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dt = _ST_DTYPES.get(meta["dtype"])
        if dt is None:
            raise ConfigError(f"{file}: tensor {name} has dtype {meta['dtype']}; supported: {', '.join(_ST_DTYPES)}")
        begin, end = meta["data_offsets"]
        out[name] = data[begin:end].view(dt).reshape(meta["shape"])
    return out


def write_safetensors(file: str | Path, tensors: dict[str, np.ndarray]) -> None:
    """Write arrays as one ``.safetensors`` file (readable by the ``safetensors`` package)."""
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _ST_NAMES:
            raise ConfigError(f"write_safetensors: tensor {name} has unsupported dtype {arr.dtype}")
        blob = arr.tobytes()
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)


def read_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a Hugging Face directory (single file or sharded index) and the file of each."""
    path = Path(path)
    index, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ConfigError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from e
        tensors, where = {}, {}
        for shard in sorted(set(weight_map.values())):
            f = path / shard
            if not f.exists():
                raise ConfigError(f"{index} names shard {shard}, which is missing from {path}")
            for name, arr in read_safetensors(f).items():
                tensors[name], where[name] = arr, str(f)
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ConfigError(f"{index} maps {missing[0]} to {weight_map[missing[0]]}, which does not hold it")
        return tensors, where
    if single.exists():
        tensors = read_safetensors(single)
        return tensors, {k: str(single) for k in tensors}
    others = sorted(p.name for p in path.glob("*.bin")) if path.is_dir() else []
    hint = f" (found {', '.join(others)}: convert it with save_pretrained(safe_serialization=True))" if others else ""
    raise ConfigError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")


# ----------------------------------------------------------------------------- name and layout mapping

def _hf_layout(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], str]]:
    """HF tensor name -> (hexjax param path, HF shape, conversion kind)."""
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    nq, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    m = {"model.embed_tokens.weight": (("embed", "embedding"), (v, h), "copy"),
         "model.norm.weight": (("final_norm", "scale"), (h,), "copy")}
    if not cfg.tie_word_embeddings:
        m["lm_head.weight"] = (("lm_head", "kernel"), (v, h), "t")
    for i in range(cfg.num_layers):
        p, L = f"model.layers.{i}.", f"layer_{i}"
        m[p + "input_layernorm.weight"] = ((L, "attn_norm", "scale"), (h,), "copy")
        m[p + "post_attention_layernorm.weight"] = ((L, "mlp_norm", "scale"), (h,), "copy")
        for name, n in (("q", nq), ("k", nkv), ("v", nkv)):
            m[p + f"self_attn.{name}_proj.weight"] = ((L, "attn", f"w{name}"), (n * d, h), f"in:{n}:{d}")
            if cfg.attention_bias:
                m[p + f"self_attn.{name}_proj.bias"] = ((L, "attn", f"b{name}"), (n * d,), f"heads:{n}:{d}")
        m[p + "self_attn.o_proj.weight"] = ((L, "attn", "wo"), (h, nq * d), f"out:{nq}:{d}")
        if cfg.attention_bias:
            m[p + "self_attn.o_proj.bias"] = ((L, "attn", "bo"), (h,), "copy")
        for name, shape in (("gate", (f, h)), ("up", (f, h)), ("down", (h, f))):
            m[p + f"mlp.{name}_proj.weight"] = ((L, "mlp", name), shape, "t")
            if cfg.mlp_bias:
                m[p + f"mlp.{name}_proj.bias"] = ((L, "mlp", f"b{name}"), (shape[0],), "copy")
    return m


def _to_hexjax(arr: np.ndarray, kind: str) -> np.ndarray:
    if kind == "copy":
        return arr
    if kind == "t":
        return arr.T
    op, n, d = kind.split(":")
    n, d = int(n), int(d)
    if op == "in":  # [n*d, h] -> [h, n, d]
        return arr.T.reshape(arr.shape[1], n, d)
    if op == "out":  # [h, n*d] -> [n, d, h]
        return arr.T.reshape(n, d, arr.shape[0])
    return arr.reshape(n, d)  # heads: [n*d] -> [n, d]


def _to_hf(arr: np.ndarray, kind: str) -> np.ndarray:
    if kind == "copy":
        return arr
    if kind == "t":
        return arr.T
    op = kind.split(":")[0]
    if op == "in":  # [h, n, d] -> [n*d, h]
        return arr.reshape(arr.shape[0], -1).T
    if op == "out":  # [n, d, h] -> [h, n*d]
        return arr.reshape(-1, arr.shape[-1]).T
    return arr.reshape(-1)


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, dtype: Any = jnp.float32,
                   where: dict[str, str] | None = None) -> dict:
    """Map Hugging Face Llama tensors onto the hexjax parameter tree (cast to ``dtype``)."""
    where = where or {}
    layout = _hf_layout(cfg)
    missing = [n for n in layout if n not in tensors]
    if missing:
        raise ConfigError(f"checkpoint {cfg.name}: tensor {missing[0]} is missing"
                          f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                          "the weights do not match config.json")
    allowed_extra = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = [n for n in tensors if n not in layout and n not in allowed_extra
                  and not n.endswith(_IGNORED_SUFFIXES)]
    if unexpected:
        raise ConfigError(f"{where.get(unexpected[0], cfg.name)}: unexpected tensor {unexpected[0]}"
                          f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}; "
                          "is this a Llama checkpoint matching config.json?")
    np_dtype = np.dtype(dtype)
    params: dict = {}
    for name, (path, shape, kind) in layout.items():
        arr = tensors[name]
        if tuple(arr.shape) != shape:
            raise ConfigError(f"{where.get(name, cfg.name)}: tensor {name} has shape {tuple(arr.shape)} "
                              f"but config.json implies {shape}")
        node = params
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = jnp.asarray(_to_hexjax(arr, kind).astype(np_dtype))
    return params


def params_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The inverse of ``params_from_hf``: Hugging Face tensor names and layouts."""
    out = {}
    for name, (path, _, kind) in _hf_layout(cfg).items():
        node = params
        for k in path:
            node = node[k]
        out[name] = np.ascontiguousarray(_to_hf(np.asarray(node), kind))
    return out


# ----------------------------------------------------------------------------- model object

class LlamaModel:
    """A whole Llama model on one device: ``model(tokens) -> logits`` and ``model.generate``."""

    def __init__(self, cfg: ModelConfig, params: dict, dtype: Any = jnp.float32):
        self.cfg = cfg
        self.params = params
        self.dtype = dtype

    @classmethod
    def random(cls, cfg: ModelConfig, seed: int = 0, dtype: Any = jnp.float32) -> "LlamaModel":
        """Randomly initialised weights (normal, std 0.02)."""
        return cls(cfg, init_params(LlamaStage(cfg, dtype=dtype, param_dtype=dtype), jax.random.key(seed)), dtype)

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self.params))

    @functools.cached_property
    def _forward(self):
        stage = LlamaStage(self.cfg, dtype=self.dtype, param_dtype=self.dtype)

        def fwd(params, tokens):
            pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
            return stage.apply({"params": params}, tokens, pos)[0]
        return jax.jit(fwd)

    def __call__(self, tokens) -> jax.Array:
        """Float32 logits [B,S,V] of token ids [B,S] (causal, positions 0..S-1)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.ndim != 2:
            raise ConfigError(f"LlamaModel: tokens must be [batch, seq], got shape {tokens.shape}")
        return self._forward(self.params, tokens)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: Sampling = Sampling(), eos_id: int | None = None) -> list[list[int]]:
        """New token ids for each prompt (ragged prompts allowed)."""
        return _generate(self.cfg, self.params, prompts, max_new_tokens, sampling,
                         dtype=self.dtype, eos_id=eos_id)

    def save_hf(self, path: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` that transformers' LlamaForCausalLM loads."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_safetensors(path / "model.safetensors", params_to_hf(self.params, self.cfg))
        (path / "config.json").write_text(json.dumps(hf_config_dict(self.cfg, self.dtype), indent=2))


def hf_config_dict(cfg: ModelConfig, dtype: Any = jnp.float32) -> dict:
    """A transformers Llama ``config.json`` for ``cfg`` (rope settings in both layouts)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope.update(rope_type=s.kind, factor=s.factor)
        if s.kind == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position_embeddings)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias, "rope_parameters": rope, "rope_theta": cfg.rope_theta,
        "torch_dtype": np.dtype(dtype).name, "dtype": np.dtype(dtype).name,
    }


def load_hf(path: str | Path, dtype: Any = jnp.float32) -> LlamaModel:
    """Load a Hugging Face Llama directory (``config.json`` + safetensors, single or sharded)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: not a directory; pass a Hugging Face model directory "
                          "holding config.json and model.safetensors")
    cfg = ModelConfig.from_hf(path)
    tensors, where = read_checkpoint(path)
    return LlamaModel(cfg, params_from_hf(tensors, cfg, dtype, where), dtype)
