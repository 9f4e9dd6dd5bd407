"""Uniform low-bit Linears: GPTQ and AWQ checkpoints, GGUF Q4_0/Q4_1/Q8_0 tensors, one UniformLinear.

TesseraQ, GPTQ, AWQ, OmniQuant and llama.cpp's simple quants all store W = scale · (q − zero) with
group scales; ../shared/specs/uniform.md and lowbit/kernels/uniform.py give each layout. Every layer
is repacked once at load into `UniformPacked` (lowbit/kernels/uniform_triton.py; the byte-level
converters of lowbit/kernels/uniform.py give the same tensors as its repack_* functions, faster),
which the fused Triton kernels read on CUDA; on CPU the decoded weight is cached per device and dtype (a plain
attribute, so `storage_bytes` and `bits_per_weight` count only the compressed buffers).

Formats, registered separately because each reads its own config and tensors:
* "gptq": `quantization_config.quant_method == "gptq"`; bits 2/3/4/8, any group size dividing
  in_features (−1: per channel), sym or asym, act-order `g_idx`. Zero convention (the v1/v2 rule):
  `checkpoint_format` "gptq_v2" (GPTQModel's own format) stores the zero itself; "gptq" or no key at
  all (AutoGPTQ, transformers/optimum, GPTQModel's default export) is v1 and stores zero − 1.
  GPTQModel's `format` key is read as a synonym; marlin / bitblas / qqq layouts and packing in words
  other than int32 (`pack_dtype`) are refused with the reason. Modules stay dense when
  `modules_to_not_convert` names them, when `modules_in_block_to_quantize` leaves them out, when a
  GPTQModel `dynamic` rule "-:regex" matches them, and lm_head unless `lm_head: true`; a positive
  `dynamic` rule overrides bits / group_size / sym / desc_act for the modules it matches.
* "awq": `quant_method == "awq"`, `version` "gemm" (AutoAWQ's GEMM layout, 4 bits).
* "gguf": chosen per tensor by GGUFCheckpoint for Q4_0 / Q4_1 / Q8_0 projection weights; the config
  block is {"type": "Q4_1"} and the tensor "weight" is the raw blocks, uint8 [out, row bytes].
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..kernels.uniform import (
    GGUF_BITS,
    GGUF_BLOCK,
    GPTQ_BITS,
    awq_to_packed,
    gguf_row_bytes,
    gguf_to_packed,
    gptq_to_packed,
    packed_dense_weight,
    uniform_forward_reference,
)
from ..kernels.uniform_frag_triton import (
    UniformFrag,
    _repack,
    frag_dequantize_t_reference,
    frag_linear,
    frag_supported,
    tiles_a_step,
)
from ..kernels.uniform_triton import UniformPacked, unpermute_inputs
from .linear import CheckpointError, LayerTensors, QuantLinear, register

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
_INDEX = (torch.int32, torch.int64)
_LAYER_MODULE = re.compile(r"model\.layers\.\d+\.(.+)")
_GPTQ_LAYOUTS = ("gptq", "gptq_v2")
_PACKED_BUFFERS = ("qweight", "qweight_hi", "scales", "zeros", "perm")
_FRAGMENT_BUFFERS = ("frag_codes", "frag_sz")


def _quant_config(hf_config: Mapping[str, Any]) -> Mapping[str, Any]:
    qc = hf_config.get("quantization_config")
    if not isinstance(qc, Mapping):
        raise CheckpointError(f"config.json quantization_config must be an object, got {type(qc).__name__}")
    return qc


def _int(config: Mapping[str, Any], key: str, where: str, default=None, synonyms: tuple[str, ...] = ()) -> int:
    for k in (key, *synonyms):
        if k in config and config[k] is not None:
            try:
                return int(config[k])
            except (TypeError, ValueError):
                raise CheckpointError(f"{where}: quantization_config.{k} must be an integer, got {config[k]!r}") from None
    if default is None:
        raise CheckpointError(f"{where}: quantization_config lacks {key!r}")
    return default


def _group_size(config: Mapping[str, Any], in_features: int, where: str, synonyms=()) -> int:
    gs = _int(config, "group_size", where, default=-1, synonyms=synonyms)
    if gs in (-1, 0):
        return in_features  # per output channel: one group spanning the whole input
    if gs < 0 or in_features % gs:
        raise CheckpointError(
            f"{where}: group_size {gs} does not divide in_features {in_features} (lowbit needs whole groups)")
    return gs


def _scales_fp16(t: torch.Tensor, name: str) -> torch.Tensor:
    """Scales as fp16 (what UniformPacked keeps); refused if that would change a value."""
    if t.dtype == torch.float16:
        return t
    h = t.to(torch.float16)
    if not torch.equal(h.to(t.dtype), t):
        raise CheckpointError(
            f"tensor {name} ({str(t.dtype).replace('torch.', '')}) holds values that float16 cannot represent "
            "exactly; lowbit keeps group scales in float16")
    return h


def _module_is_excluded(module_name: str, qc: Mapping[str, Any]) -> bool:
    """transformers' `modules_to_not_convert` (substring match, as transformers applies it)."""
    skip = qc.get("modules_to_not_convert") or ()
    return any(s and s in module_name for s in skip)


@functools.cache
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def _dynamic_overrides(module_name: str, dynamic: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """GPTQModel's per-module `dynamic` rules: "-:regex" keeps matches dense (returns None), "+:regex"
    or a bare regex overrides config keys for the first match. Negative rules are tried first."""
    if not dynamic:
        return {}
    if not isinstance(dynamic, Mapping):
        raise CheckpointError("config.json quantization_config.dynamic must be an object of regex -> overrides")
    rules = sorted(dynamic.items(), key=lambda kv: not kv[0].startswith("-:"))
    for pattern, overrides in rules:
        try:
            if pattern.startswith("-:"):
                if _compiled(pattern[2:]).match(module_name):
                    return None
            elif _compiled(pattern.removeprefix("+:")).match(module_name):
                return dict(overrides or {})
        except re.error as e:
            raise CheckpointError(f"config.json quantization_config.dynamic has a bad regex {pattern!r}: {e}") from None
    return {}


class UniformLinear(QuantLinear):
    """y = x @ W.T (+ bias) with W = scale · (q − zero) per group, held as a `UniformPacked`.

    Buffers (all the layer stores): `qweight` (and `qweight_hi` at 3 bits), `scales`, `zeros`,
    `perm` (act-order only) and `bias`, laid out as UniformPacked documents; or, after
    `use_fragment_layout`, `frag_codes` and `frag_sz` (UniformFrag) in place of the first four."""

    quant_method = ""  # config.json's quantization_config.quant_method that selects the subclass

    @classmethod
    def matches(cls, hf_config: Mapping[str, Any]) -> bool:
        qc = hf_config.get("quantization_config")
        return (bool(cls.quant_method) and isinstance(qc, Mapping)
                and str(qc.get("quant_method", "")).lower() == cls.quant_method)

    def __init__(self, packed: UniformPacked, bias: torch.Tensor | None, info: Mapping[str, Any]):
        super().__init__(packed.in_features, packed.out_features)
        self.bits = packed.bits
        self.group_size = packed.group_size
        self.zero_is_min = packed.zero_is_min
        for name in _PACKED_BUFFERS:
            self.register_buffer(name, getattr(packed, name))
        self.register_buffer("bias", bias)
        for name in _FRAGMENT_BUFFERS:  # filled by use_fragment_layout, which empties qweight..zeros
            self.register_buffer(name, None)
        self.info = dict(info)
        # (device, dtype, decoded W) of the CPU path: an attribute, never storage or state.
        self._dense: tuple[torch.device, torch.dtype, torch.Tensor] | None = None

    @property
    def packed(self) -> UniformPacked:
        if self.qweight is None:
            raise RuntimeError("this layer is kept in the int4 fragment layout (use_fragment_layout): no packed codes")
        return UniformPacked(bits=self.bits, group_size=self.group_size, in_features=self.in_features,
                             out_features=self.out_features, qweight=self.qweight, qweight_hi=self.qweight_hi,
                             scales=self.scales, zeros=self.zeros, zero_is_min=self.zero_is_min, perm=self.perm)

    def _apply(self, fn, recurse=True):
        self._dense = None  # buffers moved or changed: decode again from them
        return super()._apply(fn, recurse)

    @property
    def fragment(self) -> UniformFrag | None:
        """The layer in the int4 tensor-core kernel's order, where `use_fragment_layout` put it."""
        if self.frag_codes is None:
            return None
        return UniformFrag(self.in_features, self.out_features, self.group_size, tiles_a_step(self.group_size),
                           self.frag_codes, self.frag_sz, self.perm)

    @torch.no_grad()
    def use_fragment_layout(self) -> bool:
        """Keep the layer only in the fragment order of `uniform_frag_triton` (int4 with integer
        zeros): the tensor-core kernel reads it at 1–64 fp16 rows (1.2–2.6x the CUDA-core kernels,
        RESULTS.md), larger batches decode Wᵀ from it for cuBLAS. It replaces the packed codes, so
        the layer holds no more bytes than before. False (nothing changed) where it cannot."""
        if self.frag_codes is not None:
            return True
        p = self.packed
        if frag_supported(p):
            return False
        fp = _repack(p)  # checked just above (a device sync), not again in repack_frag
        for name in ("qweight", "qweight_hi", "scales", "zeros"):
            setattr(self, name, None)
        self.frag_codes, self.frag_sz = fp.codes, fp.sz
        self._dense = None
        return True

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        fp = self.fragment
        if fp is None:
            return packed_dense_weight(self.packed)
        wt = frag_dequantize_t_reference(fp, torch.float32)  # inputs in packed (act-order) order
        return unpermute_inputs(wt.T, fp.perm).contiguous()

    def _cached_dense(self, x: torch.Tensor) -> torch.Tensor:
        d = self._dense
        if d is None or d[0] != x.device or d[1] != x.dtype:
            w = self.dequantize().to(device=x.device, dtype=x.dtype)
            self._dense = d = (x.device, x.dtype, w)
        return d[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.frag_codes is not None:
            return frag_linear(x, self.fragment, self.bias)
        if x.is_cuda:
            from ..kernels.uniform_triton import uniform_matmul

            return uniform_matmul(x, self.packed, self.bias)
        return uniform_forward_reference(x, self._cached_dense(x), self.bias)

    def describe(self) -> dict[str, Any]:
        return dict(self.info)


def use_fragment_layouts(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Put every int4 layer of a CUDA fp16 model that can take it in the tensor-core kernel's
    fragment layout (`UniformLinear.use_fragment_layout`), unless LOWBIT_UNIFORM_FRAG=0; the number
    of layers moved. CPU models keep the packed layout (their path decodes W once, either way)."""
    if dtype != torch.float16 or os.environ.get("LOWBIT_UNIFORM_FRAG", "1") == "0":
        return 0
    layers = [m for m in model.modules() if isinstance(m, UniformLinear)]
    return sum(m.use_fragment_layout() for m in layers if m.qweight is None or m.qweight.is_cuda)


@register("gptq")
class GPTQLinear(UniformLinear):
    quant_method = "gptq"

    @classmethod
    def layer_config(cls, hf_config: Mapping[str, Any], module_name: str) -> Mapping[str, Any] | None:
        qc = _quant_config(hf_config)
        if module_name == "lm_head":
            if not qc.get("lm_head"):
                return None
        else:
            match = _LAYER_MODULE.fullmatch(module_name)
            if match is None:
                return None
            in_block = qc.get("modules_in_block_to_quantize")
            if in_block:
                listed = {m for group in in_block for m in ([group] if isinstance(group, str) else group)}
                if match.group(1) not in listed:
                    return None
        if _module_is_excluded(module_name, qc):
            return None
        overrides = _dynamic_overrides(module_name, qc.get("dynamic"))
        if overrides is None:
            return None
        block = {k: v for k, v in qc.items() if k != "dynamic"}
        block.update(overrides)
        return block

    @classmethod
    def from_checkpoint(cls, config, tensors: LayerTensors, in_features: int, out_features: int):
        n, m = int(in_features), int(out_features)
        where = tensors.prefix or "GPTQ layer"
        if not isinstance(config, Mapping):
            raise CheckpointError(f"{where}: a GPTQ layer needs the quantization_config block, got {config!r}")
        bits = _int(config, "bits", where)
        if bits not in GPTQ_BITS:
            raise CheckpointError(f"{where}: GPTQ bits = {bits} is not supported; lowbit serves 2, 3, 4 and 8 bits")
        layout = config.get("checkpoint_format") or config.get("format") or "gptq"
        if config.get("is_marlin_format"):
            layout = "marlin"
        layout = str(layout).lower()
        if layout not in _GPTQ_LAYOUTS:
            raise CheckpointError(
                f"{where}: GPTQ checkpoint_format {layout!r} is not supported; lowbit reads the gptq (v1) and "
                "gptq_v2 layouts (re-save the model in one of them)")
        pack_dtype = str(config.get("pack_dtype") or "int32").replace("torch.", "")
        if pack_dtype != "int32":
            raise CheckpointError(f"{where}: GPTQ pack_dtype {pack_dtype!r} is not supported; lowbit reads int32 words")
        gs = _group_size(config, n, where)
        for side, size in (("in_features", n), ("out_features", m)):
            if size * bits % 32:
                raise CheckpointError(
                    f"{where}: {side} = {size} is not a whole number of 32-bit words at {bits} bits "
                    f"(GPTQ packs 32 values per {bits} words)")
        groups = n // gs
        qweight = tensors.take("qweight", (n * bits // 32, m), torch.int32)
        scales = tensors.take("scales", (None, m), _FLOAT)
        if scales.shape[0] != groups:
            raise CheckpointError(
                f"tensor {tensors.where('scales')} has {scales.shape[0]} groups, expected in_features / group_size "
                f"= {n} / {gs} = {groups}")
        qzeros = tensors.take("qzeros", dtype=torch.int32)
        want_z = (groups, m * bits // 32)
        if tuple(qzeros.shape) != want_z:
            raise CheckpointError(
                f"tensor {tensors.where('qzeros')} has shape {list(qzeros.shape)}, expected [groups, out_features * "
                f"bits / 32] = {list(want_z)} (scales: {list(scales.shape)})")
        g_idx = tensors.take("g_idx", dtype=_INDEX, optional=True)
        if g_idx is not None:
            _check_g_idx(g_idx, n, gs, tensors.where("g_idx"))
        bias = tensors.take("bias", (m,), _FLOAT, optional=True)
        packed = gptq_to_packed(qweight, qzeros, _scales_fp16(scales, tensors.where("scales")), g_idx, bits, gs,
                             checkpoint_format=layout)
        info = {"bits": bits, "group_size": gs if gs != n else -1, "sym": bool(config.get("sym", True)),
                "act_order": packed.perm is not None, "checkpoint_format": layout}
        return cls(packed, bias, info)


def _check_g_idx(g_idx: torch.Tensor, n: int, group_size: int, name: str) -> None:
    """GPTQ g_idx: one group per input, every group exactly group_size inputs (GPTQ always writes
    that, act-order or not; the kernels rely on it)."""
    groups = n // group_size
    if tuple(g_idx.shape) != (n,):
        raise CheckpointError(f"tensor {name} has shape {list(g_idx.shape)}, expected [{n}] (one group per input)")
    g = g_idx.to(torch.int64)
    lo, hi = int(g.min()), int(g.max())
    if lo < 0 or hi >= groups:
        raise CheckpointError(f"tensor {name} holds group {lo if lo < 0 else hi}, outside 0 … {groups - 1}")
    counts = torch.bincount(g, minlength=groups)
    if not bool((counts == group_size).all()):
        bad = int(torch.nonzero(counts != group_size)[0])
        raise CheckpointError(
            f"tensor {name} puts {int(counts[bad])} inputs in group {bad}, expected group_size = {group_size} each")


@register("awq")
class AWQLinear(UniformLinear):
    quant_method = "awq"

    @classmethod
    def layer_config(cls, hf_config: Mapping[str, Any], module_name: str) -> Mapping[str, Any] | None:
        qc = _quant_config(hf_config)
        if _LAYER_MODULE.fullmatch(module_name) is None or _module_is_excluded(module_name, qc):
            return None  # AutoAWQ quantizes the decoder layers' Linears only
        return qc

    @classmethod
    def from_checkpoint(cls, config, tensors: LayerTensors, in_features: int, out_features: int):
        n, m = int(in_features), int(out_features)
        where = tensors.prefix or "AWQ layer"
        if not isinstance(config, Mapping):
            raise CheckpointError(f"{where}: an AWQ layer needs the quantization_config block, got {config!r}")
        bits = _int(config, "bits", where, default=4, synonyms=("w_bit",))
        if bits != 4:
            raise CheckpointError(f"{where}: AWQ bits = {bits} is not supported; AWQ's GEMM layout is 4-bit")
        version = str(config.get("version") or "gemm").lower()
        if version != "gemm":
            raise CheckpointError(
                f"{where}: AWQ version {version!r} is not supported; lowbit reads AutoAWQ's GEMM layout")
        gs = _group_size(config, n, where, synonyms=("q_group_size",))
        if m % 8:
            raise CheckpointError(f"{where}: out_features = {m} is not a multiple of 8 (8 AWQ values per word)")
        groups = n // gs
        qweight = tensors.take("qweight", (n, m // 8), torch.int32)
        scales = tensors.take("scales", (None, m), _FLOAT)
        if scales.shape[0] != groups:
            raise CheckpointError(
                f"tensor {tensors.where('scales')} has {scales.shape[0]} groups, expected in_features / group_size "
                f"= {n} / {gs} = {groups}")
        qzeros = tensors.take("qzeros", dtype=torch.int32)
        if tuple(qzeros.shape) != (groups, m // 8):
            raise CheckpointError(
                f"tensor {tensors.where('qzeros')} has shape {list(qzeros.shape)}, expected [groups, out_features / 8]"
                f" = {[groups, m // 8]} (scales: {list(scales.shape)})")
        bias = tensors.take("bias", (m,), _FLOAT, optional=True)
        packed = awq_to_packed(qweight, qzeros, _scales_fp16(scales, tensors.where("scales")), gs)
        return cls(packed, bias, {"bits": 4, "group_size": gs if gs != n else -1, "version": "gemm"})


@register("gguf")
class GGUFLinear(UniformLinear):
    """A GGUF Q4_0 / Q4_1 / Q8_0 weight kept at its bit width. In memory that is 5, 5 and 9 bits per
    weight: codes plus an fp16 scale and an fp16 zero (Q4_1: its min) per block of 32; UniformPacked
    keeps the zero even where the format's is a constant (8, 128), half a bit over the file."""

    @classmethod
    def from_checkpoint(cls, config, tensors: LayerTensors, in_features: int, out_features: int):
        n, m = int(in_features), int(out_features)
        where = tensors.prefix or "GGUF layer"
        kind = config.get("type") if isinstance(config, Mapping) else None
        if kind not in GGUF_BITS:
            raise CheckpointError(
                f"{where}: GGUF type {kind!r} has no native path; lowbit keeps {', '.join(GGUF_BITS)} at their bit "
                "width (other types are dequantized by the GGUF reader)")
        if n % GGUF_BLOCK:
            raise CheckpointError(f"{where}: in_features = {n} is not a whole number of {GGUF_BLOCK}-weight blocks")
        bits = GGUF_BITS[kind]
        if m % (32 // bits):
            raise CheckpointError(f"{where}: out_features = {m} must be a multiple of {32 // bits} for {kind}")
        data = tensors.take("weight", (m, gguf_row_bytes(kind, n)), torch.uint8)
        bias = tensors.take("bias", (m,), _FLOAT, optional=True)
        packed = gguf_to_packed(data, kind)
        return cls(packed, bias, {"type": kind, "bits": bits, "group_size": GGUF_BLOCK})
