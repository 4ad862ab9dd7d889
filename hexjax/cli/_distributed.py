"""The multi-host options every plan-running command shares, and joining the run they describe.

A command adds ``coordinator``, ``num_processes`` and ``process_id`` parameters
with these defaults, then calls ``join_run`` before JAX starts its backends.
Without the flags the run is joined from ``hexjax launch``'s ``HEXJAX_*``
variables, else from the job environment JAX recognises (Slurm, Open MPI,
Kubernetes); with none of them it is a one-process run.
"""

from __future__ import annotations

import typer

PANEL = "Multi-host (jax.distributed)"

COORDINATOR = typer.Option(
    None, "--coordinator", metavar="HOST:PORT", rich_help_panel=PANEL,
    help="Address of process 0's coordination service (default: from hexjax launch, Slurm, Open MPI or Kubernetes).")
NUM_PROCESSES = typer.Option(None, "--num-processes", rich_help_panel=PANEL,
                             help="Processes (hosts) in the run; with --coordinator and --process-id.")
PROCESS_ID = typer.Option(None, "--process-id", rich_help_panel=PANEL,
                          help="This process's index, 0 .. N-1 (process 0 runs the coordinator).")


def join_run(coordinator: str | None, num_processes: int | None, process_id: int | None) -> bool:
    """Join the multi-process run the flags or the environment describe; False for one process."""
    from hexjax.runtime import distributed
    multi = distributed.join(coordinator, num_processes, process_id)
    if multi:
        import jax
        jax.devices()   # start the backends with this process's devices
    return multi


def check_run(plan, cluster, what: str) -> None:
    """Every process holds the same plan and cluster and sees the devices its hosts declare."""
    from hexjax.runtime import distributed
    distributed.check_run(plan, cluster, what=what)


def across_processes(multi: bool) -> dict:
    """``move``/``read`` for a runtime whose stages live on several processes (empty for one)."""
    if not multi:
        return {}
    from hexjax.runtime import distributed
    return {"move": distributed.move, "read": distributed.read}
