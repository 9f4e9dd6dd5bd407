"""Tiny Llama checkpoints in the published VPTQ layout, and the dense model they stand for.

A checkpoint directory holds config.json (a Llama config plus `quantization_config` with
`quant_method: vptq`, `config_for_layers` keyed by full module name, `shared_layer_config`,
`modules_to_not_convert`, as the VPTQ authors' exporter writes it) and model.safetensors with, per
quantized projection, `centroids.weight`, `indices` and whatever its options add (`res_centroids.weight`,
`outlier_*`, `perm`, `weight_scale`/`weight_bias`, `res_indices` when unpacked); embeddings, norms,
lm_head and unconverted projections are dense fp16.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lowbit.kernels.vptq import random_vptq_layer
from lowbit.quantized_models import linear_from_checkpoint

_PROJECTION = re.compile(r"model\.layers\.\d+\.\w+\.\w+_proj")

# Every dimension small; 340 rows are not a multiple of the vector lengths 8 or 6 (padded vectors).
LLAMA = dict(vocab_size=256, hidden_size=128, intermediate_size=340, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
             rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu", model_type="llama",
             architectures=["LlamaForCausalLM"], torch_dtype="float16", bos_token_id=1, eos_token_id=2,
             rope_theta=10000.0)

# Options of `random_vptq_layer` per projection: every option the published models use appears once.
LAYER_OPTIONS = {
    "self_attn.q_proj": dict(vector_len=8, num_centroids=4096),
    "self_attn.k_proj": dict(vector_len=8, num_centroids=4096, num_res_centroids=256, norm=True, perm=True),
    "self_attn.v_proj": dict(vector_len=8, num_centroids=1024, outliers=32, outlier_centroids=256, norm=True),
    "self_attn.o_proj": dict(vector_len=8, num_centroids=4096, groups=2, perm=True),
    "mlp.gate_proj": dict(vector_len=6, num_centroids=4096, packed=False, perm=True),
    "mlp.up_proj": dict(vector_len=12, num_centroids=2048, num_res_centroids=256, packed=False),
    "mlp.down_proj": dict(vector_len=8, num_centroids=65536, num_res_centroids=256, norm=True),
}
# Projections configured through shared_layer_config (by last name component) rather than per module.
SHARED = ("mlp.up_proj",)
# Modules kept dense through modules_to_not_convert.
NOT_CONVERTED = ("model.layers.1.mlp.down_proj",)


def projections(cfg: dict) -> dict[str, tuple[int, int]]:
    """Projection -> (out_features, in_features), separate q/k/v and gate/up as published."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    return {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}


def write_vptq_llama(path: Path, seed: int = 0, options: dict | None = None, shared=SHARED,
                     not_converted=NOT_CONVERTED) -> dict:
    """Write a tiny VPTQ Llama checkpoint into `path`; returns its config.json dict."""
    options = options or LAYER_OPTIONS
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    h = LLAMA["hidden_size"]
    sd = {
        "model.embed_tokens.weight": torch.randn(LLAMA["vocab_size"], h, generator=g),
        "model.norm.weight": 1 + 0.2 * torch.rand(h, generator=g),
        "lm_head.weight": torch.randn(LLAMA["vocab_size"], h, generator=g) / h**0.5,
    }
    per_layer, shared_cfg = {}, {}
    for layer in range(LLAMA["num_hidden_layers"]):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[f"model.layers.{layer}.{norm}.weight"] = 0.5 + torch.rand(h, generator=g)
        for proj, (m, n) in projections(LLAMA).items():
            name = f"model.layers.{layer}.{proj}"
            if name in not_converted:
                sd[f"{name}.weight"] = torch.randn(m, n, generator=g) / n**0.5
                continue
            entry, tensors = random_vptq_layer(n, m, generator=g, **options[proj])
            if proj in shared:
                shared_cfg[proj.rsplit(".", 1)[-1]] = entry
            else:
                per_layer[name] = entry
            sd.update({f"{name}.{k}": t for k, t in tensors.items()})
    sd = {k: (t.half() if t.dtype == torch.float32 else t) for k, t in sd.items()}
    save_file(sd, str(path / "model.safetensors"))
    qc = {"quant_method": "vptq", "config_for_layers": per_layer, "shared_layer_config": shared_cfg,
          "modules_to_not_convert": ["lm_head", *not_converted]}
    cfg = dict(LLAMA, quantization_config=qc)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    return cfg


def dense_weights(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's effective weights, float32, named as transformers' dense Llama names them:
    VPTQ layers dequantized one by one (the lowbit decode the golden fixtures check)."""
    from lowbit.quantized_models.vptq import VPTQLinear

    cfg = json.loads((path / "config.json").read_text())
    sd = load_file(str(path / "model.safetensors"))
    modules = sorted({match.group(0) for k in sd if (match := _PROJECTION.match(k))})
    out = {k: t.float() for k, t in sd.items() if "_proj." not in k}
    shapes = projections(cfg)
    for name in modules:
        tensors = {k[len(name) + 1:]: t for k, t in sd.items() if k.startswith(name + ".")}
        m, n = shapes[name.split(".", 3)[3]]
        block = VPTQLinear.layer_config(cfg, name)
        fmt = "dense" if block is None else "vptq"
        out[name + ".weight"] = linear_from_checkpoint(fmt, block, tensors, n, m, prefix=name).dequantize()
    return out


def dense_llama(path: Path):
    """transformers' LlamaForCausalLM (float32) holding the checkpoint's effective weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((path / "config.json").read_text())
    kw = {k: v for k, v in cfg.items() if k not in ("quantization_config", "model_type", "torch_dtype")}
    model = LlamaForCausalLM(LlamaConfig(**kw)).float().eval()
    missing, unexpected = model.load_state_dict(dense_weights(path), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model
