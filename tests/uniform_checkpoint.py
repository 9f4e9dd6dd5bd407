"""Tiny GPTQ / AWQ checkpoints: a random transformers model whose projections are quantized and
packed by the published-format packers of lowbit/kernels/uniform.py, saved as config.json (with
quantization_config) + model.safetensors, next to the dense reference model they decode to."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lowbit.kernels.uniform import (
    awq_dequantize_reference,
    awq_quantize_pack,
    gptq_dequantize_reference,
    gptq_quantize_pack,
)
from tests.tiny_models import make_hf_model, save_checkpoint

_PROJ = re.compile(r"(model\.layers\.\d+\.(?:self_attn|mlp)\.\w+_proj)\.weight")


def quantize_layer(fmt: str, config: dict, weight: torch.Tensor, bias: torch.Tensor | None,
                   generator: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(tensors as the checkpoint stores them, the weight they decode to per the oracle)."""
    if fmt == "gptq":
        _, t = gptq_quantize_pack(weight, config["bits"], config["group_size"], sym=config.get("sym", True),
                                  desc_act=config.get("desc_act", False),
                                  checkpoint_format=config.get("checkpoint_format", "gptq"), bias=bias,
                                  generator=generator)
        w = gptq_dequantize_reference(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], config["bits"],
                                      config["group_size"], config.get("checkpoint_format", "gptq"))
    else:
        _, t = awq_quantize_pack(weight, config["group_size"], bias=bias)
        w = awq_dequantize_reference(t["qweight"], t["qzeros"], t["scales"], config["group_size"])
    return t, w


def make_quantized_checkpoint(path: Path, arch: str, quantization_config: dict,
                              layer_config: Callable[[str], dict | None] | None = None, seed: int = 0):
    """Save a tiny `arch` model with its projections quantized as `quantization_config` says (or as
    `layer_config(module)` says per module; None keeps the module dense). Returns the transformers
    model with every projection replaced by its decoded weight (the dense reference)."""
    hf = make_hf_model(arch, seed=seed)
    save_checkpoint(hf, path)
    sd = load_file(path / "model.safetensors")
    fmt = quantization_config["quant_method"]
    g = torch.Generator().manual_seed(seed + 1)
    out = {}
    params = dict(hf.named_parameters())
    for name, t in sd.items():
        m = _PROJ.fullmatch(name)
        if m is None:
            if not (name.endswith("_proj.bias") and name[:-5] + ".weight" in sd):
                out[name] = t
            continue
        module = m.group(1)
        cfg = quantization_config if layer_config is None else layer_config(module)
        bias = sd.get(f"{module}.bias")
        if cfg is None:
            out[name] = t
            if bias is not None:
                out[f"{module}.bias"] = bias
            continue
        tensors, w = quantize_layer(fmt, cfg, t, bias, g)
        out.update({f"{module}.{k}": v for k, v in tensors.items()})
        with torch.no_grad():
            params[name].copy_(w)
            if bias is not None:
                params[f"{module}.bias"].copy_(tensors["bias"].float())
    (path / "model.safetensors").unlink()
    save_file(out, str(path / "model.safetensors"))
    cfg_path = path / "config.json"
    config = json.loads(cfg_path.read_text())
    config["quantization_config"] = quantization_config
    cfg_path.write_text(json.dumps(config))
    return hf
