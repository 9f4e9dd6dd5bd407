"""Triton helpers both QTIP kernel modules call (`qtip_triton`, `qtip_frag_triton`): the codes'
16-bit stream words in big-endian order, and a split-K program's output (add or store)."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

if triton is not None:

    @triton.jit
    def _be(d):
        """Little-endian int32 (two 16-bit words, the first in the low half) -> big-endian uint32."""
        u = d.to(tl.uint32, bitcast=True)
        return (u << 16) | (u >> 16)

    @triton.jit
    def _put(y_ptr, off, val, msk, ATOMIC: tl.constexpr):
        """y[off] += val (split-K programs, float atomics; y holds zeros first) or y[off] = val."""
        if ATOMIC:
            tl.atomic_add(y_ptr + off, val, mask=msk, sem="relaxed")
        else:
            tl.store(y_ptr + off, val, mask=msk)
