"""Helpers for tests of the kernels (and of code that uses them), on a GPU or a CPU alike.

The same test runs the Pallas kernels natively when the default backend is a GPU and in
Pallas interpret mode elsewhere: pass ``interpret=default_interpret()``. Float tolerances
for checks against the fp32 references come from ``tolerance``.
"""

from __future__ import annotations

import jax
import jax.extend as jex
import jax.numpy as jnp

from hexjax.kernels.tuning import GPU_PLATFORMS


def default_interpret() -> bool:
    """True unless the default backend is a GPU: the kernels can only be interpreted there."""
    return jax.default_backend() not in GPU_PLATFORMS


def tolerance(dtype, *, native: bool) -> float:
    """atol = rtol for kernel outputs against the references, by input dtype.

    Interpret mode computes on the CPU in fp32 exactly like the references (1e-5 for float32).
    Native GPU kernels differ in summation order and exp2, but float32 stays within 1e-4: a
    TF32 dot anywhere (about 1e-3) fails it. 16-bit inputs: 2e-2 (bfloat16), 1e-2 (float16).
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return 1e-4 if native else 1e-5
    return {jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float16): 1e-2}[dtype]


def pallas_interpret_flags(fn, *args) -> list[bool]:
    """The ``interpret`` setting of every pallas_call that ``fn(*args)`` traces to, in order.

    Empty: ``fn`` runs no Pallas kernel (the jnp references). Only traces (``make_jaxpr``),
    so args may be ``jax.ShapeDtypeStruct`` and kernels for a GPU can be inspected on a CPU.
    """
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                found.append(bool(eqn.params["interpret"]))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if isinstance(sub, jex.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jex.core.Jaxpr):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def default_matmul_precision():
    """Generator for an autouse fixture: run under the default matmul precision, not a suite-wide
    "highest" (tests/conftest.py sets it).

    On a GPU the default makes unspecified float32 dots TF32; the kernels and references must
    ask for full precision themselves, so float32 tolerances catch a dot that does not.
    """
    with jax.default_matmul_precision("default"):
        yield
