"""Execute a Plan on per-stage meshes: pipelined prefill and decode with a paged KV cache."""

from hexjax.runtime.generation import GenerationResult, RunOptions, generate, run_plan
from hexjax.runtime.pages import PageAllocator, PagesExhaustedError

__all__ = ["generate", "run_plan", "RunOptions", "GenerationResult", "PageAllocator",
           "PagesExhaustedError", "verify_plan", "dump_hlo"]


def __getattr__(name):
    if name in ("verify_plan", "dump_hlo"):
        from hexjax.runtime import hlo
        return getattr(hlo, name)
    raise AttributeError(f"module 'hexjax.runtime' has no attribute {name!r}")
