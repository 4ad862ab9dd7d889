"""Execute a Plan on per-stage meshes: pipelined prefill and decode with a paged KV cache.

``build`` says what each stage is (the one stage builder), ``stage`` compiles
it, ``pipeline`` drives a replica, ``generation`` runs a plan; ``compile``,
``verify`` and ``dump`` are the compiler's views of the same stages.
"""

from hexjax.runtime.build import RunOptions
from hexjax.runtime.generation import GenerationResult, generate, plan_dtype, run_plan
from hexjax.runtime.pages import PageAllocator, PagesExhaustedError

__all__ = ["generate", "run_plan", "RunOptions", "GenerationResult", "PageAllocator", "PagesExhaustedError",
           "plan_dtype", "compile_plan", "compile_devices", "verify_plan", "dump_hlo"]

_LAZY = {"compile_plan": "compile", "compile_devices": "compile", "verify_plan": "verify", "dump_hlo": "dump"}


def __getattr__(name):
    if name in _LAZY:   # these import the cost model and search; keep `import hexjax.runtime` light
        import importlib
        return getattr(importlib.import_module(f"hexjax.runtime.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'hexjax.runtime' has no attribute {name!r}")
