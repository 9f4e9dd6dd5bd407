"""Randomized-Hadamard transforms in Triton, with the scalings QTIP wraps around them fused in.

One launch computes, for every row b of x and every chunk of its last dimension (a block-diagonal
Hadamard when a tensor-parallel split cuts the dimension into `chunks` pieces):

    y = post ⊙ (alpha · H (pre ⊙ x)) + bias        (H^T instead of H with `transpose`)

where H over a chunk of length CH = k·P (k a special order or 1, P a power of two) is
(A_k ⊗ S_P)/sqrt(CH) as in `hadamard.hadamard_reference`: the chunk viewed as X [k, P] becomes
A_k X S_P / sqrt(CH). `pre` is QTIP's SU sign vector, `post` is SV·32, and the output is cast to
y's dtype, so each side of a QTIP layer is one launch.

Two kernels, chosen by `plan` (exact float32 throughout):
* The butterfly kernel (decode steps, powers of two). S_P: log2(P) passes of (a+b, a-b) in
  registers (Triton moves elements between threads with shuffles or shared memory where a pass
  crosses them); for few rows a program takes one column block of P, reading the blocks that mix
  into it. A_k (k > 1): a program owns 16 or 32 rows of A_k's output for one row of x and forms them
  with tensor cores in one product over all k rows of X, X split as hi + lo (hi = X with the low 13
  mantissa bits cleared), so two tf32 products with the exactly representable ±1 entries of A_k
  give float32 accuracy. It is applied first (A_k and S_P act on different axes and commute).
* The product kernel (k > 1 from DOT_ROWS rows: prefill, batched decode). The chunk viewed as
  X' [M, q] has H X = L X' S_q with L = A_k ⊗ S_(P/q) (±1, built on the host); a program owns
  one row of x and IB rows of L, forms L X' by a loop over L's columns (the row's chunk read once,
  where the butterfly kernel's programs each read all of it), then S_q by the butterfly. With
  fp16/bf16 x and a sign-only `pre` the product takes x as it is (exact); otherwise the hi + lo split.

It can also zero a buffer on the side (`zero`): QTIP's split-K GEMV accumulates into one with
atomics, and this launch always runs before it.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from .hadamard import fwht, hadamard_factor, special_hadamard
from .pdl import launch_options, wait_prior
from .qtip_shared_triton import _frag_x_offset
from .tuning import as_rows

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

# Elements of the transformed block a program keeps in registers before it takes 8 warps.
_WIDE = 4096
# Rows of x from which the product kernel runs for lengths with a special factor k > 1.
DOT_ROWS = 8
# Rows of x from which the product kernel takes prefill-sized tiles; the fused SiLU·mul input and
# rotary output are never taken from here (at 1000 rows they made the product kernel 3x slower), and
# below it only with `dot_epilogues`.
PREFILL_ROWS = 256

if triton is not None:

    @triton.jit
    def _fwht_rows(z, R: tl.constexpr, PP: tl.constexpr, LOGP: tl.constexpr):
        """Unscaled Walsh-Hadamard transform of every aligned block of 2^LOGP columns of each row of
        z [R, PP] (every pass pairs columns inside such blocks, so blocks stay apart)."""
        for s in tl.static_range(LOGP):
            z = tl.reshape(z, [R, PP // (2 << s), 2, 1 << s])
            z = tl.permute(z, (0, 1, 3, 2))
            a, b = tl.split(z)
            z = tl.join(a + b, a - b)
            z = tl.permute(z, (0, 1, 3, 2))
            z = tl.reshape(z, [R, PP])
        return z

    @triton.jit
    def _dot_exact(a, b, acc):
        """acc + a @ b in float32 accuracy on tensor cores, for `a` exact in tf32 (here ±1 and 0)."""
        hi = (b.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        acc = tl.dot(a, hi, acc, input_precision="tf32")
        return tl.dot(a, b - hi, acc, input_precision="tf32")

    @triton.jit
    def _parity(v):
        """(-1)^popcount(v) for v < 2^16, as ±1.0."""
        v = v ^ (v >> 8)
        v = v ^ (v >> 4)
        v = v ^ (v >> 2)
        v = v ^ (v >> 1)
        return 1.0 - 2.0 * (v & 1).to(tl.float32)

    @triton.jit
    def _silu_rounded(g):
        """silu(g) for g in the activations' dtype, rounded back to it (`silu_mul_reference`'s first
        rounding)."""
        v = g.to(tl.float32)
        return (v / (1.0 + tl.exp(-v))).to(g.dtype)

    @triton.jit
    def _gated(gate, up, ACTIVATED: tl.constexpr):
        """silu(gate)·up with `silu_mul_reference`'s roundings (SiLU, then the product, to gate's
        dtype); ACTIVATED: `gate` already holds silu(gate) so rounded (`act_n=` of the layer before)."""
        if ACTIVATED:
            act = gate
        else:
            act = _silu_rounded(gate)
        return (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)

    @triton.jit
    def _activated(y, pos, act_n, ACT: tl.constexpr):
        """y rounded to the output dtype, with SiLU applied (`_silu_rounded`) at positions < act_n of
        the row where ACT: a gate|up projection hands its gate half on already activated."""
        if ACT:
            y = tl.where(pos < act_n, _silu_rounded(y), y)
        return y

    @triton.jit
    def _input(x_ptr, aux_ptr, w_ptr, pre_ptr, xoff, aoff, pos, msk,
               MODE: tl.constexpr, HAS_AUX: tl.constexpr, HAS_PRE: tl.constexpr):
        """(pre ⊙ v, s², s) at columns pos of some rows, v float32 the transform's input: MODE 0 x;
        MODE 1 silu(x)·aux (x the gate, aux the up rows; rounded to x's dtype as
        `silu_mul_reference` rounds); MODE 4 the same with x already silu(gate); MODE 2 weight ⊙ s
        with s = x + aux (the residual, the sum rounded to x's dtype) — the RMS scale is applied
        after the transform, which is linear, from the sum of the s² returned here."""
        x = tl.load(x_ptr + xoff + pos, mask=msk, other=0.0)
        if MODE == 1 or MODE == 4:
            x = _gated(x, tl.load(aux_ptr + aoff + pos, mask=msk, other=0.0), MODE == 4)
        if MODE == 2 and HAS_AUX:
            r = tl.load(aux_ptr + aoff + pos, mask=msk, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        v = x.to(tl.float32)
        sq = v * v
        if MODE == 2:
            v = v * tl.load(w_ptr + pos, mask=msk, other=0.0).to(tl.float32)
        if HAS_PRE:
            v = v * tl.load(pre_ptr + pos, mask=msk, other=0.0).to(tl.float32)
        return v, sq, x

    @triton.jit
    def _signed_blocks(x_ptr, aux_ptr, w_ptr, pre_ptr, ro_ptr, xoff, aoff, rooff, pos0, rmask, cols, cmask, c1, own,
                       P1: tl.constexpr, P2: tl.constexpr, MODE: tl.constexpr, HAS_AUX: tl.constexpr,
                       HAS_PRE: tl.constexpr):
        """(U, Q): U = Σ_{a1 < P1} (-1)^popcount(c1 & a1) · input[rows, pos0 + a1·P2 + cols] (`_input`),
        the part of S_P = S_P1 ⊗ S_P2 that mixes blocks, for output block c1 (rows × cols broadcast
        shapes); Q the elementwise sum of s² over the blocks. A program that `own`s its rows stores
        the residual sum of block c1 (MODE 2 with a residual), so every block is stored once: after
        the loop, as a store between the blocks' loads would hold each block's loads back until the
        previous ones returned."""
        msk = rmask & cmask
        u, q, mine = _input(x_ptr, aux_ptr, w_ptr, pre_ptr, xoff, aoff, pos0 + cols, msk, MODE, HAS_AUX, HAS_PRE)
        for a1 in tl.static_range(1, P1):  # block 0 always enters with +1
            v, sq, s = _input(x_ptr, aux_ptr, w_ptr, pre_ptr, xoff, aoff, pos0 + a1 * P2 + cols, msk,
                              MODE, HAS_AUX, HAS_PRE)
            u += _parity(c1 & a1) * v
            q += sq
            if MODE == 2 and HAS_AUX:
                mine = tl.where(c1 == a1, s, mine)
        if MODE == 2 and HAS_AUX:
            tl.store(ro_ptr + rooff + pos0 + c1 * P2 + cols, mine, mask=tl.where(own, msk, False))
        return u, q

    @triton.jit
    def _chained_blocks(x_ptr, aux_ptr, w_ptr, pre_ptr, ro_ptr, lpost_ptr, lbias_ptr, lalpha, xoff, aoff, rooff,
                        pos0, rmask, c1, BR: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                        LOGP: tl.constexpr, HAS_LPOST: tl.constexpr, HAS_LBIAS: tl.constexpr, HAS_PRE: tl.constexpr):
        """MODE 3, `_signed_blocks`' (U, Q) when x is the raw product of the layer before (power-of-two
        length P = P1·P2, one chunk): its output transform first, o = lpost ⊙ (lalpha · H x) + lbias
        rounded to the residual's dtype as that layer's store rounds it, then s = o + residual
        (rounded, block c1 stored), weight ⊙ pre ⊙ s and the sign mix of the P1 blocks into block c1.
        Every program transforms its rows whole: the layer before's output never goes to memory."""
        P: tl.constexpr = P1 * P2
        cols = tl.arange(0, P)[None, :]
        msk = rmask & (cols < P)
        dt = aux_ptr.dtype.element_ty
        z = _fwht_rows(tl.load(x_ptr + xoff + pos0 + cols, mask=msk, other=0.0).to(tl.float32), BR, P, LOGP)
        z = z * lalpha
        if HAS_LPOST:
            z = z * tl.load(lpost_ptr + cols).to(tl.float32)
        if HAS_LBIAS:
            z = z + tl.load(lbias_ptr + cols).to(tl.float32)
        r = tl.load(aux_ptr + aoff + pos0 + cols, mask=msk, other=0.0)
        s = (z.to(dt).to(tl.float32) + r.to(tl.float32)).to(dt)
        v = s.to(tl.float32)
        q = tl.sum(tl.reshape(v * v, [BR, P1, P2]), 1)
        v = v * tl.load(w_ptr + pos0 + cols).to(tl.float32)
        if HAS_PRE:
            v = v * tl.load(pre_ptr + pos0 + cols).to(tl.float32)
        blk = tl.arange(0, P1)[None, :, None]
        u = tl.sum(tl.reshape(v, [BR, P1, P2]) * _parity(c1 & blk), 1)
        mine = tl.sum(tl.where(blk == c1, tl.reshape(s.to(tl.float32), [BR, P1, P2]), 0.0), 1)
        own = tl.arange(0, P2)[None, :]
        tl.store(ro_ptr + rooff + pos0 + c1 * P2 + own, mine.to(dt), mask=rmask & (own < P2))
        return u, q

    @triton.jit
    def _halves(t, R: tl.constexpr, HALF: tl.constexpr):
        """[R, 2·HALF] -> its first and second half columns, each [R, HALF]."""
        return tl.split(tl.permute(tl.reshape(t, [R, 2, HALF]), (0, 2, 1)))

    @triton.jit
    def _rotary_inputs(pos_ptr, f_ptr, slot_ptr, tok, B, dt: tl.constexpr, HALF: tl.constexpr, KV: tl.constexpr):
        """(cos, sin) [.., HALF] of each row's token position (rounded to the output dtype, as
        `fused.rotary_reference` rounds them) and the token's cache slot (0 without KV). Loaded
        right after the wait, so these round trips overlap the transform instead of following it."""
        pos = tl.load(pos_ptr + tok, mask=tok < B, other=0).to(tl.float32)
        d = tl.arange(0, HALF)[None, :]
        freq = pos * tl.load(f_ptr + d)
        c = tl.cos(freq).to(dt).to(tl.float32)
        s = tl.sin(freq).to(dt).to(tl.float32)
        if KV:
            slot = tl.load(slot_ptr + tok, mask=tok < B, other=0).to(tl.int64)
        else:
            slot = tok * 0
        return c, s, slot

    @triton.jit
    def _store_rotary(y_ptr, y, yoff, msk, head, cs, kc_ptr, vc_ptr, sc_s, sc_h, HQ, HKV, R: tl.constexpr,
                      HALF: tl.constexpr, KV: tl.constexpr):
        """Store rows of a fused q|k|v projection output, each row of the tile y [R, 2·HALF] one
        head (`head`, broadcast to [R, 1]): q and k heads rotated as `fused.rotary_reference` does
        (rotate-half, at the token's position, on the values rounded to the output dtype; cs from
        `_rotary_inputs`), v as it is; with KV also the rotated k and the v heads at the token's
        slot of the caches [slots, Hkv, 2·HALF] (strides sc_s, sc_h)."""
        c, s, slot = cs
        dt = y_ptr.dtype.element_ty
        a, b = _halves(y.to(dt).to(tl.float32), R, HALF)
        rot = head < HQ + HKV
        r1 = tl.where(rot, a * c - b * s, a).to(dt)
        r2 = tl.where(rot, b * c + a * s, b).to(dt)
        # the halves joined back into whole rows: each row's stores are contiguous (vector stores),
        # where two half-row stores were 2-byte ones
        r = tl.reshape(tl.permute(tl.join(r1, r2), (0, 2, 1)), [R, 2 * HALF])
        tl.store(y_ptr + yoff, r, mask=msk)
        if KV:
            d = tl.arange(0, 2 * HALF)[None, :]
            is_k = (head >= HQ) & (head < HQ + HKV)
            is_v = (head >= HQ + HKV) & (head < HQ + 2 * HKV)
            dst = slot * sc_s + tl.where(is_k, head - HQ, head - HQ - HKV) * sc_h + d
            tl.store(kc_ptr + dst, r, mask=tl.where(is_k, msk, False))
            tl.store(vc_ptr + dst, r, mask=tl.where(is_v, msk, False))

    @triton.jit
    def _epilogue_weights(post_ptr, bias_ptr, pos2, msk, HAS_POST: tl.constexpr, HAS_BIAS: tl.constexpr):
        """The output's post scale and bias (1 and 0 where absent), loaded first: they are weights,
        so this happens before the wait; loaded where they are used they added a memory round
        trip after the transform."""
        post = 1.0
        bias = 0.0
        if HAS_POST:
            post = tl.load(post_ptr + pos2, mask=msk, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + pos2, mask=msk, other=0.0).to(tl.float32)
        return post, bias

    @triton.jit
    def _y_offsets(row, pos, stride_yb, XF: tl.constexpr):
        """Offsets of y[row, pos]: row-major, or (XF > 0) the QTIP fragment kernel's x order for
        XF n-blocks of 8 rows."""
        if XF > 0:
            off = _frag_x_offset(row + 0 * pos, pos, XF)
        else:
            off = row * stride_yb + pos
        return off

    @triton.jit(do_not_specialize=["B", "zero_per_prog", "zero_numel"])
    def _hadamard_kernel(
        x_ptr, aux_ptr, w_ptr, ro_ptr, pre_ptr, post_ptr, bias_ptr, a_ptr, y_ptr, zero_ptr,
        pos_ptr, f_ptr, kc_ptr, vc_ptr, slot_ptr, lpost_ptr, lbias_ptr,
        B, stride_xb, stride_ab, stride_rb, stride_yb, alpha, eps, zero_per_prog, zero_numel, sc_s, sc_h, HQ, HKV,
        lalpha, act_n,
        KS: tl.constexpr, KP: tl.constexpr, P: tl.constexpr, P1: tl.constexpr, PP2: tl.constexpr,
        LOGP2: tl.constexpr, BR: tl.constexpr, IB: tl.constexpr, MODE: tl.constexpr, HAS_AUX: tl.constexpr,
        HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_BIAS: tl.constexpr, ZERO: tl.constexpr,
        ROT: tl.constexpr, KV: tl.constexpr, HALF: tl.constexpr, PDL: tl.constexpr, XF: tl.constexpr,
        HAS_LPOST: tl.constexpr, HAS_LBIAS: tl.constexpr, LOGP: tl.constexpr, ACT: tl.constexpr,
    ):
        """Program (rows block, chunk, block of 16 rows of A_k's output, column block c1) writes
        output columns c1·P2 .. c1·P2 + P2 of its rows, P2 = P / P1. Every program reads its rows'
        whole chunk, which is what lets it take a row's RMSNorm (MODE 2: one chunk a row)."""
        pid_b = tl.program_id(0)
        ch = tl.program_id(1)
        pid_i = tl.program_id(2) // P1
        c1 = tl.program_id(2) % P1
        P2: tl.constexpr = P // P1
        CH: tl.constexpr = KS * P
        base = ch * CH
        cols = tl.arange(0, PP2)
        cmask = cols < P2
        dt: tl.constexpr = y_ptr.dtype.element_ty
        if KS == 1:
            rows = pid_b * BR + tl.arange(0, BR)
            rmask = rows < B
            msk = rmask[:, None] & cmask[None, :]
            pos2 = base + c1 * P2 + cols[None, :] + rows[:, None] * 0
            post, bias = _epilogue_weights(post_ptr, bias_ptr, pos2, msk, HAS_POST, HAS_BIAS)
            wait_prior(PDL)
            tok = rows[:, None]
            if ROT:
                cs = _rotary_inputs(pos_ptr, f_ptr, slot_ptr, tok, B, dt, HALF, KV)
            r2 = rows[:, None]
            if MODE == 3:
                z, q = _chained_blocks(x_ptr, aux_ptr, w_ptr, pre_ptr, ro_ptr, lpost_ptr, lbias_ptr, lalpha,
                                       r2 * stride_xb, r2 * stride_ab, r2 * stride_rb, base, rmask[:, None], c1,
                                       BR, P1, P2, LOGP, HAS_LPOST, HAS_LBIAS, HAS_PRE)
            else:
                z, q = _signed_blocks(x_ptr, aux_ptr, w_ptr, pre_ptr, ro_ptr, r2 * stride_xb, r2 * stride_ab,
                                      r2 * stride_rb, base, rmask[:, None], cols[None, :], cmask[None, :], c1, True,
                                      P1, P2, MODE, HAS_AUX, HAS_PRE)
            z = _fwht_rows(z, BR, PP2, LOGP2)
            if MODE == 2 or MODE == 3:
                z = z * tl.rsqrt(tl.sum(q, 1) / CH + eps)[:, None]  # the RMS scale: H is linear
            yoff = _y_offsets(rows[:, None], pos2, stride_yb, XF)
            R: tl.constexpr = BR
            head = c1  # ROT: P2 is one head
        else:
            # one row of x; IB rows of A_k's output: z = A[r_out] @ U over all k rows at once (one
            # operand staging for the tensor cores; a loop over 16-row slices of U paid one per slice,
            # 69 barriers a program at k = 172 on sm_90)
            b = pid_b
            r_out = pid_i * IB + tl.arange(0, IB)
            i = tl.arange(0, KP)
            rmask = (r_out < KS) & (r_out * 0 + b < B)
            msk = rmask[:, None] & cmask[None, :]
            pos2 = base + r_out[:, None] * P + c1 * P2 + cols[None, :]
            a = tl.load(a_ptr + r_out[:, None] * KP + i[None, :])  # constants: read before the wait
            post, bias = _epilogue_weights(post_ptr, bias_ptr, pos2, msk, HAS_POST, HAS_BIAS)
            wait_prior(PDL)
            tok = b
            if ROT:
                cs = _rotary_inputs(pos_ptr, f_ptr, slot_ptr, tok, B, dt, HALF, KV)
            u, q = _signed_blocks(x_ptr, aux_ptr, w_ptr, pre_ptr, ro_ptr, b * stride_xb, b * stride_ab, b * stride_rb,
                                  base + i[:, None] * P, (i < KS)[:, None] & (i[:, None] * 0 + b < B),
                                  cols[None, :], cmask[None, :], c1, pid_i == 0, P1, P2, MODE, HAS_AUX, HAS_PRE)
            z = _dot_exact(a, u, tl.zeros([IB, PP2], tl.float32))
            z = _fwht_rows(z, IB, PP2, LOGP2)
            if MODE == 2:
                z = z * tl.rsqrt(tl.sum(q) / CH + eps)
            yoff = _y_offsets(b, pos2, stride_yb, XF)
            R: tl.constexpr = IB
            head = (r_out * (P // (2 * HALF)) + c1)[:, None]  # ROT: a head a row (P2 = head_dim)
        y = z * alpha * post + bias
        if ROT:
            _store_rotary(y_ptr, y, yoff, msk, head, cs, kc_ptr, vc_ptr, sc_s, sc_h, HQ, HKV, R, HALF, KV)
        else:
            tl.store(y_ptr + yoff, _activated(y.to(dt), pos2, act_n, ACT), mask=msk)
        if ZERO:
            _zero_share(zero_ptr, zero_per_prog, zero_numel)

    @triton.jit
    def _zero_share(zero_ptr, zero_per_prog, zero_numel):
        """This program's slice of the buffer to zero (programs numbered over the whole grid)."""
        lin = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
        z0 = lin * zero_per_prog
        z1 = tl.minimum(z0 + zero_per_prog, zero_numel)
        offs = tl.arange(0, 1024)
        zs = tl.zeros([1024], zero_ptr.dtype.element_ty)
        for o in range(z0, z1, 1024):
            tl.store(zero_ptr + o + offs, zs, mask=o + offs < z1)

    @triton.jit
    def _dot_exact_left(a, b, acc):
        """acc + a @ b in float32 accuracy for `b` exact in tf32 (±1): here `a` is split."""
        hi = (a.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        acc = tl.dot(hi, b, acc, input_precision="tf32")
        return tl.dot(a - hi, b, acc, input_precision="tf32")

    @triton.jit(do_not_specialize=["B", "zero_per_prog", "zero_numel"])
    def _hadamard_dot_kernel(
        x_ptr, aux_ptr, pre_ptr, post_ptr, bias_ptr, l_ptr, r_ptr, y_ptr, zero_ptr,
        pos_ptr, f_ptr, kc_ptr, vc_ptr, slot_ptr,
        B, stride_xb, stride_ab, stride_yb, alpha, zero_per_prog, zero_numel, sc_s, sc_h, HQ, HKV, act_n,
        M: tl.constexpr, MP: tl.constexpr, Q: tl.constexpr, LOGQ: tl.constexpr, IB: tl.constexpr,
        BK: tl.constexpr, BR: tl.constexpr, R_DOT: tl.constexpr, EXACT16: tl.constexpr, MODE: tl.constexpr,
        ROT: tl.constexpr, KV: tl.constexpr, HALF: tl.constexpr,
        HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_BIAS: tl.constexpr, ZERO: tl.constexpr,
        PDL: tl.constexpr, XF: tl.constexpr, ACT: tl.constexpr,
    ):
        """Program (block of BR rows of x and block of IB rows of L, the latter varying fastest so
        that the programs reading a row's chunk run together and all but the first find it in L2;
        chunk) writes Y[rows, :] of Y = L X R for the chunk of each row viewed as X [M, Q]:
        L = A_k ⊗ S_(P/Q) [M, M] by a loop over column blocks of L (each program reads its rows'
        chunks once), then R = S_Q by a product (R_DOT) or a butterfly. The BR rows' X sit side by side as one [M, BR·Q] operand,
        so each tile of L serves BR rows (prefill: L's tiles were read once per row). With EXACT16
        the host vouches that x is fp16/bf16 and pre is ±1 (or absent), so pre ⊙ x is exact in x's
        dtype and L's product takes one half-precision dot instead of two tf32 ones. ROT and XF
        take one row a program (BR = 1)."""
        NL: tl.constexpr = (M + IB - 1) // IB
        b0 = tl.program_id(0) // NL * BR
        base = tl.program_id(1) * (M * Q)
        r_out = tl.program_id(0) % NL * IB + tl.arange(0, IB)
        kk = tl.arange(0, BK)
        cc = tl.arange(0, BR * Q)  # operand column: row b0 + cc // Q of x, position cc % Q of X's rows
        c = cc % Q
        brow = b0 + cc // Q
        bmask = brow < B
        pos2 = base + r_out[:, None] * Q + c[None, :]
        omask = (r_out < M)[:, None] & bmask[None, :]
        if PDL:  # weights read while the previous kernel finishes; else after the loop, as held through
            # it they cost registers (170 → 136 a thread at 1000 rows: twice the programs an SM)
            post, bias = _epilogue_weights(post_ptr, bias_ptr, pos2, omask, HAS_POST, HAS_BIAS)
        wait_prior(PDL)
        if ROT:
            cs = _rotary_inputs(pos_ptr, f_ptr, slot_ptr, b0, B, y_ptr.dtype.element_ty, HALF, KV)
        xrow = (brow.to(tl.int64) * stride_xb + base)[None, :]
        arow = (brow.to(tl.int64) * stride_ab + base)[None, :]
        acc = tl.zeros([IB, BR * Q], tl.float32)
        for j0 in range(0, MP, BK):
            j = j0 + kk
            msk = (j < M)[:, None] & bmask[None, :]
            pos = j[:, None] * Q + c[None, :]
            lt = tl.load(l_ptr + r_out[:, None] * MP + j[None, :])
            u = tl.load(x_ptr + xrow + pos, mask=msk, other=0.0)
            if MODE == 1 or MODE == 4:
                u = _gated(u, tl.load(aux_ptr + arow + pos, mask=msk, other=0.0), MODE == 4)
            if EXACT16:  # fp16/bf16 x times ±1: exact in x's dtype, one half-precision product
                if HAS_PRE:
                    u = u * tl.load(pre_ptr + base + pos, mask=msk, other=0.0).to(u.dtype)
                acc = tl.dot(lt.to(u.dtype), u, acc)
            else:
                u = u.to(tl.float32)
                if HAS_PRE:
                    u = u * tl.load(pre_ptr + base + pos, mask=msk, other=0.0).to(tl.float32)
                acc = _dot_exact(lt.to(tl.float32), u, acc)
        if R_DOT:
            qq = tl.arange(0, Q)
            r = tl.load(r_ptr + qq[:, None] * Q + qq[None, :]).to(tl.float32)
            acc = tl.reshape(acc, [IB * BR, Q])
            acc = _dot_exact_left(acc, r, tl.zeros([IB * BR, Q], tl.float32))
            acc = tl.reshape(acc, [IB, BR * Q])
        else:
            acc = _fwht_rows(acc, IB, BR * Q, LOGQ)  # every aligned block of Q columns: each row's own
        if not PDL:
            post, bias = _epilogue_weights(post_ptr, bias_ptr, pos2, omask, HAS_POST, HAS_BIAS)
        y = acc * alpha * post + bias
        if ROT:  # Q = head_dim: a head a row of L
            _store_rotary(y_ptr, y, b0 * stride_yb + pos2, omask, r_out[:, None], cs, kc_ptr, vc_ptr, sc_s, sc_h,
                          HQ, HKV, IB, HALF, KV)
        elif XF > 0:
            tl.store(y_ptr + _y_offsets(b0, pos2, stride_yb, XF),
                     _activated(y.to(y_ptr.dtype.element_ty), pos2, act_n, ACT), mask=omask)
        else:
            tl.store(y_ptr + brow[None, :].to(tl.int64) * stride_yb + pos2,
                     _activated(y.to(y_ptr.dtype.element_ty), pos2, act_n, ACT), mask=omask)
        if ZERO:
            _zero_share(zero_ptr, zero_per_prog, zero_numel)


@functools.cache
def _special_padded(k: int, kp: int, transpose: bool, device: torch.device) -> torch.Tensor:
    """A_k (or A_k^T) as float32 [kp, kp], zero-padded: the rows/columns past k never contribute."""
    a = special_hadamard(k).float()
    a = a.T if transpose else a
    out = torch.zeros(kp, kp, dtype=torch.float32)
    out[:k, :k] = a
    return out.to(device)


@functools.cache
def _dot_matrices(k: int, p: int, q: int, transpose: bool, rows: int, mp: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """L = A_k ⊗ S_(p/q) (A_k^T with `transpose`; S alone for k = 1) as fp16 [rows, mp], zero-padded,
    and R = S_q as fp16 [q, q]: the chunk X [k, p] viewed as X' [k·p/q, q] has H X = L X' R
    (Sylvester S_p = S_(p/q) ⊗ S_q, index a·q + c). Entries are ±1, exact in fp16 and tf32."""
    s1 = fwht(torch.eye(p // q))
    a = special_hadamard(k).float() if k > 1 else torch.ones(1, 1)
    left = torch.kron((a.T if transpose else a).contiguous(), s1)
    m = left.shape[0]
    lp = torch.zeros(rows, mp)
    lp[:m, :m] = left
    return lp.half().to(device), fwht(torch.eye(q)).half().to(device)


def _butterfly_plan(ch: int, rows: int) -> dict:
    """Launch shape for chunks of length ch = k·P and `rows` rows of x: the special order k (1 for
    powers of two) and its padding, the split of P into P1 column blocks of P2 (a program per
    block: more programs for few rows, at the price of each reading its rows' whole chunk), rows
    per program, warps."""
    k = hadamard_factor(ch)
    p = ch // k
    kp = 1 if k == 1 else max(16, triton.next_power_of_2(k))
    # Column blocks: about 16 programs per row for one row, none extra from 16 rows on; for k > 1
    # also as many as keep U [kp, P/P1] (one tensor-core operand) within 8192 elements.
    p1 = 1
    while p1 * 2 * max(rows, 1) <= 16 and p // (p1 * 2) >= 64:
        p1 *= 2
    while k > 1 and kp * (p // p1) > 8192 and p // (p1 * 2) >= 16:
        p1 *= 2
    p2 = p // p1
    pp2 = p2 if k == 1 else max(16, p2)
    # Rows of A_k's output per program: 16 (shortest program: decode latency), but every program
    # reads its row's whole chunk, so many rows (prefill) of a large k take 32 (k = 172: 12
    # programs a row read the chunk 12 times, not 22).
    ib = 1 if k == 1 else (32 if k > 64 and rows >= 64 else 16)
    if k == 1:
        br = max(1, min(triton.next_power_of_2(max(rows, 1)), _WIDE // max(p2, 1)))
        elems = br * p2 * max(1, min(p1, 4))
    else:
        br = 1
        elems = kp * pp2
    warps = 4 if elems <= _WIDE else (8 if elems <= 4 * _WIDE else 16)
    return dict(kernel="butterfly", KS=k, KP=kp, P=p, P1=p1, PP2=pp2, LOGP2=int(math.log2(p2)), BR=br, IB=ib,
                num_warps=warps)


def dot_plan(ch: int, q: int, ib: int = 64, bk: int = 32, r_dot: bool = True, num_warps: int = 4,
             br: int = 1) -> dict:
    """Launch shape of the product kernel: the chunk as X' [M, q] (q a power of two dividing its
    power-of-two part, M = ch/q), IB rows of L a program, L's columns BK at a time, BR rows of x a
    program (a power of two); R = S_q by a product (r_dot) or a butterfly."""
    k = hadamard_factor(ch)
    if q < 16 or (ch // k) % q or q & (q - 1):
        raise ValueError(f"q = {q} must be a power of two >= 16 dividing {ch // k} (chunk {ch} = {k}·{ch // k})")
    if br < 1 or br & (br - 1):
        raise ValueError(f"rows a program (br = {br}) must be a power of two")
    m = ch // q
    return dict(kernel="dot", KS=k, M=m, MP=triton.cdiv(m, bk) * bk, Q=q, LOGQ=int(math.log2(q)), IB=ib, BK=bk,
                BR=br, R_DOT=bool(r_dot), num_warps=num_warps)


@functools.lru_cache(maxsize=4096)
def plan(ch: int, rows: int) -> dict:
    """The launch for chunks of length ch and `rows` rows of x, from the H100 sweep
    (`benchmarks/hadamard.py --sweep`): for k > 1 (Llama-2's 11008 = 172·64) the product kernel from
    DOT_ROWS rows on (each program reads its row's chunk once; the butterfly kernel's programs read
    it once per column block and block of A_k's rows: 4x slower at 16 rows, 10x at 1000), the
    butterfly kernel for fewer rows and for powers of two (best at every row count measured).
    Cached (a prefill asks for the same few launches hundreds of times): callers must copy it."""
    k = hadamard_factor(ch)
    p = ch // k
    if k > 1 and rows >= DOT_ROWS and p >= 16:
        if rows < PREFILL_ROWS:  # more, shorter programs
            return dot_plan(ch, min(p, 128), ib=32, bk=32, r_dot=False)
        # twelfth-session sweep at 256 / 1000 rows: 22016 = 172·128 takes 8 warps (20.9 / 70.5 against
        # 21.7 / 77.0 µs); 11008 = 172·64 two rows a program (12.9 / 41.7 against 13.2 / 42.5);
        # 12288 = 12·1024 (q = 64 of 1024) one (11.4 / 33.9 against 11.1 / 39.7)
        if p <= 64:
            return dot_plan(ch, p, ib=64, bk=32, r_dot=False, br=2)
        return dot_plan(ch, min(p, 128) if p <= 128 else 64, ib=64, bk=32, r_dot=False,
                        num_warps=8 if p == 128 else 4)
    return _butterfly_plan(ch, rows)


def takes_norm(n: int, rows: int, chunks: int = 1, launch: dict | None = None) -> bool:
    """Whether the transform of `rows` rows of length n can take their RMSNorm (`norm=`): one chunk a
    row (the norm is over the whole row) and the butterfly kernel, whose programs read all of it."""
    return chunks == 1 and (launch or plan(n, rows))["kernel"] == "butterfly"


def takes_chain(n: int, rows: int, chunks: int = 1) -> bool:
    """Whether the transform of `rows` rows of length n that takes their RMSNorm should also take the
    output transform of the layer before it (`before=`): a power-of-two length, and one program a
    row (P1 = 1, from 16 rows of 4096 on). Then the launch does the two launches' work, less one
    launch and the finished output's trip through memory. With P1 > 1 (few rows) each of a row's
    P1 programs would transform the whole row again: the kernel can (`before=` takes any P1), but
    that has not been measured to pay, so the chain is not taken there; LOWBIT_CHAIN_SPLIT=1 takes it
    at any P1 (A/B: `benchmarks.pdl_ab --knob chain-split`)."""
    launch = plan(n, rows)
    if not takes_norm(n, rows, chunks, launch) or hadamard_factor(n) != 1:
        return False
    return launch["P1"] == 1 or os.environ.get("LOWBIT_CHAIN_SPLIT", "0") == "1"


def dot_epilogues() -> bool:
    """Whether the product kernel takes SiLU·mul at its input (`up=`) and the rotary step at its output
    (`rotary=`) for 8–255 rows, as the butterfly kernel does for fewer. Off: in a 64-row QTIP-2 decode
    step (H100, `benchmarks.replay_profile --batch 64 --timeline 2`, eighteenth session) the q|k|v
    output transform with the rotary step and the KV write took 34.9 µs and the gated 11008-long
    input 19.0 µs (16 rows: 23.0 / 9.0), where the same transforms without them took 11.4 and 13.8 µs
    at four times the rows (256, twelfth / eleventh sessions) and the fp16 engine's rotary + KV write
    and SiLU·mul launches 5.3 and 2.2 µs at 64 rows: one launch more each, predicted 21–33 µs less a
    layer; measured (nineteenth session, H100) 8.82 against 9.59 ms a 64-row step and 4.31 against
    4.69 at 16 rows (1.09x tokens/s at both). LOWBIT_DOT_EPILOGUES=1 takes them (A/B:
    `benchmarks.pdl_ab --knob dot-epilogues`)."""
    return os.environ.get("LOWBIT_DOT_EPILOGUES", "0") == "1"


def takes_gate(n: int, rows: int) -> bool:
    """Whether the input transform of `rows` rows of length n takes SiLU·mul (`up=`) at no loss: the
    butterfly kernel's launches, and the product kernel's where `dot_epilogues`; never prefill tiles
    (PREFILL_ROWS: they ran 3x slower with it, measured)."""
    return rows < PREFILL_ROWS and (plan(n, rows)["kernel"] == "butterfly" or dot_epilogues())


def rotary_plan(ch: int, rows: int, head_dim: int) -> dict | None:
    """`plan`'s launch reshaped so that each row of a program's output tile is one whole head
    (butterfly: column blocks of head_dim; product kernel: q = head_dim), which lets the output
    transform of a fused q|k|v projection apply the rotary embedding (`rotary=`); None where the
    length's power-of-two part is not a multiple of head_dim (or the tile would not fit), and for
    the product kernel's launches unless `dot_epilogues`."""
    pl = plan(ch, rows)
    k = hadamard_factor(ch)
    p = ch // k
    if head_dim < 16 or head_dim & (head_dim - 1) or p % head_dim:
        return None
    if pl["kernel"] == "dot":  # only the launch the plain transform takes (prefill keeps its own tiles)
        return dict(pl) if pl["Q"] == head_dim and rows < PREFILL_ROWS and dot_epilogues() else None
    if k > 1 and pl["KP"] * head_dim > 8192:
        return None
    p1 = p // head_dim
    if k == 1:
        br = max(1, min(triton.next_power_of_2(max(rows, 1)), _WIDE // head_dim))
        elems = br * head_dim * max(1, min(p1, 4))
    else:
        br, elems = 1, pl["KP"] * head_dim
    warps = 4 if elems <= _WIDE else (8 if elems <= 4 * _WIDE else 16)
    return dict(pl, P1=p1, PP2=head_dim, LOGP2=int(math.log2(head_dim)), BR=br, num_warps=warps)


def hadamard_transform(x: torch.Tensor, transpose: bool = False, chunks: int = 1, pre: torch.Tensor | None = None,
                       post: torch.Tensor | None = None, bias: torch.Tensor | None = None, alpha: float = 1.0,
                       out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                       zero: torch.Tensor | None = None, launch: dict | None = None,
                       pre_signs: bool = False, up: torch.Tensor | None = None, norm: tuple | None = None,
                       rotary=None, frag_nb: int = 0, before: tuple | None = None, up_activated: bool = False,
                       act_n: int = 0) -> torch.Tensor:
    """y = post ⊙ (alpha · H(pre ⊙ x)) + bias over the last dim of x [..., N], per chunk of N/chunks
    (H^T with `transpose`), orthonormal H as in `hadamard_reference`; computed in float32 and
    written in `out` (or a new tensor of out_dtype, default x's dtype). `zero`, if given, is a
    contiguous tensor this launch fills with zeros. `launch` (from `plan`/`dot_plan`) overrides the
    launch shape `plan` picks. `pre_signs`: pre holds only ±1 (QTIP's SU), which lets the product
    kernel multiply fp16/bf16 x exactly in its own dtype.

    The input can be what a decoder layer computes just before a projection, saving its launch:
    `up` [..., N]: x is a gate and the transform takes silu(x)·up (`fused.silu_mul`'s roundings), or
    with `up_activated` x·up, x holding silu(gate) already rounded (the layer before's `act_n`);
    `norm` = (weight [N], eps, residual or None, residual_out or None): it takes weight ⊙ RMSNorm(s)
    with s = x + residual (rounded to x's dtype, written to residual_out), as `fused.rmsnorm` gives
    it but unrounded; only where `takes_norm`. With `before` = (post', bias' or None, alpha') as well,
    x is the raw product of the layer before and s = round(post' ⊙ (alpha' · H x) + bias') + residual:
    that layer's output transform rides in this launch too (a power-of-two length, `takes_chain`).

    And the output can be that of a fused q|k|v projection: `rotary` (a `fused.QKVRotary`) rotates
    its q and k heads as `fused.rotary_qkv_` does, in the same launch, and writes k and v to the
    caches it names (one chunk; the launch of `rotary_plan`, which must exist).

    `act_n` > 0 applies SiLU to the first act_n columns of each output row after rounding them
    (`fused.silu_mul`'s first rounding): a gate|up projection's output transform activating its
    gate half, so that the down projection's input transform (`up_activated`) only multiplies.

    `frag_nb` > 0 writes y for the QTIP fragment kernel instead: a new [8·frag_nb, N] buffer in its x
    order (`qtip_frag_triton.frag_x_order`), rows past x's left unwritten."""
    n = x.shape[-1]
    if chunks < 1 or n % chunks:
        raise ValueError(f"cannot split length {n} into {chunks} chunks")
    x2, lead = as_rows(x)
    B = x2.shape[0]
    if frag_nb:
        if out is not None or rotary is not None or B > 8 * frag_nb or n % 16:
            raise ValueError(f"a fragment-order output takes no out= or rotary, ≤ {8 * frag_nb} rows and a "
                             f"length divisible by 16, got {B} rows of {n}")
        out = torch.empty(8 * frag_nb, n, dtype=out_dtype or x.dtype, device=x.device)
        y2 = out
    else:
        if out is None:
            out = torch.empty(B, n, dtype=out_dtype or x.dtype, device=x.device)
        y2 = out.view(B, n)
    ch = n // chunks
    if rotary is not None:
        heads = rotary.num_heads + 2 * rotary.num_kv_heads
        pl = dict(launch or rotary_plan(ch, B, rotary.head_dim) or {})
        if chunks != 1 or not pl or n != heads * rotary.head_dim:
            raise ValueError(f"no rotary launch for {n} = {heads} heads of {rotary.head_dim} in {chunks} chunk(s)")
    else:
        pl = dict(launch or plan(ch, B))
    kind = pl.pop("kernel")
    k = pl.pop("KS") if kind == "dot" else pl["KS"]
    if rotary is not None:
        kc, vc, slots = rotary.kv_store or (y2, y2, rotary.positions)
        rot_args = (rotary.positions, rotary.inv_freq, kc, vc, slots)
        rot_ints = (kc.stride(0), kc.stride(1), rotary.num_heads, rotary.num_kv_heads)
        rot_flags = dict(ROT=True, KV=rotary.kv_store is not None, HALF=rotary.head_dim // 2)
    else:
        rot_args, rot_ints, rot_flags = (y2,) * 5, (0, 0, 0, 0), dict(ROT=False, KV=False, HALF=1)
    mode, aux, w, eps, rout = 0, y2, y2, 0.0, y2
    if act_n < 0 or act_n > n:
        raise ValueError(f"act_n = {act_n} must lie in 0..{n}, the output row's length")
    if act_n and rotary is not None:
        raise ValueError("act_n (SiLU on a gate half) and rotary (a q|k|v output) do not go together")
    if up_activated and up is None:
        raise ValueError("up_activated needs up= (x holds silu(gate))")
    if up is not None:
        if up.shape != x.shape:
            raise ValueError(f"gate {tuple(x.shape)} and up {tuple(up.shape)} differ")
        mode, aux = 4 if up_activated else 1, as_rows(up)[0]
    if norm is not None:
        if up is not None or kind != "butterfly" or chunks != 1:
            raise ValueError("the RMSNorm rides only on the butterfly kernel, one chunk a row, no gate (takes_norm)")
        w, eps, res, res_out = norm
        mode, eps = 2, float(eps)
        if res is not None:
            if res_out is None or res.shape != x.shape or res_out.shape != x.shape or res_out.stride(-1) != 1:
                raise ValueError("norm with a residual needs residual_out of x's shape, unit stride")
            aux, rout = as_rows(res)[0], res_out.view(B, n)
    lpost, lbias, lalpha = (None, None, 1.0) if before is None else before
    if before is not None:
        if norm is None or aux is y2 or k != 1 or kind != "butterfly":
            raise ValueError("the layer before's output transform rides only with the norm and a residual "
                             "on a power-of-two length (takes_chain)")
        mode, lalpha = 3, float(lalpha) / math.sqrt(n)
    if kind == "dot":
        if pl["BR"] > 1 and (rotary is not None or frag_nb):
            pl["BR"] = 1  # the rotary and fragment-order epilogues take one row a program
        nl = triton.cdiv(pl["M"], pl["IB"])
        grid = (triton.cdiv(B, pl["BR"]) * nl, chunks, 1)
        lmat, rmat = _dot_matrices(k, ch // k, pl["Q"], bool(transpose), nl * pl["IB"], pl["MP"], x.device)
    else:
        grid = (triton.cdiv(B, pl["BR"]), chunks, triton.cdiv(k, pl["IB"]) * pl["P1"])
        lmat = _special_padded(k, pl["KP"], bool(transpose), x.device) if k > 1 else y2
    nprog = grid[0] * grid[1] * grid[2]
    if zero is not None:
        zn = zero.numel()
        zper = triton.cdiv(zn, nprog)
        zt = zero
    else:
        zn, zper, zt = 0, 0, y2
    ptrs = (pre if pre is not None else y2, post if post is not None else y2, bias if bias is not None else y2)
    flags = dict(HAS_PRE=pre is not None, HAS_POST=post is not None, HAS_BIAS=bias is not None, ZERO=zero is not None,
                 MODE=mode, XF=frag_nb, ACT=act_n > 0, **launch_options(x2, B))
    scale = float(alpha) / math.sqrt(ch)
    if kind == "dot":
        exact16 = x2.dtype in (torch.float16, torch.bfloat16) and (pre is None or pre_signs)
        _hadamard_dot_kernel[grid](x2, aux, *ptrs, lmat, rmat, y2, zt, *rot_args, B, x2.stride(0), aux.stride(0),
                                   y2.stride(0), scale, zper, zn, *rot_ints, act_n, EXACT16=exact16, **flags, **rot_flags,
                                   **pl)
    else:
        _hadamard_kernel[grid](x2, aux, w, rout, *ptrs, lmat, y2, zt, *rot_args,
                               lpost if lpost is not None else y2, lbias if lbias is not None else y2, B,
                               x2.stride(0), aux.stride(0), rout.stride(0), y2.stride(0), scale, eps, zper, zn,
                               *rot_ints, lalpha, act_n, HAS_AUX=aux is not y2, HAS_LPOST=lpost is not None,
                               HAS_LBIAS=lbias is not None, LOGP=int(math.log2(pl["P"])) if k == 1 else 0,
                               **flags, **rot_flags, **pl)
    return out if frag_nb else out.view(*lead, n)
