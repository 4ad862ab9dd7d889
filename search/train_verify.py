"""A training plan's predicted memory per device against XLA's view of its compiled programs.

``hexjax.train.compile_train`` compiles every stage's forward, backward and
AdamW update ahead of time (no weights). XLA's ``memory_analysis`` of the
update program counts, per device, its arguments: the parameters, the two
moments and the gradients, i.e. the training state the cost model predicts as
parameters + gradients + optimizer state. The runtime trains in float32 (no
mixed precision yet), so the prediction is made for the plan's workload in
float32 (16 bytes per parameter either way; only the split differs).

The activations side is reported too but is not a like-for-like comparison:
the runtime's backward recomputes its stage's forward inside a ``vjp`` and
stashes only stage inputs, while the cost model prices a 1F1B executor that
stashes every layer's activations (or, with remat, layer inputs).
"""

from __future__ import annotations

import dataclasses

from hexjax.search import train_cost
from hexjax.workload import TrainWorkload


@dataclasses.dataclass(frozen=True)
class StageCheck:
    replica: int
    stage: int
    layers: tuple[int, int]
    dp: int
    tp: int
    predicted_state_bytes: float
    """Parameters + gradients + AdamW moments per device (cost model, float32)."""
    xla_state_bytes: int
    """Arguments of the compiled update program per device (XLA)."""
    predicted_activation_bytes: float
    """Stashed activations + workspace per device (cost model)."""
    xla_activation_bytes: int | None
    """Stashed stage inputs (1F1B bound) + the larger of the forward's and backward's temporaries (XLA)."""

    @property
    def state_ratio(self) -> float:
        return self.xla_state_bytes / self.predicted_state_bytes


def verify_train(plan, cfg, cluster, wl: TrainWorkload, progress=None, activations: bool = True) -> list[StageCheck]:
    """Compile ``plan``'s training programs and set XLA's per-device memory beside the prediction
    (``activations=False``: the update programs only, and no activation figures)."""
    from hexjax.train.compile import compile_train

    wl32 = dataclasses.replace(wl, dtype="float32")
    M = plan.microbatches or 1
    rows = plan.replica_rows or train_cost.even_rows(wl.global_batch, len(plan.replicas))
    pred = train_cost.predict(plan, cfg, cluster, wl32, M, rows)
    recs = compile_train(plan, cfg, wl.seq_len, wl.global_batch, M, dtype="float32", replica_rows=rows,
                         progress=progress, programs=("fwd", "bwd", "update") if activations else ("update",))
    by = {(c.replica, c.stage, c.program): c for c in recs}
    out = []
    for i, (rep, rp) in enumerate(zip(plan.replicas, pred.replicas)):
        for j, (st, sp) in enumerate(zip(rep.stages, rp.stages)):
            upd, fwd, bwd = by[(i, j, "update")], by.get((i, j, "fwd")), by.get((i, j, "bwd"))
            out.append(StageCheck(i, j, tuple(st.layers), st.dp, st.tp, sp.state_bytes, upd.argument_bytes,
                                  sp.stash_bytes + sp.workspace_bytes,
                                  bwd.stash_bytes + max(fwd.temp_bytes, bwd.temp_bytes) if activations else None))
    return out
