"""Uniform low-bit layers (GPTQ, AWQ, GGUF Q4_0/Q4_1/Q8_0) against the published layouts.

Layers are packed by lowbit/kernels/uniform.py's packers (written from AutoGPTQ's, AutoAWQ's and
gguf-py's descriptions; GGUF blocks come from gguf-py itself) and must decode, through UniformLinear's
load-time repack, to exactly what the plain-PyTorch oracle reads from the checkpoint tensors. The
default SmolLM2 model's logits against transformers are checked in tests/test_model.py
(test_smollm2_gguf_matches_transformers, on the same session fixture, now served natively); here
its layers are checked bit for bit against gguf-py and for their storage.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.kernels import uniform as ref
from lowbit.kernels import uniform_triton as ut
from lowbit.quantized_models import CheckpointError, linear_from_checkpoint
from lowbit.quantized_models.uniform import AWQLinear, GGUFLinear, GPTQLinear
from tests.uniform_checkpoint import make_quantized_checkpoint

gguf = pytest.importorskip("gguf")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_same_packed(a: ut.UniformPacked, b: ut.UniformPacked) -> None:
    assert (a.bits, a.group_size, a.zero_is_min) == (b.bits, b.group_size, b.zero_is_min)
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


# ---- the packers follow the published bit layouts ----------------------------------------------

def test_gptq_3bit_words_follow_autogptq_layout():
    # AutoGPTQ packs 32 inputs into 3 words: inputs 0-9 at bits 3k, input 10 split (low 2 bits at
    # 30-31 of word 0, high bit at bit 0 of word 1), 11-20 at 3(k-11)+1, input 21 split (low bit at
    # 31 of word 1, high 2 bits at 0-1 of word 2), 22-31 at 3(k-22)+2.
    q = torch.zeros(32, 1, dtype=torch.int64)
    q[10], q[21], q[0], q[11], q[31] = 0b101, 0b110, 0b011, 0b111, 0b100
    words = ref.pack_bitstream(q, 3, dim=0)[:, 0].to(torch.int64) & 0xFFFFFFFF
    w0 = 0b011 | (0b01 << 30)
    w1 = 0b1 | (0b111 << 1) | (0b0 << 31)
    w2 = 0b11 | (0b100 << (3 * 9 + 2))
    assert words.tolist() == [w0, w1, w2]
    assert torch.equal(ref.unpack_bitstream(words.to(torch.int32)[:, None], 3, 32, dim=0), q)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_whole_word_layout(bits):
    per = 32 // bits
    q = (torch.arange(per) % (2**bits))[:, None]
    word = int(ref.pack_bitstream(q, bits, dim=0)[0, 0]) & 0xFFFFFFFF
    assert word == sum(int(v) << (bits * k) for k, v in enumerate(q[:, 0]))  # first input lowest


def test_awq_nibble_order():
    # AutoAWQ: nibble i of a word holds output 8w + [0, 2, 4, 6, 1, 3, 5, 7][i]
    word = int(ref.awq_pack_columns(torch.arange(8)[None])[0, 0]) & 0xFFFFFFFF
    assert word == 0x75316420
    assert ref.awq_unpack_columns(torch.tensor([[0x75316420]], dtype=torch.int32)).tolist() == [list(range(8))]


# ---- GPTQ and AWQ layers ------------------------------------------------------------------------

GPTQ_VARIANTS = [  # sym, desc_act (g_idx act-order), checkpoint_format
    (True, False, "gptq"), (False, True, "gptq"), (True, True, "gptq_v2"), (False, False, "gptq_v2"),
]


@pytest.mark.parametrize("sym,desc_act,layout", GPTQ_VARIANTS, ids=lambda v: str(v))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_layer_roundtrip(bits, sym, desc_act, layout):
    n, m, gs = 256, 96, 64
    g = _gen(bits * 10 + len(layout))
    w = torch.randn(m, n, generator=g) / 16
    cfg, t = ref.gptq_quantize_pack(w, bits, gs, sym=sym, desc_act=desc_act, checkpoint_format=layout,
                                    bias=torch.randn(m, generator=g), generator=g)
    oracle = ref.gptq_dequantize_reference(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, gs, layout)
    # the packed tensors hold the weight: every entry within one grid step of the original
    step = t["scales"].float()[t["g_idx"].long()].T
    assert bool(((oracle - w).abs() <= step * 1.001).all())
    lin = linear_from_checkpoint("gptq", cfg, t, n, m)
    assert isinstance(lin, GPTQLinear) and lin.describe()["act_order"] == desc_act
    assert torch.equal(lin.dequantize(), oracle)
    # the byte-level load-time converter gives uniform_triton.repack_gptq's tensors exactly
    slow = ut.repack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, gs, layout)
    _assert_same_packed(lin.packed, slow)
    x = torch.randn(5, n, generator=g)
    want = x @ oracle.T + t["bias"].float()
    assert rel_err(lin(x), want) <= 1e-3


def test_gptq_v1_and_v2_zero_conventions():
    # One set of integer codes stored both ways: v1 keeps zero - 1, v2 the zero; both decode alike,
    # and a v2 layer read as v1 (no checkpoint_format key) is off by one grid step.
    w = torch.randn(32, 128, generator=_gen(3)) / 8
    g1, g2 = _gen(5), _gen(5)
    cfg1, v1 = ref.gptq_quantize_pack(w, 4, 32, sym=True, checkpoint_format="gptq", generator=g1)
    cfg2, v2 = ref.gptq_quantize_pack(w, 4, 32, sym=True, checkpoint_format="gptq_v2", generator=g2)
    assert torch.equal(v1["qweight"], v2["qweight"])
    z1 = ref.unpack_bitstream(v1["qzeros"], 4, 32, dim=1)
    z2 = ref.unpack_bitstream(v2["qzeros"], 4, 32, dim=1)
    assert torch.equal(z1 + 1, z2) and bool((z2 == 8).all())  # symmetric 4-bit zero is 8
    a = linear_from_checkpoint("gptq", cfg1, v1, 128, 32).dequantize()
    b = linear_from_checkpoint("gptq", cfg2, v2, 128, 32).dequantize()
    assert torch.equal(a, b)
    no_key = {k: v for k, v in cfg2.items() if k != "checkpoint_format"}
    misread = linear_from_checkpoint("gptq", no_key, v2, 128, 32)
    assert misread.describe()["checkpoint_format"] == "gptq"
    step = v2["scales"].float()[v2["g_idx"].long()].T
    assert torch.allclose(b - misread.dequantize(), step)


def test_gptq_per_channel_and_storage():
    cfg, t = ref.random_gptq_layer(256, 64, 4, -1, generator=_gen(1))
    assert t["scales"].shape == (1, 64)
    lin = linear_from_checkpoint("gptq", cfg, t, 256, 64)
    assert torch.equal(lin.dequantize(), ref.gptq_dequantize_reference(
        t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, -1))
    cfg, t = ref.random_gptq_layer(256, 256, 4, 128, generator=_gen(2))
    lin = linear_from_checkpoint("gptq", cfg, t, 256, 256)
    assert lin.bits_per_weight == 4.25  # 4-bit codes + fp16 scale and zero per 128 inputs
    x = torch.randn(3, 256, generator=_gen(4))
    lin(x)
    assert lin.bits_per_weight == 4.25  # the CPU path's decoded cache is not storage


@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_awq_layer_roundtrip(group_size):
    cfg, t = ref.random_awq_layer(256, 64, group_size, bias=True, generator=_gen(group_size + 7))
    oracle = ref.awq_dequantize_reference(t["qweight"], t["qzeros"], t["scales"], group_size)
    lin = linear_from_checkpoint("awq", cfg, t, 256, 64)
    assert isinstance(lin, AWQLinear)
    assert torch.equal(lin.dequantize(), oracle)
    _assert_same_packed(lin.packed, ut.repack_awq(t["qweight"], t["qzeros"], t["scales"], group_size))
    x = torch.randn(4, 256, generator=_gen(9))
    assert rel_err(lin(x), x @ oracle.T + t["bias"].float()) <= 1e-3


def test_uniform_linear_through_triton_kernel():
    """The buffers UniformLinear keeps are what the fused kernel reads (interpreter on CPU)."""
    cfg, t = ref.random_gptq_layer(128, 32, 4, 32, desc_act=True, bias=True, generator=_gen(11))
    lin = linear_from_checkpoint("gptq", cfg, t, 128, 32)
    x = torch.randn(2, 128, generator=_gen(12))
    cfg_k = ut.UQConfig("gemv", bk=16, bmw=4, bb=1, split_k=1)
    y = ut.uniform_matmul(x, lin.packed, lin.bias, config=cfg_k)
    assert rel_err(y, lin(x)) <= 1e-5


@pytest.mark.gpu
def test_uniform_linear_cuda_forward():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cfg, t = ref.random_gptq_layer(4096, 1024, 3, 128, desc_act=True, bias=True, generator=_gen(13))
    lin = linear_from_checkpoint("gptq", cfg, t, 4096, 1024).cuda()
    for batch in (1, 8, 100):
        x = torch.randn(batch, 4096, device="cuda").half()
        want = x.double() @ lin.dequantize().double().T + lin.bias.double()
        assert rel_err(lin(x), want) <= 3e-3


# ---- GGUF ---------------------------------------------------------------------------------------

# In memory: codes + fp16 scale + fp16 zero per 32 weights. UniformPacked keeps a zero per group
# even where the format's is a constant (Q4_0: 8, Q8_0: 128), 0.5 bit more than the file.
@pytest.mark.parametrize("kind,bpw", [("Q4_0", 5.0), ("Q4_1", 5.0), ("Q8_0", 9.0)])
def test_gguf_layer_matches_gguf_py(kind, bpw):
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    w = np.random.default_rng(0).standard_normal((48, 256)).astype(np.float32)
    data = torch.from_numpy(gguf.quants.quantize(w, qtype))
    want = torch.from_numpy(gguf.quants.dequantize(data.numpy(), qtype))
    assert torch.equal(ref.gguf_dequantize_reference(data, kind), want)
    lin = linear_from_checkpoint("gguf", {"type": kind}, {"weight": data}, 256, 48)
    assert isinstance(lin, GGUFLinear)
    assert torch.equal(lin.dequantize(), want)
    assert lin.bits_per_weight == bpw
    x = torch.randn(3, 256, generator=_gen(1))
    assert rel_err(lin(x), x @ want.T) <= 1e-5
    _assert_same_packed(lin.packed, ut.repack_gguf(data, kind))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_dense_weight_equals_reference(bits):
    g = _gen(bits)
    q = torch.randint(0, 2**bits, (32, 256), generator=g)
    for zero_is_min, perm in ((False, None), (True, torch.randperm(256, generator=g))):
        s = (torch.rand(4, 32, generator=g) + 0.01).half()
        z = (torch.randn(4, 32, generator=g) if zero_is_min else torch.randint(0, 2**bits, (4, 32), generator=g)).half()
        p = ut.pack_uniform(q, bits, s, z, 64, zero_is_min, perm)
        assert torch.equal(ref.packed_dense_weight(p), ut.uniform_packed_dequant_reference(p))


def test_default_model_is_served_natively(smollm2):
    lins = smollm2.quant_linears()
    assert len(lins) == 210 and smollm2.fmt == "gguf"
    assert all(isinstance(m, GGUFLinear) and m.describe()["type"] == "Q4_1" for _, m in lins)
    weights = sum(m.in_features * m.out_features for _, m in lins)
    bpw = 8 * sum(m.storage_bytes for _, m in lins) / weights
    assert 4.9 < bpw < 5.1  # Q4_1: 4-bit codes + fp16 scale and min per 32 weights
    assert smollm2.embed_tokens.weight.dtype == torch.float32  # the Q8_0 embedding is dense


# ---- checkpoints in GPTQ / AWQ layout -----------------------------------------------------------

CHECKPOINTS = {
    "gptq4-actorder-v1": ("llama2", {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True,
                                     "sym": True, "checkpoint_format": "gptq"}),
    "gptq3-perchannel-v2": ("llama2", {"quant_method": "gptq", "bits": 3, "group_size": -1, "desc_act": False,
                                       "sym": False, "checkpoint_format": "gptq_v2"}),
    "gptq2-qwen2-bias": ("qwen2", {"quant_method": "gptq", "bits": 2, "group_size": 32, "desc_act": False,
                                   "sym": False}),
    "awq-qwen2-bias": ("qwen2", {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                 "version": "gemm"}),
}


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_quantized_checkpoint_matches_dense_reference(tmp_path, name):
    arch, qc = CHECKPOINTS[name]
    hf = make_quantized_checkpoint(tmp_path, arch, qc)
    model = lowbit.load_model(tmp_path, device="cpu", dtype=torch.float32)
    assert model.fmt == qc["quant_method"]
    assert {m.fmt for n, m in model.quant_linears() if n != "lm_head"} == {qc["quant_method"]}
    ids = torch.randint(0, 256, (2, 24), generator=_gen(1))
    with torch.no_grad():
        want = hf(ids).logits
    assert rel_err(model.logits(ids), want) <= 1e-4


def test_gptq_modules_kept_dense_or_overridden(tmp_path):
    # GPTQModel `dynamic`: "-:" keeps matches dense, "+:" overrides bits; transformers'
    # modules_to_not_convert keeps named modules dense.
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True,
          "dynamic": {r"-:.*\.mlp\.down_proj": {}, r"+:.*\.self_attn\.[qk]_proj": {"bits": 8}},
          "modules_to_not_convert": ["layers.1.mlp.up_proj"]}

    def layer_config(module):
        if module.endswith("down_proj") or module == "model.layers.1.mlp.up_proj":
            return None
        return {**qc, "bits": 8} if module.endswith(("q_proj", "k_proj")) else qc

    hf = make_quantized_checkpoint(tmp_path, "llama2", qc, layer_config)
    model = lowbit.load_model(tmp_path, device="cpu", dtype=torch.float32)
    fmts = {n: (m.fmt, m.describe().get("bits")) for n, m in model.quant_linears()}
    assert fmts["layers.0.mlp.down_proj"] == ("dense", None)
    assert fmts["layers.1.mlp.up_proj"] == ("dense", None)
    assert fmts["layers.0.mlp.up_proj"] == ("gptq", 4)
    assert fmts["layers.1.self_attn.k_proj"] == ("gptq", 8)
    assert fmts["lm_head"] == ("dense", None)  # GPTQ leaves the head dense unless lm_head: true
    ids = torch.randint(0, 256, (1, 16), generator=_gen(2))
    with torch.no_grad():
        assert rel_err(model.logits(ids), hf(ids).logits) <= 1e-4


def test_inspect_gptq_checkpoint(tmp_path, capsys):
    from lowbit.cli import main

    make_quantized_checkpoint(tmp_path, "llama2", CHECKPOINTS["gptq4-actorder-v1"][1])
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["format"] == "gptq" and s["linears_by_format"] == {"gptq": 14, "dense": 1}
    assert s["format_parameters"]["gptq"] == {"bits": 4, "group_size": 32, "sym": True, "act_order": True,
                                              "checkpoint_format": "gptq"}
    assert s["linear_bits_per_weight"] > 5  # the dense fp32 head counts too


# ---- errors: one clear message each ------------------------------------------------------------

def _gptq(**cfg_changes):
    cfg, t = ref.random_gptq_layer(128, 64, 4, 32, generator=_gen(0))
    cfg.update(cfg_changes)
    return cfg, t


@pytest.mark.parametrize("change,tensor_edit,match", [
    (dict(bits=5), None, r"GPTQ bits = 5 is not supported"),
    (dict(group_size=48), None, r"group_size 48 does not divide in_features 128"),
    (dict(checkpoint_format="marlin"), None, r"checkpoint_format 'marlin' is not supported"),
    (dict(pack_dtype="int16"), None, r"pack_dtype 'int16'"),
    ({}, lambda t: t.__setitem__("qzeros", t["qzeros"][:, :-1]), r"L\.qzeros has shape \[4, 7\], expected .*\[4, 8\]"),
    ({}, lambda t: t.__setitem__("scales", t["scales"][:2]), r"L\.scales has 2 groups, expected .* = 4"),
    ({}, lambda t: t.__setitem__("qweight", t["qweight"][:-1]), r"L\.qweight has shape \[15, 64\], expected \[16, 64\]"),
    ({}, lambda t: t.__setitem__("g_idx", t["g_idx"] + 1), r"L\.g_idx holds group 4, outside 0 … 3"),
    ({}, lambda t: t.__setitem__("g_idx", t["g_idx"][:-1]), r"L\.g_idx has shape \[127\], expected \[128\]"),
    ({}, lambda t: t["g_idx"].__setitem__(0, 1), r"L\.g_idx puts 31 inputs in group 0, expected group_size = 32"),
    ({}, lambda t: t.__setitem__("scales", t["scales"].float() * (1 + 1e-6)), r"L\.scales .*float16 cannot"),
], ids=["bits", "group", "layout", "pack_dtype", "qzeros", "scales", "qweight", "g_idx_range", "g_idx_len",
        "g_idx_counts", "scales_fp32"])
def test_gptq_errors(change, tensor_edit, match):
    cfg, t = _gptq(**change)
    if tensor_edit is not None:
        tensor_edit(t)
    with pytest.raises(CheckpointError, match=match):
        linear_from_checkpoint("gptq", cfg, t, 128, 64, prefix="L")


def test_gptq_bits_not_filling_words():
    cfg, t = ref.random_gptq_layer(128, 64, 3, 32, generator=_gen(0))
    with pytest.raises(CheckpointError, match=r"out_features = 48 is not a whole number of 32-bit words at 3 bits"):
        linear_from_checkpoint("gptq", cfg, t, 128, 48, prefix="L")


def test_awq_and_gguf_errors():
    cfg, t = ref.random_awq_layer(128, 64, 32, generator=_gen(0))
    with pytest.raises(CheckpointError, match=r"AWQ bits = 3 is not supported"):
        linear_from_checkpoint("awq", {**cfg, "bits": 3}, t, 128, 64)
    with pytest.raises(CheckpointError, match=r"AWQ version 'gemv' is not supported"):
        linear_from_checkpoint("awq", {**cfg, "version": "gemv"}, t, 128, 64)
    with pytest.raises(CheckpointError, match=r"L\.qzeros has shape \[4, 4\], expected .* \[4, 8\]"):
        linear_from_checkpoint("awq", cfg, {**t, "qzeros": t["qzeros"][:, :4]}, 128, 64, prefix="L")
    data = torch.zeros(48, 8 * 20, dtype=torch.uint8)
    with pytest.raises(CheckpointError, match=r"GGUF type 'Q5_K' has no native path"):
        linear_from_checkpoint("gguf", {"type": "Q5_K"}, {"weight": data}, 256, 48)
    with pytest.raises(CheckpointError, match=r"L\.weight has shape \[48, 160\], expected \[48, 144\]"):
        linear_from_checkpoint("gguf", {"type": "Q4_0"}, {"weight": data}, 256, 48, prefix="L")


def test_bad_gptq_checkpoint_names_the_layer(tmp_path):
    make_quantized_checkpoint(tmp_path, "llama2", CHECKPOINTS["gptq4-actorder-v1"][1])
    sd = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.mlp.gate_proj.qzeros"
    sd[name] = sd[name][:, :-2].contiguous()
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.gate_proj\.qzeros has shape \[2, 18\]"):
        lowbit.load_model(tmp_path, device="cpu")
