"""hexjax: plan and run large language models over uneven, heterogeneous accelerator clusters."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names, imported on first use so that `import hexjax` stays cheap and
# the CLI starts fast.
_EXPORTS = {
    "ModelConfig": "hexjax.models.config",
    "RopeScaling": "hexjax.models.config",
    "HexjaxError": "hexjax.errors",
    "ConfigError": "hexjax.errors",
    "PlanError": "hexjax.errors",
    "DEVICES": "hexjax.devices",
    "DeviceSpec": "hexjax.devices",
    "Cluster": "hexjax.cluster",
    "Host": "hexjax.cluster",
    "Workload": "hexjax.workload",
    "Plan": "hexjax.plan",
    "Replica": "hexjax.plan",
    "Stage": "hexjax.plan",
    "load_hf": "hexjax.models.hf",
    "LlamaModel": "hexjax.models.hf",
    "Sampling": "hexjax.models.sampling",
    "generate": "hexjax.runtime",
    "run_plan": "hexjax.runtime",
    "RunOptions": "hexjax.runtime",
    "use_virtual_cpu_devices": "hexjax.runtime.devices",
    "Trainer": "hexjax.train",
    "TrainConfig": "hexjax.train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hexjax' has no attribute {name!r}")
