"""``hexjax launch``: run a command as N local processes of one ``jax.distributed`` run (loopback).

``hexjax launch --processes 2 --devices-per-process 4 -- hexjax generate --model tiny --plan P ...``
starts two processes with four virtual CPU devices each; process ``i`` owns the
plan's devices ``i*K .. i*K+K-1``.  A ``hexjax ...`` command runs through
``python -m hexjax.runtime.distributed`` (which joins the run, then runs the
command with its stages on the processes owning their devices); any other
command gets the ``HEXJAX_*`` variables and calls
``hexjax.runtime.distributed.initialize_from_env()`` itself.  Process 0's
output is shown; the others' stdout is dropped unless ``--all-output``.
On real hosts each process is started by hand or by the job system instead,
with ``--coordinator/--num-processes/--process-id`` or the job's environment
(``hexjax.cli._distributed``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import typer


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def child_command(command: list[str]) -> list[str]:
    if command and os.path.basename(command[0]) == "hexjax":
        return [sys.executable, "-m", "hexjax.runtime.distributed", *command[1:]]
    return list(command)


def launch(command: list[str], processes: int, devices_per_process: int, *, host: str = "127.0.0.1",
           heartbeat_s: int = 10, init_timeout_s: int = 60, timeout_s: float | None = None,
           grace_s: float = 30.0, all_output: bool = False, log=None) -> int:
    """Run ``command`` as ``processes`` processes; the exit code of the run (0 when all succeed).

    When one process fails, the others get ``grace_s`` seconds to end (JAX's coordination service
    aborts them once it notices, within ``heartbeat_s``), then are killed; the run fails.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if processes < 1 or devices_per_process < 1:
        raise typer.BadParameter("--processes and --devices-per-process must be at least 1")
    if not command:
        raise typer.BadParameter("give the command to run after --")
    coordinator = f"{host}:{free_port(host)}"
    argv = child_command(command)
    procs: list[subprocess.Popen] = []
    for i in range(processes):
        env = dict(os.environ)
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count=")]
        env.update({
            "HEXJAX_COORDINATOR": coordinator, "HEXJAX_NUM_PROCESSES": str(processes),
            "HEXJAX_PROCESS_ID": str(i), "HEXJAX_LOCAL_DEVICES": str(devices_per_process),
            "HEXJAX_TRANSFER_ADDRESS": f"{host}:{free_port(host)}",
            "HEXJAX_HEARTBEAT_S": str(heartbeat_s), "HEXJAX_INIT_TIMEOUT_S": str(init_timeout_s),
            "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"]),
            "JAX_PLATFORMS": env.get("JAX_PLATFORMS", "cpu"), "PYTHONUNBUFFERED": "1",
        })
        out = None if (i == 0 or all_output) else subprocess.DEVNULL
        procs.append(subprocess.Popen(argv, env=env, stdout=out))
    start, failed_at, code = time.monotonic(), None, 0
    # Ctrl-C reaches every process of the group: wait for them to stop by themselves (a server's process 0
    # stops the others), then kill what is left after the grace
    interrupted: list[float] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(time.monotonic()))
    except ValueError:   # not the main thread
        previous = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            break
        if interrupted and failed_at is None:
            failed_at = interrupted[0]
            log(f"hexjax launch: interrupted; the processes get {grace_s:.0f} s to stop (again: kill now)")
        if len(interrupted) > 1:
            failed_at = time.monotonic() - grace_s
        bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        now = time.monotonic()
        if bad and failed_at is None:
            failed_at = now
            i, c = bad[0]
            log(f"hexjax launch: process {i} exited with code {c}; the others get {grace_s:.0f} s to stop")
        if timeout_s is not None and now - start > timeout_s and failed_at is None:
            failed_at = now - grace_s   # kill now
            log(f"hexjax launch: the run took longer than {timeout_s:.0f} s; stopping it")
            code = 124
        if failed_at is not None and now - failed_at >= grace_s:
            for i, p in enumerate(procs):
                if p.poll() is None:
                    log(f"hexjax launch: killing process {i} (pid {p.pid})")
                    p.kill()
            for p in procs:
                p.wait()
            break
        time.sleep(0.1)
    if previous is not None:
        signal.signal(signal.SIGINT, previous)
    codes = [p.returncode for p in procs]
    if any(c != 0 for c in codes):
        log("hexjax launch: run failed; exit codes per process: "
            + ", ".join(f"{i}: {c}" for i, c in enumerate(codes)))
        return code or next((c for c in codes if c > 0), 1)
    return 0


def register(app: typer.Typer) -> None:
    @app.command(name="launch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def launch_cmd(
        command: list[str] = typer.Argument(..., help="The command to run in every process (after --)."),
        processes: int = typer.Option(2, "--processes", "-n", help="Number of processes."),
        devices_per_process: int = typer.Option(
            1, "--devices-per-process", "-k", help="Virtual CPU devices in each process."),
        heartbeat: int = typer.Option(10, "--heartbeat", help="Seconds before a silent process fails the run."),
        init_timeout: int = typer.Option(60, "--init-timeout", help="Seconds to wait for every process to join."),
        timeout: float = typer.Option(None, "--timeout", help="Stop the run after this many seconds."),
        grace: float = typer.Option(30.0, "--grace", help="Seconds the others get after a process fails."),
        all_output: bool = typer.Option(False, "--all-output", help="Show every process's stdout."),
    ):
        """Run a command as several local processes of one jax.distributed run (127.0.0.1).

        Example: hexjax launch --processes 2 --devices-per-process 4 -- hexjax generate --model tiny
        --plan plan.json --virtual-devices 8 --prompt-ids 1,2,3
        """
        raise typer.Exit(launch(command, processes, devices_per_process, heartbeat_s=heartbeat,
                                init_timeout_s=init_timeout, timeout_s=timeout, grace_s=grace,
                                all_output=all_output))
