"""Triton helpers the QTIP kernel modules call (`qtip_triton`, `qtip_frag_triton`, and the Hadamard
kernels that feed them): the codes' 16-bit stream words in big-endian order, a split-K program's
output (add or store), and where an element of x goes in the fragment kernel's x layout."""

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

    @triton.jit
    def _frag_x_offset(r, c, NB: tl.constexpr):
        """Offset of x[r, c] in the fragment order (`qtip_frag_triton.frag_x_order`): row r = 8b + g,
        column c = 16j + 8h + 2t + e goes to ((j·NB + b)·32 + 4g + t)·4 + 2h + e, so lane 4g + t of
        a warp finds both B registers of n-block b, tile column j, in one 8-byte word."""
        k = c % 16
        return (((c // 16) * NB + r // 8) * 32 + 4 * (r % 8) + (k % 8) // 2) * 4 + 2 * (k // 8) + c % 2
