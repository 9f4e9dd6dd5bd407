"""The serving engine: continuous batching over a paged KV cache (see engine.py)."""

from .engine import Engine, QueueFullError
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["Engine", "QueueFullError", "SamplingParams", "RequestOutput", "CompletionOutput"]
