"""Prometheus metrics of a serving engine, in a registry of their own (several servers per process are fine)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServeMetrics:
    """Engine events -> Prometheus series (pass as ``Engine(..., metrics=ServeMetrics())``)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.running = Gauge("hexjax_num_requests_running", "Requests holding a batch row.", registry=r)
        self.waiting = Gauge("hexjax_num_requests_waiting", "Requests queued (new or preempted).", registry=r)
        self.kv_usage = Gauge("hexjax_kv_cache_usage_perc", "Used fraction of the fullest KV page pool (0-1).",
                              registry=r)
        self.preemptions = Counter("hexjax_num_preemptions", "Requests preempted for lack of KV pages.",
                                   registry=r)
        self.prompt_tokens = Counter("hexjax_prompt_tokens", "Prompt tokens of arrived requests.", registry=r)
        self.generation_tokens = Counter("hexjax_generation_tokens", "Generated tokens.", registry=r)
        self.replica_tokens = Counter("hexjax_replica_generation_tokens", "Generated tokens per plan replica.",
                                      ["replica"], registry=r)
        self.finished = Counter("hexjax_request_success", "Finished requests.", ["finished_reason"], registry=r)
        self.ttft = Histogram("hexjax_time_to_first_token_seconds", "Arrival to first token.", buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram("hexjax_inter_token_latency_seconds", "Time between a request's tokens.",
                             buckets=_LATENCY, registry=r)
        self.e2e = Histogram("hexjax_e2e_request_latency_seconds", "Arrival to the last token.",
                             buckets=_LATENCY, registry=r)

    # ---- engine events (engine thread) ----

    def on_arrival(self, req) -> None:
        self.prompt_tokens.inc(len(req.prompt))

    def on_preemption(self, req) -> None:
        self.preemptions.inc()

    def on_first_token(self, req, now: float) -> None:
        self.generation_tokens.inc()
        self.replica_tokens.labels(str(req.replica)).inc()
        self.ttft.observe(now - req.arrival)

    def on_token(self, req, now: float) -> None:
        self.generation_tokens.inc()
        self.replica_tokens.labels(str(req.replica)).inc()
        if req.last_token_time is not None:
            self.itl.observe(now - req.last_token_time)

    def on_finish(self, req) -> None:
        self.finished.labels(req.finish_reason or "unknown").inc()
        if req.finish_reason != "abort":
            self.e2e.observe((req.last_token_time or time.perf_counter()) - req.arrival)

    def on_step(self, engine) -> None:
        self.update(engine)

    def update(self, engine) -> None:
        self.running.set(engine.num_running)
        self.waiting.set(engine.num_waiting)
        self.kv_usage.set(engine.kv_usage())

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
