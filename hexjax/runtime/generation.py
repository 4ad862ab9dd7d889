"""``generate``: run a plan's replicas over a batch of prompts."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Sequence

import numpy as np

from hexjax.errors import ConfigError
from hexjax.models.config import ModelConfig
from hexjax.models.prompts import check_prompts, eos_lengths
from hexjax.models.sampling import Sampling
from hexjax.runtime.build import RunOptions

if TYPE_CHECKING:
    from hexjax.runtime.build import ReplicaBuild


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
    dtype: str = "float32"
    """The dtype the stages ran in."""
    kv_pages: dict[tuple[int, int], int] = dataclasses.field(default_factory=dict)
    """KV-cache pages placed per (replica, stage) pool (all dp ranges, reserved pages included)."""

    @property
    def tokens_per_s(self) -> float:
        return sum(len(t) for t in self.tokens) / self.seconds if self.seconds > 0 else float("inf")


def model_config(model) -> ModelConfig:
    """The config of a loaded model (``hexjax.load_hf``, ``LlamaModel``)."""
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig) or getattr(model, "params", None) is None:
        raise ConfigError(
            f"generate: model must be a ModelConfig (random weights) or a loaded model with .cfg and "
            f".params (hexjax.load_hf), got {type(model).__name__}")
    return cfg


def model_params(model, seed: int = 0) -> tuple[ModelConfig, dict]:
    """(config, full parameter tree) of a loaded model, or random weights for a config."""
    if isinstance(model, ModelConfig):
        import jax
        from hexjax.models.llama import LlamaStage, init_params
        return model, init_params(LlamaStage(model), jax.random.key(seed))
    return model_config(model), model.params


def check_plan(plan, cfg: ModelConfig) -> None:
    """Refuse a plan whose shape does not fit the model (``Plan.check_layout``); needs no cluster."""
    plan.check_layout(cfg)


def split_requests(num_requests: int, num_replicas: int) -> list[list[int]]:
    """Contiguous, near-equal shares of the requests for each replica."""
    bounds = [num_requests * r // num_replicas for r in range(num_replicas + 1)]
    return [list(range(bounds[r], bounds[r + 1])) for r in range(num_replicas)]


def plan_dtype(plan) -> str:
    """The dtype a plan was sized for, from its ``dtype_bytes``."""
    return {4: "float32", 2: "bfloat16"}.get(plan.dtype_bytes, "bfloat16")


def _micro_batches(plan, devices, options: RunOptions) -> dict[int, int | None]:
    """Microbatches per replica: the option; else one on CPU devices; else the plan's saved choice."""
    if options.micro_batches is not None:
        return {ri: options.micro_batches for ri in range(len(plan.replicas))}
    if devices[plan.replicas[0].stages[0].devices[0]].platform == "cpu":
        return {ri: 1 for ri in range(len(plan.replicas))}
    return plan_microbatches(plan) or {ri: None for ri in range(len(plan.replicas))}


def plan_microbatches(plan) -> dict[int, int] | None:
    """Microbatches per replica that the plan's saved prediction chose, if it has one."""
    pred = getattr(plan, "prediction", None) or {}
    reps = pred.get("replicas") if isinstance(pred, dict) else None
    if not reps or len(reps) != len(plan.replicas):
        return None
    try:
        return {i: int(r["microbatches"]) for i, r in enumerate(reps)}
    except (KeyError, TypeError, ValueError):
        return None


@dataclasses.dataclass(frozen=True)
class PreparedRun:
    """What a run will place, decided (and checked) before any weights are read."""

    prompts: list[list[int]]
    """The validated prompts."""
    shares: list[list[int]]
    """Per replica, the prompts (indices) it serves."""
    builds: dict[int, ReplicaBuild]
    """Per replica that serves any, its stages, rows and page pools."""
    devices: list
    """JAX device of each global device index."""
    dtype: str
    """The dtype the stages run in."""


def prepare_run(cfg: ModelConfig, plan, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                cluster=None, options: RunOptions = RunOptions()) -> PreparedRun:
    """Validate a run and lay it out, touching no device memory.

    The plan against the model (and the cluster, when given), the prompts,
    the devices; the dtype (the plan's unless ``options.dtype``); per replica
    the stages, rows and page pools of ``build_replica``.  Refused with the
    shortfall: a run that does not fit the cluster's devices in that dtype, or
    the JAX devices' (or host's) memory.
    """
    from hexjax.runtime import memory
    from hexjax.runtime.build import build_replica, page_budget
    from hexjax.runtime.devices import plan_devices
    from hexjax.workload import Workload

    if cluster is not None:
        plan.validate(cfg, cluster)
    check_plan(plan, cfg)
    prompts = check_prompts(prompts, cfg, max_new_tokens)
    devices = plan_devices(plan, options.platform)
    dtype = options.dtype or plan_dtype(plan)
    micro = _micro_batches(plan, devices, options)
    shares = split_requests(len(prompts), len(plan.replicas))
    budgets: list = [None] * len(plan.replicas)
    if cluster is not None:
        served = [Workload(max(len(prompts[i]) for i in sh), max_new_tokens, len(sh)) if sh else None
                  for sh in shares]
        memory.check_fits(plan, cfg, cluster, served, dtype)
        if options.num_pages is None:
            sized = plan.workload or Workload(max(map(len, prompts)), max_new_tokens, max(map(len, shares)))
            budgets = [page_budget(rep, cfg, cluster, np.dtype(dtype).itemsize, options.page_size, sized)
                       for rep in plan.replicas]
    builds = {ri: build_replica(cfg, plan.replicas[ri], [len(prompts[i]) for i in share], max_new_tokens,
                                dtype, options, micro_batches=micro[ri], page_budget=budgets[ri])
              for ri, share in enumerate(shares) if share}
    memory.check_devices_hold(builds.values(), devices, cfg)
    return PreparedRun(prompts, shares, builds, devices, dtype)


def run_plan(model, plan, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(), *, cluster=None, options: RunOptions = RunOptions(),
             keep_logits: bool = False, params=None, eos_id: int | None = None,
             move=None, read=None) -> GenerationResult:
    """Generate through ``plan`` and report tokens, optional logits and timings.

    Runs in the plan's dtype unless ``options.dtype`` says otherwise; with a
    ``cluster``, a run that would not fit its devices (in that dtype, for
    these requests) is refused with the shortfall before anything is placed.
    ``params`` (a full parameter tree) overrides the model's when given, so
    repeated runs of a random model need not re-initialise it.  With
    ``eos_id``, each sequence is cut after its first ``eos_id`` (the steps run
    to ``max_new_tokens`` regardless: stopping early would need the host to
    wait for every step).  ``move``/``read`` replace ``jax.device_put`` between
    stages and ``np.asarray`` for results (several processes:
    ``hexjax.runtime.distributed``).
    """
    from hexjax.runtime.pipeline import ReplicaRunner

    t0 = time.perf_counter()
    cfg = model if isinstance(model, ModelConfig) else model_config(model)
    run = prepare_run(cfg, plan, prompts, max_new_tokens, cluster=cluster, options=options)
    if params is None:
        cfg, params = model_params(model, options.seed)
    prompts, shares, builds, devices = run.prompts, run.shares, run.builds, run.devices
    runners = [ReplicaRunner(builds[ri], devices, params, shares[ri], [prompts[i] for i in shares[ri]],
                             max_new_tokens, sampling, keep_logits=keep_logits, move=move, read=read)
               for ri in builds]
    t1 = time.perf_counter()

    # issue everything, replicas and microbatches interleaved; block only when reading results
    rounds = max(r.layout.num_micro for r in runners)
    for m in range(rounds):
        for r in runners:
            if m < r.layout.num_micro:
                r.prefill(m)
    for step in range(1, max_new_tokens):
        for m in range(rounds):
            for r in runners:
                if m < r.layout.num_micro:
                    r.decode(m, step)

    # collect
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
    keep = eos_lengths(tokens, eos_id)
    tokens = [row[:n] for row, n in zip(tokens, keep)]
    if keep_logits:
        logits = [lg[:n] for lg, n in zip(logits, keep)]
    pages = {(ri, si): sb.shape.num_pages for ri, b in builds.items() for si, sb in enumerate(b.stages)}
    return GenerationResult(tokens, logits if keep_logits else None, t2 - t1, t1 - t0, run.dtype, pages)


def generate(model, plan, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(), *, cluster=None, options: RunOptions = RunOptions(),
             eos_id: int | None = None) -> list[list[int]]:
    """New token ids for each prompt, generated through ``plan``'s replicas and stages.

    ``model`` is a loaded model (``hexjax.load_hf``) or a ``ModelConfig`` (random
    weights from ``options.seed``).  Runs in the plan's dtype unless
    ``options.dtype`` is given.  Greedy when ``sampling.temperature`` is 0;
    otherwise request ``i``'s token ``t`` is drawn with
    ``request_key(sampling.seed, i, t)``, so results do not depend on the plan.
    Each sequence ends after its first ``eos_id`` when that is given.
    """
    return run_plan(model, plan, prompts, max_new_tokens, sampling, cluster=cluster, options=options,
                    eos_id=eos_id).tokens
