"""Models and weight formats: the Llama-family model, QuantLinear formats and checkpoint loaders."""

from .linear import CheckpointError, LayerTensors, QuantLinear, formats, linear_from_checkpoint, register

__all__ = ["CheckpointError", "LayerTensors", "QuantLinear", "formats", "linear_from_checkpoint", "register"]
