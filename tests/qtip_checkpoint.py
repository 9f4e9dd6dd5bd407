"""Random but valid QTIP layers and tiny Llama checkpoints in the published QTIP layout.

A checkpoint directory holds config.json (a Llama config plus `quip_params`, as the QTIP authors'
exporter writes it) and model.safetensors with, per quantized projection, `trellis`, `SU`, `SV`,
`tlut`, `rcp`, `tp_rank`; embeddings, norms, lm_head and skipped projections are dense fp16.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lowbit.kernels.qtip import QTIPParams, random_trellis
from lowbit.quantized_models import linear_from_checkpoint

PARAM_KEYS = ("L", "K", "V", "td_x", "td_y", "tlut_bits", "decode_mode")


def hyb_params(K: int = 2) -> dict:
    """quip_params of a published HYB model (before skip_list / K_v_proj)."""
    return {"codebook": "bitshift", "codebook_version": 0, "L": 16, "K": K, "V": 2, "td_x": 16, "td_y": 16,
            "tlut_bits": 9, "decode_mode": "quantlut_sym", "split_for_tp": False, "skip_list": None}


def qtip_params(cfg: dict) -> QTIPParams:
    return QTIPParams(**{k: cfg[k] for k in PARAM_KEYS})


def random_layer(cfg: dict, out_features: int, in_features: int, seed: int = 0, rcp: int = 0, tp_rank: int = 8,
                 bias: bool = False) -> dict[str, torch.Tensor]:
    """One layer's checkpoint tensors with random valid codes and scales giving W entries ~ 1/sqrt(in)."""
    p = qtip_params(cfg)
    g = torch.Generator().manual_seed(seed)
    m, n = out_features, in_features
    t = {
        "trellis": random_trellis(p, m, n, generator=g),
        "SU": (torch.randint(0, 2, (n,), generator=g) * 2 - 1).half(),
        "SV": (1 + 0.1 * torch.randn(m, generator=g)) / n**0.5,
        "rcp": torch.tensor(rcp, dtype=torch.int64),
        "tp_rank": torch.tensor(tp_rank, dtype=torch.int64),
    }
    if p.needs_tlut:
        t["tlut"] = torch.randn(*p.tlut_shape, generator=g).half()
    if bias:
        t["bias"] = 0.1 * torch.randn(m, generator=g)
    return t


# Tiny Llama: every dimension a multiple of 32 with a QTIP Hadamard (1376 = 172*8 as Llama-2's 11008).
LLAMA = dict(vocab_size=256, hidden_size=256, intermediate_size=1376, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
             rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu", model_type="llama",
             architectures=["LlamaForCausalLM"], torch_dtype="float16", bos_token_id=1, eos_token_id=2,
             rope_theta=10000.0)

# Tensor-parallel splits some layers carry, to run rcp 1 and 2 through the whole model.
SPLITS = {"self_attn.q_proj": (1, 4), "self_attn.o_proj": (2, 2), "mlp.down_proj": (1, 2)}


def _projections(cfg: dict, fused: bool) -> dict[str, tuple[int, int]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    attn = {"qkv_proj": (q + 2 * kv, h)} if fused else {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h)}
    mlp = {"gate_up_proj": (2 * i, h)} if fused else {"gate_proj": (i, h), "up_proj": (i, h)}
    return ({f"self_attn.{k}": v for k, v in attn.items()} | {"self_attn.o_proj": (h, q)}
            | {f"mlp.{k}": v for k, v in mlp.items()} | {"mlp.down_proj": (h, i)})


def write_qtip_llama(path: Path, quip_params: dict, fused: bool = False, seed: int = 0) -> dict:
    """Write a tiny QTIP Llama checkpoint into `path`; returns its config.json dict.

    Layers named in quip_params' skip_list are stored dense, v_proj uses K_v_proj when given."""
    from lowbit.quantized_models.qtip import QTIPLinear

    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(LLAMA, quip_params=quip_params)
    g = torch.Generator().manual_seed(seed)
    h = cfg["hidden_size"]
    sd = {
        "model.embed_tokens.weight": torch.randn(cfg["vocab_size"], h, generator=g),
        "model.norm.weight": 1 + 0.2 * torch.rand(h, generator=g),
        "lm_head.weight": torch.randn(cfg["vocab_size"], h, generator=g) / h**0.5,
    }
    counter = seed * 1000
    for layer in range(cfg["num_hidden_layers"]):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[f"model.layers.{layer}.{norm}.weight"] = 0.5 + torch.rand(h, generator=g)
        for proj, (m, n) in _projections(cfg, fused).items():
            name = f"model.layers.{layer}.{proj}"
            block = QTIPLinear.layer_config(cfg, name)
            counter += 1
            if block is None:
                sd[f"{name}.weight"] = torch.randn(m, n, generator=g) / n**0.5
                continue
            rcp, tp = SPLITS.get(proj, (0, 8))
            for k, t in random_layer(block, m, n, seed=counter, rcp=rcp, tp_rank=tp).items():
                sd[f"{name}.{k}"] = t
    sd = {k: (t.half() if t.dtype == torch.float32 and not k.endswith(".SV") else t) for k, t in sd.items()}
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    return cfg


def dense_weights(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's effective weights, float32, named as transformers' dense Llama names them:
    QTIP layers dequantized one by one (the lowbit decode the fixtures check), fused ones split."""
    from lowbit.quantized_models.qtip import QTIPLinear

    cfg = json.loads((path / "config.json").read_text())
    sd = load_file(str(path / "model.safetensors"))
    modules = sorted({k.rsplit(".", 1)[0] for k in sd if ".layers." in k and "_proj." in k})
    out = {k: t.float() for k, t in sd.items() if "_proj." not in k}
    for name in modules:
        tensors = {k[len(name) + 1:]: t for k, t in sd.items() if k.startswith(name + ".")}
        block = QTIPLinear.layer_config(cfg, name)
        if block is None:
            w = tensors["weight"].float()
        else:
            m = len(tensors["SV"])
            n = len(tensors["SU"])
            w = linear_from_checkpoint("qtip", block, tensors, n, m, prefix=name).dequantize()
        if name.endswith("qkv_proj"):
            q = cfg["num_attention_heads"] * cfg["head_dim"]
            kv = cfg["num_key_value_heads"] * cfg["head_dim"]
            for part, t in zip("qkv", w.split([q, kv, kv]), strict=True):
                out[name.replace("qkv_proj", f"{part}_proj") + ".weight"] = t
        elif name.endswith("gate_up_proj"):
            gate, up = w.chunk(2)
            out[name.replace("gate_up_proj", "gate_proj") + ".weight"] = gate
            out[name.replace("gate_up_proj", "up_proj") + ".weight"] = up
        else:
            out[name + ".weight"] = w
    return out


def dense_llama(path: Path):
    """transformers' LlamaForCausalLM (float32) holding the checkpoint's effective weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((path / "config.json").read_text())
    kw = {k: v for k, v in cfg.items() if k not in ("quip_params", "model_type", "torch_dtype")}
    model = LlamaForCausalLM(LlamaConfig(**kw)).float().eval()
    missing, unexpected = model.load_state_dict(dense_weights(path), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model
