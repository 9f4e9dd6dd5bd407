"""VPTQ in plain PyTorch: the published checkpoint layout decoded step by step.

This is the oracle for the Triton lookup kernels (vptq_triton.py) and the CPU path of VPTQLinear. It
reads a layer's tensors exactly as the VPTQ authors' checkpoints store them (names, shapes, dtypes;
../shared/specs/vptq.md) and shares no code with the kernels' packer, so the two check each other.

Layout in one paragraph (m = out_features, n = in_features): vectors of v weights run down the output
dimension. For codebook group g, vector row r and group column j, rows r*v .. r*v+v-1 of column
g*group_size + j hold centroids[g][index] (+ res_centroids[g][res_index]); padding rows past m are
dropped. Packed indices are one little-endian bitstream per [g, r] row of int32 words, field j at bit
j*(log2 k + log2 k_r), main index in its low bits. Optional outlier columns (own codebook, vector
length v_o) come first; then W = W[:, argsort(perm)] and W = W * weight_scale + weight_bias.

Also here: `random_vptq_layer`, random but valid layers in that exact layout (tests, benchmarks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

# Keys of a `config_for_layers` entry: the official layer's constructor arguments it records, plus
# `vector_quant_dim` (a constructor argument whose only implemented value is "out").
LAYER_CONFIG_KEYS = (
    "in_features", "out_features", "vector_lens", "num_centroids", "num_res_centroids", "group_num",
    "group_size", "outlier_size", "indices_as_float", "enable_norm", "enable_perm", "is_indice_packed",
    "bias", "vector_quant_dim",
)
_REQUIRED_KEYS = ("vector_lens", "num_centroids", "group_num", "group_size", "outlier_size")


def _pair(cfg: Mapping[str, Any], key: str, default=None) -> tuple[int, int]:
    value = cfg.get(key, default)
    if (not isinstance(value, list | tuple) or len(value) != 2
            or not all(isinstance(e, int) and not isinstance(e, bool) for e in value)):
        raise ValueError(f"{key} must be a list of two integers [outlier, main], got {value!r}")
    return int(value[0]), int(value[1])


def _int(cfg: Mapping[str, Any], key: str) -> int:
    value = cfg[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return value


def _flag(cfg: Mapping[str, Any], key: str, default: bool | None) -> bool | None:
    value = cfg.get(key, default)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _log2(size: int, what: str) -> int:
    bits = size.bit_length() - 1
    if size < 2 or 1 << bits != size:
        raise ValueError(f"{what} must be a power of two >= 2, got {size}")
    return bits


@dataclass(frozen=True)
class VPTQParams:
    """One layer's settings, parsed and checked from its `config_for_layers` entry."""

    in_features: int
    out_features: int
    vector_len: int  # v
    num_centroids: int  # k
    num_res_centroids: int  # k_r; 0: no residual codebook
    group_num: int
    group_size: int
    outlier_size: int  # leading input columns in the outlier block (0 when outliers are off)
    outlier_vector_len: int  # v_o; 0 when outliers are off
    outlier_centroids: int  # k_o; 0 when outliers are off
    enable_norm: bool
    enable_perm: bool
    is_indice_packed: bool | None  # None: the config does not say (the indices' dtype decides)
    indices_as_float: bool  # legacy: unpacked indices stored as float16 bit patterns
    bias: bool | None  # None: the config does not say

    @classmethod
    def from_layer_config(cls, cfg: Mapping[str, Any], in_features: int, out_features: int) -> VPTQParams:
        """Parse a `config_for_layers` entry; ValueError says which key is wrong and why."""
        if not isinstance(cfg, Mapping):
            raise ValueError(f"a layer config must be an object, got {type(cfg).__name__}")
        unknown = sorted(set(cfg) - set(LAYER_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(LAYER_CONFIG_KEYS)}")
        missing = [k for k in _REQUIRED_KEYS if k not in cfg]
        if missing:
            raise ValueError(f"missing option(s) {', '.join(map(repr, missing))}")
        m, n = int(out_features), int(in_features)
        for key, have in (("in_features", n), ("out_features", m)):
            if key in cfg and cfg[key] != have:
                raise ValueError(f"{key} is {cfg[key]!r} but the model's layer has {key} = {have}")
        if cfg.get("vector_quant_dim", "out") != "out":
            raise ValueError(f"vector_quant_dim {cfg['vector_quant_dim']!r} is not supported (only 'out', "
                             f"the only one the official layer implements)")
        v_o, v = _pair(cfg, "vector_lens")
        k_o, k = _pair(cfg, "num_centroids")
        kr_o, k_r = _pair(cfg, "num_res_centroids", [-1, -1])
        group_num, group_size, outlier_size = (_int(cfg, key) for key in ("group_num", "group_size", "outlier_size"))
        if v < 1:
            raise ValueError(f"vector_lens[1] (vector length) must be >= 1, got {v}")
        index_bits = _log2(k, "num_centroids[1]")
        res_bits = _log2(k_r, "num_res_centroids[1]") if k_r > 0 else 0
        if index_bits + res_bits > 32:
            raise ValueError(f"an index field of {index_bits} + {res_bits} bits does not fit one 32-bit word")
        outliers = v_o > 1 and k_o > 0  # the official layer's rule
        if outliers and kr_o > 0:
            raise ValueError("num_res_centroids[0] > 0: a residual codebook for outliers is not part of the format")
        if outliers and k_o > 1 << 16:
            raise ValueError(f"num_centroids[0] = {k_o}: outlier indices are 16-bit, so at most 65536 centroids")
        if group_num < 1 or group_size < 1 or outlier_size < 0:
            raise ValueError(f"need group_num >= 1, group_size >= 1 and outlier_size >= 0, got "
                             f"{group_num}, {group_size}, {outlier_size}")
        if outlier_size and not outliers:
            raise ValueError(f"outlier_size is {outlier_size} but vector_lens[0] = {v_o} and num_centroids[0] = "
                             f"{k_o} turn outliers off (they need a vector length > 1 and centroids > 0)")
        if group_num * group_size + outlier_size != n:
            raise ValueError(f"group_num * group_size + outlier_size = {group_num} * {group_size} + "
                             f"{outlier_size} must equal in_features = {n}")
        packed = _flag(cfg, "is_indice_packed", None)
        if packed is False and (index_bits > 16 or res_bits > 16):
            raise ValueError("unpacked indices are 16-bit, so at most 65536 centroids per codebook")
        return cls(
            in_features=n, out_features=m, vector_len=v, num_centroids=k, num_res_centroids=max(k_r, 0),
            group_num=group_num, group_size=group_size, outlier_size=outlier_size,
            outlier_vector_len=v_o if outliers else 0, outlier_centroids=k_o if outliers else 0,
            enable_norm=bool(_flag(cfg, "enable_norm", False)), enable_perm=bool(_flag(cfg, "enable_perm", False)),
            is_indice_packed=packed, indices_as_float=bool(_flag(cfg, "indices_as_float", False)),
            bias=_flag(cfg, "bias", None),
        )

    @property
    def has_residual(self) -> bool:
        return self.num_res_centroids > 0

    @property
    def has_outliers(self) -> bool:
        return self.outlier_centroids > 0

    @property
    def index_bits(self) -> int:
        return self.num_centroids.bit_length() - 1

    @property
    def res_index_bits(self) -> int:
        return self.num_res_centroids.bit_length() - 1 if self.has_residual else 0

    @property
    def field_bits(self) -> int:
        """Bits per packed index field: main index, then residual index."""
        return self.index_bits + self.res_index_bits

    @property
    def n_vectors(self) -> int:
        """Vectors per input column: ceil(out_features / v) (the last one padded)."""
        return -(-self.out_features // self.vector_len)

    @property
    def packed_words(self) -> int:
        """int32 words per packed [group, vector-row]: ceil(group_size * field_bits / 32)."""
        return -(-self.group_size * self.field_bits // 32)

    @property
    def n_outlier_vectors(self) -> int:
        return -(-self.out_features // self.outlier_vector_len) if self.has_outliers else 0

    def tensor_shapes(self, packed: bool) -> dict[str, tuple[int, ...]]:
        """Checkpoint tensor name -> shape for this layer (without `bias`)."""
        g, N = self.group_num, self.n_vectors
        shapes = {"centroids.weight": (g, self.num_centroids * self.vector_len),
                  "indices": (g, N, self.packed_words if packed else self.group_size)}
        if self.has_residual:
            shapes["res_centroids.weight"] = (g, self.num_res_centroids * self.vector_len)
            if not packed:
                shapes["res_indices"] = (g, N, self.group_size)
        if self.has_outliers:
            shapes["outlier_centroids.weight"] = (1, self.outlier_centroids * self.outlier_vector_len)
            shapes["outlier_indices"] = (1, self.n_outlier_vectors, self.outlier_size)
        if self.enable_perm:
            shapes["perm"] = (self.in_features,)
        if self.enable_norm:
            shapes["weight_scale"] = (self.in_features,)
            shapes["weight_bias"] = (self.in_features,)
        return shapes


# ----- integer codes ------------------------------------------------------------------------------


def as_unsigned(t: torch.Tensor) -> torch.Tensor:
    """int64 values of a stored integer tensor read as unsigned: int16 (and the legacy float16 bit
    patterns) as uint16, int32 as uint32; int64 as is."""
    if t.dtype == torch.float16:
        t = t.view(torch.int16)
    if t.dtype == torch.int16:
        return t.to(torch.int64) & 0xFFFF
    if t.dtype == torch.int32:
        return t.to(torch.int64) & 0xFFFFFFFF
    if t.dtype in (torch.int64, torch.uint8, torch.int8):
        return t.to(torch.int64)
    raise TypeError(f"not an integer code tensor: {t.dtype}")


def unpack_fields_reference(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int64 [..., count] fields of `bits` bits from int32 words [..., P]: one little-endian bitstream
    per row (stream bit b is bit b % 32 of word b // 32), field j starting at bit j * bits."""
    w = as_unsigned(words)
    w = torch.cat([w, torch.zeros_like(w[..., :1])], dim=-1)  # the word after the last, for straddles
    start = torch.arange(count, device=w.device) * bits
    word, shift = start >> 5, start & 31
    low = w[..., word] >> shift
    # bits of the next word, shifted above the `32 - shift` bits that came from this one
    high = torch.where(shift == 0, 0, w[..., word + 1] << ((32 - shift) & 31))
    return (low | high) & ((1 << bits) - 1)


def pack_indices_reference(indices: torch.Tensor, index_bits: int, res_indices: torch.Tensor | None = None,
                           res_bits: int = 0) -> torch.Tensor:
    """Pack [..., L] indices (and residual indices in the bits above them) into int32 [..., ceil(L*bits/32)]
    words exactly as the published checkpoints do: the inverse of `unpack_fields_reference`."""
    bits = index_bits + res_bits
    fields = indices.to(torch.int64)
    if res_bits:
        fields = fields | (res_indices.to(torch.int64) << index_bits)
    *lead, L = fields.shape
    words = -(-L * bits // 32)
    flat = fields.reshape(-1, L)
    out = torch.zeros(flat.shape[0], words + 1, dtype=torch.int64, device=fields.device)
    start = torch.arange(L, device=fields.device) * bits
    word, shift = start >> 5, start & 31
    # Each field touches its start word and maybe the next; fields never overlap, so summing the
    # pieces per word is a bitwise OR.
    out.index_add_(1, word, (flat << shift) & 0xFFFFFFFF)
    out.index_add_(1, word + 1, torch.where(shift == 0, 0, flat >> ((32 - shift) & 31)))
    out = out[:, :words]
    out = torch.where(out >= 1 << 31, out - (1 << 32), out)
    return out.to(torch.int32).reshape(*lead, words)


def decode_indices(p: VPTQParams, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(main, residual) int64 [group_num, N, group_size] from the stored `indices` (+ `res_indices`)."""
    idx = tensors["indices"]
    packed = p.is_indice_packed if p.is_indice_packed is not None else idx.dtype == torch.int32
    if packed:
        fields = unpack_fields_reference(idx, p.field_bits, p.group_size)
        main = fields & ((1 << p.index_bits) - 1)
        res = fields >> p.index_bits if p.has_residual else None
        return main, res
    main = as_unsigned(idx)
    res = as_unsigned(tensors["res_indices"]) if p.has_residual else None
    return main, res


# ----- dequantization -----------------------------------------------------------------------------


def _columns(codebook: torch.Tensor, vector_len: int, idx: torch.Tensor, rows: int) -> torch.Tensor:
    """float32 [rows, cols] block from one codebook [k * v] and its indices [N, cols] (vectors down rows)."""
    vectors = codebook.reshape(-1, vector_len).float()[idx]  # [N, cols, v]
    return vectors.permute(0, 2, 1).reshape(-1, idx.shape[1])[:rows]


def vptq_dequantize_reference(p: VPTQParams, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The effective weight W, float32 [out_features, in_features], y = x @ W.T (+ bias).

    `tensors` are named as in the checkpoint. Lookups, the residual sum and the norm run in float32
    (the official layer's arithmetic when its weights are float32), so W is exact up to that."""
    m = p.out_features
    main, res = decode_indices(p, tensors)
    centroids = tensors["centroids.weight"]
    blocks = []
    for g in range(p.group_num):
        block = _columns(centroids[g], p.vector_len, main[g], m)
        if res is not None:
            block = block + _columns(tensors["res_centroids.weight"][g], p.vector_len, res[g], m)
        blocks.append(block)
    if p.has_outliers:
        oidx = as_unsigned(tensors["outlier_indices"])[0]
        blocks.insert(0, _columns(tensors["outlier_centroids.weight"][0], p.outlier_vector_len, oidx, m))
    W = torch.cat(blocks, dim=1)
    if p.enable_perm:
        W = W[:, torch.argsort(as_unsigned(tensors["perm"]))]
    if p.enable_norm:
        W = W * tensors["weight_scale"].float()
        W = W + tensors["weight_bias"].float()
    return W


def vptq_forward_reference(x: torch.Tensor, p: VPTQParams, tensors: Mapping[str, torch.Tensor],
                           weight: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T (+ tensors["bias"]) in float32, returned in x's dtype; `weight` is W when the
    caller already decoded it (it is decoded here otherwise)."""
    W = vptq_dequantize_reference(p, tensors) if weight is None else weight
    y = x.reshape(-1, p.in_features).float() @ W.to(x.device).T
    bias = tensors.get("bias")
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], p.out_features)


# ----- random layers ------------------------------------------------------------------------------


def random_vptq_layer(
    in_features: int,
    out_features: int,
    *,
    vector_len: int = 8,
    num_centroids: int = 65536,
    num_res_centroids: int = 0,
    outliers: int = 0,
    outlier_vector_len: int = 8,
    outlier_centroids: int = 4096,
    groups: int = 1,
    perm: bool = False,
    norm: bool = False,
    bias: bool = False,
    packed: bool = True,
    std: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config_for_layers entry, tensors) of a random but valid layer in the published layout.

    Indices are uniform over their codebooks; fp16 codebooks give weights of about `std`
    (default 1/sqrt(in_features)); the residual codebook is a quarter of that. `outliers` leading
    input columns use their own codebook. Tensors live on the generator's device."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    device = g.device
    n, m, v = int(in_features), int(out_features), int(vector_len)
    std = std if std is not None else 1.0 / math.sqrt(n)
    k_r = num_res_centroids if num_res_centroids > 0 else -1
    if (n - outliers) % groups:
        raise ValueError(f"in_features - outliers = {n - outliers} does not split into {groups} groups")
    cfg = {
        "in_features": n, "out_features": m,
        "vector_lens": [outlier_vector_len if outliers else -1, v],
        "num_centroids": [outlier_centroids if outliers else -1, num_centroids],
        "num_res_centroids": [-1, k_r], "group_num": groups, "group_size": (n - outliers) // groups,
        "outlier_size": outliers, "indices_as_float": False, "enable_norm": norm, "enable_perm": perm,
        "is_indice_packed": packed, "bias": bias,
    }
    p = VPTQParams.from_layer_config(cfg, n, m)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).half()

    def randint(high, *shape):
        return torch.randint(0, high, shape, generator=g, device=device)

    shape = (p.group_num, p.n_vectors, p.group_size)
    idx = randint(p.num_centroids, *shape)
    res = randint(p.num_res_centroids, *shape) if p.has_residual else None
    t = {"centroids.weight": randn(p.group_num, p.num_centroids * v, scale=std)}
    if packed:
        t["indices"] = pack_indices_reference(idx, p.index_bits, res, p.res_index_bits)
    else:
        t["indices"] = idx.to(torch.int16)  # uint16 bit patterns, as published
        if res is not None:
            t["res_indices"] = res.to(torch.int16)
    if p.has_residual:
        t["res_centroids.weight"] = randn(p.group_num, p.num_res_centroids * v, scale=std / 4)
    if p.has_outliers:
        t["outlier_centroids.weight"] = randn(1, p.outlier_centroids * p.outlier_vector_len, scale=2 * std)
        t["outlier_indices"] = randint(p.outlier_centroids, 1, p.n_outlier_vectors, outliers).to(torch.int16)
    if perm:
        order = torch.randperm(n, generator=g, device=device)
        t["perm"] = order.to(torch.int16) if packed else order  # int16 holds uint16 patterns when packed
    if norm:
        t["weight_scale"] = (1 + 0.2 * torch.rand(n, generator=g, device=device)).half()
        t["weight_bias"] = randn(n, scale=std / 8)
    if bias:
        t["bias"] = randn(m, scale=0.1)
    return cfg, t
