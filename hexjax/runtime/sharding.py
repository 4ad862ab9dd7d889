"""Where a stage's arrays live on its ``("dp", "tp")`` mesh.

Megatron-style tensor parallelism: attention heads and the MLP width are
split over ``tp`` (q/k/v and gate/up by output column, o and down by input
row), the vocabulary too when it divides; key/value heads are split when
``tp`` divides their count and replicated otherwise (more ``tp`` ranks than
KV heads).  Batches are split over ``dp``.  The paged KV cache
``[Hkv, num_pages, page_size, D]`` follows the key/value heads over ``tp``
and the sequences over ``dp``.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hexjax.models.config import ModelConfig

MESH_AXES = ("dp", "tp")


def make_mesh(devices, dp: int, tp: int) -> Mesh:
    """A ``(dp, tp)`` mesh over ``devices`` in row-major order."""
    if len(devices) != dp * tp:
        raise ValueError(f"a ({dp}, {tp}) mesh needs {dp * tp} devices, got {len(devices)}")
    return Mesh(np.asarray(devices, dtype=object).reshape(dp, tp), MESH_AXES)


def logical_rules(cfg: ModelConfig, tp: int) -> dict[str, str | None]:
    """Mesh axis for each logical parameter axis of a stage with tensor-parallel degree ``tp``."""
    def split(n: int) -> str | None:
        return "tp" if tp > 1 and n % tp == 0 else None
    return {
        "heads": split(cfg.num_heads),
        "kv_heads": split(cfg.num_kv_heads),
        "mlp": split(cfg.intermediate_size),
        "vocab": split(cfg.vocab_size),
        "embed": None,
        "head_dim": None,
        "norm": None,
    }


def param_specs(logical: dict, cfg: ModelConfig, tp: int) -> dict:
    """Mesh ``PartitionSpec``s for a tree of logical-axis ``PartitionSpec``s."""
    rules = logical_rules(cfg, tp)

    def to_mesh(spec: P) -> P:
        unknown = [a for a in spec if a is not None and a not in rules]
        if unknown:
            raise ValueError(f"no sharding rule for logical axes {unknown}; known: {sorted(rules)}")
        return P(*(None if a is None else rules[a] for a in spec))

    return jax.tree.map(to_mesh, logical, is_leaf=lambda x: isinstance(x, P))


def kv_cache_spec(cfg: ModelConfig, tp: int) -> P:
    """Spec of one layer's key (or value) pages ``[Hkv, num_pages, page_size, D]``.

    Pages are split over ``dp``: each data-parallel group keeps the pages of
    the sequences it serves.
    """
    return P(logical_rules(cfg, tp)["kv_heads"], "dp", None, None)


def named(mesh: Mesh, specs):
    """``NamedSharding`` on ``mesh`` for every ``PartitionSpec`` of a tree."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
