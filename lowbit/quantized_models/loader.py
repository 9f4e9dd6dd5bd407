"""config.json -> weight format -> model -> validated weights.

Every tensor is checked against the name, shape and dtype the model expects; a missing, extra or
mis-shaped tensor raises CheckpointError naming it. Only safetensors and GGUF are read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import Checkpoint, SafetensorsCheckpoint
from .config import ModelConfig
from .linear import _REGISTRY, CheckpointError, _import_formats, linear_from_checkpoint
from .llama import CausalLM
from .uniform import use_fragment_layouts

log = logging.getLogger("lowbit")

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
# Buffers some exporters write that carry nothing lowbit needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_PROGRESS_BYTES = 512 << 20


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local directory or .gguf file as is; otherwise a Hugging Face repo id, cache first."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        return p
    s = str(path_or_id)
    if s.count("/") != 1 or s.startswith((".", "/", "~")):
        raise CheckpointError(f"model {s!r} not found: no such file or directory, and not a Hub id (owner/name)")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(s, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(s, allow_patterns=patterns))
    except Exception as e:
        raise CheckpointError(
            f"model {s!r} is neither a local path nor in the Hugging Face cache, and downloading it failed: "
            f"{type(e).__name__}: {e}"
        ) from None


def open_checkpoint(path: Path) -> Checkpoint:
    if path.is_file():
        if path.suffix == ".gguf":
            from .gguf import GGUFCheckpoint

            return GGUFCheckpoint(path)
        raise CheckpointError(f"{path} is a file but not .gguf; pass a checkpoint directory or a .gguf file")
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").exists() and len(ggufs) == 1:
        from .gguf import GGUFCheckpoint

        return GGUFCheckpoint(ggufs[0])
    return SafetensorsCheckpoint(path)


def detect_format(hf_config: Mapping[str, Any]) -> str:
    """The registered format whose `matches` accepts this config.json; "dense" when none claims it."""
    _import_formats()
    found = [f for f, cls in _REGISTRY.items() if f != "dense" and cls.matches(hf_config)]
    if len(found) > 1:
        raise CheckpointError(f"config.json matches several weight formats: {', '.join(found)}")
    if found:
        return found[0]
    qc = hf_config.get("quantization_config")
    if qc:
        method = qc.get("quant_method", "?")
        raise CheckpointError(f"unsupported quantization_config.quant_method {method!r} in config.json")
    return "dense"


def default_dtype(device: torch.device, cfg: ModelConfig) -> torch.dtype:
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if cfg.torch_dtype == "bfloat16" else torch.float16


def load_tokenizer(tokenizer: str | os.PathLike | None):
    """A tokenizer from a directory / Hub id, or the default model's when None."""
    if tokenizer is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(resolve(tokenizer)))
    from .default_model import default_model_path

    return open_checkpoint(resolve(default_model_path())).tokenizer()


def _load_tokenizer(ckpt: Checkpoint, tokenizer: str | os.PathLike | None):
    from transformers import AutoTokenizer

    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if hasattr(ckpt, "tokenizer"):
        return ckpt.tokenizer()
    if any((ckpt.directory / f).exists() for f in _TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(str(ckpt.directory))
    log.warning("no tokenizer files in %s: pass tokenizer=... (CLI: --tokenizer) to generate text", ckpt.directory)
    return None


def load_model(
    path_or_id: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    tokenizer: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> CausalLM:
    """Load a checkpoint (directory, Hub id or .gguf file); with no path, the default SmolLM2 model."""
    if path_or_id is None:
        from .default_model import default_model_path

        path_or_id = default_model_path()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from .synthetic import RANDOM_PREFIX, load_random_model

    if str(path_or_id).startswith(RANDOM_PREFIX):
        return load_random_model(str(path_or_id), device, dtype, tokenizer)
    path = resolve(path_or_id)
    ckpt = open_checkpoint(path)
    cfg = ModelConfig.from_hf(ckpt.hf_config)
    dtype = dtype or default_dtype(device, cfg)
    fmt = detect_format(ckpt.hf_config)
    names = ckpt.names()
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in names:
            raise CheckpointError(f"missing tensor {name}")
        t = ckpt.get(name)
        used.add(name)
        if tuple(t.shape) != shape:
            raise CheckpointError(f"tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
        if t.dtype not in _FLOAT:
            raise CheckpointError(f"tensor {name} has dtype {t.dtype}, expected a float type")
        return t.to(device=device, dtype=dtype)

    def fused(module: str) -> bool:
        return any(n.startswith(f"model.layers.0.{module}.") for n in names)

    n_linears = cfg.num_layers * 7 + (0 if cfg.tie_word_embeddings else 1)
    show = progress if progress is not None else ckpt.nbytes > _PROGRESS_BYTES
    bar = tqdm(total=n_linears, desc=f"loading {path.name}", unit="linear", disable=not show, leave=False)

    def make_linear(name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
        prefix = name + "."
        own = sorted(n for n in names if n.startswith(prefix))
        layer_fmt = ckpt.linear_format(name)
        if layer_fmt is None:
            lcfg = _REGISTRY[fmt].layer_config(ckpt.hf_config, name) if fmt != "dense" else None
            layer_fmt = (fmt, lcfg) if lcfg is not None else ("dense", None)
        lfmt, lcfg = layer_fmt
        if not own:
            raise CheckpointError(f"missing tensors for {name} ({lfmt} layer): checkpoint has no {prefix}*")
        if bias and f"{prefix}bias" not in names:
            raise CheckpointError(f"missing tensor {prefix}bias ({cfg.architecture} has a bias here)")
        tensors = {n[len(prefix):]: ckpt.get(n) for n in own}
        if lfmt == "dense":
            tensors = {k: (v.to(dtype) if v.dtype in _FLOAT else v) for k, v in tensors.items()}
        lin = linear_from_checkpoint(lfmt, lcfg, tensors, in_features, out_features, prefix=name)
        if lin.fmt == "dense" and lfmt != "dense":  # a format's unquantized module (e.g. VPTQ skip list)
            lin = lin.to(dtype)
        used.update(own)
        bar.update(1)
        return lin.to(device)

    with bar:
        model = CausalLM(cfg, make_linear, fused_qkv=fused("self_attn.qkv_proj"),
                         fused_gate_up=fused("mlp.gate_up_proj"))
    h = cfg.hidden_size
    model.embed_tokens.weight = nn.Parameter(take("model.embed_tokens.weight", (cfg.vocab_size, h)),
                                             requires_grad=False)
    model.norm.weight = nn.Parameter(take("model.norm.weight", (h,)), requires_grad=False)
    for i, layer in enumerate(model.layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w = take(f"model.layers.{i}.{norm}.weight", (h,))
            getattr(layer, norm).weight = nn.Parameter(w, requires_grad=False)
    if cfg.tie_word_embeddings:
        used.add("lm_head.weight")  # some exporters store the tied head anyway
    extra = sorted(n for n in names - used if not n.endswith(_IGNORED_SUFFIXES))
    if extra:
        more = f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
        raise CheckpointError(f"unexpected tensor(s) in checkpoint: {', '.join(extra[:5])}{more}")
    model.rotary.to(device)
    use_fragment_layouts(model, dtype)
    model.eval()
    model.tokenizer = _load_tokenizer(ckpt, tokenizer)
    model.name = str(path_or_id)
    model.fmt = fmt if fmt != "dense" else (
        "gguf" if any(m.fmt == "gguf" for _, m in model.quant_linears()) else "dense")
    return model
