"""Randomized-Hadamard transforms as QTIP (and QuIP#) use them, in plain PyTorch.

A length N is either a power of two (Walsh-Hadamard in Sylvester order) or k * 2^p with k one of the
orders in `SPECIAL_ORDERS`, whose +/-1 Hadamard matrices are data (Sloane's library, as the official
code ships them). They live packed, one bit per entry, in `data/special_hadamards.safetensors`
(about 15 KB), so the package needs nothing outside itself.

Every transform here is orthonormal (scaled by N^-1/2) and works over the last dimension, in the
input's dtype. The butterfly costs O(N log N); only the k x k factor is a dense product.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

# The first entry that divides N (with N/k a power of two) is used: this order is part of the format.
SPECIAL_ORDERS = (172, 156, 140, 124, 116, 108, 60, 52, 36, 28, 20, 12)

_DATA = Path(__file__).with_name("data") / "special_hadamards.safetensors"


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def hadamard_factor(n: int) -> int:
    """The special order k of length n (1 when n is a power of two); ValueError when n is not valid.

    The first k of SPECIAL_ORDERS that divides n is taken, and n/k must then be a power of two
    (11008 = 172*64 for Llama-2, 14336 = 28*512 for Llama-3)."""
    n = int(n)
    if n <= 0:
        raise ValueError(f"Hadamard size must be positive, got {n}")
    for k in SPECIAL_ORDERS:
        if n % k == 0:
            if not _is_pow2(n // k):
                raise ValueError(f"Hadamard size {n} = {k} * {n // k}: {n // k} is not a power of two")
            return k
    if not _is_pow2(n):
        raise ValueError(
            f"Hadamard size {n} is neither a power of two nor k * 2^p for k in {SPECIAL_ORDERS}"
        )
    return 1


@functools.cache
def _special_bits() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(_DATA))


@functools.cache
def special_hadamard(k: int) -> torch.Tensor:
    """The +/-1 Hadamard matrix of order k (int8 [k, k], CPU), unpacked from the bundled bits."""
    if k not in SPECIAL_ORDERS:
        raise ValueError(f"no special Hadamard matrix of order {k}; known: {SPECIAL_ORDERS}")
    packed = _special_bits()[f"had_{k}"].to(torch.int32)
    shifts = torch.arange(7, -1, -1, dtype=torch.int32)  # MSB first within each byte
    bits = ((packed[:, None] >> shifts) & 1).flatten()[: k * k]
    return (bits * 2 - 1).to(torch.int8).view(k, k)


@functools.cache
def _special_float(k: int, transpose: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    a = special_hadamard(k)
    a = a.T if transpose else a
    return a.to(device=device, dtype=dtype).contiguous()


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unscaled Walsh-Hadamard transform (Sylvester order) over the last dim, a power of two.

    Each pass pairs entries h apart inside blocks of 2h and writes (a+b, a-b): the recursion
    H_2h = [[H_h, H_h], [H_h, -H_h]], one level per pass, log2(N) passes in all."""
    n = x.shape[-1]
    if not _is_pow2(n):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(x.shape)


def hadamard_reference(x: torch.Tensor, transpose: bool = False, chunks: int = 1) -> torch.Tensor:
    """y = H x (or H^T x) over the last dim, orthonormal; with chunks > 1, independently per contiguous
    chunk of size N/chunks (the block-diagonal H of a tensor-parallel split).

    For N = k * 2^p the vector is viewed as X [k, N/k] (index i*(N/k) + j) and
    H x = A_k (X S_{N/k}) / sqrt(N), with S the Sylvester matrix and A_k the special matrix
    (A_k^T for the transpose); S is symmetric, so transposing only touches A_k."""
    n = x.shape[-1]
    if chunks < 1 or n % chunks:
        raise ValueError(f"cannot split length {n} into {chunks} chunks")
    size = n // chunks
    k = hadamard_factor(size)
    y = fwht(x.reshape(*x.shape[:-1], chunks * k, size // k))
    if k > 1:
        a = _special_float(k, transpose, y.dtype, y.device)
        y = torch.matmul(a, y.view(-1, k, size // k))
    return (y * size**-0.5).reshape(x.shape)
