"""Paged decode attention: one query token per sequence against that sequence's KV blocks.

Layout (fixed by the engine's KV cache):
  q            [B, Hq, D]                           the decode token of each sequence
  k_cache      [num_blocks, block_size, Hkv, D]     (v_cache the same)
  block_tables int32 [B, max_blocks]                page j of sequence b is k_cache[block_tables[b, j]]
  context_lens int32 [B]                            tokens cached for sequence b (this step's included)
  out          [B, Hq, D] = softmax(scale · q kᵀ) v over the first context_lens[b] tokens

GQA: query head h reads kv head h // (Hq / Hkv). One Triton program owns one (sequence, kv head,
context split) and all G = Hq/Hkv query heads that share the kv head, so each K/V row is read from
memory once for the whole group (decode attention is bound by reading the cache). The G heads are
padded to 16 rows so the two products run on tensor cores with `tl.dot` (no dot dimension < 16).

Long contexts with few (sequence, kv head) pairs would leave most SMs idle, so the context is cut
into SPLITS ranges (flash-decoding); each program writes its unnormalised partial (running max m,
sum l, accumulator) and a second small kernel merges them (with LOWBIT_ATTENTION_FUSED_MERGE=1 the
last split of a sequence and kv head to arrive merges them instead, counted with an atomic). The
number of splits depends only on shapes known on the host (B, Hkv, max_blocks), never on
context_lens, so a call can be captured in a CUDA graph and replayed with other lengths; each
program cuts its row's actual length into that many whole-tile ranges. Under PDL a program fetches
its first tile's cached K/V rows before its wait, all but the newest token's (which the launch
before it writes).

Paged prefill attention (`paged_prefill_attention`): the prompt chunks of an engine step, any
number of them of any lengths, in one launch. A program owns BLOCK_M queries of one chunk and one
query head, walks the chunk's pages up to its last query's position with the same online-softmax
tile as decode, masked causally (query at position p sees keys 0..p, the chunk's own keys stored
in the pages before the call). The host lists the (chunk, first query) tiles once per step.
"""

from __future__ import annotations

import math
import os

import torch

from .pdl import launch_options, wait_prior
from .tuning import interpreting
from .workspace import split_workspace

try:  # Triton is absent on some CPU-only installs; the reference still works there.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None


def paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale):
    """Plain-PyTorch oracle with the same signature; computes in float32, returns q's dtype.

    A sequence with context length 0 gets a zero output.
    """
    B, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, D, dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(context_lens[b])
        if n == 0:
            continue
        pages = block_tables[b, : (n + block_size - 1) // block_size].long()
        k = k_cache[pages].reshape(-1, Hkv, D)[:n].float()  # [n, Hkv, D]
        v = v_cache[pages].reshape(-1, Hkv, D)[:n].float()
        k = k.repeat_interleave(G, dim=1)  # [n, Hq, D]
        v = v.repeat_interleave(G, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        p = torch.softmax(s, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", p, v)
    return out.to(q.dtype)


if triton is not None:

    @triton.jit
    def _kv_rows(k_ptr, v_ptr, bt_ptr, b, hkv, tok, n_mask, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_btb,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr):
        """K and V rows [BLOCK_N, BLOCK_D] of tokens `tok` of sequence b (zeros where not n_mask),
        gathered through the page table."""
        offs_d = tl.arange(0, BLOCK_D)
        page = tl.load(bt_ptr + b * s_btb + tok // PAGE, mask=n_mask, other=0).to(tl.int64)
        slot = tok % PAGE
        kv_mask = n_mask[:, None] & (offs_d < D)[None, :]
        k = tl.load(
            k_ptr + page[:, None] * s_kb + slot[:, None] * s_kt + hkv * s_kh + offs_d[None, :],
            mask=kv_mask, other=0.0,
        )
        v = tl.load(
            v_ptr + page[:, None] * s_vb + slot[:, None] * s_vt + hkv * s_vh + offs_d[None, :],
            mask=kv_mask, other=0.0,
        )
        return k, v

    @triton.jit
    def _softmax_tile(q, k, v, tok, n_mask, m_i, l_i, acc, qk_scale, qpos, CAUSAL: tl.constexpr):
        """One tile of the online softmax over keys `tok` (n_mask: those that exist).
        CAUSAL: query row i sees only key positions <= qpos[i]."""
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [rows, BLOCK_N], fp32
        if CAUSAL:
            s = tl.where(n_mask[None, :] & (tok[None, :] <= qpos[:, None]), s, float("-inf"))
        else:
            s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet (an empty split): weights 0, not NaN
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _attend_tile(q, k_ptr, v_ptr, bt_ptr, b, hkv, t0, end, m_i, l_i, acc,
                     qk_scale, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_btb,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                     qpos, CAUSAL: tl.constexpr):
        """The BLOCK_N-token tile of keys from t0 (up to `end`): its K/V rows, then its softmax step."""
        tok = t0 + tl.arange(0, BLOCK_N)
        n_mask = tok < end
        k, v = _kv_rows(k_ptr, v_ptr, bt_ptr, b, hkv, tok, n_mask, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_btb,
                        D, BLOCK_D, PAGE)
        return _softmax_tile(q, k, v, tok, n_mask, m_i, l_i, acc, qk_scale, qpos, CAUSAL)

    @triton.jit
    def _merge_head(part_acc_ptr, part_ml_ptr, out_ptr, row0, out_off,
                    SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
        """One head's output (D values at out_off) from its SPLITS partials (m, l, acc) at rows
        row0 .. row0 + SPLITS − 1: the merge launch's and the fused merge's one computation. Read
        past L1 (.cg): in the fused merge other programs wrote them, and L1 may still hold this
        buffer's lines from an earlier launch."""
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_mask = offs_s < SPLITS
        d_mask = offs_d < D
        row = row0 + offs_s
        m = tl.load(part_ml_ptr + row * 2, mask=s_mask, other=float("-inf"), cache_modifier=".cg")
        lsum = tl.load(part_ml_ptr + row * 2 + 1, mask=s_mask, other=0.0, cache_modifier=".cg")
        m_max = tl.max(m, axis=0)
        m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)  # all splits empty: context length 0
        w = tl.exp2(m - m_ref)  # empty splits have m = -inf -> weight 0
        acc = tl.load(part_acc_ptr + row[:, None] * D + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :],
                      other=0.0, cache_modifier=".cg")
        num = tl.sum(acc * w[:, None], axis=0)
        den = tl.sum(lsum * w, axis=0)
        den = tl.where(den > 0, den, 1.0)
        tl.store(out_ptr + out_off + offs_d, (num / den).to(out_ptr.dtype.element_ty), mask=d_mask)

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, len_ptr, out_ptr, part_acc_ptr, part_ml_ptr, cnt_ptr,
        qk_scale,  # softmax scale · log2(e): the kernel works in base 2
        s_qb, s_qh,
        s_kb, s_kt, s_kh,
        s_vb, s_vt, s_vh,
        s_btb,
        s_ob, s_oh,
        SPLITS: tl.constexpr,
        G: tl.constexpr, BLOCK_G: tl.constexpr,
        D: tl.constexpr, BLOCK_D: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_N: tl.constexpr, LOOP_WHILE: tl.constexpr, EARLY: tl.constexpr,
        FUSE: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
    ):
        if not EARLY:
            wait_prior(PDL)
        b = tl.program_id(0)
        hkv = tl.program_id(1)
        split = tl.program_id(2)

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        g_mask = offs_g < G
        d_mask = offs_d < D
        heads = hkv * G + offs_g

        # The splits share the actual context (not the table's capacity) in whole tiles, so none idles
        # while another walks many tiles.
        ctx = tl.load(len_ptr + b)
        per = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N
        start = split * per
        end = tl.minimum(start + per, ctx)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        t1 = start
        if EARLY:
            # Before the wait (the kernel before this one may still run): the step's lengths and page
            # table, written before the step, and the first tile's cached K/V rows but the newest
            # token's, which that kernel may be writing; that row is read after the wait.
            tok = start + tl.arange(0, BLOCK_N)
            k, v = _kv_rows(k_ptr, v_ptr, bt_ptr, b, hkv, tok, tok < tl.minimum(end, ctx - 1),
                            s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_btb, D, BLOCK_D, PAGE)
            wait_prior(PDL)
        q = tl.load(
            q_ptr + b * s_qb + heads[:, None] * s_qh + offs_d[None, :],
            mask=g_mask[:, None] & d_mask[None, :], other=0.0,
        )
        if EARLY:
            newest = (tok == ctx - 1) & (tok < end)
            k_new, v_new = _kv_rows(k_ptr, v_ptr, bt_ptr, b, hkv, tok, newest,
                                    s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_btb, D, BLOCK_D, PAGE)
            k = tl.where(newest[:, None], k_new, k)
            v = tl.where(newest[:, None], v_new, v)
            m_i, l_i, acc = _softmax_tile(q, k, v, tok, tok < end, m_i, l_i, acc, qk_scale, 0, False)
            t1 = start + BLOCK_N

        if LOOP_WHILE:
            # The interpreter cannot use a loaded scalar as a range() bound (numpy 2 refuses int() of
            # its 1-element arrays); a while loop runs there. Compiled code keeps the pipelined for.
            t0 = t1
            while t0 < end:
                m_i, l_i, acc = _attend_tile(q, k_ptr, v_ptr, bt_ptr, b, hkv, t0, end, m_i, l_i, acc,
                                             qk_scale, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_btb,
                                             D, BLOCK_D, PAGE, BLOCK_N, 0, False)
                t0 += BLOCK_N
        else:
            for t0 in range(t1, end, BLOCK_N):
                m_i, l_i, acc = _attend_tile(q, k_ptr, v_ptr, bt_ptr, b, hkv, t0, end, m_i, l_i, acc,
                                             qk_scale, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_btb,
                                             D, BLOCK_D, PAGE, BLOCK_N, 0, False)

        if SPLITS == 1:
            l_safe = tl.where(l_i > 0, l_i, 1.0)
            o = acc / l_safe[:, None]
            tl.store(
                out_ptr + b * s_ob + heads[:, None] * s_oh + offs_d[None, :],
                o.to(out_ptr.dtype.element_ty),
                mask=g_mask[:, None] & d_mask[None, :],
            )
        else:
            # partials laid out [B, Hq, SPLITS, D] and [B, Hq, SPLITS, 2]
            row = (b * (tl.num_programs(1) * G) + heads) * SPLITS + split
            tl.store(
                part_acc_ptr + row[:, None] * D + offs_d[None, :], acc,
                mask=g_mask[:, None] & d_mask[None, :],
            )
            tl.store(part_ml_ptr + row * 2, m_i, mask=g_mask)
            tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g_mask)
            if FUSE:
                # the last split of (b, hkv) to arrive merges them all (its counter then back to 0)
                tl.debug_barrier()  # every thread's partial stores before the count
                cidx = b * tl.num_programs(1) + hkv
                arrived = tl.atomic_add(cnt_ptr + cidx, 1, sem="acq_rel", scope="gpu")
                if arrived == SPLITS - 1:
                    for g in tl.static_range(G):
                        head = hkv * G + g
                        _merge_head(part_acc_ptr, part_ml_ptr, out_ptr, (b * (tl.num_programs(1) * G) + head) * SPLITS,
                                    b * s_ob + head * s_oh, SPLITS, BLOCK_S, D, BLOCK_D)
                    tl.atomic_xchg(cnt_ptr + cidx, 0, sem="relaxed")  # read by the next launch, after this grid

    @triton.jit
    def _paged_decode_merge_kernel(
        part_acc_ptr, part_ml_ptr, out_ptr, s_ob, s_oh, Hq,
        SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
    ):
        wait_prior(PDL)
        b = tl.program_id(0)
        h = tl.program_id(1)
        _merge_head(part_acc_ptr, part_ml_ptr, out_ptr, (b * Hq + h) * SPLITS, b * s_ob + h * s_oh,
                    SPLITS, BLOCK_S, D, BLOCK_D)

    @triton.jit
    def _paged_prefill_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, tiles_ptr, spans_ptr, bt_ptr,
        qk_scale,  # softmax scale · log2(e)
        s_qn, s_qh,
        s_kb, s_kt, s_kh,
        s_vb, s_vt, s_vh,
        s_btb,
        s_on, s_oh,
        G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOOP_WHILE: tl.constexpr,
    ):
        tile = tl.program_id(0)
        h = tl.program_id(1)
        hkv = h // G
        span = tl.load(tiles_ptr + 2 * tile)
        m0 = tl.load(tiles_ptr + 2 * tile + 1)
        row0 = tl.load(spans_ptr + 3 * span)
        nq = tl.load(spans_ptr + 3 * span + 1)
        ctx = tl.load(spans_ptr + 3 * span + 2)

        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        qi = m0 + offs_m
        qmask = (qi < nq)[:, None] & (offs_d < D)[None, :]
        rows = (row0 + qi).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * s_qn + h * s_qh + offs_d[None, :], mask=qmask, other=0.0)
        qpos = ctx - nq + qi  # the key position of each query; it sees keys 0..qpos
        end = tl.minimum(ctx, ctx - nq + m0 + BLOCK_M)  # keys past the tile's last query: all masked

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if LOOP_WHILE:  # loaded loop bounds: see _paged_decode_kernel
            t0 = end * 0
            while t0 < end:
                m_i, l_i, acc = _attend_tile(q, k_ptr, v_ptr, bt_ptr, span, hkv, t0, end, m_i, l_i, acc,
                                             qk_scale, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_btb,
                                             D, BLOCK_D, PAGE, BLOCK_N, qpos, True)
                t0 += BLOCK_N
        else:
            for t0 in range(0, end, BLOCK_N):
                m_i, l_i, acc = _attend_tile(q, k_ptr, v_ptr, bt_ptr, span, hkv, t0, end, m_i, l_i, acc,
                                             qk_scale, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_btb,
                                             D, BLOCK_D, PAGE, BLOCK_N, qpos, True)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + rows[:, None] * s_on + h * s_oh + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=qmask)


def _check_inputs(q, k_cache, v_cache, out=None) -> None:
    """What both attention kernels need of q [.., Hq, D] and the caches [blocks, page, Hkv, D]."""
    Hq, D = q.shape[-2], q.shape[-1]
    Hkv, Dk = k_cache.shape[2], k_cache.shape[3]
    if Dk != D or v_cache.shape != k_cache.shape:
        raise ValueError(f"q {tuple(q.shape)} / k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} mismatch")
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} kv heads")
    if D < 16:
        raise ValueError("head_dim must be at least 16")
    if any(t.stride(-1) != 1 for t in (q, k_cache, v_cache) + (() if out is None else (out,))):
        raise ValueError("the last (head_dim) dimension must be contiguous")


def _strides(q, k_cache, v_cache, block_tables, out) -> tuple[int, ...]:
    """The strides both attention kernels take, in their argument order."""
    return (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
            out.stride(0), out.stride(1))


_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def _plan(B: int, Hkv: int, max_tokens: int, block_n: int, num_sms: int) -> int:
    """Context splits from host-known shapes only (graph capture replays them at other lengths).

    Aim for about two programs per SM, but keep each split at least 4 tiles of the page table's
    capacity long so the merge stays cheap relative to the work. The kernel then cuts each row's
    actual context into that many whole-tile ranges.
    """
    pairs = B * Hkv
    want = max(1, -(-2 * num_sms // pairs))
    most = max(1, max_tokens // (4 * block_n))
    return max(1, min(want, most, 64))


def takes_early_tile(launch: dict, block_tables: torch.Tensor, context_lens: torch.Tensor) -> bool:
    """Whether a decode launch reads its first K/V tile before the PDL wait.

    Reading the lengths and the table before the wait is safe only where no launch right before
    this one produced them (a dtype conversion is a launch of its own), and it can pay only under
    PDL: the preloaded tile costs registers (178 against 96 a thread, sm_90), which would halve the
    programs an SM holds at many rows, where PDL is off anyway. At one page-table split it measured
    no gain (RESULTS.md, twenty-second session); LOWBIT_ATTENTION_EARLY=0 turns it off for the A/B
    at the engine's page-table width."""
    return (launch["PDL"] and os.environ.get("LOWBIT_ATTENTION_EARLY", "1") != "0"
            and block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32)


def fuses_merge() -> bool:
    """Whether split launches merge their splits themselves (the last split of each sequence and kv
    head to arrive, through an arrival counter) instead of in a second launch: LOWBIT_ATTENTION_FUSED_MERGE=1.
    Off by default until measured: at batch 1 the merge launch holds 1.4–1.7 µs of a layer's critical
    path (RESULTS.md, twenty-second session), mostly the edge between two launches. The counters are
    the device's split-K ones, so one stream at a time launches on a device (as the engine does)."""
    return os.environ.get("LOWBIT_ATTENTION_FUSED_MERGE", "0") == "1"


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, *, out=None,
                           block_n=None, num_warps=None, splits=None, early=None, fuse_merge=None):
    """Triton paged decode attention (see module docstring); same result as the reference.

    `out` is an optional preallocated [B, Hq, D] result; `block_n`, `num_warps`, `splits`,
    `early` (the first tile read before the PDL wait) and `fuse_merge` (`fuses_merge`) override
    the heuristics (for benchmarks and tests).
    """
    B, Hq, D = q.shape
    _, page, Hkv, _ = k_cache.shape
    _check_inputs(q, k_cache, v_cache)
    G = Hq // Hkv
    launch = launch_options(q, B)
    if early is None:
        early = takes_early_tile(launch, block_tables, context_lens)
    block_tables = block_tables.to(torch.int32)
    context_lens = context_lens.to(torch.int32)
    max_tokens = block_tables.shape[1] * page
    if block_n is None:
        block_n = 64 if D <= 128 else 32
    if splits is None:
        splits = _plan(B, Hkv, max_tokens, block_n, _num_sms(q.device))
    if num_warps is None:
        num_warps = 4
    if out is None:
        out = torch.empty_like(q)
    fuse = splits > 1 and (fuses_merge() if fuse_merge is None else fuse_merge)
    cnt = split_workspace(q.device, 0, B * Hkv)[1] if fuse else out  # out: unused
    if splits > 1:
        part_acc = torch.empty(B * Hq * splits * D, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(B * Hq * splits * 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    BLOCK_G = max(16, triton.next_power_of_2(G))
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_S = max(2, triton.next_power_of_2(splits))  # the merge's tile of partials
    _paged_decode_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_acc, part_ml, cnt,
        float(scale) * math.log2(math.e),
        *_strides(q, k_cache, v_cache, block_tables, out),
        SPLITS=splits, G=G, BLOCK_G=BLOCK_G, D=D, BLOCK_D=BLOCK_D, PAGE=page, BLOCK_N=block_n,
        LOOP_WHILE=interpreting(), EARLY=bool(early), FUSE=fuse, BLOCK_S=BLOCK_S,
        num_warps=num_warps, **launch,
    )
    if splits > 1 and not fuse:
        _paged_decode_merge_kernel[(B, Hq)](
            part_acc, part_ml, out, out.stride(0), out.stride(1), Hq,
            SPLITS=splits, BLOCK_S=BLOCK_S, D=D, BLOCK_D=BLOCK_D,
            num_warps=4, **launch,
        )
    return out


PREFILL_BLOCK_M = 64  # query rows of a prefill tile: the host's tile list is cut at this size


def prefill_tiles(spans: list[tuple[int, int, int]], block_m: int = PREFILL_BLOCK_M) -> list[int]:
    """Flat (span index, first query of the tile) pairs covering every query of `spans`
    ((first row, query count, context length) each): the prefill kernel's grid."""
    return [v for i, (_, nq, _) in enumerate(spans) for m0 in range(0, nq, block_m) for v in (i, m0)]


def paged_prefill_attention_reference(q, k_cache, v_cache, spans, block_tables, scale, out):
    """Oracle of `paged_prefill_attention`: each span's queries attend causally over its context
    gathered from the pages (the step's own keys already stored there); writes out's span rows."""
    from ..quantized_models.attention import causal_attention

    page, Hkv, D = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    for i, (start, nq, ctx) in enumerate(spans.tolist()):
        if nq == 0:  # an empty span (padding of a captured step's span list)
            continue
        idx = block_tables[i, : -(-ctx // page)].long()
        keys = k_cache[idx].reshape(-1, Hkv, D)[:ctx].transpose(0, 1)[None]
        vals = v_cache[idx].reshape(-1, Hkv, D)[:ctx].transpose(0, 1)[None]
        o = causal_attention(q[start:start + nq].transpose(0, 1)[None], keys, vals, offset=ctx - nq, scale=scale)
        out[start:start + nq] = o[0].transpose(0, 1)
    return out


def paged_prefill_attention(q, k_cache, v_cache, spans, block_tables, scale, out, tiles, *,
                            block_m=PREFILL_BLOCK_M, block_n=64, num_warps=4):
    """Every prefill chunk of a step in one launch: span i's queries q[start:start+nq] (positions
    ctx-nq .. ctx-1) attend causally over keys 0..ctx-1 of its pages (this step's keys already
    stored). spans int32 [S, 3] (start row, nq, ctx), block_tables int32 [S, W], tiles int32 [T, 2]
    (`prefill_tiles` with the same block_m). Writes the spans' rows of out [N, Hq, D]; other rows
    are left alone. Same result as `paged_prefill_attention_reference`; no host sync, one launch
    whatever the chunk lengths (per-span SDPA calls planned a cuDNN graph per new shape and synced,
    benchmarks/RESULTS.md ninth session)."""
    _, Hq, D = q.shape
    _, page, Hkv, _ = k_cache.shape
    _check_inputs(q, k_cache, v_cache, out)
    T = tiles.shape[0]
    if T == 0:
        return out
    _paged_prefill_kernel[(T, Hq)](
        q, k_cache, v_cache, out, tiles, spans, block_tables,
        float(scale) * math.log2(math.e),
        *_strides(q, k_cache, v_cache, block_tables, out),
        G=Hq // Hkv, D=D, BLOCK_D=triton.next_power_of_2(D), PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n,
        LOOP_WHILE=interpreting(), num_warps=num_warps,
    )
    return out
