"""Llama-family models: configuration, parameters and the forward pass."""

from hexjax.models.config import ModelConfig, RopeScaling, PRESETS

__all__ = ["ModelConfig", "RopeScaling", "PRESETS"]
