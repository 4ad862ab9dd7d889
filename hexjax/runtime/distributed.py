"""Several processes (hosts) running one plan: ``jax.distributed`` set-up and cross-process moves.

Every process runs the same driver (``run_plan``).  A stage's jit is called
by every process; those that own none of its devices get arrays with no
local shards.  What crosses processes:

* host values (prompt ids, block tables) are the same on every process, so
  ``jax.device_put(numpy, global_sharding)`` places them (each process fills
  only its own shards);
* activations between stages: a direct ``jax.device_put`` when source and
  destination have the same HLO sharding over the same number of devices
  (jax's cross-host transfer); else, with equal device counts, a "handoff":
  a jit on the source's devices reshards to the destination's layout, then
  the direct transfer; else through the host (the coordination service's
  key-value store), which blocks;
* results (``read``): the value goes through the key-value store so every
  process has it (tiny: tokens).

Checked on jax 0.10.2, CPU, gloo collectives, loopback.

Environment contract (set by ``hexjax launch``): ``HEXJAX_COORDINATOR``
(host:port), ``HEXJAX_NUM_PROCESSES``, ``HEXJAX_PROCESS_ID``,
``HEXJAX_LOCAL_DEVICES`` (virtual CPU devices of this process),
``HEXJAX_TRANSFER_ADDRESS`` (host:port of this process's cross-host
transfer socket), ``HEXJAX_HEARTBEAT_S``, ``HEXJAX_INIT_TIMEOUT_S``.
"""

from __future__ import annotations

import itertools
import os
import pickle
import sys

import numpy as np

from hexjax.errors import ConfigError

ENV_PREFIX = "HEXJAX_"
_state = {"initialized": False, "counter": itertools.count(), "timeout_ms": 600_000}
paths: dict[str, int] = {}
"""How many ``move`` calls took each path (local, direct, handoff, host); for tests and logs."""


def _took(path: str) -> None:
    paths[path] = paths.get(path, 0) + 1


def initialize(coordinator: str, num_processes: int, process_id: int, *, local_devices: int | None = None,
               transfer_address: str | None = None, heartbeat_timeout_s: int = 100,
               initialization_timeout_s: int = 300, shutdown_timeout_s: int = 30,
               transfer_timeout_s: int = 600) -> None:
    """Join a ``num_processes``-process run; call before JAX starts its backends.

    ``local_devices``: simulate this process's devices as that many virtual CPU
    devices.  A peer that stops answering for ``heartbeat_timeout_s`` ends the
    run (JAX's coordination service aborts the survivors).
    """
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"process id {process_id} is not in 0..{num_processes - 1}")
    if local_devices:
        from hexjax.runtime.devices import use_virtual_cpu_devices
        use_virtual_cpu_devices(local_devices)
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if transfer_address is None:
        host = coordinator.rsplit(":", 1)[0]
        transfer_address = f"{host}:0"
    jax.config.update("jax_cross_host_transfer_socket_address", transfer_address)
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                               initialization_timeout=int(initialization_timeout_s),
                               heartbeat_timeout_seconds=int(heartbeat_timeout_s),
                               shutdown_timeout_seconds=int(shutdown_timeout_s))
    _state["initialized"] = True
    _state["timeout_ms"] = int(transfer_timeout_s * 1000)


def initialize_from_env(environ=None) -> bool:
    """``initialize`` from the ``HEXJAX_*`` variables ``hexjax launch`` sets; False when they are absent."""
    env = os.environ if environ is None else environ
    if not env.get(ENV_PREFIX + "COORDINATOR"):
        return False
    initialize(env[ENV_PREFIX + "COORDINATOR"], int(env[ENV_PREFIX + "NUM_PROCESSES"]),
               int(env[ENV_PREFIX + "PROCESS_ID"]),
               local_devices=int(env[ENV_PREFIX + "LOCAL_DEVICES"]) if env.get(ENV_PREFIX + "LOCAL_DEVICES") else None,
               transfer_address=env.get(ENV_PREFIX + "TRANSFER_ADDRESS") or None,
               heartbeat_timeout_s=int(env.get(ENV_PREFIX + "HEARTBEAT_S", "100")),
               initialization_timeout_s=int(env.get(ENV_PREFIX + "INIT_TIMEOUT_S", "300")))
    return True


def is_multiprocess() -> bool:
    import jax
    return _state["initialized"] and jax.process_count() > 1


def process_index() -> int:
    import jax
    return jax.process_index()


def _client():
    from jax._src import distributed
    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized")
    return client


def _hlo(sharding, ndim: int):
    try:
        return sharding._to_xla_hlo_sharding(ndim)
    except Exception:   # pragma: no cover - private API moved
        return None


def _all_cross(src, dst) -> bool:
    """Whether jax 0.10.2 does ``src -> dst`` as a cross-host transfer: the two use different sets of
    processes (else it calls it a device-order reshard and refuses different device sets) and every
    shard goes to a device of another process (it refuses a mix of cross-host and host-local copies)."""
    if _processes(src) == _processes(dst):
        return False
    try:
        pairs = zip(src._device_assignment, dst._device_assignment)
    except Exception:   # pragma: no cover - private API moved
        return False
    return all(a.process_index != b.process_index for a, b in pairs)


def _same_layout(src, dst, ndim: int) -> bool:
    if len(src.device_set) != len(dst.device_set):
        return False
    a, b = _hlo(src, ndim), _hlo(dst, ndim)
    return a is not None and a == b


def _owner(sharding) -> int:
    return min(d.process_index for d in sharding.device_set)


def _processes(sharding) -> set[int]:
    return {d.process_index for d in sharding.device_set}


def _to_hosts(x, want: bool = True) -> np.ndarray | None:
    """The global value of ``x`` on each process with ``want`` (through the key-value store).

    Every process must call this for the same arrays in the same order (the keys are counted).
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    key = f"hexjax/value/{next(_state['counter'])}"
    sh, me = x.sharding, jax.process_index()
    owner = _owner(sh)
    if len(_processes(sh)) > 1:
        # replicate inside the source's devices first (every process calls the jit)
        mesh = getattr(sh, "mesh", None)
        if mesh is None:
            mesh = jax.sharding.Mesh(np.array(sorted(sh.device_set, key=lambda d: (d.process_index, d.id))), ("d",))
        x = jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, P()))(x)
    if me == owner:
        value = np.asarray(x) if x.is_fully_addressable else np.asarray(x.addressable_shards[0].data)
        _client().key_value_set_bytes(key, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
        return value
    if not want:
        return None
    return pickle.loads(_client().blocking_key_value_get_bytes(key, _state["timeout_ms"]))


def _placeholder(x, sharding):
    import jax
    return jax.make_array_from_single_device_arrays(x.shape, sharding, [], dtype=x.dtype)


def move(x, sharding):
    """``jax.device_put(x, sharding)`` that also works across processes (see the module doc).

    Every process calls it with the same arguments; which path is taken depends only on the
    devices involved, the same on every process.
    """
    import jax
    if not isinstance(x, jax.Array):
        return jax.device_put(x, sharding)   # host value, the same on every process
    src = x.sharding
    procs = _processes(src) | _processes(sharding)
    if len(procs) == 1:
        _took("local")
        # a copy inside one process: the others only make the (empty) result
        return jax.device_put(x, sharding) if procs == {jax.process_index()} else _placeholder(x, sharding)
    if _same_layout(src, sharding, x.ndim) and _all_cross(src, sharding):
        _took("direct")
        return jax.device_put(x, sharding)
    if len(src.device_set) == len(sharding.device_set) and hasattr(sharding, "mesh"):
        # handoff: the destination's layout laid over the source's devices, made by a jit on the
        # source's devices, then a direct transfer.  The jit needs the source's device order (jax
        # refuses a permutation: "incompatible devices"), so it works where that order already
        # sends every shard to another process.
        from jax.sharding import Mesh, NamedSharding
        try:
            order = list(src._device_assignment)
        except Exception:   # pragma: no cover - private API moved
            order = None
        if order is not None:
            handoff = NamedSharding(Mesh(np.array(order, dtype=object).reshape(sharding.mesh.devices.shape),
                                         sharding.mesh.axis_names), sharding.spec)
            if _same_layout(handoff, sharding, x.ndim) and _all_cross(handoff, sharding):
                _took("handoff")
                y = jax.jit(lambda a: a, out_shardings=handoff)(x)
                return jax.device_put(y, sharding)
    _took("host")
    # through the host: only the destination's processes need the value
    value = _to_hosts(x, want=jax.process_index() in _processes(sharding))
    if value is None:
        value = np.zeros(x.shape, x.dtype)   # never read: this process owns none of the destination
    return jax.device_put(value, sharding)


def read(x) -> np.ndarray:
    """``np.asarray(x)`` on every process, also for arrays on other processes' devices."""
    import jax
    if not isinstance(x, jax.Array) or jax.process_count() == 1:
        return np.asarray(x)
    return _to_hosts(x)


def host_params(params):
    """A parameter tree as numpy arrays: every process places its own shards from the same values."""
    import jax
    return jax.tree.map(np.asarray, params)


def main(argv: list[str] | None = None) -> None:
    """``python -m hexjax.runtime.distributed hexjax ARGS...``: run the ``hexjax`` command ``ARGS`` in one
    process of a ``hexjax launch`` run (the command joins the run from the environment)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("hexjax", "--"):
        argv = argv[1:]
    if not os.environ.get(ENV_PREFIX + "COORDINATOR"):
        raise SystemExit("hexjax.runtime.distributed: HEXJAX_COORDINATOR is not set (run through `hexjax launch`)")
    from hexjax.cli import main as cli_main
    from hexjax.runtime import distributed   # the command's module, not this `__main__` copy of it
    sys.argv = ["hexjax", *argv]
    try:
        cli_main()
    finally:
        if os.environ.get(ENV_PREFIX + "SHOW_PATHS") and distributed._state["initialized"]:
            import jax
            print(f"hexjax.distributed process {jax.process_index()} moves: "
                  + ", ".join(f"{k}={v}" for k, v in sorted(distributed.paths.items())), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
