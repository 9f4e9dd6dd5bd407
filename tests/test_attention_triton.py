"""Paged decode attention: the Triton kernel equals the plain-PyTorch reference.

CPU runs use the Triton interpreter (TRITON_INTERPRET=1, set here before triton is imported) at small
shapes; `-m gpu` runs real shapes on CUDA. Every output is NaN-poisoned before the kernel runs, and
inputs are fresh random draws for every case.
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from tests.conftest import kernel_module  # noqa: E402

_att = kernel_module("lowbit.kernels.attention")
paged_decode_attention = _att.paged_decode_attention
paged_decode_attention_reference = _att.paged_decode_attention_reference


def _make_case(B, Hq, Hkv, D, page, lens, device, dtype, extra_blocks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(1, max(-(-n // page) for n in lens)) + 1  # one spare column: never read
    num_blocks = B * max_blocks + extra_blocks
    k_cache = torch.randn(num_blocks, page, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, page, Hkv, D, generator=g).to(dtype)
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    # pages handed out in a random order, so sequences' pages are scattered and interleaved
    perm = torch.randperm(num_blocks, generator=g)
    block_tables = torch.full((B, max_blocks), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lens):
        nb = -(-n // page)
        block_tables[b, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
    context_lens = torch.tensor(lens, dtype=torch.int32)
    t = [x.to(device) for x in (q, k_cache, v_cache, block_tables, context_lens)]
    return t


def _check(q, k, v, bt, cl, scale, tol, **kw):
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, k, v, bt, cl, scale, out=out, **kw)
    ref64 = paged_decode_attention_reference(q.double(), k.double(), v.double(), bt, cl, scale)
    assert not torch.isnan(out).any(), "unwritten (NaN) outputs"
    err = (out.double() - ref64).norm() / ref64.norm()
    assert err < tol, f"relative error {err:.2e} >= {tol}"
    # the reference at the inputs' own precision agrees too (it is the documented oracle)
    ref = paged_decode_attention_reference(q, k, v, bt, cl, scale)
    assert (ref.double() - ref64).norm() / ref64.norm() < tol


CPU_CASES = [
    # B, Hq, Hkv, D, page, lens, splits
    (1, 4, 4, 16, 16, [1], None),
    (2, 8, 2, 32, 16, [17, 40], None),  # GQA 4, partial last page
    (3, 12, 4, 16, 8, [5, 64, 33], 1),  # G = 3 (not a power of two), one split
    (3, 12, 4, 16, 8, [5, 64, 33], 3),  # same, forced splits; some splits empty for short rows
    (2, 6, 1, 24, 32, [70, 2], 2),  # D not a power of two, MQA
    (1, 16, 16, 32, 4, [129], 4),  # tiny pages: many page-table lookups per tile
]


@pytest.mark.parametrize("B,Hq,Hkv,D,page,lens,splits", CPU_CASES)
def test_paged_decode_matches_reference_cpu(B, Hq, Hkv, D, page, lens, splits):
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter test")
    q, k, v, bt, cl = _make_case(B, Hq, Hkv, D, page, lens, "cpu", torch.float16, seed=B * 100 + D)
    _check(q, k, v, bt, cl, 1 / math.sqrt(D), 3e-3, block_n=16, splits=splits)


def test_paged_decode_zero_context_gives_zeros_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter test")
    q, k, v, bt, cl = _make_case(2, 4, 2, 16, 16, [0, 20], "cpu", torch.float16)
    for splits in (1, 2):
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, k, v, bt, cl, 0.25, out=out, block_n=16, splits=splits)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        ref = paged_decode_attention_reference(q, k, v, bt, cl, 0.25)
        assert (out[1].float() - ref[1].float()).norm() / ref[1].float().norm() < 3e-3


GPU_CASES = [
    # Llama-2-7B (MHA), Llama-3-8B (GQA 4), Llama-2-70B per-GPU (GQA 8), SmolLM2 (GQA 3, D 64)
    (1, 32, 32, 128, 16, [1]),
    (1, 32, 32, 128, 16, [4000]),
    (4, 32, 8, 128, 16, [1, 100, 1024, 3000]),
    (16, 64, 8, 128, 16, [int(x) for x in torch.randint(1, 2048, (16,), generator=torch.Generator().manual_seed(1))]),
    (8, 9, 3, 64, 32, [7, 31, 32, 33, 512, 700, 1, 2047]),
    (64, 32, 8, 128, 16, [int(x) for x in torch.randint(1, 600, (64,), generator=torch.Generator().manual_seed(2))]),
    (2, 32, 8, 128, 256, [16384, 9000]),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,D,page,lens", GPU_CASES)
def test_paged_decode_matches_reference_gpu(B, Hq, Hkv, D, page, lens, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    q, k, v, bt, cl = _make_case(B, Hq, Hkv, D, page, lens, "cuda", dtype, seed=B + D + page)
    tol = 3e-3 if dtype == torch.float16 else 2e-2
    _check(q, k, v, bt, cl, 1 / math.sqrt(D), tol)
    for splits in (1, 5):
        _check(q, k, v, bt, cl, 1 / math.sqrt(D), tol, splits=splits)
