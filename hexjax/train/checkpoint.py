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
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from hexjax.errors import ConfigError
from hexjax.models.config import ModelConfig

FORMAT = 1


def _manager(directory, keep: int | None = None, create: bool = True, asynchronous: bool = False):
    import orbax.checkpoint as ocp
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=asynchronous)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def _model_dict(cfg: ModelConfig) -> dict:
    return json.loads(json.dumps(cfg.to_dict()))


class CheckpointWriter:
    """Asynchronous saves into one checkpoint directory, keeping the last ``keep`` steps.

    ``save`` returns once orbax has taken the arrays (host arrays, owned by the caller and not changed
    afterwards); the files are written and the step committed (renamed into place) in the background.
    A save waits for the previous one first, so at most one is in flight."""

    def __init__(self, directory, keep: int = 3):
        self.directory = Path(directory).absolute()
        self._mngr = _manager(self.directory, keep, asynchronous=True)

    def save(self, step: int, cfg: ModelConfig, params: dict, opt_state: dict, steps_taken: int,
             extra: dict | None = None) -> None:
        import orbax.checkpoint as ocp
        state = {"params": params,
                 "opt_state": {k: {str(i): np.asarray(a) for i, a in enumerate(jax.tree.leaves(v))}
                               for k, v in opt_state.items()}}
        meta = {"format": FORMAT, "model": _model_dict(cfg), "step": int(step), "steps_taken": int(steps_taken),
                "extra": extra or {}}
        self._mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                           meta=ocp.args.JsonSave(meta)), force=True)

    def saving(self) -> bool:
        """Whether a save is still being written."""
        return self._mngr.is_saving_in_progress()

    def wait(self) -> None:
        """Block until every save issued so far is committed (raises what a background write raised)."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Wait for the pending save, then release orbax's threads."""
        self._mngr.close()


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
