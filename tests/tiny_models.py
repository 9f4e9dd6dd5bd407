"""Tiny random transformers models saved as checkpoints, for comparing lowbit against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ARCH_CONFIGS = {
    # Llama 2 style: multi-head attention, untied head.
    "llama2": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
                   intermediate_size=160, num_attention_heads=4, num_key_value_heads=4,
                   tie_word_embeddings=False),
    # Llama 3.1 style: grouped-query attention with llama3 rope scaling, tied head (as Llama 3.2 1B).
    "llama3": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
                   intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                   tie_word_embeddings=True, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Qwen2: q/k/v biases, tied head.
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64,
                  intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=True),
    # Qwen2.5-7B style: biases and an untied head.
    "qwen2_untied": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64,
                         intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=64,
                    intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                    tie_word_embeddings=False, sliding_window=256),
}


def make_hf_model(arch: str, seed: int = 0, vocab: int = 256, layers: int = 2):
    """A random transformers model of the named style, float32, with non-trivial norms and biases."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(ARCH_CONFIGS[arch])
    model_type = kw.pop("model_type")
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab, num_hidden_layers=layers,
                               max_position_embeddings=512, rms_norm_eps=1e-5, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


def save_checkpoint(model, path: Path, fused: bool = False) -> Path:
    """save_pretrained as safetensors; with fused=True rewrite q/k/v -> qkv_proj and gate/up -> gate_up_proj."""
    model.save_pretrained(path, safe_serialization=True)
    if fused:
        files = sorted(path.glob("*.safetensors"))
        sd = {}
        for f in files:
            sd.update(load_file(f))
            f.unlink()
        index = path / "model.safetensors.index.json"
        if index.exists():
            index.unlink()
        out = {}
        for name, t in sd.items():
            if ".q_proj." in name:
                parts = [sd[name.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"]
                out[name.replace(".q_proj.", ".qkv_proj.")] = torch.cat(parts)
            elif ".gate_proj." in name:
                parts = [sd[name], sd[name.replace(".gate_proj.", ".up_proj.")]]
                out[name.replace(".gate_proj.", ".gate_up_proj.")] = torch.cat(parts)
            elif not any(f".{p}_proj." in name for p in ("k", "v", "up")):
                out[name] = t
        save_file(out, str(path / "model.safetensors"))
    return path


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))
