"""Uniform low-bit formats (GPTQ, AWQ, GGUF Q4_0/Q4_1/Q8_0) in plain PyTorch: unpack, dequantize,
forward, and the quantize-and-pack side used to build test and benchmark layers.

This is the oracle. It reads each published layout directly, independently of the load-time
repackers in `uniform_triton.py`, and it is the CPU path's definition of the weight. Every format is
W[j, i] = scale[g, j] · (q[i, j] − zero[g, j]) (GGUF Q4_1: d · q + min), g the group of input i.
Facts confirmed against the reference implementations (AutoGPTQ `QuantLinear.pack` and its torch
unpack path, GPTQModel's v1/v2 conversion, AutoAWQ `WQLinear_GEMM.from_linear`, gguf-py `quants`):

GPTQ (m = out_features, n = in_features)
* `qweight` int32 [n·bits/32, m]. Each output column is one little-endian bitstream along the input:
  input k occupies stream bits k·bits … k·bits + bits − 1, stream bit b being bit b % 32 of word
  b // 32. For 2/4/8 bits a word holds 32/bits whole values, the first in the lowest bits. For 3 bits
  32 inputs fill 3 words and two values straddle words: input 10 has its low 2 bits in bits 30–31 of
  word 0 and its high bit in bit 0 of word 1; input 21 its low bit in bit 31 of word 1 and its high
  2 bits in bits 0–1 of word 2 (AutoGPTQ's pack loop writes exactly this stream).
* `qzeros` int32 [G, m·bits/32]: per group, the same kind of bitstream along the output.
* `scales` [G, m] (fp16 in published checkpoints), `g_idx` int32 [n] the group of each input
  (i // group_size unless act-order reordered them), `bias` [m] when present.
* Zero convention. checkpoint_format "gptq" (v1, AutoGPTQ and the default of every tool) stores
  zero − 1: the effective zero is field + 1, so a v1 field decodes to 1 … 2^bits (AutoGPTQ's unpack
  adds 1 after masking; its kernels do the same). A zero of 0 cannot be stored in v1 (AutoGPTQ's
  packer then ORs −1 into the word and corrupts its neighbours; GPTQModel calls this the asymmetric
  "overflow"). "gptq_v2" (GPTQModel) stores the zero itself, 0 … 2^bits − 1.

AWQ (GEMM version, 4 bits)
* `qweight` int32 [n, m/8] packed along the output: nibble p (bits 4p … 4p+3) of word w holds output
  8w + AWQ_ORDER[p] with AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7). `qzeros` int32 [G, m/8] the same way.
  `scales` fp16 [G, m]. W = (q − zero) · scale, the zero stored as is; groups are sequential.

GGUF (ggml blocks of 32 weights along the input; a tensor is rows of blocks, one row per output)
* Q4_0: 18 bytes = fp16 d, 16 bytes; w = d · (q − 8).
* Q4_1: 20 bytes = fp16 d, fp16 m, 16 bytes; w = d · q + m.
* Q8_0: 34 bytes = fp16 d, 32 int8; w = d · q.
  In a 4-bit block byte t's low nibble is weight t and its high nibble weight t + 16.
Float math follows gguf-py's dequantize (float32; d·q then + m) so results agree bit for bit.
"""

from __future__ import annotations

import math

import torch

GPTQ_BITS = (2, 3, 4, 8)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble p of an AWQ word holds output 8·word + AWQ_ORDER[p]
GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
GGUF_BLOCK = 32
GGUF_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}


# ----------------------------------------------------------------------------------------------
# Bitstreams of int32 words (GPTQ rows and columns, AWQ and GGUF nibbles)
# ----------------------------------------------------------------------------------------------


def _as_uint32(words: torch.Tensor) -> torch.Tensor:
    return words.to(torch.int64) & 0xFFFFFFFF


def unpack_bitstream(words: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """Values 0 … count−1 of `bits` bits each from little-endian int32 bitstreams laid along `dim`.

    Value k starts at stream bit k·bits: word k·bits // 32, offset k·bits % 32; a value that does not
    fit in the rest of its word continues in the low bits of the next one (GPTQ's 3 bits)."""
    w = _as_uint32(words.movedim(dim, -1))
    w = torch.cat([w, torch.zeros_like(w[..., :1])], dim=-1)  # the word after the last one reads as 0
    start = torch.arange(count, device=w.device) * bits
    idx, off = start // 32, start % 32
    lo = w[..., idx] >> off
    hi = w[..., idx + 1] << (32 - off)  # off = 0: shifted past bit 32, removed by the mask
    v = (lo | hi) & ((1 << bits) - 1)
    return v.movedim(-1, dim)


def pack_bitstream(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of `unpack_bitstream`: int values < 2^bits along `dim` → int32 words along `dim`."""
    v = values.movedim(dim, -1).to(torch.int64)
    count = v.shape[-1]
    if (count * bits) % 32:
        raise ValueError(f"{count} values of {bits} bits do not fill whole 32-bit words")
    if bool((v < 0).any()) or bool((v >> bits).any()):
        raise ValueError(f"values outside 0 … {2**bits - 1} cannot be packed in {bits} bits")
    n_words = count * bits // 32
    start = torch.arange(count, device=v.device) * bits
    idx, off = start // 32, start % 32
    out = torch.zeros(*v.shape[:-1], n_words + 1, dtype=torch.int64, device=v.device)
    # Fields are disjoint, so adding them is OR-ing them. A value that straddles two words puts its
    # low bits at the top of word idx and its high bits (v >> (32 − off), zero otherwise) at the
    # bottom of word idx + 1.
    out.index_add_(-1, idx, (v << off) & 0xFFFFFFFF)
    out.index_add_(-1, idx + 1, v >> (32 - off))
    out = out[..., :n_words]
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return out.movedim(-1, dim).contiguous()


def _gptq_zero_field_offset(checkpoint_format: str) -> int:
    """What a stored GPTQ qzeros field adds up to the zero: 1 for v1 ("gptq"), 0 for "gptq_v2"."""
    if checkpoint_format == "gptq":
        return 1
    if checkpoint_format == "gptq_v2":
        return 0
    raise ValueError(f"unknown GPTQ checkpoint_format {checkpoint_format!r} (known: gptq, gptq_v2)")


# ----------------------------------------------------------------------------------------------
# GPTQ
# ----------------------------------------------------------------------------------------------


def gptq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq"):
    """(q int64 [n, m], zero int64 [G, m]) with the v1 offset applied to the zeros."""
    n = qweight.shape[0] * 32 // bits
    m = qweight.shape[1]
    q = unpack_bitstream(qweight, bits, n, dim=0)
    z = unpack_bitstream(qzeros, bits, m, dim=1) + _gptq_zero_field_offset(checkpoint_format)
    return q, z


def gptq_dequantize_reference(qweight, qzeros, scales, g_idx, bits: int, group_size: int,
                              checkpoint_format: str = "gptq") -> torch.Tensor:
    """float32 W [m, n]: W[j, i] = scale[g_idx[i], j] · (q[i, j] − zero[g_idx[i], j])."""
    q, z = gptq_unpack(qweight, qzeros, bits, checkpoint_format)
    n = q.shape[0]
    if g_idx is None:
        gs = n if group_size in (-1, 0, None) else int(group_size)
        g_idx = torch.arange(n, device=q.device) // gs
    g = g_idx.to(torch.int64)
    w = scales.float()[g] * (q - z[g]).float()  # [n, m]
    return w.T.contiguous()


# ----------------------------------------------------------------------------------------------
# AWQ
# ----------------------------------------------------------------------------------------------


def awq_unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """int32 [r, m/8] AWQ words → int64 [r, m] in output order (undoing the 0,2,4,6,1,3,5,7 order)."""
    nibbles = unpack_bitstream(packed, 4, packed.shape[1] * 8, dim=1)  # nibble p of word w at 8w + p
    r = nibbles.shape[0]
    by_word = nibbles.reshape(r, -1, 8)
    out = torch.empty_like(by_word)
    out[..., list(AWQ_ORDER)] = by_word  # nibble p → output AWQ_ORDER[p]
    return out.reshape(r, -1)


def awq_pack_columns(values: torch.Tensor) -> torch.Tensor:
    """int [r, m] (m a multiple of 8) → AWQ int32 words [r, m/8]."""
    r, m = values.shape
    by_word = values.to(torch.int64).reshape(r, m // 8, 8)
    nibbles = by_word[..., list(AWQ_ORDER)]  # nibble p takes output AWQ_ORDER[p]
    return pack_bitstream(nibbles.reshape(r, m), 4, dim=1)


def awq_dequantize_reference(qweight, qzeros, scales, group_size: int) -> torch.Tensor:
    """float32 W [m, n] of an AWQ GEMM layer."""
    q = awq_unpack_columns(qweight)  # [n, m]
    z = awq_unpack_columns(qzeros)  # [G, m]
    n = q.shape[0]
    gs = n if group_size in (-1, 0, None) else int(group_size)
    g = torch.arange(n, device=q.device) // gs
    w = (q - z[g]).float() * scales.float()[g]
    return w.T.contiguous()


# ----------------------------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------------------------


def gguf_dequantize_reference(data: torch.Tensor, kind: str) -> torch.Tensor:
    """float32 [rows, blocks·32] from uint8 rows of Q4_0 / Q4_1 / Q8_0 blocks."""
    if kind not in GGUF_BLOCK_BYTES:
        raise ValueError(f"no reference for GGUF type {kind!r}; known: {', '.join(GGUF_BLOCK_BYTES)}")
    nbytes = GGUF_BLOCK_BYTES[kind]
    rows = data.shape[0]
    blocks = data.to(torch.uint8).reshape(rows, -1, nbytes)

    def f16(lo: int) -> torch.Tensor:
        return blocks[..., lo:lo + 2].contiguous().view(torch.float16).float()  # [rows, nb, 1]

    d = f16(0)
    if kind == "Q8_0":
        q = blocks[..., 2:].contiguous().view(torch.int8).float()
        return (q * d).reshape(rows, -1)
    qs = blocks[..., nbytes - 16:].to(torch.int64)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()  # weights 0…15 low nibbles, 16…31 high
    if kind == "Q4_0":
        return (d * (q - 8)).reshape(rows, -1)
    return (d * q + f16(2)).reshape(rows, -1)


def gguf_row_bytes(kind: str, in_features: int) -> int:
    return in_features // GGUF_BLOCK * GGUF_BLOCK_BYTES[kind]


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


def uniform_forward_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """y = x @ W.T (+ bias) in x's dtype, W the dense decoded weight [m, n]."""
    w = weight.to(device=x.device, dtype=x.dtype)
    y = x @ w.T
    if bias is not None:
        y = y + bias.to(device=x.device, dtype=x.dtype)
    return y


# ----------------------------------------------------------------------------------------------
# Quantize and pack (published descriptions): layers for tests, synthetic models and benchmarks
# ----------------------------------------------------------------------------------------------


def _group_members(g_idx: torch.Tensor, n_groups: int) -> torch.Tensor:
    """[G, n/G] input indices of each group (groups of equal size, as GPTQ writes them)."""
    order = torch.argsort(g_idx.to(torch.int64), stable=True)
    return order.reshape(n_groups, -1)


def quantize_groups(weight: torch.Tensor, bits: int, g_idx: torch.Tensor, n_groups: int, *, sym: bool,
                    zero_range: tuple[int, int]):
    """GPTQ's min/max grid per (group, output): (q int64 [n, m], zero int64 [G, m], scales fp16 [G, m]).

    sym: scale = 2·max|w| / maxq, zero = (maxq + 1) / 2. asym: scale = (max − min) / maxq,
    zero = round(−min / scale), clamped to `zero_range` (v1 cannot store 0). The scale is rounded to
    fp16 before q is computed, so the stored tensors reproduce the quantized weight exactly."""
    maxq = 2**bits - 1
    w = weight.float().T  # [n, m]
    members = _group_members(g_idx, n_groups)
    wg = w[members]  # [G, n/G, m]
    lo = wg.amin(1).clamp(max=0)
    hi = wg.amax(1).clamp(min=0)
    if sym:
        amax = torch.maximum(-lo, hi)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int64)
    else:
        scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).half()
    if not sym:
        zero = torch.round(-lo / scale.float()).to(torch.int64).clamp(*zero_range)
    g = g_idx.to(torch.int64)
    q = torch.round(w / scale.float()[g]).to(torch.int64) + zero[g]
    return q.clamp(0, maxq), zero, scale


def _act_order_g_idx(n: int, group_size: int, generator: torch.Generator | None) -> torch.Tensor:
    """g_idx of an act-order layer: inputs visited in a random order, the k-th visited in group
    k // group_size (GPTQ's desc_act visits them by decreasing Hessian diagonal)."""
    perm = torch.randperm(n, generator=generator)
    g = torch.empty(n, dtype=torch.int64)
    g[perm] = torch.arange(n) // group_size
    return g


def gptq_quantize_pack(weight: torch.Tensor, bits: int, group_size: int, *, sym: bool = True,
                       desc_act: bool = False, checkpoint_format: str = "gptq",
                       bias: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Quantize a dense weight [m, n] the GPTQ way (round to nearest on its grid) and pack it as a
    published GPTQ checkpoint stores it: (quantization_config, tensors)."""
    if bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ bits must be one of {GPTQ_BITS}, not {bits}")
    m, n = weight.shape
    gs = n if group_size in (-1, 0, None) else int(group_size)
    if n % gs:
        raise ValueError(f"group_size {gs} does not divide in_features {n}")
    offset = _gptq_zero_field_offset(checkpoint_format)
    g_idx = _act_order_g_idx(n, gs, generator) if desc_act else torch.arange(n) // gs
    maxq = 2**bits - 1
    q, zero, scales = quantize_groups(weight, bits, g_idx, n // gs, sym=sym, zero_range=(offset, maxq))
    tensors = {
        "qweight": pack_bitstream(q, bits, dim=0),
        "qzeros": pack_bitstream(zero - offset, bits, dim=1),
        "scales": scales,
        "g_idx": g_idx.to(torch.int32),
    }
    if bias is not None:
        tensors["bias"] = bias.half()
    config = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act,
              "sym": sym, "checkpoint_format": checkpoint_format}
    return config, tensors


def awq_quantize_pack(weight: torch.Tensor, group_size: int, *, bias: torch.Tensor | None = None,
                      ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Quantize a dense weight [m, n] to AWQ's asymmetric 4-bit grid and pack it as AutoAWQ's GEMM
    layers store it (the activation-aware scale search is AWQ's business, not the layout's)."""
    m, n = weight.shape
    gs = n if group_size in (-1, 0, None) else int(group_size)
    if n % gs or m % 8:
        raise ValueError(f"AWQ needs in_features % group_size == 0 and out_features % 8 == 0, got {m}x{n}")
    g = torch.arange(n) // gs
    q, zero, scales = quantize_groups(weight, 4, g, n // gs, sym=False, zero_range=(0, 15))
    tensors = {"qweight": awq_pack_columns(q), "qzeros": awq_pack_columns(zero), "scales": scales}
    if bias is not None:
        tensors["bias"] = bias.half()
    config = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    return config, tensors


def _random_weight(out_features: int, in_features: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=generator) / math.sqrt(in_features)


def random_gptq_layer(in_features: int, out_features: int, bits: int, group_size: int, *, sym: bool = True,
                      desc_act: bool = False, checkpoint_format: str = "gptq", bias: bool = False,
                      generator: torch.Generator | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """A random Gaussian layer quantized and packed as a GPTQ checkpoint stores it (CPU tensors):
    (quantization_config, {"qweight", "qzeros", "scales", "g_idx"[, "bias"]})."""
    w = _random_weight(out_features, in_features, generator)
    b = torch.randn(out_features, generator=generator) * 0.1 if bias else None
    return gptq_quantize_pack(w, bits, group_size, sym=sym, desc_act=desc_act,
                              checkpoint_format=checkpoint_format, bias=b, generator=generator)


def random_awq_layer(in_features: int, out_features: int, group_size: int, *, bias: bool = False,
                     generator: torch.Generator | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """A random Gaussian layer packed as an AWQ GEMM checkpoint stores it (CPU tensors)."""
    w = _random_weight(out_features, in_features, generator)
    b = torch.randn(out_features, generator=generator) * 0.1 if bias else None
    return awq_quantize_pack(w, group_size, bias=b)


# ----------------------------------------------------------------------------------------------
# Byte-level fast paths: GGUF blocks → UniformPacked at load, UniformPacked → dense W for the CPU
# ----------------------------------------------------------------------------------------------
# `uniform_triton.repack_gguf` and `uniform_packed_dequant_reference` define these results; they
# work in int64 one bit field at a time, which costs seconds per model on a CPU. Whenever a
# UniformPacked word holds whole bytes of values (2, 4 and 8 bits), a little-endian int32 viewed as
# bytes holds its values in output order, so both directions reduce to uint8 arithmetic and one
# transpose. Tests check both paths give identical tensors.


def gguf_to_packed(data: torch.Tensor, kind: str):
    """GGUF Q4_0 / Q4_1 / Q8_0 rows of blocks (uint8 [m, row bytes]) → UniformPacked (group 32),
    identical to `uniform_triton.repack_gguf`. Q8_0's int8 q is stored as q + 128 with zero 128."""
    from .uniform_triton import UniformPacked

    nbytes = GGUF_BLOCK_BYTES[kind]
    m = data.shape[0]
    blk = data.to(torch.uint8).reshape(m, -1, nbytes)
    nb = blk.shape[1]
    n = nb * GGUF_BLOCK

    def f16_t(lo: int) -> torch.Tensor:  # the fp16 field at byte lo of every block, as [nb, m]
        return blk[..., lo:lo + 2].contiguous().view(torch.float16).reshape(m, nb).T.contiguous()

    d = f16_t(0)
    if kind == "Q8_0":
        q = blk[..., 2:].contiguous().view(torch.int8).reshape(m, n)
        qb = (q.T.to(torch.int16) + 128).to(torch.uint8).contiguous()  # [n, m]: byte j = output j
        zeros = torch.full((nb, m), 128.0, dtype=torch.float16, device=data.device)
        return UniformPacked(8, GGUF_BLOCK, n, m, qb.view(torch.int32), None, d, zeros)
    if m % 2:
        raise ValueError(f"4-bit GGUF rows come in pairs per packed byte; out_features {m} is odd")
    # A packed byte holds outputs 2j (low nibble) and 2j+1 (high nibble) of one input. Block byte t
    # holds inputs t (low nibble) and t + 16 (high nibble) of one output row.
    src = blk[..., nbytes - 16:].reshape(m // 2, 2, nb, 16)
    even, odd = src[:, 0], src[:, 1]
    first = (even & 0x0F) | (odd << 4)  # inputs t: uint8 shifts drop the high nibble
    second = (even >> 4) | (odd & 0xF0)  # inputs t + 16
    qb = torch.stack([first, second], dim=2).permute(1, 2, 3, 0).reshape(n, m // 2).contiguous()
    if kind == "Q4_0":
        zeros, zero_is_min = torch.full((nb, m), 8.0, dtype=torch.float16, device=data.device), False
    else:
        zeros, zero_is_min = f16_t(2), True
    return UniformPacked(4, GGUF_BLOCK, n, m, qb.view(torch.int32), None, d, zeros, zero_is_min)


def _pack_outputs_bytes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [n, m] → UniformPacked's int32 words [n, m·bits/32] (2, 4 or 8 bits): byte c of
    a row holds outputs c·(8/bits) … in order, the first in the lowest bits; little-endian int32 words
    then hold 32/bits consecutive outputs, the first lowest, as UniformPacked wants."""
    n, m = q.shape
    per = 8 // bits
    if m % (32 // bits):
        raise ValueError(f"out_features {m} must be a multiple of {32 // bits} for {bits} bits")
    if per == 1:
        b = q
    else:
        v = q.reshape(n, m // per, per)
        b = v[..., 0]
        for k in range(1, per):
            b = b | (v[..., k] << (bits * k))
    return b.contiguous().view(torch.int32)


def gptq_to_packed(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                   bits: int, group_size: int, checkpoint_format: str = "gptq"):
    """GPTQ tensors → UniformPacked, identical to `uniform_triton.repack_gptq` (3 bits: that function).

    For 2/4/8 bits a GPTQ word's bytes hold whole values: byte b of the word for inputs 32w/bits …
    holds inputs (32/bits)·w + b·(8/bits) … in its low-to-high fields, so the codes come out as uint8
    [n, m] with one transpose. Act-order (g_idx other than i // group_size) sorts the inputs by group
    into `perm`, as repack_gptq does, with the groups' scales and zeros reordered to match."""
    from .uniform_triton import UniformPacked, repack_gptq

    if bits == 3:
        return repack_gptq(qweight, qzeros, scales, g_idx, bits, group_size, checkpoint_format)
    words, m = qweight.shape
    n = words * 32 // bits
    gs = n if group_size in (-1, 0, None) else int(group_size)
    per = 8 // bits
    b = qweight.contiguous().view(torch.uint8).reshape(words, m, 4)  # byte b of each word
    if per == 1:
        fields = b[..., None]
    else:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=b.device)
        fields = (b[..., None] >> shifts) & ((1 << bits) - 1)  # [words, m, 4, per]
    q = fields.permute(0, 2, 3, 1).reshape(n, m)  # input 32w/bits + per·b + f
    zeros = unpack_bitstream(qzeros, bits, m, dim=1) + _gptq_zero_field_offset(checkpoint_format)
    perm = None
    if g_idx is not None:
        g = g_idx.to(torch.int64)
        if not torch.equal(g, torch.arange(n, device=g.device) // gs):
            perm = torch.argsort(g, stable=True)
            q = q[perm]
            first = g[perm].reshape(-1, gs)[:, 0]  # checkpoint group of each packed group
            scales, zeros = scales[first], zeros[first]
    return UniformPacked(bits, gs, n, m, _pack_outputs_bytes(q, bits), None, scales.to(torch.float16).contiguous(),
                         zeros.to(torch.float16).contiguous(),
                         perm=None if perm is None else perm.to(torch.int32).contiguous())


def awq_to_packed(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int):
    """AWQ GEMM tensors → UniformPacked, identical to `uniform_triton.repack_awq`. AWQ is already
    packed along the output, only in the order 0,2,4,6,1,3,5,7: word bytes 0–3 hold outputs (0, 2),
    (4, 6), (1, 3), (5, 7), low nibble first, so swapping nibbles between bytes gives (0, 1) … (6, 7)."""
    from .uniform_triton import UniformPacked

    def reorder(words: torch.Tensor) -> torch.Tensor:
        b = words.contiguous().view(torch.uint8).reshape(*words.shape, 4)
        b0, b1, b2, b3 = b.unbind(-1)
        out = torch.stack([(b0 & 0x0F) | (b2 << 4), (b0 >> 4) | (b2 & 0xF0),
                           (b1 & 0x0F) | (b3 << 4), (b1 >> 4) | (b3 & 0xF0)], dim=-1)
        return out.reshape(words.shape[0], -1).contiguous()

    n, mw = qweight.shape
    gs = n if group_size in (-1, 0, None) else int(group_size)
    z = reorder(qzeros)
    zeros = torch.stack([z & 0x0F, z >> 4], dim=-1).reshape(qzeros.shape[0], mw * 8)
    return UniformPacked(4, gs, n, mw * 8, reorder(qweight).view(torch.int32), None,
                         scales.to(torch.float16).contiguous(), zeros.to(torch.float16).contiguous())


def packed_dense_weight(p) -> torch.Tensor:
    """float32 W [m, n] of a UniformPacked, identical to `uniform_packed_dequant_reference`
    (byte-level for 2, 4 and 8 bits; 3 bits, whose values are split over two planes, use that)."""
    from .uniform_triton import uniform_packed_dequant_reference

    if p.bits == 3 or p.qweight.device.type != "cpu":
        return uniform_packed_dequant_reference(p)
    n, m = p.in_features, p.out_features
    b = p.qweight.contiguous().view(torch.uint8)  # [n, m·bits/8]: byte k holds outputs in order
    if p.bits == 8:
        q = b
    else:
        shifts = torch.arange(0, 8, p.bits, dtype=torch.uint8)
        q = (b[..., None] >> shifts) & ((1 << p.bits) - 1)  # [n, bytes, values per byte]
    q = q.reshape(n // p.group_size, p.group_size, m).float()
    s, z = p.scales.float()[:, None], p.zeros.float()[:, None]
    w = q.mul_(s).add_(z) if p.zero_is_min else q.sub_(z).mul_(s)  # same float ops as the reference
    w = w.reshape(n, m)
    if p.perm is not None:
        out = torch.empty_like(w)
        out[p.perm.long()] = w
        w = out
    return w.T.contiguous()
