"""Measure the local devices and write a device profile the cost model can use.

``calibrate()`` runs micro-benchmarks on ``jax.local_devices()[0]`` (and, for
the all-reduce, on every local device):

- matmul rate per dtype at a few row counts (``rows x k @ k x k``);
- memory read bandwidth (an XLA reduction over a large array);
- the launch of a trivial program (the fixed cost of one program step);
- decoder layers of the project's own :class:`hexjax.models.llama.LlamaStage`,
  prefill and decode, at a few shapes of the chosen model (prefill: a few
  layers per program, the launch taken off, per layer; decode: a loop of decode
  steps over ``2 stack`` layers, per step and layer, so a program's launch is
  spread over many layers as in the generation loop);
- an all-reduce (``psum`` under ``shard_map``) over the local devices at two sizes;
- host to device and device to host copies;
- copies of a stage's activations to another stage's devices (two meshes of
  this host: one device to one, two to one, one to two);
- the serving engine's host work: :class:`hexjax.serve.Engine` decoding with
  a one-stage replica of the ``tiny`` model on one device at 1 and several
  rows, each step's time less the time of the same stage program run alone;
- on meshes of 1, 2 and 4 local devices (``Shapes.mesh_sizes``, as many as
  there are): the runtime's own stage programs (:mod:`hexjax.runtime.stage`,
  one and two middle layers of the chosen model, decode steps, and a prefill
  chunk over block tables of two sizes), a small all-reduce inside a program
  (chained ``psum``s, so the launch cancels out), and stage programs chained
  across meshes as the engine issues a step (each copy right behind the
  program before it, nothing waited for until the end).

The result is a :class:`Calibration`; :meth:`Calibration.device_spec` turns it
into a :class:`hexjax.devices.DeviceSpec` with a :class:`DeviceProfile`, and
:meth:`Calibration.to_toml` into a file that is both a cluster file (one host of
the local devices) and a profile other cluster files include with
``profiles = ["file.toml"]``.

How the figures become the profile:

- ``tflops`` is the best matmul rate measured (any dtype, any size);
- ``memory_bandwidth_GBps`` is the faster of the measured read rate and the
  rate at which the decode layer runs read their weights and cache (memory
  efficiency 1): on a shared machine even the streaming benchmark's fastest
  run may have been disturbed, and a decode step is a streaming read too;
- ``step_overhead_us`` is the launch time, added once per stage and step;
- the efficiency curve of each dtype comes from the decoder-layer runs: at a
  run's matmul rows (``batch x tokens``) it is the efficiency that makes the
  cost model's ``max(FLOPs / rate, bytes / bandwidth)`` of that layer equal
  the measured time. Where the byte bound alone already reaches the measured
  time (the run that set the read rate), the point is left out: the byte
  bound reproduces that run.
  So the curve carries everything a real layer does beyond its matmuls
  (norms, rotary embedding, softmax, dispatch) as a lower efficiency;
- the all-reduce fit ``t = 2 (n - 1) α + 2 (n - 1) / n * bytes / β`` gives the
  host's device-to-device bandwidth and latency (link efficiency 1);
- ``copy_latency_us`` is the mean fixed time of the stage-to-stage copies (at
  1 KiB) and ``copy_GBps`` the rate of a large one-device copy beyond it;
- ``host_pass_us`` and ``host_row_us`` fit ``step - program = pass + rows * row``
  to the serving engine's steps: what a serving pass costs the host beyond
  its stage programs (scheduling, inputs and block tables, sampling, reading
  the tokens back, emitting), measured on a model whose device time is small
  and timed apart, so that the figure is the engine's, not the model's.
  Only the serving simulation uses these four (``hexjax simulate``);
- by mesh size, for the serving simulation too (every program of these
  terms timed in turns, the median over rounds of each round's median run,
  so that a load that comes and goes hits every mesh size alike):
  ``stage_overhead_us`` is the
  mean over a mesh size's stage runs of the measured step less the serving
  cost model's time of that step without any fixed overhead (what a stage
  step costs beyond its layers and collectives: launching on every device,
  its many buffers, the host arrays copied in); ``allreduce_us`` the chained
  ``psum`` slope; ``chunk_key_ns`` the extend runs' difference over the
  difference of their tables' keys (per layer, chunk token and head of a
  device); ``chained_copy_us`` the mean over the chains of their time less
  their programs run alone, per copy.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import time
from typing import Any, Callable

import numpy as np

from hexjax.cluster import GB, GiB, devices_toml, profile_to_dict, _export_GBps, _export_us, _toml_value
from hexjax.devices import DTYPE_NAMES, DeviceProfile, DeviceSpec
from hexjax.errors import ConfigError
from hexjax.models.config import ModelConfig
from hexjax.workload import Workload

DTYPES = {"float32": 4, "bfloat16": 2}


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What to measure."""

    matmul_rows: tuple[int, ...]
    """Rows of the matmul benchmark."""
    matmul_k: int
    """Inner and output size of the matmul benchmark."""
    prefill: tuple[tuple[int, int], ...]
    """``(batch, tokens)`` of the layer prefills."""
    decode: tuple[tuple[int, int], ...]
    """``(batch, context)`` of the layer decode steps."""
    read_bytes: int
    """Size of the array the bandwidth benchmark reads."""
    allreduce_bytes: tuple[int, int]
    """Two message sizes of the all-reduce fit."""
    copy_bytes: int
    """Size of the host<->device copies."""
    repeats: int
    """Timed runs per benchmark (the fastest counts)."""
    stack: int
    """Decoder layers per timed prefill program (the launch time is measured apart and taken off); the
    decode loops run twice as many."""
    serving_rows: tuple[int, ...] = (1, 4)
    """Rows decoding in the serving engine's timed steps."""
    serving_steps: int = 40
    """Timed engine steps per row count (the median counts)."""
    mesh_sizes: tuple[int, ...] = (1, 2, 4)
    """Devices of the meshes the stage programs and all-reduces are measured on (as many as there are)."""


FULL = Shapes(matmul_rows=(1, 8, 64, 512, 2048), matmul_k=2048,
              prefill=((1, 32), (1, 128), (4, 128), (1, 512), (4, 512)),
              decode=((1, 256), (4, 256), (16, 256), (64, 256)),
              read_bytes=512 << 20, allreduce_bytes=(64 << 10, 16 << 20), copy_bytes=128 << 20, repeats=5, stack=4,
              serving_rows=(1, 8), serving_steps=60)
QUICK = Shapes(matmul_rows=(1, 64, 512), matmul_k=1024,
               prefill=((1, 64), (2, 128)), decode=((1, 128), (4, 128)),
               read_bytes=256 << 20, allreduce_bytes=(64 << 10, 4 << 20), copy_bytes=32 << 20, repeats=4, stack=2)


@dataclasses.dataclass(frozen=True)
class LayerRun:
    """One measured decoder-layer program."""

    phase: str
    """``prefill`` or ``decode``."""
    batch: int
    tokens: int
    """Tokens per row (1 for decode)."""
    context: int
    """Keys attended (decode) or prompt tokens (prefill)."""
    dtype: str
    seconds: float
    """Fastest measured run, per layer (launch time taken off)."""
    flops: float
    """The cost model's FLOPs of the program."""
    bytes: float
    """The cost model's bytes read."""

    @property
    def rows(self) -> int:
        """Rows of the layer's matmuls."""
        return self.batch * self.tokens


@dataclasses.dataclass(frozen=True)
class StageRun:
    """One measured step of the runtime's stage program (middle layers, no embedding or head)."""

    devices: int
    """Devices of the stage's mesh (``tp`` of them, ``dp = 1``)."""
    layers: int
    rows: int
    context: int
    """Decode: the position the step decodes at; extend: the chunk's width (starting at position 0)."""
    seconds: float
    """Measured step (:func:`interleaved_time_s`), the positions and block tables passed from the host as the
    engine does."""
    phase: str = "decode"
    """``decode`` or ``extend`` (a prefill chunk)."""
    table_tokens: int = 128
    """Keys the block tables span."""


STAGE_TABLE_TOKENS, STAGE_PAGE = 128, 16
"""Block tables of the measured decode steps: 128 tokens in pages of 16 (the engine's page size)."""
STAGE_EXTEND_WIDTH, STAGE_EXTEND_TABLES = 32, (128, 512)
"""The measured prefill chunk: 32 tokens of one row, over block tables of 128 and 512 tokens."""


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Everything one ``calibrate()`` run measured."""

    name: str
    """Device name the profile defines."""
    platform: str
    """``cpu``, ``gpu`` or ``tpu``."""
    device_kind: str
    """What JAX calls the device."""
    num_devices: int
    """Local devices (the all-reduce ran over them)."""
    memory_bytes: int
    """Memory of one device."""
    matmul: tuple[tuple[str, int, int, float], ...]
    """``(dtype, rows, k, FLOP/s)``."""
    read_Bps: float
    """Memory read bandwidth."""
    layers: tuple[LayerRun, ...]
    """Decoder-layer runs."""
    allreduce: tuple[tuple[int, float], ...]
    """``(bytes, seconds)`` of the all-reduce runs (empty with one device)."""
    launch_s: float
    """Fastest run of a trivial program: the fixed cost of launching one."""
    h2d_Bps: float
    """Host to device copy rate."""
    d2h_Bps: float
    """Device to host copy rate."""
    model: str
    """Model whose layer was measured."""
    price_per_hour: float
    """Price written into the profile."""
    source: str
    """When and with what it was measured."""
    copy_latency_s: float = 0.0
    """Fixed time of a copy between two stages' meshes (0: one device, not measured)."""
    copy_Bps: float = 0.0
    """Rate of such a copy beyond its fixed time (0: not measured)."""
    serving: tuple[tuple[int, float, float], ...] = ()
    """``(rows, engine step s, stage program s)`` of the serving engine's decode steps (empty: not measured)."""
    collectives: tuple[tuple[int, float], ...] = ()
    """``(devices, seconds)``: what one more small all-reduce adds inside a program on that many devices
    (empty: not measured)."""
    stages: tuple[StageRun, ...] = ()
    """Decode steps of the runtime's stage programs by mesh size (empty: not measured)."""
    chains: tuple[tuple[str, float, float, int], ...] = ()
    """``(meshes, chain s, programs alone s, copies)`` of stage programs chained as the engine issues them
    (empty: not measured)."""
    config: ModelConfig | None = dataclasses.field(default=None, compare=False, repr=False)
    """The measured model (for the cost model's figures of the stage runs; default: loaded by name)."""

    @property
    def peak_flops(self) -> float:
        return max(r for *_, r in self.matmul)

    def link(self) -> tuple[float, float]:
        """``(bandwidth B/s, latency s)`` fitted to the all-reduce runs (ring model); defaults without them."""
        n = self.num_devices
        if len(self.allreduce) < 2 or n < 2:
            return 16 * GB, 5e-6
        (b0, t0), (b1, t1) = self.allreduce[0], self.allreduce[-1]
        per_byte = max((t1 - t0) / (b1 - b0), 1e-15)          # = 2 (n - 1) / n / β
        bw = 2 * (n - 1) / n / per_byte
        alpha = max(t0 - 2 * (n - 1) / n * b0 / bw, 0.0) / (2 * (n - 1))
        return bw, alpha

    def host_work(self) -> tuple[float, float]:
        """``(per pass, per row)`` seconds of the serving engine's host work: ``step - program`` fitted
        through the runs with the fewest and the most rows (0, 0 without runs)."""
        if not self.serving:
            return 0.0, 0.0
        runs = sorted(self.serving)
        (r0, s0, p0), (r1, s1, p1) = runs[0], runs[-1]
        h0, h1 = max(s0 - p0, 0.0), max(s1 - p1, 0.0)
        row = max((h1 - h0) / (r1 - r0), 0.0) if r1 > r0 else 0.0
        return max(h0 - r0 * row, 0.0), row

    def stream_Bps(self) -> float:
        """The device's read rate: the faster of the streaming benchmark and the rate at which the decode
        layer runs read their weights and cache (a decode step is a streaming read too, and on a shared
        machine the benchmark's fastest run may still have been disturbed)."""
        runs = [r.bytes / r.seconds for r in self.layers if r.phase == "decode" and r.seconds > 0]
        return max([self.read_Bps, *runs])

    def efficiency_points(self, dtype: str) -> list[tuple[int, float]]:
        """The curve of ``dtype``: per layer run, the efficiency that reproduces its measured time."""
        peak, bw = self.peak_flops, self.stream_Bps()
        best: dict[int, float] = {}
        for run in self.layers:
            if run.dtype != dtype:
                continue
            spare = run.seconds
            if run.bytes / bw >= spare:   # bound by reading: says nothing about the matmul rate
                continue
            eff = min(run.flops / (peak * spare), 4.0)
            best[run.rows] = max(best.get(run.rows, 0.0), eff)
        return sorted(best.items())

    def profile(self) -> DeviceProfile:
        curves = {d: pts for d in DTYPES if (pts := self.efficiency_points(d))}
        if not curves:   # every run read-bound: the matmul curve is the best there is
            curves = {d: sorted({rows: r / self.peak_flops for dt, rows, _, r in self.matmul if dt == d}.items())
                      for d in DTYPES if any(dt == d for dt, *_ in self.matmul)}
        copy = min(self.h2d_Bps, self.d2h_Bps)
        host_pass, host_row = self.host_work()
        base = DeviceProfile(tuple(curves.items()), 1.0, 1.0, self.launch_s, copy, self.source,
                             copy_latency_s=self.copy_latency_s, copy_Bps=self.copy_Bps, host_pass_s=host_pass,
                             host_row_s=host_row, allreduce_s=self.collectives,
                             chained_copy_s=self.chained_copy())
        base = dataclasses.replace(base, chunk_key_s=self.chunk_keys())
        return dataclasses.replace(base, stage_overhead_s=self.stage_overheads(base))

    def chained_copy(self) -> float:
        """Fixed time of a copy issued behind the sending stage's program: per chain, its time less its
        programs run alone, per copy; the mean over the chains (0 without them). The bytes moved are a few
        rows' activations, so the copy rate's share is left in."""
        if not self.chains:
            return 0.0
        return _us(max(sum((c - a) / k for _, c, a, k in self.chains) / len(self.chains), 0.0))

    def chunk_keys(self) -> tuple[tuple[int, float], ...]:
        """Per mesh size, the time one more block-table key adds to a prefill chunk, per layer, chunk token
        and attention head of a device: the difference of the extend runs over the largest and smallest
        tables, over the difference of their keys. At least 0."""
        if not self.stages:
            return ()
        heads = (self.config or ModelConfig.load(self.model)).num_heads
        out = []
        for n in sorted({r.devices for r in self.stages if r.phase == "extend"}):
            runs = sorted((r for r in self.stages if r.phase == "extend" and r.devices == n),
                          key=lambda r: r.table_tokens)
            a, b = runs[0], runs[-1]
            if b.table_tokens > a.table_tokens:
                per = a.layers * a.rows * a.context * (b.table_tokens - a.table_tokens) * heads / n
                out.append((n, round(max((b.seconds - a.seconds) / per, 0.0) * 1e9, 3) / 1e9))
        return tuple(out)

    def stage_overheads(self, base: DeviceProfile) -> tuple[tuple[int, float], ...]:
        """Per mesh size, the mean over the stage runs of their measured time less the serving cost model's
        time of that stage step without any fixed overhead (layers' compute, collectives at the measured
        all-reduce times): what a stage step costs beyond its work. At least 0."""
        if not self.stages:
            return ()
        from hexjax.search import cost
        cfg = self.config or ModelConfig.load(self.model)
        bw, lat = self.link()
        spec = dataclasses.replace(self._spec(base), profile=dataclasses.replace(base, stage_overhead_s=((1, 0.0),)))
        out: dict[int, list[float]] = {}
        for run in (r for r in self.stages if r.phase == "decode"):
            c = cost.stage_cost(cfg, spec, bw, lat, run.layers, 1, run.devices, False, False, 1, run.rows,
                                Workload(run.context - 1, 2, run.rows), DTYPES["float32"], serving=True)
            out.setdefault(run.devices, []).append(run.seconds - c.decode_s)
        return tuple((n, _us(max(sum(v) / len(v), 0.0))) for n, v in sorted(out.items()))

    def device_spec(self) -> DeviceSpec:
        """The measured device, profile included."""
        return self._spec(self.profile())

    def _spec(self, profile: DeviceProfile) -> DeviceSpec:
        return DeviceSpec(self.name, self.memory_bytes, self.peak_flops, self.stream_Bps(), self.link()[0],
                          self.price_per_hour, self.platform if self.platform in ("gpu", "tpu") else "cpu", profile)

    def best_of(self, other: "Calibration") -> "Calibration":
        """Each figure at its best over two runs of the same benchmarks (fastest times, highest rates): on a
        shared machine the least disturbed run of each benchmark is the closest to the device alone."""
        def best(mine, theirs, key, pick):
            merged = {key(x): x for x in mine}
            for x in theirs:
                merged[key(x)] = pick(merged[key(x)], x) if key(x) in merged else x
            return tuple(merged.values())
        return dataclasses.replace(
            self,
            matmul=best(self.matmul, other.matmul, lambda m: m[:3], lambda a, b: max(a, b, key=lambda m: m[3])),
            read_Bps=max(self.read_Bps, other.read_Bps),
            layers=best(self.layers, other.layers, lambda r: (r.phase, r.batch, r.context, r.dtype),
                        lambda a, b: min(a, b, key=lambda r: r.seconds)),
            allreduce=best(self.allreduce, other.allreduce, lambda a: a[0], lambda a, b: min(a, b, key=lambda x: x[1])),
            launch_s=min(self.launch_s, other.launch_s), h2d_Bps=max(self.h2d_Bps, other.h2d_Bps),
            d2h_Bps=max(self.d2h_Bps, other.d2h_Bps),
            copy_latency_s=min((x for x in (self.copy_latency_s, other.copy_latency_s) if x > 0), default=0.0),
            copy_Bps=max(self.copy_Bps, other.copy_Bps),
            # the engine runs of one calibration together (the quieter): the per-row fit takes differences
            serving=min((x for x in (self.serving, other.serving) if x), key=lambda runs: sum(r[1] for r in runs),
                        default=()),
            chains=best(self.chains, other.chains, lambda c: c[0], lambda a, b: (a[0], min(a[1], b[1]),
                                                                                 min(a[2], b[2]), a[3])),
            collectives=best(self.collectives, other.collectives, lambda c: c[0],
                             lambda a, b: min(a, b, key=lambda x: x[1])),
            # the stage runs of one calibration together (the quicker), as they were timed in turns: the
            # overheads are differences between them, and each run at its own best would mix moments
            stages=min((x for x in (self.stages, other.stages) if x), key=lambda runs: sum(r.seconds for r in runs),
                       default=()))

    def predicted_layer_s(self, run: LayerRun, spec: DeviceSpec | None = None) -> float:
        """The cost model's time of one measured layer run on the calibrated device."""
        from hexjax.search import cost
        spec = spec or self.device_spec()
        rate, bw, _, _ = cost.rates(spec, DTYPES[run.dtype], run.rows)
        return max(run.flops / rate, run.bytes / bw)

    def to_toml(self) -> str:
        """A cluster file with one host of the measured devices, whose ``[device]`` table other cluster
        files can include (``profiles = [...]``)."""
        spec = self.device_spec()
        bw, lat = self.link()
        fields: dict[str, Any] = {
            "memory_GiB": spec.memory_bytes / GiB, "tflops": spec.peak_flops / 1e12,
            "memory_bandwidth_GBps": _export_GBps(spec.memory_bandwidth_Bps),
            "intra_bandwidth_GBps": _export_GBps(spec.intra_bandwidth_Bps),
            "price_per_hour": spec.price_per_hour, "kind": spec.kind, "profile": profile_to_dict(spec.profile)}
        lines = [f"# Device profile written by `hexjax calibrate` ({self.source})",
                 f"# {self.device_kind} x {self.num_devices}; decoder layer of {self.model}",
                 "# matmul rates (dtype, rows x k @ k x k): " + "; ".join(
                     f"{d} {r}x{k}: {f / 1e9:.3g} GFLOP/s" for d, r, k, f in self.matmul),
                 f"# memory read {self.read_Bps / GB:.3g} GB/s; host->device {self.h2d_Bps / GB:.3g} GB/s, "
                 f"device->host {self.d2h_Bps / GB:.3g} GB/s",
                 f"# stage-to-stage copies: {self.copy_latency_s * 1e6:.3g} us + bytes at {self.copy_Bps / GB:.3g} "
                 "GB/s; serving engine decode steps (rows: step vs program alone, ms): " + "; ".join(
                     f"{r}: {st * 1e3:.3g} vs {pr * 1e3:.3g}" for r, st, pr in self.serving),
                 "# stage chains (meshes: chained vs programs alone, ms): " + "; ".join(
                     f"{m}: {c * 1e3:.3g} vs {a * 1e3:.3g}" for m, c, a, _ in self.chains),
                 "# all-reduce inside a program (devices: us): " + "; ".join(
                     f"{n}: {t * 1e6:.3g}" for n, t in self.collectives),
                 "# stage programs (phase, devices, layers, rows, tokens, table: ms): " + "; ".join(
                     f"{r.phase} {r.devices}, {r.layers}, {r.rows}, {r.context}, {r.table_tokens}: "
                     f"{r.seconds * 1e3:.3g}" for r in self.stages),
                 "# layer runs (phase, batch, tokens/context, dtype): measured vs profile-predicted ms: " + "; ".join(
                     f"{r.phase} b{r.batch} {r.context} {r.dtype}: {r.seconds * 1e3:.3g} vs "
                     f"{self.predicted_layer_s(r, spec) * 1e3:.3g}" for r in self.layers),
                 f"name = {_toml_value('local-' + self.platform)}", "",
                 "[[host]]", f"name = {_toml_value('local')}", f"device = {_toml_value(self.name)}",
                 f"count = {self.num_devices}", f"intra_latency_us = {_toml_value(_export_us(lat))}"]
        lines += devices_toml(self.name, fields)
        return "\n".join(lines) + "\n"


def _us(seconds: float) -> float:
    """``seconds`` at whole nanoseconds: a figure the profile file's microseconds carry exactly."""
    return round(seconds * 1e6, 3) / 1e6


# ---- timing ----

def best_time_s(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of ``repeats`` runs of ``fn`` (after one warm-up run); ``fn`` must block until done."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


MESH_ROUNDS, MESH_RUNS = 10, 6
"""Rounds and runs per round of the programs behind the serving terms by mesh size (:func:`interleaved_time_s`)."""


def interleaved_time_s(fns: list[Callable[[], Any]], rounds: int = MESH_ROUNDS,
                       runs: int = MESH_RUNS) -> list[float]:
    """Per function of ``fns`` (each run once to warm up, each blocking until done), the median over
    ``rounds`` rounds of the median of its ``runs`` consecutive runs in the round; every round runs all of
    ``fns`` in turn (reversed every other round). On a shared machine a slow stretch then hits every
    function alike instead of the ones timed during it, and the median over rounds drops a disturbed
    round: figures whose differences (one program against another, one mesh size against another) hold
    from one calibration to the next. Medians, not the fastest runs: like the host work, these figures
    stand for the serving engine's steps, one after another, which see the machine as it is."""
    import statistics
    for fn in fns:
        fn()
    per_round: list[list[float]] = [[] for _ in fns]
    for k in range(rounds):
        order = range(len(fns)) if k % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                fns[i]()
                times.append(time.perf_counter() - t0)
            per_round[i].append(statistics.median(times))
    return [statistics.median(t) for t in per_round]


def _block(x):
    import jax
    return jax.block_until_ready(x)


# ---- the benchmarks ----

def measure_matmul(device, dtype: str, rows: int, k: int, repeats: int) -> float:
    """FLOP/s of ``[rows, k] @ [k, k]`` in ``dtype`` on ``device``."""
    import jax
    import jax.numpy as jnp
    dt = jnp.dtype(dtype)
    a = jax.device_put(jnp.ones((rows, k), dt), device)
    b = jax.device_put(jnp.full((k, k), 0.5, dt), device)
    f = jax.jit(lambda a, b: a @ b)
    return 2.0 * rows * k * k / best_time_s(lambda: _block(f(a, b)), repeats)


def measure_read(device, nbytes: int, repeats: int) -> float:
    """Bytes/s of streaming ``nbytes`` of float32: the faster of an XLA reduction and a matrix-vector
    product (how a decode step reads its weights; a backend may run only the latter on every core)."""
    import jax
    import jax.numpy as jnp
    x = jax.device_put(jnp.ones((nbytes // 4,), jnp.float32), device)
    total = jax.jit(jnp.sum)
    k = 1024
    w = x.reshape(k, -1)
    v = jax.device_put(jnp.ones((1, k), jnp.float32), device)
    gemv = jax.jit(lambda v, w: v @ w)
    _block((total(x), gemv(v, w)))
    best = math.inf
    for _ in range(max(repeats, READ_REPEATS)):   # cheap, and the fastest of many is the least disturbed
        for f in (lambda: total(x), lambda: gemv(v, w)):
            t0 = time.perf_counter()
            _block(f())
            best = min(best, time.perf_counter() - t0)
    return nbytes / best


def measure_copies(device, nbytes: int, repeats: int) -> tuple[float, float]:
    """``(host->device, device->host)`` bytes/s of copying ``nbytes``."""
    import jax
    host = np.ones(nbytes // 4, np.float32)
    on = jax.device_put(host, device)
    _block(on)
    h2d = nbytes / best_time_s(lambda: _block(jax.device_put(host, device)), repeats)
    # np.array copies: a CPU device may otherwise hand back its own buffer without moving anything
    d2h = nbytes / best_time_s(lambda: np.array(on, copy=True), repeats)
    return h2d, d2h


def measure_allreduce(devices, sizes: tuple[int, ...], repeats: int) -> list[tuple[int, float]]:
    """``[(bytes, seconds)]`` of a float32 ``psum`` over ``devices`` (each holding ``bytes``)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    n = len(devices)
    mesh = Mesh(np.array(devices), ("x",))
    f = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "x"), mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    out = []
    for nbytes in sizes:
        x = jax.device_put(jnp.ones((n * (nbytes // 4),), jnp.float32), NamedSharding(mesh, P("x")))
        out.append((nbytes, best_time_s(lambda: _block(f(x)), repeats)))
    return out


def measure_launch(device, repeats: int) -> float:
    """Seconds of launching a trivial jitted program and waiting for it."""
    import jax
    import jax.numpy as jnp
    x = jax.device_put(jnp.ones((8,), jnp.float32), device)
    f = jax.jit(lambda v: v + 1)
    return best_time_s(lambda: _block(f(x)), max(repeats, 20))


def measure_stage_copies(devices, sizes: tuple[int, int], repeats: int) -> tuple[float, float]:
    """``(fixed s, bytes/s)`` of copying a stage's activations (float32 ``[1, tokens, 64]``, replicated over
    a mesh's devices, as a stage hands them on) to another stage's devices: the fixed time is the mean over
    one device to one, two to one and one to two (as many as the devices allow) at ``sizes[0]`` bytes;
    the rate is one device to one between ``sizes[0]`` and ``sizes[1]``. ``(0, 0)`` with one device."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    if len(devices) < 2:
        return 0.0, 0.0

    def on(devs):
        return NamedSharding(Mesh(np.array(devs).reshape(1, len(devs)), ("dp", "tp")), P("dp", None, None))

    def copy_s(src, dst, nbytes):
        x = jax.device_put(jnp.ones((1, max(nbytes // 256, 1), 64), jnp.float32), on(src))
        return best_time_s(lambda: _block(jax.device_put(x, on(dst))), max(repeats, 10))

    d = devices
    pairs = [((d[0],), (d[1],))] + ([((d[0], d[1]), (d[2],)), ((d[0],), (d[1], d[2]))] if len(d) >= 3 else [])
    small, large = sizes
    fixed = [copy_s(a, b, small) for a, b in pairs]
    big = copy_s(*pairs[0], large)
    rate = (large - small) / max(big - fixed[0], 1e-9)
    return sum(fixed) / len(fixed), rate


def measure_collectives(devices, degrees: tuple[int, ...], repeats: int,
                        chain: int = 8) -> tuple[tuple[int, float], ...]:
    """``(devices, seconds)`` per degree: what one more all-reduce of a small float32 block ([4, 64] per device,
    a few decode rows' activations) adds inside a program on the first ``devices`` local devices: the
    difference of programs of 1 and ``chain + 1`` dependent ``psum``s (so the launch cancels out), all
    timed in turns (:func:`interleaved_time_s`, at least ``repeats`` rounds), over ``chain``."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    degrees = [n for n in degrees if 2 <= n <= len(devices)]
    fns = []
    for n in degrees:
        mesh = Mesh(np.array(devices[:n]), ("tp",))
        x = jax.device_put(jnp.ones((4, 64 * n), jnp.float32), NamedSharding(mesh, P(None, "tp")))
        for k in (1, chain + 1):
            def body(v, k=k):
                for _ in range(k):
                    v = jax.lax.psum(v, "tp") * 0.5     # each waits for the one before
                return v
            f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(None, "tp"), out_specs=P(None, "tp")))
            fns.append(lambda f=f, x=x: _block(f(x)))
    times = interleaved_time_s(fns, max(repeats, MESH_ROUNDS))
    return tuple((n, _us(max((times[2 * i + 1] - times[2 * i]) / chain, 0.0))) for i, n in enumerate(degrees))


def measure_stage_programs(cfg: ModelConfig, devices, degrees: tuple[int, ...], rows: tuple[int, ...],
                           repeats: int) -> tuple[StageRun, ...]:
    """Decode steps of the runtime's stage program (:mod:`hexjax.runtime.stage`, paged KV cache, float32) of
    one and two middle layers of ``cfg`` on a ``tp = n`` mesh of the first ``n`` local devices, for each
    ``n`` of ``degrees`` and each row count, and a prefill chunk over block tables of two sizes: the hidden
    states already on the mesh and the positions and block tables passed as host arrays, as the serving
    engine passes them. Every program of every mesh size is timed in turns (:func:`interleaved_time_s`, at
    least ``repeats`` rounds), so that the differences the profile takes (between mesh sizes, layer counts
    and tables) do not carry a load that came and went between them."""
    import jax
    import jax.numpy as jnp
    from hexjax.models.llama import init_params
    from hexjax.runtime.pages import pages_for
    from hexjax.runtime.stage import StageKind, StageShape, stage_module, stage_programs
    width = pages_for(STAGE_TABLE_TOKENS, STAGE_PAGE)
    context = STAGE_TABLE_TOKENS // 2
    runs, fns, weights = [], [], {}

    def placed_for(kind, prog):
        # one copy of a stage's weights for all its programs (their placement depends on the kind and the
        # mesh only): every program stays alive until the timing in turns is done
        if kind not in weights:
            weights[kind] = prog.place_params(init_params(stage_module(kind), 0))
        return weights[kind]
    for n in degrees:
        if n > len(devices):
            continue
        for layers in sorted({1, min(2, cfg.num_layers)}):
            kind = StageKind(cfg, 0, layers, False, False, 1, n, "float32")
            for r in rows:
                prog = stage_programs(kind, StageShape(r, STAGE_PAGE, r * width + 1, STAGE_PAGE, width),
                                      tuple(devices[:n]))
                placed = placed_for(kind, prog)
                cache = [prog.empty_cache()]
                run = prog.compiled("decode")
                x = jax.device_put(jnp.full((r, 1, cfg.hidden_size), 0.01, jnp.float32), prog.input_sharding)
                pos = np.full((r,), context - 1, np.int32)
                table = (1 + np.arange(r * width, dtype=np.int32)).reshape(r, width)

                def step(run=run, placed=placed, cache=cache, x=x, pos=pos, table=table):
                    y, cache[0] = run(placed, cache[0], x, pos, table)
                    _block(y)
                runs.append(StageRun(n, layers, r, context, 0.0))
                fns.append(step)
        # a prefill chunk over block tables of two sizes: what more keys in the table cost
        kind = StageKind(cfg, 0, 1, False, False, 1, n, "float32")
        for tokens in STAGE_EXTEND_TABLES:
            w = pages_for(tokens, STAGE_PAGE)
            prog = stage_programs(kind, StageShape(1, STAGE_EXTEND_WIDTH, w + 1, STAGE_PAGE, w), tuple(devices[:n]))
            placed = placed_for(kind, prog)
            cache = [prog.empty_cache()]
            run = prog.compiled("extend")
            x = jax.device_put(jnp.full((1, STAGE_EXTEND_WIDTH, cfg.hidden_size), 0.01, jnp.float32),
                               prog.input_sharding)
            pos = np.arange(STAGE_EXTEND_WIDTH, dtype=np.int32)[None, :]
            last = np.full((1,), STAGE_EXTEND_WIDTH - 1, np.int32)
            table = (1 + np.arange(w, dtype=np.int32))[None, :]

            def chunk(run=run, placed=placed, cache=cache, x=x, pos=pos, last=last, table=table):
                y, cache[0] = run(placed, cache[0], x, pos, last, table)
                _block(y)
            runs.append(StageRun(n, 1, 1, STAGE_EXTEND_WIDTH, 0.0, "extend", w * STAGE_PAGE))
            fns.append(chunk)
    times = interleaved_time_s(fns, max(repeats, MESH_ROUNDS))
    return tuple(dataclasses.replace(r, seconds=t) for r, t in zip(runs, times))


def measure_chained_copies(cfg: ModelConfig, devices, rows: int,
                           repeats: int) -> tuple[tuple[str, float, float, int], ...]:
    """``(meshes, chain s, programs alone s, copies)`` of chains of the runtime's one-layer decode stage
    programs on meshes of the local devices (sizes 1 -> 1, 2 -> 1 and 1 -> 2 -> 1, as many as the devices
    allow): each program's input copied from the one before with ``jax.device_put`` and issued without
    waiting, as the serving engine issues a step, then waited for at the end; against the same programs
    each run alone on an input already on its mesh. All timed in turns (:func:`interleaved_time_s`, at
    least ``repeats`` rounds)."""
    import jax
    import jax.numpy as jnp
    from hexjax.models.llama import init_params
    from hexjax.runtime.pages import pages_for
    from hexjax.runtime.stage import StageKind, StageShape, stage_module, stage_programs
    width = pages_for(STAGE_TABLE_TOKENS, STAGE_PAGE)
    pos = np.full((rows,), STAGE_TABLE_TOKENS // 2 - 1, np.int32)
    table = (1 + np.arange(rows * width, dtype=np.int32)).reshape(rows, width)

    def stage(devs):
        kind = StageKind(cfg, 0, 1, False, False, 1, len(devs), "float32")
        prog = stage_programs(kind, StageShape(rows, STAGE_PAGE, rows * width + 1, STAGE_PAGE, width), tuple(devs))
        placed, cache, run = prog.place_params(init_params(stage_module(kind), 0)), [prog.empty_cache()], \
            prog.compiled("decode")

        def call(x):
            y, cache[0] = run(placed, cache[0], x, pos, table)
            return y
        return prog.input_sharding, call

    d = list(devices)
    layouts = [[d[0:1], d[1:2]]] + ([[d[0:2], d[2:3]]] if len(d) >= 3 else []) + \
        ([[d[0:1], d[1:3], d[3:4]]] if len(d) >= 4 else [])
    x = jnp.full((rows, 1, cfg.hidden_size), 0.01, jnp.float32)
    fns, spans = [], []
    for meshes in layouts if len(d) >= 2 else []:
        stages = [stage(m) for m in meshes]
        first = len(fns)
        for sharding, call in stages:
            xs = jax.device_put(x, sharding)
            fns.append(lambda call=call, xs=xs: _block(call(xs)))
        start = _block(jax.device_put(x, stages[0][0]))

        def chain(stages=stages, start=start):
            y = start
            for sharding, call in stages:
                y = call(jax.device_put(y, sharding))
            _block(y)
        fns.append(chain)
        spans.append(("->".join(str(len(m)) for m in meshes), first, len(meshes) - 1))
    times = interleaved_time_s(fns, max(repeats, MESH_ROUNDS)) if fns else []
    # each chain's entry follows its programs alone
    return tuple((name, times[first + k + 1], sum(times[first:first + k + 1]), k) for name, first, k in spans)


def measure_serving_host(device_index: int = 0, rows: tuple[int, ...] = (1, 4),
                         steps: int = 40) -> tuple[tuple[int, float, float], ...]:
    """``(rows, step s, program s)`` per row count: the median of ``steps`` decode-only steps of the serving
    engine (one stage of the ``tiny`` model on local device ``device_index``, ``rows`` requests decoding),
    and the median of the same stage's decode program for that many rows run alone between those steps (its
    compiled program, called as the engine calls it; the input already on the device)."""
    import statistics

    import jax
    from hexjax.models.llama import stage_params
    from hexjax.plan import Plan
    from hexjax.runtime.build import stage_kinds
    from hexjax.runtime.generation import model_params
    from hexjax.runtime.pages import pages_for
    from hexjax.runtime.stage import StageShape, stage_programs
    from hexjax.serve import Engine, SamplingParams
    cfg = ModelConfig.preset("tiny")
    plan = Plan.from_dict({"version": 1, "model": cfg.name, "dtype_bytes": 4, "replicas": [
        {"stages": [{"layers": [0, cfg.num_layers], "devices": [device_index], "dp": 1, "tp": 1}]}]})
    top, page, max_len, prompt = max(rows), 16, 128, 8
    width = pages_for(max_len, page)
    num_pages = top * width + 1
    engine = Engine(cfg, plan, max_batch=top, max_model_len=max_len, page_size=page, num_pages=num_pages,
                    dtype="float32")
    kind = stage_kinds(cfg, plan.replicas[0], "float32")[0]
    device = jax.local_devices()[device_index] if device_index < len(jax.local_devices()) else jax.devices()[0]
    _, full = model_params(cfg, 0)
    out = []
    for r in rows:
        for _ in range(r):
            engine.add_request([7] * prompt, SamplingParams(max_tokens=steps + 8, ignore_eos=True))
        prog = stage_programs(kind, StageShape(r, page, num_pages, page, width), (device,))
        params = prog.place_params(stage_params(full, cfg, 0, cfg.num_layers, embed=True, head=True))
        cache = [prog.empty_cache()]
        run = prog.compiled("decode")
        x = jax.device_put(np.full((r, 1), 7, np.int32), prog.input_sharding)
        pos = np.full((r,), prompt, np.int32)
        table = np.zeros((r, width), np.int32)

        def alone():
            y, cache[0] = run(params, cache[0], x, pos, table)
            _block(y)
        for _ in range(r):
            engine.add_request([7] * prompt, SamplingParams(max_tokens=steps + 8, ignore_eos=True))
        for _ in range(4):          # prefill, then decode steps (compiles, warms the caches)
            engine.step()
        alone()
        # engine steps and the program alone, interleaved: both see the same moments of a shared machine
        step_s, alone_s = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            t1 = time.perf_counter()
            alone()
            step_s.append(t1 - t0)
            alone_s.append(time.perf_counter() - t1)
        while engine.has_work():
            engine.step()
        out.append((r, statistics.median(step_s), statistics.median(alone_s)))
    return tuple(out)


DECODE_LOOP_S = 0.02
"""Rough length of one timed decode loop (at least two steps): short enough that the fastest of many runs
finds a shared machine's cores free for all of it."""

DECODE_REPEATS, PREFILL_REPEATS, READ_REPEATS = 24, 6, 12
"""Least timed runs of a decode loop, a prefill program and a streaming read: each is short, and the more
runs, the likelier the fastest one ran undisturbed on a shared machine."""


def decode_layer_s(cfg: ModelConfig, device, dt, batch: int, length: int, repeats: int, stack: int,
                   loop_s: float = DECODE_LOOP_S) -> float:
    """Seconds of one decoder layer's decode step inside a decode loop: the model's stage code of
    ``2 stack`` layers (as many as the model has) run as one program of decode steps (a ``lax.fori_loop``,
    the cache updated in place, each step's output the next one's input), as the generation loop runs
    them; the fastest of ``repeats`` (at least ``DECODE_REPEATS``) runs, per step and layer.

    Inside a loop a program's launch is spread over its steps and a step has no fixed cost to speak of:
    on a 2-core CPU (llama-125m, 1 and 4 rows, fastest of 24 runs) two- and four-layer loops gave the same
    time per layer within 6%, so their difference (what the layers alone cost) equals either; on a loaded
    machine a difference doubles the noise of two runs, so the larger loop alone counts. Each step re-reads
    its layers' weights: ``2 stack`` layers should outgrow the CPU's caches as the whole model does (four
    layers of llama-125m do)."""
    import jax
    import jax.numpy as jnp
    from hexjax.models.llama import LlamaStage, init_cache, init_params
    k = min(2 * stack, cfg.num_layers)
    pos = jax.device_put(jnp.full((batch, 1), length - 1, jnp.int32), device)
    x = jax.device_put(jnp.ones((batch, 1, cfg.hidden_size), dt) * 0.01, device)
    stage = LlamaStage(cfg, 0, k, embed=False, head=False, dtype=dt, param_dtype=dt)
    params = jax.device_put(init_params(stage, 0), device)

    def loop(p, x, c, steps):
        def body(_, carry):
            y, c = stage.apply({"params": p}, carry[0], pos, carry[1])
            return y * 0.5, c               # keeps the residual stream bounded over many steps
        return jax.lax.fori_loop(0, steps, body, (x, c))
    f = jax.jit(loop, donate_argnums=2)
    cache = [jax.device_put(init_cache(cfg, batch, length, k, dtype=dt), device)]

    def run(steps: int) -> None:
        y, cache[0] = f(params, x, cache[0], steps)
        _block(y)
    run(2)                                  # compiles
    t0 = time.perf_counter()
    run(4)
    steps = max(2, min(64, round(loop_s * 4 / max(time.perf_counter() - t0, 1e-6))))
    return best_time_s(lambda: run(steps), max(repeats, DECODE_REPEATS)) / (steps * k)


def measure_layer(cfg: ModelConfig, device, dtype: str, phase: str, batch: int, length: int,
                  repeats: int, stack: int = 1, launch_s: float = 0.0) -> LayerRun:
    """A decoder layer of ``cfg`` with the cost model's FLOPs and bytes of one layer: a prefill of
    ``length`` tokens (the model's own stage code, ``stack`` layers in one program, the launch time
    ``launch_s`` taken off) or a decode step over a cache of ``length`` positions (:func:`decode_layer_s`:
    inside a loop of steps over ``2 stack`` layers)."""
    import jax
    import jax.numpy as jnp
    from hexjax.models.llama import LlamaStage, init_cache, init_params
    from hexjax.search import cost
    dt = jnp.dtype(dtype)
    stack = min(stack, cfg.num_layers)
    tokens = length if phase == "prefill" else 1
    if phase == "prefill":
        stage = LlamaStage(cfg, 0, stack, embed=False, head=False, dtype=dt, param_dtype=dt)
        x = jnp.ones((batch, tokens, cfg.hidden_size), dt) * 0.01
        pos = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32), (batch, tokens))
        cache = init_cache(cfg, batch, length, stack, dtype=dt)
        params = init_params(stage, 0)
        x, pos, cache, params = jax.device_put((x, pos, cache, params), device)
        f = jax.jit(lambda p, x, pos, c: stage.apply({"params": p}, x, pos, c))
        seconds = max(best_time_s(lambda: _block(f(params, x, pos, cache)), max(repeats, PREFILL_REPEATS))
                      - launch_s, 0.0) / stack
    else:
        seconds = decode_layer_s(cfg, device, dt, batch, length, repeats, stack)
    e = DTYPES[dtype]
    wl = Workload(prompt_len=tokens if phase == "prefill" else max(length - 1, 1), output_len=2, batch=batch)
    fig = cost.stage_figures(cfg, 1, 1, 1, False, False, 1, batch, wl, e,
                             prefill_tokens=tokens, decode_context=length)
    flops, nbytes = (fig.prefill_flops, fig.prefill_bytes) if phase == "prefill" else \
        (fig.decode_flops, fig.decode_bytes)
    return LayerRun(phase, batch, tokens, length, dtype, seconds, float(flops), float(nbytes))


def _memory_bytes(device, num_devices: int) -> int:
    stats = getattr(device, "memory_stats", lambda: None)()
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")   # a CPU: host memory shared by its devices
    return int(total // max(num_devices, 1))


Progress = Callable[[str], None]


def calibrate(quick: bool = False, *, model: str | ModelConfig = "llama-125m", dtypes: tuple[str, ...] | None = None,
              name: str | None = None, price_per_hour: float = 0.0, shapes: Shapes | None = None,
              progress: Progress | None = None, serving: bool = True) -> Calibration:
    """Measure the local devices (see the module docstring). ``quick`` runs fewer, smaller benchmarks
    (float32 only, unless ``dtypes`` says otherwise); ``serving=False`` skips the serving engine's host work
    and the copies between stages (their profile fields stay unmeasured)."""
    import jax
    cfg = model if isinstance(model, ModelConfig) else ModelConfig.load(model)
    shapes = shapes or (QUICK if quick else FULL)
    dtypes = dtypes or (("float32",) if quick else ("float32", "bfloat16"))
    for d in dtypes:
        if d not in DTYPES:
            raise ConfigError(f"calibrate: unknown dtype {d!r}; use {' or '.join(DTYPES)}")
    if not (isinstance(price_per_hour, (int, float)) and math.isfinite(price_per_hour) and price_per_hour >= 0):
        raise ConfigError(f"calibrate: price_per_hour must be >= 0, got {price_per_hour!r}")
    say = progress or (lambda _: None)
    devices = jax.local_devices()
    dev = devices[0]
    platform = dev.platform
    matmul = []
    for d in dtypes:
        for rows in shapes.matmul_rows:
            say(f"matmul {d} {rows}x{shapes.matmul_k}")
            matmul.append((d, rows, shapes.matmul_k, measure_matmul(dev, d, rows, shapes.matmul_k, shapes.repeats)))
    say("memory read")
    read = measure_read(dev, shapes.read_bytes, shapes.repeats)
    say("program launch")
    launch = measure_launch(dev, shapes.repeats)
    layers = []
    for d in dtypes:
        for b, s in shapes.prefill:
            say(f"layer prefill {d} batch {b} x {s}")
            layers.append(measure_layer(cfg, dev, d, "prefill", b, s, shapes.repeats, shapes.stack, launch))
        for b, ctx in shapes.decode:
            say(f"layer decode {d} batch {b} context {ctx}")
            layers.append(measure_layer(cfg, dev, d, "decode", b, ctx, shapes.repeats, shapes.stack, launch))
    allreduce = []
    if len(devices) > 1:
        say(f"all-reduce over {len(devices)} devices")
        allreduce = measure_allreduce(devices, shapes.allreduce_bytes, shapes.repeats)
    say("host<->device copies")
    h2d, d2h = measure_copies(dev, shapes.copy_bytes, shapes.repeats)
    copy_fixed, copy_rate, runs, collectives, stages, chains = 0.0, 0.0, (), (), (), ()
    if serving:
        say("copies between stages")
        copy_fixed, copy_rate = measure_stage_copies(devices, (1 << 10, shapes.copy_bytes // 8), shapes.repeats)
        say("serving engine host work")
        runs = measure_serving_host(0, shapes.serving_rows, shapes.serving_steps)
        degrees = tuple(n for n in shapes.mesh_sizes if n <= len(devices))
        say(f"all-reduce inside programs on {', '.join(map(str, degrees[1:])) or 'no'} devices")
        collectives = measure_collectives(devices, degrees, shapes.repeats)
        say(f"stage programs on {', '.join(map(str, degrees))} devices")
        stages = measure_stage_programs(cfg, devices, degrees, shapes.serving_rows, shapes.repeats)
        say("copies issued behind a stage program")
        chains = measure_chained_copies(cfg, devices, max(shapes.serving_rows), shapes.repeats)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    source = f"hexjax calibrate{' --quick' if quick else ''}, {stamp}, jax {jax.__version__}, {dev.device_kind}"
    default_name = "local-" + "".join(c if c.isalnum() else "-" for c in dev.device_kind).strip("-").lower()
    return Calibration(name or default_name, platform, dev.device_kind, len(devices),
                       _memory_bytes(dev, len(devices)), tuple(matmul), read, tuple(layers), tuple(allreduce),
                       launch, h2d, d2h, cfg.name, float(price_per_hour), source, copy_fixed, copy_rate, runs,
                       collectives, stages, chains, cfg)


def generation_timer(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, dtype: str = "float32",
                     device=None) -> Callable[[], tuple[float, float]]:
    """A function that runs single-device generation once (:mod:`hexjax.models.generate`'s jitted programs,
    random weights, compiled here) and returns ``(prefill s, decode step s)``: the prefill of ``batch``
    prompts of ``prompt_len`` tokens, and the decode loop of ``new_tokens`` tokens divided by its
    ``new_tokens - 1`` steps."""
    import jax
    import jax.numpy as jnp
    from hexjax.models.generate import pad_prompts, programs
    from hexjax.models.llama import LlamaStage, init_cache, init_params
    from hexjax.models.sampling import Sampling
    if new_tokens < 2:
        raise ConfigError("measure_generation: new_tokens must be at least 2 (one decode step)")
    dt = jnp.dtype(dtype)
    device = device or jax.local_devices()[0]
    params = jax.device_put(init_params(LlamaStage(cfg, dtype=dt, param_dtype=dt), 0), device)
    prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, (batch, prompt_len)).tolist()
    toks, lengths = pad_prompts(prompts)
    toks, lengths = jax.device_put((jnp.asarray(toks), jnp.asarray(lengths)), device)
    prog = programs(cfg, Sampling(), dt, None)

    def run() -> tuple[float, float]:
        cache = jax.device_put(init_cache(cfg, batch, toks.shape[1] + new_tokens, dtype=dt), device)
        _block(cache)
        t0 = time.perf_counter()
        first, cache = prog.prefill(params, toks, lengths, cache)
        _block(first)
        t1 = time.perf_counter()
        out, _, cache = prog.decode(params, first, lengths, cache, new_tokens)
        _block(out)
        return t1 - t0, (time.perf_counter() - t1) / (new_tokens - 1)
    run()                                  # compiles
    return run


def measure_generation(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, dtype: str = "float32",
                       repeats: int = 3, device=None) -> tuple[float, float]:
    """``(prefill s, decode step s)`` of single-device generation (:func:`generation_timer`): the fastest
    prefill and the fastest decode loop's step of ``repeats`` runs."""
    run = generation_timer(cfg, batch, prompt_len, new_tokens, dtype, device)
    times = [run() for _ in range(repeats)]
    return min(p for p, _ in times), min(d for _, d in times)


def predict_generation(cfg: ModelConfig, device: DeviceSpec, batch: int, prompt_len: int, new_tokens: int,
                       dtype_bytes: int = 4) -> tuple[float, float]:
    """``(TTFT, TPOT)`` the cost model predicts for the same run on one ``device``."""
    from hexjax.cluster import Cluster, Host
    from hexjax.plan import Plan, Replica, Stage
    from hexjax.search import cost
    cluster = Cluster((Host("local", device, 1, "local", 0, device.intra_bandwidth_Bps, 0.0),))
    plan = Plan(cfg.name, cluster.fingerprint(), (Replica((Stage((0, cfg.num_layers), (0,)),)),),
                dtype_bytes=dtype_bytes)
    pred = cost.predict(plan, cfg, cluster, Workload(prompt_len, new_tokens, batch))
    return pred.ttft_s, pred.tpot_s


def load_profile(path) -> dict[str, DeviceSpec]:
    """The devices a profile (or cluster) file defines, by name, with clear errors for bad files."""
    from hexjax.cluster import _Reader, _included_devices, _parse_devices
    from pathlib import Path
    p = Path(path)
    r = _Reader(str(p))
    raw = _included_devices(r, [p.name], str(p))
    return _parse_devices(r, raw)


__all__ = ["calibrate", "Calibration", "LayerRun", "StageRun", "Shapes", "FULL", "QUICK", "load_profile",
           "generation_timer", "measure_generation", "predict_generation"]
