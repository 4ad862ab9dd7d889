"""``hexjax serve`` over two processes: ``hexjax launch`` runs 2 local processes x 4 virtual CPU devices of one
``jax.distributed`` run; process 0 serves HTTP and schedules, process 1 runs every step on its stages.

Requests go over HTTP (the ``openai`` client) to process 0; their greedy tokens are compared with one-process
generation of the same model.  The plan has a replica whose stages span both processes, one on process 0's
devices and one on process 1's."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from hexjax.cli.launch import free_port  # noqa: E402
from hexjax.plan import Plan, Replica, Stage  # noqa: E402

HEXJAX = [sys.executable, "-c", "from hexjax.cli import main; main()"]
# process 0 owns devices 0-3, process 1 devices 4-7
PLAN = Plan("tiny", "", (Replica((Stage((0, 2), (0, 1), tp=2), Stage((2, 4), (4, 5), dp=2))),   # spans both
                         Replica((Stage((0, 4), (2, 3), dp=2),)),                              # process 0
                         Replica((Stage((0, 4), (6, 7), tp=2),))))                             # process 1
LONG = [3, 1, 4, 1, 5]
# 9- and 12-token prompts are prefilled in two chunks (8 tokens a step)
SHORT = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1], [11], [8, 9, 10, 11], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24]]
MAX_TOKENS = [4, 6, 5, 4, 6]


@pytest.fixture(scope="module")
def reference():
    """Greedy tokens of one-process generation (the same random weights, float32)."""
    from hexjax.models import LlamaModel, ModelConfig
    model = LlamaModel.random(ModelConfig.preset("tiny"), seed=0, dtype="float32")
    return model.generate([LONG] + SHORT, 48)


def _children(pid: int) -> dict[int, int]:
    """``{process id: pid}`` of the processes ``hexjax launch`` (pid ``pid``) started."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if b"HEXJAX_PROCESS_ID" in env:
            out[int(env[b"HEXJAX_PROCESS_ID"])] = int(entry)
    return out


class Run:
    """``hexjax launch -n 2 -k 4 -- hexjax serve ...`` in the background, its output collected."""

    def __init__(self, tmp_path, heartbeat: int = 10, model: str = "tiny", plan_file=None,
                 options=("--max-model-len", "64", "--max-step-tokens", "8", "--dtype", "float32"), env=None):
        if plan_file is None:
            plan_file = tmp_path / "plan.json"
            PLAN.save(plan_file)
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            HEXJAX + ["launch", "-n", "2", "-k", "4", "--heartbeat", str(heartbeat), "--grace", "60",
                      "--all-output", "--", "hexjax", "serve", "--model", model, "--plan", str(plan_file),
                      "--virtual-devices", "8", "--port", str(self.port), "--max-batch", "4", "--no-warmup",
                      *options],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
            env=dict(os.environ, **(env or {})))
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, k=sink: k.extend(iter(s.readline, "")), daemon=True).start()
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=240)

    def wait_up(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.stderr()
            try:
                if httpx.get(self.url + "/health", timeout=2).json() == {"status": "ok"}:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise AssertionError("the server did not come up\n" + self.stderr())

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stderr(self) -> str:
        return "".join(self.err)[-4000:]

    def complete(self, prompt, max_tokens: int) -> list[int]:
        r = self.client.completions.create(model=self.model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        return r.choices[0].model_extra["token_ids"]

    def replica_tokens(self) -> dict[int, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line.startswith("hexjax_replica_generation_tokens_total{"):
                out[int(line.split('replica="')[1].split('"')[0])] = float(line.rsplit(" ", 1)[1])
        return out


def _stream(run: Run, prompt, max_tokens: int, tokens: list, first: threading.Event, errors: list) -> None:
    try:
        for ev in run.client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                                temperature=0, stream=True):
            if ev.choices:
                tokens.extend(ev.choices[0].model_extra.get("token_ids") or [])
                if tokens:
                    first.set()
    except Exception as e:   # the server went away (the kill below)
        errors.append(e)
    first.set()


def _kill_and_wait(run, pid: int) -> tuple[int, float]:
    """SIGKILL one process of the run; the launcher's exit code and how long the rest took to end."""
    os.kill(pid, signal.SIGKILL)
    t = time.monotonic()
    code = run.wait(120)
    return code, time.monotonic() - t


def _exit_codes(err: str) -> str:
    return err.split("exit codes per process: ")[1].splitlines()[0]


def test_two_processes_serve_one_process_tokens_and_a_lost_follower_stops_the_server(tmp_path, reference):
    run = Run(tmp_path)
    try:
        run.wait_up()
        # a long streamed request; the others arrive while it decodes and must finish before it (admitted
        # mid-flight by continuous batching, on every replica)
        long_tokens, first, errors = [], threading.Event(), []
        streamer = threading.Thread(target=_stream, args=(run, LONG, 48, long_tokens, first, errors))
        streamer.start()
        assert first.wait(240), run.stderr()
        finished_at, results = {}, {}

        def one(i):
            results[i] = run.complete(SHORT[i], MAX_TOKENS[i])
            finished_at[i] = len(long_tokens)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(SHORT))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        streamer.join(240)
        assert not errors, errors
        assert long_tokens == reference[0]
        for i, want in enumerate(reference[1:]):
            assert results[i] == want[:MAX_TOKENS[i]], i
        assert all(n < 48 for n in finished_at.values()), finished_at   # tokens the long one had by then
        # every replica generated tokens: the one spanning both processes and one on each
        per_replica = run.replica_tokens()
        assert sorted(per_replica) == [0, 1, 2] and all(v > 0 for v in per_replica.values()), per_replica
        assert sum(per_replica.values()) == 48 + sum(MAX_TOKENS)

        # kill the follower while a request decodes: process 0 must stop by itself, naming it
        pids = _children(run.proc.pid)
        assert sorted(pids) == [0, 1], pids
        tokens, first, errors = [], threading.Event(), []
        streamer = threading.Thread(target=_stream, args=(run, LONG, 48, tokens, first, errors), daemon=True)
        streamer.start()
        assert first.wait(120), run.stderr()
        code, took = _kill_and_wait(run, pids[1])
    finally:
        run.kill()
    err = run.stderr()
    assert code != 0, err
    assert took < 40, (took, err)
    assert "killing process" not in err, err   # process 0 ended by itself, not by the launcher
    assert "error: process 1 of the run stopped answering" in err, err
    codes = _exit_codes(err)
    assert codes == "0: 1, 1: -9", codes


def test_step_records_carry_every_input_through_bytes():
    """What process 0 publishes before a step is what a follower runs (penalty counts sent sparse)."""
    import numpy as np
    from hexjax.serve.engine import StepCall
    from hexjax.serve.multiprocess import decode_calls, encode_calls
    rng = np.random.default_rng(0)
    counts = np.zeros((4, 256), np.float32)
    counts[1, [3, 7]] = [2, 1]
    calls = [StepCall(2, "extend", 16, rng.integers(0, 256, (4, 16), dtype=np.int32),
                      (rng.integers(0, 64, (4, 16), dtype=np.int32), np.arange(4, dtype=np.int32)),
                      (rng.integers(0, 9, (4, 4), dtype=np.int32),) * 2),
             StepCall(0, "decode", 16, np.ones((2, 1), np.int32), (np.array([5, 9], np.int32),),
                      (np.zeros((2, 4), np.int32),),
                      dict(seeds=np.array([1, 2], np.int32), temps=np.array([0.5, 0], np.float32),
                           banned=np.array([[2, -1], [2, 3]], np.int32), counts=counts[:2],
                           presence=np.array([0.5, 0], np.float32)), True, 3)]
    back = decode_calls(encode_calls(calls))
    assert decode_calls(encode_calls(None)) is None
    assert len(back) == 2
    for a, b in zip(calls, back):
        assert (a.replica, a.phase, a.width, a.any_sampled, a.top) == (b.replica, b.phase, b.width, b.any_sampled, b.top)
        for x, y in zip((a.x, *a.args, *a.tables), (b.x, *b.args, *b.tables)):
            assert x.dtype == y.dtype and np.array_equal(x, y)
        assert (a.sample is None) == (b.sample is None)
        for k, v in (a.sample or {}).items():
            assert b.sample[k].dtype == v.dtype and np.array_equal(b.sample[k], v), k
        assert set(a.sample or {}) == set(b.sample or {})


@pytest.mark.slow   # another two-process start (~40 s of CPU)
def test_ctrl_c_stops_every_process_cleanly(tmp_path, reference):
    run = Run(tmp_path, env={"HEXJAX_SHOW_PATHS": "1"})
    try:
        run.wait_up()
        assert run.complete(SHORT[1], 6) == reference[2][:6]
        # Ctrl-C in a terminal interrupts the whole group: the server shuts down and sends the stop record,
        # the follower waits for it, the launcher waits for both
        os.killpg(run.proc.pid, signal.SIGINT)
        code = run.wait(120)
    finally:
        run.kill()
    err = run.stderr()
    assert code == 0, err
    assert "process 1: ran " in err and "step(s) of process 0; stopped with it" in err, err
    assert "error:" not in err and "killing process" not in err, err
    for pid in (0, 1):   # every step record and token sent through the key-value store was deleted
        assert f"hexjax.distributed process {pid} moves: " in err and err.count("undeleted values: 0") == 2, err


@pytest.mark.slow   # another two-process start (~40 s of CPU)
def test_a_lost_process_0_ends_the_follower(tmp_path):
    run = Run(tmp_path)
    try:
        run.wait_up()
        pids = _children(run.proc.pid)
        code, took = _kill_and_wait(run, pids[0])
    finally:
        run.kill()
    err = run.stderr()
    assert code != 0 and took < 40, (took, err)
    assert "killing process" not in err, err   # the follower ended by itself
    codes = _exit_codes(err)
    assert codes.startswith("0: -9, 1: ") and codes != "0: -9, 1: 0", codes
    # JAX ends it at once when the coordination service goes (its message names the leader task), or this
    # run's watch does first
    assert "lost process 0" in err or "leader task" in err, err


@pytest.mark.slow   # the README's example: the small model through examples/plans/small-uneven.json
def test_the_readme_example_serves_the_small_model_across_two_processes(tmp_path):
    import concurrent.futures
    from pathlib import Path
    from hexjax.models import LlamaModel, ModelConfig
    plan_file = Path(__file__).resolve().parents[1] / "examples" / "plans" / "small-uneven.json"
    prompts = [[1, 2, 3], [4, 5], [7] * 30, [100, 200, 300, 400]]
    want = LlamaModel.random(ModelConfig.preset("small"), seed=0, dtype="float32").generate(prompts, 8)
    run = Run(tmp_path, model="small", plan_file=plan_file, options=("--max-model-len", "128"))
    try:
        run.wait_up(400)
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as ex:
            got = list(ex.map(lambda p: run.complete(p, 8), prompts))
        assert got == want
        per_replica = run.replica_tokens()
        assert sorted(per_replica) == [0, 1] and all(v > 0 for v in per_replica.values()), per_replica
        os.kill(_children(run.proc.pid)[0], signal.SIGINT)
        code = run.wait(120)
    finally:
        run.kill()
    assert code == 0, run.stderr()


def test_processes_started_with_other_engine_options_stop_with_one_line(tmp_path):
    """Every process must build the same engine (else their programs would differ and the run hang)."""
    from test_multihost_checks import _env, _error_line, _free_port, run_processes
    plan_file = tmp_path / "plan.json"
    PLAN.save(plan_file)
    coordinator = f"127.0.0.1:{_free_port()}"
    argv = HEXJAX + ["serve", "--model", "tiny", "--plan", str(plan_file), "--virtual-devices", "8",
                     "--no-warmup", "--coordinator", coordinator, "--num-processes", "2"]
    results = run_processes([argv + ["--process-id", "0", "--max-batch", "4"],
                             argv + ["--process-id", "1", "--max-batch", "8"]], _env(4), timeout=200)
    for r in results:
        assert r.returncode == 2, r.stderr[-3000:]
        assert "process 1 runs serve with --max-batch = 8 but process 0 with 4" in _error_line(r.stderr)
