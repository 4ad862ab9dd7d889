"""A plan: how a model's layers are laid over a cluster's devices.

A plan splits devices into **replicas**, independent copies of the model that
serve different requests. A replica is a pipeline of **stages**; a stage holds
a contiguous range of layers (the first stage also the embedding, the last the
final norm and LM head) on a ``(dp, tp)`` mesh of devices of one host.

Plans are saved as versioned, human-readable JSON. The smallest hand-written
plan is::

    {"version": 1, "model": "llama-2-7b",
     "replicas": [{"stages": [{"layers": [0, 32], "devices": [0, 1], "tp": 2}]}]}
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from hexjax.errors import PlanError
from hexjax.workload import Workload

PLAN_VERSION = 1

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "float8": 1}


def format_layers(start: int, stop: int) -> str:
    """Layers ``[start, stop)`` as every human-facing output writes them: inclusive, ``0-44``."""
    return f"{start}-{stop - 1}"


def format_mesh(dp: int, tp: int) -> str:
    """A stage's ``(dp, tp)`` mesh as every human-facing output writes it: ``dp2 x tp4``."""
    return f"dp{dp} x tp{tp}"


@dataclasses.dataclass(frozen=True)
class Stage:
    """Consecutive layers on one ``(dp, tp)`` mesh of one host's devices."""

    layers: tuple[int, int]
    """``[start, stop)`` global layer indices."""
    devices: tuple[int, ...]
    """Global device indices, ``dp * tp`` of them, row-major for the mesh shape ``(dp, tp)``."""
    dp: int = 1
    """Copies of the stage, each serving its share of every microbatch."""
    tp: int = 1
    """Tensor-parallel degree: attention heads and MLP width are split this many ways."""
    host: str = ""
    """Name of the host holding the devices (informational; checked by ``validate``)."""

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "devices", tuple(self.devices))

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"layers": list(self.layers), "devices": list(self.devices), "dp": self.dp, "tp": self.tp}
        if self.host:
            d["host"] = self.host
        return d


@dataclasses.dataclass(frozen=True)
class Replica:
    """A pipeline of stages that together hold every layer once, in order."""

    stages: tuple[Stage, ...]
    """Stages in pipeline order."""

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(self.stages))

    @property
    def devices(self) -> tuple[int, ...]:
        return tuple(d for s in self.stages for d in s.devices)


ROUTING_VERSION = 1


@dataclasses.dataclass(frozen=True)
class RouteBucket:
    """Requests up to these sizes go to these replicas (a bound of None is unbounded)."""

    replicas: tuple[int, ...]
    """Replica indices that serve the bucket (the least loaded of them takes a request)."""
    max_prompt_len: int | None = None
    """Largest prompt of the bucket."""
    max_output_len: int | None = None
    """Largest output of the bucket."""

    def __post_init__(self):
        object.__setattr__(self, "replicas", tuple(self.replicas))

    def holds(self, prompt_len: int, output_len: int) -> bool:
        return ((self.max_prompt_len is None or prompt_len <= self.max_prompt_len)
                and (self.max_output_len is None or output_len <= self.max_output_len))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.max_prompt_len is not None:
            d["max_prompt_len"] = self.max_prompt_len
        if self.max_output_len is not None:
            d["max_output_len"] = self.max_output_len
        d["replicas"] = list(self.replicas)
        return d


@dataclasses.dataclass(frozen=True)
class Routing:
    """Request-size buckets, tried in order; the first that holds a request names its replicas.

    The last bucket is unbounded, so every request has a place. Saved in the
    plan JSON as ``"routing": {"version": 1, "buckets": [...]}``.
    """

    buckets: tuple[RouteBucket, ...]
    """Buckets in the order they are tried."""

    def __post_init__(self):
        object.__setattr__(self, "buckets", tuple(self.buckets))

    def route(self, prompt_len: int, output_len: int) -> tuple[int, ...]:
        """Replicas allowed to serve a request of these sizes."""
        return next(b.replicas for b in self.buckets if b.holds(prompt_len, output_len))

    def to_dict(self) -> dict[str, Any]:
        return {"version": ROUTING_VERSION, "buckets": [b.to_dict() for b in self.buckets]}

    @staticmethod
    def from_dict(d: Any, num_replicas: int, where: str = "routing") -> "Routing":
        def fail(problem: str) -> PlanError:
            return PlanError(f"{where}: {problem}")

        if not isinstance(d, dict) or not isinstance(d.get("buckets"), list) or not d["buckets"]:
            raise fail('must be {"version": 1, "buckets": [{"max_prompt_len": N, "replicas": [...]}, ..., '
                       '{"replicas": [...]}]}')
        if d.get("version") != ROUTING_VERSION:
            raise fail(f"version is {d.get('version')!r}; this hexjax reads routing version {ROUTING_VERSION}")
        extra = sorted(set(d) - {"version", "buckets"})
        if extra:
            raise fail(f"unknown field(s) {', '.join(extra)}; known: buckets, version")
        buckets = []
        for i, b in enumerate(d["buckets"]):
            at = f"buckets[{i}]"
            if not isinstance(b, dict):
                raise fail(f"{at}: must be an object with replicas (and max_prompt_len / max_output_len)")
            extra = sorted(set(b) - {"replicas", "max_prompt_len", "max_output_len"})
            if extra:
                raise fail(f"{at}: unknown field(s) {', '.join(extra)}; known: max_output_len, max_prompt_len, "
                           "replicas")
            reps = b.get("replicas")
            if not (isinstance(reps, list) and reps and all(_is_int(r) and 0 <= r < num_replicas for r in reps)):
                raise fail(f"{at}.replicas: must be a non-empty list of replica indices 0..{num_replicas - 1}, "
                           f"got {reps!r}")
            bounds = {}
            for k in ("max_prompt_len", "max_output_len"):
                v = b.get(k)
                if v is not None and (not _is_int(v) or v < 1):
                    raise fail(f"{at}.{k}: must be a positive integer or absent, got {v!r}")
                bounds[k] = v
            buckets.append(RouteBucket(tuple(reps), **bounds))
        last = buckets[-1]
        if last.max_prompt_len is not None or last.max_output_len is not None:
            raise fail("the last bucket must have no bounds (it takes every request the others do not); "
                       "drop its max_prompt_len/max_output_len or add an unbounded bucket")
        return Routing(tuple(buckets))


TRAINING_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """What a training plan adds: its workload, microbatches per replica and each replica's batch share.

    Saved in the plan JSON as ``"training": {"version": 1, "workload": {...}, "microbatches": M,
    "replica_rows": [...]}``; serving plans have none.
    """

    workload: Any
    """The ``TrainWorkload`` the plan was made for."""
    microbatches: int
    """Microbatches every replica splits its share into."""
    replica_rows: tuple[int, ...]
    """Sequences per step of each replica (they sum to the global batch)."""

    def __post_init__(self):
        object.__setattr__(self, "replica_rows", tuple(self.replica_rows))

    def to_dict(self) -> dict[str, Any]:
        return {"version": TRAINING_VERSION, "workload": self.workload.to_dict(), "microbatches": self.microbatches,
                "replica_rows": list(self.replica_rows)}

    @staticmethod
    def from_dict(d: Any, num_replicas: int, where: str = "training") -> "TrainSpec":
        from hexjax.workload import TrainWorkload

        def fail(problem: str) -> PlanError:
            return PlanError(f"{where}: {problem}")

        if not isinstance(d, dict):
            raise fail("must be an object with workload, microbatches and replica_rows")
        extra = sorted(set(d) - {"version", "workload", "microbatches", "replica_rows"})
        if extra:
            raise fail(f"unknown field(s) {', '.join(extra)}; known: microbatches, replica_rows, version, workload")
        if d.get("version", TRAINING_VERSION) != TRAINING_VERSION:
            raise fail(f"version is {d.get('version')!r}; this hexjax reads training version {TRAINING_VERSION}")
        try:
            wl = TrainWorkload.from_dict(d.get("workload"), where=f"{where}.workload")
        except ValueError as e:
            raise PlanError(str(e)) from None
        m, rows = d.get("microbatches"), d.get("replica_rows")
        if not _is_int(m) or m < 1:
            raise fail(f"microbatches must be a positive integer, got {m!r}")
        if not (isinstance(rows, list) and len(rows) == num_replicas and all(_is_int(r) and r >= 1 for r in rows)):
            raise fail(f"replica_rows must list a positive share for each of the {num_replicas} replicas, "
                       f"got {rows!r}")
        if sum(rows) != wl.global_batch:
            raise fail(f"replica_rows {rows} sum to {sum(rows)}, not the global batch {wl.global_batch}")
        return TrainSpec(wl, m, tuple(rows))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Replicas of a model over a cluster, with what they were planned for."""

    model: str
    """Model name (preset or checkpoint directory)."""
    cluster_fingerprint: str
    """``Cluster.fingerprint()`` of the cluster it was made for ('' when unknown)."""
    replicas: tuple[Replica, ...]
    """Independent pipelines."""
    workload: Workload | None = None
    """Workload the plan was made for."""
    objective: str = ""
    """What the search optimised: latency, throughput or cost ('' for hand-written plans)."""
    dtype_bytes: int = 2
    """Bytes per parameter and activation element (2 for bf16)."""
    prediction: dict | None = None
    """Predictions saved with the plan (see ``Prediction.to_dict``)."""
    routing: Routing | None = None
    """Which replicas serve which request sizes (None: any replica serves any request)."""
    training: TrainSpec | None = None
    """A training plan's workload, microbatches and batch shares (None for serving plans)."""

    def __post_init__(self):
        object.__setattr__(self, "replicas", tuple(self.replicas))

    # ---- construction ----

    @staticmethod
    def single_device(model: str, num_layers: int, device: int = 0) -> "Plan":
        """Every layer on one device."""
        return Plan(model, "", (Replica((Stage((0, num_layers), (device,)),)),))

    def route(self, prompt_len: int, output_len: int) -> tuple[int, ...] | None:
        """Replicas that may serve a request of these sizes per the routing table (None: any replica)."""
        return None if self.routing is None else self.routing.route(prompt_len, output_len)

    @property
    def microbatches(self) -> int | None:
        """A training plan's microbatches per replica (None for serving plans)."""
        return None if self.training is None else self.training.microbatches

    @property
    def replica_rows(self) -> tuple[int, ...] | None:
        """A training plan's sequences per step of each replica (None for serving plans)."""
        return None if self.training is None else self.training.replica_rows

    @property
    def devices(self) -> tuple[int, ...]:
        """Every device index the plan uses, in plan order."""
        return tuple(d for r in self.replicas for d in r.devices)

    # ---- JSON ----

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"version": PLAN_VERSION, "model": self.model,
                             "cluster_fingerprint": self.cluster_fingerprint, "objective": self.objective,
                             "dtype_bytes": self.dtype_bytes}
        if self.workload is not None:
            d["workload"] = self.workload.to_dict()
        if self.training is not None:
            d["training"] = self.training.to_dict()
        d["replicas"] = [{"stages": [s.to_dict() for s in r.stages]} for r in self.replicas]
        if self.routing is not None:
            d["routing"] = self.routing.to_dict()
        if self.prediction is not None:
            d["prediction"] = self.prediction
        return d

    def to_json(self) -> str:
        """Indented JSON with each stage on one line."""
        d = self.to_dict()
        reps = d.pop("replicas")
        routing = d.pop("routing", None)
        pred = d.pop("prediction", None)
        lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in d.items()]
        lines.append('  "replicas": [')
        for i, r in enumerate(reps):
            lines.append('    {"stages": [')
            lines += [f"      {json.dumps(s)}" + ("," if j < len(r["stages"]) - 1 else "")
                      for j, s in enumerate(r["stages"])]
            lines.append("    ]}" + ("," if i < len(reps) - 1 else ""))
        lines.append("  ]" + ("," if routing is not None or pred is not None else ""))
        if routing is not None:
            lines.append('  "routing": {"version": %d, "buckets": [' % routing["version"])
            lines += [f"    {json.dumps(b)}" + ("," if j < len(routing["buckets"]) - 1 else "")
                      for j, b in enumerate(routing["buckets"])]
            lines.append("  ]}" + ("," if pred is not None else ""))
        if pred is not None:
            body = json.dumps(pred, indent=2).replace("\n", "\n  ")
            lines.append(f'  "prediction": {body}')
        lines.append("}")
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @staticmethod
    def load(path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"{path}: no such plan file; make one with `hexjax plan ... --out {path}`")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}: not valid JSON ({e}); fix the syntax there") from None
        return Plan.from_dict(d, where=str(path))

    @staticmethod
    def from_dict(d: dict[str, Any], where: str = "plan") -> "Plan":
        def fail(field: str, problem: str) -> PlanError:
            return PlanError(f"{where}: {field}: {problem}")

        if not isinstance(d, dict):
            raise fail("top level", "must be a JSON object")
        known = {"version", "model", "cluster_fingerprint", "objective", "dtype", "dtype_bytes", "workload",
                 "replicas", "prediction", "routing", "training"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise fail("top level", f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        version = d.get("version")
        if version != PLAN_VERSION:
            raise fail("version", f"is {version!r}; this hexjax reads version {PLAN_VERSION} "
                                  f"(add \"version\": {PLAN_VERSION})")
        model = d.get("model")
        if not isinstance(model, str) or not model:
            raise fail("model", "must name the model (a preset name or checkpoint directory)")
        dtype_bytes = d.get("dtype_bytes", 2)
        if "dtype" in d:
            if d["dtype"] not in _DTYPE_BYTES:
                raise fail("dtype", f"unknown dtype {d['dtype']!r}; use one of {', '.join(_DTYPE_BYTES)}")
            dtype_bytes = _DTYPE_BYTES[d["dtype"]]
        if not _is_int(dtype_bytes) or dtype_bytes not in (1, 2, 4):
            raise fail("dtype_bytes", f"must be 1, 2 or 4, got {dtype_bytes!r}")
        workload = None
        if d.get("workload") is not None:
            try:
                workload = Workload.from_dict(d["workload"], where=f"{where}: workload")
            except ValueError as e:
                raise PlanError(str(e)) from None
        reps = d.get("replicas")
        if not isinstance(reps, list) or not reps:
            raise fail("replicas", "must be a non-empty list of {\"stages\": [...]} objects")
        replicas = []
        for i, r in enumerate(reps):
            if not isinstance(r, dict) or not isinstance(r.get("stages"), list) or not r["stages"]:
                raise fail(f"replicas[{i}]", "must be an object with a non-empty \"stages\" list")
            extra = sorted(set(r) - {"stages"})
            if extra:
                raise fail(f"replicas[{i}]", f"unknown field(s) {', '.join(extra)}")
            stages = []
            for j, s in enumerate(r["stages"]):
                at = f"replicas[{i}].stages[{j}]"
                if not isinstance(s, dict):
                    raise fail(at, "must be an object with layers, devices and tp")
                extra = sorted(set(s) - {"layers", "devices", "dp", "tp", "host"})
                if extra:
                    raise fail(at, f"unknown field(s) {', '.join(extra)}; known: devices, dp, host, layers, tp")
                layers = s.get("layers")
                if not (isinstance(layers, list) and len(layers) == 2 and all(map(_is_int, layers))):
                    raise fail(f"{at}.layers", f"must be [start, stop] integers, got {layers!r}")
                devices = s.get("devices")
                if not (isinstance(devices, list) and devices and all(map(_is_int, devices))):
                    raise fail(f"{at}.devices", f"must be a non-empty list of device indices, got {devices!r}")
                dp, tp = s.get("dp", 1), s.get("tp", 1)
                for name, v in (("dp", dp), ("tp", tp)):
                    if not _is_int(v) or v < 1:
                        raise fail(f"{at}.{name}", f"must be a positive integer, got {v!r}")
                host = s.get("host", "")
                if not isinstance(host, str):
                    raise fail(f"{at}.host", f"must be a host name, got {host!r}")
                stages.append(Stage(tuple(layers), tuple(devices), dp, tp, host))
            replicas.append(Replica(tuple(stages)))
        fp = d.get("cluster_fingerprint", "")
        objective = d.get("objective", "")
        if not isinstance(fp, str) or not isinstance(objective, str):
            raise fail("cluster_fingerprint/objective", "must be strings")
        prediction = d.get("prediction")
        routing = None
        if d.get("routing") is not None:
            routing = Routing.from_dict(d["routing"], len(replicas), where=f"{where}: routing")
        training = None
        if d.get("training") is not None:
            training = TrainSpec.from_dict(d["training"], len(replicas), where=f"{where}: training")
        return Plan(model, fp, tuple(replicas), workload, objective, dtype_bytes, prediction, routing, training)

    # ---- validation ----

    def model_mismatch(self, model_cfg) -> str | None:
        """Why the plan was not made for ``model_cfg`` (None when it may have been).

        Two presets must have the same name; a preset and a checkpoint the same
        shape; otherwise the plan's stages must end at the model's layer count.
        """
        from hexjax.models.config import PRESETS
        cfg = model_cfg
        made = PRESETS.get(self.model.lower())
        given = PRESETS.get(cfg.name) if PRESETS.get(cfg.name) == cfg else None
        if made is not None and given is not None:
            if made.name != given.name:
                return (f"was made for {made.name} ({made.num_layers} layers), not for {cfg.name} "
                        f"({cfg.num_layers} layers)")
            return None
        if made is not None:
            if _shape(made) != _shape(cfg):
                return (f"was made for {made.name} ({_describe(made)}), but {cfg.name} is a different model "
                        f"({_describe(cfg)})")
            return None
        ends = sorted({r.stages[-1].layers[1] for r in self.replicas if r.stages})
        if ends and ends != [cfg.num_layers]:
            return (f"was made for {self.model} (its stages end at layer {ends[-1]}), but {cfg.name} has "
                    f"{cfg.num_layers} layers")
        return None

    def check_model(self, model_cfg, where: str = "the plan") -> None:
        """Raise :class:`PlanError` when the plan was made for another model than ``model_cfg``."""
        problem = self.model_mismatch(model_cfg)
        if problem:
            raise PlanError(f"{where} {problem}; pass --model {self.model}, or make a plan for "
                            f"{model_cfg.name} with `hexjax plan --model {model_cfg.name} ...`")

    def layout_problems(self, model_cfg, num_devices: int | None = None) -> list[str]:
        """Rules the plan's shape breaks for ``model_cfg``, with no cluster needed (empty when none).

        Every replica covers every layer once, in order; each stage's mesh has
        ``dp * tp`` devices, its ``tp`` splits the model, and no device serves
        twice; with ``num_devices``, every device index exists.
        """
        cfg = model_cfg
        out: list[str] = []
        if not self.replicas:
            out.append("the plan has no replicas")
        used: dict[int, str] = {}
        for i, rep in enumerate(self.replicas):
            if not rep.stages:
                out.append(f"replica {i}: has no stages")
                continue
            nxt = 0
            for j, st in enumerate(rep.stages):
                at = f"replica {i} stage {j}"
                a, b = st.layers
                if b <= a:
                    out.append(f"{at}: its layer range (start {a}, stop {b}) is empty; a stage holds at least one layer")
                elif a != nxt:
                    out.append(f"{at}: layers {format_layers(a, b)} should start at layer {nxt} "
                               f"(each replica covers every layer once, in order)")
                nxt = max(b, nxt)
                if st.dp < 1 or st.tp < 1:
                    out.append(f"{at}: dp={st.dp} and tp={st.tp} must be positive")
                elif len(st.devices) != st.dp * st.tp:
                    out.append(f"{at}: has {len(st.devices)} devices but a {format_mesh(st.dp, st.tp)} mesh needs "
                               f"{st.dp * st.tp}")
                if num_devices is not None:
                    bad = [d for d in st.devices if not 0 <= d < num_devices]
                    if bad:
                        out.append(f"{at}: device(s) {bad} do not exist; the cluster has devices "
                                   f"0..{num_devices - 1}")
                for d in st.devices:
                    if d in used:
                        out.append(f"{at}: device {d} is also used by {used[d]}; no device may be used twice")
                    else:
                        used[d] = at
                out += [f"{at}: {p}" for p in tp_problems(cfg, st.tp)]
            if rep.stages[-1].layers[1] != cfg.num_layers:
                out.append(f"replica {i}: stages end at layer {rep.stages[-1].layers[1]} but {cfg.name} has "
                           f"{cfg.num_layers} layers; the last stage must stop at {cfg.num_layers}")
        return out

    def violations(self, model_cfg, cluster, workload: Workload | None = None) -> list[str]:
        """Every rule the plan breaks for ``model_cfg`` on ``cluster`` (empty when valid).

        The layout rules (``layout_problems``), then the cluster's: its
        fingerprint, a stage's devices on one host, and memory, checked with
        ``workload``, else the plan's own workload, else one request of one
        prompt token and one output token. A training plan (``training`` set)
        is checked for training memory instead (``train_cost.predict`` with its
        own ``TrainWorkload``, microbatches and batch shares).
        """
        from hexjax.search import cost

        cfg = model_cfg
        out: list[str] = []
        fp = cluster.fingerprint()
        if self.cluster_fingerprint and self.cluster_fingerprint != fp:
            out.append(f"the plan was made for cluster {self.cluster_fingerprint}, but this cluster's fingerprint "
                       f"is {fp}; re-plan for it (or clear cluster_fingerprint if the device numbering still holds)")
        layout = self.layout_problems(cfg, cluster.num_devices)
        out += layout
        for i, rep in enumerate(self.replicas):
            for j, st in enumerate(rep.stages):
                at = f"replica {i} stage {j}"
                hosts = sorted({cluster.host_of(d) for d in st.devices if 0 <= d < cluster.num_devices})
                if len(hosts) > 1:
                    names = ", ".join(cluster.hosts[h].name for h in hosts)
                    out.append(f"{at}: devices {list(st.devices)} span hosts {names}; a stage's devices must be "
                               "on one host (split it into one stage per host)")
                    layout.append(at)
                elif hosts and st.host and st.host != cluster.hosts[hosts[0]].name:
                    out.append(f"{at}: says host {st.host!r} but its devices are on {cluster.hosts[hosts[0]].name!r}")
        if not layout and self.training is not None:
            out += self._train_memory_problems(cfg, cluster, workload)
        elif not layout:
            wl = workload or self.workload or Workload(1, 1, 1)
            pred = cost.predict(self, cfg, cluster, wl)
            for i, (rep, rp) in enumerate(zip(self.replicas, pred.replicas)):
                for j, (st, sp) in enumerate(zip(rep.stages, rp.stages)):
                    if sp.memory_bytes > sp.capacity_bytes:
                        out.append(
                            f"replica {i} stage {j}: needs {_gib(sp.memory_bytes)} per device (weights "
                            f"{_gib(sp.weight_bytes)}, KV cache {_gib(sp.kv_bytes)}, activations "
                            f"{_gib(sp.activation_bytes)}) but {sp.host}'s devices allow {_gib(sp.capacity_bytes)} "
                            f"({cluster.hosts[cluster.host_of(st.devices[0])].device.name}, less the "
                            f"{cost.MEMORY_RESERVE_FRACTION:.0%} reserve); use more tp, fewer layers or a smaller batch")
        return out

    def _train_memory_problems(self, cfg, cluster, workload=None) -> list[str]:
        """Stages of a training plan whose training memory (``train_cost``: parameters, gradients,
        optimizer state, stashed activations, workspace) exceeds their devices' usable memory, checked with
        ``workload`` when it is a ``TrainWorkload``, else the plan's own."""
        from hexjax.search import cost, train_cost
        from hexjax.workload import TrainWorkload
        wl = workload if isinstance(workload, TrainWorkload) else self.training.workload
        pred = train_cost.predict(self, cfg, cluster, wl)
        out = []
        for i, (rep, rp) in enumerate(zip(self.replicas, pred.replicas)):
            for j, (st, sp) in enumerate(zip(rep.stages, rp.stages)):
                if sp.memory_bytes > sp.capacity_bytes:
                    out.append(
                        f"replica {i} stage {j}: training needs {_gib(sp.memory_bytes)} per device (parameters "
                        f"{_gib(sp.param_bytes)}, gradients {_gib(sp.grad_bytes)}, optimizer state "
                        f"{_gib(sp.optimizer_bytes)}, stashed activations {_gib(sp.stash_bytes)} of "
                        f"{sp.stash_microbatches} microbatch{'es' if sp.stash_microbatches > 1 else ''}, workspace "
                        f"{_gib(sp.workspace_bytes)}) but {sp.host}'s devices allow {_gib(sp.capacity_bytes)} "
                        f"({cluster.hosts[cluster.host_of(st.devices[0])].device.name}, less the "
                        f"{cost.MEMORY_RESERVE_FRACTION:.0%} reserve), {_gib(sp.memory_bytes - sp.capacity_bytes)} "
                        f"short; use more tp, fewer layers, more microbatches, remat full or a smaller batch")
        return out

    def validate(self, model_cfg, cluster, workload: Workload | None = None) -> None:
        """Raise :class:`PlanError` listing every violated rule."""
        _refuse(self.violations(model_cfg, cluster, workload))

    def check_layout(self, model_cfg) -> None:
        """Raise :class:`PlanError` listing every layout rule broken for ``model_cfg`` (no cluster needed)."""
        _refuse(self.layout_problems(model_cfg))


def _refuse(problems: list[str]) -> None:
    if problems:
        raise PlanError(f"invalid plan ({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n"
                        + "\n".join(f"  - {p}" for p in problems))


def tp_problems(cfg, tp: int) -> list[str]:
    """Why ``tp`` cannot split ``cfg`` (empty when it can)."""
    out = []
    if tp < 1:
        return out
    if cfg.num_heads % tp:
        out.append(f"tp={tp} does not divide the {cfg.num_heads} attention heads")
    if cfg.intermediate_size % tp:
        out.append(f"tp={tp} does not divide the MLP width {cfg.intermediate_size}")
    kv = cfg.num_kv_heads
    if tp <= kv and kv % tp:
        out.append(f"tp={tp} does not divide the {kv} KV heads")
    if tp > kv and tp % kv:
        out.append(f"tp={tp} exceeds the {kv} KV heads but is not a multiple of them (they are replicated)")
    return out


def valid_tp(cfg, tp: int) -> bool:
    return tp >= 1 and not tp_problems(cfg, tp)


def _shape(cfg) -> tuple:
    return (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.vocab_size)


def _describe(cfg) -> str:
    return (f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads, "
            f"{cfg.num_kv_heads} KV heads, vocabulary {cfg.vocab_size}")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
