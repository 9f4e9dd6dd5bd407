"""Uniform int2/3/4/8 kernels equal the plain-PyTorch reference on fresh random layers.

CPU: Triton interpreter at small shapes (default suite). GPU (`-m gpu`): real Llama shapes, every
kernel kind, fp16 and bf16. Outputs are NaN-poisoned before each run.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from tests.conftest import kernel_module  # noqa: E402

uq = kernel_module("lowbit.kernels.uniform_triton")
uf = kernel_module("lowbit.kernels.uniform_frag_triton")
CPU = not torch.cuda.is_available()


def _layer(m, n, bits, group, zero_is_min=False, perm=False, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (m, n), generator=g)
    ng = n // group
    s = (torch.rand(ng, m, generator=g) * 0.02 + 0.002).half()
    if zero_is_min:
        z = (torch.randn(ng, m, generator=g) * 0.05).half()
    else:
        z = torch.randint(0, 2**bits, (ng, m), generator=g).half()
    pr = torch.randperm(n, generator=g).to(torch.int32) if perm else None
    p = uq.pack_uniform(q, bits, s.to(device), z.to(device), group, zero_is_min, pr)
    # W built here straight from the codes, independently of the packer/unpacker
    sf, zf = s.float().repeat_interleave(group, 0).T, z.float().repeat_interleave(group, 0).T
    w = sf * q.float() + zf if zero_is_min else sf * (q.float() - zf)
    if pr is not None:
        w2 = torch.empty_like(w)
        w2[:, pr.long()] = w
        w = w2
    return p, w


def _check(x, p, bias, cfg, tol):
    """cfg's launch against the fp64 reference; "frag" (the int4 tensor-core kernel) runs on p
    repacked into the fragment layout, as a layer held in it (`frag_run`), the others on p."""
    out = torch.full((x.shape[0], p.out_features), float("nan"), dtype=x.dtype, device=x.device)
    if cfg.kind == "frag":
        uf.frag_run(x, uf.repack_frag(p), bias, cfg, out)
    else:
        uq.uniform_matmul(x, p, bias, config=cfg, out=out)
    ref = uq.uniform_packed_matmul_reference(x.double(), p, None if bias is None else bias.double())
    assert not torch.isnan(out).any(), "unwritten (NaN) outputs"
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < tol, f"{cfg}: relative error {err:.2e}"


def test_packing_refuses_fractional_zeros():
    """The kernels subtract an integer zero exactly; a fractional one would be rounded silently."""
    q = torch.randint(0, 16, (16, 128))
    with pytest.raises(ValueError, match="zeros must be integers"):
        uq.pack_uniform(q, 4, torch.rand(1, 16).half(), torch.full((1, 16), 7.5).half(), 128)
    uq.pack_uniform(q, 4, torch.rand(1, 16).half(), torch.full((1, 16), 7.5).half(), 128, zero_is_min=True)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_roundtrip_matches_independent_dequant(bits):
    for zim, perm in ((False, False), (True, True)):
        p, w = _layer(32, 256, bits, 64, zim, perm, seed=bits)
        assert torch.allclose(uq.uniform_packed_dequant_reference(p), w, rtol=0, atol=1e-6)


CPU_CASES = [
    # bits, group, zero_is_min, perm, bias, batch, config (bk: inputs per tile, bmw: words per tile)
    (4, 128, False, False, True, 1, dict(kind="gemv", bk=32, bmw=4, bb=1, split_k=2)),
    (4, 32, True, False, False, 2, dict(kind="gemv", bk=16, bmw=4, bb=1, split_k=1)),  # GGUF Q4_1-like
    (2, 128, False, True, False, 2, dict(kind="gemv", bk=32, bmw=2, bb=1, split_k=1)),
    (3, 64, False, False, True, 1, dict(kind="gemv", bk=16, bmw=4, bb=1, split_k=3)),
    (8, 32, False, True, False, 1, dict(kind="gemv", bk=16, bmw=8, bb=1, split_k=1)),
    (4, 128, False, True, True, 5, dict(kind="mma", bk=32, bmw=2, bb=16, split_k=2)),
    (3, 128, False, False, False, 17, dict(kind="mma", bk=64, bmw=1, bb=16, split_k=1)),
    (2, 64, True, False, False, 3, dict(kind="mma", bk=32, bmw=4, bb=16, split_k=1)),
    (8, 128, False, False, True, 4, dict(kind="mma", bk=32, bmw=4, bb=16, split_k=1)),
    (3, 32, False, True, True, 6, dict(kind="dequant")),
    (4, 128, True, False, False, 2, dict(kind="dequant")),
]


@pytest.mark.skipif(not CPU, reason="CPU interpreter test")
@pytest.mark.parametrize("bits,group,zim,perm,bias,batch,cfg", CPU_CASES)
def test_uniform_kernels_match_reference_cpu(bits, group, zim, perm, bias, batch, cfg):
    seed = bits * 1000 + group + batch
    p, _ = _layer(48, 512, bits, group, zim, perm, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    b = torch.randn(48, generator=g) if bias else None
    # float32 activations check the integer decode tightly; fp16 ones the kernels' fp16 paths
    dtype, tol = ((torch.float32, 1e-5), (torch.float16, 2e-3))[(bits + batch) % 2]
    x = torch.randn(batch, 512, generator=g).to(dtype)
    _check(x, p, None if b is None else b.to(dtype), uq.UQConfig(**cfg), tol)


@pytest.mark.skipif(not CPU, reason="CPU interpreter test")
def test_uniform_heuristic_dispatch_cpu():
    p, _ = _layer(32, 256, 4, 128, seed=7)
    x = torch.randn(2, 3, 256)  # leading dims flatten (the heuristic picks the mma kernel at 6 rows)
    y = uq.uniform_matmul(x, p)
    ref = uq.uniform_packed_matmul_reference(x.reshape(6, 256).double(), p).reshape(2, 3, 32)
    assert y.shape == (2, 3, 32)
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-5


FRAG_CPU_CASES = [
    # group, perm, bias, batch, (row tiles, warps, prefetch), out_features (48 with 2 row tiles: ragged), inputs
    (128, False, True, 1, (1, 2, 2), 32, 512),
    (64, True, False, 3, (2, 2, 1), 48, 512),
    (32, False, False, 9, (1, 4, 3), 32, 512),
    (128, False, True, 17, (2, 1, 2), 64, 512),
    # warps that do not divide the steps: 7 steps, 4 warps (warp 3's second step is past the end); 11 steps, 2 warps
    (64, False, True, 2, (1, 4, 2), 32, 448),
    (64, True, False, 5, (2, 2, 3), 48, 704),
    (64, False, False, 1, (1, 4, 4), 32, 448),  # four steps in flight, more than a warp has
]


@pytest.mark.skipif(not CPU, reason="CPU interpreter test")
@pytest.mark.parametrize("group,perm,bias,batch,launch,m,n", FRAG_CPU_CASES)
def test_uniform_int4_fragment_kernel_matches_reference_cpu(group, perm, bias, batch, launch, m, n, monkeypatch):
    """The int4 tensor-core kernel (mma and decode emulated lane by lane on the interpreter) on the
    layer in its fragment layout (`frag_run`), repacked one row tile at a time (the chunks a large
    layer is repacked in)."""
    monkeypatch.setattr(uf, "_CHUNK", 1)
    seed = group + batch + m
    p, _ = _layer(m, n, 4, group, perm=perm, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    b = torch.randn(m, generator=g).half() if bias else None
    x = torch.randn(batch, n, generator=g).half()
    rt, nw, pf = launch
    _check(x, p, b, uq.UQConfig("frag", row_tiles=rt, num_warps=nw, prefetch=pf), 2e-3)


@pytest.mark.skipif(not CPU, reason="CPU interpreter test")
@pytest.mark.parametrize("group,perm,m,row_tiles", [(128, False, 48, 2), (64, True, 32, 1), (32, False, 48, 4),
                                                    (96, False, 16, 1)])
def test_uniform_int4_fragment_layout_dequantizes_to_the_weight_cpu(group, perm, m, row_tiles):
    """Wᵀ from the fragment layout alone (its plain-PyTorch reference, and the Triton kernel on the
    interpreter; 2- and 4-tile steps, groups of 1–3 steps, programs with rows past the layer)
    equals the packed layer's weight in packed input order, exactly; the output is NaN-poisoned
    first."""
    p, _ = _layer(m, 384, 4, group, perm=perm, seed=m + group)
    fp = uf.repack_frag(p)
    want = uq.uniform_packed_dequant_reference(p)
    if perm:
        want = want[:, p.perm.long()]
    assert torch.equal(uf.frag_dequantize_t_reference(fp, torch.float32), want.T)
    out = torch.full((384, m), float("nan"))
    assert torch.equal(uf.frag_dequantize_t(fp, torch.float32, out=out, row_tiles=row_tiles), want.T)
    with pytest.raises(ValueError, match="power of two"):
        uf.frag_dequantize_t(fp, row_tiles=3)


def _gptq_layer(bits, act_order, in_features=256, out_features=64, seed=0):
    from lowbit.quantized_models.linear import linear_from_checkpoint
    from lowbit.quantized_models.synthetic import random_layer_tensors

    cfg, tensors = random_layer_tensors("gptq", bits, in_features, out_features, seed=seed, device="cpu")
    if act_order:
        g = torch.Generator().manual_seed(seed)
        tensors["g_idx"] = (torch.randperm(in_features, generator=g) // cfg["group_size"]).to(torch.int32)
        cfg = dict(cfg, desc_act=True)
    return linear_from_checkpoint("gptq", cfg, tensors, in_features, out_features, prefix="layer")


@pytest.mark.skipif(not CPU, reason="CPU interpreter test")
@pytest.mark.parametrize("act_order", [False, True])
def test_int4_layer_kept_in_the_fragment_layout_cpu(act_order, monkeypatch):
    """`use_fragment_layout` replaces a GPTQ int4 layer's packed codes by the fragment order: the
    same weight (exactly), no more bytes, the same outputs on the CPU path and through the
    fragment-layout launches on the interpreter (the tensor-core kernel at 1–17 rows and in 64-row
    chunks at 70, Wᵀ decoded for cuBLAS at 17); 3-bit layers and the packed view refuse or say why."""
    lin = _gptq_layer(4, act_order, seed=5)
    w, nbytes = lin.dequantize(), lin.storage_bytes
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 256, generator=g).half()
    y = lin(x)
    assert lin.use_fragment_layout() and lin.qweight is None and lin.fragment is not None
    assert lin.use_fragment_layout()  # a second call changes nothing
    assert torch.equal(lin.dequantize(), w) and lin.storage_bytes <= nbytes
    assert torch.equal(lin(x), y)  # CPU path: the weight decoded from the fragment layout
    with pytest.raises(RuntimeError, match="fragment layout"):
        _ = lin.packed
    fp = lin.fragment
    for batch, kind in ((1, "frag"), (3, "frag"), (17, "frag"), (17, "dequant"), (70, "frag")):  # 70: two launches
        xb = torch.randn(batch, 256, generator=g).half()
        cfg = uq.UQConfig(kind, row_tiles=1, num_warps=4, prefetch=1)
        out = torch.full((batch, 64), float("nan"), dtype=torch.float16 if kind == "frag" else torch.float32)
        got = uf.frag_run(xb if kind == "frag" else xb.float(), fp, None, cfg, out).double()
        ref = xb.double() @ w.double().T
        assert not torch.isnan(got).any() and float((got - ref).norm() / ref.norm()) < 2e-3
    assert {c.kind for c in uf.frag_configs(fp, 1, torch.float16)} == {"frag"}
    assert "dequant" in [c.kind for c in uf.frag_configs(fp, 16, torch.float16)]
    assert {c.kind for c in uf.frag_configs(fp, 2048, torch.float16)} == {"frag", "dequant"}
    assert [c.kind for c in uf.frag_configs(fp, 1, torch.bfloat16)] == ["dequant"]
    assert not _gptq_layer(3, False).use_fragment_layout()


@pytest.mark.skipif(not CPU, reason="CPU interpreter test")
def test_gptq_int4_model_in_the_fragment_layout_on_the_interpreter(monkeypatch):
    """A tiny GPTQ int4 model with every layer moved to the fragment layout gives the packed
    model's logits through `frag_linear` (the interpreter standing in for the GPU); the model-level
    switch leaves CPU models, other dtypes and LOWBIT_UNIFORM_FRAG=0 alone."""
    import copy

    from lowbit.quantized_models.synthetic import random_model
    from lowbit.quantized_models.uniform import UniformLinear, use_fragment_layouts

    model = random_model("tiny", "gptq4", device="cpu", dtype=torch.float16, seed=3)
    layers = [m for m in model.modules() if isinstance(m, UniformLinear)]
    assert layers and all(m.qweight is not None for m in layers)  # a CPU model kept the packed layout
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    want = copy.deepcopy(model).logits(ids).double()
    monkeypatch.setenv("LOWBIT_UNIFORM_FRAG", "0")
    assert use_fragment_layouts(model, torch.float16) == 0
    monkeypatch.delenv("LOWBIT_UNIFORM_FRAG")
    assert use_fragment_layouts(model, torch.bfloat16) == 0
    assert all(m.use_fragment_layout() for m in layers)
    monkeypatch.setattr(UniformLinear, "forward", lambda self, x: uf.frag_linear(x, self.fragment, self.bias))
    got = model.logits(ids).double()
    assert float((got - want).norm() / want.norm()) < 1e-2


@pytest.mark.gpu
def test_gptq_int4_model_in_the_fragment_layout_gpu(monkeypatch):
    """A CUDA fp16 GPTQ int4 model is built in the fragment layout (every layer) and gives the
    packed layout's logits (LOWBIT_UNIFORM_FRAG=0, same seed) at 1 row, 16 and a 100-token prompt."""
    from lowbit.quantized_models.synthetic import random_model
    from lowbit.quantized_models.uniform import UniformLinear

    if CPU:
        pytest.skip("needs CUDA")
    monkeypatch.setenv("LOWBIT_UNIFORM_FRAG", "0")
    packed = random_model("tiny", "gptq4", device="cuda", dtype=torch.float16, seed=3)
    monkeypatch.delenv("LOWBIT_UNIFORM_FRAG")
    frag = random_model("tiny", "gptq4", device="cuda", dtype=torch.float16, seed=3)
    layers = [m for m in frag.modules() if isinstance(m, UniformLinear)]
    assert layers and all(m.fragment is not None and m.qweight is None for m in layers)
    assert sum(m.storage_bytes for m in layers) <= sum(
        m.storage_bytes for m in packed.modules() if isinstance(m, UniformLinear))
    g = torch.Generator().manual_seed(0)
    for shape in ((1, 1), (16, 1), (1, 100)):
        ids = torch.randint(0, frag.config.vocab_size, shape, generator=g).cuda()
        want, got = packed.logits(ids).double(), frag.logits(ids).double()
        assert torch.isfinite(got).all() and float((got - want).norm() / want.norm()) < 1e-2, shape


def test_uniform_int4_fragment_layout_applies_only_where_it_can():
    """The tensor-core kernel's layout takes 4-bit codes with integer zeros 0..255 and says why not
    otherwise (refused with the reason, and a module keeps such a layer packed); a packed layer's
    tuner never offers the kernel and a packed layer refuses its launch (it reads the fragment layout),
    as a fragment-layout layer refuses a packed layer's."""
    p, _ = _layer(64, 512, 4, 128, seed=5)
    assert uf.frag_supported(p) == ""
    assert all(c.kind != "frag" for b in (1, 2, 16, 64) for c in uq.candidate_configs(p, b, torch.device("cpu")))
    with pytest.raises(ValueError, match="fragment layout"):
        uq.run_config(torch.randn(2, 512).half(), p, None, uq.UQConfig("frag"))
    for other in (_layer(64, 512, 3, 128, seed=5)[0], _layer(64, 512, 4, 128, zero_is_min=True, seed=5)[0]):
        assert "4-bit" in uf.frag_supported(other)
        with pytest.raises(ValueError, match="4-bit"):
            uf.repack_frag(other)
    # a zero fp16 cannot subtract exactly after 1024 + q (fractional), or one out of the kernel's range
    for zero in (7.5, 300.0, -1.0):
        p.zeros[0, 0] = zero
        assert "integers" in uf.frag_supported(p)
        with pytest.raises(ValueError, match="integers"):
            uf.repack_frag(p)
    lin = _gptq_layer(4, False, seed=5)
    lin.zeros[0, 0] = 300.0
    assert not lin.use_fragment_layout() and lin.qweight is not None and lin.fragment is None
    # the kernel itself takes ≤ 64 fp16 rows (`frag_run` cuts more into 64-row launches), warps a power of two
    fp = uf.repack_frag(_layer(64, 512, 4, 128, seed=6)[0])
    out = torch.empty(65, 64).half()
    for x, warps in ((torch.randn(65, 512).half(), 4), (torch.randn(2, 512), 4), (torch.randn(2, 512).half(), 3)):
        with pytest.raises(ValueError, match="int4 fragment kernel"):
            uf.uq_frag_matmul(x, fp, out[:x.shape[0]], num_warps=warps)
    with pytest.raises(ValueError, match="frag or dequant"):  # a packed layer's launch kind
        uf.frag_run(torch.randn(2, 512).half(), fp, None, uq.UQConfig("gemv"), out[:2])


GPU_SHAPES = [(1024, 4096), (4096, 11008)]
# (config, batch, also bf16): each config is one compile per format variant, shapes reuse it
GPU_RUNS = [
    (dict(kind="gemv", bk=16, bmw=32, bb=1, split_k=1), 1, True),
    (dict(kind="gemv", bk=32, bmw=16, bb=1, split_k=4), 3, False),
    (dict(kind="mma", bk=32, bmw=16, bb=16, split_k=1, num_stages=2), 16, True),
    (dict(kind="mma", bk=64, bmw=32, bb=64, split_k=2, num_stages=2), 50, False),
    (dict(kind="dequant"), 100, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group,zim,perm", [(4, 128, False, False), (2, 128, False, False),
                                                  (3, 128, False, True), (8, 32, False, False),
                                                  (4, 32, True, False), (4, 32, False, False)])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_uniform_kernels_match_reference_gpu(bits, group, zim, perm, shape):
    if CPU:
        pytest.skip("needs CUDA")
    m, n = shape
    p, _ = _layer(m, n, bits, group, zim, perm, device="cuda", seed=m + n + bits)
    bias = torch.randn(m, device="cuda").half()
    for cfg, batch, bf16 in GPU_RUNS:
        for dtype in (torch.float16, torch.bfloat16) if bf16 else (torch.float16,):
            x = torch.randn(batch, n, device="cuda").to(dtype)
            tol = 3e-3 if dtype == torch.float16 else 1.5e-2
            _check(x, p, bias.to(dtype), uq.UQConfig(**cfg), tol)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_uniform_int4_fragment_layout_dequantizes_to_the_weight_gpu(shape):
    """The fragment layout's dequant kernel at real shapes gives the packed layout's Wᵀ bit for bit."""
    if CPU:
        pytest.skip("needs CUDA")
    m, n = shape
    p, _ = _layer(m, n, 4, 128, device="cuda", seed=m)
    assert torch.equal(uf.frag_dequantize_t(uf.repack_frag(p)), uq.uniform_dequantize_t(p))


@pytest.mark.gpu
@pytest.mark.parametrize("group,perm", [(128, False), (32, False), (128, True)])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_uniform_int4_fragment_kernel_matches_reference_gpu(group, perm, shape):
    if CPU:
        pytest.skip("needs CUDA")
    m, n = shape
    p, _ = _layer(m, n, 4, group, perm=perm, device="cuda", seed=m + group)
    bias = torch.randn(m, device="cuda").half()
    # 8 and 16 warps leave a tail of steps at 11008 inputs, group 128 (172 steps)
    for batch, (rt, nw, pf) in ((1, (1, 4, 2)), (1, (1, 16, 2)), (3, (2, 4, 2)), (16, (1, 8, 3)), (64, (1, 4, 2))):
        x = torch.randn(batch, n, device="cuda").half()
        _check(x, p, bias if batch != 3 else None, uq.UQConfig("frag", row_tiles=rt, num_warps=nw, prefetch=pf), 3e-3)


@pytest.mark.gpu
def test_uniform_tuned_dispatch_gpu():
    if CPU:
        pytest.skip("needs CUDA")
    p, _ = _layer(4096, 4096, 4, 128, device="cuda", seed=3)
    for batch in (1, 16, 300):
        x = torch.randn(batch, 4096, device="cuda").half()
        out = torch.full((batch, 4096), float("nan"), dtype=x.dtype, device="cuda")
        uq.uniform_matmul(x, p, out=out)
        ref = uq.uniform_packed_matmul_reference(x.double(), p)
        assert not torch.isnan(out).any()
        assert ((out.double() - ref).norm() / ref.norm()) < 3e-3


# --- load-time repacking from the published formats, checked against packers written here from
# --- ../shared/specs/uniform.md with plain Python integers (independent of the repack code)


def _words_from_stream(values, bits):
    """Little-endian bitstream of `values` (each `bits` wide) → list of int32 words."""
    acc, pos = 0, 0
    for v in values:
        acc |= int(v) << pos
        pos += bits
    nwords = -(-pos // 32)
    out = [(acc >> (32 * i)) & 0xFFFFFFFF for i in range(nwords)]
    return [w - (1 << 32) if w >= (1 << 31) else w for w in out]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_repack_gptq_matches_spec(bits, act_order):
    g = torch.Generator().manual_seed(bits * 10 + act_order)
    m, n, gs = 32, 128, 32
    q = torch.randint(0, 2**bits, (m, n), generator=g)
    G = n // gs
    scales = (torch.rand(G, m, generator=g) + 0.5).half()
    zeros = torch.randint(1, 2**bits, (G, m), generator=g)
    if act_order:
        order = torch.randperm(n, generator=g)  # quantization order; groups follow it
        g_idx = torch.empty(n, dtype=torch.int32)
        g_idx[order] = (torch.arange(n) // gs).to(torch.int32)
    else:
        g_idx = (torch.arange(n) // gs).to(torch.int32)
    qweight = torch.tensor([_words_from_stream(q[j].tolist(), bits) for j in range(m)], dtype=torch.int32).T
    qzeros = torch.tensor([_words_from_stream((zeros[r] - 1).tolist(), bits) for r in range(G)], dtype=torch.int32)
    assert qweight.shape == (n * bits // 32, m) and qzeros.shape == (G, m * bits // 32)
    p = uq.repack_gptq(qweight.contiguous(), qzeros, scales, g_idx, bits, gs, "gptq")
    want = scales.float()[g_idx.long()].T * (q.float() - zeros.float()[g_idx.long()].T)
    assert torch.allclose(uq.uniform_packed_dequant_reference(p), want, rtol=0, atol=1e-6)


def test_repack_awq_matches_spec():
    g = torch.Generator().manual_seed(5)
    m, n, gs = 32, 64, 32
    order = (0, 2, 4, 6, 1, 3, 5, 7)
    q = torch.randint(0, 16, (n, m), generator=g)  # [in, out]
    z = torch.randint(0, 16, (n // gs, m), generator=g)
    scales = (torch.rand(n // gs, m, generator=g) + 0.5).half()

    def pack(rows):
        out = []
        for row in rows.tolist():
            words = []
            for w in range(m // 8):
                acc = sum(row[8 * w + order[p]] << (4 * p) for p in range(8))
                words.append(acc - (1 << 32) if acc >= (1 << 31) else acc)
            out.append(words)
        return torch.tensor(out, dtype=torch.int32)

    p = uq.repack_awq(pack(q), pack(z), scales, gs)
    grp = torch.arange(n) // gs
    want = (scales.float()[grp] * (q.float() - z.float()[grp])).T
    assert torch.allclose(uq.uniform_packed_dequant_reference(p), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_repack_gguf_matches_spec(kind):
    import struct

    g = torch.Generator().manual_seed(len(kind))
    m, n = 8, 64
    rows, want = [], torch.empty(m, n)
    for r in range(m):
        raw = b""
        for b in range(n // 32):
            d = float(torch.rand(1, generator=g)) * 0.1 + 0.01
            mn = float(torch.randn(1, generator=g)) * 0.1
            d16, mn16 = float(torch.tensor(d).half()), float(torch.tensor(mn).half())
            if kind == "Q8_0":
                qv = torch.randint(-128, 128, (32,), generator=g).tolist()
                raw += struct.pack("<e", d) + struct.pack("<32b", *qv)
                want[r, 32 * b:32 * b + 32] = torch.tensor(qv, dtype=torch.float32) * d16
            else:
                qv = torch.randint(0, 16, (32,), generator=g).tolist()
                packed = bytes(qv[i] | (qv[i + 16] << 4) for i in range(16))
                head = struct.pack("<e", d) + (struct.pack("<e", mn) if kind == "Q4_1" else b"")
                raw += head + packed
                qf = torch.tensor(qv, dtype=torch.float32)
                want[r, 32 * b:32 * b + 32] = qf * d16 + mn16 if kind == "Q4_1" else (qf - 8) * d16
        rows.append(list(raw))
    data = torch.tensor(rows, dtype=torch.uint8)
    p = uq.repack_gguf(data, kind)
    assert torch.allclose(uq.uniform_packed_dequant_reference(p), want, rtol=1e-6, atol=1e-6)


def test_int4_fragment_candidates_offer_warps_with_a_short_tail():
    """The tuner's launches: warps dividing the steps, plus 8 / 16 warps where they leave at most
    1/16 of the steps idle in the last round (4096×11008 at group 128: 172 steps)."""
    def launches(n, group, batch=1):
        return uf.frag_candidates(uf.UniformFrag(n, 16, group, uf.tiles_a_step(group), None, None), batch)
    assert launches(11008, 128) == [(1, 4, 2), (2, 4, 2), (1, 8, 2), (1, 16, 2)]
    assert launches(4096, 128, 32) == [(1, 4, 1), (1, 8, 1), (2, 4, 1), (1, 16, 1)]
    assert launches(448, 64) == [(1, 1, 2)]  # 7 steps: a tail would idle more than 1/16
