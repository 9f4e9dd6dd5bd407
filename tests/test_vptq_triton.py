"""VPTQ lookup kernels equal the official decode (golden fixtures) and the plain-PyTorch reference.

CPU: Triton interpreter on the golden fixture layers (fresh random activations each run) and on
small random layers. GPU (`-m gpu`): real shapes (v8-k65536 with and without residual, norm+perm,
outliers, several groups), every kernel kind, fp16/bf16. Outputs are NaN-poisoned before each run.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

triton = pytest.importorskip("triton")

from tests.conftest import fixture_dir, kernel_module  # noqa: E402

vq = kernel_module("lowbit.kernels.vptq_triton")
CPU = not torch.cuda.is_available()
DEV = "cpu" if CPU else "cuda"

FIXTURES = [
    "vptq_v8_k65536_packed", "vptq_v8_k65536_unpacked", "vptq_v8_k65536_r256_packed",
    "vptq_v8_k65536_r256_norm_perm_packed", "vptq_v8_k65536_groups2_packed",
    "vptq_v8_k65536_outlier_packed", "vptq_v6_k4096_out250_packed",
]


def _fixture(name):
    from safetensors import safe_open

    path = fixture_dir("vptq") / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["config"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    return meta, t


def _check(x, p, bias, cfg, W, tol):
    """Kernel vs float64 product with the given effective weight W [m, n]."""
    out = torch.full((x.shape[0], p.out_features), float("nan"), dtype=x.dtype, device=x.device)
    vq.vptq_matmul(x, p, bias, config=cfg, out=out)
    ref = x.double() @ W.double().to(x.device).T
    if bias is not None:
        ref = ref + bias.double()
    assert not torch.isnan(out).any(), f"{cfg}: unwritten (NaN) outputs"
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < tol, f"{cfg}: relative error {err:.2e}"


@pytest.mark.parametrize("name", FIXTURES)
def test_reference_equals_official_decode(name):
    meta, t = _fixture(name)
    p = vq.pack_vptq(meta["layer_config"], t, meta["in_features"], meta["out_features"])
    assert torch.equal(vq.vptq_dequant_reference(p), t["expected_W"])


CPU_CFGS = {
    "gemv": dict(kind="gemv", br=8, bc=64, split_k=2),
    "mma": dict(kind="mma", br=4, bc=32, bb=16, split_k=1),
    "dequant": dict(kind="dequant"),
}


@pytest.mark.skipif(not CPU, reason="CPU interpreter test")
@pytest.mark.parametrize("name", FIXTURES)
def test_kernels_match_official_cpu(name):
    meta, t = _fixture(name)
    p = vq.pack_vptq(meta["layer_config"], t, meta["in_features"], meta["out_features"])
    g = torch.Generator().manual_seed(hash(name) % 1000)
    # every fixture through the GEMV; dequant and tensor-core paths on a few (the random-layer test
    # below covers them with residual, outliers, norm and perm)
    kinds = ["gemv"] + (["dequant"] if "k65536_packed" in name or "norm_perm" in name else []) + (
        ["mma"] if name == "vptq_v6_k4096_out250_packed" else [])
    for kind in kinds:
        batch = 2 if kind == "gemv" else 3
        x = torch.randn(batch, meta["in_features"], generator=g)
        _check(x, p, None, vq.VQConfig(**CPU_CFGS[kind]), t["expected_W"], 1e-5)


def random_layer(m, n, v=8, k=65536, k_r=0, group_num=1, outlier=0, v_o=8, k_o=4096, norm=False,
                 perm=False, packed=True, device="cpu", seed=0):
    """A random but valid checkpoint layer (tensors named as on the Hub) and its config entry."""
    g = torch.Generator().manual_seed(seed)
    N = -(-m // v)
    gs = (n - outlier) // group_num
    cfg = dict(vector_lens=[v_o if outlier else -1, v], num_centroids=[k_o if outlier else -1, k],
               num_res_centroids=[-1, k_r if k_r else -1], group_num=group_num, group_size=gs,
               outlier_size=outlier, indices_as_float=False, enable_norm=norm, enable_perm=perm,
               is_indice_packed=packed, bias=False)
    t = {"centroids.weight": (torch.randn(group_num, k * v, generator=g) * 0.02).half()}
    idx = torch.randint(0, k, (group_num, N, gs), generator=g)
    ridx = torch.randint(0, max(k_r, 1), (group_num, N, gs), generator=g)
    if k_r:
        t["res_centroids.weight"] = (torch.randn(group_num, k_r * v, generator=g) * 0.005).half()
    bits = int(math.log2(k)) + (int(math.log2(k_r)) if k_r else 0)
    if packed:
        fields = idx | (ridx << int(math.log2(k))) if k_r else idx
        t["indices"] = vq._pack_fields(fields.reshape(group_num * N, gs), bits).reshape(group_num, N, -1)
    else:
        t["indices"] = idx.to(torch.int16)  # uint16 bit patterns
        if k_r:
            t["res_indices"] = ridx.to(torch.int16)
    if outlier:
        t["outlier_centroids.weight"] = (torch.randn(1, k_o * v_o, generator=g) * 0.05).half()
        t["outlier_indices"] = torch.randint(0, k_o, (1, -(-m // v_o), outlier), generator=g).to(torch.int16)
    if perm:
        t["perm"] = torch.randperm(n, generator=g).to(torch.int16)
    if norm:
        t["weight_scale"] = (torch.rand(n, generator=g) + 0.5).half()
        t["weight_bias"] = (torch.randn(n, generator=g) * 0.01).half()
    t = {k_: x.to(device) for k_, x in t.items()}
    return cfg, t


SMALL = [
    # m, n, layer kwargs
    (40, 96, dict(v=8, k=256)),
    (30, 80, dict(v=6, k=512, k_r=16, norm=True, perm=True, packed=False)),
    (48, 128, dict(v=8, k=1024, group_num=2, outlier=16, v_o=4, k_o=64, perm=True)),
    (64, 64, dict(v=16, k=128, k_r=4, norm=True)),
]


@pytest.mark.skipif(not CPU, reason="CPU interpreter test")
@pytest.mark.parametrize("m,n,kw", SMALL)
def test_kernels_match_reference_random_layers_cpu(m, n, kw):
    cfg, t = random_layer(m, n, seed=m * n, **kw)
    p = vq.pack_vptq(cfg, t, n, m)
    W = vq.vptq_dequant_reference(p)
    g = torch.Generator().manual_seed(m + n)
    bias = torch.randn(m, generator=g)
    for c in (dict(kind="gemv", br=4, bc=32, split_k=2), dict(kind="mma", br=4, bc=16, bb=16, split_k=2),
              dict(kind="dequant")):
        x = torch.randn(3, n, generator=g)
        _check(x, p, bias, vq.VQConfig(**c), W, 1e-5)
    x = torch.randn(2, n, generator=g).half()
    _check(x, p, bias.half(), vq.VQConfig("gemv", br=8, bc=32), W, 2e-3)


GPU_LAYERS = [
    (4096, 4096, dict()),  # v8-k65536 (2 bits): the headline case
    (11008, 4096, dict(k_r=256)),  # v8-k65536-256 (3 bits)
    (4096, 11008, dict(k_r=256, norm=True, perm=True)),
    (1024, 4096, dict(group_num=2, outlier=128, norm=True, perm=True)),
    (250, 512, dict(v=6, k=4096)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,kw", GPU_LAYERS)
def test_kernels_match_reference_gpu(m, n, kw):
    if CPU:
        pytest.skip("needs CUDA")
    cfg, t = random_layer(m, n, seed=m + n, device="cuda", **kw)
    p = vq.pack_vptq(cfg, t, n, m)
    W = vq.vptq_dequant_reference(p)
    bias = torch.randn(m, device="cuda")
    configs = [  # (config, batch, also bf16)
        (vq.VQConfig("gemv", br=16, bc=64, split_k=1), 1, True),
        (vq.VQConfig("gemv", br=8, bc=128, split_k=4), 3, False),
        (vq.VQConfig("mma", br=8, bc=64, bb=16, split_k=2, num_stages=2), 16, True),
        (vq.VQConfig("mma", br=16, bc=64, bb=64, split_k=1, num_stages=2), 40, False),
        (vq.VQConfig("dequant"), 70, False),
    ]
    for c, batch, bf16 in configs:
        for dtype in (torch.float16, torch.bfloat16) if bf16 else (torch.float16,):
            x = torch.randn(batch, n, device="cuda").to(dtype)
            _check(x, p, bias.to(dtype), c, W, 3e-3 if dtype == torch.float16 else 1.5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", FIXTURES)
def test_kernels_match_official_gpu(name, monkeypatch):
    if CPU:
        pytest.skip("needs CUDA")
    monkeypatch.setenv("LOWBIT_AUTOTUNE", "0")  # heuristic dispatch here; tuning: test below
    meta, t = _fixture(name)
    p = vq.pack_vptq(meta["layer_config"], {k: v.cuda() for k, v in t.items()}, meta["in_features"],
                     meta["out_features"])
    for batch in (1, 16):  # GEMV and tensor-core paths (the layer test covers dequant)
        x = torch.randn(batch, meta["in_features"], device="cuda").half()
        out = torch.full((batch, meta["out_features"]), float("nan"), dtype=x.dtype, device="cuda")
        vq.vptq_matmul(x, p, out=out)  # tuned dispatch
        ref = x.double() @ t["expected_W"].double().cuda().T
        assert not torch.isnan(out).any()
        assert ((out.double() - ref).norm() / ref.norm()) < 3e-3


@pytest.mark.gpu
def test_tuned_dispatch_gpu():
    if CPU:
        pytest.skip("needs CUDA")
    cfg, t = random_layer(4096, 4096, seed=5, device="cuda")
    p = vq.pack_vptq(cfg, t, 4096, 4096)
    W = vq.vptq_dequant_reference(p)
    x = torch.randn(1, 4096, device="cuda").half()
    _check(x, p, None, None, W, 3e-3)
