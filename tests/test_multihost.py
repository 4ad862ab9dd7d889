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
# the alternating plan also runs against a cluster file whose process 0 drives two hosts (checked at start)
CLUSTER = """
[[host]]
name = "a"
device = "A100-40G"
count = 2
process = 0

[[host]]
name = "b"
device = "A100-40G"
count = 2
process = 0

[[host]]
name = "c"
device = "A6000"
count = 4
process = 1
"""
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


# "spanning" (stages across the two processes, the host path) is slow: training across processes
# (test_multihost_train.py) takes the host path in the default run
@pytest.mark.parametrize("name", [pytest.param("spanning", marks=pytest.mark.slow), "alternating"])
def test_two_processes_generate_the_single_process_tokens(tmp_path, name, single_process_tokens):
    plan_file = tmp_path / "plan.json"
    PLANS[name].save(plan_file)
    cluster = []
    if name == "alternating":
        (tmp_path / "c.toml").write_text(CLUSTER)
        cluster = ["--cluster", str(tmp_path / "c.toml")]
    res, _ = _launch(["--timeout", "100", "--", "hexjax", "generate", "--model", "tiny", "--plan", str(plan_file), *cluster,
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
        taken, undeleted = moves.split(": ", 1)[1].split("; undeleted values: ")
        assert {kv.split("=")[0] for kv in taken.split(", ")} == MOVES[name], moves
        assert undeleted == "0", moves   # values sent through the key-value store are deleted once read


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


# three processes x 2 devices: replica 0 on process 0, replica 1 from process 1 to process 2, replica 2 on process 1
THREE = Plan("tiny", "", (Replica((Stage((0, 4), (0, 1), tp=2),)),
                          Replica((Stage((0, 1), (2,)), Stage((1, 4), (4, 5), dp=2))),
                          Replica((Stage((0, 4), (3,)),))))
PROMPTS_3 = [[5, 6, 7], [1, 2, 3, 4, 5, 6], [11], [8, 9, 10, 11], [2, 4, 6, 8, 10]]


@pytest.mark.slow   # ~45 s of CPU for three processes' compiles
def test_three_processes_started_by_flags_serve_different_requests_per_replica(tmp_path):
    """Each process is started by hand with --coordinator/--num-processes/--process-id (no launcher);
    every process ends with the tokens of one-process generation, the replicas having split the requests."""
    from test_multihost_checks import _env, _free_port, run_processes
    from hexjax.models import LlamaModel, ModelConfig
    from hexjax.runtime.generation import split_requests
    plan_file = tmp_path / "plan.json"
    THREE.save(plan_file)
    coordinator = f"127.0.0.1:{_free_port()}"
    argv = HEXJAX + ["generate", "--model", "tiny", "--plan", str(plan_file), "--virtual-devices", "6",
                     *sum((["--prompt-ids", ",".join(map(str, p))] for p in PROMPTS_3), []),
                     "--max-new-tokens", "3", "--json", "--coordinator", coordinator, "--num-processes", "3"]
    results = run_processes([argv + ["--process-id", str(i)] for i in range(3)], _env(2), timeout=200)
    want = LlamaModel.random(ModelConfig.preset("tiny"), seed=0).generate(PROMPTS_3, 3)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("{")))
        assert out["tokens"] == want
    # the three replicas (on processes {0}, {1, 2} and {1}) each served requests of their own
    shares = split_requests(len(PROMPTS_3), len(THREE.replicas))   # what run_plan gives each replica
    assert len(shares) == 3 and all(shares) and sorted(sum(map(list, shares), [])) == list(range(len(PROMPTS_3)))
