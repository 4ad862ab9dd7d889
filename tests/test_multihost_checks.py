"""Start-up checks of a multi-process run: the coordinator address, the cluster file's host -> process
mapping, and every process holding the same plan and cluster and the devices its hosts declare.

Each mismatch is found by comparing what two processes report through JAX's coordination service (or a
process's devices against the cluster file), and must end every process with one clear error line."""

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from hexjax.cluster import Cluster
from hexjax.errors import ConfigError
from hexjax.plan import Plan, Replica, Stage
from hexjax.runtime import distributed

HEXJAX = [sys.executable, "-c", "from hexjax.cli import main; main()"]
PLAN = Plan("tiny", "", (Replica((Stage((0, 2), (0, 1), tp=2), Stage((2, 4), (4, 5), dp=2))),))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(local_devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEXJAX_")}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.update({"XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={local_devices}"]),
                "JAX_PLATFORMS": "cpu", "HEXJAX_HEARTBEAT_S": "10", "HEXJAX_INIT_TIMEOUT_S": "60", **extra})
    return env


def run_processes(argvs: list[list[str]], env: dict, timeout: float) -> list[subprocess.CompletedProcess]:
    """Run one command per process at once; every process is killed if the whole takes over ``timeout``."""
    procs = [subprocess.Popen(a, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in argvs]
    deadline, out = time.monotonic() + timeout, []
    try:
        for p, a in zip(procs, argvs):
            o, e = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append(subprocess.CompletedProcess(a, p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr[-2000:]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, stderr[-2000:]
    return errors[0]


# ---- the coordinator address ----

def test_an_unreachable_coordinator_is_a_clear_error_within_the_timeout(tmp_path):
    plan_file = tmp_path / "plan.json"
    PLAN.save(plan_file)
    port = _free_port()   # nobody listens there
    t = time.monotonic()
    res = subprocess.run(HEXJAX + ["generate", "--model", "tiny", "--plan", str(plan_file), "--prompt-ids", "1,2",
                                   "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1"],
                         env=_env(4, HEXJAX_INIT_TIMEOUT_S="3"), capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t
    assert res.returncode == 2
    line = _error_line(res.stderr)
    assert f"127.0.0.1:{port}: process 1 could not reach the coordinator within 3 s" in line, line
    assert took < 60


@pytest.mark.parametrize("args, message", [
    (("localhost", 2, 0), "is not HOST:PORT"),
    (("127.0.0.1:99999", 2, 0), "is not HOST:PORT"),
    (("127.0.0.1:1234", 2, 2), "--process-id 2 is not in 0..1"),
    (("127.0.0.1:1234", None, 1), "--num-processes missing"),
    (("no-such-host.invalid:1234", 2, 1), "cannot resolve host 'no-such-host.invalid'"),
    # process 0 runs the coordinator: the address must be one of its own
    (("192.0.2.1:1234", 2, 0), "not an address of this machine"),
])
def test_bad_coordinator_arguments_are_refused_before_jax_starts(args, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        distributed.join(*args, environ={}, detect=False)
    assert not distributed._state["initialized"]


def test_a_coordinator_port_in_use_is_refused_for_process_0():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ConfigError, match="already in use"):
            distributed.check_coordinator(f"127.0.0.1:{s.getsockname()[1]}", 0, 1)


def test_no_flags_and_no_job_environment_is_one_process():
    assert distributed.join(environ={}, detect=False) is False


def test_slurm_environment_is_detected_through_jax():
    """JAX's own Slurm detection gives the coordinator (first node of the job), process count and id."""
    env = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[3-4]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
           "SLURM_LOCALID": "0"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        found = distributed.detect_cluster_env()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    assert found is not None and found[0] == "SlurmCluster"
    name, coordinator, n, pid = found
    assert coordinator.startswith("node3:") and (n, pid) == (2, 1)


# ---- the cluster file's processes ----

def _cluster(processes, counts=(2, 2, 4), devices=("A100-40G", "A100-40G", "A6000")):
    hosts = []
    for k, (p, c, d) in enumerate(zip(processes, counts, devices)):
        h = {"name": f"h{k}", "device": d, "count": c}
        if p is not None:
            h["process"] = p
        hosts.append(h)
    return Cluster.from_dict({"host": hosts})


def test_hosts_map_to_processes_in_host_order_by_default_or_by_field():
    c = _cluster([None, None, None])
    assert c.num_processes == 3 and [c.process_of_host(k) for k in range(3)] == [0, 1, 2]
    c = _cluster([0, 0, 1])
    assert c.num_processes == 2 and [h.name for h in c.hosts_of_process(0)] == ["h0", "h1"]
    assert Cluster.from_dict(c.to_dict()) == c and "process = 0" in c.to_toml()
    assert c.fingerprint() != _cluster([None, None, None]).fingerprint()


@pytest.mark.parametrize("processes, message", [
    ([0, 2, 1], "host 'h1' is process 2 after host 'h0' of process 0"),
    ([1, 1, 2], "the first host 'h0' is process 1"),
    ([0, None, 1], "host 'h1' has no process field but other hosts do"),
    ([0, -1, 1], r"host\[1\].process: expected a non-negative integer"),
    ([0, "1", 1], r"host\[1\].process: expected a non-negative integer, got a string"),
])
def test_bad_process_fields_are_refused(processes, message):
    with pytest.raises(ConfigError, match=message):
        _cluster(processes)


def test_device_problems_name_the_process_the_host_and_the_field():
    c = _cluster([0, 0, 1])
    assert distributed.device_problems(c, 1, 4, ["NVIDIA RTX A6000"] * 4, "gpu") == []
    assert distributed.device_problems(c, 0, 4, ["NVIDIA A100-SXM4-40GB"] * 4, "gpu") == []
    assert distributed.device_problems(c, 1, 4, ["NVIDIA A100-SXM4-40GB"] * 4, "gpu") == [
        "process 1: host 'h2' declares A6000 but the process sees NVIDIA A100-SXM4-40GB"]
    assert distributed.device_problems(c, 0, 3, ["cpu"] * 3, "cpu") == [
        "process 0 sees 3 cpu device(s) but its host(s) declare 4 ('h0': 2 x A100-40G, 'h1': 2 x A100-40G)"]
    # CPU devices stand in for any declared kind (a cluster simulated on virtual devices)
    assert distributed.device_problems(c, 1, 4, ["cpu"] * 4, "cpu") == []


# ---- across processes, through the coordination service ----

def test_processes_with_devices_other_than_the_cluster_declares_all_stop(tmp_path):
    """Two ``hexjax generate`` processes started by hand with the flags, 4 devices each, against a
    cluster whose hosts declare 3 and 5: both end with the same error naming both processes."""
    plan_file, cluster_file = tmp_path / "plan.json", tmp_path / "c.toml"
    PLAN.save(plan_file)
    cluster_file.write_text('[[host]]\nname = "a"\ndevice = "A100-40G"\ncount = 3\n\n'
                            '[[host]]\nname = "b"\ndevice = "A100-40G"\ncount = 5\n')
    coordinator = f"127.0.0.1:{_free_port()}"
    argv = HEXJAX + ["generate", "--model", "tiny", "--plan", str(plan_file), "--cluster", str(cluster_file),
                     "--virtual-devices", "8", "--prompt-ids", "1,2", "--coordinator", coordinator,
                     "--num-processes", "2"]
    results = run_processes([argv + ["--process-id", str(i)] for i in range(2)], _env(4), timeout=150)
    for r in results:
        assert r.returncode == 2, r.stderr[-2000:]
        line = _error_line(r.stderr)
        assert "process 0 sees 4 cpu device(s) but its host(s) declare 3 ('a': 3 x A100-40G)" in line, line
        assert "process 1 sees 4 cpu device(s) but its host(s) declare 5 ('b': 5 x A100-40G)" in line, line


MISMATCH = textwrap.dedent("""
    import sys
    from hexjax.errors import ConfigError
    from hexjax.runtime import distributed
    assert distributed.initialize_from_env()
    import jax
    from hexjax.cluster import Cluster
    from hexjax.plan import Plan
    me = jax.process_index()
    plan = Plan.load(sys.argv[1] if me == 0 else sys.argv[2])
    cluster = Cluster.load(sys.argv[3] if me == 0 else sys.argv[4])
    try:
        distributed.check_run(plan, cluster)
    except ConfigError as e:
        # one write: both processes share the launcher's stderr, and print() writes the line and its
        # newline separately, so two lines could interleave
        sys.stderr.write(f"process {me}: error: {e}\\n")
        sys.stderr.flush()
        sys.exit(2)
""")


def test_processes_holding_another_plan_and_cluster_all_stop(tmp_path):
    """Process 1 is given another plan and a cluster with another network: both processes stop, each
    naming process 1 and both fields with their fingerprints."""
    script = tmp_path / "check.py"
    script.write_text(MISMATCH)
    plans = [tmp_path / "p0.json", tmp_path / "p1.json"]
    PLAN.save(plans[0])
    other = Plan("tiny", "", (Replica((Stage((0, 3), (0, 1), tp=2), Stage((3, 4), (4, 5), dp=2))),))
    other.save(plans[1])
    clusters = [tmp_path / "c0.toml", tmp_path / "c1.toml"]
    for bw, path in zip((12.5, 25), clusters):
        path.write_text(f'[network]\nbandwidth_GBps = {bw}\n\n[[host]]\nname = "a"\ndevice = "A100-40G"\ncount = 4\n\n'
                        '[[host]]\nname = "b"\ndevice = "A100-40G"\ncount = 4\n')
    res = subprocess.run(HEXJAX + ["launch", "-n", "2", "-k", "4", "--timeout", "100", "--all-output", "--",
                                   sys.executable, str(script), *map(str, plans), *map(str, clusters)],
                         capture_output=True, text=True, timeout=150, env=_env(1))
    assert res.returncode != 0
    codes = res.stderr.split("exit codes per process: ")[1].splitlines()[0]
    assert codes == "0: 2, 1: 2", res.stderr[-2000:]
    c0, c1 = (Cluster.load(c).fingerprint() for c in clusters)
    assert c0 != c1
    for pid in (0, 1):
        line = next((ln for ln in res.stderr.splitlines() if ln.startswith(f"process {pid}: error:")), None)
        assert line is not None, res.stderr[-3000:]
        assert (f"process 1 holds another plan than process 0 (fingerprint {distributed.fingerprint(other)} vs "
                f"{distributed.fingerprint(PLAN)})") in line, line
        assert f"process 1 holds another cluster than process 0 (fingerprint {c1} vs {c0})" in line, line


def test_a_process_that_never_joins_stops_the_others_with_one_line(tmp_path):
    """Process 0 runs the coordinator and waits for process 1, which never starts."""
    plan_file = tmp_path / "plan.json"
    PLAN.save(plan_file)
    t = time.monotonic()
    res = subprocess.run(HEXJAX + ["generate", "--model", "tiny", "--plan", str(plan_file), "--prompt-ids", "1,2",
                                   "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2",
                                   "--process-id", "0"],
                         env=_env(4, HEXJAX_INIT_TIMEOUT_S="3"), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    line = _error_line(res.stderr)
    assert "not every process joined the run" in line and "within 3 s (this is process 0 of 2)" in line, line
    assert time.monotonic() - t < 60
