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
