"""Request traces: what a serving plan is asked to serve when lengths vary.

A trace is a list of requests, each with a prompt length, an output length
and, optionally, an arrival time. Two file forms are read:

- **JSON lines** (``.jsonl``): one request per line,
  ``{"prompt_len": 512, "output_len": 128, "arrival_s": 0.25}``
  (``arrival_s`` optional, all or none; blank lines are skipped);
- a **histogram** (``.json``): ``{"histogram": [{"prompt_len": 512,
  "output_len": 128, "count": 30}, ...]}``, whose bins are expanded into that
  many requests each (in bin order, no arrival times).

Arrival times that a trace lacks come from a Poisson process of a given rate
(:meth:`Trace.with_rate`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from hexjax.errors import ConfigError
from hexjax.workload import Workload


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    """One request of a trace."""

    prompt_len: int
    """Prompt tokens."""
    output_len: int
    """Tokens generated (the first comes out of prefill)."""
    arrival_s: float | None = None
    """Arrival time, seconds from the start of the trace (None: not given)."""

    @property
    def context_len(self) -> int:
        return self.prompt_len + self.output_len


@dataclasses.dataclass(frozen=True)
class Trace:
    """Requests in arrival order (or file order when they carry no arrival times)."""

    requests: tuple[TraceRequest, ...]
    """The requests."""
    name: str = "trace"
    """Where it came from (file name or distribution)."""

    def __post_init__(self):
        object.__setattr__(self, "requests", tuple(self.requests))
        if not self.requests:
            raise ConfigError(f"{self.name}: the trace holds no requests; give at least one")

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def timed(self) -> bool:
        """Whether every request carries an arrival time."""
        return all(r.arrival_s is not None for r in self.requests)

    def with_rate(self, rate_per_s: float, seed: int = 0, num_requests: int | None = None) -> "Trace":
        """The same sizes arriving as a Poisson process of ``rate_per_s`` (exponential gaps, first at 0).

        ``num_requests`` cycles through the trace's sizes (or cuts it) to that many requests.
        """
        if not (isinstance(rate_per_s, (int, float)) and math.isfinite(rate_per_s) and rate_per_s > 0):
            raise ConfigError(f"rate must be a positive number of requests per second, got {rate_per_s!r}")
        n = len(self.requests) if num_requests is None else num_requests
        if n < 1:
            raise ConfigError(f"--requests must be at least 1, got {n}")
        gaps = np.random.default_rng(seed).exponential(1.0 / rate_per_s, size=n)
        times = np.concatenate([[0.0], np.cumsum(gaps[1:])])
        reqs = [dataclasses.replace(self.requests[i % len(self.requests)], arrival_s=float(t))
                for i, t in enumerate(times)]
        return Trace(tuple(reqs), f"{self.name} at {rate_per_s:g}/s")

    def sizes(self) -> np.ndarray:
        """``[N, 2]`` integer array of (prompt_len, output_len)."""
        return np.array([(r.prompt_len, r.output_len) for r in self.requests], dtype=np.int64)

    def workload(self, batch: int = 1, rate_per_s: float | None = None, slo_s: float | None = None) -> Workload:
        """The one-length workload a plan searched for this trace is costed at: the mean prompt and output
        lengths, rounded up (time and throughput are close to linear in the lengths; memory for the
        longest requests is checked separately, see :meth:`longest`)."""
        s = self.sizes()
        return Workload(int(math.ceil(s[:, 0].mean())), int(math.ceil(s[:, 1].mean())), batch, rate_per_s, slo_s)

    def longest(self) -> TraceRequest:
        """The request with the longest context (prompt plus output)."""
        return max(self.requests, key=lambda r: r.context_len)

    def summary(self) -> dict:
        """Count, means and percentiles of the lengths (what ``hexjax plan --trace`` prints)."""
        s = self.sizes()
        out = {"requests": len(self.requests)}
        for j, name in enumerate(("prompt_len", "output_len")):
            col = s[:, j]
            out[name] = {"mean": float(col.mean()), "p50": float(np.percentile(col, 50)),
                         "p90": float(np.percentile(col, 90)), "max": int(col.max())}
        if self.timed:
            t = [r.arrival_s for r in self.requests]
            span = t[-1] - t[0]
            out["rate_per_s"] = (len(t) - 1) / span if span > 0 else None
        return out

    def check_model(self, cfg) -> None:
        """Refuse requests longer than the model's context."""
        for i, r in enumerate(self.requests):
            if r.context_len > cfg.max_position_embeddings:
                raise ConfigError(
                    f"{self.name}: request {i + 1} has prompt {r.prompt_len} + output {r.output_len} = "
                    f"{r.context_len} tokens, but {cfg.name} has only {cfg.max_position_embeddings} positions; "
                    "shorten it or use a model with a longer context")

    def to_jsonl(self) -> str:
        lines = []
        for r in self.requests:
            d = {"prompt_len": r.prompt_len, "output_len": r.output_len}
            if r.arrival_s is not None:
                d["arrival_s"] = round(r.arrival_s, 6)
            lines.append(json.dumps(d))
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_jsonl())


def _length(value, where: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: {field} must be a positive integer, got {value!r}")
    return value


def _request(d, where: str) -> TraceRequest:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: must be an object like {{\"prompt_len\": 512, \"output_len\": 128}}, got {d!r}")
    unknown = sorted(set(d) - {"prompt_len", "output_len", "arrival_s"})
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: arrival_s, output_len, prompt_len")
    for field in ("prompt_len", "output_len"):
        if field not in d:
            raise ConfigError(f"{where}: missing {field!r}")
    t = d.get("arrival_s")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0):
        raise ConfigError(f"{where}: arrival_s must be a number of seconds >= 0, got {t!r}")
    return TraceRequest(_length(d["prompt_len"], where, "prompt_len"), _length(d["output_len"], where, "output_len"),
                        None if t is None else float(t))


def parse_jsonl(text: str, name: str = "trace") -> Trace:
    """A trace from JSON lines (see the module docstring)."""
    reqs, timed = [], None
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{name}: line {no}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e.msg}); write one object per line") from None
        r = _request(d, where)
        if timed is None:
            timed = r.arrival_s is not None
        elif timed != (r.arrival_s is not None):
            raise ConfigError(f"{where}: arrival_s is given on some lines but not on others; give it on every "
                              "line or on none (then --rate sets the arrivals)")
        if reqs and r.arrival_s is not None and r.arrival_s < reqs[-1].arrival_s:
            raise ConfigError(f"{where}: arrival_s {r.arrival_s:g} is earlier than the line before "
                              f"({reqs[-1].arrival_s:g}); sort the requests by arrival time")
        reqs.append(r)
    if not reqs:
        raise ConfigError(f"{name}: no requests in the file; write one JSON object per line")
    return Trace(tuple(reqs), name)


def parse_histogram(d, name: str = "histogram") -> Trace:
    """A trace from a histogram object (see the module docstring)."""
    bins = d.get("histogram") if isinstance(d, dict) else None
    if not isinstance(bins, list) or not bins:
        raise ConfigError(f"{name}: must be an object {{\"histogram\": [{{\"prompt_len\": P, \"output_len\": O, "
                          "\"count\": N}, ...]}} with at least one bin")
    reqs = []
    for i, b in enumerate(bins):
        where = f"{name}: histogram[{i}]"
        if not isinstance(b, dict):
            raise ConfigError(f"{where}: must be an object with prompt_len, output_len and count, got {b!r}")
        unknown = sorted(set(b) - {"prompt_len", "output_len", "count"})
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: count, output_len, prompt_len")
        count = b.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError(f"{where}: count must be an integer >= 0, got {count!r}")
        r = _request({k: v for k, v in b.items() if k != "count"}, where)
        reqs += [r] * count
    if not reqs:
        raise ConfigError(f"{name}: every bin has count 0; the histogram holds no requests")
    return Trace(tuple(reqs), name)


def load_trace(path: str | Path) -> Trace:
    """Read a ``.jsonl`` trace or a ``.json`` histogram, with one-line errors naming the line or bin."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such trace file; give a .jsonl file of requests or a .json histogram "
                          "(examples under examples/traces/)")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix the syntax there") from None
        return parse_histogram(d, path.name)
    return parse_jsonl(text, path.name)


@dataclasses.dataclass(frozen=True)
class Replay:
    """What an engine did with a trace replayed in real time (seconds from the first arrival)."""

    first_token_s: tuple[float, ...]
    """Per request, when its first token came out."""
    finish_s: tuple[float, ...]
    """Per request, when its last token came out."""
    steps: tuple[tuple[float, tuple[tuple[int, int], ...]], ...]
    """Per engine step: its duration and, per output, (prompt_len, tokens generated so far)."""

    def throughput_tokens_per_s(self, trace: Trace) -> float:
        return sum(r.output_len for r in trace.requests) / max(self.finish_s)


def replay(engine, trace: Trace) -> Replay:
    """Send ``trace``'s requests to a serving engine (``hexjax.serve.Engine``, driven here step by step) at
    their arrival times, prompts of a repeated token and ``ignore_eos`` so each makes exactly its
    ``output_len`` tokens; returns when every request has finished."""
    import time

    from hexjax.serve import SamplingParams
    if not trace.timed:
        raise ConfigError(f"{trace.name}: replaying needs arrival times; use Trace.with_rate")
    t0 = time.perf_counter()
    index, first, finish, steps = {}, {}, {}, []
    pending = list(enumerate(trace.requests))
    while pending or engine.has_work():
        now = time.perf_counter() - t0
        while pending and pending[0][1].arrival_s <= now:
            k, r = pending.pop(0)
            rid = engine.add_request([7] * r.prompt_len, SamplingParams(max_tokens=r.output_len, ignore_eos=True))
            index[rid] = k
        if not engine.has_work():
            time.sleep(max(0.0, pending[0][1].arrival_s - now))
            continue
        start = time.perf_counter()
        outs = engine.step()
        end = time.perf_counter()
        steps.append((end - start, tuple((o.prompt_len, len(o.token_ids)) for o in outs)))
        for o in outs:
            k = index[o.request_id]
            first.setdefault(k, end - t0)
            if o.finished:
                finish[k] = end - t0
    n = len(trace.requests)
    return Replay(tuple(first[k] for k in range(n)), tuple(finish[k] for k in range(n)), tuple(steps))
