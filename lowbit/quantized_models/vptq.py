"""VPTQ checkpoints (microsoft/VPTQ; `VPTQ-community` on the Hub): vector-codebook Linears.

config.json holds `quantization_config = {"quant_method": "vptq", "config_for_layers": {...},
"shared_layer_config": {...}, "modules_to_not_convert": [...]}`; `config_for_layers` maps a full module
name to that layer's settings, a module it does not list takes the `shared_layer_config` entry of its
last name component. ../shared/specs/vptq.md has the tensor layout and the math.

Buffers kept by VPTQLinear (the checkpoint's own tensors in one index form; nothing dense):
- `indices` int32 [group_num, N, P]: the packed bitstreams as published (N = ceil(out/v), P =
  ceil(group_size * (log2 k + log2 k_r) / 32)); unpacked int16 checkpoints are packed into this form
  once, at load.
- `centroids` [group_num, k*v], `res_centroids` [group_num, k_r*v] (residual only),
  `outlier_centroids` [1, k_o*v_o] and `outlier_indices` int16 [1, ceil(out/v_o), outlier_size]
  (outliers only): floats in the checkpoint's dtype (float16 in published models).
- `perm` int32 [in] (the stored uint16 values), `weight_scale`, `weight_bias` [in], `bias` [out].
The Triton kernels (lowbit.kernels.vptq_triton) read these buffers through `kernel_layout()` views.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..kernels.vptq import (
    VPTQParams,
    as_unsigned,
    pack_indices_reference,
    vptq_dequantize_reference,
    vptq_forward_reference,
)
from .dense import DenseLinear
from .linear import CheckpointError, LayerTensors, QuantLinear, register

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
# Modules inside the decoder layers: the ones VPTQ quantizes, so a missing entry there is suspicious.
_DECODER_MODULE = re.compile(r"model\.layers\.\d+\..+")


class UnlistedModule(dict):
    """`layer_config` of a decoder-layer Linear that config.json lists nowhere.

    The official loader keeps such a module dense, so a dense `weight` loads as DenseLinear; VPTQ
    tensors under that name mean the config lost the layer's entry, and loading fails naming it."""

    def __init__(self, module_name: str):
        super().__init__(module=module_name)
        self.module_name = module_name


def _quantization_config(hf_config: Mapping[str, Any]) -> Mapping[str, Any]:
    qc = hf_config.get("quantization_config")
    if not isinstance(qc, Mapping):
        raise CheckpointError(f"config.json quantization_config must be an object, got {type(qc).__name__}")
    for key in ("config_for_layers", "shared_layer_config"):
        if not isinstance(qc.get(key) or {}, Mapping):
            raise CheckpointError(f"config.json quantization_config.{key} must be an object mapping module "
                                  f"names to layer settings, got {type(qc[key]).__name__}")
    skip = qc.get("modules_to_not_convert")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(s, str) for s in skip)):
        raise CheckpointError(f"config.json quantization_config.modules_to_not_convert must be a list of "
                              f"module names, got {skip!r}")
    return qc


def _not_converted(module_name: str, patterns: list[str] | None) -> bool:
    """transformers' `modules_to_not_convert` rule: a pattern (a regex) matches from the start of the
    name up to a module boundary, or the name ends with it."""
    for pattern in patterns or ():
        if module_name.endswith(pattern):
            return True
        try:
            if re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", module_name):
                return True
        except re.error:
            continue
    return False


@functools.cache
def _triton_module():
    """lowbit.kernels.vptq_triton, or None without triton."""
    try:
        mod = importlib.import_module("lowbit.kernels.vptq_triton")
    except ModuleNotFoundError as e:
        if e.name == "triton":
            return None
        raise
    return mod if mod.triton is not None else None


@register("vptq")
class VPTQLinear(QuantLinear):
    def __init__(self, params: VPTQParams, indices: torch.Tensor, centroids: torch.Tensor,
                 res_centroids: torch.Tensor | None = None, outlier_centroids: torch.Tensor | None = None,
                 outlier_indices: torch.Tensor | None = None, perm: torch.Tensor | None = None,
                 weight_scale: torch.Tensor | None = None, weight_bias: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, checkpoint_packed: bool = True):
        super().__init__(params.in_features, params.out_features)
        # The buffers always hold packed indices, whatever form the checkpoint had.
        self.params = dataclasses.replace(params, is_indice_packed=True, indices_as_float=False,
                                          bias=bias is not None)
        self.checkpoint_packed = bool(checkpoint_packed)
        buffers = {"indices": indices, "centroids": centroids, "res_centroids": res_centroids,
                   "outlier_centroids": outlier_centroids, "outlier_indices": outlier_indices, "perm": perm,
                   "weight_scale": weight_scale, "weight_bias": weight_bias, "bias": bias}
        for name, t in buffers.items():  # contiguous: the kernels index them as flat arrays
            self.register_buffer(name, None if t is None else t.contiguous())
        # Derived views, rebuilt after the buffers move: plain attributes, never storage. The dense W
        # is decoded only by the reference (CPU) path.
        self._weight: torch.Tensor | None = None
        self._layout = None

    # ----- config.json ---------------------------------------------------------------------------

    @classmethod
    def matches(cls, hf_config: Mapping[str, Any]) -> bool:
        qc = hf_config.get("quantization_config")
        return isinstance(qc, Mapping) and str(qc.get("quant_method", "")).lower() == "vptq"

    @classmethod
    def layer_config(cls, hf_config: Mapping[str, Any], module_name: str) -> Mapping[str, Any] | None:
        qc = _quantization_config(hf_config)
        if _not_converted(module_name, qc.get("modules_to_not_convert")):
            return None
        entry = (qc.get("config_for_layers") or {}).get(module_name)
        if entry is None:
            entry = (qc.get("shared_layer_config") or {}).get(module_name.rsplit(".", 1)[-1])
        if entry is not None:
            return entry
        return UnlistedModule(module_name) if _DECODER_MODULE.fullmatch(module_name) else None

    # ----- loading -------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, config, tensors: LayerTensors, in_features: int, out_features: int):
        n, m = int(in_features), int(out_features)
        where = tensors.prefix or "VPTQ layer"
        if isinstance(config, UnlistedModule):
            return _unlisted(config, tensors, n, m)
        if config is None:
            raise CheckpointError(f"{where}: a VPTQ layer needs its quantization_config.config_for_layers entry")
        try:
            p = VPTQParams.from_layer_config(config, n, m)
        except ValueError as e:
            raise CheckpointError(f"{where}: bad VPTQ layer config (config_for_layers entry): {e}") from None

        indices, packed = _take_indices(p, tensors)
        shapes = p.tensor_shapes(packed)
        centroids = tensors.take("centroids.weight", shapes["centroids.weight"], _FLOAT)
        res_centroids = outlier_centroids = outlier_indices = perm = scale = shift = None
        if p.has_residual:
            res_centroids = tensors.take("res_centroids.weight", shapes["res_centroids.weight"], _FLOAT)
        if p.has_outliers:
            outlier_centroids = tensors.take("outlier_centroids.weight", shapes["outlier_centroids.weight"], _FLOAT)
            stored = tensors.take("outlier_indices", shapes["outlier_indices"], _index_dtypes(p))
            _check_range(tensors, "outlier_indices", as_unsigned(stored), p.outlier_centroids, "num_centroids[0]")
            outlier_indices = stored.view(torch.int16) if stored.dtype == torch.float16 else stored
        if p.enable_perm:
            perm = _take_perm(tensors, n)
        if p.enable_norm:
            scale = tensors.take("weight_scale", (n,), _FLOAT)
            shift = tensors.take("weight_bias", (n,), _FLOAT)
        bias = _take_bias(p, tensors, m)
        return cls(p, indices, centroids, res_centroids, outlier_centroids, outlier_indices, perm, scale, shift,
                   bias, checkpoint_packed=packed)

    # ----- compute -------------------------------------------------------------------------------

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The buffers under their checkpoint names (what the reference reads)."""
        names = {"indices": "indices", "centroids": "centroids.weight", "res_centroids": "res_centroids.weight",
                 "outlier_centroids": "outlier_centroids.weight", "outlier_indices": "outlier_indices",
                 "perm": "perm", "weight_scale": "weight_scale", "weight_bias": "weight_bias", "bias": "bias"}
        return {ckpt: getattr(self, buf) for buf, ckpt in names.items() if getattr(self, buf) is not None}

    def kernel_layout(self):
        """The buffers as lowbit.kernels.vptq_triton.VptqPacked (views; float16 copies of codebooks and
        norms only for checkpoints that store another float type)."""
        if self._layout is None or self._layout.indices.device != self.indices.device:
            from ..kernels.vptq_triton import VptqPacked

            p = self.params

            def half(t):
                return None if t is None else t.to(torch.float16)

            self._layout = VptqPacked(
                in_features=p.in_features, out_features=p.out_features, v=p.vector_len, k=p.num_centroids,
                k_r=p.num_res_centroids, group_num=p.group_num, group_size=p.group_size,
                outlier_size=p.outlier_size, v_o=p.outlier_vector_len, k_o=p.outlier_centroids,
                indices=self.indices.view(p.group_num * p.n_vectors, p.packed_words),
                centroids=half(self.centroids), res_centroids=half(self.res_centroids),
                outlier_centroids=None if self.outlier_centroids is None else half(self.outlier_centroids).view(-1),
                outlier_indices=(None if self.outlier_indices is None
                                 else self.outlier_indices.view(p.n_outlier_vectors, p.outlier_size)),
                perm=self.perm, weight_scale=half(self.weight_scale), weight_bias=half(self.weight_bias),
            )
        return self._layout

    def _apply(self, fn, recurse=True):
        self._weight = None  # buffers move or change: derive again from them
        self._layout = None
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        return vptq_dequantize_reference(self.params, self.checkpoint_tensors())

    def _cached_weight(self, device: torch.device) -> torch.Tensor:
        if self._weight is None or self._weight.device != device:
            self._weight = self.dequantize().to(device)
        return self._weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            kernels = _triton_module()
            if kernels is not None:
                return kernels.vptq_matmul(x, self.kernel_layout(), self.bias)
        return vptq_forward_reference(x, self.params, self.checkpoint_tensors(), self._cached_weight(x.device))

    def describe(self) -> dict[str, Any]:
        p = self.params
        d = {"v": p.vector_len, "k": p.num_centroids, "k_res": p.num_res_centroids, "index_bits": p.field_bits,
             "groups": p.group_num, "group_size": p.group_size, "outliers": p.outlier_size}
        if p.has_outliers:
            d |= {"outlier_v": p.outlier_vector_len, "outlier_k": p.outlier_centroids}
        return d | {"norm": p.enable_norm, "perm": p.enable_perm, "bias": p.bias,
                    "indices": "packed" if self.checkpoint_packed else "unpacked (packed at load)"}


# ----- loading helpers ---------------------------------------------------------------------------


def _unlisted(config: UnlistedModule, tensors: LayerTensors, n: int, m: int) -> DenseLinear:
    names = tensors.names()
    if "weight" in names and set(names) <= {"weight", "bias"}:
        return DenseLinear.from_checkpoint(None, tensors, n, m)
    short = config.module_name.rsplit(".", 1)[-1]
    raise CheckpointError(
        f"{config.module_name}: config.json quantization_config.config_for_layers has no entry for this "
        f"module (and shared_layer_config none for {short!r}), but the checkpoint stores it as VPTQ tensors "
        f"({', '.join(names)}); its entry (vector_lens, num_centroids, group_size, ...) is needed to read them")


def _index_dtypes(p: VPTQParams) -> tuple[torch.dtype, ...]:
    """Dtypes of unpacked 16-bit indices: int16, or float16 bit patterns under indices_as_float."""
    return (torch.int16, torch.float16) if p.indices_as_float else (torch.int16,)


def _check_range(tensors: LayerTensors, name: str, values: torch.Tensor, size: int, key: str) -> None:
    if values.numel() and int(values.max()) >= size:
        bad = int(values.max())
        raise CheckpointError(f"tensor {tensors.where(name)} holds index {bad}, outside the codebook of "
                              f"{key} = {size} entries")


def _take_indices(p: VPTQParams, tensors: LayerTensors) -> tuple[torch.Tensor, bool]:
    """(packed int32 indices [group_num, N, P], whether the checkpoint stored them packed)."""
    stored = tensors.take("indices", dtype=(torch.int32, *_index_dtypes(p)))
    packed = p.is_indice_packed if p.is_indice_packed is not None else stored.dtype == torch.int32
    want = p.tensor_shapes(packed)["indices"]
    if packed:
        if stored.dtype != torch.int32:
            raise CheckpointError(f"tensor {tensors.where('indices')} has dtype {str(stored.dtype)[6:]}, expected "
                                  f"int32 (is_indice_packed is true)")
        if tuple(stored.shape) != want:
            raise CheckpointError(
                f"tensor {tensors.where('indices')} has shape {list(stored.shape)}, expected [group_num, "
                f"ceil(out_features/v), ceil(group_size*bits/32)] = {list(want)}: {p.group_size} packed "
                f"fields of {p.field_bits} bits (log2 {p.num_centroids}"
                + (f" + log2 {p.num_res_centroids}" if p.has_residual else "") + ") per row")
        return stored, True
    if stored.dtype == torch.int32:
        raise CheckpointError(f"tensor {tensors.where('indices')} has dtype int32, expected "
                              f"{' or '.join(str(d)[6:] for d in _index_dtypes(p))} (is_indice_packed is false)")
    if tuple(stored.shape) != want:
        raise CheckpointError(f"tensor {tensors.where('indices')} has shape {list(stored.shape)}, expected "
                              f"[group_num, ceil(out_features/v), group_size] = {list(want)} (unpacked indices)")
    main = as_unsigned(stored)
    _check_range(tensors, "indices", main, p.num_centroids, "num_centroids[1]")
    res = None
    if p.has_residual:
        res = as_unsigned(tensors.take("res_indices", want, _index_dtypes(p)))
        _check_range(tensors, "res_indices", res, p.num_res_centroids, "num_res_centroids[1]")
    return pack_indices_reference(main, p.index_bits, res, p.res_index_bits), False


def _take_perm(tensors: LayerTensors, n: int) -> torch.Tensor:
    stored = tensors.take("perm", (n,), (torch.int16, torch.int32, torch.int64))
    values = as_unsigned(stored)
    if not torch.equal(torch.sort(values).values, torch.arange(n, device=values.device)):
        raise CheckpointError(f"tensor {tensors.where('perm')} is not a permutation of 0..{n - 1} "
                              f"(read as unsigned {str(stored.dtype)[6:]})")
    return values.to(torch.int32)


def _take_bias(p: VPTQParams, tensors: LayerTensors, m: int) -> torch.Tensor | None:
    if p.bias is True and "bias" not in tensors:
        raise CheckpointError(f"missing tensor {tensors.where('bias')} (the layer config says bias: true)")
    if p.bias is False and "bias" in tensors:
        raise CheckpointError(f"unexpected tensor {tensors.where('bias')}: the layer config says bias: false")
    return tensors.take("bias", (m,), _FLOAT, optional=True)
