"""Fused add+RMSNorm, rotary and SiLU·mul kernels against their PyTorch references.

On CPU the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1) at small shapes;
`-m gpu` repeats them at real shapes on CUDA. Outputs are NaN-poisoned by `torch.empty` fill.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from lowbit.kernels import fused  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _poison(monkeypatch):
    real = torch.empty_like

    def poisoned(t, *a, **k):
        out = real(t, *a, **k)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty_like", poisoned)


def _close(a, b, tol):
    assert not torch.isnan(a).any()
    err = (a.double() - b.double()).norm() / b.double().norm()
    assert err <= tol, err


CASES_CPU = [(3, 64, torch.float32), (5, 96, torch.float16)]
CASES_GPU = [(1, 4096, torch.float16), (16, 8192, torch.float16), (7, 576, torch.bfloat16)]


def _rmsnorm_case(n, h, dtype, device, monkeypatch, seed):
    _poison(monkeypatch)
    g = torch.Generator().manual_seed(seed)
    x, r = (torch.randn(n, h, generator=g).to(dtype).to(device) for _ in range(2))
    w = (torch.rand(h, generator=g) + 0.5).to(dtype).to(device)
    for res in (None, r):
        got, got_r = fused.rmsnorm_triton(x, w, 1e-5, res)
        want, want_r = fused.rmsnorm_reference(x, w, 1e-5, res)
        _close(got, want, 2e-3 if dtype != torch.float32 else 1e-5)
        assert torch.equal(got_r, want_r)  # the residual sum is rounded exactly as PyTorch does


def _rotary_case(n, hq, hkv, d, dtype, device, seed, store=False):
    """Rotary in place; with `store` the same launch writes the rotated k and v at scattered slots
    of NaN caches (slots no token owns must stay NaN)."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(n, hq, d, generator=g).to(dtype), torch.randn(n, hkv, d, generator=g).to(dtype)
    v = torch.randn(n, hkv, d, generator=g).to(dtype)
    pos = torch.randint(0, 5000, (n,), generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    want_q, want_k = fused.rotary_reference(q, k, pos, inv)
    slots = torch.randperm(3 * n, generator=g)[:n]
    q, k, v, pos, inv, slots = (t.to(device) for t in (q, k, v, pos, inv, slots))
    caches = [torch.full((3 * n, hkv, d), float("nan"), dtype=dtype, device=device) for _ in range(2)]
    got_q, got_k = fused.rotary_triton_(q.clone(), k.clone(), pos, inv, (v, *caches, slots) if store else None)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    _close(got_q.cpu(), want_q, tol)
    _close(got_k.cpu(), want_k, tol)
    if store:
        kc, vc = (c.cpu() for c in caches)
        assert torch.equal(kc[slots.cpu()], got_k.cpu()) and torch.equal(vc[slots.cpu()], v.cpu())
        others = torch.ones(3 * n, dtype=torch.bool)
        others[slots.cpu()] = False
        assert kc[others].isnan().all() and vc[others].isnan().all()


def _silu_case(n, i, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    gu = torch.randn(n, 2 * i, generator=g).to(dtype).to(device)
    gate, up = gu.chunk(2, dim=-1)  # strided halves, as from a fused gate_up projection
    _close(fused.silu_mul_triton(gate, up), fused.silu_mul_reference(gate, up),
           1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("n,h,dtype", CASES_CPU)
def test_rmsnorm_interpreter(n, h, dtype, monkeypatch):
    _rmsnorm_case(n, h, dtype, "cpu", monkeypatch, seed=n)


@pytest.mark.parametrize("hq,hkv,d,dtype", [(4, 2, 16, torch.float32), (3, 3, 32, torch.float16)])
def test_rotary_interpreter(hq, hkv, d, dtype):
    _rotary_case(5, hq, hkv, d, dtype, "cpu", seed=hq)
    _rotary_case(5, hq, hkv, d, dtype, "cpu", seed=hq + 1, store=True)


def test_rotary_store_reference_writes_the_slots():
    """The CPU path of `rotary_` with a store: the reference rotation, then the same slot writes."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(4, h, 8, generator=g) for h in (4, 2, 2))
    pos, inv, slots = torch.tensor([0, 3, 7, 9]), torch.rand(4), torch.tensor([5, 0, 2, 6])
    kc, vc = torch.zeros(8, 2, 8), torch.zeros(8, 2, 8)
    want_q, want_k = fused.rotary_reference(q, k, pos, inv)
    got_q, got_k = fused.rotary_(q, k, pos, inv, (v, kc, vc, slots))
    assert torch.equal(got_q, want_q) and torch.equal(kc[slots], want_k) and torch.equal(vc[slots], v)
    assert kc[[1, 3, 4, 7]].eq(0).all()


def test_silu_mul_interpreter():
    _silu_case(3, 48, torch.float32, "cpu", 0)


@pytest.mark.gpu
@pytest.mark.parametrize("n,h,dtype", CASES_GPU)
def test_fused_gpu(n, h, dtype, monkeypatch):
    _rmsnorm_case(n, h, dtype, DEV, monkeypatch, seed=n)
    _rotary_case(n, 32, 8, 128, dtype, DEV, seed=n)
    _rotary_case(n, 32, 8, 128, dtype, DEV, seed=n + 1, store=True)
    _silu_case(n, 11008, dtype, DEV, seed=n)
