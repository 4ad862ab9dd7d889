"""Llama-family models: configuration, parameters and the forward pass."""

from hexjax.models.config import ModelConfig, RopeScaling, PRESETS
from hexjax.models.llama import (
    KVCache, LlamaStage, abstract_params, default_attention, init_cache,
    init_params, logical_axes, stage_params)
from hexjax.models.prompts import check_prompts, cut_at_eos, eos_lengths
from hexjax.models.sampling import Sampling, request_key, request_keys, sample, step_key

__all__ = [
    "ModelConfig", "RopeScaling", "PRESETS",
    "LlamaStage", "KVCache", "init_cache", "default_attention",
    "init_params", "abstract_params", "logical_axes", "stage_params",
    "Sampling", "sample", "step_key", "request_key", "request_keys",
    "check_prompts", "cut_at_eos", "eos_lengths",
    "LlamaModel", "load_hf",
]


def __getattr__(name: str):
    # the checkpoint loader pulls in safetensors; import it on first use
    if name in ("LlamaModel", "load_hf"):
        from hexjax.models import hf
        return getattr(hf, name)
    raise AttributeError(f"module 'hexjax.models' has no attribute {name!r}")
