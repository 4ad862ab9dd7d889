"""Catalogue of accelerators: memory, peak dense FLOP/s, bandwidths and price.

Conventions for every entry:

- ``memory_bytes``: the nominal memory. NVIDIA's and Google's "80 GB", "48 GB",
  "16 GB" parts carry that many GiB (2**30 bytes), so the figure is
  ``N * GiB``; the cost model keeps its own reserve for what the driver takes.
- ``peak_flops``: dense (no 2:4 sparsity) 16-bit tensor-core FLOP/s, bf16
  where the part has it, else fp16 (T4, V100). Data-centre and workstation
  parts run fp32 accumulation at full rate; for GeForce cards it is the
  "FP16 Tensor with FP32 Accumulate" row of NVIDIA's whitepaper, the rate
  JAX's bf16/fp16 matmuls get there.
- ``memory_bandwidth_Bps``: vendor figure, 1 GB/s = 1e9 bytes/s.
- ``intra_bandwidth_Bps``: usable bandwidth per direction between two devices
  of one host: NVLink's per-direction figure where server boards have NVLink
  (half the bidirectional number NVIDIA quotes), else what a PCIe x16 slot
  realistically moves: ~12 GB/s (PCIe 3), ~25 GB/s (PCIe 4), ~50 GB/s (PCIe 5).
- ``price_per_hour``: a typical on-demand price of one device in late 2024
  (Lambda, RunPod, Google Cloud list prices); prices move, so override them in
  a cluster file when it matters.
"""

from __future__ import annotations

import dataclasses
import difflib
import math

from hexjax.errors import ConfigError

GiB = 2**30
GB = 1e9
TFLOPS = 1e12
KINDS = ("gpu", "tpu", "cpu")
"""Device kinds (``cpu``: a host measured by ``hexjax calibrate``)."""


DTYPE_NAMES = {4: "float32", 2: "bfloat16"}
"""The element widths the cost model meets, by the dtype name a profile keys its curves with."""


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """Measured efficiencies of a device (``hexjax calibrate``), used by the cost model instead of its
    datasheet constants. Efficiencies are fractions of the :class:`DeviceSpec`'s own peak figures."""

    flops_efficiency: tuple[tuple[str, tuple[tuple[float, float], ...]], ...]
    """Per dtype name, ``(rows, efficiency)`` points sorted by rows: the matmul rate reached with that many
    rows (tokens) against the weights, as a share of ``peak_flops``; log-linear between points, flat outside."""
    memory_efficiency: float = 1.0
    """Share of ``memory_bandwidth_Bps`` that streaming reads reach."""
    link_efficiency: float = 1.0
    """Share of ``intra_bandwidth_Bps`` that collectives reach."""
    step_overhead_s: float = 0.0
    """Fixed time of launching one stage's program for one step (dispatch), beyond its FLOP and byte bounds."""
    host_copy_Bps: float = 0.0
    """Host to device copy rate (0: not measured); reported, not yet used by the cost model."""
    source: str = ""
    """Where the figures come from (tool, date, software)."""
    copy_latency_s: float = 0.0
    """Fixed time of copying a stage's activations to the next stage's devices on the same host (0: not
    measured; the host's link figures then cost the hop)."""
    copy_Bps: float = 0.0
    """Rate of such a copy, bytes per second into each receiving device (0: not measured)."""
    host_pass_s: float = 0.0
    """Host time of one pass of a serving step (its prefill chunks or its decode rows) beyond the stage
    programs and the copies between stages: scheduling, building the inputs and block tables, sampling,
    reading the tokens back (0: not measured, no term)."""
    host_row_s: float = 0.0
    """Further host time per request row of such a pass (0: not measured)."""
    stage_overhead_s: tuple[tuple[int, float], ...] = ()
    """Per number of devices a stage's mesh spans, ``(devices, seconds)``: the fixed time of one step of the
    runtime's stage program on such a mesh beyond its layers' compute and collectives (launching on every
    device, its many parameter and cache buffers, the step's small inputs copied onto each device). Used
    for serving steps instead of ``step_overhead_s`` (empty: not measured)."""
    allreduce_s: tuple[tuple[int, float], ...] = ()
    """Per tensor-parallel degree, ``(devices, seconds)``: the time one small all-reduce adds inside a
    program on that many devices of this host. Used for serving steps instead of the ring model's latency
    (empty: not measured)."""

    chunk_key_s: tuple[tuple[int, float], ...] = ()
    """Per number of devices a stage's mesh spans, ``(devices, seconds)``: the time a prefill chunk's
    attention over the paged cache adds per layer, chunk token, attention head of a device and key of the
    block table beyond the chunk's own (the runtime's chunk attention reads the whole table). Used for
    serving steps whose block-table size is known (empty: not measured)."""

    chained_copy_s: float = 0.0
    """Fixed time of a copy between two stages' meshes of this host when it is issued, as the serving engine
    issues it, right behind the sending stage's program without waiting for it (0: not measured; then
    ``copy_latency_s``, measured on a ready array)."""

    @staticmethod
    def by_devices(table: tuple[tuple[int, float], ...], n: int) -> float | None:
        """A ``(devices, seconds)`` table at ``n`` devices: linear between measured counts, the nearest end's
        value outside them (None: empty table)."""
        if not table:
            return None
        if n <= table[0][0]:
            return table[0][1]
        for (n0, v0), (n1, v1) in zip(table, table[1:]):
            if n <= n1:
                return v0 + (v1 - v0) * (n - n0) / (n1 - n0)
        return table[-1][1]

    def __post_init__(self):
        curves = tuple((str(k), tuple((float(r), float(e)) for r, e in sorted(pts)))
                       for k, pts in (self.flops_efficiency.items() if isinstance(self.flops_efficiency, dict)
                                      else self.flops_efficiency))
        object.__setattr__(self, "flops_efficiency", curves)
        if not curves:
            raise ConfigError("device profile: flops_efficiency needs a curve for at least one dtype")
        for dtype, pts in curves:
            if not pts or any(not (r >= 1 and 0 < e <= 4) for r, e in pts):
                raise ConfigError(f"device profile: flops_efficiency.{dtype} must be [rows >= 1, efficiency in "
                                  f"(0, 4]] pairs, got {list(pts)!r}")
        for field in ("memory_efficiency", "link_efficiency"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 4:
                raise ConfigError(f"device profile: {field} must be in (0, 4], got {v!r}")
        for field in ("step_overhead_s", "host_copy_Bps", "copy_latency_s", "copy_Bps", "host_pass_s", "host_row_s",
                      "chained_copy_s"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ConfigError(f"device profile: {field} must be >= 0, got {v!r}")
        for field in ("stage_overhead_s", "allreduce_s", "chunk_key_s"):
            raw = getattr(self, field)
            table = tuple(sorted((n, float(v)) for n, v in (raw.items() if isinstance(raw, dict) else raw)))
            if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 or not v >= 0 or not math.isfinite(v)
                   for n, v in table) or len({n for n, _ in table}) != len(table):
                raise ConfigError(f"device profile: {field} must be [devices >= 1, seconds >= 0] pairs with "
                                  f"distinct device counts, got {list(table)!r}")
            object.__setattr__(self, field, table)

    def host_s(self, rows: int) -> float:
        """Host time of one serving pass of ``rows`` request rows."""
        return self.host_pass_s + rows * self.host_row_s

    def efficiency(self, dtype_bytes: int, rows: float) -> float:
        """Matmul efficiency at ``rows`` rows in the dtype of ``dtype_bytes`` bytes (nearest width measured)."""
        curves = dict(self.flops_efficiency)
        name = DTYPE_NAMES.get(dtype_bytes)
        if name not in curves:  # e.g. only float32 measured: use the closest width there is
            widths = {v: k for k, v in DTYPE_NAMES.items()}
            name = min(curves, key=lambda k: abs(widths.get(k, 0) - dtype_bytes))
        pts = curves[name]
        x = math.log(max(float(rows), 1.0))
        if x <= math.log(pts[0][0]):
            return pts[0][1]
        for (r0, e0), (r1, e1) in zip(pts, pts[1:]):
            x0, x1 = math.log(r0), math.log(r1)
            if x <= x1:
                return e0 + (e1 - e0) * (x - x0) / (x1 - x0) if x1 > x0 else e1
        return pts[-1][1]


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """What the planner needs to know about one accelerator."""

    name: str
    """Canonical catalogue name (or the name a cluster file gives a custom device)."""
    memory_bytes: int
    """Device memory in bytes."""
    peak_flops: float
    """Peak dense bf16/fp16 tensor FLOP/s (no sparsity)."""
    memory_bandwidth_Bps: float
    """HBM/GDDR bandwidth in bytes per second."""
    intra_bandwidth_Bps: float
    """Typical device-to-device bandwidth inside one host, bytes/s per direction (NVLink, or PCIe where none)."""
    price_per_hour: float
    """Typical on-demand price of one device for one hour, in dollars."""
    kind: str = "gpu"
    """``"gpu"``, ``"tpu"`` or ``"cpu"``."""
    profile: DeviceProfile | None = None
    """Measured efficiencies (``hexjax calibrate``); ``None``: the cost model's datasheet constants."""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"device name must be a non-empty string, got {self.name!r}")
        if isinstance(self.memory_bytes, bool) or not isinstance(self.memory_bytes, int) or self.memory_bytes <= 0:
            raise ConfigError(f"device {self.name}: memory_bytes must be a positive integer, got {self.memory_bytes!r}")
        for field in ("peak_flops", "memory_bandwidth_Bps", "intra_bandwidth_Bps"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"device {self.name}: {field} must be a positive number, got {value!r}")
        if isinstance(self.price_per_hour, bool) or not isinstance(self.price_per_hour, (int, float)) \
                or not self.price_per_hour >= 0:
            raise ConfigError(f"device {self.name}: price_per_hour must be >= 0, got {self.price_per_hour!r}")
        if self.kind not in KINDS:
            raise ConfigError(f"device {self.name}: kind must be 'gpu', 'tpu' or 'cpu', got {self.kind!r}")
        if self.profile is not None and not isinstance(self.profile, DeviceProfile):
            raise ConfigError(f"device {self.name}: profile must be a DeviceProfile, got {type(self.profile).__name__}")


def _spec(name, memory_GiB, tflops, memory_GBps, intra_GBps, price, kind="gpu") -> DeviceSpec:
    return DeviceSpec(name, memory_GiB * GiB, tflops * TFLOPS, memory_GBps * GB, intra_GBps * GB, price, kind)


_CATALOGUE = [
    # H100 SXM5 datasheet (989 TF bf16 dense, 3.35 TB/s, NVLink4 900 GB/s bidir); Lambda on-demand $2.99.
    _spec("H100-SXM", 80, 989, 3350, 450, 2.99),
    # H100 PCIe datasheet (756 TF bf16 dense, 2.0 TB/s), PCIe 5 x16; Lambda on-demand $2.49.
    _spec("H100-PCIe", 80, 756, 2000, 50, 2.49),
    # H200 SXM datasheet (141 GB, 989 TF bf16 dense, 4.8 TB/s, NVLink4 900 GB/s bidir); RunPod $3.99.
    _spec("H200", 141, 989, 4800, 450, 3.99),
    # A100 SXM4 80GB datasheet (312 TF bf16, 2039 GB/s, NVLink3 600 GB/s bidir); Lambda on-demand $1.79.
    _spec("A100-80G", 80, 312, 2039, 300, 1.79),
    # A100 SXM4 40GB datasheet (312 TF bf16, 1555 GB/s, NVLink3 600 GB/s bidir); Lambda on-demand $1.29.
    _spec("A100-40G", 40, 312, 1555, 300, 1.29),
    # RTX A6000 datasheet (154.8 TF fp16/bf16 tensor dense, 768 GB/s), PCIe 4 x16; Lambda on-demand $0.80.
    _spec("A6000", 48, 154.8, 768, 25, 0.80),
    # RTX A5000 datasheet (222.2 TF tensor sparse = 111.1 dense, 768 GB/s), PCIe 4 x16; RunPod $0.27.
    _spec("A5000", 24, 111.1, 768, 25, 0.27),
    # RTX A4000 datasheet (153.4 TF tensor sparse = 76.7 dense, 448 GB/s), PCIe 4 x16; RunPod $0.17.
    _spec("A4000", 16, 76.7, 448, 25, 0.17),
    # A40 datasheet (149.7 TF bf16 dense, 696 GB/s), PCIe 4 x16; RunPod $0.40.
    _spec("A40", 48, 149.7, 696, 25, 0.40),
    # L40S datasheet (362 TF bf16 dense, 864 GB/s), PCIe 4 x16; RunPod $0.86.
    _spec("L40S", 48, 362, 864, 25, 0.86),
    # L4 datasheet (121 TF bf16 dense, 300 GB/s), PCIe 4 x16; Google Cloud g2-standard-4 $0.71.
    _spec("L4", 24, 121, 300, 25, 0.71),
    # T4 datasheet (65 TF fp16 mixed precision, no bf16, 320 GB/s), PCIe 3 x16; Google Cloud $0.35.
    _spec("T4", 16, 65, 320, 12, 0.35),
    # V100 SXM2 16GB datasheet (125 TF fp16 tensor, 900 GB/s, NVLink2 300 GB/s bidir); Google Cloud $2.48.
    _spec("V100", 16, 125, 900, 150, 2.48),
    # V100 SXM2 32GB datasheet (as V100 with 32 GB); AWS p3dn.24xlarge $31.21 / 8 = $3.90.
    _spec("V100-32G", 32, 125, 900, 150, 3.90),
    # GA102 whitepaper, RTX 3090 (71 TF fp16 tensor w/ fp32 acc dense, 936 GB/s), PCIe 4 x16; RunPod $0.22.
    _spec("RTX-3090", 24, 71, 936, 25, 0.22),
    # RTX 3090 Ti specs (84 SMs at 1.86 GHz: 80 TF fp16 tensor w/ fp32 acc dense, 1008 GB/s), PCIe 4 x16; vast.ai ~$0.25.
    _spec("RTX-3090Ti", 24, 80, 1008, 25, 0.25),
    # Ada whitepaper, RTX 4090 (165.2 TF fp16 tensor w/ fp32 acc dense, 1008 GB/s), PCIe 4 x16; RunPod $0.34.
    _spec("RTX-4090", 24, 165.2, 1008, 25, 0.34),
    # Cloud TPU v5e docs (197 TF bf16, 16 GiB HBM2, 819 GB/s, ICI 1600 Gbps over 4 links); Google Cloud $1.20/chip.
    _spec("TPU-v5e", 16, 197, 819, 50, 1.20, kind="tpu"),
    # A800 SXM4 80GB datasheet (A100-class: 312 TF bf16 dense, 2039 GB/s; NVLink cut to 400 GB/s bidir);
    # sold in China only, no US on-demand list price: taken at the A100-80G's $1.79.
    _spec("A800", 80, 312, 2039, 200, 1.79),
]

DEVICES: dict[str, DeviceSpec] = {d.name: d for d in _CATALOGUE}
"""The catalogue, keyed by canonical name."""

# Other spellings people use for the same part (normalised like names).
_ALIASES = {
    "rtxa6000": "A6000", "rtxa5000": "A5000", "rtxa4000": "A4000",
    "a10080gb": "A100-80G", "a10040gb": "A100-40G", "a100sxm80gb": "A100-80G", "a100sxm40gb": "A100-40G",
    "h100sxm5": "H100-SXM", "h200sxm": "H200",
    "3090": "RTX-3090", "3090ti": "RTX-3090Ti", "4090": "RTX-4090",
    "geforcertx3090": "RTX-3090", "geforcertx3090ti": "RTX-3090Ti", "geforcertx4090": "RTX-4090",
    "v10016gb": "V100", "v10032gb": "V100-32G", "a80080gb": "A800", "a800sxm80gb": "A800", "v5e": "TPU-v5e", "tpuv5litepod": "TPU-v5e",
}


def normalize_name(name: str) -> str:
    """The form names are compared in: lower case, without '-', '_' or spaces."""
    return "".join(ch for ch in name.lower() if ch not in "-_ ")


def lookup_device(name: str, extra: dict[str, DeviceSpec] | None = None) -> DeviceSpec:
    """The device called ``name`` (case, '-', '_' and spaces ignored).

    ``extra`` holds custom devices (a cluster file's ``[device.NAME]`` tables);
    they take precedence over the catalogue. Unknown names raise
    :class:`ConfigError` listing close matches.
    """
    if not isinstance(name, str):
        raise ConfigError(f"device name must be a string, got {name!r}")
    key = normalize_name(name)
    for table in (extra or {}), DEVICES:
        for canonical, spec in table.items():
            if normalize_name(canonical) == key:
                return spec
    if key in _ALIASES:
        return DEVICES[_ALIASES[key]]
    known = list((extra or {}).keys()) + list(DEVICES)
    by_key = {normalize_name(k): k for k in reversed(known)}
    # Names that start with what was typed ('h100' -> both H100s) come first.
    close = [by_key[k] for k in by_key if key and k.startswith(key)]
    close += [by_key[k] for k in difflib.get_close_matches(key, list(by_key), n=3, cutoff=0.6)
              if by_key[k] not in close]
    close = close[:4]
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(
        f"unknown device {name!r}.{hint} Known devices: {', '.join(known)}; "
        "or define it in the cluster file as a [device.NAME] table")
