"""Uniform int4 decode-GEMV/GEMM on tensor cores for 1–64 rows of x: the QTIP fragment kernel's
walk (`qtip_frag_triton`) with a nibble decode in place of the trellis table.

Why: the CUDA-core GEMV (`uniform_triton._uq_gemv_kernel`) spends three instructions a weight
(LOP3, FADD, FFMA) at 168 registers a thread, and Nsight Compute finds it issue- and
occupancy-bound at half the DRAM bandwidth (RESULTS.md, fifteenth session). Here the tensor core
does the multiply-adds and the decode costs about one instruction a weight: a lane's 8 values of a 16×16 tile
sit in one int32 word, four fp16 pairs come out of it with one shift and four LOP3 (the nibble
OR-ed into the exponent of 1024: 1024 + q, or 1024 + 16q for the upper nibble of a byte), and one
packed subtract (or fma by 1/16) per pair gives q − z exactly in fp16; the mma accumulates x·(q − z)
in float32 over a step of KT tiles and the step's group scale multiplies the accumulator once.

Layout (`UniformFrag`, made once from a `UniformPacked` int4 layer with integer zeros):
* `codes` int32 [TM, TS, KT, 32]: row tile i (outputs 16i..16i+15), step s (inputs 16·KT·s ..,
  KT = 4 tiles, 2 for group size 32), tile kt of the step, lane l = 4g + t. The lane's word holds
  its A registers a0 = W[g, 2t..2t+1], a1 = W[g+8, 2t..], a2 = W[g, 8+2t..], a3 = W[g+8, 8+2t..]
  (`mma.sync.m16n8k16` row-major A) as nibbles: pair register r, half e at bit 16e + 4r' with
  r' = (0, 1, 2, 3) for (a0, a1, a2, a3) — a0/a2 in the low nibble of a byte, a1/a3 in the high.
  A warp's load of one tile is 128 contiguous bytes.
* `sz` int64 [groups, TM, 8]: for output rows g and g + 8 of row tile i: fp16 halves
  (scale_g, scale_g+8, 1024 + zero_g, −(64 + zero_g+8)) from the low half up — the two decode
  constants and the scales of one lane, one 8-byte load a step.
The perm of act-order GPTQ is applied to x before the launch (an index_select).

Every tensor in the kernel is [32·NW], one element per thread (row tiles, n-blocks and the tiles
of a step are tuples unrolled at compile time), as in the QTIP kernel; under TRITON_INTERPRET the
PTX pieces are emulated with plain Triton ops so the CPU tests check the same lane bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .pdl import wait_prior
from .qtip_frag_triton import (
    MAX_BATCH,
    _f16,
    _lane_ids,
    _launch,
    _ld,
    _mma,
    _out_all,
    _reserve_shared,
    _zero_acc,
    n_blocks,
)
from .tuning import as_rows, batch_bucket, choose, interpreting, time_candidates
from .uniform_triton import UniformPacked, UQConfig, _unpack_out, dequant_matmul

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

COPIES = 8  # shared memory the epilogue's warp sums may use: 2 KiB × COPIES (`_out_all` rounds)
_NIB = (0, 4, 8, 12)  # bit of register a_r's low-half nibble in the lane's word
_CHUNK = 64  # row tiles repacked at a time


@dataclass
class UniformFrag:
    """An int4 layer in the fragment kernel's order (see the module docstring)."""
    in_features: int
    out_features: int
    group_size: int
    kt: int
    codes: torch.Tensor
    sz: torch.Tensor
    perm: torch.Tensor | None = None


def frag_supported(p: UniformPacked) -> str:
    """'' if the layer can take the fragment kernel, else why not."""
    if p.bits != 4 or p.zero_is_min:
        return "4-bit codes with integer zeros only"
    if p.out_features % 16 or p.group_size % 32 or p.in_features % p.group_size:
        return "out_features a multiple of 16 and a group size a multiple of 32 only"
    z = p.zeros.float()
    # GPTQ's original format stores zero − 1, so a 4-bit zero can be 16; any integer up to 255 keeps
    # 1024 + z, 64 + z and q − z exact in fp16
    if not bool(((z == z.round()) & (z >= 0) & (z <= 255)).all()):
        return "zeros must be integers 0..255 (they are subtracted exactly in fp16)"
    return ""


def tiles_a_step(group_size: int) -> int:
    """16-input tiles a step takes: a step must stay inside one scale group."""
    return 4 if group_size % 64 == 0 else 2


def _step_columns(kt: int) -> torch.Tensor:
    """Input (within a step of 16·kt) that mma column c of the step's tile k multiplies, at
    16k + c: lane t's B registers of tile k are x[4kt·t + 4k + (0, 1)] and x[.. + (2, 3)], so a
    lane's x for a tile is one 8-byte load (and its whole step 4·kt contiguous halves)."""
    k, c = torch.arange(kt).repeat_interleave(16), torch.arange(16).repeat(kt)
    return 4 * kt * ((c % 8) // 2) + 4 * k + 2 * (c // 8) + c % 2


def repack_frag(p: UniformPacked) -> UniformFrag:
    """`UniformPacked` (4 bits) → `UniformFrag`, in packed input order (perm kept for x)."""
    why = frag_supported(p)
    if why:
        raise ValueError(f"fragment kernel: {why}")
    return _repack(p)


def _repack(p: UniformPacked) -> UniformFrag:
    """`repack_frag` for a layer already checked by `frag_supported`."""
    m, n, gs = p.out_features, p.in_features, p.group_size
    kt = tiles_a_step(gs)
    tm, ts = m // 16, n // (16 * kt)
    dev = p.qweight.device  # repacked where the layer lives (a GPU does a 70B layer in moments)
    cols = (_step_columns(kt).repeat(ts) + torch.arange(ts).repeat_interleave(16 * kt) * 16 * kt).to(dev)
    lane = torch.arange(32, device=dev)
    g, t = lane // 4, lane % 4
    words = torch.zeros(tm, ts, kt, 32, dtype=torch.int64, device=dev)
    for i0 in range(0, tm, _CHUNK):  # row tiles a chunk: int64 temporaries of 16·_CHUNK rows, not m
        i1 = min(tm, i0 + _CHUNK)
        q = _unpack_out(p.qweight[:, 2 * i0:2 * i1], 4).T.to(torch.int64)[:, cols]  # [outputs, inputs]
        qq = q.reshape(i1 - i0, 16, ts, kt, 16).permute(0, 2, 3, 1, 4)  # [i, s, kt, row, mma column]
        for r, (dr, dc) in enumerate(((0, 0), (8, 0), (0, 8), (8, 8))):  # a0..a3: (row, column) offsets
            for e in (0, 1):
                words[i0:i1] |= qq[..., g + dr, dc + 2 * t + e] << (_NIB[r] + 16 * e)  # [i, s, kt, lane]
    codes = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    s = p.scales.reshape(-1, tm, 16)
    z = p.zeros.float().reshape(-1, tm, 16)
    halves = torch.stack([s[..., :8], s[..., 8:], (1024 + z[..., :8]).half(), (-(64 + z[..., 8:])).half()], -1)
    sz = halves.contiguous().view(torch.int64).reshape(-1, tm, 8)
    return UniformFrag(n, m, gs, kt, codes.contiguous(), sz.contiguous(), p.perm)


def frag_dequantize_t_reference(fp: UniformFrag, dtype=torch.float16) -> torch.Tensor:
    """Wᵀ [n, m] (inputs in packed order, as `uniform_dequantize_t`) from the fragment layout alone:
    `_repack` undone in plain PyTorch, each weight scale · (q − zero) in float32, rounded once."""
    m, n, kt = fp.out_features, fp.in_features, fp.kt
    tm, ts = m // 16, n // (16 * kt)
    dev = fp.codes.device
    words = fp.codes.to(torch.int64) & 0xFFFFFFFF  # [i, s, k, lane]
    lane = torch.arange(32, device=dev)
    g, t = lane // 4, lane % 4
    halves = fp.sz.view(torch.float16).reshape(-1, tm, 8, 4).float()  # [group, i, g, (s_g, s_g8, 1024+z_g, -(64+z_g8))]
    group = (torch.arange(ts, device=dev) * 16 * kt) // fp.group_size
    sz = halves[group]  # [s, i, g, 4]
    w = torch.empty(n, m, dtype=torch.float32, device=dev)
    s_idx = torch.arange(ts, device=dev).view(1, ts, 1, 1)
    k_idx = torch.arange(kt, device=dev).view(1, 1, kt, 1)
    i_idx = torch.arange(tm, device=dev).view(tm, 1, 1, 1)
    for r in range(4):
        lower = r % 2 == 0  # a0 / a2: rows g; a1 / a3: rows g + 8
        scale = (sz[..., 0] if lower else sz[..., 1]).permute(1, 0, 2)  # [i, s, g]
        zero = (sz[..., 2] - 1024 if lower else -sz[..., 3] - 64).permute(1, 0, 2)
        scale, zero = scale[..., g].unsqueeze(2), zero[..., g].unsqueeze(2)  # [i, s, 1, lane]
        row = 16 * i_idx + g + (0 if lower else 8)
        for e in (0, 1):
            q = ((words >> (_NIB[r] + 16 * e)) & 15).float()
            col = 16 * kt * s_idx + 4 * kt * t + 4 * k_idx + 2 * (r // 2) + e
            w[col.expand(tm, ts, kt, 32), row.expand(tm, ts, kt, 32)] = scale * (q - zero)
    return w.to(dtype)


if triton is not None:
    _DECODE_ASM = tl.constexpr(
        "{ .reg .b32 w8, l0, h0, l1, h1, zg, z8, s16;\n\t"
        "shr.u32 w8, $4, 8;\n\t"
        "lop3.b32 l0, $4, 0x000F000F, 0x64006400, 0xea;\n\t"
        "lop3.b32 h0, $4, 0x00F000F0, 0x64006400, 0xea;\n\t"
        "lop3.b32 l1, w8, 0x000F000F, 0x64006400, 0xea;\n\t"
        "lop3.b32 h1, w8, 0x00F000F0, 0x64006400, 0xea;\n\t"
        "prmt.b32 zg, $5, $5, 0x1010;\n\t"
        "prmt.b32 z8, $5, $5, 0x3232;\n\t"
        "mov.b32 s16, 0x2C002C00;\n\t"
        "sub.rn.f16x2 $0, l0, zg;\n\t"
        "fma.rn.f16x2 $1, h0, s16, z8;\n\t"
        "sub.rn.f16x2 $2, l1, zg;\n\t"
        "fma.rn.f16x2 $3, h1, s16, z8; }")

    @triton.jit
    def _pair(lo, hi):
        """Two float32 values (exact in fp16) as one fp16x2 register (lo in the low half)."""
        a = lo.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.int32)
        b = hi.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.int32)
        return a | (b << 16)

    @triton.jit
    def _decode4(w, zz, EMULATE: tl.constexpr):
        """A registers (fp16 pairs of q − z) of one tile from the lane's word; zz: the lane's
        (1024 + zero_g, −(64 + zero_g+8)) halves."""
        if EMULATE:
            zg = _f16(zz, 0) - 1024.0
            z8 = -_f16(zz, 16) - 64.0
            a0 = _pair(((w >> 0) & 15).to(tl.float32) - zg, ((w >> 16) & 15).to(tl.float32) - zg)
            a1 = _pair(((w >> 4) & 15).to(tl.float32) - z8, ((w >> 20) & 15).to(tl.float32) - z8)
            a2 = _pair(((w >> 8) & 15).to(tl.float32) - zg, ((w >> 24) & 15).to(tl.float32) - zg)
            a3 = _pair(((w >> 12) & 15).to(tl.float32) - z8, ((w >> 28) & 15).to(tl.float32) - z8)
        else:
            a0, a1, a2, a3 = tl.inline_asm_elementwise(
                _DECODE_ASM, "=r,=r,=r,=r,r,r", [w, zz], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
                is_pure=True, pack=1)
        return (a0, a1, a2, a3)

    @triton.jit
    def _step_loads(cp, xp, szp, ok, live, xrows, RS, RT: tl.constexpr, KT: tl.constexpr, NB: tl.constexpr):
        """One step's loads: the code words of each row tile's KT tiles (row tiles RS words
        apart; ok None: every row tile exists, no masks), the x B fragments of each tile and
        n-block (xrows: the n-blocks' row offsets; live None: the step exists, else x reads as 0
        where it does not), each row tile's scale/zero word."""
        words = ()
        sz = ()
        for r in tl.static_range(RT):
            present = None
            if ok is not None:
                present = ok[r]
            wr = ()
            for k in tl.static_range(KT):
                wr = wr + (_ld(cp + r * RS + k * 32, present),)
            words = words + (wr,)
            sz = sz + (_ld(szp + r * 8, present),)
        xs = ()
        for k in tl.static_range(KT):
            xk = ()
            for b in tl.static_range(NB):
                v = _ld(xp + xrows[b] + k, live)  # both B registers (`_step_columns`)
                xk = xk + ((v.to(tl.int32), (v >> 32).to(tl.int32)),)
            xs = xs + (xk,)
        return words, xs, sz

    @triton.jit
    def _step(acc, words, xs, sz, RT: tl.constexpr, KT: tl.constexpr, NB: tl.constexpr, NW: tl.constexpr,
              EMULATE: tl.constexpr):
        """acc += scale · Σ over the step's tiles of x·(q − z), per row tile and n-block."""
        new = ()
        for r in tl.static_range(RT):
            lo = sz[r].to(tl.int32)
            zz = (sz[r] >> 32).to(tl.int32)
            sg = _f16(lo, 0)
            s8 = _f16(lo, 16)
            c = _zero_acc(1, NB, NW)[0]  # the step's own sums, scaled once at its end
            for k in tl.static_range(KT):
                a = _decode4(words[r][k], zz, EMULATE)
                cn = ()
                for b in tl.static_range(NB):
                    cn = cn + (_mma(a, xs[k][b], c[b], NW, EMULATE),)
                c = cn
            row = ()
            for b in tl.static_range(NB):
                a0, a1, a2, a3 = acc[r][b]
                c0, c1, c2, c3 = c[b]
                row = row + ((a0 + c0 * sg, a1 + c1 * sg, a2 + c2 * s8, a3 + c3 * s8),)
            new = new + (row,)
        return new

    @triton.jit
    def _loads_of(s, cb, xb, szp0, ok, xrows, wid, TM, TS: tl.constexpr, RS, RT: tl.constexpr, KT: tl.constexpr,
                  NB: tl.constexpr, NW: tl.constexpr, SPG: tl.constexpr, TAIL: tl.constexpr):
        """`_step_loads` of the warp's s-th step (step wid + s·NW of the row tile). TAIL (the warps
        do not divide the steps): a step past the last reads the last step's codes and scales (in
        bounds) and x as zeros, so its products are zero."""
        st = wid + s * NW
        live = None
        if TAIL:
            live = st < TS
            st = tl.minimum(st, TS - 1)
        return _step_loads(cb + st * (KT * 32), xb + st * (4 * KT), szp0 + (st // SPG) * (TM * 8), ok, live, xrows,
                           RS, RT, KT, NB)

    @triton.jit(do_not_specialize=["TM", "B"])
    def _uq_frag_kernel(
        x_ptr, codes_ptr, sz_ptr, y_ptr, scratch_ptr,
        TM, TS: tl.constexpr, B, stride_xb, stride_yb,
        KT: tl.constexpr, SPG: tl.constexpr, RT: tl.constexpr, NB: tl.constexpr, NW: tl.constexpr,
        REP: tl.constexpr, EMULATE: tl.constexpr, PDL: tl.constexpr, PF: tl.constexpr, EVEN: tl.constexpr,
        TAIL: tl.constexpr,
    ):
        """y[:B, rows] = x[:B] · Wᵀ for the program's RT row tiles; the NW warps walk the steps
        (warp w: steps w, w + NW, ..., ⌈TS / NW⌉ of them, the last round's steps past TS zero, see
        `_loads_of`) with the next PF steps' loads in flight, then sum their accumulators through
        shared memory (`_out_all`). Rows of x past B are read as row B − 1 (their products land in
        columns the epilogue drops). SPG: steps a scale group. x is read as int64 words (4 halves,
        stride_xb in words): a lane's B registers of a tile are one word (`_step_columns`)."""
        col = tl.arange(0, 32 * NW)
        lane = _lane_ids(col, EMULATE)
        wid = col // 32
        ib = tl.program_id(0) * RT
        if EVEN:  # every row tile of every program exists: no masks at all
            ok = None
        else:
            ok = ()
            for r in tl.static_range(RT):
                ok = ok + (col * 0 + ib + r < TM,)  # tensors: the interpreter wants tensor masks
        if not EMULATE:
            _reserve_shared(codes_ptr, scratch_ptr, col, TM, REP)  # the epilogue's warp sums
        n = (TS + NW - 1) // NW
        cb = codes_ptr + (ib * TS * KT) * 32 + lane
        RS = TS * KT * 32  # words between row tiles
        xrows = ()
        for b in tl.static_range(NB):
            xrows = xrows + (tl.minimum(8 * b + (lane >> 2), B - 1) * stride_xb,)
        xb = x_ptr + (lane & 3) * KT  # int64 words of 4 halves
        szp0 = sz_ptr + ib * 8 + (lane >> 2)  # + group · TM · 8
        acc = _zero_acc(RT, NB, NW)
        wait_prior(PDL)
        # Loads run PF steps ahead in a ring of registers; past the warp's last step they re-read
        # its last step (in bounds, unused) instead of taking masks.
        ring = ()
        for d in tl.static_range(PF):
            ring = ring + (_loads_of(tl.minimum(d, n - 1), cb, xb, szp0, ok, xrows, wid, TM, TS, RS, RT, KT, NB, NW,
                                     SPG, TAIL),)
        for s in tl.range(0, n, loop_unroll_factor=PF):
            new = _loads_of(tl.minimum(s + PF, n - 1), cb, xb, szp0, ok, xrows, wid, TM, TS, RS, RT, KT, NB, NW, SPG,
                            TAIL)
            words, xs, sz = ring[0]
            acc = _step(acc, words, xs, sz, RT, KT, NB, NW, EMULATE)
            rr = ()
            for d in tl.static_range(1, PF):
                rr = rr + (ring[d],)
            ring = rr + (new,)
        tl.debug_barrier()
        _out_all(y_ptr, scratch_ptr, acc, col, lane, ib, B, TM, stride_yb, RT, NB, NW, NW, REP, False, EMULATE)


if triton is not None:

    @triton.jit
    def _uq_frag_dequant_kernel(codes_ptr, sz_ptr, w_ptr, M, TS, stride_w, KT: tl.constexpr, SPG: tl.constexpr,
                                BK: tl.constexpr, BO: tl.constexpr):
        """One [BK inputs, BO outputs] tile of Wᵀ per program, as `frag_dequantize_t_reference`.

        Each element finds its nibble (word of row tile, step, tile, lane; bit of register and
        half) from its (input, output) place, so the store walks whole tile rows (the tuned
        packed dequant's shape): the word's 8 nibbles sit 16 B apart in Wᵀ, and scattering them
        from the word's lane stored 16-byte runs. A word is read by 8 elements of one tile, from
        L1. BK divides the group size: the tile's scales and zeros are one row vector."""
        k0 = tl.program_id(1) * BK
        row = tl.program_id(0) * BO + tl.arange(0, BO)  # outputs
        col = k0 + tl.arange(0, BK)  # inputs, packed order
        rok = row < M
        i = row // 16
        g = row % 8
        up = (row // 8) % 2  # rows g + 8: registers a1 / a3, nibble 4 bits higher
        c = col % (16 * KT)  # place in the step: 4·KT·t + 4k + 2·(r // 2) + e (`_step_columns`)
        word = ((i * TS)[None, :] + (col // (16 * KT))[:, None]) * KT + ((c // 4) % KT)[:, None]
        word = word * 32 + (4 * g)[None, :] + (c // (4 * KT))[:, None]
        shift = (4 * up)[None, :] + (8 * ((c // 2) % 2) + 16 * (c % 2))[:, None]
        ok = rok[None, :]
        w = tl.load(codes_ptr + word, mask=ok, other=0)
        q = ((w >> shift) & 15).to(tl.float32)
        szw = tl.load(sz_ptr + ((k0 // (16 * KT * SPG)) * (M // 16) + i) * 8 + g, mask=rok, other=0)
        lo = szw.to(tl.int32)
        hi = (szw >> 32).to(tl.int32)
        scale = tl.where(up == 1, _f16(lo, 16), _f16(lo, 0))
        zero = tl.where(up == 1, -_f16(hi, 16) - 64.0, _f16(hi, 0) - 1024.0)
        val = scale[None, :] * (q - zero[None, :])
        tl.store(w_ptr + col.to(tl.int64)[:, None] * stride_w + row[None, :], val.to(w_ptr.dtype.element_ty),
                 mask=ok)


def frag_dequantize_t(fp: UniformFrag, dtype=torch.float16, out: torch.Tensor | None = None,
                      row_tiles: int = 8) -> torch.Tensor:
    """Wᵀ [n, m] (inputs in packed order) from the fragment layout, by the Triton kernel: what the
    prefill path needs where a layer keeps only that layout. Tiles of 32 inputs × 16·row_tiles
    outputs (the packed layout's dequant: 32 × 128)."""
    m, n = fp.out_features, fp.in_features
    if row_tiles < 1 or row_tiles & (row_tiles - 1):
        raise ValueError(f"row tiles a program must be a power of two, got {row_tiles}")
    if out is None:
        out = torch.empty(n, m, dtype=dtype, device=fp.codes.device)
    bk = 32  # divides every group size the layout takes (multiples of 32)
    _uq_frag_dequant_kernel[(triton.cdiv(m, 16 * row_tiles), n // bk)](
        fp.codes, fp.sz, out, m, n // (16 * fp.kt), out.stride(0), KT=fp.kt, SPG=fp.group_size // (16 * fp.kt),
        BK=bk, BO=16 * row_tiles, num_warps=4)
    return out


def frag_candidates(fp: UniformFrag, batch: int) -> list[tuple[int, int, int]]:
    """(row tiles, warps, prefetch) launches for the tuner (`frag_configs`). Warps that do not
    divide the steps are offered where the last round wastes at most 1/16 of them: 4096×11008 at
    group 128 has 172 = 4 · 43 steps, which held it to 4 warps (60% of the roofline, RESULTS.md,
    seventeenth session; 95% with 16 warps, twenty-second). Past 16 rows a step's x alone is 16
    registers an n-block, so the ring holds one step (sm_90 compiles of `benchmarks.sass
    uniform-frag`: 56–88 registers at 1–16 rows with two steps in flight, 253 at 64 rows). Four
    steps in flight at one row take 140 registers, a third of the warps an SM holds with two, so
    fewer bytes in flight, not more: not offered."""
    ts = fp.in_features // (16 * tiles_a_step(fp.group_size))
    pf = 2 if batch <= 16 else 1
    fits = [(rt, nw, pf) for rt, nw in ((1, 4), (1, 8), (2, 4), (1, 16)) if ts % nw == 0]
    tails = [(1, nw, pf) for nw in (8, 16) if ts % nw and 16 * (-ts % nw) <= ts]
    return (fits + tails) or [(1, 2 if ts % 2 == 0 else 1, pf)]  # odd step counts: fewer warps still divide them


def uq_frag_matmul(x2: torch.Tensor, fp: UniformFrag, out: torch.Tensor, row_tiles: int = 1, num_warps: int = 4,
                   prefetch: int = 2) -> torch.Tensor:
    """out [B ≤ 64, m] = x2 [B, n] (fp16) @ Wᵀ, written in out's dtype."""
    B, n = x2.shape
    ts = n // (16 * fp.kt)
    if B > MAX_BATCH or x2.dtype != torch.float16 or n != fp.in_features:
        raise ValueError(f"int4 fragment kernel takes ≤ {MAX_BATCH} fp16 rows of {fp.in_features}, "
                         f"got {tuple(x2.shape)} {x2.dtype}")
    if num_warps < 1 or num_warps & (num_warps - 1) or prefetch < 1:
        raise ValueError(f"int4 fragment kernel: warps a power of two and prefetch ≥ 1, got {num_warps}, {prefetch}")
    if fp.perm is not None:
        x2 = x2.index_select(1, fp.perm.long())
    x2 = x2.contiguous()
    if x2.data_ptr() % 8:
        x2 = x2.clone()  # x is read 8 bytes at a time
    tm = fp.out_features // 16
    scratch = torch.empty(512 * COPIES, dtype=torch.float32, device=out.device) if interpreting() else out
    args = (x2.view(torch.int64), fp.codes, fp.sz, out, scratch, tm, ts, B, x2.stride(0) // 4, out.stride(0))
    _launch(_uq_frag_kernel, (triton.cdiv(tm, row_tiles),), args, "int4 frag kernel", row_tiles, num_warps, COPIES,
            B, KT=fp.kt, SPG=fp.group_size // (16 * fp.kt), NB=n_blocks(B), PF=prefetch, EVEN=tm % row_tiles == 0,
            TAIL=ts % num_warps != 0)
    return out


# ----------------------------------------------------------------------------------------------
# A layer kept only in the fragment layout (`UniformLinear.use_fragment_layout`): no packed codes
# beside it, so >64 rows and other dtypes decode Wᵀ from it (`frag_dequantize_t`) for cuBLAS
# ----------------------------------------------------------------------------------------------

_TUNED: dict[tuple, UQConfig] = {}


def frag_configs(fp: UniformFrag, batch: int, dtype) -> list[UQConfig]:
    """What the tuner times for a fragment-layout layer: the tensor-core kernel's launches (fp16;
    past 64 rows one launch a 64-row chunk, each reading the int4 codes again), and from 16 rows
    on (or for other dtypes) Wᵀ decoded + cuBLAS, which writes and reads the fp16 weight once.
    With only the latter past 64 rows, a 128-token prompt's first token took 40 ms against the
    packed layout's 32 (H200, RESULTS.md); a few chunks read less than the fp16 weight's round trip."""
    cands = []
    if dtype == torch.float16:
        launches = frag_candidates(fp, min(batch, MAX_BATCH))
        cands = [UQConfig("frag", row_tiles=rt, num_warps=nw, prefetch=pf) for rt, nw, pf in launches]
    if batch >= 16 or not cands:
        cands.append(UQConfig("dequant"))
    return cands


def frag_run(x2: torch.Tensor, fp: UniformFrag, bias, cfg: UQConfig, out: torch.Tensor) -> torch.Tensor:
    """out = x2 @ Wᵀ (+ bias) by one of `frag_configs`' launches."""
    if cfg.kind not in ("frag", "dequant"):
        raise ValueError(f"a fragment-layout layer runs frag or dequant launches, not {cfg.kind!r}")
    if cfg.kind == "dequant":
        return dequant_matmul(x2, frag_dequantize_t(fp, x2.dtype), fp.perm, bias, out)
    for r in range(0, x2.shape[0], MAX_BATCH):
        uq_frag_matmul(x2[r:r + MAX_BATCH], fp, out[r:r + MAX_BATCH], cfg.row_tiles, cfg.num_warps, cfg.prefetch)
    if bias is not None:
        out += bias
    return out


def frag_linear(x: torch.Tensor, fp: UniformFrag, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) for a layer kept in the fragment layout, with the launch tuned per
    (shape, batch bucket, dtype) as the packed layers' are (`uniform_triton.choose_config`)."""
    x2, lead = as_rows(x)
    batch = x2.shape[0]
    key = ("int4 fragment layout", fp.group_size, fp.out_features, fp.in_features, fp.perm is not None,
           batch_bucket(batch), str(x2.dtype))
    out = torch.empty(batch, fp.out_features, dtype=x2.dtype, device=x2.device)

    def tune() -> UQConfig:
        best, _ = time_candidates(lambda cfg: frag_run(x2, fp, bias, cfg, out), frag_configs(fp, batch, x2.dtype),
                                  x2.device)
        _TUNED[key] = best
        return best

    cfg = choose(_TUNED, key, x2, tune, lambda: frag_configs(fp, batch, x2.dtype)[0], UQConfig,
                 lambda: frag_configs(fp, batch, x2.dtype))
    return frag_run(x2, fp, bias, cfg, out).reshape(*lead, fp.out_features)
