"""Random-weight models of real shapes in every format, for benchmarks and tests.

The codes are random but valid (every trellis bitstream is a valid QTIP code; indices stay inside
their codebooks; integer codes inside their bit width), so kernels do exactly the work a real
checkpoint makes them do. Each layer is built through `linear_from_checkpoint` from tensors laid
out as a published checkpoint stores them, so the load path is exercised too.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .config import ModelConfig
from .linear import linear_from_checkpoint
from .llama import CausalLM
from .uniform import use_fragment_layouts

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2,
                 vocab_size=512),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                         vocab_size=49152),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                       num_kv_heads=32, vocab_size=32000),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                        num_kv_heads=40, vocab_size=32000),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                       vocab_size=128256, rope_theta=500000.0),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                        num_kv_heads=8, vocab_size=32000),
}

# name -> (format, bits): the variants `lowbit bench decode --formats` understands.
VARIANTS = {
    "fp16": ("dense", 16),
    "qtip2": ("qtip", 2), "qtip3": ("qtip", 3), "qtip4": ("qtip", 4),
    "vptq2": ("vptq", 2), "vptq3": ("vptq", 3),
    "gptq2": ("gptq", 2), "gptq3": ("gptq", 3), "gptq4": ("gptq", 4), "gptq8": ("gptq", 8),
}


def shape_config(name: str, max_position_embeddings: int = 4096) -> ModelConfig:
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    s = dict(SHAPES[name])
    heads = s["num_heads"]
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"], num_layers=s["num_layers"], num_heads=heads,
        num_kv_heads=s["num_kv_heads"], head_dim=s["hidden_size"] // heads, rms_norm_eps=1e-5,
        rope_theta=s.get("rope_theta", 10000.0), rope_scaling=None,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
        qkv_bias=False, o_bias=False, mlp_bias=False, eos_token_ids=(),
    )


def _gen(seed: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def random_layer_tensors(fmt: str, bits: int, in_features: int, out_features: int, seed: int = 0,
                         device: str | torch.device = "cpu") -> tuple[dict | None, dict[str, torch.Tensor]]:
    """(config block, tensors) of one random layer exactly as a published checkpoint stores it."""
    g = _gen(seed, device)
    n, m = in_features, out_features
    std = 1.0 / math.sqrt(n)

    def randn(*shape, dtype=torch.float16, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    def randint(hi, *shape, dtype=torch.int32):
        return torch.randint(0, hi, shape, generator=g, device=device, dtype=torch.int64).to(dtype)

    if fmt == "dense":
        return None, {"weight": randn(m, n, scale=std)}
    if fmt == "qtip":
        cfg = {"L": 16, "K": bits, "V": 2, "td_x": 16, "td_y": 16, "tlut_bits": 9,
               "decode_mode": "quantlut_sym"}
        # Any bitstream is a valid tail-biting trellis, so uniformly random words are valid codes.
        trellis = randint(1 << 16, (m // 16) * (n // 16), 16 * bits, dtype=torch.int32) - (1 << 15)
        signs = randint(2, n, dtype=torch.float16) * 2 - 1
        return cfg, {
            "trellis": trellis.to(torch.int16),
            "SU": signs,
            "SV": torch.full((m,), std / 32, device=device) * (1 + 0.1 * randn(m, dtype=torch.float32)),
            "tlut": randn(512, 2),
            "rcp": torch.tensor(0, dtype=torch.int64, device=device),
            "tp_rank": torch.tensor(8, dtype=torch.int64, device=device),
        }
    if fmt == "vptq":
        from ..kernels.vptq import random_vptq_layer

        # v8-k65536 (2 bits, the published `-0-woft` models) and + a 256-entry residual (3 bits).
        return random_vptq_layer(n, m, vector_len=8, num_centroids=65536,
                                 num_res_centroids=256 if bits == 3 else 0, norm=True, generator=g)
    if fmt == "gptq":
        group = 128 if n % 128 == 0 else n
        cfg = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": True,
               "checkpoint_format": "gptq"}
        words = randint(1 << 32, n * bits // 32, m, dtype=torch.int64)
        zeros = randint(1 << 32, n // group, m * bits // 32, dtype=torch.int64)
        return cfg, {
            "qweight": (words - (1 << 31)).to(torch.int32),
            "qzeros": (zeros - (1 << 31)).to(torch.int32),
            "scales": (torch.rand(n // group, m, generator=g, device=device) * std * 4 / (1 << bits)
                       + std / (1 << bits)).half(),
            "g_idx": torch.arange(n, device=device, dtype=torch.int32) // group,
        }
    raise ValueError(f"no random layers for format {fmt!r}")


def random_model(shape: str | ModelConfig, variant: str = "fp16", device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float16, seed: int = 0, max_position_embeddings: int = 4096,
                 fused: bool | None = None) -> CausalLM:
    """A CausalLM of a named shape whose projections are random valid layers of `variant`.

    fused: one qkv and one gate-up projection per layer; by default as the format's published
    checkpoints store them (QTIP fuses both; VPTQ and GPTQ/AWQ keep them separate)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    fmt, bits = VARIANTS[variant]
    cfg = shape if isinstance(shape, ModelConfig) else shape_config(shape, max_position_embeddings)
    device = torch.device(device)
    counter = iter(range(10**9))

    def make_linear(name, in_features, out_features, bias):
        lfmt = "dense" if name == "lm_head" else fmt
        lcfg, tensors = random_layer_tensors(lfmt, bits, in_features, out_features,
                                             seed=seed * 100003 + next(counter), device=device)
        if lfmt == "dense":
            tensors = {k: t.to(dtype) for k, t in tensors.items()}
        return linear_from_checkpoint(lfmt, lcfg, tensors, in_features, out_features, prefix=name).to(device)

    if fused is None:
        fused = fmt == "qtip"
    model = CausalLM(cfg, make_linear, fused_qkv=fused, fused_gate_up=fused)
    g = _gen(seed, device)
    model.embed_tokens.weight = nn.Parameter(
        (torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g, device=device) * 0.02).to(dtype),
        requires_grad=False)
    for norm in [model.norm] + [getattr(layer, n) for layer in model.layers
                                for n in ("input_layernorm", "post_attention_layernorm")]:
        norm.weight = nn.Parameter(torch.ones(cfg.hidden_size, device=device, dtype=dtype), requires_grad=False)
    model.rotary.to(device)
    use_fragment_layouts(model, dtype)
    model.name = f"random-{shape if isinstance(shape, str) else 'custom'}-{variant}"
    model.fmt = fmt
    return model.eval()


RANDOM_PREFIX = "random:"


def load_random_model(spec: str, device: torch.device, dtype: torch.dtype | None = None, tokenizer=None) -> CausalLM:
    """`random:<shape>:<variant>` (e.g. random:llama-2-7b:qtip2) as a servable model: the named shape
    in the given format with random valid weights, its vocabulary resized to a real tokenizer's
    (`tokenizer`, default SmolLM2's) so `lowbit serve` and the load generator can drive it. Its
    output is gibberish; its speed is the format's."""
    parts = spec[len(RANDOM_PREFIX):].split(":")
    if len(parts) != 2 or parts[0] not in SHAPES or parts[1] not in VARIANTS:
        raise ValueError(f"expected random:<shape>:<variant> with shape in {', '.join(SHAPES)} and variant in "
                         f"{', '.join(VARIANTS)}; got {spec!r}")
    from .loader import default_dtype, load_tokenizer

    tok = load_tokenizer(tokenizer)
    cfg = dataclasses.replace(shape_config(parts[0]), vocab_size=len(tok),
                              eos_token_ids=(tok.eos_token_id,) if tok.eos_token_id is not None else ())
    model = random_model(cfg, parts[1], device=device, dtype=dtype or default_dtype(device, cfg))
    model.tokenizer = tok
    model.name = spec
    return model
