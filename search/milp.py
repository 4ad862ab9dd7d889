"""``scipy.optimize.milp`` (HiGHS) with the solver's native console output kept off standard output.

Some HiGHS builds print diagnostics with the C library straight to file
descriptor 1 whatever the options say (e.g. when repairing a solution found in
the presolved problem). ``hexjax plan --json`` prints a plan on stdout, so the
solver runs with descriptor 1 pointed at stderr and the C buffers flushed
before it is restored.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):      # no C library handle on this platform: nothing buffered to flush
        pass


@contextlib.contextmanager
def native_stdout_to_stderr():
    sys.stdout.flush()
    _flush_c_stdio()
    try:
        saved = os.dup(1)
    except OSError:                        # no descriptor 1 (embedded interpreters): leave it be
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        _flush_c_stdio()
        os.dup2(saved, 1)
        os.close(saved)


def milp(*args, **kwargs):
    from scipy.optimize import milp as scipy_milp

    with native_stdout_to_stderr():
        return scipy_milp(*args, **kwargs)
