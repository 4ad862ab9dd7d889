"""README.md's code blocks run as written.

Blocks marked ```bash run / ```python run (or run-slow, under ``-m slow``) run in
order, each in a fresh process, in a scratch folder that sees the repository's
``examples/``, with the environment a user has: no virtual-device flags from
this test suite.  ```toml cluster blocks must load as clusters.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(\w+)[ \t]*([\w-]*)[ \t]*\n(.*?)^```", re.S | re.M)


def blocks(*marks: str) -> list[tuple[str, str]]:
    return [(lang, body) for lang, mark, body in BLOCK.findall((ROOT / "README.md").read_text())
            if mark in marks]


def run_blocks(tmp_path: Path, marks: tuple[str, ...]) -> None:
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    todo = blocks(*marks)
    assert todo, f"README.md has no blocks marked {marks}"
    for lang, body in todo:
        if lang == "bash":
            cmd = ["bash", "-euo", "pipefail", "-c", body]
        else:
            assert lang == "python", lang
            cmd = [sys.executable, "-c", body]
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
        assert out.returncode == 0, f"README block failed:\n{body}\n--- stderr:\n{out.stderr[-3000:]}"


def test_readme_blocks_run(tmp_path):
    run_blocks(tmp_path, ("run",))


@pytest.mark.slow
def test_readme_blocks_run_with_the_slow_ones(tmp_path):
    run_blocks(tmp_path, ("run", "run-slow"))


def test_readme_cluster_blocks_load():
    import tomllib

    from hexjax.cluster import Cluster
    found = blocks("cluster")
    assert found
    for _, body in found:
        cluster = Cluster.from_dict(tomllib.loads(body))
        assert cluster.num_devices > 0


def test_readme_first_lines_are_the_two_commands():
    """The newcomer's two commands, and the test command that CI runs (.ci/run)."""
    first = blocks("")[0][1].splitlines()
    assert first[0].startswith("pip install -e . && hexjax demo")
    test_cmd = first[1].split("#")[0].strip()
    assert test_cmd == 'pip install -e ".[test]" && python -m pytest -q'
    assert test_cmd in (ROOT / ".ci" / "run").read_text()
