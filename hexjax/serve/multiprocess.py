"""Serving a plan whose stages live on several processes: process 0 schedules, the others follow.

JAX's multi-controller runtime wants every process to issue the same programs
in the same order.  Process 0 runs the HTTP server and the engine's scheduler;
before each step runs, it publishes the step's ``StepCall``s (token ids,
positions, block tables, sampling inputs: everything the programs take from
the host) through the coordination service's key-value store.  Every other
process runs ``follow``: it takes each step's calls and issues them through
the same ``Engine.run``, its own stages' shards included; sampled tokens are
read on process 0 only (``hexjax.runtime.distributed.read_on``).  The
followers keep no scheduling state of their own, so they cannot drift from
process 0.  A stop record ends them.

The records are ``numpy.savez`` archives (no pickle): a JSON header and the
arrays.
"""

from __future__ import annotations

import io
import json
from typing import Callable

import numpy as np

from hexjax.serve.engine import Engine, StepCall


def encode_calls(calls: list[StepCall] | None) -> bytes:
    """One step's calls as bytes (None: the stop record)."""
    head: dict = {"stop": calls is None, "calls": []}
    arrays: dict[str, np.ndarray] = {}
    for i, c in enumerate(calls or ()):
        sample = dict(c.sample or {})
        counts = sample.pop("counts", None)
        head["calls"].append({"replica": c.replica, "phase": c.phase, "width": c.width, "args": len(c.args),
                              "tables": len(c.tables), "sample": sorted(sample) if c.sample is not None else None,
                              "counts": None if counts is None else list(counts.shape),
                              "any_sampled": c.any_sampled, "top": c.top})
        arrays[f"{i}.x"] = c.x
        arrays.update({f"{i}.a{j}": a for j, a in enumerate(c.args)})
        arrays.update({f"{i}.t{j}": t for j, t in enumerate(c.tables)})
        arrays.update({f"{i}.s.{k}": v for k, v in sample.items()})
        if counts is not None:   # penalties: [rows, vocab] counts, nearly all zero, sent as (index, count)
            nz = np.flatnonzero(counts)
            arrays[f"{i}.counts.at"], arrays[f"{i}.counts.n"] = nz.astype(np.int64), counts.ravel()[nz]
    arrays["head"] = np.frombuffer(json.dumps(head).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_calls(data: bytes) -> list[StepCall] | None:
    """``encode_calls``' inverse (None for the stop record)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        head = json.loads(z["head"].tobytes())
        if head["stop"]:
            return None
        calls = []
        for i, h in enumerate(head["calls"]):
            sample = None
            if h["sample"] is not None:
                sample = {k: z[f"{i}.s.{k}"] for k in h["sample"]}
                if h["counts"] is not None:
                    counts = np.zeros(h["counts"], np.float32)
                    counts.ravel()[z[f"{i}.counts.at"]] = z[f"{i}.counts.n"]
                    sample["counts"] = counts
            calls.append(StepCall(h["replica"], h["phase"], h["width"], z[f"{i}.x"],
                                  tuple(z[f"{i}.a{j}"] for j in range(h["args"])),
                                  tuple(z[f"{i}.t{j}"] for j in range(h["tables"])),
                                  sample, h["any_sampled"], h["top"]))
        return calls


def engine_options(process: int) -> dict:
    """``Engine`` keyword arguments for one process of a run over several: cross-process moves, reads
    on process 0, and on process 0 the publishing of every step."""
    from hexjax.runtime import distributed
    out = {"move": distributed.move, "read": lambda x: distributed.read_on(x, 0)}
    if process == 0:
        out["publish"] = lambda calls: distributed.send_all(encode_calls(calls))
    return out


def follow(engine: Engine, receive: Callable[[], bytes] | None = None) -> int:
    """Run process 0's steps on this process until it sends the stop record; returns the steps run."""
    if receive is None:
        from hexjax.runtime.distributed import receive_all as receive
    steps = 0
    while True:
        calls = decode_calls(receive())
        if calls is None:
            return steps
        engine.run(calls)
        steps += 1


def stop_followers() -> None:
    """Process 0, once its engine has stopped: tell the followers to end."""
    from hexjax.runtime import distributed
    distributed.send_all(encode_calls(None))
