"""A training plan's predicted memory per device against XLA's view of its compiled programs.

``hexjax.train.compile_train`` compiles every stage's forward, backward and
AdamW update ahead of time (no weights), in the workload's dtype (bfloat16 is
mixed precision: float32 master weights, gradients and moments), with the
options the runtime uses (on CPU, XLA's memory-minimising scheduler:
``hexjax.train.step.compiler_options``). Per device:

* training state: XLA's arguments of the update program (parameters, the two
  moments, gradients) against the cost model's parameters + gradients +
  optimizer state (16 bytes per parameter either way; under mixed precision
  the model splits them 2 + 2 + 12, the runtime 4 + 4 + 8);
* activations: the stash 1F1B keeps in flight (``min(S - s, M)`` microbatches'
  forward outputs that the backward reads, per XLA's output shapes) plus the
  larger of the forward's and backward's temporaries, against the model's
  stashed activations + workspace. The last stage's backward program runs its
  forward too, so its microbatch's stash is among that program's temporaries;
* their total.
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
    """Parameters + gradients + AdamW state per device (cost model)."""
    xla_state_bytes: int
    """Arguments of the compiled update program per device (XLA)."""
    predicted_activation_bytes: float | None = None
    """Stashed activations + workspace per device (cost model)."""
    xla_activation_bytes: int | None = None
    """Stash (1F1B bound x the forward's residual outputs) + the larger of the forward's and backward's
    temporaries (XLA)."""

    @property
    def state_ratio(self) -> float:
        return self.xla_state_bytes / self.predicted_state_bytes

    @property
    def activation_ratio(self) -> float | None:
        if self.xla_activation_bytes is None or not self.predicted_activation_bytes:
            return None
        return self.xla_activation_bytes / self.predicted_activation_bytes

    @property
    def predicted_total_bytes(self) -> float:
        return self.predicted_state_bytes + (self.predicted_activation_bytes or 0.0)

    @property
    def xla_total_bytes(self) -> int:
        return self.xla_state_bytes + (self.xla_activation_bytes or 0)

    @property
    def total_ratio(self) -> float:
        return self.xla_total_bytes / self.predicted_total_bytes

    def to_dict(self) -> dict:
        return {"replica": self.replica, "stage": self.stage, "layers": list(self.layers), "dp": self.dp,
                "tp": self.tp, "predicted_state_bytes": self.predicted_state_bytes,
                "xla_state_bytes": self.xla_state_bytes, "state_ratio": self.state_ratio,
                "predicted_activation_bytes": self.predicted_activation_bytes,
                "xla_activation_bytes": self.xla_activation_bytes, "activation_ratio": self.activation_ratio,
                "predicted_total_bytes": self.predicted_total_bytes, "xla_total_bytes": self.xla_total_bytes,
                "total_ratio": self.total_ratio}


def verify_train(plan, cfg, cluster, wl: TrainWorkload, progress=None, activations: bool = True) -> list[StageCheck]:
    """Compile ``plan``'s training programs and set XLA's per-device memory beside the prediction
    (``activations=False``: the update programs only, and no activation figures)."""
    from hexjax.train.compile import compile_train
    from hexjax.train.config import TrainConfig

    M = plan.microbatches or 1
    rows = plan.replica_rows or train_cost.even_rows(wl.global_batch, len(plan.replicas))
    pred = train_cost.predict(plan, cfg, cluster, wl, M, rows)
    recs = compile_train(plan, cfg, wl.seq_len, wl.global_batch, M, config=TrainConfig(remat=wl.remat == "full"),
                         dtype=wl.dtype, replica_rows=rows, progress=progress,
                         programs=("fwd", "bwd", "update") if activations else ("update",))
    by = {(c.replica, c.stage, c.program): c for c in recs}
    out = []
    for i, (rep, rp) in enumerate(zip(plan.replicas, pred.replicas)):
        for j, (st, sp) in enumerate(zip(rep.stages, rp.stages)):
            upd = by[(i, j, "update")]
            check = StageCheck(i, j, tuple(st.layers), st.dp, st.tp, sp.state_bytes, upd.argument_bytes)
            if activations:
                fwd, bwd = by[(i, j, "fwd")], by[(i, j, "bwd")]
                check = dataclasses.replace(
                    check, predicted_activation_bytes=sp.stash_bytes + sp.workspace_bytes,
                    xla_activation_bytes=bwd.stash_bytes + max(fwd.temp_bytes, bwd.temp_bytes))
            out.append(check)
    return out
