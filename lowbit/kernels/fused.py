"""Small fused kernels around the projections: residual-add + RMSNorm, rotary on q and k, SiLU·mul.

Once weights are 2-bit, a decoder layer's GEMVs take tens of microseconds and the elementwise work
between them, done op by op in PyTorch, is ~30 more launches per layer: enough to cap decode speed
by itself. Each function here is one launch. Rounding follows the PyTorch references (which follow
the transformers implementations): the residual sum is rounded to the activation dtype before it is
normalised, the norm scales after casting back, SiLU is rounded before the product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .pdl import launch_options, wait_prior

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton use the references
    triton = None


# ---- references (CPU path and test oracle) ---------------------------------------------------

def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                      residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rmsnorm(x + residual), x + residual); without residual the second is x itself."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


def rotary_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding of q [N, Hq, D] and k [N, Hkv, D] at `positions` [N]."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(q.dtype)[:, None, :], emb.sin().to(q.dtype)[:, None, :]

    def rot(x):
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    return rot(q), rot(k)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Write k, v [N, Hkv, D] at rows `slots` [N] of the caches [slots, Hkv, D]: what the rotary
    launch does with a store, and what an attention context does when it did not."""
    k_cache.index_copy_(0, slots, k)
    v_cache.index_copy_(0, slots, v)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# ---- Triton ------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rmsnorm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, rout_ptr, H, sx, sr, so, sro, eps,
                        HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < H
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        wait_prior(PDL)
        x = tl.load(x_ptr + row * sx + offs, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(r_ptr + row * sr + offs, mask=mask, other=0.0)
            # fp16 + fp16 is exact in fp32; rounding once gives PyTorch's fp16 sum.
            x = (x.to(tl.float32) + r.to(tl.float32)).to(rout_ptr.dtype.element_ty)
            tl.store(rout_ptr + row * sro + offs, x, mask=mask)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / H
        y = (xf * tl.rsqrt(var + eps)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * so + offs, (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, pos_ptr, f_ptr,
                       sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, sc_s, sc_h, HQ, HKV,
                       HALF: tl.constexpr, BLOCK_H: tl.constexpr, WRITE_KV: tl.constexpr, PDL: tl.constexpr):
        """Program n rotates token n's q and k heads in place; with WRITE_KV it also stores the
        rotated k and its v at slot slot_ptr[n] of the caches [slots, Hkv, 2·HALF] (strides sc_*)."""
        n = tl.program_id(0)
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, HALF)
        inv_freq = tl.load(f_ptr + offs_d)
        wait_prior(PDL)
        pos = tl.load(pos_ptr + n).to(tl.float32)
        freq = pos * inv_freq
        cos = tl.cos(freq)[None, :]
        sin = tl.sin(freq)[None, :]
        for which in tl.static_range(2):
            if which == 0:
                base, s_n, s_h, nh = q_ptr, sq_n, sq_h, HQ
            else:
                base, s_n, s_h, nh = k_ptr, sk_n, sk_h, HKV
            mask = (offs_h < nh)[:, None]
            p1 = base + n * s_n + offs_h[:, None] * s_h + offs_d[None, :]
            x1 = tl.load(p1, mask=mask, other=0.0)
            x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
            dt = x1.dtype
            c = cos.to(dt).to(tl.float32)
            s = sin.to(dt).to(tl.float32)
            a, b = x1.to(tl.float32), x2.to(tl.float32)
            r1 = (a * c - b * s).to(dt)
            r2 = (b * c + a * s).to(dt)
            tl.store(p1, r1, mask=mask)
            tl.store(p1 + HALF, r2, mask=mask)
            if WRITE_KV and which == 1:
                slot = tl.load(slot_ptr + n).to(tl.int64)
                dst = slot * sc_s + offs_h[:, None] * sc_h + offs_d[None, :]
                tl.store(kc_ptr + dst, r1, mask=mask)
                tl.store(kc_ptr + dst + HALF, r2, mask=mask)
                pv = v_ptr + n * sv_n + offs_h[:, None] * sv_h + offs_d[None, :]
                tl.store(vc_ptr + dst, tl.load(pv, mask=mask, other=0.0), mask=mask)
                tl.store(vc_ptr + dst + HALF, tl.load(pv + HALF, mask=mask, other=0.0), mask=mask)

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n_cols, sg, su, so, BLOCK: tl.constexpr, PDL: tl.constexpr):
        wait_prior(PDL)
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_cols
        g = tl.load(g_ptr + row * sg + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * su + offs, mask=mask, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * so + offs, (s * u).to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm_triton(x, weight, eps, residual=None):
    n, h = x.shape
    out = torch.empty_like(x)
    rout = torch.empty_like(x) if residual is not None else x
    r = residual if residual is not None else x
    _rmsnorm_kernel[(n,)](x, r, weight, out, rout, h, x.stride(0), r.stride(0), out.stride(0), rout.stride(0),
                          eps, HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(h),
                          num_warps=4 if h <= 4096 else 8, **launch_options(x, n))
    return out, rout


def rotary_triton_(q, k, positions, inv_freq, kv_store=None):
    n, hq, d = q.shape
    if kv_store is None:
        v = kc = vc = slots = k  # unused: WRITE_KV is off
    else:
        v, kc, vc, slots = kv_store
    _rotary_kernel[(n,)](q, k, v, kc, vc, slots, positions, inv_freq, q.stride(0), q.stride(1), k.stride(0),
                         k.stride(1), v.stride(0), v.stride(1), kc.stride(0), kc.stride(1), hq, k.shape[1],
                         HALF=d // 2, BLOCK_H=triton.next_power_of_2(max(hq, k.shape[1])),
                         WRITE_KV=kv_store is not None, num_warps=4, **launch_options(q, n))
    return q, k


def silu_mul_triton(gate, up):
    n, i = gate.shape
    out = torch.empty(n, i, dtype=gate.dtype, device=gate.device)
    block = min(2048, triton.next_power_of_2(i))
    _silu_mul_kernel[(n, triton.cdiv(i, block))](gate, up, out, i, gate.stride(0), up.stride(0), out.stride(0),
                                                BLOCK=block, num_warps=4, **launch_options(gate, n))
    return out


# ---- dispatch: Triton for CUDA tensors, the references elsewhere ---------------------------------

def _rows_ok(*ts: torch.Tensor) -> bool:
    return triton is not None and all(t.is_cuda and t.dim() >= 2 and t.stride(-1) == 1 for t in ts)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch for `x + residual` and its RMSNorm; returns (normed, new residual)."""
    if _rows_ok(x) and x.dim() == 2 and (residual is None or residual.stride(-1) == 1):
        return rmsnorm_triton(x, weight, eps, residual)
    return rmsnorm_reference(x, weight, eps, residual)


def rotary_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
            kv_store: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary on q [N, Hq, D] and k [N, Hkv, D], in place on CUDA (one launch); returns (q, k).

    kv_store = (v [N, Hkv, D], k_cache, v_cache [slots, Hkv, D], slots [N]) also stores the rotated
    k and v of token i at slot slots[i], in the same launch (a decode step's KV write otherwise
    costs two more launches a layer)."""
    half = q.shape[-1] // 2
    store_ok = kv_store is None or all(t.stride(-1) == 1 for t in kv_store[:3])
    if _rows_ok(q, k) and half & (half - 1) == 0 and store_ok:
        return rotary_triton_(q, k, positions, inv_freq, kv_store)
    q, k = rotary_reference(q, k, positions, inv_freq)
    if kv_store is not None:
        store_kv(k, *kv_store)
    return q, k


@dataclass(frozen=True)
class QKVRotary:
    """The rotary step after a fused q|k|v projection, handed to the projection so that its output
    launch can take it (`QuantLinear.forward_normed`): positions [N], the inverse frequencies, the
    head counts, and kv_store = (k_cache, v_cache, slots) to write k and v to, or None."""
    positions: torch.Tensor
    inv_freq: torch.Tensor
    num_heads: int
    num_kv_heads: int
    head_dim: int
    kv_store: tuple | None = None


def qkv_heads(qkv: torch.Tensor, num_heads: int, num_kv_heads: int,
              head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views q [N, Hq, D], k, v [N, Hkv, D] of a fused projection output qkv [N, (Hq + 2·Hkv)·D]."""
    n, d = qkv.shape[0], head_dim
    q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    return q.view(n, num_heads, d), k.view(n, num_kv_heads, d), v.view(n, num_kv_heads, d)


def rotary_qkv_(qkv: torch.Tensor, work: QKVRotary) -> torch.Tensor:
    """Rotate the q and k heads of a fused projection output qkv [N, (Hq + 2·Hkv)·D] in place (one
    `rotary_` launch, with the KV write of work.kv_store); returns qkv."""
    q, k, v = qkv_heads(qkv, work.num_heads, work.num_kv_heads, work.head_dim)
    q2, k2 = rotary_(q, k, work.positions, work.inv_freq, None if work.kv_store is None else (v, *work.kv_store))
    if q2 is not q:  # the reference computes out of place
        q.copy_(q2)
        k.copy_(k2)
    return qkv


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in one launch (gate/up may be the two halves of a fused gate_up output)."""
    if _rows_ok(gate, up) and gate.dim() == 2:
        return silu_mul_triton(gate, up)
    return silu_mul_reference(gate, up)
