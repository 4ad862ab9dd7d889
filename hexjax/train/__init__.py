"""Training over a plan: 1F1B pipelines, asymmetric data parallelism, AdamW, orbax checkpoints.

::

    from hexjax.train import Trainer, TrainConfig
    tr = Trainer(cfg, plan, config=TrainConfig(lr=3e-4, warmup_steps=100, decay_steps=10_000), microbatches=4)
    metrics = tr.step(tokens)          # tokens [B, S+1]; {loss, grad_norm, lr, tokens, seconds}
    tr.save("ckpt")                    # asynchronous; keyed by global layer: restores under any other plan
    tr.wait_for_saves()                # committed (the next save and restore wait by themselves)
    Trainer(cfg, plan, dtype="bfloat16")   # bf16 compute, fp32 master weights and AdamW state
    Trainer(cfg, other_plan, config=...).restore("ckpt")
    tr.save_hf("out")                  # a Hugging Face checkpoint transformers loads

    from hexjax.train import compile_train   # XLA's per-stage fwd/bwd/update, no weights
    records = compile_train(plan, cfg, seq_len=1024, global_batch=32, microbatches=4)
"""

from hexjax.train.compile import TrainCompile, compile_train
from hexjax.train.config import TrainConfig
from hexjax.train.optimizer import lr_schedule, make_optimizer
from hexjax.train.schedule import one_f_one_b
from hexjax.train.trainer import Trainer, check_batch_shape

__all__ = ["TrainCompile", "TrainConfig", "compile_train", "Trainer", "check_batch_shape", "lr_schedule", "make_optimizer", "one_f_one_b"]
