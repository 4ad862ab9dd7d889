"""Training checkpoints with orbax, keyed by global layer (never by stage).

A checkpoint directory holds one numbered sub-directory per saved step
(``orbax.checkpoint.CheckpointManager``, keeping the last ``keep``). Each has
two items:

* ``state``: ``{"params": {key: tree}, "opt_state": {key: {"0": leaf, ...}}}``
  with ``key`` a global name (``embed``, ``layer_3``, ``final_norm``,
  ``lm_head``) and the optimizer state of a key as its flattened optax leaves;
* ``meta`` (JSON): the model config, the step, the steps taken and the
  caller's ``extra`` (such as the data position).

Arrays are saved from and restored to the host (numpy), then placed with the
restoring plan's shardings, so a checkpoint made under one plan restores under
any other (different splits, tp, dp or replicas). This costs a host copy of the
model per save and restore, which suits single-host training.

orbax writes a step into a temporary directory and renames it when complete,
so an interrupted save leaves the previous checkpoints intact (the partial one
is not listed as a step and is cleaned up by the next manager).

Saves are asynchronous (``CheckpointWriter``): the caller hands over host
copies and goes on while orbax writes them in the background; the next save
into the directory, ``wait()`` and ``close()`` wait for it to be committed.

Several processes (``jax.distributed``): the trainer gathers each key's arrays
onto process 0, which alone writes, so the files are those a one-process run
writes and restore under any plan and process count. Every orbax call is local
to its process (no orbax barriers); the processes instead ``agree`` through
the coordination service's key-value store, with bounded waits: on the step to
save, on process 0's outcome of a write, and on the step to restore (process
0's latest), which every process then reads whole from the directory (placing
only its own shards), so it must be on a filesystem all processes share.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import jax
import numpy as np

from hexjax.errors import ConfigError, HexjaxError
from hexjax.models.config import ModelConfig

FORMAT = 1


SYNC_TIMEOUT_S = 600.0
"""How long a process waits for the others at a checkpoint (process 0 writing a step included)."""


def _multiprocess() -> bool:
    """Whether this is one process of several (asked without starting JAX's backends in a one-process run)."""
    from jax._src import distributed
    return distributed.global_state.client is not None and jax.process_count() > 1


def _manager(directory, keep: int | None = None, create: bool = True, asynchronous: bool = False):
    import orbax.checkpoint as ocp
    extra = {}
    if _multiprocess():
        # this process alone: orbax would otherwise wait at barriers for every process of the run
        me = jax.process_index()
        extra["multiprocessing_options"] = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
        if create:   # orbax refuses to create the root itself for a subset of processes
            Path(directory).mkdir(parents=True, exist_ok=True)
        create = False
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=asynchronous, **extra)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


_rounds = itertools.count()
_last_round: list[str] = []


def _client():
    from jax._src import distributed   # the coordination service's client (no public accessor in jax 0.10)
    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized")
    return client


def agree(what: str, mine: str, timeout_s: float | None = None) -> list[str]:
    """Every process's ``mine`` (index = process), exchanged through the coordination service; a single
    process gets ``[mine]``. All processes call it in the same order. A process that does not arrive within
    ``timeout_s`` (default ``SYNC_TIMEOUT_S``) makes the others raise ``HexjaxError`` naming it."""
    if not _multiprocess():
        return [mine]
    client, me, n = _client(), jax.process_index(), jax.process_count()
    timeout_s = SYNC_TIMEOUT_S if timeout_s is None else timeout_s
    key = f"hexjax/checkpoint/{next(_rounds)}"
    client.key_value_set(f"{key}/{me}", mine)
    out = []
    for p in range(n):
        if p == me:
            out.append(mine)
            continue
        try:
            out.append(client.blocking_key_value_get(f"{key}/{p}", int(timeout_s * 1000)))
        except Exception as e:
            raise HexjaxError(f"{what}: process {p} did not arrive within {timeout_s:g} s "
                              f"({str(e).splitlines()[0][:200]}). Fix: check that process's output; every process "
                              "must run the same command") from None
    if me == 0:
        # every process has arrived here, so each has read the previous round: drop its keys
        for old in _last_round:
            client.key_value_delete(old)
        _last_round[:] = [key]
    return out


def agree_outcome(what: str, error: str | None, fix: str = "") -> None:
    """Raise the same ``HexjaxError`` on every process when any process's ``error`` is set."""
    _raise_first(what, agree(what, error or ""), fix)


def _raise_first(what: str, outcomes: list[str], fix: str) -> None:
    bad = [(p, o) for p, o in enumerate(outcomes) if o]
    if bad:
        p, o = bad[0]
        where = f" on process {p}" if len(outcomes) > 1 else ""
        raise HexjaxError(f"{what} failed{where}: {o}" + (f". Fix: {fix}" if fix and "Fix:" not in o else ""))


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if isinstance(e, HexjaxError) else f"{type(e).__name__}: {text[0][:300] if text else ''}"


def agreed_latest_step(directory) -> int | None:
    """``latest_step`` as process 0 sees it, checked to be complete on every process (several processes must
    share the checkpoint directory); the same as ``latest_step`` in one process."""
    step = latest_step(directory)
    if not _multiprocess():
        return step
    chosen = agree("checkpoint lookup", "" if step is None else str(step))[0]
    chosen = None if chosen == "" else int(chosen)
    error = None
    if chosen is not None and chosen not in _steps(directory):
        error = (f"{directory}: process 0's latest checkpoint, step {chosen}, is not there for this process "
                 f"(steps it sees: {_steps(directory)})")
    agree_outcome("checkpoint lookup", error, "put --checkpoint-dir on a filesystem every process shares")
    return chosen


def _steps(directory) -> list[int]:
    if not Path(directory).is_dir():
        return []
    with _manager(directory, create=False) as mngr:
        return list(mngr.all_steps())


def _model_dict(cfg: ModelConfig) -> dict:
    return json.loads(json.dumps(cfg.to_dict()))


class CheckpointWriter:
    """Asynchronous saves into one checkpoint directory, keeping the last ``keep`` steps.

    ``save`` returns once orbax has taken the arrays (host arrays, owned by the caller and not changed
    afterwards); the files are written and the step committed (renamed into place) in the background.
    A save waits for the previous one first, so at most one is in flight.

    In a run of several processes every process makes a writer and calls it alike; only the one made with
    ``write=True`` (process 0) writes, and ``wait``/``close`` return on every process once its saves are
    committed (or raise its error everywhere)."""

    def __init__(self, directory, keep: int = 3, write: bool = True):
        self.directory = Path(directory).absolute()
        self._mngr = _manager(self.directory, keep, asynchronous=True) if write else None
        self._shared = _multiprocess()

    def save(self, step: int, cfg: ModelConfig, params: dict, opt_state: dict, steps_taken: int,
             extra: dict | None = None) -> None:
        import orbax.checkpoint as ocp
        if self._mngr is None:
            return
        state = {"params": params,
                 "opt_state": {k: {str(i): np.asarray(a) for i, a in enumerate(jax.tree.leaves(v))}
                               for k, v in opt_state.items()}}
        meta = {"format": FORMAT, "model": _model_dict(cfg), "step": int(step), "steps_taken": int(steps_taken),
                "extra": extra or {}}
        self._mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                           meta=ocp.args.JsonSave(meta)), force=True)

    def saving(self) -> bool:
        """Whether a save is still being written (by this process)."""
        return self._mngr is not None and self._mngr.is_saving_in_progress()

    def wait(self) -> None:
        """Block until every save issued so far is committed (raises what a background write raised)."""
        self._finish(lambda m: m.wait_until_finished())

    def close(self) -> None:
        """Wait for the pending save, then release orbax's threads."""
        self._finish(lambda m: m.close())

    def _finish(self, op) -> None:
        if not self._shared:
            op(self._mngr)
            return
        error = None
        try:
            if self._mngr is not None:
                op(self._mngr)
        except Exception as e:   # told to every process, so none waits for the write in vain
            error = _one_line(e)
        agree_outcome(f"saving a checkpoint into {self.directory}", error)


def save_checkpoint(directory, step: int, cfg: ModelConfig, params: dict, opt_state: dict, steps_taken: int,
                    extra: dict | None = None, keep: int = 3) -> None:
    """Write checkpoint ``step`` (host arrays keyed by global layer) and wait until it is committed."""
    writer = CheckpointWriter(directory, keep)
    try:
        writer.save(step, cfg, params, opt_state, steps_taken, extra)
        writer.wait()
    finally:
        writer.close()


def latest_step(directory) -> int | None:
    """The newest complete checkpoint step under ``directory`` (None when there is none)."""
    if not Path(directory).is_dir():
        return None
    with _manager(directory, create=False) as mngr:
        return mngr.latest_step()


def read_meta(directory, step: int | None = None) -> dict:
    """The JSON metadata of a checkpoint (the latest by default)."""
    import orbax.checkpoint as ocp
    if not Path(directory).is_dir():
        raise ConfigError(f"{directory}: no such checkpoint directory")
    with _manager(directory, create=False) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None or step not in mngr.all_steps():
            raise ConfigError(f"{directory}: no checkpoint {'found' if step is None else f'for step {step}'} "
                              f"(steps: {list(mngr.all_steps())})")
        return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def check_model(meta: dict, cfg: ModelConfig, directory) -> None:
    """Raise ``ConfigError`` when a checkpoint was made for another model than ``cfg``."""
    saved = dict(meta.get("model") or {})
    want = _model_dict(cfg)
    saved_name, _ = saved.pop("name", None), want.pop("name", None)
    if saved != want:
        diff = [f"{k}: {saved.get(k)!r} vs {want.get(k)!r}" for k in sorted(set(saved) | set(want))
                if saved.get(k) != want.get(k)]
        raise ConfigError(f"{directory}: the checkpoint is of another model ({saved_name}) than {cfg.name}; "
                          f"differs in {', '.join(diff)}")


def restore_checkpoint(directory, step: int | None, cfg: ModelConfig, abstract_state: dict):
    """``(params, opt_state, meta)`` on the host; ``abstract_state`` gives each key's optax state
    structure. The model is checked before any array is read."""
    import orbax.checkpoint as ocp
    meta = read_meta(directory, step)
    check_model(meta, cfg, directory)
    with _manager(directory, create=False) as mngr:
        state = mngr.restore(meta["step"], args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    params = state["params"]
    missing = sorted(set(abstract_state) - set(params))
    if missing:
        raise ConfigError(f"{directory}: the checkpoint lacks parameters {', '.join(missing)}")
    opt = {}
    for k, abstract in abstract_state.items():
        leaves, treedef = jax.tree.flatten(abstract)
        saved = state["opt_state"].get(k, {})
        if len(saved) != len(leaves):
            raise ConfigError(f"{directory}: optimizer state of {k} has {len(saved)} arrays, this optimizer "
                              f"needs {len(leaves)}")
        opt[k] = jax.tree.unflatten(treedef, [np.asarray(saved[str(i)], a.dtype) for i, a in enumerate(leaves)])
    return params, opt, meta


def restore_on_every_process(directory, step: int | None, cfg: ModelConfig, abstract_state: dict):
    """``restore_checkpoint`` where the run has several processes: all restore process 0's choice of step
    (its latest by default) from the shared directory, and all raise if any could not."""
    if not _multiprocess():
        return restore_checkpoint(directory, step, cfg, abstract_state)
    if step is None:
        step = agreed_latest_step(directory)
        if step is None:
            raise ConfigError(f"{directory}: no checkpoint found")
    else:
        steps = agree("checkpoint restore", str(int(step)))
        if len(set(steps)) > 1:
            raise HexjaxError(f"the processes ask for different checkpoint steps ({', '.join(steps)}). Fix: give "
                              "every process the same command")
    out, failure = None, None
    try:
        out = restore_checkpoint(directory, step, cfg, abstract_state)
    except Exception as e:   # reported to every process first, so none waits for the others in vain
        failure = e
    outcomes = agree("checkpoint restore", "" if failure is None else _one_line(failure))
    if isinstance(failure, HexjaxError) and len(set(outcomes)) == 1:
        raise failure        # the same problem everywhere (another model, a missing key): as in one process
    _raise_first("checkpoint restore", outcomes, "put --checkpoint-dir on a filesystem every process shares")
    return out
