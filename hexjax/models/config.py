"""Llama-family model configuration: presets and Hugging Face ``config.json``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from hexjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are rescaled for long contexts."""

    kind: str
    """``"linear"`` (positions divided by ``factor``) or ``"llama3"`` (Llama-3.1 band-wise scaling)."""
    factor: float
    """Context extension factor."""
    low_freq_factor: float = 1.0
    """llama3 only: wavelengths above ``original_max / low_freq_factor`` are divided by ``factor``."""
    high_freq_factor: float = 4.0
    """llama3 only: wavelengths below ``original_max / high_freq_factor`` are kept."""
    original_max_position_embeddings: int = 8192
    """llama3 only: the context length the model was pre-trained with."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU)."""

    name: str
    """Preset name or the directory the config came from."""
    vocab_size: int
    """Number of token ids."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    num_layers: int
    """Number of decoder layers."""
    num_heads: int
    """Query heads per layer."""
    num_kv_heads: int
    """Key/value heads per layer (grouped-query attention when fewer than ``num_heads``)."""
    head_dim: int = 0
    """Width of one head; 0 means ``hidden_size // num_heads``."""
    rms_norm_eps: float = 1e-5
    """Epsilon inside RMSNorm."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    rope_scaling: RopeScaling | None = None
    """Optional rescaling of rotary frequencies."""
    max_position_embeddings: int = 4096
    """Longest context the model supports."""
    tie_word_embeddings: bool = False
    """LM head shares the token embedding matrix."""
    attention_bias: bool = False
    """q/k/v/o projections carry biases (Hugging Face ``attention_bias``)."""
    mlp_bias: bool = False
    """gate/up/down projections carry biases."""

    def __post_init__(self):
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"{self.name}: hidden_size {self.hidden_size} is not divisible by "
                    f"num_heads {self.num_heads}; set head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                      "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"{self.name}: {field} must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{self.name}: num_heads {self.num_heads} is not a multiple of "
                f"num_kv_heads {self.num_kv_heads}")

    # ---- sizes (parameter counts, used by the cost model) ----

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (projections, biases, two norms)."""
        h, f = self.hidden_size, self.intermediate_size
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size + h
        mlp = 3 * h * f + (2 * f + h if self.mlp_bias else 0)
        return attn + mlp + 2 * h

    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """Final norm plus the LM head (zero extra matrix when tied)."""
        return self.hidden_size + (0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size)

    @property
    def num_params(self) -> int:
        return self.embed_params + self.num_layers * self.layer_params + self.head_params

    def layer_flops_per_token(self, context: int) -> float:
        """Forward FLOPs of one layer for one token attending to ``context`` keys."""
        h, f = self.hidden_size, self.intermediate_size
        matmul = 2 * (h * self.q_size + 2 * h * self.kv_size + self.q_size * h + 3 * h * f)
        attention = 2 * 2 * self.num_heads * self.head_dim * context
        return float(matmul + attention)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV-cache bytes of one token across one layer (all KV heads)."""
        return 2 * self.kv_size * dtype_bytes

    # ---- constructors ----

    @staticmethod
    def preset(name: str) -> "ModelConfig":
        key = name.lower()
        if key not in PRESETS:
            known = ", ".join(sorted(PRESETS))
            if not name.strip():
                raise ConfigError(f"the model name is empty; give a preset name ({known}) "
                                  "or a Hugging Face model directory")
            if "/" in name or "\\" in name or name.startswith((".", "~")):
                raise ConfigError(f"model directory {name} does not exist; give an existing Hugging Face model "
                                  f"directory (with config.json), or a preset name ({known})")
            import difflib
            close = difflib.get_close_matches(key, PRESETS, n=3, cutoff=0.4)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown model preset {name!r}.{hint} Known presets: {known}")
        return PRESETS[key]

    @staticmethod
    def load(name_or_dir: str | Path) -> "ModelConfig":
        """A preset name, or a directory (or file) holding a Hugging Face ``config.json``."""
        path = Path(name_or_dir)
        if path.exists():
            return ModelConfig.from_hf(path)
        return ModelConfig.preset(str(name_or_dir))

    @staticmethod
    def from_hf(path: str | Path | dict) -> "ModelConfig":
        """Read a Hugging Face Llama ``config.json`` (a directory, the file, or its dict)."""
        if isinstance(path, dict):
            d, where = dict(path), "config dict"
        else:
            path = Path(path)
            file = path / "config.json" if path.is_dir() else path
            if not path.exists():
                raise ConfigError(f"model directory {path} does not exist; give an existing Hugging Face model "
                                  f"directory (with config.json), or a preset name ({', '.join(sorted(PRESETS))})")
            if not file.exists():
                raise ConfigError(f"{path}: no config.json in this directory; give a Hugging Face model directory "
                                  f"(with config.json), or a preset name ({', '.join(sorted(PRESETS))})")
            try:
                d = json.loads(file.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{file}: not valid JSON ({e})") from e
            where = str(file)
        return _from_hf_dict(d, where)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _from_hf_dict(d: dict, where: str) -> ModelConfig:
    model_type = d.get("model_type", "llama")
    if model_type != "llama":
        raise ConfigError(f"{where}: model_type {model_type!r} is not supported; hexjax runs Llama-family models (model_type 'llama')")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: hidden_act {act!r} is not supported; Llama's SwiGLU needs 'silu'")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if field not in d:
            raise ConfigError(f"{where}: missing required field {field!r}")

    # transformers >= 5 nests rope settings in rope_parameters; older files keep them at top level
    rope = d.get("rope_parameters")
    if rope is None:
        rope = dict(d.get("rope_scaling") or {})
        rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    rope = dict(rope)
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    max_pos = int(d.get("max_position_embeddings", 4096))
    if kind == "default":
        scaling = None
    elif kind == "linear":
        scaling = RopeScaling("linear", float(rope["factor"]))
    elif kind == "llama3":
        try:
            scaling = RopeScaling(
                "llama3", float(rope["factor"]), float(rope["low_freq_factor"]),
                float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
        except KeyError as e:
            raise ConfigError(f"{where}: llama3 rope scaling is missing {e.args[0]!r}") from None
    else:
        raise ConfigError(
            f"{where}: rope_type {kind!r} is not supported (supported: default, linear, llama3); "
            "running it as plain RoPE would give wrong results")

    heads = int(d["num_attention_heads"])
    return ModelConfig(
        name=where.removesuffix("/config.json"),
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or 0),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", False)),
        mlp_bias=bool(d.get("mlp_bias", False)),
    )


_L3_SCALING = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)

PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        # Llama 2 (Touvron et al. 2023, Hugging Face meta-llama/Llama-2-*-hf config.json)
        ModelConfig("llama-2-7b", 32000, 4096, 11008, 32, 32, 32, max_position_embeddings=4096),
        ModelConfig("llama-2-13b", 32000, 5120, 13824, 40, 40, 40, max_position_embeddings=4096),
        ModelConfig("llama-2-70b", 32000, 8192, 28672, 80, 64, 8, max_position_embeddings=4096),
        # Llama 3 / 3.1 (meta-llama/Meta-Llama-3-*, Llama-3.1-* config.json)
        ModelConfig("llama-3-8b", 128256, 4096, 14336, 32, 32, 8, rope_theta=500000.0, max_position_embeddings=8192),
        ModelConfig("llama-3-70b", 128256, 8192, 28672, 80, 64, 8, rope_theta=500000.0, max_position_embeddings=8192),
        ModelConfig("llama-3.1-8b", 128256, 4096, 14336, 32, 32, 8, rope_theta=500000.0,
                    rope_scaling=_L3_SCALING, max_position_embeddings=131072),
        ModelConfig("llama-3.1-70b", 128256, 8192, 28672, 80, 64, 8, rope_theta=500000.0,
                    rope_scaling=_L3_SCALING, max_position_embeddings=131072),
        # small configurations for tests, examples and CPU benchmarks
        ModelConfig("tiny", 256, 64, 128, 4, 4, 2, max_position_embeddings=512),
        ModelConfig("tiny-mha", 256, 64, 128, 4, 4, 4, max_position_embeddings=512),
        ModelConfig("small", 1024, 128, 352, 8, 8, 4, max_position_embeddings=1024),
        ModelConfig("llama-125m", 32000, 768, 2048, 12, 12, 4, max_position_embeddings=2048),
    ]
}


def format_bytes(n: float) -> str:
    """Bytes as a short human string (GiB for large values)."""
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB" if n >= 1024 else f"{int(n)} B"


