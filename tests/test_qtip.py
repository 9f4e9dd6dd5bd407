"""QTIP: layers from the official implementation's golden fixtures, Hadamard transforms, the trellis
encoder, checkpoint validation, storage, and a whole QTIP Llama against transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lowbit
from lowbit.kernels.hadamard import SPECIAL_ORDERS, hadamard_factor, hadamard_reference, special_hadamard
from lowbit.kernels.qtip import (
    QTIPParams,
    decode_values,
    pack_trellis_reference,
    place_tiles,
    random_trellis,
    trellis_states_reference,
)
from lowbit.quantized_models import CheckpointError, linear_from_checkpoint
from lowbit.quantized_models.dense import DenseLinear
from lowbit.quantized_models.qtip import QTIPLinear
from tests.conftest import fixture_dir
from tests.qtip_checkpoint import PARAM_KEYS, dense_llama, hyb_params, random_layer, write_qtip_llama

FIXTURES = [
    "qtip_1mad_k2_256x512", "qtip_3inst_k2_256x512", "qtip_hyb_k2_256x1376", "qtip_hyb_k2_256x512",
    "qtip_hyb_k2_rcp1_tp2_256x512", "qtip_hyb_k3_256x512", "qtip_hyb_k4_1376x256", "qtip_hyb_k4_256x512",
]
CHECKPOINT_TENSORS = ("trellis", "SU", "SV", "tlut", "rcp", "tp_rank")


def load_fixture(name: str):
    path = fixture_dir("qtip") / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["config"])
    return meta, load_file(str(path))


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def fixture_layer(name: str):
    meta, t = load_fixture(name)
    # The layer's block exactly as config.json's quip_params holds it; rcp/tp_rank come as tensors.
    quip_params = {k: meta[k] for k in PARAM_KEYS} | {"codebook": "bitshift", "skip_list": None}
    tensors = {k: t[k] for k in CHECKPOINT_TENSORS if k in t}
    lin = linear_from_checkpoint("qtip", quip_params, tensors, meta["in_features"], meta["out_features"],
                                 prefix="model.layers.0.mlp.down_proj")
    return meta, t, lin


def test_fixture_set_is_complete():
    have = sorted(p.stem for p in fixture_dir("qtip").glob("qtip_*.safetensors"))
    assert have == sorted(FIXTURES)


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_dequantize_and_forward(name):
    meta, t, lin = fixture_layer(name)
    d = lin.describe()
    assert (d["K"], d["rcp"], d["tp_rank"], d["decode_mode"]) == (meta["K"], meta["rcp"], meta["tp_rank"],
                                                                  meta["decode_mode"])
    assert d["layout"] == ("kernel" if meta["kernel_layout"] else "generic")

    W = lin.dequantize()
    assert W.dtype == torch.float32 and W.shape == t["expected_W"].shape
    assert max_rel(W, t["expected_W"]) <= 1e-5

    y = lin(t["x"])
    assert y.dtype == torch.float32
    assert max_rel(y, t["expected_y"]) <= 1e-3
    y16 = lin(t["x"].half())
    assert y16.dtype == torch.float16
    assert max_rel(y16, t["expected_y"]) <= 1e-2
    ybf = lin(t["x"].bfloat16()[None])  # leading dims pass through
    assert ybf.shape == (1, *t["expected_y"].shape) and ybf.dtype == torch.bfloat16
    assert max_rel(ybf[0], t["expected_y"]) <= 2e-2


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_code_values_are_exact(name):
    # Undo SU, SV and both Hadamards on the official effective weight: each recovered entry must lie
    # nearest to exactly the code value we decoded, out of all values the code can produce.
    meta, t, lin = fixture_layer(name)
    p, rcp, tp = lin.params, lin.rcp, lin.tp_rank
    w = t["expected_W"].double() / t["SV"].double()[:, None] / t["SU"].double()[None, :]
    w = hadamard_reference(w, transpose=True, chunks=tp if rcp == 1 else 1)
    recovered = hadamard_reference(w.T, transpose=True, chunks=tp if rcp == 2 else 1).T
    ours = lin.decoded_codes().double()
    assert (recovered - ours).abs().max() <= 1e-5 * ours.abs().max()
    every = decode_values(torch.arange(1 << p.L), p, t.get("tlut")).double()
    for c in range(p.V):  # value c of each state sits in columns c, c+V, ... in both layouts
        cand = every[:, c].unique()
        r, o = recovered[:, c::p.V].flatten(), ours[:, c::p.V].flatten()
        i = torch.searchsorted(cand, r).clamp(1, len(cand) - 1)
        lo, hi = cand[i - 1], cand[i]
        nearest = torch.where((r - lo).abs() <= (hi - r).abs(), lo, hi)
        assert torch.equal(nearest, o)


# ----- Hadamard -------------------------------------------------------------------------------------

def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def dense_hadamard(n: int) -> torch.Tensor:
    k = hadamard_factor(n)
    a = special_hadamard(k).double() if k > 1 else torch.ones(1, 1, dtype=torch.float64)
    return torch.kron(a, sylvester(n // k)) / n**0.5


@pytest.mark.parametrize("n", [1, 2, 16, 512, 12, 24, 20 * 4, 28 * 8, 36 * 2, 52, 60 * 4, 108 * 2, 116, 124,
                               140 * 2, 156, 172 * 4, 1376])
def test_hadamard_equals_dense_matrix(n):
    x = torch.randn(3, 2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    h = dense_hadamard(n)
    assert torch.allclose(hadamard_reference(x), x @ h.T, atol=1e-12)
    assert torch.allclose(hadamard_reference(x, transpose=True), x @ h, atol=1e-12)
    assert torch.allclose(hadamard_reference(hadamard_reference(x, transpose=True)), x, atol=1e-12)


def test_hadamard_per_chunk_is_block_diagonal():
    x = torch.randn(4, 1376, dtype=torch.float64)
    h = dense_hadamard(344)
    want = (x.view(4, 4, 344) @ h).reshape(4, 1376)
    assert torch.allclose(hadamard_reference(x, transpose=True, chunks=4), want, atol=1e-12)
    x32 = x.float()
    assert hadamard_reference(x32, chunks=4).dtype == torch.float32


@pytest.mark.parametrize("n", [0, 3, 100, 1032, 176])
def test_hadamard_rejects_sizes_outside_the_format(n):
    with pytest.raises(ValueError):
        hadamard_factor(n)


def test_special_hadamards_are_hadamard_matrices():
    for k in SPECIAL_ORDERS:
        a = special_hadamard(k).int()
        assert a.shape == (k, k) and torch.equal(a @ a.T, k * torch.eye(k, dtype=torch.int32))


def test_special_hadamards_equal_the_fixture_file():
    ref = load_file(str(fixture_dir("qtip") / "special_hadamards.safetensors"))
    assert sorted(ref) == sorted(f"had_{k}" for k in SPECIAL_ORDERS)
    for k in SPECIAL_ORDERS:
        assert torch.equal(special_hadamard(k), ref[f"had_{k}"])


# ----- encoder ------------------------------------------------------------------------------------------

ENCODER_CASES = {
    "hyb_k2": (QTIPParams(16, 2, 2, 16, 16, 9, "quantlut_sym"), 64, 96),
    "hyb_k3": (QTIPParams(16, 3, 2, 16, 16, 9, "quantlut_sym"), 32, 64),
    "hyb_k4": (QTIPParams(16, 4, 2, 16, 16, 9, "quantlut_sym"), 96, 32),
    "1mad": (QTIPParams(16, 2, 1, 16, 16, 0, "1mad"), 32, 48),
    "quantlut_v2_td8": (QTIPParams(12, 3, 2, 8, 8, 8, "quantlut"), 16, 24),
    # 4x5 tiles at K=3: 60-bit streams, so each tile row ends in 4 padding bits.
    "lut_padded": (QTIPParams(10, 3, 1, 4, 5, 10, "lut"), 8, 20),
}


def walk_states(p: QTIPParams, tiles: int, gen: torch.Generator) -> torch.Tensor:
    """Random valid states straight from the definition: state t = stream bits [t*K*V, t*K*V + L)."""
    bits = torch.randint(0, 2, (tiles, p.stream_bits), generator=gen)
    idx = (torch.arange(p.states_per_tile)[:, None] * p.step + torch.arange(p.L)) % p.stream_bits
    return (bits[:, idx] << torch.arange(p.L - 1, -1, -1)).sum(-1)


@pytest.mark.parametrize("case", sorted(ENCODER_CASES))
def test_encoder_round_trip(case):
    p, m, n = ENCODER_CASES[case]
    gen = torch.Generator().manual_seed(7)
    states = walk_states(p, (m // p.td_x) * (n // p.td_y), gen).view(m // p.td_x, n // p.td_y, -1)
    trellis = pack_trellis_reference(states, p)
    assert trellis.dtype == torch.int16 and trellis.shape == ((m // p.td_x) * (n // p.td_y), p.words_per_tile)
    assert torch.equal(trellis_states_reference(trellis, p, m, n), states.int())

    # A random checkpoint tensor survives decode -> encode bit for bit.
    stored = random_trellis(p, m, n, generator=gen)
    assert torch.equal(pack_trellis_reference(trellis_states_reference(stored, p, m, n), p), stored)

    # And the layer decodes the packed states to the values those states map to.
    cfg = {f: getattr(p, f) for f in PARAM_KEYS}
    tensors = random_layer(cfg, m, n, seed=3) | {"trellis": trellis}
    lin = linear_from_checkpoint("qtip", cfg, tensors, n, m)
    want = place_tiles(decode_values(states, p, tensors.get("tlut")), p)
    assert torch.equal(lin.decoded_codes(), want)
    assert torch.allclose(lin(torch.eye(n)), lin.dequantize().T, atol=1e-6)


def test_encoder_rejects_states_that_are_not_a_walk():
    p, m, n = ENCODER_CASES["hyb_k2"]
    states = walk_states(p, (m // 16) * (n // 16), torch.Generator().manual_seed(1)).view(m // 16, n // 16, -1)
    states[1, 2, 5] ^= 1  # its low bit belongs to the next states
    with pytest.raises(ValueError, match="trellis walk"):
        pack_trellis_reference(states, p)


def test_kernel_layout_bytes_land_in_their_tiles():
    # The stored bytes are [out/32, in/32, 32, 2 (tile col), 2 (tile row), K]: flipping bits of one
    # byte must change exactly the 16x16 tile those indices name (the fixtures only see whole layers).
    p, m, n = ENCODER_CASES["hyb_k3"][0], 96, 64
    cfg = {f: getattr(p, f) for f in PARAM_KEYS}
    t = random_layer(cfg, m, n, seed=5)
    base = linear_from_checkpoint("qtip", cfg, t, n, m).decoded_codes()
    for word in (0, 37, 100, 777, 1000, t["trellis"].numel() - 1):
        bent = t["trellis"].clone().view(-1)
        bent[word] ^= 0x00F0  # the word's first byte in memory (little-endian)
        changed = linear_from_checkpoint("qtip", cfg, t | {"trellis": bent.view_as(t["trellis"])}, n, m)
        diff = (changed.decoded_codes() != base).view(m // 16, 16, n // 16, 16).any(3).any(1)
        rest, _ = divmod(2 * word, p.K)
        rest, row = divmod(rest, 2)
        rest, col = divmod(rest, 2)
        rest = rest // 32
        mi, nj = divmod(rest, n // 32)
        assert diff.nonzero().tolist() == [[2 * mi + row, 2 * nj + col]]


# ----- validation ---------------------------------------------------------------------------------------

def hyb_layer(**changes):
    cfg = hyb_params(2)
    t = random_layer(cfg, 256, 512, seed=1)
    t.update(changes)
    return cfg, {k: v for k, v in t.items() if v is not None}


def build(cfg, t, n=512, m=256):
    return linear_from_checkpoint("qtip", cfg, t, n, m, prefix="model.layers.3.mlp.up_proj")


@pytest.mark.parametrize("change, message", [
    ({"trellis": torch.zeros(512, 31, dtype=torch.int16)},
     r"model\.layers\.3\.mlp\.up_proj\.trellis has shape \[512, 31\], expected .*\[512, 32\]"),
    ({"trellis": torch.zeros(511, 32, dtype=torch.int16)}, r"up_proj\.trellis has shape \[511, 32\]"),
    ({"trellis": torch.zeros(512, 32, dtype=torch.int32)}, r"up_proj\.trellis has dtype int32, expected int16"),
    ({"tlut": None}, r"missing tensor model\.layers\.3\.mlp\.up_proj\.tlut: decode_mode 'quantlut_sym'"),
    ({"tlut": torch.zeros(256, 2, dtype=torch.float16)}, r"up_proj\.tlut has shape \[256, 2\], expected \[512, 2\]"),
    ({"SU": torch.ones(500, dtype=torch.float16)}, r"up_proj\.SU has shape \[500\], expected \[512\]"),
    ({"SV": torch.ones(512)}, r"up_proj\.SV has shape \[512\], expected \[256\]"),
    ({"SV": torch.ones(256, dtype=torch.float16)}, r"up_proj\.SV has dtype float16, expected float32"),
    ({"rcp": torch.tensor(3)}, r"up_proj\.rcp is 3, expected 0, 1 or 2"),
    ({"rcp": torch.tensor(1), "tp_rank": torch.tensor(3)}, r"up_proj\.tp_rank is 3: rcp=1 splits in_features"),
    ({"scales": torch.ones(3)}, r"unexpected tensor\(s\) model\.layers\.3\.mlp\.up_proj\.scales"),
])
def test_bad_tensors_name_the_tensor(change, message):
    cfg, t = hyb_layer(**change)
    with pytest.raises(CheckpointError, match=message):
        build(cfg, t)


def test_bad_configs_are_named():
    cfg, t = hyb_layer()
    with pytest.raises(CheckpointError, match=r"up_proj: unsupported QTIP config: unknown decode_mode 'hyb'"):
        build(cfg | {"decode_mode": "hyb"}, t)
    with pytest.raises(CheckpointError, match=r"lacks 'tlut_bits'"):
        build({k: v for k, v in cfg.items() if k != "tlut_bits"}, t)
    with pytest.raises(CheckpointError, match=r"V must be 1"):
        build(cfg | {"decode_mode": "1mad"}, t)
    with pytest.raises(CheckpointError, match=r"needs its quip_params block"):
        build(None, t)
    with pytest.raises(CheckpointError, match=r"multiples of 32, got 256x496"):
        build(cfg, t, n=496)
    one_mad = {k: 0 if k == "tlut_bits" else v for k, v in cfg.items()} | {"decode_mode": "1mad", "V": 1}
    bad_size = random_layer(one_mad, 64, 176)
    with pytest.raises(CheckpointError, match=r"in_features 176 has no QTIP Hadamard"):
        linear_from_checkpoint("qtip", one_mad, bad_size, 176, 64)


# ----- storage ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("K", [2, 3, 4])
def test_storage_is_the_codes_plus_small_vectors(K):
    m, n = 1024, 4096
    t = random_layer(hyb_params(K), m, n, seed=K)
    lin = linear_from_checkpoint("qtip", hyb_params(K), t, n, m)
    fp16_bytes = 2 * m * n
    small = 2 * n + 4 * m + 2 * 512 * 2  # SU fp16, SV fp32, tlut fp16
    assert lin.storage_bytes == K * fp16_bytes // 16 + small
    assert abs(lin.bits_per_weight - K) < 0.03
    assert {name for name, _ in lin.named_buffers()} == {"codes", "SU", "SV", "tlut"}
    lin(torch.randn(1, n))  # the decoded matrix it caches is not storage
    assert lin.storage_bytes == K * fp16_bytes // 16 + small


# ----- config.json --------------------------------------------------------------------------------------

def test_layer_config_follows_quip_params():
    qp = hyb_params(2) | {"skip_list": ["0_down", "1_q", "1_k", "1_v"], "K_v_proj": 4}
    hf = {"quip_params": qp}
    assert QTIPLinear.matches(hf) and not QTIPLinear.matches({"quantization_config": {}})
    block = QTIPLinear.layer_config(hf, "model.layers.0.self_attn.q_proj")
    assert {k: block[k] for k in PARAM_KEYS} == {k: qp[k] for k in PARAM_KEYS}
    assert QTIPLinear.layer_config(hf, "model.layers.0.self_attn.v_proj")["K"] == 4
    assert QTIPLinear.layer_config(hf, "model.layers.0.mlp.down_proj") is None
    assert QTIPLinear.layer_config(hf, "model.layers.1.mlp.down_proj")["K"] == 2
    assert QTIPLinear.layer_config(hf, "model.layers.1.self_attn.qkv_proj") is None
    assert QTIPLinear.layer_config(hf, "lm_head") is None
    with pytest.raises(CheckpointError, match="K_v_proj = 4 differs from K = 2"):
        QTIPLinear.layer_config(hf, "model.layers.0.self_attn.qkv_proj")
    half_skipped = {"quip_params": qp | {"skip_list": ["0_gate"]}}
    with pytest.raises(CheckpointError, match="0_gate, 0_up dense"):
        QTIPLinear.layer_config(half_skipped, "model.layers.0.mlp.gate_up_proj")


# ----- whole model --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_qtip_llama_matches_dense_transformers(tmp_path, fused):
    if fused:  # one K per fused module; skip both halves of a fused MLP
        qp = hyb_params(2) | {"skip_list": ["1_gate", "1_up"]}
    else:  # as published: separate projections, a skipped layer, v_proj at its own K
        qp = hyb_params(2) | {"skip_list": ["1_down"], "K_v_proj": 3}
    write_qtip_llama(tmp_path, qp, fused=fused)
    model = lowbit.load_model(tmp_path, device="cpu", dtype=torch.float32)
    assert model.fmt == "qtip"
    mlp1 = model.layers[1].mlp
    if fused:
        assert isinstance(mlp1.gate_up_proj, DenseLinear) and isinstance(mlp1.down_proj, QTIPLinear)
    else:
        assert isinstance(mlp1.down_proj, DenseLinear)
        assert model.layers[0].self_attn.v_proj.describe()["K"] == 3
        assert model.layers[0].self_attn.q_proj.describe()["rcp"] == 1
        assert model.layers[0].self_attn.o_proj.describe()["rcp"] == 2

    hf = dense_llama(tmp_path)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
    got = model.logits(ids)
    assert got.shape == want.shape
    assert float((got.double() - want.double()).norm() / want.double().norm()) <= 1e-4
