"""Fused Triton kernels for uniform int2/3/4/8 weights with group scales and zeros.

Every uniform format (GPTQ, AWQ, GGUF Q4_0/Q4_1/Q8_0) is repacked once at load time into one layout,
`UniformPacked`, and all of them run through the same three kernels:

* `_uq_gemv_kernel` (one row of x per program, batch 1–2): CUDA-core decode-GEMV, weights unpacked
  in registers and never written to memory.
* `_uq_mma_kernel` (batch ≥ 2): decodes a Wᵀ tile [BK, BM] to fp16/bf16 in registers and multiplies
  on tensor cores (`tl.dot`, batch padded to at least 16).
* dequant + cuBLAS (large batches / prefill): `_uq_dequant_kernel` writes Wᵀ to a scratch buffer
  and `torch.matmul` does the rest.
A small tuner times the candidates of each (shape, batch bucket) once and caches the choice.

Layout (`UniformPacked`, m = out_features, n = in_features, q[j, k] in [0, 2^bits)):
* `qweight` int32 [n, m·bits/32]: packed **along the output dimension** (input-major rows), output j
  of row k in word j // VPW at bits (j % VPW)·bits (VPW = 32/bits values per word, the first output
  in the lowest bits). One 16-byte load gives a thread 4 words = 4·VPW outputs of one input, which
  all multiply the same x[k]: one activation load per 32 weights at 4 bits, and the sum over the
  input stays in the thread (one reduction per program, at the end).
* 3 bits: `qweight` holds the low 2 bits as a 2-bit matrix [n, m/16] and `qweight_hi` int16
  [n, m/16] the high bit of the same 16 outputs, so no value straddles a word.
* `scales` fp16 [n/group_size, m] and `zeros` fp16 [n/group_size, m]. W[j, k] = scale·(q − zero)
  with an integer zero (GPTQ, AWQ, Q4_0: 8, Q8_0: 0), or, with `zero_is_min`, W = scale·q + zero
  (GGUF Q4_1's float minimum).
* optional `perm` int32 [n]: packed input k is the layer's input perm[k] (GPTQ act-order, sorted so
  that groups are contiguous).

Integer → float without conversion instructions (I2F runs at a quarter of the FMA rate on Hopper):
`(word & (mask << b·s')) | 0x4B000000` read as float32 is 2^23 + q·2^(b·s') exactly for the values
in the low 20 bits (s' = s, or s − VPW/2 after one shift of the word by 16), so one LOP3 extracts a
value and `bits − (2^23 + zero·2^(b·s'))` is (q − zero)·2^(b·s') exactly in one FADD; the power of
two is folded into the group's scale. With one row of x the scale multiplies Σ_k x·(q − zero) once
per group: LOP3 + FADD + FFMA per weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .pdl import launch_options, wait_prior
from .tuning import as_rows, batch_bucket, choose, interpreting, time_candidates
from .workspace import split_workspace

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None


# ----------------------------------------------------------------------------------------------
# The packed layout and its plain-PyTorch reference
# ----------------------------------------------------------------------------------------------


@dataclass
class UniformPacked:
    bits: int
    group_size: int
    in_features: int
    out_features: int
    qweight: torch.Tensor
    qweight_hi: torch.Tensor | None
    scales: torch.Tensor
    zeros: torch.Tensor
    zero_is_min: bool = False
    perm: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        d = {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}
        if self.qweight_hi is not None:
            d["qweight_hi"] = self.qweight_hi
        if self.perm is not None:
            d["perm"] = self.perm
        return d

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device) -> "UniformPacked":
        kw = dict(self.__dict__)
        for k, v in self.tensors().items():
            kw[k] = v.to(device)
        return UniformPacked(**kw)


def values_per_word(bits: int) -> int:
    """Outputs per int32 word of `qweight` (3 bits: per word of the 2-bit low plane)."""
    return {2: 16, 3: 16, 4: 8, 8: 4}[bits]


def _pack_out(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q [n, m] (input-major) ints < 2^bits → int32 [n, m·bits/32]; output j of word j // per at
    bits (j % per)·bits.. (the first output in the lowest bits)."""
    n, m = q.shape
    per = 32 // bits
    q = q.to(torch.int64).reshape(n, m // per, per)
    words = (q << (torch.arange(per, dtype=torch.int64) * bits)).sum(-1)  # disjoint fields: sum == or
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def _unpack_out(w: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64, device=w.device) * bits
    v = ((w.to(torch.int64) & 0xFFFFFFFF)[..., None] >> shifts) & ((1 << bits) - 1)
    return v.reshape(w.shape[0], -1)


def pack_uniform(q: torch.Tensor, bits: int, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 zero_is_min: bool = False, perm: torch.Tensor | None = None) -> UniformPacked:
    """Pack integer codes q [m, n] (values in [0, 2^bits)) with scales/zeros [n/group_size, m].

    `q`'s column k is input perm[k] of the layer when `perm` is given.
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, not {bits}")
    m, n = q.shape
    if m % values_per_word(bits):
        raise ValueError(f"out_features {m} must be a multiple of {values_per_word(bits)} for {bits} bits")
    if n % group_size:
        raise ValueError(f"in_features {n} must be a multiple of group_size {group_size}")
    ng = n // group_size
    if tuple(scales.shape) != (ng, m) or tuple(zeros.shape) != (ng, m):
        raise ValueError(f"scales/zeros must be [{ng}, {m}], got {tuple(scales.shape)} / {tuple(zeros.shape)}")
    if not zero_is_min and not bool((zeros.float() == zeros.float().round()).all()):
        # the kernels subtract the zero exactly only as an integer (2^23 + zero·2^fs in float32)
        raise ValueError("zeros must be integers (a float offset per group is zero_is_min's W = scale·q + zero)")
    qt = q.cpu().T.contiguous()  # [n, m]
    if bits == 3:
        qw = _pack_out(qt & 3, 2)
        hb = (qt >> 2).to(torch.int64).reshape(n, m // 16, 16)
        hi = (hb << torch.arange(16, dtype=torch.int64)).sum(-1)  # 16 high bits per low-plane word
        qh = torch.where(hi >= 2**15, hi - 2**16, hi).to(torch.int16)
    else:
        qw, qh = _pack_out(qt, bits), None
    dev = scales.device
    return UniformPacked(
        bits=bits, group_size=int(group_size), in_features=n, out_features=m,
        qweight=qw.contiguous().to(dev), qweight_hi=None if qh is None else qh.contiguous().to(dev),
        scales=scales.to(torch.float16).contiguous(), zeros=zeros.to(torch.float16).contiguous(),
        zero_is_min=bool(zero_is_min),
        perm=None if perm is None else perm.to(torch.int32).contiguous().to(dev),
    )


def unpack_uniform_codes(p: UniformPacked) -> torch.Tensor:
    """int64 codes [m, n] in packed (perm) input order."""
    if p.bits == 3:
        lo = _unpack_out(p.qweight, 2)  # [n, m]
        hi16 = p.qweight_hi.to(torch.int64) & 0xFFFF  # [n, m/16]
        hi = ((hi16[..., None] >> torch.arange(16, device=hi16.device)) & 1).reshape(hi16.shape[0], -1)
        return (lo | (hi << 2)).T
    return _unpack_out(p.qweight, p.bits).T


def uniform_packed_dequant_reference(p: UniformPacked) -> torch.Tensor:
    """float32 W [m, n] in the layer's own input order (plain PyTorch, the kernels' oracle)."""
    q = unpack_uniform_codes(p).to(torch.float32)  # [m, n]
    s = p.scales.float().repeat_interleave(p.group_size, dim=0).T  # [m, n]
    z = p.zeros.float().repeat_interleave(p.group_size, dim=0).T
    w = s * q + z if p.zero_is_min else s * (q - z)
    return unpermute_inputs(w, p.perm)


def unpermute_inputs(w: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """W [m, n] with its columns in packed input order → the layer's own input order."""
    if perm is None:
        return w
    out = torch.empty_like(w)
    out[:, perm.long()] = w
    return out


def uniform_packed_matmul_reference(x: torch.Tensor, p: UniformPacked, bias: torch.Tensor | None = None):
    w = uniform_packed_dequant_reference(p).to(x.device)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Load-time repacking of the published formats (../shared/specs/uniform.md) into UniformPacked
# ----------------------------------------------------------------------------------------------


def _stream_fields(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Fields of `bits` bits from little-endian int32 bitstreams: words [..., W] → int64 [..., count]
    (bit b of a stream is bit b % 32 of word b // 32; fields may cross words, as GPTQ's 3 bits do)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    b = (w[..., None] >> torch.arange(32, device=w.device)) & 1
    b = b.reshape(*w.shape[:-1], -1)[..., : count * bits].reshape(*w.shape[:-1], count, bits)
    return (b << torch.arange(bits, device=w.device)).sum(-1)


def repack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                bits: int, group_size: int, checkpoint_format: str = "gptq") -> UniformPacked:
    """GPTQ tensors → UniformPacked. qweight int32 [n·bits/32, m] is, per output column, a bitstream
    along the input (one field per input row); qzeros int32 [G, m·bits/32] a bitstream along the
    output per group; the original "gptq" format stores zero − 1, "gptq_v2" the zero. Act-order
    (g_idx not equal to k // group_size) becomes `perm`: inputs sorted by group, groups contiguous."""
    m = scales.shape[1]
    n = qweight.shape[0] * 32 // bits
    group_size = n if group_size in (-1, 0, None) else int(group_size)
    q = _stream_fields(qweight.T.contiguous(), bits, n)  # [m, n]
    z = _stream_fields(qzeros, bits, m)  # [G, m]
    if checkpoint_format != "gptq_v2":
        z = z + 1
    perm = None
    if g_idx is not None:
        g = g_idx.to(torch.int64).cpu()
        if not torch.equal(g, torch.arange(n) // group_size):
            perm = torch.argsort(g, stable=True)
            counts = torch.bincount(g[perm], minlength=n // group_size)
            if not bool((counts == group_size).all()):
                raise ValueError("GPTQ g_idx groups are not all of group_size; the fused kernels cannot take it")
            q = q[:, perm.to(q.device)]
            gs = g[perm].reshape(-1, group_size)[:, 0]  # the checkpoint group of each packed group
            scales, z = scales[gs.to(scales.device)], z[gs.to(z.device)]
    return pack_uniform(q, bits, scales, z.to(torch.float16), group_size, perm=perm)


_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble p of a word holds output 8·word + _AWQ_ORDER[p]


def repack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> UniformPacked:
    """AWQ GEMM tensors (4-bit, packed along the output with nibble order 0,2,4,6,1,3,5,7)."""

    def unpack(w):
        v = _stream_fields(w, 4, w.shape[-1] * 8).reshape(*w.shape, 8)  # [.., words, nibble p]
        out = torch.empty_like(v)
        out[..., list(_AWQ_ORDER)] = v
        return out.reshape(*w.shape[:-1], -1)

    q = unpack(qweight).T.contiguous()  # [m, n]
    z = unpack(qzeros)  # [G, m]
    n = qweight.shape[0]
    return pack_uniform(q, 4, scales, z.to(torch.float16), n if group_size in (-1, 0, None) else group_size)


_GGUF_BLOCK = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def repack_gguf(data: torch.Tensor, kind: str) -> UniformPacked:
    """GGUF Q4_0 / Q4_1 / Q8_0 rows of blocks (uint8 [m, blocks·block_bytes]) → UniformPacked, g 32.
    Q4_0 w = d·(q − 8); Q4_1 w = d·q + min; Q8_0 w = d·q with q int8, stored as q + 128, zero 128.
    In a 4-bit block the low nibbles of the 16 bytes are weights 0…15, the high ones 16…31."""
    bs = _GGUF_BLOCK[kind]
    m = data.shape[0]
    blk = data.reshape(m, -1, bs).to(torch.uint8)
    nb = blk.shape[1]
    d = blk[..., 0:2].contiguous().view(torch.float16).reshape(m, nb)
    if kind == "Q8_0":
        q = blk[..., 2:34].contiguous().view(torch.int8).to(torch.int64) + 128
        zeros = torch.full((nb, m), 128.0, dtype=torch.float16)
        return pack_uniform(q.reshape(m, nb * 32), 8, d.T.contiguous(), zeros.to(d.device), 32)
    qs = blk[..., bs - 16:].to(torch.int64)
    q = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(m, nb * 32)
    if kind == "Q4_0":
        zeros = torch.full((nb, m), 8.0, dtype=torch.float16, device=d.device)
        return pack_uniform(q, 4, d.T.contiguous(), zeros, 32)
    mn = blk[..., 2:4].contiguous().view(torch.float16).reshape(m, nb)
    return pack_uniform(q, 4, d.T.contiguous(), mn.T.contiguous(), 32, zero_is_min=True)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _uq_v(lo, hi, magic, s: tl.constexpr, BITS: tl.constexpr):
        """Value s of each word as float32 bits: 2^23 + q·2^(BITS·s'), s' = s mod (values/2).

        `lo` is the word, `hi` the word shifted right by 16, so one AND-OR (LOP3) per value and no
        conversion instruction. For 3 bits `lo` is the 2-bit plane word and `hi` the high-bit half-word.
        `magic` is 0x4B000000 passed as a kernel argument: in a register, (w & mask) | magic is one
        LOP3 (with two immediates ptxas needs two).
        """
        if BITS == 3:
            q = ((lo >> (2 * s)) & 3) | (((hi >> s) & 1) << 2)
            r = q | magic
        else:
            H: tl.constexpr = 16 // BITS
            if s < H:
                r = (lo & (((1 << BITS) - 1) << (BITS * s))) | magic
            else:
                r = (hi & (((1 << BITS) - 1) << (BITS * (s - H)))) | magic
        return r

    @triton.jit
    def _uq_tile(qw_ptr, qh_ptr, kk, jw, kmask, jwmask, stride_qw, stride_qh, magic, BITS: tl.constexpr):
        """Float tile [BK, BMW·VPW] = 2^23 + q·2^fs(j) of input rows kk and output words jw.

        Values of a word are joined into new minor dimensions (registers of the thread that loaded
        the word), ordered so that the final reshape is the natural output order."""
        msk = kmask[:, None] & jwmask[None, :]
        w = tl.load(qw_ptr + kk[:, None] * stride_qw + jw[None, :], mask=msk, other=0)
        if BITS == 3:
            hi = tl.load(qh_ptr + kk[:, None] * stride_qh + jw[None, :], mask=msk, other=0).to(tl.int32)
            lo = w
        else:
            lo = w
            hi = w >> 16
        if BITS == 8:
            p0 = tl.join(_uq_v(lo, hi, magic, 0, BITS), _uq_v(lo, hi, magic, 2, BITS))
            p1 = tl.join(_uq_v(lo, hi, magic, 1, BITS), _uq_v(lo, hi, magic, 3, BITS))
            r = tl.join(p0, p1)
            r = tl.reshape(r, [r.shape[0], r.shape[1] * 4])
        elif BITS == 4:
            p0 = tl.join(_uq_v(lo, hi, magic, 0, BITS), _uq_v(lo, hi, magic, 4, BITS))
            p1 = tl.join(_uq_v(lo, hi, magic, 1, BITS), _uq_v(lo, hi, magic, 5, BITS))
            p2 = tl.join(_uq_v(lo, hi, magic, 2, BITS), _uq_v(lo, hi, magic, 6, BITS))
            p3 = tl.join(_uq_v(lo, hi, magic, 3, BITS), _uq_v(lo, hi, magic, 7, BITS))
            r = tl.join(tl.join(p0, p2), tl.join(p1, p3))
            r = tl.reshape(r, [r.shape[0], r.shape[1] * 8])
        else:  # 2 and 3 bits: 16 values per word
            p0 = tl.join(_uq_v(lo, hi, magic, 0, BITS), _uq_v(lo, hi, magic, 8, BITS))
            p1 = tl.join(_uq_v(lo, hi, magic, 1, BITS), _uq_v(lo, hi, magic, 9, BITS))
            p2 = tl.join(_uq_v(lo, hi, magic, 2, BITS), _uq_v(lo, hi, magic, 10, BITS))
            p3 = tl.join(_uq_v(lo, hi, magic, 3, BITS), _uq_v(lo, hi, magic, 11, BITS))
            p4 = tl.join(_uq_v(lo, hi, magic, 4, BITS), _uq_v(lo, hi, magic, 12, BITS))
            p5 = tl.join(_uq_v(lo, hi, magic, 5, BITS), _uq_v(lo, hi, magic, 13, BITS))
            p6 = tl.join(_uq_v(lo, hi, magic, 6, BITS), _uq_v(lo, hi, magic, 14, BITS))
            p7 = tl.join(_uq_v(lo, hi, magic, 7, BITS), _uq_v(lo, hi, magic, 15, BITS))
            q0 = tl.join(tl.join(p0, p4), tl.join(p2, p6))
            q1 = tl.join(tl.join(p1, p5), tl.join(p3, p7))
            r = tl.join(q0, q1)
            r = tl.reshape(r, [r.shape[0], r.shape[1] * 16])
        return r.to(tl.float32, bitcast=True)

    @triton.jit
    def _uq_c(BMW: tl.constexpr, s: tl.constexpr, BITS: tl.constexpr, INVERSE: tl.constexpr):
        if BITS == 3:
            e: tl.constexpr = 0
        else:
            e: tl.constexpr = BITS * (s % (16 // BITS))
        if INVERSE:
            v: tl.constexpr = 1.0 / (1 << e)
        else:
            v: tl.constexpr = 1.0 * (1 << e)
        return tl.full([1, BMW], v, tl.float32)

    @triton.jit
    def _uq_fs_pow(BMW: tl.constexpr, BITS: tl.constexpr, INVERSE: tl.constexpr):
        """[1, BM] tile of 2^fs(j) (or its inverse): the power of two value j carries in its magic
        float. Built with the same join tree as the weights, so every register holds a compile-time
        constant and the scale/zero corrections become FMUL/FFMA with immediates."""
        if BITS == 8:
            r = tl.join(tl.join(_uq_c(BMW, 0, BITS, INVERSE), _uq_c(BMW, 2, BITS, INVERSE)),
                        tl.join(_uq_c(BMW, 1, BITS, INVERSE), _uq_c(BMW, 3, BITS, INVERSE)))
            r = tl.reshape(r, [1, BMW * 4])
        elif BITS == 4:
            p0 = tl.join(_uq_c(BMW, 0, BITS, INVERSE), _uq_c(BMW, 4, BITS, INVERSE))
            p1 = tl.join(_uq_c(BMW, 1, BITS, INVERSE), _uq_c(BMW, 5, BITS, INVERSE))
            p2 = tl.join(_uq_c(BMW, 2, BITS, INVERSE), _uq_c(BMW, 6, BITS, INVERSE))
            p3 = tl.join(_uq_c(BMW, 3, BITS, INVERSE), _uq_c(BMW, 7, BITS, INVERSE))
            r = tl.join(tl.join(p0, p2), tl.join(p1, p3))
            r = tl.reshape(r, [1, BMW * 8])
        else:
            p0 = tl.join(_uq_c(BMW, 0, BITS, INVERSE), _uq_c(BMW, 8, BITS, INVERSE))
            p1 = tl.join(_uq_c(BMW, 1, BITS, INVERSE), _uq_c(BMW, 9, BITS, INVERSE))
            p2 = tl.join(_uq_c(BMW, 2, BITS, INVERSE), _uq_c(BMW, 10, BITS, INVERSE))
            p3 = tl.join(_uq_c(BMW, 3, BITS, INVERSE), _uq_c(BMW, 11, BITS, INVERSE))
            p4 = tl.join(_uq_c(BMW, 4, BITS, INVERSE), _uq_c(BMW, 12, BITS, INVERSE))
            p5 = tl.join(_uq_c(BMW, 5, BITS, INVERSE), _uq_c(BMW, 13, BITS, INVERSE))
            p6 = tl.join(_uq_c(BMW, 6, BITS, INVERSE), _uq_c(BMW, 14, BITS, INVERSE))
            p7 = tl.join(_uq_c(BMW, 7, BITS, INVERSE), _uq_c(BMW, 15, BITS, INVERSE))
            r = tl.join(tl.join(tl.join(p0, p4), tl.join(p2, p6)), tl.join(tl.join(p1, p5), tl.join(p3, p7)))
            r = tl.reshape(r, [1, BMW * 16])
        return r

    @triton.jit
    def _uq_group_vectors(s_ptr, z_ptr, g, j, jmask, fpow, ifpow, M, ZERO_IS_MIN: tl.constexpr):
        """Per-output rows [1, BM] of group g: sc = scale / 2^fs, zc = 2^23 + zero·2^fs (or the min)."""
        sc = tl.load(s_ptr + g * M + j, mask=jmask, other=0.0).to(tl.float32)[None, :] * ifpow
        z = tl.load(z_ptr + g * M + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
        if ZERO_IS_MIN:
            zc = z * 0.0 + 8388608.0
        else:
            zc = z * fpow + 8388608.0  # exact: an integer below 2^23
        return sc, zc, z

    @triton.jit
    def _uq_x(x_ptr, perm_ptr, bvec, bmask, kk, kmask, stride_xb, HAS_PERM: tl.constexpr):
        kx = kk
        if HAS_PERM:
            kx = tl.load(perm_ptr + kk, mask=kmask, other=0)
        return tl.load(x_ptr + bvec[:, None] * stride_xb + kx[None, :],
                       mask=bmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)

    @triton.jit
    def _uq_gemv_group(acc, g, x_ptr, qw_ptr, qh_ptr, s_ptr, z_ptr, perm_ptr, jw, jwmask, j, jmask, fpow, ifpow,
                       b0, bvec, bmask, M, N, stride_xb, stride_qw, stride_qh, magic,
                       BITS: tl.constexpr, GROUP: tl.constexpr, BK: tl.constexpr, BB: tl.constexpr,
                       ZERO_IS_MIN: tl.constexpr, HAS_PERM: tl.constexpr):
        """acc += the products of one group of inputs; acc holds per-thread partial sums over k:
        [BK, BM] for one row of x, [BB, BK, BM] for several.

        One row of x: the scale is applied once per group to Σ_k x·(q − zero), so each weight costs
        one LOP3, one FADD and one FFMA. Several rows: the weight is formed once (one more FMUL) and
        reused for every row."""
        sc, zc, mn = _uq_group_vectors(s_ptr, z_ptr, g, j, jmask, fpow, ifpow, M, ZERO_IS_MIN)
        for t in tl.static_range(GROUP // BK):
            kk = g * GROUP + t * BK + tl.arange(0, BK)
            kmask = kk < N
            d = _uq_tile(qw_ptr, qh_ptr, kk, jw, kmask, jwmask, stride_qw, stride_qh, magic, BITS) - zc
            if BB == 1:
                kx = kk
                if HAS_PERM:
                    kx = tl.load(perm_ptr + kk, mask=kmask, other=0)
                x1 = tl.load(x_ptr + b0 * stride_xb + kx, mask=kmask, other=0.0).to(tl.float32)
                if t == 0:
                    a = x1[:, None] * d
                    if ZERO_IS_MIN:
                        xs = x1
                else:
                    a += x1[:, None] * d
                    if ZERO_IS_MIN:
                        xs += x1
            else:
                xv = _uq_x(x_ptr, perm_ptr, bvec, bmask, kk, kmask, stride_xb, HAS_PERM)  # [BB, BK]
                wv = d * sc
                if ZERO_IS_MIN:
                    wv += mn
                acc += xv[:, :, None] * wv[None, :, :]
        if BB == 1:
            acc += a * sc
            if ZERO_IS_MIN:
                acc += xs[:, None] * mn
        return acc

    @triton.jit
    def _sum16(tot, ws_ptr, off, msk, c0, split_k, stride):
        # The split bound is compared as a tensor (off * 0 + ...): triton 3.9's interpreter rejects
        # a tensor mask and-ed with a scalar comparison.
        for i in tl.static_range(16):
            tot += tl.load(ws_ptr + (c0 + i) * stride + off, mask=msk & (off * 0 + c0 + i < split_k), other=0.0,
                           cache_modifier=".cg")
        return tot

    @triton.jit
    def _splitk_finish(acc, y_ptr, bias_ptr, ws_ptr, cnt_ptr, rows, bidx, row_mask, M, B, stride_yb,
                       pid_m, pid_k, pid_b, num_m, split_k,
                       HAS_BIAS: tl.constexpr, LOOP_WHILE: tl.constexpr):
        """Write acc [BBLK, BM] (rows of batch `bidx`). With split_k > 1 (a run-time value, so one
        compile serves every split) each split writes its partial to the workspace and the last
        split to arrive (atomic counter) sums them in split order, so results are deterministic,
        and resets the counter for the next launch."""
        out_mask = (bidx < B)[:, None] & row_mask[None, :]
        yoff = bidx[:, None] * stride_yb + rows[None, :]
        if split_k > 1:
            ws_off = (bidx[:, None] * M + rows[None, :])
            tl.store(ws_ptr + pid_k * B * M + ws_off, acc, mask=out_mask)
            tl.debug_barrier()
            cidx = pid_b * num_m + pid_m
            old = tl.atomic_add(cnt_ptr + cidx, 1, sem="acq_rel", scope="gpu")
            if old == split_k - 1:
                # 16 independent partial loads per round: a plain run-time loop here would wait one
                # L2 round trip per split (measured: a ~8 µs floor at split 32 on the H100)
                tot = tl.zeros_like(acc)
                if LOOP_WHILE:
                    c0 = 0
                    while c0 < split_k:
                        tot = _sum16(tot, ws_ptr, ws_off, out_mask, c0, split_k, B * M)
                        c0 += 16
                else:
                    for c0 in range(0, split_k, 16):
                        tot = _sum16(tot, ws_ptr, ws_off, out_mask, c0, split_k, B * M)
                if HAS_BIAS:
                    tot += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptr + yoff, tot.to(y_ptr.dtype.element_ty), mask=out_mask)
                tl.atomic_xchg(cnt_ptr + cidx, 0)
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + yoff, acc.to(y_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _uq_gemv_kernel(
        x_ptr, qw_ptr, qh_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, MW, N, B, stride_xb, stride_qw, stride_qh, stride_yb, groups_per_split, split_k, magic,
        BITS: tl.constexpr, GROUP: tl.constexpr, BK: tl.constexpr, BMW: tl.constexpr,
        BB: tl.constexpr,
        ZERO_IS_MIN: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
        LOOP_WHILE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """CUDA-core decode-GEMV: program (m, k, b) owns BMW words (BMW·VPW outputs) × a range of
        groups × BB rows of x. Partial sums stay per thread until one reduction at the end."""
        wait_prior(PDL)
        pid_b = tl.program_id(0)  # fastest: programs sharing weights run together (L2 reuse)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        if BITS == 3:
            VPW: tl.constexpr = 16
        else:
            VPW: tl.constexpr = 32 // BITS
        BM: tl.constexpr = BMW * VPW
        jw = pid_m * BMW + tl.arange(0, BMW)
        jwmask = jw < MW
        j = pid_m * BM + tl.arange(0, BM)
        jmask = j < M
        fpow = _uq_fs_pow(BMW, BITS, False)
        ifpow = _uq_fs_pow(BMW, BITS, True)
        bvec = pid_b * BB + tl.arange(0, BB)
        bmask = bvec < B
        if BB == 1:
            acc = tl.zeros([BK, BM], tl.float32)
        else:
            acc = tl.zeros([BB, BK, BM], tl.float32)
        g0 = pid_k * groups_per_split
        g1 = tl.minimum(g0 + groups_per_split, N // GROUP)
        if LOOP_WHILE:  # the interpreter cannot take a runtime range() bound (numpy 2 scalars)
            g = g0
            while g < g1:
                acc = _uq_gemv_group(acc, g, x_ptr, qw_ptr, qh_ptr, s_ptr, z_ptr, perm_ptr, jw, jwmask, j,
                                     jmask, fpow, ifpow, pid_b * BB, bvec, bmask, M, N, stride_xb, stride_qw,
                                     stride_qh, magic,
                                     BITS, GROUP, BK, BB, ZERO_IS_MIN, HAS_PERM)
                g += 1
        else:
            for g in range(g0, g1):
                acc = _uq_gemv_group(acc, g, x_ptr, qw_ptr, qh_ptr, s_ptr, z_ptr, perm_ptr, jw, jwmask, j,
                                     jmask, fpow, ifpow, pid_b * BB, bvec, bmask, M, N, stride_xb, stride_qw,
                                     stride_qh, magic,
                                     BITS, GROUP, BK, BB, ZERO_IS_MIN, HAS_PERM)
        if BB == 1:
            y = tl.sum(acc, axis=0)[None, :]  # [1, BM]
        else:
            y = tl.sum(acc, axis=1)  # [BB, BM]
        _splitk_finish(y, y_ptr, bias_ptr, ws_ptr, cnt_ptr, j, bvec, jmask, M, B, stride_yb,
                       pid_m, pid_k, pid_b, tl.num_programs(1), split_k, HAS_BIAS, LOOP_WHILE)

    @triton.jit
    def _uq_wtile(qw_ptr, qh_ptr, s_ptr, z_ptr, k0, kk, kmask, jw, jwmask, j, jmask, fpow, ifpow, M,
                  stride_qw, stride_qh, magic,
                  BITS: tl.constexpr, GROUP: tl.constexpr, ZERO_IS_MIN: tl.constexpr):
        """Dequantized weight tile Wᵀ [BK, BM] (float32) of inputs k0 + arange(BK), one group."""
        sc, zc, mn = _uq_group_vectors(s_ptr, z_ptr, k0 // GROUP, j, jmask, fpow, ifpow, M, ZERO_IS_MIN)
        d = _uq_tile(qw_ptr, qh_ptr, kk, jw, kmask, jwmask, stride_qw, stride_qh, magic, BITS) - zc
        w = d * sc
        if ZERO_IS_MIN:
            w += mn
        return w

    @triton.jit
    def _uq_mma_kernel(
        x_ptr, qw_ptr, qh_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, MW, N, B, stride_xb, stride_qw, stride_qh, stride_yb, tiles_per_split, split_k, magic,
        BITS: tl.constexpr, GROUP: tl.constexpr, BK: tl.constexpr, BMW: tl.constexpr,
        BB: tl.constexpr,
        ZERO_IS_MIN: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
        LOOP_WHILE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Tensor cores: y[BB, BM] += x[BB, BK] · Wᵀ[BK, BM], Wᵀ decoded to x's dtype in registers."""
        wait_prior(PDL)
        pid_b = tl.program_id(0)  # fastest: programs sharing weights run together (L2 reuse)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        if BITS == 3:
            VPW: tl.constexpr = 16
        else:
            VPW: tl.constexpr = 32 // BITS
        BM: tl.constexpr = BMW * VPW
        jw = pid_m * BMW + tl.arange(0, BMW)
        jwmask = jw < MW
        j = pid_m * BM + tl.arange(0, BM)
        jmask = j < M
        fpow = _uq_fs_pow(BMW, BITS, False)
        ifpow = _uq_fs_pow(BMW, BITS, True)
        bvec = pid_b * BB + tl.arange(0, BB)
        bmask = bvec < B
        acc = tl.zeros([BB, BM], tl.float32)
        t0 = pid_k * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, N // BK)
        if LOOP_WHILE:
            t = t0
            while t < t1:
                kk = t * BK + tl.arange(0, BK)
                kmask = kk < N
                w = _uq_wtile(qw_ptr, qh_ptr, s_ptr, z_ptr, t * BK, kk, kmask, jw, jwmask, j, jmask, fpow, ifpow, M,
                              stride_qw, stride_qh, magic, BITS, GROUP, ZERO_IS_MIN)
                xv = _uq_x(x_ptr, perm_ptr, bvec, bmask, kk, kmask, stride_xb, HAS_PERM)
                acc = tl.dot(xv.to(x_ptr.dtype.element_ty), w.to(x_ptr.dtype.element_ty), acc)
                t += 1
        else:
            for t in range(t0, t1):
                kk = t * BK + tl.arange(0, BK)
                kmask = kk < N
                w = _uq_wtile(qw_ptr, qh_ptr, s_ptr, z_ptr, t * BK, kk, kmask, jw, jwmask, j, jmask, fpow, ifpow, M,
                              stride_qw, stride_qh, magic, BITS, GROUP, ZERO_IS_MIN)
                xv = _uq_x(x_ptr, perm_ptr, bvec, bmask, kk, kmask, stride_xb, HAS_PERM)
                acc = tl.dot(xv.to(x_ptr.dtype.element_ty), w.to(x_ptr.dtype.element_ty), acc)
        _splitk_finish(acc, y_ptr, bias_ptr, ws_ptr, cnt_ptr, j, bvec, jmask, M, B, stride_yb,
                       pid_m, pid_k, pid_b, tl.num_programs(1), split_k, HAS_BIAS, LOOP_WHILE)

    @triton.jit
    def _uq_dequant_kernel(
        qw_ptr, qh_ptr, s_ptr, z_ptr, w_ptr, M, MW, N, stride_qw, stride_qh, stride_w, magic,
        BITS: tl.constexpr, GROUP: tl.constexpr, BK: tl.constexpr, BMW: tl.constexpr,
        ZERO_IS_MIN: tl.constexpr,
    ):
        """Wᵀ [N, M] (inputs in packed order) in w_ptr's dtype; one [BK, BM] tile per program."""
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        if BITS == 3:
            VPW: tl.constexpr = 16
        else:
            VPW: tl.constexpr = 32 // BITS
        BM: tl.constexpr = BMW * VPW
        jw = pid_m * BMW + tl.arange(0, BMW)
        jwmask = jw < MW
        j = pid_m * BM + tl.arange(0, BM)
        jmask = j < M
        fpow = _uq_fs_pow(BMW, BITS, False)
        ifpow = _uq_fs_pow(BMW, BITS, True)
        kk = pid_k * BK + tl.arange(0, BK)
        kmask = kk < N
        w = _uq_wtile(qw_ptr, qh_ptr, s_ptr, z_ptr, pid_k * BK, kk, kmask, jw, jwmask, j, jmask, fpow, ifpow, M,
                      stride_qw, stride_qh, magic, BITS, GROUP, ZERO_IS_MIN)
        tl.store(w_ptr + kk[:, None] * stride_w + j[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=kmask[:, None] & jmask[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers, configuration choice and the cached tuner
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UQConfig:
    """One launch choice. kind: "gemv" (CUDA cores), "mma" (tensor cores), "dequant" (+cuBLAS), or
    "frag": int4 on tensor cores from a layer held in the fragment layout (row_tiles, num_warps,
    prefetch; `uniform_frag_triton.frag_configs` / `frag_run`, never a packed layer's launch).

    bk: input rows per tile (must divide the group size), bmw: packed words per tile row (outputs
    = bmw · values per word), bb: rows of x per program, split_k: programs along the input."""
    kind: str
    bk: int = 16
    bmw: int = 32
    bb: int = 1
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 1
    max_registers: int = 0  # > 0: Triton's maxnreg (more programs an SM; ptxas may spill)
    row_tiles: int = 1  # "frag": 16-output row tiles a program
    prefetch: int = 2  # "frag": steps of loads in flight


_MAGIC = 0x4B000000  # float32 bits of 2^23


def _strides(p: UniformPacked):
    qh = p.qweight_hi if p.qweight_hi is not None else p.qweight
    return qh, p.qweight.stride(0), qh.stride(0)


def _launch_fused(x2, p: UniformPacked, bias, cfg: UQConfig, out):
    M, N = p.out_features, p.in_features
    B = x2.shape[0]
    vpw = values_per_word(p.bits)
    bk = min(cfg.bk, p.group_size)
    if p.group_size % bk:
        raise ValueError(f"bk {bk} must divide the group size {p.group_size}")
    bmw = min(cfg.bmw, triton.next_power_of_2(M // vpw))
    grid_m = triton.cdiv(M // vpw, bmw)
    grid_b = triton.cdiv(B, cfg.bb)
    if cfg.kind == "gemv":
        units = N // p.group_size  # a split owns whole groups (the scale is applied per group)
    else:
        units = N // bk
    per = triton.cdiv(units, max(1, min(cfg.split_k, units)))
    split = triton.cdiv(units, per)  # no empty splits
    ws, cnt = split_workspace(x2.device, split * B * M, grid_m * grid_b)  # always: one kernel signature
    qh, s_qw, s_qh = _strides(p)
    perm = p.perm if p.perm is not None else p.qweight
    bias_t = bias if bias is not None else out
    common = dict(BITS=p.bits, GROUP=p.group_size, BK=bk, BMW=bmw, BB=cfg.bb,
                  ZERO_IS_MIN=p.zero_is_min, HAS_PERM=p.perm is not None, HAS_BIAS=bias is not None,
                  LOOP_WHILE=interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                  **launch_options(x2, x2.shape[0]))
    if cfg.max_registers and not interpreting():
        common["maxnreg"] = cfg.max_registers
    grid = (grid_b, grid_m, split)
    if cfg.kind == "gemv":
        _uq_gemv_kernel[grid](x2, p.qweight, qh, p.scales, p.zeros, perm, bias_t, out, ws, cnt,
                              M, M // vpw, N, B, x2.stride(0), s_qw, s_qh, out.stride(0), per, split, _MAGIC, **common)
    else:
        _uq_mma_kernel[grid](x2, p.qweight, qh, p.scales, p.zeros, perm, bias_t, out, ws, cnt,
                             M, M // vpw, N, B, x2.stride(0), s_qw, s_qh, out.stride(0), per, split, _MAGIC, **common)
    return out


def uniform_dequantize_t(p: UniformPacked, dtype=torch.float16, out=None, bk: int = 32, bmw: int = 16):
    """Wᵀ [n, m] (inputs in packed order), written by the Triton dequant kernel."""
    M, N = p.out_features, p.in_features
    if out is None:
        out = torch.empty(N, M, dtype=dtype, device=p.qweight.device)
    bk = min(bk, p.group_size)
    vpw = values_per_word(p.bits)
    bmw = min(bmw, triton.next_power_of_2(M // vpw))
    qh, s_qw, s_qh = _strides(p)
    _uq_dequant_kernel[(triton.cdiv(M // vpw, bmw), triton.cdiv(N, bk))](
        p.qweight, qh, p.scales, p.zeros, out, M, M // vpw, N, s_qw, s_qh, out.stride(0), _MAGIC,
        BITS=p.bits, GROUP=p.group_size, BK=bk, BMW=bmw, ZERO_IS_MIN=p.zero_is_min, num_warps=4,
    )
    return out


def uniform_dequantize(p: UniformPacked, dtype=torch.float16) -> torch.Tensor:
    """W [m, n] in the layer's own input order (Triton dequant, then perm undone)."""
    wt = uniform_dequantize_t(p, dtype)
    if p.perm is not None:
        w = torch.empty_like(wt)
        w[p.perm.long()] = wt
        wt = w
    return wt.T


def dequant_matmul(x2, wt: torch.Tensor, perm: torch.Tensor | None, bias, out):
    """out = x2 @ Wᵀ (+ bias) by cuBLAS, Wᵀ [n, m] decoded in packed input order (x taken in it)."""
    xin = x2 if perm is None else x2.index_select(1, perm.long())
    torch.matmul(xin, wt, out=out)
    if bias is not None:
        out += bias
    return out


def _launch_dequant_matmul(x2, p: UniformPacked, bias, out):
    return dequant_matmul(x2, uniform_dequantize_t(p, dtype=x2.dtype), p.perm, bias, out)


def run_config(x2, p: UniformPacked, bias, cfg: UQConfig, out=None):
    if out is None:
        out = torch.empty(x2.shape[0], p.out_features, dtype=x2.dtype, device=x2.device)
    if cfg.kind == "dequant":
        return _launch_dequant_matmul(x2, p, bias, out)
    if cfg.kind not in ("gemv", "mma"):
        raise ValueError(f"a packed layer runs gemv, mma or dequant launches, not {cfg.kind!r} (the int4 "
                         "tensor-core kernel reads the fragment layout: uniform_frag_triton.frag_run)")
    return _launch_fused(x2, p, bias, cfg, out)


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_for(ctas: int, units: int, sms: int) -> int:
    split = 1
    while ctas * split < 2 * sms and units // (split * 2) >= 2:
        split *= 2
    return split


def heuristic_config(p: UniformPacked, batch: int, device) -> UQConfig:
    """A reasonable launch without timing anything (first use under graph capture, CPU tests)."""
    M, N = p.out_features, p.in_features
    vpw = values_per_word(p.bits)
    sms = _num_sms(device)
    if batch > 64:
        return UQConfig("dequant")
    if batch == 1:
        bmw = 256 // vpw  # 256 outputs: 32 values per thread at 4 bits
        ctas = triton.cdiv(M // vpw, bmw)
        return UQConfig("gemv", bk=min(16, p.group_size), bmw=bmw,
                        split_k=_split_for(ctas, N // p.group_size, sms))
    bb = max(16, min(64, triton.next_power_of_2(batch)))
    bk = min(64, p.group_size)
    bmw = 128 // vpw
    ctas = triton.cdiv(M // vpw, bmw) * triton.cdiv(batch, bb)
    return UQConfig("mma", bk=bk, bmw=bmw, bb=bb, split_k=_split_for(ctas, N // bk, sms), num_stages=2)


def candidate_configs(p: UniformPacked, batch: int, device) -> list[UQConfig]:
    """What the tuner times for one (shape, batch). Tile shapes are few (each is a compile);
    the split is a run-time argument, so trying several costs no compile. The int4 tensor-core
    kernel is no candidate here: it reads its own layout, which a layer holds in place of this one
    (`quantized_models.uniform.use_fragment_layouts`; tuned by `uniform_frag_triton.frag_configs`)."""
    M, N = p.out_features, p.in_features
    vpw = values_per_word(p.bits)
    sms = _num_sms(device)
    cands: list[UQConfig] = []
    if batch <= 2:
        # one row of x per program; with 2 rows the two programs sharing a tile run side by side
        # (16, 128, 4) compiles to 115 registers for sm_90 (4 programs an SM), the others to 165–198 (3)
        for bk, out_tile, warps in ((16, 256, 4), (32, 128, 4), (32, 256, 8), (16, 128, 4)):
            bk = min(bk, p.group_size)
            bmw = max(1, out_tile // vpw)
            ctas = triton.cdiv(M // vpw, bmw) * batch
            s0 = _split_for(ctas, N // p.group_size, sms)
            for split in sorted({max(1, s0 // 2), s0, s0 * 2}):
                cands.append(UQConfig("gemv", bk=bk, bmw=bmw, bb=1, split_k=split, num_warps=warps))
    if batch >= 2:
        bb = max(16, min(64, triton.next_power_of_2(batch)))
        for out_tile, bk in ((128, 64), (64, 64)):
            bmw = max(1, out_tile // vpw)
            bk = min(bk, p.group_size)
            ctas = triton.cdiv(M // vpw, bmw) * triton.cdiv(batch, bb)
            s0 = _split_for(ctas, N // bk, sms)
            for split in sorted({max(1, s0 // 2), s0, s0 * 2}):
                cands.append(UQConfig("mma", bk=bk, bmw=bmw, bb=bb, split_k=split, num_stages=2))
    if batch >= 16:
        cands.append(UQConfig("dequant"))
    return cands


_TUNED: dict[tuple, UQConfig] = {}


def tune_key(p: UniformPacked, batch: int, dtype) -> tuple:
    return (p.bits, p.group_size, p.out_features, p.in_features, p.zero_is_min, p.perm is not None,
            batch_bucket(batch), str(dtype))


def tune(x2, p: UniformPacked, bias=None, cands=None) -> tuple[UQConfig, list]:
    """Time every candidate as a decode step runs it (`tuning.cold_us`), cache the fastest."""
    cands = cands or candidate_configs(p, x2.shape[0], x2.device)
    out = torch.empty(x2.shape[0], p.out_features, dtype=x2.dtype, device=x2.device)
    best, timings = time_candidates(lambda cfg: run_config(x2, p, bias, cfg, out), cands, x2.device)
    _TUNED[tune_key(p, x2.shape[0], x2.dtype)] = best
    return best, timings


def choose_config(x2, p: UniformPacked, bias=None) -> UQConfig:
    return choose(_TUNED, tune_key(p, x2.shape[0], x2.dtype), x2, lambda: tune(x2, p, bias)[0],
                  lambda: heuristic_config(p, x2.shape[0], x2.device), UQConfig,
                  lambda: candidate_configs(p, x2.shape[0], x2.device))


def uniform_matmul(x: torch.Tensor, p: UniformPacked, bias: torch.Tensor | None = None,
                   config: UQConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) for a packed uniform layer; x [..., n] fp16/bf16 (fp32 on the interpreter)."""
    x2, lead = as_rows(x)
    cfg = config or choose_config(x2, p, bias)
    y = run_config(x2, p, bias, cfg, out)
    return y.reshape(*lead, p.out_features)
