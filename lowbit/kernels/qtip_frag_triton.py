"""QTIP HYB decode-GEMV/GEMM on tensor cores for batch 1–64, every value born in the register the mma reads.

Why this layout works: the published HYB tile order *is* the A-fragment order of
`mma.sync.m16n8k16` (../shared/specs/qtip.md). Lane l = 4g + q of a warp owns trellis states
4l .. 4l+3 of a 16×16 tile, and those are exactly its four A registers (rows g, g+8 × column pairs
q, q+4), their bits a 28–40-bit window starting at stream bit 8K·l. So a warp decodes a whole tile
without moving data between lanes, and one mma multiplies it by up to 8 rows of x (the B fragment:
batch rows are the mma's n axis), accumulating in float32; past 8 rows the same decoded tile meets
each 8-row block of x (NB ≤ 8 mmas). The prefill path's dequantization (`frag_dequant`) is the same
decode with the A registers stored to Ŵ instead of multiplied. Per weight pair a lane spends one shift,
one IMAD (h = s·s + s), one LOP3 (the table address), one shared load and one LOP3 (the sign);
the FMAs are the tensor core's. The CUDA-core kernels (`qtip_triton._hyb_flat_kernel`) also spend
two fp16→fp32 conversions and two FFMAs per pair, and their one-copy table costs ~3.3-way bank
conflicts.

Launches without ragged edges (`even_launch`) run a loop that keeps the code words and x of the next
PF steps in a ring of registers (a warp asks for only 64 B of codes a row tile a step): peeled, so that
no load needs a mask, or with masked loads ahead (`peel=False`; the tuner times both, RESULTS.md);
the others a masked loop one step ahead. What bounds the loop now (Nsight Compute, RESULTS.md,
sixth session) is the SM's L1/shared-memory unit (66–83% busy: table lookups, code and x loads) and
per-instruction latency, with DRAM at 12–24% of its peak: requests into L2 far ahead, register caps
and other table sizes were measured and did not help.

The 512-entry table is replicated 32 times in shared memory (entry e for lane l at word 32e + l),
so the lanes of a lookup always hit 32 different banks. Plain Triton has no shared buffer with a
chosen layout, so:
1. a `tl.gather` over a 64 KiB tensor inside a branch that never runs (`TM < 0`) makes Triton
   allocate ≥ 64 KiB of dynamic shared memory (checked after compiling: `metadata.shared`);
2. the prologue writes the replicated table at the start of that memory with `st.shared`;
3. the loop reads it with `ld.shared`. Nothing between the prologue and the epilogue uses Triton's
   shared memory (no gathers, reductions or layout conversions in the loop, num_stages=1), so the
   table stays intact until the loop ends;
4. the epilogue sums the warps' accumulators in the same memory, also by hand (`_out_all`): one
   barrier for all registers, where Triton's reduction per register paid three each (24 in a row
   at 2 row tiles; a 4096² launch's fixed cost fell from 3.3–10 to 2.1–5.4 µs, RESULTS.md).
Lane numbers come from `%laneid`. Every tensor is [32·NW], one element per thread; row tiles and
n-blocks are tuples unrolled at compile time, so an elementwise inline-asm call runs all 32 lanes
of a warp together, as `mma.sync` requires, and Triton has no layout to choose.

Under TRITON_INTERPRET the PTX pieces are emulated with plain Triton ops (the table read from global
memory, the mma computed from its fragment definition over [.., 8, 4] reshapes), so the CPU tests
check the same lane bookkeeping; the GPU tests check the PTX.
"""

from __future__ import annotations

import torch

from .pdl import launch_options, wait_prior
from .qtip_shared_triton import _be, _put
from .tuning import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

COPIES = (8, 16, 32)  # table copies the kernel can keep: 32 is conflict-free, 16 and 8 take less memory


def _lookup_asm(copies: int) -> str:
    """PTX of one table lookup ($1 = state s, $2 = this lane's copy offset 4·(lane % copies), $3 =
    the table's shared address): h = s·s + s; the entry (bits 6..14 of h) times 4·copies bytes, i.e.
    h & 0x7FC0 (shifted left once for 32 copies, right once for 8), OR the copy offset (its bits
    2..6 are free); a shared load at that plus the table address (ptxas folds a uniform base into
    the load); the sign XOR. Hand-written because Triton's own arithmetic spends extra
    instructions here."""
    entry = {8: "and.b32 a, h, 32704;\n\tshr.b32 a, a, 1;\n\t", 16: "and.b32 a, h, 32704;\n\t",
             32: "shl.b32 a, h, 1;\n\tand.b32 a, a, 65408;\n\t"}[copies]
    return ("{ .reg .b32 h, a, v;\n\t"
            "mad.lo.u32 h, $1, $1, $1;\n\t" + entry
            + "or.b32 a, a, $2;\n\t"
            "add.u32 a, a, $3;\n\t"
            "ld.shared.b32 v, [a];\n\t"
            "and.b32 h, h, 32768;\n\t"
            "xor.b32 $0, v, h; }")


if triton is not None:
    _LOOKUP_ASM_16 = tl.constexpr(_lookup_asm(16))
    _LOOKUP_ASM_32 = tl.constexpr(_lookup_asm(32))
    _LOOKUP_ASM_8 = tl.constexpr(_lookup_asm(8))

    @triton.jit
    def _lane_ids(col, EMULATE: tl.constexpr):
        """Lane (0..31) of the thread holding each column."""
        if EMULATE:
            lane = col % 32
        else:
            lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [col], dtype=tl.int32,
                                             is_pure=True, pack=1)
        return lane

    @triton.jit
    def _smem_base(col):
        """Shared-window address of Triton's dynamic shared memory."""
        return tl.inline_asm_elementwise("mov.u32 $0, global_smem;", "=r,r", [col], dtype=tl.int32,
                                         is_pure=True, pack=1)

    @triton.jit
    def _write_table(lut_ptr, REP: tl.constexpr):
        """Table at global_smem with REP copies of each entry (entry e, copy c at word REP·e + c):
        16-byte stores of 4 copies each. One 1-D tensor, so consecutive lanes store consecutive
        slots (conflict-free; a 2-D shape let Triton 3.6 lay lanes down a column: 32-way
        conflicts, ~2 µs a program), and all loads are issued before the first store (a store
        asm orders later loads after it)."""
        q = tl.arange(0, 128 * REP)  # 16-byte slot: entry q // (REP / 4)
        v = tl.load(lut_ptr + q // (REP // 4))
        tl.inline_asm_elementwise("st.shared.v4.b32 [$1], {$2, $2, $2, $2};\n\tmov.u32 $0, 0;", "=r,r,r",
                                  [_smem_base(q) + q * 16, v], dtype=tl.int32, is_pure=False, pack=1)
        tl.debug_barrier()

    @triton.jit
    def _reserve_shared(src_ptr, scratch_ptr, col, TM, REP: tl.constexpr):
        """Make Triton reserve 2 KiB · REP of dynamic shared memory (from `global_smem`) for the
        hand-written shared accesses: a gather over a 512·REP-entry int32 tensor inside a branch
        that never runs (TM < 0; `_launch` checks the reservation after compiling)."""
        if TM < 0:
            big = tl.load(src_ptr + tl.arange(0, 512 * REP) // REP)
            tl.store(scratch_ptr + col, tl.gather(big, col, 0))

    @triton.jit
    def _table(lut_ptr, scratch_ptr, col, lane, TM, REP: tl.constexpr, EMULATE: tl.constexpr):
        """Write the replicated table; return (this lane's copy offset in bytes, the table's shared
        address) for `_lookup` (unused in the emulation, which reads the table from global memory).
        The `TM < 0` branch never runs: its gather over a 512·REP-entry tensor only makes Triton
        reserve that much shared memory."""
        if not EMULATE:
            _reserve_shared(lut_ptr, scratch_ptr, col, TM, REP)
            _write_table(lut_ptr, REP)
            lane_addr = ((lane % REP) * 4, _smem_base(col))
        else:
            lane_addr = (lane * 4, lane * 0)
        return lane_addr

    @triton.jit
    def _word_offsets(lane, K: tl.constexpr):
        """Per lane: offset (int32 words) of its first code word in a tile and the distance to the
        second (the next word; the tile's first after its last). The lane's window starts at
        stream bit 8K·lane, 16·(lane % 2) bits into the first word for K = 2."""
        nwords: tl.constexpr = 8 * K
        first = (K * lane) // 4
        nxt = tl.where(first + 1 == nwords, 0, first + 1)
        return first, nxt - first

    @triton.jit
    def _ld(ptr, msk):
        """A load, zero where msk is false; msk None: every address is valid (no predicate)."""
        if msk is None:
            v = tl.load(ptr)
        else:
            v = tl.load(ptr, mask=msk, other=0)
        return v

    @triton.jit
    def _load_words(ptr, delta, msk, lane, K: tl.constexpr):
        """The lane's two raw code words (K = 2: the second only for odd lanes, or for all lanes
        where msk is None: even lanes' second word is in the tile and goes unused), kept raw until
        the step that decodes them: any use right after the load would make the warp wait there."""
        r0 = _ld(ptr, msk)
        if K == 2 and msk is not None:
            r1 = tl.load(ptr + delta, mask=msk & ((lane & 1) == 1), other=0)
        else:
            r1 = _ld(ptr + delta, msk)
        return r0, r1

    @triton.jit
    def _row_tiles_present(i0, TM, RT: tl.constexpr):
        """Per row tile of the program: is it inside the matrix (vectors: the interpreter wants
        tensor masks)."""
        ok = ()
        for r in tl.static_range(RT):
            ok = ok + ((i0 + r) < TM,)
        return ok

    @triton.jit
    def _step_words(cp, RS, delta, jm, ok, lane, K: tl.constexpr, RT: tl.constexpr):
        """Raw code words (u, v) of one step, one pair per row tile (ok None: every row tile exists;
        jm None as well: every load is valid)."""
        w = ()
        for r in tl.static_range(RT):
            if ok is None:
                w = w + (_load_words(cp + r * RS, delta, jm, lane, K),)
            else:
                w = w + (_load_words(cp + r * RS, delta, jm & ok[r], lane, K),)
        return w

    @triton.jit
    def _step_x(xp, XS, jm, xok, NB: tl.constexpr, XF: tl.constexpr):
        """B fragments (two int32 fp16 pairs) of one step, one per n-block of 8 batch rows (xok
        None: every row of every n-block is readable; jm None as well: every load is valid). XF: x
        in the fragment order, both registers in one 8-byte word (xp points at int64)."""
        xs = ()
        for b in tl.static_range(NB):
            if XF:
                v = _ld(xp + b * XS, jm)
                xs = xs + ((v.to(tl.int32), (v >> 32).to(tl.int32)),)
            elif xok is None:
                xs = xs + ((_ld(xp + b * XS, jm), _ld(xp + b * XS + 4, jm)),)
            else:
                m = jm & xok[b]
                xs = xs + ((_ld(xp + b * XS, m), _ld(xp + b * XS + 4, m)),)
        return xs

    @triton.jit
    def _prmt(a, b, sel, EMULATE: tl.constexpr):
        """PTX prmt: bytes of b:a picked by the nibbles of sel (only the selectors used here are
        emulated: 0x1032 swaps a's halves, 0x3254 is a's high half over b's low half)."""
        if EMULATE:
            ua = a.to(tl.uint32, bitcast=True)
            ub = b.to(tl.uint32, bitcast=True)
            r = tl.where(sel == 0x1032, (ua << 16) | (ua >> 16), (ua & 0xFFFF0000) | (ub & 0xFFFF))
        else:
            r = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel], dtype=tl.uint32,
                                          is_pure=True, pack=1)
        return r

    @triton.jit
    def _window(r0, r1, lane, sel, K: tl.constexpr, EMULATE: tl.constexpr):
        """Stream bits of the lane's 4 states as (hi, lo) uint32 words from its two raw code words
        (int32 holding two 16-bit stream words, the first in the low half): state m is the 16 bits
        at bit 2K·m of hi:lo (K = 2: lo unused)."""
        if K == 2:  # one byte permute: the words' halves in stream order, from bit 16·(lane % 2)
            hi = _prmt(r0, r1, sel, EMULATE)
            lo = hi
        else:
            w0 = _be(r0)
            w1 = _be(r1)
            if K == 4:
                hi = w0
                lo = w1
            else:  # K = 3: the lane's window starts 8·((3·lane) % 4) bits into w0
                pair = (w0.to(tl.uint64) << 32) | w1.to(tl.uint64)
                pair = pair << (8 * ((K * lane) % 4)).to(tl.uint64)
                hi = (pair >> 32).to(tl.uint32)
                lo = pair.to(tl.uint32)
        return hi, lo

    @triton.jit
    def _state(hi, lo, m: tl.constexpr, K: tl.constexpr):
        """State m (16 bits at bit 2K·m, bits above the low 16 left in: h below only reads them)."""
        sh: tl.constexpr = 16 - 2 * K * m
        if K == 2:
            s = hi >> sh
        elif sh >= 0:
            s = hi >> sh
        else:
            s = (hi << (-sh)) | (lo >> (32 + sh))
        return s

    @triton.jit
    def _lookup(s, lut_ptr, lane_addr, REP: tl.constexpr, EMULATE: tl.constexpr):
        """Table word of state s, bit 15 of h = s·(s+1) flipping the first value's sign (on the GPU
        one asm block, `_lookup_asm`)."""
        if EMULATE:
            h = s * s + s
            pk = tl.load(lut_ptr + ((h >> 6) & 511).to(tl.int32)) ^ (h & 0x8000).to(tl.int32)
        else:
            if REP == 16:
                asm: tl.constexpr = _LOOKUP_ASM_16
            elif REP == 8:
                asm: tl.constexpr = _LOOKUP_ASM_8
            else:
                asm: tl.constexpr = _LOOKUP_ASM_32
            pk = tl.inline_asm_elementwise(asm, "=r,r,r,r", [s, lane_addr[0], lane_addr[1]], dtype=tl.int32,
                                           is_pure=True, pack=1)
        return pk

    @triton.jit
    def _f16(r, shift: tl.constexpr):
        return ((r >> shift) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _frag_dot(a, b, R: tl.constexpr):
        """[R, 8 (g), 8 (n)]: Σ over the 4 lanes t of a group of lo·lo + hi·hi of the A register a
        (lane (g, t)) and the B register b (lane (n, t)), both [R, 8, 4]."""
        alo = _f16(a, 0)
        ahi = _f16(a, 16)
        blo = _f16(b, 0)
        bhi = _f16(b, 16)
        p = alo[:, :, None, :] * blo[:, None, :, :] + ahi[:, :, None, :] * bhi[:, None, :, :]
        return tl.sum(p, 3)

    @triton.jit
    def _mma(a, b, c, NW: tl.constexpr, EMULATE: tl.constexpr):
        """D = A·B + C: one m16n8k16 per warp (fp16 in, fp32 accumulate); a, b, c are the lanes'
        4, 2 and 4 registers, each [32·NW]."""
        a0, a1, a2, a3 = a
        b0, b1 = b
        c0, c1, c2, c3 = c
        if EMULATE:
            shp: tl.constexpr = [NW, 8, 4]
            top = _frag_dot(tl.reshape(a0, shp), tl.reshape(b0, shp), NW) + \
                _frag_dot(tl.reshape(a2, shp), tl.reshape(b1, shp), NW)  # rows g, columns n
            bot = _frag_dot(tl.reshape(a1, shp), tl.reshape(b0, shp), NW) + \
                _frag_dot(tl.reshape(a3, shp), tl.reshape(b1, shp), NW)  # rows g + 8
            t0, t1 = tl.split(tl.reshape(top, [NW, 8, 4, 2]))
            u0, u1 = tl.split(tl.reshape(bot, [NW, 8, 4, 2]))
            d0 = c0 + tl.reshape(t0, a0.shape)
            d1 = c1 + tl.reshape(t1, a0.shape)
            d2 = c2 + tl.reshape(u0, a0.shape)
            d3 = c3 + tl.reshape(u1, a0.shape)
        else:
            d0, d1, d2, d3 = tl.inline_asm_elementwise(
                "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
                "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
                dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
        return (d0, d1, d2, d3)

    @triton.jit
    def _decode_a(u, v, lane, sel, lut_ptr, lane_addr, K: tl.constexpr, REP: tl.constexpr, EMULATE: tl.constexpr):
        """A registers of one 16×16 tile from the lanes' raw code words: lane (g, q) gets
        Ŵ[g, 2q..2q+1], Ŵ[g+8, 2q..], Ŵ[g, 8+2q..], Ŵ[g+8, 8+2q..] as fp16 pairs."""
        hi, lo = _window(u, v, lane, sel, K, EMULATE)
        a0 = _lookup(_state(hi, lo, 0, K), lut_ptr, lane_addr, REP, EMULATE)
        a1 = _lookup(_state(hi, lo, 1, K), lut_ptr, lane_addr, REP, EMULATE)
        a2 = _lookup(_state(hi, lo, 2, K), lut_ptr, lane_addr, REP, EMULATE)
        a3 = _lookup(_state(hi, lo, 3, K), lut_ptr, lane_addr, REP, EMULATE)
        return (a0, a1, a2, a3)

    @triton.jit
    def _smem_store(off, v, scratch_ptr, EMULATE: tl.constexpr):
        """Store float32 v at byte offset `off` of the shared window (the emulation: of a scratch buffer)."""
        if EMULATE:
            tl.store(scratch_ptr + off // 4, v)
        else:
            tl.inline_asm_elementwise("st.shared.b32 [$1], $2;\n\tmov.u32 $0, 0;", "=r,r,r",
                                      [_smem_base(off) + off, v.to(tl.int32, bitcast=True)], dtype=tl.int32,
                                      is_pure=False, pack=1)

    @triton.jit
    def _smem_load(off, scratch_ptr, EMULATE: tl.constexpr):
        """Float32 at byte offset `off` of the shared window (not pure: it must stay after the barrier)."""
        if EMULATE:
            v = tl.load(scratch_ptr + off // 4)
        else:
            v = tl.inline_asm_elementwise("ld.shared.b32 $0, [$1];", "=r,r", [_smem_base(off) + off],
                                          dtype=tl.int32, is_pure=False, pack=1).to(tl.float32, bitcast=True)
        return v

    @triton.jit
    def _out_all(y_ptr, scratch_ptr, acc, col, lane, ib, B, TM, stride_yb, RT: tl.constexpr, NB: tl.constexpr,
                 NW: tl.constexpr, WC: tl.constexpr, REP: tl.constexpr, ATOMIC: tl.constexpr, EMULATE: tl.constexpr):
        """Sum every accumulator register over the WC warps of its row group and add/store it, one
        shared-memory exchange for as many registers as the table's space holds (all of them in
        most launches): each warp stores its registers (word (w·LC + k)·32 + lane), one barrier,
        each thread sums WC words of an output. Triton's reduction per register paid three
        barriers each (24 in a row at 2 row tiles). Register k = 4·(NB·r + b) + c of lane (g, t)
        of a warp in row group q holds y[8b + 2t + (c & 1)][16·(ib + RT·q + r) + g + 8·(c >> 1)]."""
        L: tl.constexpr = RT * NB * 4
        WR: tl.constexpr = NW // WC
        CAP: tl.constexpr = (2048 * REP) // (128 * NW)  # registers a round: the table's bytes / a register's
        LC: tl.constexpr = L if L <= CAP else CAP
        ROUNDS: tl.constexpr = (L + LC - 1) // LC
        OUTS: tl.constexpr = WR * LC * 32  # outputs a round
        PER: tl.constexpr = (OUTS + 32 * NW - 1) // (32 * NW)  # outputs a thread sums per round
        tl.static_assert(NW * LC * 128 <= 2048 * REP, "frag epilogue: a round must fit the table's memory")
        wid = col // 32
        for g in tl.static_range(ROUNDS):
            if g > 0:
                tl.debug_barrier()  # the previous round's loads are done
            for kk in tl.static_range(LC):
                if g * LC + kk < L:
                    reg = acc[(g * LC + kk) // (4 * NB)][((g * LC + kk) // 4) % NB][(g * LC + kk) % 4]
                    _smem_store(((wid * LC + kk) * 32 + lane) * 4, reg, scratch_ptr, EMULATE)
            tl.debug_barrier()
            for q in tl.static_range(PER):
                o = q * 32 * NW + col  # output: register kk of lane ln in row group wr
                if OUTS % (32 * NW) != 0:  # threads past the round's outputs read its last one (dropped)
                    o = tl.minimum(o, OUTS - 1)
                wr = o // (LC * 32)
                kk = (o // 32) % LC
                ln = o % 32
                v = _smem_load(((wr * WC * LC + kk) * 32 + ln) * 4, scratch_ptr, EMULATE)
                for w in tl.static_range(1, WC):
                    v += _smem_load((((wr * WC + w) * LC + kk) * 32 + ln) * 4, scratch_ptr, EMULATE)
                k = g * LC + kk
                c = k % 4
                rows = (ib + RT * wr + k // (4 * NB)) * 16 + (ln >> 2) + 8 * (c >> 1)
                n = 8 * ((k // 4) % NB) + 2 * (ln & 3) + (c & 1)
                own = (q * 32 * NW + col) < OUTS
                _put(y_ptr, n * stride_yb + rows, v, own & (k < L) & (rows < TM * 16) & (n < B), ATOMIC)

    @triton.jit
    def _walk_start(codes_ptr, TM, TN, tiles_per_split, K: tl.constexpr, RT: tl.constexpr, NW: tl.constexpr,
                    WC: tl.constexpr, EMULATE: tl.constexpr):
        """What both kernels set up first: each thread's lane and byte selector, the program's first
        row tile ib, its warp's row tiles (first i0, present ok) and the program's tile columns
        [t0, t1), the warp's first column j, the pointer to its lanes' code words, and the distance
        to their second word. The NW warps form NW / WC row groups of RT row tiles; the WC warps of
        a group walk the tile columns together (warp w takes column t0 + w % WC, then every WC-th).
        The table comes after the first code loads (`_table`): its writes then overlap their latency."""
        col = tl.arange(0, 32 * NW)
        lane = _lane_ids(col, EMULATE)
        sel = tl.where((lane & 1) == 1, 0x3254, 0x1032)
        wid = col // 32
        ib = tl.program_id(0) * (RT * (NW // WC))
        i0 = ib + (wid // WC) * RT
        ok = _row_tiles_present(i0, TM, RT)
        t0 = tl.program_id(1) * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, TN)
        first, delta = _word_offsets(lane, K)
        j = t0 + wid % WC
        cp = codes_ptr + (i0 * TN + j) * (8 * K) + first
        return col, lane, sel, ib, i0, ok, t0, t1, j, cp, delta

    @triton.jit
    def _zero_acc(RT: tl.constexpr, NB: tl.constexpr, NW: tl.constexpr):
        """The mma accumulators of RT row tiles × NB n-blocks (four float32 registers each), zero."""
        z = tl.zeros([32 * NW], tl.float32)
        acc = ()
        for _r in tl.static_range(RT):
            row = ()
            for _b in tl.static_range(NB):
                row = row + ((z, z, z, z),)
            acc = acc + (row,)
        return acc

    @triton.jit
    def _frag_step(acc, words, xs, lane, sel, lut_ptr, lane_addr, K: tl.constexpr, RT: tl.constexpr, NB: tl.constexpr,
                   NW: tl.constexpr, REP: tl.constexpr, EMULATE: tl.constexpr):
        """One step: decode each row tile's 16×16 tile and multiply it by every n-block of x."""
        new = ()
        for r in tl.static_range(RT):
            a = _decode_a(words[r][0], words[r][1], lane, sel, lut_ptr, lane_addr, K, REP, EMULATE)
            row = ()
            for b in tl.static_range(NB):
                row = row + (_mma(a, xs[b], acc[r][b], NW, EMULATE),)
            new = new + (row,)
        return new

    @triton.jit
    def _ring_step(acc, ring_w, ring_x, cp, xp, pm, RS, delta, XS, lane, sel, lut_ptr, lane_addr, K: tl.constexpr,
                   RT: tl.constexpr, NB: tl.constexpr, NW: tl.constexpr, REP: tl.constexpr, PF: tl.constexpr,
                   XF: tl.constexpr, EMULATE: tl.constexpr):
        """One step of the ring loop: ask for the step at (cp, xp) (pm None: without a mask), multiply
        the ring's oldest step, push the one just asked for."""
        w_new = _step_words(cp, RS, delta, pm, None, lane, K, RT)
        x_new = _step_x(xp, XS, pm, None, NB, XF)
        acc = _frag_step(acc, ring_w[0], ring_x[0], lane, sel, lut_ptr, lane_addr, K, RT, NB, NW, REP, EMULATE)
        rw = ()
        rx = ()
        for d in tl.static_range(1, PF):
            rw = rw + (ring_w[d],)
            rx = rx + (ring_x[d],)
        return acc, rw + (w_new,), rx + (x_new,)

    @triton.jit(do_not_specialize=["TM", "B", "tiles_per_split"])
    def _hyb_frag_kernel(
        x_ptr, codes_ptr, lut_ptr, y_ptr, scratch_ptr,
        TM, TN: tl.constexpr, B, stride_xb, stride_yb, tiles_per_split,
        K: tl.constexpr, RT: tl.constexpr, NB: tl.constexpr, NW: tl.constexpr, WC: tl.constexpr,
        REP: tl.constexpr, ATOMIC: tl.constexpr, EMULATE: tl.constexpr, PDL: tl.constexpr, EVEN: tl.constexpr,
        PF: tl.constexpr, XF: tl.constexpr, PEEL: tl.constexpr,
    ):
        """y[:B, rows] (+)= xh[:B] · Ŵ[rows]ᵀ for the program's (NW / WC)·RT row tiles (program
        axis 0), B ≤ 8·NB rows of x in NB n-blocks, and the tile columns of split program_id(1);
        warp w works on row group w // WC and takes columns t0 + w % WC, then every WC-th. A tile
        is decoded once and multiplied by every n-block; the warps of a column share x through
        L1. Every tensor is [32·NW], one element per thread; row tiles and n-blocks are tuples
        unrolled at compile time (a tensor axis would let Triton pick layouts that break the
        lane ↔ fragment mapping). x is fp16 read as int32 pairs (stride_xb in pairs) or, with XF,
        in the fragment order (`frag_x_order`, read as int64: one 8-byte load a lane and n-block,
        where row-major x costs a cache line per row of the n-block); y float32. PEEL (unmasked launches):
        the loop stops PF steps early and the ring's last steps are consumed after it, so no load
        needs a mask; else every trip asks for step s + PF under a mask (`frag_matmul`'s `peel`)."""
        col, lane, sel, ib, i0, ok, t0, t1, j, cp, delta = _walk_start(codes_ptr, TM, TN, tiles_per_split, K, RT,
                                                                       NW, WC, EMULATE)
        wc = (col // 32) % WC
        # B fragment of n-block b: lane (n, t) holds x[8b + n, 16j + 2t + {0,1}] and x[.., 16j + 8 + 2t + {0,1}]
        xn = lane >> 2
        if XF:  # rows past B exist in the buffer (unwritten): their products land in dropped columns
            xok = None
            XS = 32
            XSTEP = 32 * NB * WC
        else:
            xok = ()
            for b in tl.static_range(NB):
                xok = xok + (xn + 8 * b < B,)
            XS = 8 * stride_xb
            XSTEP = 8 * WC
        # Pointers advance by WC tiles a step (no per-step 64-bit index math); code words and x
        # are requested ahead of the step that uses them (PF steps, or one in the masked loop).
        TW: tl.constexpr = 8 * K  # int32 code words per tile
        RS = TN * TW  # words between row tiles
        acc = _zero_acc(RT, NB, NW)
        if XF:
            xp0 = x_ptr + j * (32 * NB) + lane
        elif EVEN:
            xp0 = x_ptr + tl.minimum(xn, B - 1) * stride_xb + (lane & 3) + 8 * j
        else:
            xp0 = x_ptr + xn * stride_xb + (lane & 3) + 8 * j
        if EVEN:
            # Every warp takes n = tiles_per_split / WC whole steps and every row tile exists. Rows
            # of x past B are read as row B - 1 (their products land in columns the epilogue drops).
            # Code words and x run PF steps ahead in a ring of registers: a step's 64·RT bytes of
            # codes a warp are too few to cover the memory latency one step ahead.
            n = tiles_per_split // WC
            xp = xp0
            ring_w = ()
            for d in tl.static_range(PF):
                ring_w = ring_w + (_step_words(cp + d * WC * TW, RS, delta, col * 0 + d < n, None, lane, K, RT),)
            lane_addr = _table(lut_ptr, y_ptr, col, lane, TM, REP, EMULATE)
            wait_prior(PDL)  # the table and the first code words came before: weights, not activations
            ring_x = ()
            for d in tl.static_range(PF):
                ring_x = ring_x + (_step_x(xp + d * XSTEP, XS, col * 0 + d < n, None, NB, XF),)
            cp += PF * WC * TW
            xp += PF * XSTEP
            if PEEL:
                # Steps 0 .. n - PF - 1 each ask for step s + PF, which exists: no masks, so no
                # predicates and no zeroed targets in the loop (about 25 of its 245 instructions a
                # trip at 2 row tiles, RESULTS.md). The last PF steps come from the ring after it;
                # where n < PF the ring's steps past n hold x masked to zero and add nothing.
                for _s in tl.range(0, n - PF, loop_unroll_factor=PF):
                    acc, ring_w, ring_x = _ring_step(acc, ring_w, ring_x, cp, xp, None, RS, delta, XS, lane, sel,
                                                     lut_ptr, lane_addr, K, RT, NB, NW, REP, PF, XF, EMULATE)
                    cp += WC * TW
                    xp += XSTEP
                for d in tl.static_range(PF):
                    acc = _frag_step(acc, ring_w[d], ring_x[d], lane, sel, lut_ptr, lane_addr, K, RT, NB, NW, REP,
                                     EMULATE)
            else:
                # Every trip asks for step s + PF under a mask (none past the warp's n steps). Slower
                # than the peeled loop where an SM holds three programs, faster where it holds one
                # (RESULTS.md, twenty-fourth session), so both are offered to the tuner.
                for s in tl.range(0, n, loop_unroll_factor=PF):
                    acc, ring_w, ring_x = _ring_step(acc, ring_w, ring_x, cp, xp, col * 0 + s + PF < n, RS, delta,
                                                     XS, lane, sel, lut_ptr, lane_addr, K, RT, NB, NW, REP, PF, XF,
                                                     EMULATE)
                    cp += WC * TW
                    xp += XSTEP
        else:
            xp = xp0
            jm = j < t1
            words = _step_words(cp, RS, delta, jm, ok, lane, K, RT)
            lane_addr = _table(lut_ptr, y_ptr, col, lane, TM, REP, EMULATE)
            wait_prior(PDL)
            xs = _step_x(xp, XS, jm, xok, NB, XF)
            for j0 in range(t0, t1, WC):
                nm = j0 + wc + WC < t1
                cp += WC * TW
                xp += XSTEP
                xs_next = _step_x(xp, XS, nm, xok, NB, XF)
                words_next = _step_words(cp, RS, delta, nm, ok, lane, K, RT)
                acc = _frag_step(acc, words, xs, lane, sel, lut_ptr, lane_addr, K, RT, NB, NW, REP, EMULATE)
                xs = xs_next
                words = words_next
        tl.debug_barrier()  # every warp is done with the table before the epilogue's reduction reuses it
        _out_all(y_ptr, scratch_ptr, acc, col, lane, ib, B, TM, stride_yb, RT, NB, NW, WC, REP, ATOMIC, EMULATE)

    @triton.jit
    def _store_tile(wp, u, v, msk, stride_w, lane, sel, lut_ptr, lane_addr, K: tl.constexpr, REP: tl.constexpr,
                    EMULATE: tl.constexpr):
        """Decode one tile and store it: wp points at this lane's pair Ŵ[g, 2q..2q+1] (int32 view)."""
        a0, a1, a2, a3 = _decode_a(u, v, lane, sel, lut_ptr, lane_addr, K, REP, EMULATE)
        tl.store(wp, a0, mask=msk)
        tl.store(wp + 8 * stride_w, a1, mask=msk)
        tl.store(wp + 4, a2, mask=msk)
        tl.store(wp + 8 * stride_w + 4, a3, mask=msk)

    @triton.jit(do_not_specialize=["TM", "TN", "stride_w", "tiles_per_split"])
    def _hyb_frag_dequant_kernel(
        codes_ptr, lut_ptr, w_ptr, TM, TN, stride_w, tiles_per_split,
        K: tl.constexpr, RT: tl.constexpr, NW: tl.constexpr, REP: tl.constexpr, EMULATE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Ŵ [16·TM, 16·TN] as fp16 pairs (w_ptr int32, stride_w in pairs): the fragment kernel's
        decode with stores in place of the mma, for the prefill path (decode once, then cuBLAS).
        Same grid and warp walk as `_hyb_frag_kernel`."""
        col, lane, sel, ib, i0, ok, t0, t1, j, cp, delta = _walk_start(codes_ptr, TM, TN, tiles_per_split, K, RT,
                                                                       NW, NW, EMULATE)
        wid = col // 32
        TW: tl.constexpr = 8 * K
        RS = TN * TW
        WS = 16 * stride_w  # pairs between row tiles of Ŵ
        wp = w_ptr + (16 * i0 + (lane >> 2)) * stride_w + 8 * j + (lane & 3)
        jm = j < t1
        words = _step_words(cp, RS, delta, jm, ok, lane, K, RT)
        lane_addr = _table(lut_ptr, w_ptr, col, lane, TM, REP, EMULATE)
        wait_prior(PDL)  # Ŵ's buffer may be one an earlier kernel still reads
        for j0 in range(t0, t1, NW):
            nm = j0 + wid + NW < t1
            cp += NW * TW
            words_next = _step_words(cp, RS, delta, nm, ok, lane, K, RT)
            for r in tl.static_range(RT):
                _store_tile(wp + r * WS, words[r][0], words[r][1], jm & ok[r], stride_w, lane, sel, lut_ptr,
                            lane_addr, K, REP, EMULATE)
            words = words_next
            wp += 8 * NW
            jm = nm


MAX_BATCH = 64  # 8 n-blocks of the mma's n = 8


def even_launch(tm: int, tn: int, batch: int, row_tiles: int, num_warps: int, tiles_per_split: int,
                warp_cols: int | None = None, x_frag: bool = False) -> bool:
    """The launch needs no masks: every program's row tiles exist, its tile columns are whole
    steps of warp_cols (default num_warps) inside the matrix, and x's rows fill every n-block or
    one (rows past the batch are then read as its last row) or x is in the fragment order (its
    buffer has every row). The kernel then runs its unmasked, unrolled loop."""
    nb = n_blocks(batch)
    wc = warp_cols or num_warps
    return (tm % (row_tiles * (num_warps // wc)) == 0 and tiles_per_split % wc == 0 and tn % tiles_per_split == 0
            and (x_frag or nb == 1 or batch == 8 * nb))
_CHECKED: set = set()


def n_blocks(batch: int) -> int:
    """n-blocks of 8 rows the kernel is compiled for: a power of two, so batch buckets share variants."""
    return triton.next_power_of_2(triton.cdiv(batch, 8))


def _launch(kernel, grid, args, what: str, row_tiles: int, num_warps: int, copies: int, rows: int | None,
            max_registers: int = 0, **consts):
    """Both kernels' launch: the launch-shape check, the PTX emulation under the interpreter and,
    compiled, the shared-memory check (the reservation trick is Triton's allocator's doing:
    verified once per compiled variant). `rows`: the activation rows it serves, for `pdl.takes_rows`
    (None for the weight decode). `max_registers` > 0 caps the registers a thread may use
    (Triton's `maxnreg`; more programs fit on an SM, ptxas may spill)."""
    if not 1 <= row_tiles <= 4 or copies not in COPIES:
        raise ValueError(f"{what}: row tiles must be 1..4 and table copies one of {COPIES}, "
                         f"got {row_tiles} and {copies}")
    if max_registers and not 24 <= max_registers <= 255:
        raise ValueError(f"{what}: a register cap must be 24..255 (0: none), got {max_registers}")
    emulate = interpreting()
    pdl = launch_options(args[1], rows)
    cap = {"maxnreg": max_registers} if max_registers and not emulate else {}
    kern = kernel[grid](*args, RT=row_tiles, NW=num_warps, REP=copies, EMULATE=emulate, num_warps=num_warps,
                        num_stages=1, **consts, **pdl, **cap)
    key = (what, row_tiles, num_warps, copies, pdl["PDL"], max_registers, tuple(sorted(consts.items())))
    if not emulate and key not in _CHECKED:
        shared = getattr(getattr(kern, "metadata", None), "shared", None)
        if shared is not None and shared < 2048 * copies:
            raise RuntimeError(f"Triton gave the QTIP {what} {shared} bytes of shared memory, "
                               f"its table needs {2048 * copies}")
        _CHECKED.add(key)


def frag_x_order(x: torch.Tensor, nb: int) -> torch.Tensor:
    """x [B ≤ 8·nb, n] in the fragment kernel's x order (the reference of the Hadamard kernels'
    fragment-order output): a flat fp16 buffer of 8·nb·n holding x[8b + g, 16j + 8h + 2t + e] at
    ((j·nb + b)·32 + 4g + t)·4 + 2h + e, rows past B zero (the kernels leave them unwritten)."""
    B, n = x.shape
    full = x.new_zeros(8 * nb, n)
    full[:B] = x
    return full.view(nb, 8, n // 16, 2, 4, 2).permute(2, 0, 1, 4, 3, 5).reshape(8 * nb, n)


def frag_matmul(codes: torch.Tensor, lut32: torch.Tensor, K: int, xh: torch.Tensor, out: torch.Tensor,
                row_tiles: int, num_warps: int, tiles_per_split: int, atomic: bool, copies: int = 32,
                prefetch: int = 2, max_registers: int = 0, warp_cols: int | None = None,
                x_frag: bool = False, peel: bool = True) -> torch.Tensor:
    """out [B ≤ 64, m] (+)= xh [B, n] (fp16) @ Ŵᵀ from HYB codes [m/16, n/16, 16K] (int16, read as
    int32) and the table as 512 int32, kept in `copies` copies per program (32: lanes never share
    a bank; 16: 32 KiB instead of 64, twice the programs per SM, lanes l and l + 16 can collide;
    8: 16 KiB, four lanes a copy).
    Each decoded tile meets every 8-row block of x. With `atomic` the splits add into out (which
    must hold zeros). Launches without ragged edges load `prefetch` steps ahead into registers.
    `max_registers` caps the registers of a thread (0: the compiler's choice). The warps form
    num_warps / warp_cols row groups of `row_tiles` row tiles each (default: one group; more groups
    share each step's x through L1). With `x_frag`, xh is [8·n_blocks(B), n] in the fragment order
    (`frag_x_order`; B is then out's rows). `peel` (unmasked launches): the loop without masks and
    the last prefetched steps after it; False: the masked loop of the same depth."""
    B = out.shape[0] if x_frag else xh.shape[0]
    n = xh.shape[1]
    m = out.shape[1]
    wc = warp_cols or num_warps
    if B > MAX_BATCH or xh.dtype != torch.float16 or xh.stride(1) != 1 or xh.stride(0) % 2 or (
            x_frag and (tuple(xh.shape) != (8 * n_blocks(B), n) or not xh.is_contiguous())):
        raise ValueError(f"frag kernel takes ≤ {MAX_BATCH} contiguous fp16 rows (x_frag: all 8·n-blocks of them), "
                         f"got {tuple(xh.shape)} {xh.dtype} for {B} rows")
    if wc < 1 or num_warps % wc:
        raise ValueError(f"frag kernel: warp columns must divide the warps, got {wc} of {num_warps}")
    tm, tn = m // 16, n // 16
    grid = (triton.cdiv(tm, row_tiles * (num_warps // wc)), triton.cdiv(tn, tiles_per_split))
    # the epilogue's warp sums go through shared memory; the emulation uses this buffer instead
    scratch = torch.empty(512 * copies, dtype=torch.float32, device=out.device) if interpreting() else out
    xv = xh.view(torch.int64) if x_frag else xh.view(torch.int32)
    args = (xv, codes.view(torch.int32), lut32, out, scratch, tm, tn, B, xh.stride(0) // 2,
            out.stride(0), tiles_per_split)
    if prefetch < 1:
        raise ValueError(f"frag kernel: prefetch depth must be ≥ 1, got {prefetch}")
    even = even_launch(tm, tn, B, row_tiles, num_warps, tiles_per_split, wc, x_frag)
    _launch(_hyb_frag_kernel, grid, args, "frag kernel", row_tiles, num_warps, copies, B, max_registers, K=K,
            NB=n_blocks(B), WC=wc, ATOMIC=atomic, EVEN=even, PF=prefetch if even else 1, XF=x_frag,
            PEEL=peel or not even)
    return out


def frag_dequant(codes: torch.Tensor, lut32: torch.Tensor, K: int, out: torch.Tensor, row_tiles: int = 2,
                 num_warps: int = 4, steps: int = 16, copies: int = 32) -> torch.Tensor:
    """out [m, n] fp16 = Ŵ decoded from HYB codes [m/16, n/16, 16K]; each program takes
    `row_tiles` row tiles × `steps` steps of `num_warps` tile columns (defaults: the best of
    `benchmarks/qtip_dequant.py --sweep` on the H100 at the Llama-2-7B MLP shapes)."""
    m, n = out.shape
    if out.dtype != torch.float16 or out.stride(1) != 1 or out.stride(0) % 2:
        raise ValueError(f"frag dequant writes contiguous fp16 rows, got {out.dtype} strides {out.stride()}")
    tm, tn = m // 16, n // 16
    per = steps * num_warps
    grid = (triton.cdiv(tm, row_tiles), triton.cdiv(tn, per))
    args = (codes.view(torch.int32), lut32, out.view(torch.int32), tm, tn, out.stride(0) // 2, per)
    _launch(_hyb_frag_dequant_kernel, grid, args, "frag dequant", row_tiles, num_warps, copies, None, K=K)
    return out
