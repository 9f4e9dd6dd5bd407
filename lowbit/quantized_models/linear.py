"""The QuantLinear contract every weight format implements, and the registry that builds them.

A format is one subclass registered under a name ("dense", "qtip", "vptq", "gptq", "awq", "gguf").
The model code never knows which format a Linear has: the loader calls `linear_from_checkpoint`
with the layer's tensors as named in the checkpoint, and the format validates and keeps them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import fused


class CheckpointError(ValueError):
    """A checkpoint that does not match what lowbit expects; the message names the tensor or key."""


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


class LayerTensors:
    """The tensors of one layer, validated as a format takes them.

    `take` checks name, shape and dtype and remembers what was used; `finish` fails on leftovers,
    so an unexpected tensor in a checkpoint is an error rather than silently ignored.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], prefix: str = ""):
        self._tensors = dict(tensors)
        self._taken: set[str] = set()
        self.prefix = prefix

    def where(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def take(
        self,
        name: str,
        shape: tuple | list | None = None,
        dtype: torch.dtype | tuple[torch.dtype, ...] | None = None,
        optional: bool = False,
    ) -> torch.Tensor | None:
        """Return tensor `name` after checking it; `shape` entries of None match any size."""
        if name not in self._tensors:
            if optional:
                return None
            have = ", ".join(self.names()) or "nothing"
            raise CheckpointError(f"missing tensor {self.where(name)} (layer has: {have})")
        t = self._tensors[name]
        self._taken.add(name)
        if shape is not None:
            ok = len(shape) == t.dim() and all(e is None or int(e) == s for e, s in zip(shape, t.shape, strict=True))
            if not ok:
                want = "[" + ", ".join("*" if e is None else str(int(e)) for e in shape) + "]"
                raise CheckpointError(
                    f"tensor {self.where(name)} has shape {_fmt_shape(t.shape)}, expected {want}"
                )
        if dtype is not None:
            allowed = dtype if isinstance(dtype, tuple) else (dtype,)
            if t.dtype not in allowed:
                want = " or ".join(str(d).replace("torch.", "") for d in allowed)
                raise CheckpointError(
                    f"tensor {self.where(name)} has dtype {str(t.dtype).replace('torch.', '')}, "
                    f"expected {want}"
                )
        return t

    def finish(self) -> None:
        extra = sorted(set(self._tensors) - self._taken)
        if extra:
            raise CheckpointError(
                "unexpected tensor(s) " + ", ".join(self.where(n) for n in extra)
            )


class QuantLinear(nn.Module):
    """Base of every Linear: `y = x @ W.T (+ bias)` with W kept in the format's own storage.

    Subclasses implement `from_checkpoint`, `dequantize` and `forward`. Storage lives in buffers
    (never Parameters: nothing here trains), so `.to(device)` moves it and `storage_bytes` counts it.
    """

    fmt: ClassVar[str] = ""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)

    @classmethod
    def matches(cls, hf_config: Mapping[str, Any]) -> bool:
        """True when a checkpoint's config.json says its Linears are in this format."""
        return False

    @classmethod
    def layer_config(cls, hf_config: Mapping[str, Any], module_name: str) -> Mapping[str, Any] | None:
        """The config block `from_checkpoint` gets for module `module_name`
        (e.g. "model.layers.0.self_attn.q_proj"); None means the module stays dense."""
        return None

    @classmethod
    def from_checkpoint(
        cls, config: Mapping[str, Any] | None, tensors: LayerTensors, in_features: int, out_features: int
    ) -> "QuantLinear":
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The effective dense weight, float32 [out_features, in_features]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_pending(self, x: torch.Tensor) -> "torch.Tensor | PendingOutput":
        """self(x), or a `PendingOutput` where this format can leave its last step to the next
        projection's `forward_normed` (only where a norm follows: the residual stream's projections)."""
        return self(x)

    def forward_normed(self, x: "torch.Tensor | PendingOutput", norm_weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None, rotary: fused.QKVRotary | None = None,
                       activate: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(weight ⊙ RMSNorm(x + residual)), x + residual): the norm in front of a projection,
        and for a fused q|k|v projection the rotary step after it (`fused.rotary_qkv_`); `activate`
        > 0 applies SiLU to the output's first `activate` columns (a fused gate|up projection's gate
        half, for `forward_gated(activated=True)`). Formats whose transforms can take these in their
        own launches override this."""
        if activate and rotary is not None:
            raise ValueError("activate (a gate|up output) and rotary (a q|k|v output) do not go together")
        h, residual = fused.rmsnorm(finished(x), norm_weight, eps, residual)
        y = self(h)
        if activate:
            F.silu(y[..., :activate], inplace=True)
        return (y if rotary is None else fused.rotary_qkv_(y, rotary)), residual

    def forward_gated(self, gate: torch.Tensor, up: torch.Tensor, pending: bool = False,
                      activated: bool = False) -> "torch.Tensor | PendingOutput":
        """self(silu(gate) · up): the MLP's activation in front of the down projection (overridden
        like `forward_normed`); `activated`: gate holds silu(gate) already (`forward_normed`'s
        `activate`); `pending` as in `forward_pending`."""
        h = gate * up if activated else fused.silu_mul(gate, up)
        return self.forward_pending(h) if pending else self(h)

    def activates_in_launch(self, like: torch.Tensor) -> bool:
        """Whether `forward_normed(activate=)` applies SiLU inside this layer's own launches for
        activations like `like` [B, ·] (its device, dtype and rows), where elsewhere it costs one more."""
        return False

    def takes_activated(self, like: torch.Tensor) -> bool:
        """Whether `forward_gated(activated=True)` saves work here for activations like `like`: the
        gate's SiLU would otherwise run inside this layer's input launch, once per program."""
        return False

    @property
    def storage_bytes(self) -> int:
        """Bytes held by this layer's buffers (codes, scales, tables, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @property
    def bits_per_weight(self) -> float:
        """Everything the layer stores, in bits, per weight of the dense matrix."""
        return 8.0 * self.storage_bytes / (self.in_features * self.out_features)

    def describe(self) -> dict[str, Any]:
        """Format parameters for `lowbit inspect`."""
        return {}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bpw={self.bits_per_weight:.3f}"


class PendingOutput:
    """A projection's output whose last step has not run: `raw` is what it has computed, `finish()`
    completes it. The next projection's `forward_normed` may take that step into its own first
    launch (QTIP: the output transform beside the residual add, the RMSNorm and the input transform,
    one launch for two); anything else calls `finished`."""

    def __init__(self, producer: "QuantLinear", raw: torch.Tensor, finish: Callable[[], torch.Tensor]):
        self.producer, self.raw, self._finish = producer, raw, finish

    @property
    def shape(self) -> torch.Size:
        """The finished output's shape: [rows, producer.out_features]."""
        return torch.Size((self.raw.shape[0], self.producer.out_features))

    def finish(self) -> torch.Tensor:
        return self._finish()


def finished(x: "torch.Tensor | PendingOutput") -> torch.Tensor:
    """x itself, or a pending output completed."""
    return x.finish() if isinstance(x, PendingOutput) else x


_REGISTRY: dict[str, type[QuantLinear]] = {}


def register(fmt: str):
    """Class decorator: make a QuantLinear subclass buildable under `fmt`."""

    def wrap(cls: type[QuantLinear]) -> type[QuantLinear]:
        cls.fmt = fmt
        _REGISTRY[fmt] = cls
        return cls

    return wrap


def formats() -> list[str]:
    _import_formats()
    return sorted(_REGISTRY)


def _import_formats() -> None:
    # Formats register themselves on import; importing here keeps the registry complete without
    # the model code having to know which formats exist.
    import importlib

    for mod in ("dense", "qtip", "vptq", "uniform"):
        try:
            importlib.import_module(f"lowbit.quantized_models.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"lowbit.quantized_models.{mod}":
                raise


def linear_from_checkpoint(
    fmt: str,
    config: Mapping[str, Any] | None,
    tensors: Mapping[str, torch.Tensor] | LayerTensors,
    in_features: int,
    out_features: int,
    *,
    prefix: str = "",
) -> QuantLinear:
    """Build the Linear of format `fmt` from the layer's checkpoint tensors (names without prefix)."""
    _import_formats()
    if fmt not in _REGISTRY:
        raise CheckpointError(f"unknown weight format {fmt!r}; known: {', '.join(sorted(_REGISTRY))}")
    lt = tensors if isinstance(tensors, LayerTensors) else LayerTensors(tensors, prefix)
    lin = _REGISTRY[fmt].from_checkpoint(config, lt, int(in_features), int(out_features))
    lt.finish()
    return lin
