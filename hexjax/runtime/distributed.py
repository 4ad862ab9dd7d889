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
  key-value store, raw bytes), which blocks;
* results (``read``): the value goes through the key-value store so every
  process has it (tiny: tokens, losses).

Serving (``hexjax.serve.multiprocess``): process 0 publishes each engine
step's host inputs (``send_all``; the others take them with ``receive_all``),
sampled tokens are read on process 0 only (``read_on``), and ``watch_peers``
ends a process, with one line naming the peer, when another stops answering.

A value published in the store is deleted by its owner once every reader has
marked it read. Training (``Trainer(move=move, read=read)``) moves activations,
their gradients, gradient sums, the clip factor and losses the same way.

Start-up (``join``): the flags, else ``HEXJAX_*`` variables, else the job
environment JAX detects (Slurm, Open MPI, Kubernetes). The coordinator address
is checked before JAX uses it (JAX aborts with a stack trace otherwise), and a
watchdog ends a process whose peers never join with one line.  ``check_run``
then compares every process's plan, cluster and devices.

Checked on jax 0.10.2, CPU, gloo collectives, loopback.

Environment contract (set by ``hexjax launch``, or by hand in a job):
``HEXJAX_COORDINATOR`` (host:port), ``HEXJAX_NUM_PROCESSES``,
``HEXJAX_PROCESS_ID``, ``HEXJAX_LOCAL_DEVICES`` (virtual CPU devices of this
process), ``HEXJAX_TRANSFER_ADDRESS`` (host:port of this process's cross-host
transfer socket), ``HEXJAX_HEARTBEAT_S``, ``HEXJAX_INIT_TIMEOUT_S``.
"""

from __future__ import annotations

import itertools
import os
import sys

import numpy as np

from hexjax.errors import ConfigError

ENV_PREFIX = "HEXJAX_"
_state = {"initialized": False, "counter": itertools.count(), "timeout_ms": 600_000, "check_timeout_ms": 300_000,
          "pending": []}
paths: dict[str, int] = {}
"""How many ``move`` calls took each path (local, direct, handoff, host); for tests and logs."""


def _took(path: str) -> None:
    paths[path] = paths.get(path, 0) + 1


def parse_address(coordinator: str, what: str = "--coordinator") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as ``(host, port)``; ``ConfigError`` when malformed."""
    host, sep, port = str(coordinator).strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what} {coordinator!r} is not HOST:PORT. Fix: give the address process 0 listens "
                          "on, e.g. 10.0.0.1:8476 or 127.0.0.1:8476")
    return host, int(port)


def check_coordinator(coordinator: str, process_id: int, timeout_s: float) -> None:
    """Fail with a clear ``ConfigError`` instead of JAX's abort when the coordinator address cannot work.

    Process 0 runs the coordination service, so the address must be one of its own and the port free;
    every other process must reach it within ``timeout_s`` (it retries: process 0 may start later).
    """
    import errno
    import socket
    import time
    host, port = parse_address(coordinator)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"--coordinator {coordinator}: cannot resolve host {host!r} ({e.strerror}). "
                          "Fix: give process 0's host name or IP address") from None
    family, _, _, _, addr = infos[0]
    if process_id == 0:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise ConfigError(f"--coordinator {coordinator}: port {port} is already in use on this "
                                      "machine. Fix: pick a free port") from None
                raise ConfigError(f"--coordinator {coordinator}: process 0 runs the coordinator, but {host} is "
                                  f"not an address of this machine ({e.strerror}). Fix: run process 0 on "
                                  f"{host}, or give this machine's address") from None
        return
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        try:
            with socket.create_connection(addr[:2], timeout=max(0.2, min(2.0, deadline - time.monotonic()))):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    raise ConfigError(f"--coordinator {coordinator}: process {process_id} could not reach the coordinator within "
                      f"{timeout_s:g} s ({getattr(last, 'strerror', None) or last}). Fix: start process 0 first "
                      "and check the address, port and firewall")


def initialize(coordinator: str, num_processes: int, process_id: int, *, local_devices: int | None = None,
               transfer_address: str | None = None, heartbeat_timeout_s: int = 100,
               initialization_timeout_s: int = 300, shutdown_timeout_s: int = 30,
               transfer_timeout_s: int = 600) -> None:
    """Join a ``num_processes``-process run; call before JAX starts its backends.

    ``local_devices``: simulate this process's devices as that many virtual CPU
    devices.  A peer that stops answering for ``heartbeat_timeout_s`` ends the
    run (JAX's coordination service aborts the survivors); a peer that never
    joins ends it after ``initialization_timeout_s``.
    """
    if num_processes < 1:
        raise ConfigError(f"--num-processes must be at least 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id {process_id} is not in 0..{num_processes - 1} "
                          f"(--num-processes {num_processes})")
    check_coordinator(coordinator, process_id, initialization_timeout_s)
    if local_devices:
        from hexjax.runtime.devices import use_virtual_cpu_devices
        use_virtual_cpu_devices(local_devices)
    import jax
    if _cpu_run():
        # CPU collectives and cross-process copies between CPU devices (GPUs use NCCL, set up by JAX)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if transfer_address is None:
            transfer_address = f"{parse_address(coordinator)[0]}:0"
        jax.config.update("jax_cross_host_transfer_socket_address", transfer_address)
    # JAX aborts the process with a stack trace when the others do not all join in time: a watchdog
    # ends it first with one clear line (JAX's own deadline is set a little later)
    import threading

    def never_joined():
        print(f"error: not every process joined the run at {coordinator} within {initialization_timeout_s:g} s "
              f"(this is process {process_id} of {num_processes}). Fix: start all {num_processes} processes with "
              "the same --coordinator and --num-processes, each with its own --process-id",
              file=sys.stderr, flush=True)
        os._exit(2)
    watchdog = threading.Timer(initialization_timeout_s, never_joined)
    watchdog.daemon = True
    watchdog.start()
    try:
        # the parameters are resolved already: JAX's own detection would also pin one device per process
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                                   initialization_timeout=int(initialization_timeout_s) + 10,
                                   heartbeat_timeout_seconds=int(heartbeat_timeout_s),
                                   shutdown_timeout_seconds=int(shutdown_timeout_s),
                                   cluster_detection_method="deactivate")
    finally:
        watchdog.cancel()
    _state["initialized"] = True
    _state["timeout_ms"] = int(transfer_timeout_s * 1000)
    _state["check_timeout_ms"] = int(initialization_timeout_s * 1000)
    _state["heartbeat_s"] = float(heartbeat_timeout_s)


def _cpu_run() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    import importlib.util
    return importlib.util.find_spec("jax_cuda12_plugin") is None and importlib.util.find_spec("jax_cuda13_plugin") is None


DETECTED = ("SlurmCluster", "OmpiCluster", "K8sCluster")
"""JAX's job-environment detectors ``join`` consults (TPU VMs and mpi4py are left out)."""


def detect_cluster_env() -> tuple[str, str | None, int | None, int | None] | None:
    """``(name, coordinator, num_processes, process_id)`` from the job environment JAX recognises
    (Slurm, Open MPI, Kubernetes, ...), or None outside one."""
    try:
        from jax._src import clusters
    except Exception:   # pragma: no cover - private API moved
        return None
    import warnings
    for env in clusters.ClusterEnv._cluster_types:
        if env.__name__ not in DETECTED:
            continue
        try:
            with warnings.catch_warnings():   # Kubernetes without the `kubernetes` package only warns
                warnings.simplefilter("ignore")
                present = env.is_env_present()
        except Exception:
            present = False
        if present:
            port = os.environ.get("JAX_COORDINATOR_PORT")
            return (env.__name__, env.get_coordinator_address(timeout_secs=None, override_coordinator_port=port),
                    env.get_process_count(), env.get_process_id())
    return None


def join(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
         *, environ=None, detect: bool = True) -> bool:
    """Join a multi-process run if one is asked for; False for a one-process run.

    Where the parameters come from, first found wins: the flags (all three), the ``HEXJAX_*`` variables
    of ``hexjax launch`` or of a hand-written job, then the job environment JAX recognises.
    """
    env = os.environ if environ is None else environ
    if _state["initialized"]:
        return is_multiprocess()
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ConfigError(f"{', '.join(missing)} missing: a multi-process run needs --coordinator HOST:PORT, "
                              "--num-processes N and --process-id I together. Fix: give all three (or none, "
                              "in a Slurm, Open MPI or Kubernetes job that JAX detects)")
        if num_processes == 1:
            return False
        initialize(coordinator, num_processes, process_id, **_env_options(env))
        return True
    if initialize_from_env(env):
        return True
    found = detect_cluster_env() if detect else None
    if found is None:
        return False
    name, coordinator, n, pid = found
    if n is None or n <= 1:
        return False
    if coordinator is None or pid is None:
        raise ConfigError(f"{name}: JAX found a job environment but no coordinator address or process id. "
                          "Fix: pass --coordinator, --num-processes and --process-id")
    initialize(coordinator, n, pid, **_env_options(env))
    return True


def _env_options(env) -> dict:
    out = {}
    if env.get(ENV_PREFIX + "HEARTBEAT_S"):
        out["heartbeat_timeout_s"] = int(env[ENV_PREFIX + "HEARTBEAT_S"])
    if env.get(ENV_PREFIX + "INIT_TIMEOUT_S"):
        out["initialization_timeout_s"] = int(env[ENV_PREFIX + "INIT_TIMEOUT_S"])
    if env.get(ENV_PREFIX + "LOCAL_DEVICES"):
        out["local_devices"] = int(env[ENV_PREFIX + "LOCAL_DEVICES"])
    if env.get(ENV_PREFIX + "TRANSFER_ADDRESS"):
        out["transfer_address"] = env[ENV_PREFIX + "TRANSFER_ADDRESS"]
    return out


def initialize_from_env(environ=None) -> bool:
    """``initialize`` from the ``HEXJAX_*`` variables (``hexjax launch`` sets them); False when absent."""
    env = os.environ if environ is None else environ
    if not env.get(ENV_PREFIX + "COORDINATOR"):
        return False
    if _state["initialized"]:
        return True
    for key in ("NUM_PROCESSES", "PROCESS_ID"):
        if not str(env.get(ENV_PREFIX + key, "")).isdigit():
            raise ConfigError(f"{ENV_PREFIX}COORDINATOR is set but {ENV_PREFIX}{key} is "
                              f"{env.get(ENV_PREFIX + key)!r}. Fix: set it to a non-negative integer")
    initialize(env[ENV_PREFIX + "COORDINATOR"], int(env[ENV_PREFIX + "NUM_PROCESSES"]),
               int(env[ENV_PREFIX + "PROCESS_ID"]), **_env_options(env))
    return True


def is_multiprocess() -> bool:
    import jax
    return _state["initialized"] and jax.process_count() > 1


def process_index() -> int:
    import jax
    return jax.process_index()


def num_processes() -> int:
    import jax
    return jax.process_count()


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


def _to_hosts(x, want=True) -> np.ndarray | None:
    """The global value of ``x`` on every process (``want=True``) or on the processes listed in ``want``,
    through the coordination service's key-value store as raw bytes.

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
    readers = sorted(set(range(jax.process_count())) - {owner}) if want is True else sorted(set(want) - {owner})
    if me == owner:
        value = np.asarray(x) if x.is_fully_addressable else np.asarray(x.addressable_shards[0].data)
        if readers:   # nobody else wants it (a read for the owner alone): nothing to publish
            _client().key_value_set_bytes(key, value.tobytes())
            _state["pending"].append((key, readers))
            _collect()
        return value
    if me not in readers:
        return None
    data = _client().blocking_key_value_get_bytes(key, _state["timeout_ms"])
    _client().key_value_set(f"{key}/read/{me}", "1")   # the owner deletes the value once all have read it
    return np.frombuffer(data, dtype=x.dtype).reshape(x.shape).copy()


def _collect(wait_s: float = 0.0) -> None:
    """Delete the owner's published values that every reader has taken (their ``read`` marks say so)."""
    import time
    client, deadline = _client(), time.monotonic() + wait_s
    while _state["pending"]:
        left = []
        for key, readers in _state["pending"]:
            if all(_present(client, f"{key}/read/{p}") for p in readers):
                client.key_value_delete(key)   # also deletes the read marks below it
            else:
                left.append((key, readers))
        _state["pending"] = left
        if not left or time.monotonic() >= deadline:
            return
        time.sleep(0.01)


def _present(client, key: str) -> bool:
    try:
        client.key_value_try_get(key)
        return True
    except Exception:   # NOT_FOUND
        return False


def fingerprint(obj) -> str:
    """A short hash of a plan or cluster (their ``to_dict``) that every process can compare."""
    import hashlib
    import json
    fp = getattr(obj, "fingerprint", None)
    if callable(fp):
        return fp()
    text = json.dumps(obj.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _norm(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def kind_matches(declared: str, device_kind: str) -> bool:
    """Whether JAX's ``device_kind`` (e.g. "NVIDIA A100-SXM4-40GB") is the declared device ("A100-40G"):
    the declared name's model number (its first part with a digit) must occur in it."""
    import re
    parts = [p for p in re.split(r"[^0-9a-z]+", declared.lower()) if p]
    model = next((p for p in parts if any(c.isdigit() for c in p)), _norm(declared))
    return model in _norm(device_kind)


def device_problems(cluster, process_id: int, count: int, kinds: list[str], platform: str) -> list[str]:
    """What differs between the devices a process sees and those its hosts declare in ``cluster``.

    The kind is compared on accelerators only (``kind_matches``): CPU devices stand in for any declared
    kind (a cluster simulated with virtual devices).
    """
    hosts = cluster.hosts_of_process(process_id)
    if not hosts:
        return [f"process {process_id} has no [[host]] in {cluster.source} "
                f"({cluster.num_processes} process(es) declared)"]
    want = sum(h.count for h in hosts)
    names = ", ".join(f"{h.name!r}: {h.count} x {h.device.name}" for h in hosts)
    out = []
    if count != want:
        out.append(f"process {process_id} sees {count} {platform} device(s) but its host(s) declare {want} "
                   f"({names})")
    if platform != "cpu":
        first = 0
        for h in hosts:
            seen = sorted(set(kinds[first:first + h.count]))
            bad = [k for k in seen if not kind_matches(h.device.name, k)]
            if bad:
                out.append(f"process {process_id}: host {h.name!r} declares {h.device.name} but the process sees "
                           f"{', '.join(bad)}")
            first += h.count
    return out


def check_run(plan, cluster=None, *, what: str = "run") -> None:
    """At start, on every process: all processes hold the same plan and cluster, and each sees the devices
    its hosts declare. Raises ``ConfigError`` naming the process and the field that differ (every process
    raises the same one, so the whole run stops).

    Each process publishes its facts in the coordination service, then reads everyone's.
    """
    import json
    import jax
    if not is_multiprocess():
        return
    me, n = jax.process_index(), jax.process_count()
    local = jax.local_devices()
    mine = {
        "plan": fingerprint(plan), "cluster": fingerprint(cluster) if cluster is not None else None,
        "processes": n, "devices": len(local), "platform": local[0].platform if local else "none",
        "kinds": [d.device_kind for d in local],
    }
    run_key = f"hexjax/check/{what}/{next(_state['counter'])}"
    client = _client()
    client.key_value_set(f"{run_key}/{me}", json.dumps(mine))
    facts = {}
    for p in range(n):
        if p == me:
            facts[p] = mine
            continue
        try:
            facts[p] = json.loads(client.blocking_key_value_get(f"{run_key}/{p}", _state["check_timeout_ms"]))
        except Exception as e:
            raise ConfigError(f"process {p} did not report its plan and devices within "
                              f"{_state['check_timeout_ms'] / 1000:g} s ({str(e).splitlines()[0]}). Fix: start "
                              "every process with the same command, plan and cluster") from None
    ref = facts[0]
    problems = []
    for p in range(1, n):
        for field, label in (("plan", "plan"), ("cluster", "cluster")):
            if facts[p][field] != ref[field]:
                problems.append(f"process {p} holds another {label} than process 0 "
                                f"(fingerprint {facts[p][field]} vs {ref[field]})")
    if cluster is not None:
        if cluster.num_processes != n:
            problems.append(f"{cluster.source} declares {cluster.num_processes} process(es) but the run has {n}")
        else:
            for p in range(n):
                f = facts[p]
                problems += device_problems(cluster, p, f["devices"], f["kinds"], f["platform"])
    if problems:
        raise ConfigError("the processes of this run disagree: " + "; ".join(problems)
                          + ". Fix: give every process the same plan and cluster files, and a cluster whose "
                          "[[host]] tables (process = K) match the devices each process has")


def _placeholder(x, sharding):
    import jax
    return jax.make_array_from_single_device_arrays(x.shape, sharding, [], dtype=x.dtype)


def move(x, sharding):
    """``jax.device_put(x, sharding)`` that also works across processes (see the module doc).

    Every process calls it with the same arguments; which path is taken depends only on the
    devices involved, the same on every process.
    """
    import jax
    if not isinstance(sharding, jax.sharding.Sharding):   # a tree of arrays onto a tree of shardings
        return jax.tree.map(move, x, sharding)
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
    value = _to_hosts(x, want=sorted(_processes(sharding)))
    if value is None:
        value = np.zeros(x.shape, x.dtype)   # never read: this process owns none of the destination
    return jax.device_put(value, sharding)


def read(x) -> np.ndarray:
    """``np.asarray(x)`` on every process, also for arrays on other processes' devices."""
    import jax
    if not isinstance(x, jax.Array) or jax.process_count() == 1:
        return np.asarray(x)
    return _to_hosts(x)


# ---- one process decides, the others follow (serving across processes) ----

class PeerLost(RuntimeError):
    """Another process of the run is gone (or the coordination service with process 0)."""


def read_on(x, process: int = 0) -> np.ndarray | None:
    """``np.asarray(x)`` on ``process`` alone (None on the others), also for arrays on other processes'
    devices.  Every process calls it for the same arrays in the same order."""
    import jax
    if not isinstance(x, jax.Array) or jax.process_count() == 1:
        return np.asarray(x)
    if _processes(x.sharding) == {process}:   # already there: nothing crosses processes
        return np.asarray(x) if jax.process_index() == process else None
    return _to_hosts(x, want=[process])


def check_same(what: str, facts: dict) -> None:
    """Every process holds the same ``facts`` (JSON-able settings); else ``ConfigError`` on every process,
    naming the first process and field that differ from process 0's."""
    import json
    import jax
    if not is_multiprocess():
        return
    me, n = jax.process_index(), jax.process_count()
    key = f"hexjax/check/{what}/{next(_state['counter'])}"
    client = _client()
    client.key_value_set(f"{key}/{me}", json.dumps(facts, sort_keys=True, default=str))
    ref = json.loads(client.blocking_key_value_get(f"{key}/0", _state["check_timeout_ms"]))
    for p in range(1, n):
        theirs = json.loads(client.blocking_key_value_get(f"{key}/{p}", _state["check_timeout_ms"]))
        for field in sorted(set(ref) | set(theirs)):
            if ref.get(field) != theirs.get(field):
                raise ConfigError(f"process {p} runs {what} with {field} = {theirs.get(field)!r} but process 0 "
                                  f"with {ref.get(field)!r}. Fix: start every process with the same options")


def send_all(data: bytes) -> None:
    """Process 0: publish ``data`` for every other process, which takes it with ``receive_all`` (the
    n-th ``send_all`` pairs with the n-th ``receive_all``; other exchanges of this module count too)."""
    import jax
    key = f"hexjax/value/{next(_state['counter'])}"
    readers = [p for p in range(jax.process_count()) if p != jax.process_index()]
    _client().key_value_set_bytes(key, data)
    _state["pending"].append((key, readers))
    _collect()


def receive_all(slice_s: float = 5.0) -> bytes:
    """The bytes of the matching ``send_all`` of process 0; waits as long as it takes (an idle server
    sends nothing), in slices of ``slice_s``.  ``PeerLost`` when the coordination service is gone."""
    import jax
    key = f"hexjax/value/{next(_state['counter'])}"
    client = _client()
    while True:
        try:
            data = client.blocking_key_value_get_bytes(key, int(slice_s * 1000))
            break
        except Exception as e:   # jax raises a plain runtime error: tell a timeout from a lost service
            text = str(e)
            if "DEADLINE_EXCEEDED" not in text:
                raise PeerLost(f"lost process 0 (the coordination service): {text.splitlines()[0]}") from None
    client.key_value_set(f"{key}/read/{jax.process_index()}", "1")
    return data


def barrier(name: str, timeout_s: float | None = None) -> None:
    """Wait until every process reaches ``name`` (the start-up timeout unless told); ``ConfigError`` when
    one does not."""
    ms = int(timeout_s * 1000) if timeout_s is not None else _state["check_timeout_ms"]
    try:
        _client().wait_at_barrier(f"hexjax/barrier/{name}/{next(_state['counter'])}", ms)
    except Exception as e:
        raise ConfigError(f"not every process reached {name!r} within {ms / 1000:g} s "
                          f"({str(e).splitlines()[0]}). Fix: start every process with the same command "
                          "and files, and check the others' output") from None


def watch_peers(timeout_s: float | None = None, period_s: float = 0.25, *, what: str = "run"):
    """Start a thread that ends this process (exit code 1, one ``error:`` line naming the process) when
    another process of the run shows no sign of life for ``timeout_s`` (default: half the heartbeat, so
    it speaks before JAX's own abort), or when the coordination service (process 0) is gone.

    Every process beats under ``hexjax/alive/`` every ``period_s``; start it on every process at the
    same point (after a ``barrier``).  Returns a function that stops the watch (call it before an
    orderly shutdown, when peers stop beating on purpose).
    """
    import threading
    import time
    import jax
    me, n = jax.process_index(), jax.process_count()
    timeout_s = timeout_s if timeout_s is not None else max(1.0, _state.get("heartbeat_s", 10.0) / 2)
    client, done = _client(), threading.Event()

    def lost(message: str) -> None:
        if done.is_set():
            return
        print(f"error: {message}; this {what} cannot go on without it (process {me} of {n} stops). Fix: "
              "find why it stopped in its own output, then restart every process of the run",
              file=sys.stderr, flush=True)
        os._exit(1)

    def loop() -> None:
        seen: dict[int, tuple[str | None, float]] = {}
        beat = 0
        while not done.wait(period_s):
            beat += 1
            try:
                client.key_value_set(f"hexjax/alive/{me}", str(beat), allow_overwrite=True)
                values = dict(client.key_value_dir_get("hexjax/alive/"))
            except Exception as e:
                lost(f"lost process 0: the coordination service it runs stopped answering "
                     f"({str(e).splitlines()[0][:200]})")
                return
            now = time.monotonic()
            for p in range(n):
                if p == me:
                    continue
                v = values.get(f"hexjax/alive/{p}")
                if p not in seen or seen[p][0] != v:
                    seen[p] = (v, now)
                elif now - seen[p][1] > timeout_s:
                    lost(f"process {p} of the run stopped answering (no sign of life for {timeout_s:g} s)")
                    return

    thread = threading.Thread(target=loop, name="hexjax-peer-watch", daemon=True)
    thread.start()

    def stop() -> None:
        done.set()
        thread.join(timeout=5)
        try:
            client.key_value_delete(f"hexjax/alive/{me}")
        except Exception:
            pass
    return stop


def finish(wait_s: float = 10.0) -> int:
    """At the end of a run: delete this process's published values once read (waits up to ``wait_s``);
    returns how many are still undeleted."""
    if not _state["initialized"]:
        return 0
    _collect(wait_s)
    return len(_state["pending"])


def leftover_keys() -> int:
    """Values still in the key-value store (every process's, not yet deleted)."""
    try:
        return len(_client().key_value_dir_get("hexjax/value/"))
    except Exception:
        return 0


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
        undeleted = distributed.finish() if distributed._state["initialized"] else 0
        if os.environ.get(ENV_PREFIX + "SHOW_PATHS") and distributed._state["initialized"]:
            import jax
            print(f"hexjax.distributed process {jax.process_index()} moves: "
                  + ", ".join(f"{k}={v}" for k, v in sorted(distributed.paths.items()))
                  + f"; undeleted values: {undeleted}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
