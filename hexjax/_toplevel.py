"""Keep the repository's ``kernels/`` and ``search/`` folders from shadowing other distributions.

Those folders are ``hexjax.kernels`` and ``hexjax.search`` (setuptools'
``package-dir``).  Wherever the repository root is on ``sys.path`` (``python -m
pytest``, a REPL or a script started there), Python also finds them under the
top-level names ``kernels`` and ``search``, which other distributions own (the
newest ``transformers`` imports the PyPI package ``kernels``).  Their
``__init__`` calls ``step_aside`` when imported under such a name: the name then
resolves as if the root were not on the path.
"""

from __future__ import annotations

import importlib
import os
import sys


def step_aside(name: str, folder: str) -> None:
    """Replace the module ``name`` being imported from ``folder`` by what the rest of ``sys.path`` gives."""
    root = os.path.dirname(os.path.abspath(folder))
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if os.path.abspath(p or os.curdir) != root]
    del sys.modules[name]
    try:
        importlib.import_module(name)   # becomes sys.modules[name], which the outer import returns
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"No module named {name!r}: the folder {folder} is hexjax's, importable as 'hexjax.{name}'",
            name=name) from None
    finally:
        sys.path[:] = saved
