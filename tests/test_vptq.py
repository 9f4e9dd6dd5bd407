"""VPTQ: layers against the official implementation's golden fixtures, the bitstream, agreement with
the Triton kernels' packer and reference, checkpoint validation, storage, config.json handling, and a
whole VPTQ Llama against transformers."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
from safetensors import safe_open

import lowbit
from lowbit.kernels.vptq import (
    LAYER_CONFIG_KEYS,
    VPTQParams,
    pack_indices_reference,
    random_vptq_layer,
    unpack_fields_reference,
    vptq_dequantize_reference,
    vptq_forward_reference,
)
from lowbit.quantized_models import CheckpointError, linear_from_checkpoint
from lowbit.quantized_models.dense import DenseLinear
from lowbit.quantized_models.vptq import UnlistedModule, VPTQLinear
from tests.conftest import fixture_dir
from tests.vptq_checkpoint import LAYER_OPTIONS, LLAMA, dense_llama, projections, write_vptq_llama

FIXTURES = [
    "vptq_v6_k4096_out250_packed", "vptq_v8_k65536_groups2_packed", "vptq_v8_k65536_outlier_packed",
    "vptq_v8_k65536_packed", "vptq_v8_k65536_r256_norm_perm_packed", "vptq_v8_k65536_r256_packed",
    "vptq_v8_k65536_unpacked",
]
PREFIX = "model.layers.2.mlp.up_proj"


def load_fixture(name: str):
    with safe_open(str(fixture_dir("vptq") / f"{name}.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["config"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    layer = {k: v for k, v in t.items() if k not in ("expected_W", "expected_y", "x")}
    return meta, t, layer


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def build(cfg, tensors, n, m, prefix=PREFIX):
    return linear_from_checkpoint("vptq", cfg, tensors, n, m, prefix=prefix)


# ----- golden fixtures ------------------------------------------------------------------------------

def test_fixture_set_is_complete():
    have = sorted(p.stem for p in fixture_dir("vptq").glob("vptq_*.safetensors"))
    assert have == sorted(FIXTURES)


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_dequantize_and_forward(name):
    meta, t, layer = load_fixture(name)
    cfg = meta["layer_config"]
    lin = build(cfg, layer, meta["in_features"], meta["out_features"])
    d = lin.describe()
    assert (d["v"], d["k"], d["groups"], d["outliers"]) == (
        cfg["vector_lens"][1], cfg["num_centroids"][1], cfg["group_num"], cfg["outlier_size"])
    assert d["k_res"] == max(cfg["num_res_centroids"][1], 0)
    assert (d["norm"], d["perm"]) == (cfg["enable_norm"], cfg["enable_perm"])

    W = lin.dequantize()
    assert W.dtype == torch.float32 and torch.equal(W, t["expected_W"])  # a lookup: bit-exact

    y = lin(t["x"])
    assert y.dtype == torch.float32 and max_rel(y, t["expected_y"]) <= 1e-3
    y16 = lin(t["x"].half()[None])  # leading dims pass through, dtype follows x
    assert y16.shape == (1, *t["expected_y"].shape) and y16.dtype == torch.float16
    assert max_rel(y16[0], t["expected_y"]) <= 1e-2


@pytest.mark.parametrize("name", FIXTURES)
def test_reference_reads_checkpoint_tensors(name):
    # The oracle on the tensors exactly as stored, and the bitstream back to the stored words.
    meta, t, layer = load_fixture(name)
    p = VPTQParams.from_layer_config(meta["layer_config"], meta["in_features"], meta["out_features"])
    assert torch.equal(vptq_dequantize_reference(p, layer), t["expected_W"])
    assert max_rel(vptq_forward_reference(t["x"], p, layer), t["expected_y"]) <= 1e-3
    if p.is_indice_packed:
        fields = unpack_fields_reference(layer["indices"], p.field_bits, p.group_size)
        main, res = fields & (p.num_centroids - 1), (fields >> p.index_bits if p.has_residual else None)
        assert torch.equal(pack_indices_reference(main, p.index_bits, res, p.res_index_bits), layer["indices"])


@pytest.mark.parametrize("name", FIXTURES)
def test_random_layers_have_the_published_layout(name):
    # Same options as a fixture (made by the official layer) -> same config keys, tensor names,
    # dtypes and shapes.
    meta, _, layer = load_fixture(name)
    cfg = meta["layer_config"]
    ours, tensors = random_vptq_layer(
        meta["in_features"], meta["out_features"], vector_len=cfg["vector_lens"][1],
        num_centroids=cfg["num_centroids"][1], num_res_centroids=cfg["num_res_centroids"][1],
        outliers=cfg["outlier_size"], outlier_vector_len=cfg["vector_lens"][0],
        outlier_centroids=cfg["num_centroids"][0], groups=cfg["group_num"], perm=cfg["enable_perm"],
        norm=cfg["enable_norm"], packed=cfg["is_indice_packed"], generator=torch.Generator().manual_seed(3))
    assert ours == cfg
    assert {k: (v.dtype, v.shape) for k, v in tensors.items()} == {k: (v.dtype, v.shape) for k, v in layer.items()}


# ----- bitstream ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 3, 8, 12, 16, 17, 20, 24, 31, 32])
def test_bitstream_matches_its_definition(bits):
    g = torch.Generator().manual_seed(bits)
    fields = torch.randint(0, 1 << bits, (3, 37), generator=g, dtype=torch.int64)
    words = pack_indices_reference(fields, bits)
    assert words.dtype == torch.int32 and words.shape == (3, math.ceil(37 * bits / 32))
    # stream bit b is bit b % 32 of word b // 32; field j occupies bits j*bits .. j*bits + bits - 1
    stream = ((words.long()[..., None] >> torch.arange(32)) & 1).reshape(3, -1)
    for j in (0, 1, 17, 36):
        want = sum(int(stream[1, j * bits + i]) << i for i in range(bits))
        assert want == int(fields[1, j])
    assert int(stream[:, 37 * bits:].sum()) == 0  # padding bits are zero
    assert torch.equal(unpack_fields_reference(words, bits, 37), fields)


def test_residual_index_sits_above_the_main_index():
    main = torch.tensor([[5, 65535, 0]])
    res = torch.tensor([[255, 1, 7]])
    fields = unpack_fields_reference(pack_indices_reference(main, 16, res, 8), 24, 3)
    assert fields.tolist() == [[5 | 255 << 16, 65535 | 1 << 16, 7 << 16]]


def test_unpacked_float_and_packed_checkpoints_decode_alike():
    opts = dict(vector_len=8, num_centroids=4096, num_res_centroids=256, outliers=16, outlier_centroids=256,
                norm=True, perm=True)
    cfg_p, packed = random_vptq_layer(80, 60, packed=True, generator=torch.Generator().manual_seed(1), **opts)
    cfg_u, unpacked = random_vptq_layer(80, 60, packed=False, generator=torch.Generator().manual_seed(1), **opts)
    assert unpacked["perm"].dtype == torch.int64 and packed["perm"].dtype == torch.int16
    W = build(cfg_p, packed, 80, 60).dequantize()
    lin_u = build(cfg_u, unpacked, 80, 60)
    assert torch.equal(lin_u.dequantize(), W)
    assert torch.equal(lin_u.indices, packed["indices"])  # packed at load into the published form
    legacy = dict(unpacked, indices=unpacked["indices"].view(torch.float16),
                  res_indices=unpacked["res_indices"].view(torch.float16),
                  outlier_indices=unpacked["outlier_indices"].view(torch.float16))
    assert torch.equal(build(cfg_u | {"indices_as_float": True}, legacy, 80, 60).dequantize(), W)


# ----- against the Triton kernels' packer and reference ---------------------------------------------

RANDOM_LAYERS = {
    "v8_k65536": (512, 200, dict()),
    "v8_k4096_r256_norm_perm_bias": (256, 100, dict(num_centroids=4096, num_res_centroids=256, norm=True,
                                                     perm=True, bias=True)),
    "v6_groups4_outliers": (264, 90, dict(vector_len=6, num_centroids=1024, groups=4, outliers=8,
                                          outlier_vector_len=4, outlier_centroids=64)),
    "v12_unpacked_r16": (96, 130, dict(vector_len=12, num_centroids=512, num_res_centroids=16, packed=False,
                                       perm=True)),
    "v16_k256_norm": (64, 64, dict(vector_len=16, num_centroids=256, norm=True)),
}


def _triton_kernels():
    """lowbit.kernels.vptq_triton as currently imported (another test module may have reloaded it)."""
    return importlib.import_module("lowbit.kernels.vptq_triton")


@pytest.mark.parametrize("case", sorted(RANDOM_LAYERS))
def test_layer_equals_vptq_triton_pack_and_reference(case):
    vq = _triton_kernels()
    n, m, opts = RANDOM_LAYERS[case]
    g = torch.Generator().manual_seed(len(case))
    cfg, tensors = random_vptq_layer(n, m, generator=g, **opts)
    lin = build(cfg, tensors, n, m)
    packed = vq.pack_vptq(cfg, tensors, n, m)
    assert torch.equal(lin.dequantize(), vq.vptq_dequant_reference(packed))
    x = torch.randn(5, n, generator=g)
    want = vq.vptq_matmul_reference(x, packed, tensors.get("bias"))
    assert max_rel(lin(x), want) <= 1e-6
    # the kernels read the layer's buffers: the same layout the packer makes from the checkpoint
    layout = lin.kernel_layout()
    for field in packed.__dataclass_fields__:
        a, b = getattr(layout, field), getattr(packed, field)
        assert (torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b), field


def test_kernel_runs_on_the_layer_buffers():
    # The CUDA path's call, interpreted on the CPU: vptq_matmul on kernel_layout() with the bias.
    vq = _triton_kernels()
    g = torch.Generator().manual_seed(5)
    cfg, tensors = random_vptq_layer(72, 40, num_centroids=256, num_res_centroids=16, outliers=8,
                                     outlier_centroids=32, norm=True, perm=True, bias=True, generator=g)
    lin = build(cfg, tensors, 72, 40)
    x = torch.randn(2, 72, generator=g)
    y = vq.vptq_matmul(x, lin.kernel_layout(), lin.bias, config=vq.VQConfig("gemv", br=4, bc=32, split_k=1))
    assert max_rel(y, lin(x)) <= 1e-5


# ----- validation -----------------------------------------------------------------------------------

def small_layer(**opts):
    base = dict(vector_len=8, num_centroids=4096, num_res_centroids=256, outliers=16, outlier_centroids=256,
                norm=True, perm=True, packed=False)
    return random_vptq_layer(80, 64, generator=torch.Generator().manual_seed(2), **(base | opts))


def _set(t: torch.Tensor, value: int) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[7] = value
    return t


@pytest.mark.parametrize("change, message", [
    (lambda c, t: t.update(indices=_set(t["indices"], 5000)),
     r"up_proj\.indices holds index 5000, outside the codebook of num_centroids\[1\] = 4096 entries"),
    (lambda c, t: t.update(indices=_set(t["indices"], -1)),  # uint16 65535
     r"up_proj\.indices holds index 65535, outside the codebook"),
    (lambda c, t: t.update(res_indices=_set(t["res_indices"], 256)),
     r"up_proj\.res_indices holds index 256, outside the codebook of num_res_centroids\[1\] = 256"),
    (lambda c, t: t.update(outlier_indices=_set(t["outlier_indices"], 300)),
     r"up_proj\.outlier_indices holds index 300, outside the codebook of num_centroids\[0\] = 256"),
    (lambda c, t: t.update(indices=t["indices"][:, :, :-1]),
     r"up_proj\.indices has shape \[1, 8, 63\], expected \[group_num, ceil\(out_features/v\), group_size\]"),
    (lambda c, t: t.update(indices=t["indices"].int()), r"up_proj\.indices has dtype int32, expected int16 "
                                                        r"\(is_indice_packed is false\)"),
    (lambda c, t: t.pop("res_centroids.weight"), r"missing tensor model\.layers\.2\.mlp\.up_proj\.res_centroids"),
    (lambda c, t: t.pop("res_indices"), r"missing tensor model\.layers\.2\.mlp\.up_proj\.res_indices"),
    (lambda c, t: t.update({"centroids.weight": t["centroids.weight"][:, :-8]}),
     r"up_proj\.centroids\.weight has shape \[1, 32760\], expected \[1, 32768\]"),
    (lambda c, t: t.update(perm=_set(t["perm"], 0)), r"up_proj\.perm is not a permutation of 0\.\.79"),
    (lambda c, t: t.update(weight_scale=t["weight_scale"][:64]), r"up_proj\.weight_scale has shape \[64\], "
                                                                 r"expected \[80\]"),
    (lambda c, t: t.update(scales=torch.ones(3)), r"unexpected tensor\(s\) model\.layers\.2\.mlp\.up_proj\.scales"),
    (lambda c, t: t.update(bias=torch.zeros(64, dtype=torch.float16)),
     r"unexpected tensor model\.layers\.2\.mlp\.up_proj\.bias: the layer config says bias: false"),
    (lambda c, t: c.update(bias=True), r"missing tensor model\.layers\.2\.mlp\.up_proj\.bias \(the layer config"),
])
def test_bad_tensors_name_the_tensor(change, message):
    cfg, t = small_layer()
    change(cfg, t)
    with pytest.raises(CheckpointError, match=message):
        build(cfg, t, 80, 64)


def test_wrong_packed_length_is_explained():
    cfg, t = small_layer(packed=True)
    short = t["indices"][:, :, :-1]
    with pytest.raises(CheckpointError, match=r"up_proj\.indices has shape \[1, 8, 39\], expected \[group_num, "
                                              r"ceil\(out_features/v\), ceil\(group_size\*bits/32\)\] = "
                                              r"\[1, 8, 40\]: 64 packed fields of 20 bits \(log2 4096 \+ log2 256\)"):
        build(cfg, t | {"indices": short}, 80, 64)
    with pytest.raises(CheckpointError, match=r"indices has dtype int16, expected int32 \(is_indice_packed is true"):
        build(cfg, t | {"indices": t["indices"].view(torch.int16)[..., :40]}, 80, 64)


@pytest.mark.parametrize("change, message", [
    ({"foo": 1}, r"up_proj: bad VPTQ layer config \(config_for_layers entry\): unknown option\(s\) 'foo'"),
    ({"vector_quant_dim": "in"}, r"vector_quant_dim 'in' is not supported"),
    ({"in_features": 96}, r"in_features is 96 but the model's layer has in_features = 80"),
    ({"group_size": 60}, r"1 \* 60 \+ 16 must equal in_features = 80"),
    ({"num_centroids": [256, 3000]}, r"num_centroids\[1\] must be a power of two >= 2, got 3000"),
    ({"num_centroids": [256]}, r"num_centroids must be a list of two integers"),
    ({"num_res_centroids": [16, 256]}, r"residual codebook for outliers is not part of the format"),
    ({"vector_lens": [-1, 8]}, r"outlier_size is 16 but vector_lens\[0\] = -1 and num_centroids\[0\] = 256 turn "
                               r"outliers off"),
    ({"enable_norm": "yes"}, r"enable_norm must be true or false"),
    ({"group_num": None}, r"group_num must be an integer"),
])
def test_bad_configs_are_named(change, message):
    cfg, t = small_layer()
    with pytest.raises(CheckpointError, match=message):
        build(cfg | change, t, 80, 64)


def test_missing_config_is_named():
    cfg, t = small_layer()
    with pytest.raises(CheckpointError, match=r"up_proj: a VPTQ layer needs its quantization_config\."
                                              r"config_for_layers entry"):
        build(None, t, 80, 64)
    missing = {k: v for k, v in cfg.items() if k != "group_size"}
    with pytest.raises(CheckpointError, match=r"missing option\(s\) 'group_size'"):
        build(missing, t, 80, 64)


# ----- storage --------------------------------------------------------------------------------------

@pytest.mark.parametrize("k_r, packed", [(0, True), (256, True), (256, False)], ids=["v8-k65536-0", "v8-k65536-256",
                                                                                     "unpacked"])
def test_storage_is_indices_codebooks_and_norms(k_r, packed):
    m, n = 1024, 4096
    cfg, t = random_vptq_layer(n, m, num_res_centroids=k_r, norm=True, packed=packed,
                               generator=torch.Generator().manual_seed(k_r))
    lin = build(cfg, t, n, m)
    bits = 16 + (8 if k_r else 0)
    index_bytes = (m // 8) * (n * bits // 32) * 4
    codebook_bytes = 65536 * 8 * 2 + k_r * 8 * 2
    norm_bytes = 2 * n * 2
    assert lin.storage_bytes == index_bytes + codebook_bytes + norm_bytes
    index_bpw = bits / 8  # 2.0 for v8-k65536-0, 3.0 for v8-k65536-256 (the Hub names)
    assert lin.bits_per_weight == pytest.approx(index_bpw + 8 * (codebook_bytes + norm_bytes) / (m * n))
    assert lin.bits_per_weight < index_bpw + 2.05  # the 1 MiB codebook: 2 bits here, 0.5 at 4096x4096
    assert {name for name, _ in lin.named_buffers()} == {"indices", "centroids", "weight_scale", "weight_bias"} | (
        {"res_centroids"} if k_r else set())
    lin(torch.randn(1, n))  # the dense W the CPU path caches is not storage
    assert lin.storage_bytes == index_bytes + codebook_bytes + norm_bytes


# ----- config.json ------------------------------------------------------------------------------------

def test_layer_config_follows_quantization_config():
    q_entry, _ = small_layer()
    up_entry, _ = small_layer(num_res_centroids=0)
    hf = {"quantization_config": {
        "quant_method": "vptq", "config_for_layers": {"model.layers.0.self_attn.q_proj": q_entry},
        "shared_layer_config": {"up_proj": up_entry}, "modules_to_not_convert": ["lm_head", "model.layers.1.mlp"]}}
    assert VPTQLinear.matches(hf) and not VPTQLinear.matches({"quantization_config": {"quant_method": "gptq"}})
    assert VPTQLinear.layer_config(hf, "model.layers.0.self_attn.q_proj") is q_entry  # exactly as written
    assert VPTQLinear.layer_config(hf, "model.layers.0.mlp.up_proj") is up_entry
    assert VPTQLinear.layer_config(hf, "model.layers.1.mlp.up_proj") is None  # not converted
    assert VPTQLinear.layer_config(hf, "model.layers.11.mlp.up_proj") is up_entry  # "layers.1" ends at a dot
    assert VPTQLinear.layer_config(hf, "lm_head") is None
    unlisted = VPTQLinear.layer_config(hf, "model.layers.0.self_attn.k_proj")
    assert isinstance(unlisted, UnlistedModule) and unlisted.module_name == "model.layers.0.self_attn.k_proj"
    with pytest.raises(CheckpointError, match=r"quantization_config\.config_for_layers must be an object"):
        VPTQLinear.layer_config({"quantization_config": {"quant_method": "vptq", "config_for_layers": [1]}}, "x")
    with pytest.raises(CheckpointError, match=r"modules_to_not_convert must be a list"):
        VPTQLinear.layer_config({"quantization_config": {"quant_method": "vptq", "modules_to_not_convert": "x"}}, "x")


def test_unlisted_module_loads_dense_or_fails_naming_it():
    name = "model.layers.0.self_attn.k_proj"
    w = torch.randn(64, 80, dtype=torch.float16)
    lin = build(UnlistedModule(name), {"weight": w}, 80, 64, prefix=name)
    assert isinstance(lin, DenseLinear) and torch.equal(lin.dequantize(), w.float())
    _, t = small_layer()
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj: config\.json "
                                              r"quantization_config\.config_for_layers has no entry for this module "
                                              r"\(and shared_layer_config none for 'k_proj'\), but the checkpoint "
                                              r"stores it as VPTQ tensors \(centroids\.weight, indices"):
        build(UnlistedModule(name), t, 80, 64, prefix=name)


# ----- whole model ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_vptq(tmp_path_factory):
    path = tmp_path_factory.mktemp("vptq_llama")
    return path, write_vptq_llama(path)


def test_vptq_llama_matches_dense_transformers(tiny_vptq):
    path, cfg = tiny_vptq
    model = lowbit.load_model(path, device="cpu", dtype=torch.float32)
    assert model.fmt == "vptq"
    layer0 = model.layers[0]
    assert all(isinstance(getattr(layer0.self_attn, p), VPTQLinear) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert isinstance(model.layers[1].mlp.down_proj, DenseLinear)  # modules_to_not_convert
    assert layer0.mlp.up_proj.describe()["v"] == 12  # from shared_layer_config
    assert layer0.self_attn.v_proj.describe()["outliers"] == 32

    # compressed: each VPTQ layer holds its packed indices, codebooks and norms, nothing dense
    for name, lin in model.quant_linears():
        if isinstance(lin, VPTQLinear):
            proj = name.split(".", 2)[2]
            m, n = projections(LLAMA)[proj]
            p = lin.params
            budget = (p.group_num * p.n_vectors * p.packed_words * 4
                      + 2 * p.group_num * (p.num_centroids + p.num_res_centroids) * p.vector_len
                      + 2 * p.outlier_centroids * p.outlier_vector_len + 2 * p.n_outlier_vectors * p.outlier_size
                      + 4 * n * p.enable_perm + 4 * n * p.enable_norm)
            assert lin.storage_bytes == budget, name
            assert lin.bits_per_weight == pytest.approx(8 * budget / (m * n))

    hf = dense_llama(path)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
    got = model.logits(ids)
    assert got.shape == want.shape
    assert float((got.double() - want.double()).norm() / want.double().norm()) <= 1e-4


def test_inspect_shows_layer_settings_and_bpw(tiny_vptq, capsys):
    from lowbit.cli import main

    path, _ = tiny_vptq
    assert main(["inspect", str(path), "--layers", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "format                   vptq" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    k_proj = lines["layers.0.self_attn.k_proj"]
    assert " vptq " in k_proj and "bpw=71.500" in k_proj
    assert "'v': 8, 'k': 4096, 'k_res': 256, 'index_bits': 20" in k_proj and "'perm': True" in k_proj
    assert "'indices': 'unpacked (packed at load)'" in lines["layers.0.mlp.gate_proj"]
    assert " dense " in lines["layers.1.mlp.down_proj"]


def test_missing_layer_entry_fails_naming_the_module(tmp_path):
    cfg = write_vptq_llama(tmp_path)
    del cfg["quantization_config"]["config_for_layers"]["model.layers.1.self_attn.o_proj"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.o_proj: config\.json "
                                              r"quantization_config\.config_for_layers has no entry"):
        lowbit.load_model(tmp_path, device="cpu", dtype=torch.float32)


def test_layer_options_cover_every_published_option():
    used = {k for opts in LAYER_OPTIONS.values() for k in opts}
    assert {"num_res_centroids", "outliers", "groups", "perm", "norm", "packed"} <= used
    assert {opts.get("vector_len") for opts in LAYER_OPTIONS.values()} >= {6, 8, 12}
    assert set(random_vptq_layer(16, 16, num_centroids=16)[0]) < set(LAYER_CONFIG_KEYS)
