"""``generate``: run a plan's replicas over a batch of prompts."""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np

from hexjax.errors import ConfigError, PlanError
from hexjax.models.config import ModelConfig
from hexjax.models.sampling import Sampling


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How the runtime lays out a generation run (not what the plan decides)."""

    dtype: str | None = None
    """Parameter, activation and KV-cache dtype; None takes the model's (float32 for a config)."""
    page_size: int = 16
    """Tokens per KV-cache page (the cost model sizes plans with ``search.cost.KV_PAGE_TOKENS``, also 16)."""
    num_pages: int | None = None
    """KV-cache pages per replica; None sizes the pool to the requests."""
    micro_batches: int | None = None
    """Microbatches per replica.  None: on accelerators, the plan's choice (saved with its
    prediction) or else one per stage, so stages overlap; on CPU devices one, since they
    share the host's cores (overlap gains nothing, and each microbatch re-reads the weights)."""
    attention_impl: str = "auto"
    """Attention kernels: "auto" (Pallas on GPU, jnp elsewhere), or a choice of ``hexjax.kernels``."""
    seed: int = 0
    """Seed of the random weights when the model is given as a config."""
    platform: str | None = None
    """Run on this JAX platform's devices ("cpu", "gpu"); None: the default backend."""


@dataclasses.dataclass
class GenerationResult:
    """Tokens and timings of one run."""

    tokens: list[list[int]]
    """Generated token ids per prompt (prompts not included)."""
    logits: list[np.ndarray] | None
    """Per prompt, float32 logits [new_tokens, vocab] each token was chosen from (when asked for)."""
    seconds: float
    """Wall time from the first prefill to the last token being on the host."""
    compile_seconds: float
    """Time spent building placements and compiling before generation started."""

    @property
    def tokens_per_s(self) -> float:
        return sum(len(t) for t in self.tokens) / self.seconds if self.seconds > 0 else float("inf")


def model_params(model, seed: int = 0) -> tuple[ModelConfig, dict]:
    """(config, full parameter tree) of a loaded model, or random weights for a config."""
    if isinstance(model, ModelConfig):
        import jax
        from hexjax.models.llama import LlamaStage, init_params
        return model, init_params(LlamaStage(model), jax.random.key(seed))
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    params = getattr(model, "params", None)
    if not isinstance(cfg, ModelConfig) or params is None:
        raise ConfigError(
            f"generate: model must be a ModelConfig (random weights) or a loaded model with .cfg and "
            f".params (hexjax.load_hf), got {type(model).__name__}")
    return cfg, params


def check_plan(plan, cfg: ModelConfig) -> None:
    """Structural checks that need no cluster description: layers covered, meshes well formed."""
    if not plan.replicas:
        raise PlanError("the plan has no replicas")
    from hexjax.plan import tp_problems
    seen: dict[int, str] = {}
    for ri, rep in enumerate(plan.replicas):
        nxt = 0
        for si, st in enumerate(rep.stages):
            where = f"replica {ri} stage {si}"
            start, stop = st.layers
            if start != nxt or stop <= start:
                raise PlanError(f"{where}: layers [{start}, {stop}) do not continue from layer {nxt}; "
                                "stages must cover the model's layers in order without gaps")
            nxt = stop
            if len(st.devices) != st.dp * st.tp:
                raise PlanError(f"{where}: {len(st.devices)} devices for a dp={st.dp} x tp={st.tp} mesh")
            problems = tp_problems(cfg, st.tp)
            if problems:
                raise PlanError(f"{where}: {'; '.join(problems)}")
            for d in st.devices:
                if d in seen:
                    raise PlanError(f"{where}: device {d} is also used by {seen[d]}")
                seen[d] = where
        if nxt != cfg.num_layers:
            raise PlanError(f"replica {ri}: stages end at layer {nxt} but {cfg.name} has {cfg.num_layers} layers")


def page_budget(replica, cfg: ModelConfig, cluster, dtype_bytes: int, page_size: int, workload) -> list[int]:
    """KV-cache pages each stage's devices hold beside their weights and workspace (per device).

    Per stage, as the cost model sizes it for ``workload`` (the plan's, so
    that a plan the search found to fit gets the pages it was planned with):
    usable memory of its smallest device (the reserve taken off) minus the
    stage's weights and activation workspace, divided by one page's bytes on
    one device.  Sized in the plan's dtype (``dtype_bytes``).
    """
    from hexjax.search import cost
    pred = cost.predict_replica(replica, cfg, cluster, workload, dtype_bytes)
    budget = []
    for st, sp in zip(replica.stages, pred.stages):
        layers = st.layers[1] - st.layers[0]
        page_bytes = layers * 2 * cost.kv_heads_per_device(cfg, st.tp) * cfg.head_dim * page_size * dtype_bytes
        free = sp.capacity_bytes - sp.weight_bytes - sp.activation_bytes
        budget.append(max(0, int(free // page_bytes)))
    return budget


def split_requests(num_requests: int, num_replicas: int) -> list[list[int]]:
    """Contiguous, near-equal shares of the requests for each replica."""
    bounds = [num_requests * r // num_replicas for r in range(num_replicas + 1)]
    return [list(range(bounds[r], bounds[r + 1])) for r in range(num_replicas)]


def check_prompts(prompts: Sequence[Sequence[int]], cfg: ModelConfig, max_new_tokens: int) -> list[list[int]]:
    if max_new_tokens <= 0:
        raise ConfigError(f"generate: max_new_tokens must be positive, got {max_new_tokens}")
    if not prompts:
        raise ConfigError("generate: no prompts given")
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise ConfigError(f"generate: prompt {i} is empty; every prompt needs at least one token")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ConfigError(f"generate: prompt {i} has token ids {bad[:3]} outside [0, {cfg.vocab_size})")
        if len(p) + max_new_tokens > cfg.max_position_embeddings:
            raise ConfigError(
                f"generate: prompt {i} ({len(p)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
                f"the model's max_position_embeddings ({cfg.max_position_embeddings})")
        out.append(p)
    return out


def run_plan(model, plan, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(), *, cluster=None, options: RunOptions = RunOptions(),
             keep_logits: bool = False, params=None, eos_id: int | None = None) -> GenerationResult:
    """Generate through ``plan`` and report tokens, optional logits and timings.

    ``params`` (a full parameter tree) overrides the model's when given, so
    repeated runs of a random model need not re-initialise it.  With
    ``eos_id``, each sequence is cut after its first ``eos_id`` (the steps run
    to ``max_new_tokens`` regardless: stopping early would need the host to
    wait for every step).
    """
    from hexjax.runtime.devices import plan_devices
    from hexjax.runtime.pipeline import ReplicaRunner

    t0 = time.perf_counter()
    cfg, model_p = (model, params) if params is not None and isinstance(model, ModelConfig) \
        else model_params(model, options.seed)
    if cluster is not None:
        plan.validate(cfg, cluster)
    check_plan(plan, cfg)
    prompts = check_prompts(prompts, cfg, max_new_tokens)
    devices = plan_devices(plan, options.platform)
    dtype = options.dtype or np.dtype(getattr(model, "dtype", None) or np.float32).name
    micro = options.micro_batches
    planned = None
    if micro is None:
        if devices[plan.replicas[0].stages[0].devices[0]].platform == "cpu":
            micro = 1
        else:
            from hexjax.runtime.hlo import plan_microbatches
            planned = plan_microbatches(plan)   # the search's choice, when the plan carries it
    shares = split_requests(len(prompts), len(plan.replicas))
    budgets = [None] * len(plan.replicas)
    if cluster is not None and options.num_pages is None:
        from hexjax.workload import Workload
        workload = plan.workload or Workload(max(map(len, prompts)), max_new_tokens, max(map(len, shares)))
        budgets = [page_budget(rep, cfg, cluster, plan.dtype_bytes, options.page_size, workload)
                   for rep in plan.replicas]
    runners = []
    for ri, (rep, share) in enumerate(zip(plan.replicas, shares)):
        if not share:
            continue
        runners.append(ReplicaRunner(
            cfg, rep, devices, model_p, share, [prompts[i] for i in share], max_new_tokens, sampling,
            dtype=dtype, page_size=options.page_size, num_pages=options.num_pages,
            attention_impl=options.attention_impl,
            micro_batches=planned.get(ri) if planned else micro, keep_logits=keep_logits,
            max_pages=budgets[ri]))
    t1 = time.perf_counter()
    # issue everything, replicas and microbatches interleaved; block only when reading results
    for m in range(max(r.layout.num_micro for r in runners)):
        for r in runners:
            if m < r.layout.num_micro:
                r.prefill(m)
    for step in range(1, max_new_tokens):
        for m in range(max(r.layout.num_micro for r in runners)):
            for r in runners:
                if m < r.layout.num_micro:
                    r.decode(m, step)
    tokens: list[list[int]] = [None] * len(prompts)
    logits: list[np.ndarray] = [None] * len(prompts)
    for r in runners:
        toks, lg = r.results()
        r.release()
        for i, req in enumerate(r.requests):
            tokens[req] = toks[i]
            if lg is not None:
                logits[req] = lg[i]
    t2 = time.perf_counter()
    if eos_id is not None:
        for i, row in enumerate(tokens):
            if eos_id in row:
                cut = row.index(eos_id) + 1
                tokens[i] = row[:cut]
                if keep_logits:
                    logits[i] = logits[i][:cut]
    return GenerationResult(tokens, logits if keep_logits else None, t2 - t1, t1 - t0)


def generate(model, plan, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(), *, cluster=None, options: RunOptions = RunOptions(),
             eos_id: int | None = None) -> list[list[int]]:
    """New token ids for each prompt, generated through ``plan``'s replicas and stages.

    ``model`` is a loaded model (``hexjax.load_hf``) or a ``ModelConfig`` (random
    weights from ``options.seed``).  Greedy when ``sampling.temperature`` is 0;
    otherwise request ``i``'s token ``t`` is drawn with
    ``fold_in(step_key(sampling.seed, t), i)``, so results do not depend on the plan.
    Each sequence ends after its first ``eos_id`` when that is given.
    """
    return run_plan(model, plan, prompts, max_new_tokens, sampling, cluster=cluster, options=options,
                    eos_id=eos_id).tokens
