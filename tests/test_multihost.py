"""Several processes: ``hexjax launch`` runs 2 local processes x 4 virtual CPU devices of one
``jax.distributed`` run on 127.0.0.1 (gloo collectives, cross-host transfer sockets)."""

import json
import subprocess
import sys
import textwrap
import time

import pytest

from hexjax.cli.launch import child_command
from hexjax.plan import Plan, Replica, Stage

PROMPTS = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1]]
# process 0 owns devices 0-3, process 1 devices 4-7
PLANS = {
    # stages on both processes, two of them spanning both: handoffs and moves through the host
    "spanning": Plan("tiny", "", (Replica((Stage((0, 1), (0, 1), tp=2), Stage((1, 2), (4, 5), dp=2),
                                           Stage((2, 3), (2, 6), tp=2), Stage((3, 4), (3, 7), dp=2))),)),
    # every stage inside one process, alternating: direct cross-host transfers and handoffs only
    "alternating": Plan("tiny", "", (Replica((Stage((0, 1), (0, 1), tp=2), Stage((1, 2), (4, 5), dp=2),
                                              Stage((2, 3), (2, 3), dp=2), Stage((3, 4), (6, 7), dp=2))),)),
}
MOVES = {"spanning": {"handoff", "host"}, "alternating": {"direct", "handoff"}}
HEXJAX = [sys.executable, "-c", "from hexjax.cli import main; main()"]


def _launch(args, timeout, env_extra=None):
    import os
    env = dict(os.environ, **(env_extra or {}))
    t = time.monotonic()
    res = subprocess.run(HEXJAX + ["launch", "--processes", "2", "--devices-per-process", "4", *args],
                         capture_output=True, text=True, timeout=timeout, env=env)
    return res, time.monotonic() - t


@pytest.fixture(scope="module")
def single_process_tokens():
    from hexjax.models import LlamaModel, ModelConfig
    return LlamaModel.random(ModelConfig.preset("tiny"), seed=0).generate(PROMPTS, 4)


@pytest.mark.parametrize("name", sorted(PLANS))
def test_two_processes_generate_the_single_process_tokens(tmp_path, name, single_process_tokens):
    plan_file = tmp_path / "plan.json"
    PLANS[name].save(plan_file)
    res, _ = _launch(["--timeout", "100", "--", "hexjax", "generate", "--model", "tiny", "--plan", str(plan_file),
                      "--virtual-devices", "8", *sum((["--prompt-ids", ",".join(map(str, p))] for p in PROMPTS), []),
                      "--max-new-tokens", "4", "--json", "--check"],
                     timeout=120, env_extra={"HEXJAX_SHOW_PATHS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, res.stdout   # only process 0 prints
    out = json.loads(lines[0])
    assert out["tokens"] == single_process_tokens and out["matches_single_device"] is True
    for pid in (0, 1):
        moves = next(ln for ln in res.stderr.splitlines() if ln.startswith(f"hexjax.distributed process {pid} moves"))
        assert {kv.split("=")[0] for kv in moves.split(": ")[1].split(", ")} == MOVES[name], moves


DIE = textwrap.dedent("""
    import os, signal, sys, time
    from hexjax.runtime import distributed
    assert distributed.initialize_from_env()
    import jax
    assert len(jax.devices()) == 8 and len(jax.local_devices()) == 4
    if jax.process_index() == int(sys.argv[1]):
        time.sleep(1)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(100)
""")


@pytest.mark.parametrize("victim", [0, 1])
def test_a_killed_process_fails_the_others_within_the_heartbeat(tmp_path, victim):
    script = tmp_path / "die.py"
    script.write_text(DIE)
    # a long grace: the survivor must end by itself (JAX's coordination service), not by the launcher
    res, took = _launch(["--heartbeat", "3", "--grace", "60", "--timeout", "90", "--",
                         sys.executable, str(script), str(victim)], timeout=120)
    assert res.returncode != 0
    assert took < 30, res.stderr[-2000:]
    assert "killing process" not in res.stderr
    survivor = 1 - victim
    codes = res.stderr.split("exit codes per process: ")[1].splitlines()[0]
    assert f"{survivor}: 0" not in codes and f"{victim}: -9" in codes, codes


def test_child_command_runs_hexjax_through_the_distributed_driver():
    assert child_command(["hexjax", "generate", "--model", "tiny"]) == \
        [sys.executable, "-m", "hexjax.runtime.distributed", "generate", "--model", "tiny"]
    assert child_command(["python", "x.py"]) == ["python", "x.py"]
