"""Test set-up: 8 virtual CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def hexjax(capsys, monkeypatch):
    """Run the ``hexjax`` entry point (``main``, as the installed command does): (exit code, stdout, stderr)."""
    from hexjax.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["hexjax", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err
    return run
