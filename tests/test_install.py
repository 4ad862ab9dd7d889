"""The installed project as a user meets it: import names, and what the test install pulled in."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["kernels", "search"])
def test_top_level_folders_do_not_shadow_other_distributions(name):
    """From the repository root (``python -m pytest``, a REPL there), ``kernels`` and ``search``
    must be whatever else provides those names, never hexjax's folders."""
    code = (f"import importlib, sys\n"
            f"try:\n    m = importlib.import_module({name!r})\nexcept ModuleNotFoundError:\n    print('none')\n"
            f"else:\n    print(m.__file__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    where = out.stdout.strip()
    assert not where.startswith(str(ROOT / name)), f"top-level {name!r} resolved to hexjax's folder: {where}"
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        assert where == "none"
    else:
        assert where != "none"


def test_transformers_imports_from_the_repository_root():
    """The newest transformers imports the PyPI package ``kernels``; from the root it must get it."""
    pytest.importorskip("transformers")
    code = "import transformers.integrations.hub_kernels as h; from transformers import LlamaForCausalLM; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_hexjax_kernels_and_search_are_the_folders():
    import hexjax.kernels
    import hexjax.search
    assert Path(hexjax.kernels.__file__).parent == ROOT / "kernels"
    assert Path(hexjax.search.__file__).parent == ROOT / "search"
    assert callable(hexjax.kernels.flash_attention) and callable(hexjax.search.plan)


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="checks CI's fresh CPU install")
def test_ci_install_pulled_no_cuda_wheels():
    """The README's test command on a CPU machine installs no CUDA stack (torch is only an oracle)."""
    cuda = sorted(d.metadata["Name"] for d in importlib.metadata.distributions()
                  if d.metadata["Name"] and d.metadata["Name"].lower().startswith(("nvidia-", "triton")))
    assert not cuda, f"CUDA wheels installed on a CPU machine: {cuda}"
    torch = pytest.importorskip("torch")
    assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build"
