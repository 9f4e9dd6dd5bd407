"""Fused Triton kernels for QTIP layers: trellis decode + GEMV/GEMM, the weight never in memory.

A QTIP layer computes y = (H_m · (Ŵ · (H_nᵀ (x ⊙ SU) / 32))) ⊙ SV·32 (+ bias), Ŵ the decoded codes
(../shared/specs/qtip.md, `lowbit.kernels.qtip` holds the plain-PyTorch references). A forward is
three launches: the input transform (`hadamard_triton`, SU and 1/32 fused), one decode kernel
producing y_raw = xh @ Ŵᵀ in float32, and the output transform (SV·32, bias and the cast fused).

Decode kernels, chosen per (shape, batch) by a cached tuner:
* `qtip_frag_triton._hyb_frag_kernel` (kind "frag", batch 1–64, HYB): tiles decoded lane by lane
  straight into `mma.sync` fragments (one decode for every 8-row block of x), the table
  replicated per bank in shared memory.
* `_hyb_gemv_kernel` (batch 1–4, CUDA cores): the published HYB layout (`quantlut_sym`, L=16, V=2,
  16×16 tiles, K=2/3/4). A thread owns a *unit* = 16 weight pairs of one tile that share the tile
  rows r8 and r8+8 (t = 16·r8 + 4·q4 + 2·a + b puts state t in row 8b+r8, column pair 4a+q4), whose
  states are the bits of K consecutive 32-bit words plus the next one: every state is one
  compile-time funnel shift of two registers. The code is h = s·(s+1); bits 6..14 index a
  512-entry table of fp16 pairs that the program keeps in shared memory (`tl.gather`), bit 15
  flips the first value's sign, and the pair meets the matching x pair in two FFMAs. Several batch
  rows reuse each decoded pair.
* `_hyb_mma_kernel` (batch 5–64): the same decode into an fp16 Wᵀ tile in registers, multiplied
  on tensor cores (`tl.dot`) with 16–64 rows of x.
* dequant + cuBLAS (prefill sizes): decode Ŵ once to fp16 (`qtip_frag_triton.frag_dequant`, the
  fragment decode with stores) and `torch.matmul`.
* `_gen_*`: every other configuration (1MAD, 3INST, quantlut, lut; any L, V, tile shape): states
  read with two word loads each, the same three strategies.
Split-K programs add their partial sums into y_raw with float atomics (the input transform zeroes
it in the same launch), so no program waits for another.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from ..quantized_models.linear import PendingOutput, finished
from . import fused
from .hadamard import hadamard_factor
from .hadamard_triton import hadamard_transform, rotary_plan, takes_chain
from .hadamard_triton import takes_gate as takes_gate  # QTIPLinear.forward_gated asks it
from .hadamard_triton import takes_norm as takes_norm_transform
from .pdl import launch_options, wait_prior
from .qtip import QTIPParams
from .qtip_frag_triton import even_launch, frag_dequant, frag_matmul, n_blocks
from .qtip_shared_triton import _be, _put
from .tuning import as_rows, batch_bucket, choose, interpreting, time_candidates

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

# The frag kernel takes up to 64 rows. With row-major x the tensor-core `mma` kernel won every
# measured shape at 64 (each frag warp read a cache line per x row); with row groups sharing
# fragment-order x the tuner tries frag up to 64 rows (H100, RESULTS.md, tenth session).
FRAG_TUNED_BATCH = 64

_MODE_ID = {"quantlut_sym": 0, "quantlut": 1, "lut": 2, "1mad": 3, "3inst": 4}

if triton is not None:

    # ------------------------------------------------------------------------------------------
    # HYB (kernel layout): unit words -> 16 states -> values
    # ------------------------------------------------------------------------------------------

    @triton.jit
    def _pick(w0, w1, w2, w3, w4, c: tl.constexpr):
        if c == 0:
            r = w0
        elif c == 1:
            r = w1
        elif c == 2:
            r = w2
        elif c == 3:
            r = w3
        else:
            r = w4
        return r

    @triton.jit
    def _hyb_state(w0, w1, w2, w3, w4, v: tl.constexpr, K: tl.constexpr):
        """State of slot v = 8·b + pc of a unit from its big-endian 32-bit words w0..wK (wK: the
        next unit's first word). Slot v is pair t = 16·r8 + 4·(pc % 4) + 2·(pc // 4) + b, i.e.
        unit bit offset 2K·(4·(pc % 4) + 2·(pc // 4) + b). Bits above the low 16 are left in:
        the code only reads h = s·(s+1) mod 2^16, which they cannot change."""
        b: tl.constexpr = v // 8
        pc: tl.constexpr = v % 8
        p: tl.constexpr = 2 * K * (4 * (pc % 4) + 2 * (pc // 4) + b)
        c: tl.constexpr = p // 32
        off: tl.constexpr = p % 32
        lo = _pick(w0, w1, w2, w3, w4, c)
        if off <= 16:
            s = lo >> (16 - off)
        else:
            hi = _pick(w0, w1, w2, w3, w4, c + 1)
            s = (lo << (off - 16)) | (hi >> (48 - off))
        return s

    @triton.jit
    def _j8(s0, s1, s2, s3, s4, s5, s6, s7):
        """[..., 2, 2, 2] with [..., e1, e2, e3] = s_{4·e1 + 2·e2 + e3} (joins keep all in-thread)."""
        return tl.join(tl.join(tl.join(s0, s4), tl.join(s2, s6)), tl.join(tl.join(s1, s5), tl.join(s3, s7)))

    @triton.jit
    def _hyb_states(w0, w1, w2, w3, w4, K: tl.constexpr):
        """The unit's 16 states as [..., 2 (b), 2, 2, 2 (pc = 4·e2 + 2·e3 + e4)]."""
        r0 = _j8(_hyb_state(w0, w1, w2, w3, w4, 0, K), _hyb_state(w0, w1, w2, w3, w4, 1, K),
                 _hyb_state(w0, w1, w2, w3, w4, 2, K), _hyb_state(w0, w1, w2, w3, w4, 3, K),
                 _hyb_state(w0, w1, w2, w3, w4, 4, K), _hyb_state(w0, w1, w2, w3, w4, 5, K),
                 _hyb_state(w0, w1, w2, w3, w4, 6, K), _hyb_state(w0, w1, w2, w3, w4, 7, K))
        r1 = _j8(_hyb_state(w0, w1, w2, w3, w4, 8, K), _hyb_state(w0, w1, w2, w3, w4, 9, K),
                 _hyb_state(w0, w1, w2, w3, w4, 10, K), _hyb_state(w0, w1, w2, w3, w4, 11, K),
                 _hyb_state(w0, w1, w2, w3, w4, 12, K), _hyb_state(w0, w1, w2, w3, w4, 13, K),
                 _hyb_state(w0, w1, w2, w3, w4, 14, K), _hyb_state(w0, w1, w2, w3, w4, 15, K))
        return tl.permute(tl.join(r0, r1), (0, 1, 2, 6, 3, 4, 5))

    @triton.jit
    def _hyb_unit_words(codes_ptr, unit, r8, msk, K: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
        """Big-endian words w0..wK of units [BI, BJ, 8] (dword offset unit·K in the int32 view of
        the codes; wK is the next unit's first word, the tile's first for r8 = 7)."""
        off = unit * K
        if K == 2:
            d = tl.load(codes_ptr + off[:, :, :, None] + tl.arange(0, 2)[None, None, None, :],
                        mask=msk[:, :, :, None], other=0)
            d0, d1 = tl.split(d)
            w0 = _be(d0)
            w1 = _be(d1)
            w2 = w1
            w3 = w1
        elif K == 4:
            d = tl.load(codes_ptr + off[:, :, :, None] + tl.arange(0, 4)[None, None, None, :],
                        mask=msk[:, :, :, None], other=0)
            e0, e1 = tl.split(tl.reshape(d, [BI, BJ, 8, 2, 2]))
            d0, d2 = tl.split(e0)
            d1, d3 = tl.split(e1)
            w0 = _be(d0)
            w1 = _be(d1)
            w2 = _be(d2)
            w3 = _be(d3)
        else:
            w0 = _be(tl.load(codes_ptr + off, mask=msk, other=0))
            w1 = _be(tl.load(codes_ptr + off + 1, mask=msk, other=0))
            w2 = _be(tl.load(codes_ptr + off + 2, mask=msk, other=0))
            w3 = w2
        nxt = tl.where(r8 == 7, off - 7 * K, off + K)
        wn = _be(tl.load(codes_ptr + nxt, mask=msk, other=0))
        if K == 2:
            w2 = wn
        elif K == 3:
            w3 = wn
        return w0, w1, w2, w3, wn

    @triton.jit
    def _hyb_decode(codes_ptr, lut, lut_ptr, unit, r8, msk, K: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                    LUT_SMEM: tl.constexpr):
        """Values (v0, v1) float32 [BI, BJ, 8, 2, 2, 2, 2] of the units' 16 pairs."""
        w0, w1, w2, w3, w4 = _hyb_unit_words(codes_ptr, unit, r8, msk, K, BI, BJ)
        s = _hyb_states(w0, w1, w2, w3, w4, K)
        h = s * s + s
        idx = ((h >> 6) & 511).to(tl.int32)
        if LUT_SMEM:
            pk = tl.reshape(tl.gather(lut, tl.reshape(idx, [BI * BJ * 128]), 0), [BI, BJ, 8, 2, 2, 2, 2])
        else:
            pk = tl.load(lut_ptr + idx)
        pk = pk ^ (h & 0x8000).to(tl.int32)
        v0 = (pk & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        v1 = ((pk >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        return v0, v1

    @triton.jit
    def _hyb_x(x_ptr, row, col0, jmask, BI: tl.constexpr, BJ: tl.constexpr):
        """x pairs (x0, x1) [1 or BI, BJ, 8, 1, 2, 2, 2] of tile columns: x0[pc] = x[16j + 2pc],
        x1[pc] = x[16j + 2pc + 1], loaded as four 16-byte quads per thread."""
        base = x_ptr + row + col0[None, :, None, None] + tl.arange(0, 4)[None, None, None, :]
        m = jmask[None, :, None, None]
        shp: tl.constexpr = [1, BJ, 8, 4]
        q0 = tl.load(tl.broadcast_to(base, shp), mask=tl.broadcast_to(m, shp), other=0.0).to(tl.float32)
        q1 = tl.load(tl.broadcast_to(base + 4, shp), mask=tl.broadcast_to(m, shp), other=0.0).to(tl.float32)
        q2 = tl.load(tl.broadcast_to(base + 8, shp), mask=tl.broadcast_to(m, shp), other=0.0).to(tl.float32)
        q3 = tl.load(tl.broadcast_to(base + 12, shp), mask=tl.broadcast_to(m, shp), other=0.0).to(tl.float32)
        # quad q = (x0[2q], x1[2q], x0[2q+1], x1[2q+1])
        a0, b0 = tl.split(tl.reshape(q0, [1, BJ, 8, 2, 2]))
        a1, b1 = tl.split(tl.reshape(q1, [1, BJ, 8, 2, 2]))
        a2, b2 = tl.split(tl.reshape(q2, [1, BJ, 8, 2, 2]))
        a3, b3 = tl.split(tl.reshape(q3, [1, BJ, 8, 2, 2]))
        e0, e1 = tl.split(a0)
        e2, e3 = tl.split(a1)
        e4, e5 = tl.split(a2)
        e6, e7 = tl.split(a3)
        o0, o1 = tl.split(b0)
        o2, o3 = tl.split(b1)
        o4, o5 = tl.split(b2)
        o6, o7 = tl.split(b3)
        x0 = tl.expand_dims(_j8(e0, e1, e2, e3, e4, e5, e6, e7), 3)
        x1 = tl.expand_dims(_j8(o0, o1, o2, o3, o4, o5, o6, o7), 3)
        return x0, x1

    @triton.jit
    def _rows_out(acc, BI: tl.constexpr):
        """acc [BI, BJ, 8, 2, 2, 2, 2] -> per-row sums [BI·16] in row order 16·i + 8·b + r8."""
        y = tl.sum(tl.sum(tl.sum(tl.sum(acc, 6), 5), 4), 1)  # [BI, 8 (r8), 2 (b)]
        return tl.reshape(tl.permute(y, (0, 2, 1)), [BI * 16])

    @triton.jit(do_not_specialize=["TM", "TN", "B", "tiles_per_split"])
    def _hyb_gemv_kernel(
        x_ptr, codes_ptr, lut_ptr, y_ptr,
        TM, TN, B, stride_xb, stride_yb, tiles_per_split,
        K: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BB: tl.constexpr,
        LUT_SMEM: tl.constexpr, ATOMIC: tl.constexpr, PDL: tl.constexpr,
    ):
        """y[b, rows] (+)= xh[b] · Ŵ[rows]ᵀ for BB ≤ 4 rows of x, BI tile rows, tile columns
        [pid_k·tiles_per_split, +tiles_per_split) in steps of BJ."""
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_b = tl.program_id(2)
        i = pid_m * BI + tl.arange(0, BI)
        r8 = tl.arange(0, 8)
        lut = tl.load(lut_ptr + tl.arange(0, 512))
        wait_prior(PDL)  # the table is a weight: read before the wait
        b0 = pid_b * BB
        shp: tl.constexpr = [BI, BJ, 8, 2, 2, 2, 2]
        acc0 = tl.zeros(shp, tl.float32)
        acc1 = tl.zeros(shp, tl.float32)
        acc2 = tl.zeros(shp, tl.float32)
        acc3 = tl.zeros(shp, tl.float32)
        t0 = pid_k * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, TN)
        for j0 in range(t0, t1, BJ):
            j = j0 + tl.arange(0, BJ)
            jmask = j < t1
            tile = i[:, None] * TN + j[None, :]
            unit = tile[:, :, None] * 8 + r8[None, None, :]
            msk = (i < TM)[:, None, None] & jmask[None, :, None] & (r8 < 8)[None, None, :]
            v0, v1 = _hyb_decode(codes_ptr, lut, lut_ptr, unit, r8[None, None, :] + unit * 0, msk, K, BI, BJ, LUT_SMEM)
            col0 = j * 16
            x0, x1 = _hyb_x(x_ptr, b0 * stride_xb, col0, jmask, BI, BJ)
            acc0 = tl.fma(v0, x0, acc0)
            acc0 = tl.fma(v1, x1, acc0)
            if BB > 1:
                x0, x1 = _hyb_x(x_ptr, (b0 + 1) * stride_xb, col0, jmask & (j * 0 + b0 + 1 < B), BI, BJ)
                acc1 = tl.fma(v0, x0, acc1)
                acc1 = tl.fma(v1, x1, acc1)
            if BB > 2:
                x0, x1 = _hyb_x(x_ptr, (b0 + 2) * stride_xb, col0, jmask & (j * 0 + b0 + 2 < B), BI, BJ)
                acc2 = tl.fma(v0, x0, acc2)
                acc2 = tl.fma(v1, x1, acc2)
            if BB > 3:
                x0, x1 = _hyb_x(x_ptr, (b0 + 3) * stride_xb, col0, jmask & (j * 0 + b0 + 3 < B), BI, BJ)
                acc3 = tl.fma(v0, x0, acc3)
                acc3 = tl.fma(v1, x1, acc3)
        rows = pid_m * BI * 16 + tl.arange(0, BI * 16)
        rmask = rows < TM * 16
        _put(y_ptr, b0 * stride_yb + rows, _rows_out(acc0, BI), rmask, ATOMIC)
        if BB > 1:
            _put(y_ptr, (b0 + 1) * stride_yb + rows, _rows_out(acc1, BI), rmask & (rows * 0 + b0 + 1 < B), ATOMIC)
        if BB > 2:
            _put(y_ptr, (b0 + 2) * stride_yb + rows, _rows_out(acc2, BI), rmask & (rows * 0 + b0 + 2 < B), ATOMIC)
        if BB > 3:
            _put(y_ptr, (b0 + 3) * stride_yb + rows, _rows_out(acc3, BI), rmask & (rows * 0 + b0 + 3 < B), ATOMIC)

    @triton.jit
    def _flat_words(codes_ptr, unit, r8, msk, K: tl.constexpr):
        """_hyb_unit_words for a flat [NU] vector of units; one load per word keeps every value in
        the units' layout (a [NU, K] load would be laid out for coalescing, then converted)."""
        off = unit * K
        w0 = _be(tl.load(codes_ptr + off, mask=msk, other=0))
        w1 = _be(tl.load(codes_ptr + off + 1, mask=msk, other=0))
        if K >= 3:
            w2 = _be(tl.load(codes_ptr + off + 2, mask=msk, other=0))
        if K == 4:
            w3 = _be(tl.load(codes_ptr + off + 3, mask=msk, other=0))
        wn = _be(tl.load(codes_ptr + tl.where(r8 == 7, off - 7 * K, off + K), mask=msk, other=0))
        if K == 2:
            w2 = wn
            w3 = wn
        elif K == 3:
            w3 = wn
        return w0, w1, w2, w3, wn

    @triton.jit
    def _flat_idx(w0, w1, w2, w3, w4, v: tl.constexpr, K: tl.constexpr):
        """(table index, code h) of slot v of every unit (see `_hyb_state`)."""
        s = _hyb_state(w0, w1, w2, w3, w4, v, K)
        h = s * s + s
        return ((h >> 6) & 511).to(tl.int32), h

    @triton.jit
    def _j4(a, b, c, d):
        return tl.join(tl.join(a, b), tl.join(c, d))

    @triton.jit
    def _s4(t):
        ab, cd = tl.split(t)
        a, b = tl.split(ab)
        c, d = tl.split(cd)
        return a, b, c, d

    @triton.jit
    def _flat_gather16(lut, lut_ptr, LUT_SMEM: tl.constexpr, ih):
        """lut[i] for the 16 slots' (index, code) pairs `ih`, as a tuple, in ONE gather (or one L1
        load): Triton's gather stores its table to shared memory (and syncs) per call, so the 16
        slots are joined in-thread first."""
        n: tl.constexpr = ih[0][0].shape[0]
        t = _j4(_j4(ih[0][0], ih[1][0], ih[2][0], ih[3][0]), _j4(ih[4][0], ih[5][0], ih[6][0], ih[7][0]),
                _j4(ih[8][0], ih[9][0], ih[10][0], ih[11][0]), _j4(ih[12][0], ih[13][0], ih[14][0], ih[15][0]))
        if LUT_SMEM:
            g = tl.reshape(tl.gather(lut, tl.reshape(t, [n * 16]), 0), [n, 2, 2, 2, 2])
        else:
            g = tl.load(lut_ptr + t)
        q0, q1, q2, q3 = _s4(g)
        return _s4(q0) + _s4(q1) + _s4(q2) + _s4(q3)

    @triton.jit
    def _flat_vals(pk, h):
        """Table word and code -> the pair (v0, v1) in float32, bit 15 of h flipping v0's sign."""
        pk = pk ^ (h & 0x8000).to(tl.int32)
        v0 = (pk & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        v1 = (pk >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        return v0, v1

    @triton.jit
    def _flat_acc(acc, pk, h, x0, x1):
        v0, v1 = _flat_vals(pk, h)
        return tl.fma(v1, x1, tl.fma(v0, x0, acc))

    @triton.jit
    def _flat_x(x_ptr, off, msk):
        """(x[off], x[off + 1]) float32 as two vectors in the units' layout."""
        return tl.load(x_ptr + off, mask=msk, other=0.0), tl.load(x_ptr + off + 1, mask=msk, other=0.0)

    @triton.jit
    def _flat_rows(acc, BI: tl.constexpr, BJ: tl.constexpr):
        """Per-unit partial sums [NU] -> row sums [BI, 8] (units are (tile row, tile column, r8))."""
        return tl.sum(tl.reshape(acc, [BI, BJ, 8]), 1)

    @triton.jit(do_not_specialize=["TM", "TN", "B", "tiles_per_split"])
    def _hyb_flat_kernel(
        x_ptr, codes_ptr, lut_ptr, y_ptr,
        TM, TN, B, stride_xb, stride_yb, tiles_per_split,
        K: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BB: tl.constexpr,
        LUT_SMEM: tl.constexpr, ATOMIC: tl.constexpr, PDL: tl.constexpr,
    ):
        """`_hyb_gemv_kernel`'s work (BB ≤ 2 rows of x) with every value a flat vector over the
        program's BI·BJ·8 units and the 16 slots unrolled: decoded values, x pairs and partial
        sums share one layout, so no step moves data between threads (no shared-memory layout
        conversions, no barriers in the loop besides the table gather)."""
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_b = tl.program_id(2)
        NU: tl.constexpr = BI * BJ * 8
        u = tl.arange(0, NU)
        r8 = u % 8
        jl = (u // 8) % BJ
        i = pid_m * BI + u // (8 * BJ)
        imask = i < TM
        lut = tl.load(lut_ptr + tl.arange(0, 512))
        wait_prior(PDL)  # the table is a weight: read before the wait
        b0 = pid_b * BB
        lo0 = tl.zeros([NU], tl.float32)
        hi0 = tl.zeros([NU], tl.float32)
        lo1 = tl.zeros([NU], tl.float32)
        hi1 = tl.zeros([NU], tl.float32)
        t0 = pid_k * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, TN)
        # Software pipelining by hand: the next step's code words are requested before this
        # step's decode, so each warp keeps a DRAM load in flight while it computes.
        jn = t0 + jl
        mn = imask & (jn < t1)
        n0, n1, n2, n3, n4 = _flat_words(codes_ptr, (i * TN + jn) * 8 + r8, r8, mn, K)
        for j0 in range(t0, t1, BJ):
            j = j0 + jl
            msk = imask & (j < t1)
            w0, w1, w2, w3, w4 = n0, n1, n2, n3, n4
            jn = j + BJ
            mn = imask & (jn < t1)
            n0, n1, n2, n3, n4 = _flat_words(codes_ptr, (i * TN + jn) * 8 + r8, r8, mn, K)
            ih = ()
            for v in tl.static_range(16):
                ih = ih + (_flat_idx(w0, w1, w2, w3, w4, v, K),)
            pk = _flat_gather16(lut, lut_ptr, LUT_SMEM, ih)
            xo = b0 * stride_xb + j * 16
            # slot pc and 8 + pc: rows r8 and 8 + r8, input columns 2pc and 2pc + 1
            for r in tl.static_range(BB):
                xm = msk & ((u * 0 + b0 + r) < B)
                xr = xo + r * stride_xb
                lo = lo0 if r == 0 else lo1
                hi = hi0 if r == 0 else hi1
                for pc in tl.static_range(8):
                    x0, x1 = _flat_x(x_ptr, xr + 2 * pc, xm)
                    lo = _flat_acc(lo, pk[pc], ih[pc][1], x0, x1)
                    hi = _flat_acc(hi, pk[8 + pc], ih[8 + pc][1], x0, x1)
                if r == 0:
                    lo0 = lo
                    hi0 = hi
                else:
                    lo1 = lo
                    hi1 = hi
        rows = (pid_m * BI + tl.arange(0, BI))[:, None] * 16 + tl.arange(0, 8)[None, :]
        rmask = rows < TM * 16
        _put(y_ptr, b0 * stride_yb + rows, _flat_rows(lo0, BI, BJ), rmask, ATOMIC)
        _put(y_ptr, b0 * stride_yb + rows + 8, _flat_rows(hi0, BI, BJ), rmask, ATOMIC)
        if BB > 1:
            m1 = rmask & (rows * 0 + b0 + 1 < B)
            _put(y_ptr, (b0 + 1) * stride_yb + rows, _flat_rows(lo1, BI, BJ), m1, ATOMIC)
            _put(y_ptr, (b0 + 1) * stride_yb + rows + 8, _flat_rows(hi1, BI, BJ), m1, ATOMIC)

    @triton.jit
    def _hyb_words_values16(lut, lut_ptr, w0, w1, w2, w3, w4, K: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                            LUT_SMEM: tl.constexpr):
        """The units' values as fp16 [BI, BJ, 8, 2 (b), 2, 2, 2 (pc), 2 (c)] from their loaded words
        (no float32 detour)."""
        s = _hyb_states(w0, w1, w2, w3, w4, K)
        h = s * s + s
        idx = ((h >> 6) & 511).to(tl.int32)
        if LUT_SMEM:
            pk = tl.reshape(tl.gather(lut, tl.reshape(idx, [BI * BJ * 128]), 0), [BI, BJ, 8, 2, 2, 2, 2])
        else:
            pk = tl.load(lut_ptr + idx)
        pk = pk ^ (h & 0x8000).to(tl.int32)
        v0 = (pk & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
        v1 = ((pk >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
        return tl.join(v0, v1)

    @triton.jit(do_not_specialize=["TM", "TN", "B", "tiles_per_split"])
    def _hyb_mma_kernel(
        x_ptr, codes_ptr, lut_ptr, y_ptr,
        TM, TN, B, stride_xb, stride_yb, tiles_per_split,
        K: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BB: tl.constexpr,
        LUT_SMEM: tl.constexpr, ATOMIC: tl.constexpr, PDL: tl.constexpr,
    ):
        """Tensor cores: y[BB rows, 16·BI] (+)= x[BB, 16·BJ] (fp16) @ Ŵᵀ tile (decoded to fp16)."""
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_b = tl.program_id(2)
        i = pid_m * BI + tl.arange(0, BI)
        r8 = tl.arange(0, 8)
        lut = tl.load(lut_ptr + tl.arange(0, 512))
        wait_prior(PDL)  # the table is a weight: read before the wait
        bv = pid_b * BB + tl.arange(0, BB)
        bmask = bv < B
        acc = tl.zeros([BB, BI * 16], tl.float32)
        t0 = pid_k * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, TN)
        # next step's code words requested before this step's decode (software pipelining)
        jn = t0 + tl.arange(0, BJ)
        unit = (i[:, None] * TN + jn[None, :])[:, :, None] * 8 + r8[None, None, :]
        mn = (i < TM)[:, None, None] & (jn < t1)[None, :, None] & (r8 < 8)[None, None, :]
        n0, n1, n2, n3, n4 = _hyb_unit_words(codes_ptr, unit, r8[None, None, :] + unit * 0, mn, K, BI, BJ)
        for j0 in range(t0, t1, BJ):
            w0, w1, w2, w3, w4 = n0, n1, n2, n3, n4
            jn = j0 + BJ + tl.arange(0, BJ)
            unit = (i[:, None] * TN + jn[None, :])[:, :, None] * 8 + r8[None, None, :]
            mn = (i < TM)[:, None, None] & (jn < t1)[None, :, None] & (r8 < 8)[None, None, :]
            n0, n1, n2, n3, n4 = _hyb_unit_words(codes_ptr, unit, r8[None, None, :] + unit * 0, mn, K, BI, BJ)
            w = _hyb_words_values16(lut, lut_ptr, w0, w1, w2, w3, w4, K, BI, BJ, LUT_SMEM)
            wt = tl.reshape(tl.permute(w, (1, 4, 5, 6, 7, 0, 3, 2)), [BJ * 16, BI * 16])
            cols = j0 * 16 + tl.arange(0, BJ * 16)
            xt = tl.load(x_ptr + bv[:, None] * stride_xb + cols[None, :],
                         mask=bmask[:, None] & (cols < t1 * 16)[None, :], other=0.0)
            acc = tl.dot(xt.to(tl.float16), wt, acc)
        rows = pid_m * BI * 16 + tl.arange(0, BI * 16)
        _put(y_ptr, bv[:, None] * stride_yb + rows[None, :], acc, bmask[:, None] & (rows < TM * 16)[None, :], ATOMIC)

    # ------------------------------------------------------------------------------------------
    # Generic layout: any (L, K, V, td_x, td_y, tlut_bits, decode mode)
    # ------------------------------------------------------------------------------------------

    @triton.jit
    def _gen_bits(codes_ptr, base, q, ln, W, msk):
        """`ln` (1..16) stream bits from bit q of the tile whose words start at `base`, as int64."""
        j = q // 16
        off = q % 16
        w0 = tl.load(codes_ptr + base + j, mask=msk, other=0).to(tl.int64) & 0xFFFF
        w1 = tl.load(codes_ptr + base + j + 1, mask=msk & (j + 1 < W), other=0).to(tl.int64) & 0xFFFF
        return (((w0 << 16) | w1) >> (32 - off - ln)) & ((1 << ln) - 1)

    @triton.jit
    def _gen_values(codes_ptr, tlut_ptr, r, c, msk, TN,
                    L: tl.constexpr, K: tl.constexpr, V: tl.constexpr, TDX: tl.constexpr, TDY: tl.constexpr,
                    W: tl.constexpr, SB: tl.constexpr, TB: tl.constexpr, MODE: tl.constexpr):
        """Decoded values float32 of weights (rows r, cols c) (broadcastable index tensors)."""
        tile = (r // TDX) * TN + (c // TDY)
        e = (r % TDX) * TDY + (c % TDY)
        t = e // V
        comp = e % V
        p = t * (K * V)
        base = tile.to(tl.int64) * W
        hl = tl.minimum(SB - p, L)  # stream bits left before the wrap
        rl = tl.maximum(L - hl, 1)
        first = _gen_bits(codes_ptr, base, p, hl, W, msk)
        wrapped = (first << (L - hl)) | _gen_bits(codes_ptr, base, p * 0, rl, W, msk)
        s = tl.where(hl < L, wrapped, first)
        if MODE == 0 or MODE == 1:
            h = s * (s + 1)
            if MODE == 0:
                idx = (h >> (15 - TB)) & ((1 << TB) - 1)
            else:
                idx = (h >> (16 - TB)) & ((1 << TB) - 1)
            val = tl.load(tlut_ptr + idx * V + comp, mask=msk, other=0.0).to(tl.float32)
            if MODE == 0:
                val = tl.where((comp == 0) & (((h >> 15) & 1) == 1), -val, val)
        elif MODE == 2:
            val = tl.load(tlut_ptr + s * V + comp, mask=msk, other=0.0).to(tl.float32)
        elif MODE == 3:
            x = (s * 34038481 + 76625530) & 0xFFFFFFFF
            tot = (x & 255) + ((x >> 8) & 255) + ((x >> 16) & 255) + (x >> 24)
            val = (tot - 510).to(tl.float32) / 147.800537109375
        else:
            x = (s * 89226354 + 64248484) & 0xFFFFFFFF
            rr = (x & 0x8FFF8FFF) ^ 996162400
            hi = (rr >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
            lo = (rr & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
            val = (hi + lo).to(tl.float16).to(tl.float32)  # exact float32 sum, rounded once to fp16
        return val

    @triton.jit(do_not_specialize=["M", "N", "TN", "B", "cols_per_split"])
    def _gen_gemv_kernel(
        x_ptr, codes_ptr, tlut_ptr, y_ptr,
        M, N, TN, B, stride_xb, stride_yb, cols_per_split,
        L: tl.constexpr, K: tl.constexpr, V: tl.constexpr, TDX: tl.constexpr, TDY: tl.constexpr,
        W: tl.constexpr, SB: tl.constexpr, TB: tl.constexpr, MODE: tl.constexpr,
        BM: tl.constexpr, BK: tl.constexpr, BB: tl.constexpr, ATOMIC: tl.constexpr, PDL: tl.constexpr,
    ):
        wait_prior(PDL)
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_b = tl.program_id(2)
        rows = pid_m * BM + tl.arange(0, BM)
        rmask = rows < M
        b0 = pid_b * BB
        acc0 = tl.zeros([BM, BK], tl.float32)
        acc1 = tl.zeros([BM, BK], tl.float32)
        acc2 = tl.zeros([BM, BK], tl.float32)
        acc3 = tl.zeros([BM, BK], tl.float32)
        c0 = pid_k * cols_per_split
        c1 = tl.minimum(c0 + cols_per_split, N)
        for k0 in range(c0, c1, BK):
            cols = k0 + tl.arange(0, BK)
            cmask = cols < c1
            w = _gen_values(codes_ptr, tlut_ptr, rows[:, None], cols[None, :], rmask[:, None] & cmask[None, :], TN,
                            L, K, V, TDX, TDY, W, SB, TB, MODE)
            acc0 += w * tl.load(x_ptr + b0 * stride_xb + cols, mask=cmask, other=0.0)[None, :]
            if BB > 1:
                acc1 += w * tl.load(x_ptr + (b0 + 1) * stride_xb + cols, mask=cmask & (cols * 0 + b0 + 1 < B),
                                    other=0.0)[None, :]
            if BB > 2:
                acc2 += w * tl.load(x_ptr + (b0 + 2) * stride_xb + cols, mask=cmask & (cols * 0 + b0 + 2 < B),
                                    other=0.0)[None, :]
            if BB > 3:
                acc3 += w * tl.load(x_ptr + (b0 + 3) * stride_xb + cols, mask=cmask & (cols * 0 + b0 + 3 < B),
                                    other=0.0)[None, :]
        _put(y_ptr, b0 * stride_yb + rows, tl.sum(acc0, 1), rmask, ATOMIC)
        if BB > 1:
            _put(y_ptr, (b0 + 1) * stride_yb + rows, tl.sum(acc1, 1), rmask & (rows * 0 + b0 + 1 < B), ATOMIC)
        if BB > 2:
            _put(y_ptr, (b0 + 2) * stride_yb + rows, tl.sum(acc2, 1), rmask & (rows * 0 + b0 + 2 < B), ATOMIC)
        if BB > 3:
            _put(y_ptr, (b0 + 3) * stride_yb + rows, tl.sum(acc3, 1), rmask & (rows * 0 + b0 + 3 < B), ATOMIC)

    @triton.jit(do_not_specialize=["M", "N", "TN", "B", "cols_per_split"])
    def _gen_mma_kernel(
        x_ptr, codes_ptr, tlut_ptr, y_ptr,
        M, N, TN, B, stride_xb, stride_yb, cols_per_split,
        L: tl.constexpr, K: tl.constexpr, V: tl.constexpr, TDX: tl.constexpr, TDY: tl.constexpr,
        W: tl.constexpr, SB: tl.constexpr, TB: tl.constexpr, MODE: tl.constexpr,
        BM: tl.constexpr, BK: tl.constexpr, BB: tl.constexpr, ATOMIC: tl.constexpr, PDL: tl.constexpr,
    ):
        wait_prior(PDL)
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_b = tl.program_id(2)
        rows = pid_m * BM + tl.arange(0, BM)
        rmask = rows < M
        bv = pid_b * BB + tl.arange(0, BB)
        bmask = bv < B
        acc = tl.zeros([BB, BM], tl.float32)
        c0 = pid_k * cols_per_split
        c1 = tl.minimum(c0 + cols_per_split, N)
        for k0 in range(c0, c1, BK):
            cols = k0 + tl.arange(0, BK)
            cmask = cols < c1
            wt = _gen_values(codes_ptr, tlut_ptr, rows[None, :], cols[:, None], cmask[:, None] & rmask[None, :], TN,
                             L, K, V, TDX, TDY, W, SB, TB, MODE)
            xt = tl.load(x_ptr + bv[:, None] * stride_xb + cols[None, :], mask=bmask[:, None] & cmask[None, :],
                         other=0.0)
            acc = tl.dot(xt.to(tl.float16), wt.to(tl.float16), acc)
        _put(y_ptr, bv[:, None] * stride_yb + rows[None, :], acc, bmask[:, None] & rmask[None, :], ATOMIC)

    @triton.jit(do_not_specialize=["M", "N", "TN"])
    def _gen_dequant_kernel(
        codes_ptr, tlut_ptr, w_ptr, M, N, TN, stride_w,
        L: tl.constexpr, K: tl.constexpr, V: tl.constexpr, TDX: tl.constexpr, TDY: tl.constexpr,
        W: tl.constexpr, SB: tl.constexpr, TB: tl.constexpr, MODE: tl.constexpr,
        BM: tl.constexpr, BK: tl.constexpr,
    ):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BK + tl.arange(0, BK)
        msk = (rows < M)[:, None] & (cols < N)[None, :]
        w = _gen_values(codes_ptr, tlut_ptr, rows[:, None], cols[None, :], msk, TN, L, K, V, TDX, TDY, W, SB, TB, MODE)
        tl.store(w_ptr + rows[:, None] * stride_w + cols[None, :], w.to(w_ptr.dtype.element_ty), mask=msk)


# ----------------------------------------------------------------------------------------------
# Launch choices and the cached tuner
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QTIPConfig:
    """One launch choice. kind: "frag" (HYB, ≤ 64 rows of x, tiles decoded straight into mma
    fragments and multiplied by each 8-row block of x, `qtip_frag_triton`; cols = 16 · num_warps,
    a tile column per warp, bb = 8), "flat" (HYB,
    CUDA cores, ≤ 2 rows of x, one layout throughout), "gemv" (CUDA cores, ≤ 4 rows of x per
    program), "mma" (tensor cores, bb ≥ 16 rows) or "dequant" (decode Ŵ to fp16, then cuBLAS).

    rows × cols: weights a program covers per step (multiples of 16: whole trellis tiles for HYB),
    split_k: programs along the input, lut_smem: HYB table in shared memory (else read via L1)."""
    kind: str
    rows: int = 16
    cols: int = 256
    bb: int = 1
    split_k: int = 1
    num_warps: int = 4
    lut_smem: bool = True
    table_copies: int = 32  # frag: copies of the HYB table in shared memory (8, 16 or 32)
    prefetch: int = 2  # frag: steps the code words and x are loaded ahead (unmasked launches)
    max_registers: int = 0  # frag: register cap a thread (Triton's maxnreg; 0 = the compiler's choice)
    frag_x: bool = False  # frag: the input transform writes x in the kernel's fragment order
    peel: bool = True  # frag, unmasked launches: the loop without masks (False: masked loads ahead)

    def frag_launch(self) -> tuple[int, int]:
        """frag: (row tiles a warp, warps along the tile columns). cols / 16 warps walk the tile
        columns; the rest of the warps form row groups, rows / 16 row tiles in all."""
        wc = self.cols // 16
        return self.rows // 16 // (self.num_warps // wc), wc

    def __str__(self) -> str:
        if self.kind == "dequant":
            return "dequant+cuBLAS"
        lut = "" if self.lut_smem else " lut=L1"
        if self.kind == "frag" and self.table_copies != 32:
            lut = f" t{self.table_copies}"
        if self.kind == "frag" and self.prefetch != 2:
            lut += f" pf{self.prefetch}"
        if self.kind == "frag" and self.max_registers:
            lut += f" r{self.max_registers}"
        if self.kind == "frag" and self.frag_x:
            lut += " xf"
        if self.kind == "frag" and not self.peel:
            lut += " masked"
        return f"{self.kind} {self.rows}x{self.cols} bb={self.bb} s{self.split_k} w{self.num_warps}{lut}"


def _hyb(p: QTIPParams) -> bool:
    return p.kernel_layout


def _steps(layer, cfg: QTIPConfig) -> tuple[int, int]:
    """(units of the input dim a split owns, number of splits): HYB counts tile columns, generic
    counts input columns; a split owns a whole number of steps."""
    p = layer.params
    if _hyb(p):
        total, step = layer.in_features // 16, cfg.cols // 16
    else:
        total, step = layer.in_features, cfg.cols
    steps = triton.cdiv(total, step)
    per = triton.cdiv(steps, max(1, min(cfg.split_k, steps))) * step
    return per, triton.cdiv(total, per)


def _gen_consts(p: QTIPParams) -> dict:
    return dict(L=p.L, K=p.K, V=p.V, TDX=p.td_x, TDY=p.td_y, W=p.words_per_tile, SB=p.stream_bits,
                TB=p.tlut_bits, MODE=_MODE_ID[p.decode_mode])


def _lut32(layer) -> torch.Tensor:
    """HYB table [512, 2] fp16 as 512 int32 (value 0 in the low half)."""
    return layer.tlut.view(torch.int32).reshape(-1)


def decode_matmul(layer, xh: torch.Tensor, cfg: QTIPConfig, out: torch.Tensor) -> torch.Tensor:
    """out [B, m] (float32) = xh [B, n] @ Ŵᵀ with a fused kernel. With cfg's split > 1 the splits
    add into `out` atomically, so it must hold zeros (see `splits`)."""
    p = layer.params
    m, n = layer.out_features, layer.in_features
    B = out.shape[0]
    per, split = _steps(layer, cfg)
    atomic = split > 1
    bb = cfg.bb
    grid_b = triton.cdiv(B, bb)
    common = dict(num_warps=cfg.num_warps, ATOMIC=atomic, **launch_options(xh, B))
    if cfg.kind == "frag":
        rt, wc = cfg.frag_launch()
        frag_matmul(layer.codes, _lut32(layer), p.K, xh, out, rt, cfg.num_warps, per, atomic,
                    cfg.table_copies, cfg.prefetch, cfg.max_registers, wc, cfg.frag_x, cfg.peel)
    elif _hyb(p):
        bi, bj = cfg.rows // 16, cfg.cols // 16
        grid = (triton.cdiv(m // 16, bi), split, grid_b)
        kern = {"gemv": _hyb_gemv_kernel, "flat": _hyb_flat_kernel, "mma": _hyb_mma_kernel}[cfg.kind]
        kern[grid](xh, layer.codes.view(torch.int32), _lut32(layer), out, m // 16, n // 16, B,
                   xh.stride(0), out.stride(0), per, K=p.K, BI=bi, BJ=bj, BB=bb, LUT_SMEM=cfg.lut_smem, **common)
    else:
        tlut = layer.tlut if layer.tlut is not None else layer.codes
        grid = (triton.cdiv(m, cfg.rows), split, grid_b)
        kern = _gen_gemv_kernel if cfg.kind == "gemv" else _gen_mma_kernel
        kern[grid](xh, layer.codes, tlut, out, m, n, n // p.td_y, B, xh.stride(0), out.stride(0), per,
                   BM=cfg.rows, BK=cfg.cols, BB=bb, **_gen_consts(p), **common)
    return out


def dequantize_codes(layer, dtype=torch.float16, out: torch.Tensor | None = None) -> torch.Tensor:
    """Ŵ [m, n] decoded by a Triton kernel (the decoded code matrix, before SU/SV and Hadamards)."""
    p = layer.params
    m, n = layer.out_features, layer.in_features
    if out is None:
        out = torch.empty(m, n, dtype=dtype, device=layer.codes.device)
    if _hyb(p):  # the fragment kernel's decode, stored (fp16: the table's values are fp16)
        w16 = out if out.dtype == torch.float16 and out.is_contiguous() else torch.empty(
            m, n, dtype=torch.float16, device=layer.codes.device)
        frag_dequant(layer.codes, _lut32(layer), p.K, w16)
        if w16 is not out:
            out.copy_(w16)
    else:
        bm, bk = (128, 128) if interpreting() else (32, 64)  # the interpreter pays per program
        tlut = layer.tlut if layer.tlut is not None else layer.codes
        _gen_dequant_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bk))](
            layer.codes, tlut, out, m, n, n // p.td_y, out.stride(0), BM=bm, BK=bk, **_gen_consts(p))
    return out


def _chunks(layer, side: int) -> int:
    return layer.tp_rank if layer.rcp == side else 1


def xh_rows(cfg: QTIPConfig, batch: int) -> int:
    """Rows of the transformed input a decode kernel reads for `batch` rows of x: the fragment-order
    buffer holds whole n-blocks of 8."""
    return 8 * n_blocks(batch) if cfg.kind == "frag" and cfg.frag_x else batch


def xh_dtype(cfg: QTIPConfig) -> torch.dtype:
    """dtype of the transformed input xh a decode kernel reads: the frag kernel reads fp16 pairs
    (and the dequant path feeds cuBLAS fp16), the others float32."""
    return torch.float16 if cfg.kind in ("frag", "dequant") else torch.float32


def run_config(layer, x2: torch.Tensor, cfg: QTIPConfig, out: torch.Tensor | None = None, rotary=None,
               pending: bool = False, act_n: int = 0, **prologue):
    """y = layer(x2) for x2 [B, n]: input transform, decode kernel(s), output transform. `prologue`
    (`up=`, `norm=`, `before=` of `hadamard_transform`) makes the input transform take the SiLU·mul or
    the RMSNorm that comes before the layer (and the output transform of the layer before that),
    `rotary` (`fused.QKVRotary`, where `takes_rotary`) the output transform the rotary step after a
    fused q|k|v projection, `act_n` SiLU on the output's first act_n columns (a gate|up projection's
    gate half). `pending` (where `takes_pending`) returns a `PendingOutput` instead of running the
    output transform."""
    m = layer.out_features
    B = x2.shape[0]
    into = dict(transpose=True, chunks=_chunks(layer, 1), pre=layer.SU, alpha=1 / 32, out_dtype=xh_dtype(cfg),
                pre_signs=layer.su_signs, **prologue)
    if cfg.kind == "dequant":
        xh = hadamard_transform(x2, **into)
        y_raw = torch.matmul(xh, dequantize_codes(layer, torch.float16).T)
    else:
        atomic = _steps(layer, cfg)[1] > 1
        y_raw = torch.empty(B, m, dtype=torch.float32, device=x2.device)
        if cfg.kind == "frag" and cfg.frag_x:
            into["frag_nb"] = n_blocks(B)
        xh = hadamard_transform(x2, zero=y_raw if atomic else None, **into)
        decode_matmul(layer, xh, cfg, y_raw)
    dtype = x2.dtype if prologue.get("before") is None else prologue["norm"][2].dtype

    def finish() -> torch.Tensor:
        y = out if out is not None else torch.empty(B, m, dtype=dtype, device=x2.device)
        return hadamard_transform(y_raw, transpose=False, chunks=_chunks(layer, 2), post=layer.SV, alpha=32.0,
                                  bias=layer.bias, out=y, rotary=rotary, act_n=act_n)

    if pending and act_n:
        raise ValueError("a pending output leaves its transform to the next layer: no SiLU on it (act_n)")
    return PendingOutput(layer, y_raw, finish) if pending else finish()


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_for(ctas: int, steps: int, sms: int, want: int = 3) -> int:
    """Smallest power-of-two split giving about `want` programs per SM, each keeping ≥ 2 steps."""
    split = 1
    while ctas * split < want * sms and steps // (split * 2) >= 2:
        split *= 2
    return split


def _splits_around(s0: int, steps: int, factors) -> list[int]:
    """Splits s0·f for the factors, each split keeping ≥ 2 steps (split 1 always allowed)."""
    return sorted(s for s in {max(1, int(s0 * f)) for f in factors} if s == 1 or steps >= 2 * s)


def _shape_of(layer) -> tuple[int, int, int]:
    """(m, n, input step granularity) of a layer."""
    return layer.out_features, layer.in_features, 16 if _hyb(layer.params) else 1


def heuristic_config(layer, batch: int, device, dtype: torch.dtype = torch.float16) -> QTIPConfig:
    """A reasonable launch without timing (CPU interpreter, first use inside graph capture).
    float32 activations keep the float32 CUDA-core paths (the frag kernel rounds x to fp16)."""
    m, n, _ = _shape_of(layer)
    sms = _num_sms(device)
    if batch > 64:
        return QTIPConfig("dequant")
    hyb = _hyb(layer.params)
    if hyb and 2 < batch <= FRAG_TUNED_BATCH and dtype != torch.float32 and not interpreting():
        if batch <= 8:
            ctas = triton.cdiv(m, 32)
            return QTIPConfig("frag", 32, 128, 8, _split_for(ctas, n // 128, sms, want=2), 8, table_copies=16)
        ctas = triton.cdiv(m, 64)  # two row groups of 2 row tiles, 4 warps along the columns
        return QTIPConfig("frag", 64, 64, 8, _split_for(ctas, n // 64, sms, want=2), 8, table_copies=16,
                          frag_x=True)
    if hyb and batch <= 2:
        ctas = triton.cdiv(m, 16)  # one program covers all (≤ 2) rows of x
        return QTIPConfig("flat", 16, 512, batch, _split_for(ctas, n // 512, sms))
    if batch <= 4:
        rows, cols = (16, 256) if hyb else (32, 64)
        bb = 1 if batch == 1 else (2 if batch == 2 else 4)
        ctas = triton.cdiv(m, rows) * triton.cdiv(batch, bb)
        return QTIPConfig("gemv", rows, cols, bb, _split_for(ctas, n // cols, sms))
    bb = max(16, min(64, triton.next_power_of_2(batch)))
    rows, cols = 64, 64
    ctas = triton.cdiv(m, rows) * triton.cdiv(batch, bb)
    return QTIPConfig("mma", rows, cols, bb, _split_for(ctas, n // cols, sms))


def candidate_configs(layer, batch: int, device) -> list[QTIPConfig]:
    """What the tuner times for one (shape, batch): few tile shapes (each is a compile), splits
    around the heuristic (a run-time value, free to vary)."""
    m, n, _ = _shape_of(layer)
    sms = _num_sms(device)
    hyb = _hyb(layer.params)
    cands: list[QTIPConfig] = []
    if hyb and batch <= FRAG_TUNED_BATCH:
        # (row tiles a warp, warps, table copies, prefetch depth, warps along the columns, x in the
        # fragment order), from `benchmarks/qtip_frag_sweep.py` on the H100 (RESULTS.md): 16 table
        # copies beat 32 (twice the programs per SM); loading 4 steps ahead wins at batch 1 and
        # mostly at 16; past 16 rows every row tile holds 4 accumulators per n-block, so fewer row
        # tiles. Past 8 rows x in the fragment order (one 8-byte load a lane and n-block, where
        # row-major x cost a cache line per row) won every shape of the sweep, and row groups of
        # warps (sharing each step's x through L1) most of them at 64 rows. A seventh entry False:
        # the masked loop (`frag_matmul`'s peel), which was 12–19% faster than the peeled one at
        # 4096×11008 with 8 warps, where an SM holds one or two programs (RESULTS.md, twenty-fourth).
        if batch <= 8:  # one row group: warps along the columns = warps
            launches = ((2, 8, 16, 4, 8, False), (4, 4, 16, 4, 4, False), (1, 16, 16, 4, 16, False),
                        (2, 16, 16, 4, 16, False), (4, 8, 16, 2, 8, False), (2, 8, 16, 2, 8, False),
                        (2, 8, 16, 4, 8, False, False))
        elif batch <= 16:
            launches = ((4, 4, 16, 4, 4, True), (4, 4, 16, 2, 4, True), (2, 8, 16, 2, 4, True), (4, 8, 16, 2, 4, True))
        elif batch <= 32:
            launches = ((2, 8, 16, 2, 8, True), (2, 8, 16, 2, 4, True), (2, 8, 16, 2, 2, True), (1, 8, 16, 2, 2, True))
        else:
            launches = ((2, 8, 16, 2, 4, True), (2, 8, 16, 1, 4, True), (2, 8, 16, 2, 2, True), (2, 4, 16, 2, 1, True))
        seen = set()
        for rt, warps, copies, depth, wc, xf, *peel in launches:
            ctas = triton.cdiv(m // 16, rt * (warps // wc))
            steps = n // (16 * wc)
            for s in _splits_around(_split_for(ctas, steps, sms, want=2), steps, (0.5, 1, 2)):
                cfg = QTIPConfig("frag", 16 * rt * (warps // wc), 16 * wc, 8, s, warps, table_copies=copies,
                                 prefetch=depth, frag_x=xf, peel=not peel or peel[0])
                per, _ = _steps(layer, cfg)
                if not even_launch(m // 16, n // 16, batch, rt, warps, per, wc, xf):  # masked loop: depths unused
                    cfg = dataclasses.replace(cfg, prefetch=2, peel=True)
                if cfg not in seen:
                    seen.add(cfg)
                    cands.append(cfg)
    if hyb and batch <= 2:
        for rows, cols, warps in ((16, 256, 4), (16, 512, 4), (32, 512, 4), (16, 1024, 8)):
            ctas = triton.cdiv(m, rows)
            # up to ~12 programs per SM: the kernel is latency-bound at ~4 (Nsight: 24% occupancy)
            for s in _splits_around(_split_for(ctas, n // cols, sms), n // cols, (0.5, 1, 2, 4)):
                cands.append(QTIPConfig("flat", rows, cols, batch, s, warps))
    if batch <= 4:
        bb = 1 if batch == 1 else (2 if batch == 2 else 4)
        tiles = [(16, 256, 4, True), (32, 256, 4, True), (16, 512, 8, True)] if hyb else [(32, 64, 4, True)]
        if hyb and batch == 1:
            tiles.append((16, 256, 4, False))
        for rows, cols, warps, smem in tiles:
            ctas = triton.cdiv(m, rows) * triton.cdiv(batch, bb)
            s0 = _split_for(ctas, n // cols, sms)
            for s in sorted({max(1, s0 // 2), s0, 2 * s0}):
                cands.append(QTIPConfig("gemv", rows, cols, bb, s, warps, smem))
    if batch >= 2:
        bb = max(16, min(64, triton.next_power_of_2(batch)))
        for rows, cols in ((64, 64), (128, 64)):
            ctas = triton.cdiv(m, rows) * triton.cdiv(batch, bb)
            s0 = _split_for(ctas, n // cols, sms, want=2)
            for s in sorted({max(1, s0 // 2), s0, 2 * s0}):
                cands.append(QTIPConfig("mma", rows, cols, bb, s, 4))
    if batch >= 16:
        cands.append(QTIPConfig("dequant"))
    return cands


_TUNED: dict[tuple, QTIPConfig] = {}


def tune_key(layer, batch: int, dtype) -> tuple:
    p = layer.params
    return (p, layer.out_features, layer.in_features, layer.rcp, layer.tp_rank, batch_bucket(batch), str(dtype))


def tune(layer, x2: torch.Tensor, cands=None) -> tuple[QTIPConfig, list]:
    """Time every candidate on the whole layer (both transforms included) as a decode step runs it
    (`tuning.cold_us`), cache the fastest."""
    cands = cands or candidate_configs(layer, x2.shape[0], x2.device)
    out = torch.empty(x2.shape[0], layer.out_features, dtype=x2.dtype, device=x2.device)
    best, timings = time_candidates(lambda cfg: run_config(layer, x2, cfg, out), cands, x2.device)
    _TUNED[tune_key(layer, x2.shape[0], x2.dtype)] = best
    return best, timings


def choose_config(layer, x2: torch.Tensor) -> QTIPConfig:
    return choose(_TUNED, tune_key(layer, x2.shape[0], x2.dtype), x2, lambda: tune(layer, x2)[0],
                  lambda: heuristic_config(layer, x2.shape[0], x2.device, x2.dtype), QTIPConfig,
                  lambda: candidate_configs(layer, x2.shape[0], x2.device))


def qtip_forward(layer, x: torch.Tensor, config: QTIPConfig | None = None) -> torch.Tensor:
    """QTIPLinear's forward on the GPU (or the interpreter): y = x @ Wᵀ (+ bias) in x's dtype."""
    x2, lead = as_rows(x)
    cfg = config or choose_config(layer, x2)
    return run_config(layer, x2, cfg).reshape(*lead, layer.out_features)


def takes_norm(layer, rows: int) -> bool:
    """Whether `qtip_forward_normed` can fold the RMSNorm into this layer's input transform."""
    return takes_norm_transform(layer.in_features, rows, _chunks(layer, 1))


def takes_rotary(layer, rows: int, head_dim: int) -> bool:
    """Whether the output transform can take the rotary step of a fused q|k|v projection."""
    return _chunks(layer, 2) == 1 and rotary_plan(layer.out_features, rows, head_dim) is not None


def takes_pending(layer) -> bool:
    """Whether this layer's output transform can be left to the next layer's input transform
    (`hadamard_triton.takes_chain`'s side of it: one chunk of a power-of-two length);
    LOWBIT_CHAIN_OUTPUTS=0 turns the chaining off (A/B: `benchmarks.pdl_ab --knob chain`)."""
    if os.environ.get("LOWBIT_CHAIN_OUTPUTS", "1") == "0":
        return False
    return _chunks(layer, 2) == 1 and hadamard_factor(layer.out_features) == 1


def qtip_forward_pending(layer, x: torch.Tensor):
    """QTIPLinear.forward_pending on the GPU: the raw product and the output transform left to do
    (a `PendingOutput`) where `takes_pending`, else the output."""
    return run_config(layer, x, choose_config(layer, x), pending=takes_pending(layer))


def _chained(x, layer, residual: torch.Tensor | None) -> tuple | None:
    """`hadamard_transform`'s `before=` for the pending output x of the QTIP layer before this one
    (pending only where `takes_pending`), where this layer's input transform can take it (else None:
    x is finished on its own)."""
    prev = x.producer
    B = x.raw.shape[0]
    if (residual is None or residual.stride(-1) != 1 or not isinstance(prev, type(layer))
            or prev.out_features != layer.in_features
            or not takes_chain(layer.in_features, B, _chunks(layer, 1))):
        return None
    return prev.SV, prev.bias, 32.0


def qtip_forward_normed(layer, x, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                        rotary=None, activate: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer(weight ⊙ RMSNorm(x + residual)), x + residual) for x [B, n] (or the `PendingOutput` of
    the layer before), and with `rotary` (`fused.QKVRotary`) the output's q/k heads rotated and k/v
    stored: the norm and the residual add (and a pending output's transform, where `takes_chain`) in
    the input transform's launch where `takes_norm`, the rotary step in the output transform's where
    `takes_rotary`, each else in its own launch. `activate` > 0: SiLU on the output's first
    `activate` columns, in the output transform's launch (a gate|up projection's gate half)."""
    if activate and rotary is not None:
        raise ValueError("activate (a gate|up output) and rotary (a q|k|v output) do not go together")
    before = _chained(x, layer, residual) if isinstance(x, PendingOutput) else None
    if before is not None:  # one launch: the last layer's output transform, the residual add, the norm
        B = x.raw.shape[0]
        cfg = choose_config(layer, residual)  # x.raw is the float32 product: the activations' dtype is residual's
        res_out = torch.empty_like(residual)
        prologue = dict(norm=(weight, eps, residual, res_out), before=before)
        x_in, residual = x.raw, res_out
    else:
        x = finished(x)
        B = x.shape[0]
        cfg = choose_config(layer, x)
        if takes_norm(layer, B):
            res_out = None if residual is None else torch.empty_like(x)
            prologue = dict(norm=(weight, eps, residual, res_out))
            x_in, residual = x, (x if residual is None else res_out)
        else:
            x_in, residual = fused.rmsnorm(x, weight, eps, residual)
            prologue = {}
    rot_here = rotary is not None and takes_rotary(layer, B, rotary.head_dim)
    y = run_config(layer, x_in, cfg, rotary=rotary if rot_here else None, act_n=activate, **prologue)
    if rotary is not None and not rot_here:
        fused.rotary_qkv_(y, rotary)
    return y, residual


def qtip_forward_gated(layer, gate: torch.Tensor, up: torch.Tensor, pending: bool = False,
                       activated: bool = False):
    """layer(silu(gate) · up) for gate, up [B, n] with the activation in the input transform's launch
    (where `takes_gate`); `activated`: gate holds silu(gate) already (the gate|up projection's
    `activate`), so that launch only multiplies; `pending` as in `qtip_forward_pending`."""
    cfg = choose_config(layer, gate)
    return run_config(layer, gate, cfg, up=up, up_activated=activated, pending=pending and takes_pending(layer))
