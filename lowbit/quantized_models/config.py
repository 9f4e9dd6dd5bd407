"""The architecture settings lowbit needs, read once from a Hugging Face config.json dict."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .linear import CheckpointError

# architectures[0] -> whether q/k/v carry a bias by default (Qwen2 does; the others only when
# `attention_bias` says so).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": True,
}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Mapping[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "ModelConfig":
        archs = d.get("architectures") or []
        arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                       "qwen2": "Qwen2ForCausalLM"}.get(d.get("model_type", ""), "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"unsupported architecture {arch or d.get('model_type')!r} in config.json; lowbit runs "
                + ", ".join(SUPPORTED_ARCHITECTURES)
            )

        def need(key):
            if key not in d:
                raise CheckpointError(f"config.json lacks {key!r}, needed for {arch}")
            return d[key]

        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        head_dim = int(d.get("head_dim") or hidden // heads)
        # transformers 5 writes rope settings as `rope_parameters`; older configs as rope_theta/rope_scaling.
        rope = dict(d.get("rope_parameters") or {})
        theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("default", "llama3", "linear"):
                raise CheckpointError(f"unsupported rope scaling {kind!r} in config.json (supported: llama3, linear)")
            if kind == "default":
                scaling = None
        max_pos = int(d.get("max_position_embeddings", 2048))
        # Sliding-window attention equals full attention as long as the context fits in the window,
        # so a model with a window is served with its context capped there.
        window = d.get("sliding_window")
        if window and (arch == "MistralForCausalLM" or d.get("use_sliding_window")):
            max_pos = min(max_pos, int(window))
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        bias = bool(d.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=SUPPORTED_ARCHITECTURES[arch] or bias,
            o_bias=bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
