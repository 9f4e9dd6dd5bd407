"""Dense (unquantized) Linear: embeddings' neighbours, skipped layers, and the fp16 baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import QuantLinear, register

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@register("dense")
class DenseLinear(QuantLinear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(weight.shape[1], weight.shape[0])
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    @classmethod
    def from_checkpoint(cls, config, tensors, in_features, out_features):
        w = tensors.take("weight", (out_features, in_features), _FLOAT_DTYPES)
        b = tensors.take("bias", (out_features,), _FLOAT_DTYPES, optional=True)
        return cls(w, b)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)
