"""Typed settings of a training run."""

from __future__ import annotations

import dataclasses

from hexjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer and pipeline settings of a training run (AdamW, warmup + cosine decay)."""

    lr: float = 3e-4
    """Peak learning rate, reached at the end of the warmup."""
    warmup_steps: int = 0
    """Steps of linear warmup from ``lr * init_lr_ratio`` to ``lr``."""
    decay_steps: int = 0
    """Length of the whole schedule (warmup included) in steps; the cosine decays to
    ``lr * end_lr_ratio`` at this step. 0 keeps the learning rate constant after the warmup."""
    init_lr_ratio: float = 0.0
    """Learning rate at step 0 as a fraction of ``lr`` (only with a warmup)."""
    end_lr_ratio: float = 0.1
    """Learning rate at the end of the cosine decay as a fraction of ``lr``."""
    b1: float = 0.9
    """AdamW first-moment decay."""
    b2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW), applied to matrices only unless ``decay_norms``."""
    decay_norms: bool = False
    """Also decay the 1-D parameters (norm scales, biases)."""
    clip_norm: float | None = 1.0
    """Clip the gradients to this global L2 norm, taken over every stage; None turns clipping off."""
    remat: bool = False
    """Recompute each decoder layer's activations in the backward pass (``jax.checkpoint`` per layer)."""
    keep_checkpoints: int = 3
    """Checkpoints kept in a checkpoint directory (older ones are deleted)."""
    master_dtype: str | None = "float32"
    """dtype of the parameters' master copy, their gradients and the optimizer state. With a lower
    compute dtype (``Trainer(dtype="bfloat16")``) this is mixed precision: each stage program casts the
    weights down for its matmuls and the update runs in ``master_dtype``. None: the compute dtype
    (e.g. pure bfloat16)."""

    def __post_init__(self):
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ConfigError(f"warmup_steps ({self.warmup_steps}) and decay_steps ({self.decay_steps}) "
                              "must not be negative")
        if self.decay_steps and self.decay_steps <= self.warmup_steps:
            raise ConfigError(f"decay_steps ({self.decay_steps}) counts the warmup too, so it must exceed "
                              f"warmup_steps ({self.warmup_steps}); or give 0 for no decay")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"clip_norm must be positive or None, got {self.clip_norm}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must not be negative, got {self.weight_decay}")
        if self.master_dtype is not None and self.master_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"master_dtype must be float32, bfloat16, float16 or None, got {self.master_dtype!r}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be at least 1, got {self.keep_checkpoints}")
