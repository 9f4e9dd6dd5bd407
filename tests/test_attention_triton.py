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
    (2, 4, 2, 16, 16, [49, 16], 4),  # the newest token opens a split's first tile / ends it
]


@pytest.mark.parametrize("early", [False, True], ids=["after-wait", "first-tile-early"])
@pytest.mark.parametrize("B,Hq,Hkv,D,page,lens,splits", CPU_CASES)
def test_paged_decode_matches_reference_cpu(B, Hq, Hkv, D, page, lens, splits, early):
    """Both kernel variants: the one PDL launches take (first tile read before the wait, the
    newest token's row after it) and the plain one."""
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter test")
    q, k, v, bt, cl = _make_case(B, Hq, Hkv, D, page, lens, "cpu", torch.float16, seed=B * 100 + D)
    _check(q, k, v, bt, cl, 1 / math.sqrt(D), 3e-3, block_n=16, splits=splits, early=early)


def test_paged_decode_zero_context_gives_zeros_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter test")
    q, k, v, bt, cl = _make_case(2, 4, 2, 16, 16, [0, 20], "cpu", torch.float16)
    for splits, early in ((1, False), (2, False), (1, True), (2, True)):
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, k, v, bt, cl, 0.25, out=out, block_n=16, splits=splits, early=early)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        ref = paged_decode_attention_reference(q, k, v, bt, cl, 0.25)
        assert (out[1].float() - ref[1].float()).norm() / ref[1].float().norm() < 3e-3


@pytest.mark.parametrize("B,Hq,Hkv,D,page,lens,splits", [c for c in CPU_CASES if c[-1] and c[-1] > 1])
def test_paged_decode_fused_merge_matches_reference_cpu(B, Hq, Hkv, D, page, lens, splits):
    """The last split to arrive merges (LOWBIT_ATTENTION_FUSED_MERGE's path), in both kernel variants,
    twice over the same counters with fresh inputs: a counter left set by the first call would keep
    the second's outputs unwritten (NaN)."""
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter test")
    for call in range(2):
        q, k, v, bt, cl = _make_case(B, Hq, Hkv, D, page, lens, "cpu", torch.float16, seed=B * 7 + call)
        _check(q, k, v, bt, cl, 1 / math.sqrt(D), 3e-3, block_n=16, splits=splits, early=call == 1, fuse_merge=True)
    q, k, v, bt, cl = _make_case(2, 4, 2, 16, 16, [0, 20], "cpu", torch.float16)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, k, v, bt, cl, 0.25, out=out, block_n=16, splits=3, fuse_merge=True)
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # an empty context merges to zeros, not NaN


def test_fused_merge_is_opt_in(monkeypatch):
    monkeypatch.delenv("LOWBIT_ATTENTION_FUSED_MERGE", raising=False)
    assert not _att.fuses_merge()
    monkeypatch.setenv("LOWBIT_ATTENTION_FUSED_MERGE", "1")
    assert _att.fuses_merge()


def test_early_tile_only_under_pdl_with_int32_tables(monkeypatch):
    """The first tile is read before the PDL wait only in PDL launches whose lengths and page table are
    already int32 (a conversion would be a launch writing them just before), and not with
    LOWBIT_ATTENTION_EARLY=0 (the A/B switch)."""
    from lowbit.kernels.attention import takes_early_tile

    i32, i64 = torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 3, dtype=torch.int64)
    pdl, plain = {"PDL": True, "launch_pdl": True}, {"PDL": False}
    monkeypatch.delenv("LOWBIT_ATTENTION_EARLY", raising=False)
    assert takes_early_tile(pdl, i32, i32[:, 0])
    assert not takes_early_tile(plain, i32, i32[:, 0])
    assert not takes_early_tile(pdl, i64, i32[:, 0]) and not takes_early_tile(pdl, i32, i64[:, 0])
    monkeypatch.setenv("LOWBIT_ATTENTION_EARLY", "0")
    assert not takes_early_tile(pdl, i32, i32[:, 0])


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
        _check(q, k, v, bt, cl, 1 / math.sqrt(D), tol, splits=splits, early=True)
    for _ in range(3):  # the last split merges; every launch must leave the counters at 0 for the next
        _check(q, k, v, bt, cl, 1 / math.sqrt(D), tol, splits=5, fuse_merge=True)


# ---- paged prefill attention: every prompt chunk of a step in one launch ----------------------------

def _prefill_case(Hq, Hkv, D, page, chunks, device, dtype, seed=0, decode_rows=2):
    """chunks: (query count, context length) per chunk, the chunk's keys at the end of its context.
    Rows of q are laid out chunk after chunk with `decode_rows` other rows before each chunk (the
    decodes a mixed step holds); the kernel must leave those rows alone."""
    g = torch.Generator().manual_seed(seed)
    need = sum(-(-ctx // page) for _, ctx in chunks)
    num_blocks = need + 3
    k_cache = torch.randn(num_blocks, page, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, page, Hkv, D, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-ctx // page) for _, ctx in chunks) + 1
    spans, tables, row = [], [], 0
    for nq, ctx in chunks:
        row += decode_rows
        nb = -(-ctx // page)
        tables.append(perm[:nb] + [-1] * (width - nb))  # a page past the context is never read
        perm = perm[nb:]
        spans.append((row, nq, ctx))
        row += nq
    q = torch.randn(row + decode_rows, Hq, D, generator=g).to(dtype)
    spans_t = torch.tensor(spans, dtype=torch.int32)
    tables_t = torch.tensor(tables, dtype=torch.int32)
    return [x.to(device) for x in (q, k_cache, v_cache, spans_t, tables_t)], spans


def _check_prefill(Hq, Hkv, D, page, chunks, device, dtype, tol, block_m, block_n=16, seed=0):
    (q, k, v, spans_t, tables_t), spans = _prefill_case(Hq, Hkv, D, page, chunks, device, dtype, seed)
    scale = 1 / math.sqrt(D)
    tiles = torch.tensor(_att.prefill_tiles(spans, block_m), dtype=torch.int32, device=device).view(-1, 2)
    out = torch.full_like(q, float("nan"))
    _att.paged_prefill_attention(q, k, v, spans_t, tables_t, scale, out, tiles, block_m=block_m, block_n=block_n)
    ref = torch.full((q.shape[0], Hq, D), float("nan"), dtype=torch.float64, device=device)
    _att.paged_prefill_attention_reference(q.double(), k.double(), v.double(), spans_t, tables_t, scale, ref)
    covered = torch.zeros(q.shape[0], dtype=torch.bool)
    for start, nq, _ in spans:
        covered[start:start + nq] = True
    covered = covered.to(device)
    assert torch.isnan(out[~covered]).all(), "rows outside the chunks were written"
    assert not torch.isnan(out[covered]).any(), "chunk rows left unwritten (NaN)"
    got, want = out[covered].double(), ref[covered]
    err = (got - want).norm() / want.norm()
    assert err < tol, f"relative error {err:.2e} >= {tol}"
    # per chunk too: a wrong mask on one short chunk would hide in the norm of a long one
    for start, nq, _ in spans:
        e = (out[start:start + nq].double() - ref[start:start + nq]).norm() / ref[start:start + nq].norm()
        assert e < tol, (start, nq, float(e))


PREFILL_CPU_CASES = [
    # Hq, Hkv, D, page, chunks (query count, context length), block_m
    (4, 4, 16, 16, [(5, 5)], 16),  # one fresh prompt
    (8, 2, 32, 8, [(20, 20), (3, 40), (17, 17)], 16),  # GQA 4; a chunk after 37 cached tokens; nq > block_m
    (6, 3, 24, 4, [(33, 50), (2, 2)], 16),  # D not a power of two, tiny pages, G = 2
    (4, 1, 16, 16, [(40, 40)], 32),  # MQA, two tiles, the second one partial
]


@pytest.mark.parametrize("Hq,Hkv,D,page,chunks,block_m", PREFILL_CPU_CASES)
def test_paged_prefill_matches_reference_cpu(Hq, Hkv, D, page, chunks, block_m):
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter test")
    _check_prefill(Hq, Hkv, D, page, chunks, "cpu", torch.float16, 3e-3, block_m, seed=len(chunks) + D)


def test_prefill_tiles_cover_every_query_once():
    spans = [(0, 5, 5), (9, 64, 70), (80, 65, 65)]
    tiles = _att.prefill_tiles(spans, 32)
    pairs = list(zip(tiles[::2], tiles[1::2], strict=True))
    assert pairs == [(0, 0), (1, 0), (1, 32), (2, 0), (2, 32), (2, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Hq,Hkv,chunks", [
    (32, 32, [(128, 128)]),  # Llama-2-7B, one prompt
    (32, 32, [(int(n), int(n)) for n in torch.randint(2, 200, (12,), generator=torch.Generator().manual_seed(3))]),
    (32, 8, [(1000, 1000), (512, 3000), (7, 7), (300, 2348)]),  # Llama-3-8B GQA, chunked prompts
    (64, 8, [(257, 257), (64, 64), (65, 1000)]),  # Llama-2-70B heads
])
def test_paged_prefill_matches_reference_gpu(Hq, Hkv, chunks, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    tol = 3e-3 if dtype == torch.float16 else 2e-2
    _check_prefill(Hq, Hkv, 128, 16, chunks, "cuda", dtype, tol, _att.PREFILL_BLOCK_M, 64, seed=len(chunks))


def test_both_launches_refuse_bad_shapes_with_the_same_messages():
    kc = torch.zeros(4, 16, 4, 16)
    spans, tables, tiles = (torch.zeros(1, 3, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
                            torch.zeros(1, 2, dtype=torch.int32))
    bt, lens = torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    cases = [(torch.zeros(2, 6, 16), kc, "not a multiple of 4 kv heads"),
             (torch.zeros(2, 8, 32), kc, "mismatch"),
             (torch.zeros(2, 8, 8), torch.zeros(4, 16, 4, 8), "at least 16"),
             (torch.zeros(2, 16, 8).transpose(1, 2), kc, "contiguous")]
    for q, k, msg in cases:
        with pytest.raises(ValueError, match=msg):
            paged_decode_attention(q, k, k, bt, lens, 0.25)
        with pytest.raises(ValueError, match=msg):
            _att.paged_prefill_attention(q, k, k, spans, tables, 0.25, torch.empty_like(q), tiles)
