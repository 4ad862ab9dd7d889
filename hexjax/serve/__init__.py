"""Serving: a continuous-batching engine over a plan's stage programs, and an OpenAI-compatible HTTP API."""

from hexjax.serve.engine import Engine, RequestOutput, SamplingParams

__all__ = ["Engine", "RequestOutput", "SamplingParams"]
