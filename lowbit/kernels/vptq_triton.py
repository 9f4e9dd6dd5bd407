"""Fused Triton lookup-GEMV/GEMM for VPTQ layers (main + residual codebooks, outliers, norm, perm).

The format (../shared/specs/vptq.md): vectors of v consecutive **output** rows of column j are a
codebook entry, `W0[r·v : r·v+v, j] = C_g[idx[g, r, j]] (+ R_g[ridx])`; an optional outlier block
of `outlier_size` leading columns uses its own codebook (vector length v_o); then
`W = W0[:, argsort(perm)] · weight_scale + weight_bias` (per input column).

The kernels never build W. Permutation and norm fold into the activations: with c = perm[c'],
    y = Σ_c' (x[c] · weight_scale[c]) · W0[:, c']  +  Σ_c x[c] · weight_bias[c]
so a program gathers x through `perm`, scales it, and adds the second (row-independent) sum β to
every output. Each program owns BR vectors (BR·v output rows) and walks the columns; each column
costs one index decode and one v·2-byte codebook gather (16 B for v = 8, one LDG.128).

Indices stay in the checkpoint's bitstream (`indices` int32 [group_num, N, P], field j of a row at
bit j·(log2 k + log2 k_r), main index in the low bits): it is already the smallest form, and a
field is two word loads and a funnel shift; 16-bit fields are read as int16 directly.

Where the time goes (bench: benchmarks/kernels_uv.py): the index stream is tiny (2 bits/weight)
but every lookup is a 16-byte gather into a 1 MiB codebook (65536 × 8 fp16) that lives in L2, and
L2 serves 32-byte sectors, so the kernel is bound by L2→SM sector throughput, not by DRAM.

Kernels:
* `_vq_gemv_kernel`: CUDA-core FMAs, BB batch rows per program (decode once, reuse BB times).
* `_vq_mma_kernel`: gathers a [BR·V, BC] weight tile and multiplies on tensor cores (batch ≥ 16).
* `_vq_dequant_kernel` + cuBLAS for prefill-sized batches.
"""

from __future__ import annotations

import math
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
# Layout and plain-PyTorch reference
# ----------------------------------------------------------------------------------------------


@dataclass
class VptqPacked:
    in_features: int
    out_features: int
    v: int
    k: int
    k_r: int  # 0: no residual codebook
    group_num: int
    group_size: int
    outlier_size: int
    v_o: int
    k_o: int
    indices: torch.Tensor  # int32 [group_num * N, P] bitstream rows (row g·N + r)
    centroids: torch.Tensor  # fp16 [group_num, k·v]
    res_centroids: torch.Tensor | None  # fp16 [group_num, k_r·v]
    outlier_centroids: torch.Tensor | None  # fp16 [k_o·v_o]
    outlier_indices: torch.Tensor | None  # int16 [ceil(m/v_o), outlier_size] (read as uint16)
    perm: torch.Tensor | None  # int32 [n]: column c' of W0 is input perm[c']
    weight_scale: torch.Tensor | None  # fp16 [n]
    weight_bias: torch.Tensor | None  # fp16 [n]

    @property
    def n_vec(self) -> int:
        return -(-self.out_features // self.v)

    @property
    def field_bits(self) -> int:
        return int(math.log2(self.k)) + (int(math.log2(self.k_r)) if self.k_r else 0)

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("indices", "centroids", "res_centroids", "outlier_centroids", "outlier_indices", "perm",
                 "weight_scale", "weight_bias")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device) -> "VptqPacked":
        kw = dict(self.__dict__)
        for k, t in self.tensors().items():
            kw[k] = t.to(device)
        return VptqPacked(**kw)


def _pack_fields(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, L] non-negative ints < 2^bits → int32 [R, ceil(L·bits/32)] little-endian bitstream."""
    R, L = fields.shape
    P = -(-L * bits // 32)
    bitpos = torch.arange(bits, dtype=torch.int64)
    b = ((fields.to(torch.int64)[..., None] >> bitpos) & 1).reshape(R, L * bits)
    b = torch.nn.functional.pad(b, (0, P * 32 - L * bits)).reshape(R, P, 32)
    words = (b << torch.arange(32, dtype=torch.int64)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def _unpack_fields(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of _pack_fields: int64 [R, count]."""
    R, P = words.shape
    w = words.to(torch.int64) & 0xFFFFFFFF
    b = ((w[..., None] >> torch.arange(32, device=w.device)) & 1).reshape(R, P * 32)[:, : count * bits]
    b = b.reshape(R, count, bits)
    return (b << torch.arange(bits, device=w.device)).sum(-1)


def _u16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64) & 0xFFFF


def pack_vptq(cfg: dict, tensors: dict[str, torch.Tensor], in_features: int, out_features: int) -> VptqPacked:
    """Our layout from one layer's checkpoint tensors (names and `config_for_layers` keys as in the
    spec). Packed indices are kept as they are; unpacked (int16) ones are packed into the same
    bitstream; fp16-bit-pattern indices (`indices_as_float`) are reinterpreted."""
    m, n = int(out_features), int(in_features)
    v_o, v = (int(a) for a in cfg["vector_lens"])
    k_o, k = (int(a) for a in cfg["num_centroids"])
    k_r = int(cfg.get("num_res_centroids", [-1, -1])[1])
    k_r = 0 if k_r <= 0 else k_r
    gnum = int(cfg.get("group_num", 1))
    os_ = int(cfg.get("outlier_size", 0))
    gsize = int(cfg.get("group_size", n - os_))
    N = -(-m // v)
    lk, lr = int(math.log2(k)), (int(math.log2(k_r)) if k_r else 0)
    if 2**lk != k or (k_r and 2**lr != k_r):
        raise ValueError("codebook sizes must be powers of two")
    bits = lk + lr
    idx = tensors["indices"]
    if cfg.get("indices_as_float", False):
        idx = idx.view(torch.int16) if idx.dtype == torch.float16 else idx
    if cfg.get("is_indice_packed", True) and idx.dtype == torch.int32:
        words = idx.reshape(gnum * N, -1).contiguous()
        need = -(-gsize * bits // 32)
        if words.shape[1] < need:
            raise ValueError(f"packed indices have {words.shape[1]} words per row, need {need}")
    else:
        main = _u16(idx.reshape(gnum * N, gsize))
        fields = main
        if k_r:
            ridx = tensors["res_indices"]
            if cfg.get("indices_as_float", False) and ridx.dtype == torch.float16:
                ridx = ridx.view(torch.int16)
            fields = main | (_u16(ridx.reshape(gnum * N, gsize)) << lk)
        words = _pack_fields(fields.cpu(), bits).to(idx.device)
    has_out = os_ > 0 and v_o > 0 and k_o > 0
    perm = tensors.get("perm") if cfg.get("enable_perm", False) else None
    norm = cfg.get("enable_norm", False)
    return VptqPacked(
        in_features=n, out_features=m, v=v, k=k, k_r=k_r, group_num=gnum, group_size=gsize,
        outlier_size=os_ if has_out else 0, v_o=v_o if has_out else 0, k_o=k_o if has_out else 0,
        indices=words.contiguous(),
        centroids=tensors["centroids.weight"].reshape(gnum, k * v).to(torch.float16).contiguous(),
        res_centroids=(tensors["res_centroids.weight"].reshape(gnum, k_r * v).to(torch.float16).contiguous()
                       if k_r else None),
        outlier_centroids=(tensors["outlier_centroids.weight"].reshape(-1).to(torch.float16).contiguous()
                           if has_out else None),
        outlier_indices=(tensors["outlier_indices"].reshape(-1, os_).to(torch.int16).contiguous()
                         if has_out else None),
        perm=None if perm is None else _u16(perm).to(torch.int32).contiguous(),
        weight_scale=tensors["weight_scale"].to(torch.float16).contiguous() if norm else None,
        weight_bias=tensors["weight_bias"].to(torch.float16).contiguous() if norm else None,
    )


def vptq_dequant_reference(p: VptqPacked) -> torch.Tensor:
    """float32 W [m, n] following the spec step by step (lookup in fp16 as the official layer)."""
    m, v, N = p.out_features, p.v, p.n_vec
    lk = int(math.log2(p.k))
    f = _unpack_fields(p.indices, p.field_bits, p.group_size).reshape(p.group_num, N, p.group_size)
    blocks = []
    for g in range(p.group_num):
        cb = p.centroids[g].view(p.k, v)
        w = cb[f[g] & (p.k - 1)].float()  # [N, gs, v]
        if p.k_r:  # the official layer adds the residual in float32 (golden fixtures are exact so)
            w = w + p.res_centroids[g].view(p.k_r, v)[f[g] >> lk].float()
        blocks.append(w.permute(0, 2, 1).reshape(N * v, p.group_size)[:m])
    W0 = torch.cat(blocks, dim=1)
    if p.outlier_size:
        No = p.outlier_indices.shape[0]
        o = p.outlier_centroids.view(p.k_o, p.v_o)[_u16(p.outlier_indices)].float()  # [No, os, v_o]
        o = o.permute(0, 2, 1).reshape(No * p.v_o, p.outlier_size)[:m]
        W0 = torch.cat([o, W0], dim=1)
    if p.perm is not None:
        W0 = W0[:, torch.argsort(p.perm.long())]
    if p.weight_scale is not None:
        W0 = W0 * p.weight_scale.float() + p.weight_bias.float()
    return W0


def vptq_matmul_reference(x: torch.Tensor, p: VptqPacked, bias: torch.Tensor | None = None):
    y = x.float() @ vptq_dequant_reference(p).to(x.device).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _vq_fields(idx_ptr, srow, col, msk, P, FB: tl.constexpr):
        """Bit fields of width FB at column `col` of bitstream rows `srow` (same shapes), uint32."""
        if FB == 16:
            # idx_ptr is the int16 view of the words: field j is element j of the row
            f = tl.load(idx_ptr + srow * (2 * P) + col, mask=msk, other=0).to(tl.int32) & 0xFFFF
            return f.to(tl.uint32)
        else:
            o = col * FB
            wi = o >> 5
            sh = (o & 31).to(tl.uint32)
            w0 = tl.load(idx_ptr + srow * P + wi, mask=msk, other=0).to(tl.uint32, bitcast=True)
            lo = w0 >> sh
            if 32 % FB == 0:
                f = lo
            else:
                w1 = tl.load(idx_ptr + srow * P + wi + 1, mask=msk & (wi + 1 < P), other=0).to(
                    tl.uint32, bitcast=True)
                hi = tl.where(sh == 0, 0, w1 << ((32 - sh) & 31))
                f = lo | hi
            return f & ((1 << FB) - 1)

    @triton.jit
    def _vq_x(x_ptr, perm_ptr, ws_ptr, wb_ptr, b, stride_xb, cprime, cmask,
              HAS_PERM: tl.constexpr, NORM: tl.constexpr):
        """x'[c'] = x[perm[c']]·scale[perm[c']] and the bias term x[perm[c']]·wbias[...] (fp32)."""
        c = cprime
        if HAS_PERM:
            c = tl.load(perm_ptr + cprime, mask=cmask, other=0)
        xv = tl.load(x_ptr + b * stride_xb + c, mask=cmask, other=0.0).to(tl.float32)
        if NORM:
            s = tl.load(ws_ptr + c, mask=cmask, other=0.0).to(tl.float32)
            wb = tl.load(wb_ptr + c, mask=cmask, other=0.0).to(tl.float32)
            return xv * s, xv * wb
        else:
            return xv, xv * 0.0

    @triton.jit
    def _vq_main_vectors(idx_ptr, cb_ptr, rcb_ptr, r, rmask, cm, cmask, t, tmask, NV, P, GS,
                         K: tl.constexpr, KR: tl.constexpr, V: tl.constexpr, FB: tl.constexpr,
                         LOGK: tl.constexpr, ONE_GROUP: tl.constexpr):
        """Codebook vectors [BR, BC, VP] (fp16) of vector rows r at main columns cm."""
        if ONE_GROUP:
            g = cm * 0
            cg = cm
        else:
            g = cm // GS
            cg = cm % GS
        m2 = rmask[:, None] & cmask[None, :]
        f = _vq_fields(idx_ptr, g[None, :] * NV + r[:, None], cg[None, :], m2, P, FB)
        mi = (f & (K - 1)).to(tl.int32)
        m3 = m2[:, :, None] & tmask[None, None, :]
        off = (g[None, :] * K + mi) * V
        cv = tl.load(cb_ptr + off[:, :, None] + t[None, None, :], mask=m3, other=0.0)
        if KR > 0:  # float32 sum, as the official layer
            ri = (f >> LOGK).to(tl.int32)
            roff = (g[None, :] * KR + ri) * V
            cv = cv.to(tl.float32) + tl.load(rcb_ptr + roff[:, :, None] + t[None, None, :], mask=m3,
                                             other=0.0).to(tl.float32)
        return cv

    @triton.jit
    def _vq_outlier_vectors(oidx_ptr, ocb_ptr, j, jmask, oc, ocmask, NVO, OS, VO: tl.constexpr):
        """Outlier weights [BR, BC, VP] for output rows j [BR, VP] and outlier columns oc."""
        j3 = j[:, None, :]
        m3 = jmask[:, None, :] & ocmask[None, :, None]
        vec = j3 // VO
        m3 = m3 & (vec < NVO)
        oi = tl.load(oidx_ptr + vec * OS + oc[None, :, None], mask=m3, other=0).to(tl.int32) & 0xFFFF
        return tl.load(ocb_ptr + oi * VO + j3 % VO, mask=m3, other=0.0)

    @triton.jit
    def _sum16(tot, ws_ptr, off, msk, c0, split_k, stride):
        # The split bound is compared as a tensor (off * 0 + ...): triton 3.9's interpreter rejects
        # a tensor mask and-ed with a scalar comparison.
        for i in tl.static_range(16):
            tot += tl.load(ws_ptr + (c0 + i) * stride + off, mask=msk & (off * 0 + c0 + i < split_k), other=0.0,
                           cache_modifier=".cg")
        return tot

    @triton.jit
    def _vq_finish(acc, beta, y_ptr, bias_ptr, ws_ptr, cnt_ptr, j, jmask, bvec, M, B, stride_yb,
                   pid_r, pid_k, pid_b, num_r, split_k, HAS_BIAS: tl.constexpr, LOOP_WHILE: tl.constexpr):
        """acc [BB, BR, VP] + beta [BB] → y. With split_k > 1 (run-time: one compile for every
        split) the partials are summed, in split order, by the last split to arrive."""
        acc = acc + beta[:, None, None]
        omask = (bvec < B)[:, None, None] & jmask[None, :, :]
        yoff = bvec[:, None, None] * stride_yb + j[None, :, :]
        if split_k > 1:
            woff = bvec[:, None, None] * M + j[None, :, :]
            tl.store(ws_ptr + pid_k * B * M + woff, acc, mask=omask)
            tl.debug_barrier()
            cidx = pid_b * num_r + pid_r
            old = tl.atomic_add(cnt_ptr + cidx, 1, sem="acq_rel", scope="gpu")
            if old == split_k - 1:
                # 16 independent partial loads per round (a plain run-time loop waits one L2 round
                # trip per split: a ~8 µs floor at split 32-64 on the H100)
                tot = tl.zeros_like(acc)
                if LOOP_WHILE:
                    c0 = 0
                    while c0 < split_k:
                        tot = _sum16(tot, ws_ptr, woff, omask, c0, split_k, B * M)
                        c0 += 16
                else:
                    for c0 in range(0, split_k, 16):
                        tot = _sum16(tot, ws_ptr, woff, omask, c0, split_k, B * M)
                if HAS_BIAS:
                    tot += tl.load(bias_ptr + j, mask=jmask, other=0.0).to(tl.float32)[None, :, :]
                tl.store(y_ptr + yoff, tot.to(y_ptr.dtype.element_ty), mask=omask)
                tl.atomic_xchg(cnt_ptr + cidx, 0)
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + j, mask=jmask, other=0.0).to(tl.float32)[None, :, :]
            tl.store(y_ptr + yoff, acc.to(y_ptr.dtype.element_ty), mask=omask)

    @triton.jit
    def _vq_gemv_step(acc, beta, it, x_ptr, idx_ptr, cb_ptr, rcb_ptr, perm_ptr, ws_ptr, wb_ptr,
                      r, rmask, t, tmask, pid_k, b, stride_xb, NV, P, GS, NMAIN, OS, iters,
                      K: tl.constexpr, KR: tl.constexpr, V: tl.constexpr, FB: tl.constexpr,
                      LOGK: tl.constexpr, ONE_GROUP: tl.constexpr, BC: tl.constexpr,
                      HAS_PERM: tl.constexpr, NORM: tl.constexpr):
        """One column tile, one row of x: products accumulate elementwise in acc [BR, BC, VP]
        (no per-tile reduction: the sum over columns happens once at the end)."""
        cm = (pid_k * iters + it) * BC + tl.arange(0, BC)
        cmask = cm < NMAIN
        cv = _vq_main_vectors(idx_ptr, cb_ptr, rcb_ptr, r, rmask, cm, cmask, t, tmask, NV, P, GS,
                              K, KR, V, FB, LOGK, ONE_GROUP).to(tl.float32)
        xv, xb = _vq_x(x_ptr, perm_ptr, ws_ptr, wb_ptr, b, stride_xb, cm + OS, cmask, HAS_PERM, NORM)
        acc += cv * xv[None, :, None]
        if NORM:
            beta += xb
        return acc, beta

    @triton.jit
    def _vq_outlier_step(acc, beta, it, x_ptr, oidx_ptr, ocb_ptr, perm_ptr, ws_ptr, wb_ptr,
                         j, jmask, b, stride_xb, NVO, OS,
                         VO: tl.constexpr, BC: tl.constexpr, HAS_PERM: tl.constexpr, NORM: tl.constexpr):
        oc = it * BC + tl.arange(0, BC)
        ocmask = oc < OS
        ov = _vq_outlier_vectors(oidx_ptr, ocb_ptr, j, jmask, oc, ocmask, NVO, OS, VO).to(tl.float32)
        xv, xb = _vq_x(x_ptr, perm_ptr, ws_ptr, wb_ptr, b, stride_xb, oc, ocmask, HAS_PERM, NORM)
        acc += ov * xv[None, :, None]
        if NORM:
            beta += xb
        return acc, beta

    @triton.jit
    def _vq_gemv_kernel(
        x_ptr, idx_ptr, cb_ptr, rcb_ptr, oidx_ptr, ocb_ptr, perm_ptr, ws_ptr, wb_ptr, bias_ptr,
        y_ptr, wsp_ptr, cnt_ptr,
        M, B, stride_xb, stride_yb, NV, P, GS, NMAIN, OS, NVO, iters, o_iters, split_k,
        K: tl.constexpr, KR: tl.constexpr, V: tl.constexpr, VP: tl.constexpr, FB: tl.constexpr,
        LOGK: tl.constexpr, ONE_GROUP: tl.constexpr, VO: tl.constexpr,
        BR: tl.constexpr, BC: tl.constexpr,
        HAS_PERM: tl.constexpr, NORM: tl.constexpr, HAS_OUTLIER: tl.constexpr, HAS_BIAS: tl.constexpr,
        LOOP_WHILE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """CUDA-core lookup-GEMV, one row of x per program (program b fastest in the grid)."""
        wait_prior(PDL)
        pid_b = tl.program_id(0)
        pid_r = tl.program_id(1)
        pid_k = tl.program_id(2)
        r = pid_r * BR + tl.arange(0, BR)
        rmask = r < NV
        t = tl.arange(0, VP)
        tmask = t < V
        j = r[:, None] * V + t[None, :]
        jmask = rmask[:, None] & tmask[None, :] & (j < M)
        acc = tl.zeros([BR, BC, VP], tl.float32)
        beta = tl.zeros([BC], tl.float32)
        if LOOP_WHILE:  # interpreter: no runtime range() bounds (numpy 2 refuses int() of its scalars)
            it = 0
            while it < iters:
                acc, beta = _vq_gemv_step(acc, beta, it, x_ptr, idx_ptr, cb_ptr, rcb_ptr, perm_ptr, ws_ptr,
                                          wb_ptr, r, rmask, t, tmask, pid_k, pid_b, stride_xb, NV, P,
                                          GS, NMAIN, OS, iters, K, KR, V, FB, LOGK, ONE_GROUP, BC, HAS_PERM, NORM)
                it += 1
        else:
            for it in range(0, iters):
                acc, beta = _vq_gemv_step(acc, beta, it, x_ptr, idx_ptr, cb_ptr, rcb_ptr, perm_ptr, ws_ptr,
                                          wb_ptr, r, rmask, t, tmask, pid_k, pid_b, stride_xb, NV, P,
                                          GS, NMAIN, OS, iters, K, KR, V, FB, LOGK, ONE_GROUP, BC, HAS_PERM, NORM)
        if HAS_OUTLIER:
            if pid_k == 0:
                if LOOP_WHILE:
                    it = 0
                    while it < o_iters:
                        acc, beta = _vq_outlier_step(acc, beta, it, x_ptr, oidx_ptr, ocb_ptr, perm_ptr, ws_ptr,
                                                     wb_ptr, j, jmask, pid_b, stride_xb, NVO, OS, VO, BC,
                                                     HAS_PERM, NORM)
                        it += 1
                else:
                    for it in range(0, o_iters):
                        acc, beta = _vq_outlier_step(acc, beta, it, x_ptr, oidx_ptr, ocb_ptr, perm_ptr, ws_ptr,
                                                     wb_ptr, j, jmask, pid_b, stride_xb, NVO, OS, VO, BC,
                                                     HAS_PERM, NORM)
        y = tl.sum(acc, axis=1)[None, :, :]  # [1, BR, VP]
        bsum = tl.sum(beta, axis=0)
        bvec = pid_b + tl.arange(0, 1)
        _vq_finish(y, bsum + tl.zeros([1], tl.float32), y_ptr, bias_ptr, wsp_ptr, cnt_ptr, j, jmask, bvec,
                   M, B, stride_yb, pid_r, pid_k, pid_b, tl.num_programs(1), split_k, HAS_BIAS, LOOP_WHILE)

    @triton.jit
    def _vq_mma_step(acc, it, x_ptr, idx_ptr, cb_ptr, rcb_ptr, perm_ptr, ws_ptr,
                     r, rmask, bvec, bmask, pid_k, stride_xb, NV, P, GS, NMAIN, OS, iters,
                     K: tl.constexpr, KR: tl.constexpr, V: tl.constexpr, VP: tl.constexpr, FB: tl.constexpr,
                     LOGK: tl.constexpr, ONE_GROUP: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
                     HAS_PERM: tl.constexpr, NORM: tl.constexpr):
        cm = (pid_k * iters + it) * BC + tl.arange(0, BC)
        cmask = cm < NMAIN
        t = tl.arange(0, VP)
        cv = _vq_main_vectors(idx_ptr, cb_ptr, rcb_ptr, r, rmask, cm, cmask, t, t < V, NV, P, GS,
                              K, KR, V, FB, LOGK, ONE_GROUP)  # [BR, BC, VP]
        w = tl.reshape(tl.permute(cv, (0, 2, 1)), [BR * VP, BC])
        c = cm + OS
        if HAS_PERM:
            c = tl.load(perm_ptr + c, mask=cmask, other=0)
        xt = tl.load(x_ptr + bvec[None, :] * stride_xb + c[:, None], mask=cmask[:, None] & bmask[None, :],
                     other=0.0)
        if NORM:
            xt = (xt.to(tl.float32) * tl.load(ws_ptr + c, mask=cmask, other=0.0).to(tl.float32)[:, None])
        return tl.dot(w.to(x_ptr.dtype.element_ty), xt.to(x_ptr.dtype.element_ty), acc)

    @triton.jit
    def _vq_mma_kernel(
        x_ptr, idx_ptr, cb_ptr, rcb_ptr, perm_ptr, ws_ptr, bias_ptr, y_ptr, wsp_ptr, cnt_ptr,
        M, B, stride_xb, stride_yb, NV, P, GS, NMAIN, OS, iters, split_k,
        K: tl.constexpr, KR: tl.constexpr, V: tl.constexpr, VP: tl.constexpr, FB: tl.constexpr,
        LOGK: tl.constexpr, ONE_GROUP: tl.constexpr,
        BR: tl.constexpr, BC: tl.constexpr, BB: tl.constexpr,
        HAS_PERM: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr, LOOP_WHILE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Tensor-core path for the main block only (norm bias β and outliers: see the launcher)."""
        wait_prior(PDL)
        pid_b = tl.program_id(0)
        pid_r = tl.program_id(1)
        pid_k = tl.program_id(2)
        r = pid_r * BR + tl.arange(0, BR)
        rmask = r < NV
        bvec = pid_b * BB + tl.arange(0, BB)
        bmask = bvec < B
        acc = tl.zeros([BR * VP, BB], tl.float32)
        if LOOP_WHILE:
            it = 0
            while it < iters:
                acc = _vq_mma_step(acc, it, x_ptr, idx_ptr, cb_ptr, rcb_ptr, perm_ptr, ws_ptr, r, rmask,
                                   bvec, bmask, pid_k, stride_xb, NV, P, GS, NMAIN, OS, iters,
                                   K, KR, V, VP, FB, LOGK, ONE_GROUP, BR, BC, HAS_PERM, NORM)
                it += 1
        else:
            for it in range(0, iters):
                acc = _vq_mma_step(acc, it, x_ptr, idx_ptr, cb_ptr, rcb_ptr, perm_ptr, ws_ptr, r, rmask,
                                   bvec, bmask, pid_k, stride_xb, NV, P, GS, NMAIN, OS, iters,
                                   K, KR, V, VP, FB, LOGK, ONE_GROUP, BR, BC, HAS_PERM, NORM)
        t = tl.arange(0, VP)
        j = r[:, None] * V + t[None, :]
        jmask = rmask[:, None] & (t < V)[None, :] & (j < M)
        acc3 = tl.permute(tl.reshape(acc, [BR, VP, BB]), (2, 0, 1))  # [BB, BR, VP]
        _vq_finish(acc3, tl.zeros([BB], tl.float32), y_ptr, bias_ptr, wsp_ptr, cnt_ptr, j, jmask, bvec,
                   M, B, stride_yb, pid_r, pid_k, pid_b, tl.num_programs(1), split_k, HAS_BIAS, LOOP_WHILE)

    @triton.jit
    def _vq_dequant_kernel(idx_ptr, cb_ptr, rcb_ptr, perm_ptr, ws_ptr, wb_ptr, w_ptr, M, NV, P, GS, NMAIN, OS,
                           stride_w,
                           K: tl.constexpr, KR: tl.constexpr, V: tl.constexpr, VP: tl.constexpr,
                           FB: tl.constexpr, LOGK: tl.constexpr, ONE_GROUP: tl.constexpr,
                           BR: tl.constexpr, BC: tl.constexpr, HAS_PERM: tl.constexpr, NORM: tl.constexpr):
        """Main block of W, written in final column order (perm and norm applied)."""
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        r = pid_r * BR + tl.arange(0, BR)
        rmask = r < NV
        t = tl.arange(0, VP)
        tmask = t < V
        cm = pid_c * BC + tl.arange(0, BC)
        cmask = cm < NMAIN
        cv = _vq_main_vectors(idx_ptr, cb_ptr, rcb_ptr, r, rmask, cm, cmask, t, tmask, NV, P, GS,
                              K, KR, V, FB, LOGK, ONE_GROUP)
        c = cm + OS
        if HAS_PERM:
            c = tl.load(perm_ptr + c, mask=cmask, other=0)
        if NORM:
            s = tl.load(ws_ptr + c, mask=cmask, other=0.0).to(tl.float32)
            wb = tl.load(wb_ptr + c, mask=cmask, other=0.0).to(tl.float32)
            cv = cv.to(tl.float32) * s[None, :, None] + wb[None, :, None]
        j = r[:, None] * V + t[None, :]
        jmask = rmask[:, None] & tmask[None, :] & (j < M)
        tl.store(w_ptr + j[:, None, :] * stride_w + c[None, :, None], cv.to(w_ptr.dtype.element_ty),
                 mask=jmask[:, None, :] & cmask[None, :, None])


# ----------------------------------------------------------------------------------------------
# Launchers, configs, tuner
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VQConfig:
    """kind: "gemv" (CUDA cores), "mma" (tensor cores) or "dequant" (+cuBLAS)."""
    kind: str
    br: int = 16
    bc: int = 64
    bb: int = 1
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 1


def _common(p: VptqPacked):
    fb = p.field_bits
    idx = p.indices.view(torch.int16) if fb == 16 else p.indices
    dummy = p.centroids
    return dict(
        idx=idx, P=p.indices.shape[1], NV=p.n_vec, NMAIN=p.in_features - p.outlier_size,
        rcb=p.res_centroids if p.res_centroids is not None else dummy,
        perm=p.perm if p.perm is not None else p.indices,
        ws=p.weight_scale if p.weight_scale is not None else dummy,
        wb=p.weight_bias if p.weight_bias is not None else dummy,
        oidx=p.outlier_indices if p.outlier_indices is not None else p.indices,
        ocb=p.outlier_centroids if p.outlier_centroids is not None else dummy,
        consts=dict(K=p.k, KR=p.k_r, V=p.v, VP=triton.next_power_of_2(p.v), FB=fb,
                    LOGK=int(math.log2(p.k)), ONE_GROUP=p.group_num == 1),
    )


def _split(nmain: int, bc: int, want: int) -> tuple[int, int]:
    tiles = triton.cdiv(nmain, bc)
    split = max(1, min(want, tiles))
    iters = triton.cdiv(tiles, split)
    return triton.cdiv(tiles, iters), iters


def _launch_gemv(x2, p: VptqPacked, bias, cfg: VQConfig, out):
    c = _common(p)
    B, M = x2.shape[0], p.out_features
    split, iters = _split(c["NMAIN"], cfg.bc, cfg.split_k)
    grid = (B, triton.cdiv(c["NV"], cfg.br), split)
    ws, cnt = split_workspace(x2.device, split * B * M, grid[0] * grid[1])  # always: one kernel signature
    _vq_gemv_kernel[grid](
        x2, c["idx"], p.centroids, c["rcb"], c["oidx"], c["ocb"], c["perm"], c["ws"], c["wb"],
        bias if bias is not None else out, out, ws, cnt,
        M, B, x2.stride(0), out.stride(0), c["NV"], c["P"], p.group_size, c["NMAIN"], p.outlier_size,
        p.outlier_indices.shape[0] if p.outlier_size else 1, iters, triton.cdiv(max(p.outlier_size, 1), cfg.bc),
        split, **c["consts"], VO=max(p.v_o, 1), BR=cfg.br, BC=cfg.bc,
        HAS_PERM=p.perm is not None, NORM=p.weight_scale is not None, HAS_OUTLIER=p.outlier_size > 0,
        HAS_BIAS=bias is not None, LOOP_WHILE=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(x2, B),
    )
    return out


def _launch_mma(x2, p: VptqPacked, bias, cfg: VQConfig, out):
    """Tensor cores for the main block; outliers and the norm bias term (rare, rank-1 / few columns)
    are added by a second, CUDA-core launch that covers only them."""
    c = _common(p)
    B, M = x2.shape[0], p.out_features
    split, iters = _split(c["NMAIN"], cfg.bc, cfg.split_k)
    grid = (triton.cdiv(B, cfg.bb), triton.cdiv(c["NV"], cfg.br), split)
    ws, cnt = split_workspace(x2.device, split * B * M, grid[0] * grid[1])
    extra = p.outlier_size > 0 or p.weight_bias is not None
    _vq_mma_kernel[grid](
        x2, c["idx"], p.centroids, c["rcb"], c["perm"], c["ws"],
        bias if (bias is not None and not extra) else out, out, ws, cnt,
        M, B, x2.stride(0), out.stride(0), c["NV"], c["P"], p.group_size, c["NMAIN"], p.outlier_size, iters,
        split, **c["consts"], BR=cfg.br, BC=cfg.bc, BB=cfg.bb,
        HAS_PERM=p.perm is not None, NORM=p.weight_scale is not None,
        HAS_BIAS=bias is not None and not extra, LOOP_WHILE=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(x2, B),
    )
    if extra:
        out += _outlier_and_beta(x2, p, bias)
    return out


def _outlier_and_beta(x2, p: VptqPacked, bias):
    """Outlier columns' product plus the norm-bias term plus bias, in plain PyTorch (rare path)."""
    y = torch.zeros(x2.shape[0], p.out_features, dtype=torch.float32, device=x2.device)
    cols = p.perm.long() if p.perm is not None else torch.arange(p.in_features, device=x2.device)
    xf = x2.float()
    if p.weight_scale is not None:
        y += (xf @ p.weight_bias.float())[:, None]
    if p.outlier_size:
        No = p.outlier_indices.shape[0]
        o = p.outlier_centroids.view(p.k_o, p.v_o)[_u16(p.outlier_indices)]
        o = o.permute(0, 2, 1).reshape(No * p.v_o, p.outlier_size)[: p.out_features].float()
        xo = xf[:, cols[: p.outlier_size]]
        if p.weight_scale is not None:
            xo = xo * p.weight_scale.float()[cols[: p.outlier_size]]
        y += xo @ o.T
    if bias is not None:
        y += bias.float()
    return y.to(x2.dtype)


def vptq_dequantize(p: VptqPacked, dtype=torch.float16, out=None, br: int = 16, bc: int = 64):
    """Dense W [m, n] (final column order) via the Triton dequant kernel (+ outliers in PyTorch)."""
    c = _common(p)
    M, n = p.out_features, p.in_features
    if out is None:
        out = torch.empty(M, n, dtype=dtype, device=p.centroids.device)
    _vq_dequant_kernel[(triton.cdiv(c["NV"], br), triton.cdiv(c["NMAIN"], bc))](
        c["idx"], p.centroids, c["rcb"], c["perm"], c["ws"], c["wb"], out, M, c["NV"], c["P"], p.group_size, c["NMAIN"],
        p.outlier_size, out.stride(0), **c["consts"], BR=br, BC=bc,
        HAS_PERM=p.perm is not None, NORM=p.weight_scale is not None, num_warps=4,
    )
    if p.outlier_size:
        No = p.outlier_indices.shape[0]
        o = p.outlier_centroids.view(p.k_o, p.v_o)[_u16(p.outlier_indices)]
        o = o.permute(0, 2, 1).reshape(No * p.v_o, p.outlier_size)[:M]
        cols = p.perm.long()[: p.outlier_size] if p.perm is not None else torch.arange(p.outlier_size)
        o = o.float()
        if p.weight_scale is not None:
            o = o * p.weight_scale[cols].float() + p.weight_bias[cols].float()
        out[:, cols.to(out.device)] = o.to(dtype)
    return out


def run_config(x2, p: VptqPacked, bias, cfg: VQConfig, out=None):
    if out is None:
        out = torch.empty(x2.shape[0], p.out_features, dtype=x2.dtype, device=x2.device)
    if cfg.kind == "dequant":
        w = vptq_dequantize(p, dtype=x2.dtype)
        torch.matmul(x2, w.T, out=out)
        if bias is not None:
            out += bias
        return out
    if cfg.kind == "mma":
        return _launch_mma(x2, p, bias, cfg, out)
    return _launch_gemv(x2, p, bias, cfg, out)


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_for(ctas: int, tiles: int, want_ctas: int) -> int:
    split = 1
    while ctas * split < want_ctas and tiles // (split * 2) >= 1:
        split *= 2
    return split


def heuristic_config(p: VptqPacked, batch: int, device) -> VQConfig:
    sms = _num_sms(device)
    nmain = p.in_features - p.outlier_size
    if batch > 64:
        return VQConfig("dequant")
    if batch <= 2:
        # lookups are L2-latency bound: many programs in flight (about 8 per SM)
        ctas = triton.cdiv(p.n_vec, 8) * batch
        return VQConfig("gemv", br=8, bc=64, split_k=_split_for(ctas, triton.cdiv(nmain, 64), 8 * sms))
    bb = max(16, min(64, triton.next_power_of_2(batch)))
    ctas = triton.cdiv(p.n_vec, 8) * triton.cdiv(batch, bb)
    return VQConfig("mma", br=8, bc=64, bb=bb, split_k=_split_for(ctas, triton.cdiv(nmain, 64), 4 * sms),
                    num_stages=2)


def candidate_configs(p: VptqPacked, batch: int, device) -> list[VQConfig]:
    """Tile shapes are compiles; the split is a run-time argument (free to try several)."""
    sms = _num_sms(device)
    nmain = p.in_features - p.outlier_size
    cands: list[VQConfig] = []
    if batch <= 2:
        for br, bc in ((8, 64), (16, 64), (8, 128)):
            ctas = triton.cdiv(p.n_vec, br) * batch
            s0 = _split_for(ctas, triton.cdiv(nmain, bc), 8 * sms)
            for split in sorted({max(1, s0 // 2), s0, s0 * 2}):
                cands.append(VQConfig("gemv", br=br, bc=bc, split_k=split))
    if batch >= 2:
        bb = max(16, min(64, triton.next_power_of_2(batch)))
        for br in (8, 16):
            ctas = triton.cdiv(p.n_vec, br) * triton.cdiv(batch, bb)
            s0 = _split_for(ctas, triton.cdiv(nmain, 64), 4 * sms)
            for split in sorted({max(1, s0 // 2), s0, s0 * 2}):
                cands.append(VQConfig("mma", br=br, bc=64, bb=bb, split_k=split, num_stages=2))
    if batch >= 16:
        cands.append(VQConfig("dequant"))
    return cands


_TUNED: dict[tuple, VQConfig] = {}


def tune_key(p: VptqPacked, batch: int, dtype) -> tuple:
    return (p.out_features, p.in_features, p.v, p.k, p.k_r, p.group_num, p.outlier_size,
            p.perm is not None, p.weight_scale is not None, batch_bucket(batch), str(dtype))


def tune(x2, p: VptqPacked, bias=None, cands=None) -> tuple[VQConfig, list]:
    """Time every candidate as a decode step runs it (`tuning.cold_us`), cache the fastest."""
    cands = cands or candidate_configs(p, x2.shape[0], x2.device)
    out = torch.empty(x2.shape[0], p.out_features, dtype=x2.dtype, device=x2.device)
    best, timings = time_candidates(lambda cfg: run_config(x2, p, bias, cfg, out), cands, x2.device)
    _TUNED[tune_key(p, x2.shape[0], x2.dtype)] = best
    return best, timings


def choose_config(x2, p: VptqPacked, bias=None) -> VQConfig:
    return choose(_TUNED, tune_key(p, x2.shape[0], x2.dtype), x2, lambda: tune(x2, p, bias)[0],
                  lambda: heuristic_config(p, x2.shape[0], x2.device), VQConfig,
                  lambda: candidate_configs(p, x2.shape[0], x2.device))


def vptq_matmul(x: torch.Tensor, p: VptqPacked, bias: torch.Tensor | None = None,
                config: VQConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) for a VPTQ layer in our layout; x [..., n]."""
    x2, lead = as_rows(x)
    cfg = config or choose_config(x2, p, bias)
    y = run_config(x2, p, bias, cfg, out)
    return y.reshape(*lead, p.out_features)
