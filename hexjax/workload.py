"""What a plan is asked to serve: prompt and output lengths, batch, rate, latency target."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from hexjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Workload:
    """A serving workload, the input of the cost model and the search."""

    prompt_len: int
    """Tokens in each request's prompt."""
    output_len: int
    """Tokens generated for each request (the first comes out of prefill)."""
    batch: int = 1
    """Requests in flight per replica (its KV cache holds this many sequences)."""
    rate_per_s: float | None = None
    """Optional arrival rate the plan must sustain, requests per second."""
    slo_s: float | None = None
    """Optional bound on each request's end-to-end latency, seconds."""

    def __post_init__(self):
        for field in ("prompt_len", "output_len", "batch"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"workload: {field} must be a positive integer, got {value!r}")
        for field in ("rate_per_s", "slo_s"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"workload: {field} must be a positive number or None, got {value!r}")

    @property
    def context_len(self) -> int:
        """Longest sequence a request reaches: prompt plus output."""
        return self.prompt_len + self.output_len

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @staticmethod
    def from_dict(d: dict[str, Any], where: str = "workload") -> "Workload":
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: must be an object with prompt_len and output_len, got {d!r}")
        known = {f.name for f in dataclasses.fields(Workload)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for field in ("prompt_len", "output_len"):
            if field not in d:
                raise ConfigError(f"{where}: missing {field!r}")
        return Workload(**d)


TRAIN_DTYPES = {"float32": 4, "bfloat16": 2}
"""Parameter/activation dtypes of a training workload; bfloat16 is mixed precision (float32 master weights
and moments)."""
REMAT = ("none", "full")
OPTIMIZERS = ("adamw",)
DEFAULT_MICROBATCHES = (1, 2, 4, 8, 16, 32)


@dataclasses.dataclass(frozen=True)
class TrainWorkload:
    """A training workload: what one optimizer step processes and how, the input of the training search."""

    seq_len: int
    """Tokens per sequence."""
    global_batch: int
    """Sequences per optimizer step, split between the replicas."""
    microbatches: tuple[int, ...] = DEFAULT_MICROBATCHES
    """Microbatch counts the search may choose from (one count for every replica of a plan)."""
    remat: str = "none"
    """``none`` (stash every layer's activations) or ``full`` (stash layer inputs, recompute the forward)."""
    optimizer: str = "adamw"
    """Only AdamW: two float32 moments per parameter."""
    dtype: str = "bfloat16"
    """``bfloat16`` (mixed precision: bf16 parameters, gradients and activations, float32 master weights
    and moments) or ``float32`` (everything float32)."""

    def __post_init__(self):
        for field in ("seq_len", "global_batch"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"train workload: {field} must be a positive integer, got {value!r}")
        mbs = self.microbatches
        if isinstance(mbs, int) and not isinstance(mbs, bool):
            mbs = (mbs,)
        if not isinstance(mbs, (tuple, list)) or not mbs or any(
                isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mbs):
            raise ConfigError(f"train workload: microbatches must be positive integers, got {self.microbatches!r}")
        mbs = tuple(sorted(set(mbs)))
        if mbs[0] > self.global_batch:
            raise ConfigError(f"train workload: every microbatch count {list(mbs)} exceeds the global batch "
                              f"{self.global_batch}; use counts of at most {self.global_batch}")
        object.__setattr__(self, "microbatches", tuple(m for m in mbs if m <= self.global_batch))
        if self.remat not in REMAT:
            raise ConfigError(f"train workload: remat must be one of {', '.join(REMAT)}, got {self.remat!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"train workload: optimizer must be one of {', '.join(OPTIMIZERS)}, "
                              f"got {self.optimizer!r}")
        if self.dtype not in TRAIN_DTYPES:
            raise ConfigError(f"train workload: dtype must be one of {', '.join(TRAIN_DTYPES)}, got {self.dtype!r}")

    @property
    def dtype_bytes(self) -> int:
        """Bytes of a parameter, gradient and activation element."""
        return TRAIN_DTYPES[self.dtype]

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.global_batch

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["microbatches"] = list(self.microbatches)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any], where: str = "train workload") -> "TrainWorkload":
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: must be an object with seq_len and global_batch, got {d!r}")
        known = {f.name for f in dataclasses.fields(TrainWorkload)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for field in ("seq_len", "global_batch"):
            if field not in d:
                raise ConfigError(f"{where}: missing {field!r}")
        d = dict(d)
        if isinstance(d.get("microbatches"), list):
            d["microbatches"] = tuple(d["microbatches"])
        try:
            return TrainWorkload(**d)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
