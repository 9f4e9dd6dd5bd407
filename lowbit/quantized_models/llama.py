"""The Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, SmolLM2) in one readable file.

Every projection is a QuantLinear built by the loader's factory, so this file never knows the
weight format. Tokens arrive flattened ([N] ids with [N] positions) and attention goes through an
AttentionContext, which is how the same model serves cache-free scoring, simple generation and the
paged serving engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import fused
from .attention import AttentionContext, CausalNoCache
from .config import ModelConfig
from .linear import finished

# make_linear(module_name, in_features, out_features, has_bias) -> nn.Module computing x @ W.T (+ b)
LinearFactory = Callable[[str, int, int, bool], nn.Module]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        # Allocated on "meta": the loader assigns the checkpoint's tensor.
        self.weight = nn.Parameter(torch.empty(size, device="meta"), requires_grad=False)
        self.eps = eps

    def forward(self, x, residual: torch.Tensor | None = None):
        """(norm(x + residual), x + residual): the residual add rides along in the same launch (x may
        be a projection's `PendingOutput`: finished first)."""
        return fused.rmsnorm(finished(x), self.weight, self.eps, residual)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = cfg.rope_scaling
    if sc is None:
        return inv.float()
    kind = sc.get("rope_type", sc.get("type"))
    factor = float(sc["factor"])
    if kind == "linear":
        return (inv / factor).float()
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
    old_ctx = float(sc.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, blended, scaled).float()


class Rotary(nn.Module):
    """Rotary embedding in the rotate-half convention (GGUF's interleaved q/k are un-permuted at load)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, kv_store=None):
        return fused.rotary_(q, k, positions, self.inv_freq, kv_store)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, make_linear: LinearFactory, fused_qkv: bool):
        super().__init__()
        self.cfg = cfg
        h, q, kv = cfg.hidden_size, cfg.q_size, cfg.kv_size
        self.fused = fused_qkv
        if fused_qkv:
            self.qkv_proj = make_linear(f"{prefix}.qkv_proj", h, q + 2 * kv, cfg.qkv_bias)
        else:
            self.q_proj = make_linear(f"{prefix}.q_proj", h, q, cfg.qkv_bias)
            self.k_proj = make_linear(f"{prefix}.k_proj", h, kv, cfg.qkv_bias)
            self.v_proj = make_linear(f"{prefix}.v_proj", h, kv, cfg.qkv_bias)
        self.o_proj = make_linear(f"{prefix}.o_proj", q, h, cfg.o_bias)

    def forward(self, x, residual, norm: RMSNorm, positions, rotary: Rotary, ctx: AttentionContext,
                layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention output, residual) from the layer input x and the residual before it: the norm
        in front goes to the projection (`forward_normed`), which may fold it into its own launch."""
        cfg = self.cfg
        n, d = x.shape[0], cfg.head_dim
        slots = ctx.kv_slots(layer)  # a slot-addressed cache: the rotary launch writes k and v into it
        if self.fused:  # the projection takes the norm before it and the rotary step after it
            work = fused.QKVRotary(positions, rotary.inv_freq, cfg.num_heads, cfg.num_kv_heads, d, slots)
            qkv, residual = self.qkv_proj.forward_normed(x, norm.weight, norm.eps, residual, rotary=work)
            q, k, v = fused.qkv_heads(qkv, cfg.num_heads, cfg.num_kv_heads, d)
        else:
            h, residual = norm(x, residual)
            q, k, v = (p(h).view(n, -1, d) for p in (self.q_proj, self.k_proj, self.v_proj))
            q, k = rotary(q, k, positions, None if slots is None else (v, *slots))
        out = ctx.attend(layer, q, k, v, stored=slots is not None)
        return self.o_proj.forward_pending(out.reshape(n, cfg.q_size)), residual  # a norm follows


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, make_linear: LinearFactory, fused_gate_up: bool):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.fused = fused_gate_up
        if fused_gate_up:
            self.gate_up_proj = make_linear(f"{prefix}.gate_up_proj", h, 2 * i, cfg.mlp_bias)
        else:
            self.gate_proj = make_linear(f"{prefix}.gate_proj", h, i, cfg.mlp_bias)
            self.up_proj = make_linear(f"{prefix}.up_proj", h, i, cfg.mlp_bias)
        self.down_proj = make_linear(f"{prefix}.down_proj", i, h, cfg.mlp_bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLP output, residual), the norm in front and SiLU·mul handed to the projections."""
        activated = False
        if self.fused:
            # The gate's SiLU in the gate|up output launch, once per element, where the down
            # projection's input launch would compute it in each of its programs.
            activated = (residual is not None and self.gate_up_proj.activates_in_launch(residual)
                         and self.down_proj.takes_activated(residual))
            gate_up, residual = self.gate_up_proj.forward_normed(
                x, norm.weight, norm.eps, residual, activate=self.down_proj.in_features if activated else 0)
            gate, up = gate_up.chunk(2, dim=-1)
        else:
            h, residual = norm(x, residual)
            gate, up = self.gate_proj(h), self.up_proj(h)
        return self.down_proj.forward_gated(gate, up, pending=True, activated=activated), residual  # a norm follows


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, make_linear: LinearFactory, fused_qkv: bool,
                 fused_gate_up: bool):
        super().__init__()
        prefix = f"model.layers.{idx}"
        self.idx = idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, f"{prefix}.self_attn", make_linear, fused_qkv)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, f"{prefix}.mlp", make_linear, fused_gate_up)

    def forward(self, x, residual, positions, rotary: Rotary, ctx: AttentionContext):
        """Residual-stream form: returns (this layer's MLP output, residual before it); the caller's
        next norm adds the two, so each add shares a launch with a norm."""
        h, residual = self.self_attn(x, residual, self.input_layernorm, positions, rotary, ctx, self.idx)
        return self.mlp(h, residual, self.post_attention_layernorm)


class CausalLM(nn.Module):
    """Embeddings, decoder layers, final norm and LM head; the loader fills the weights."""

    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory, fused_qkv: bool = False,
                 fused_gate_up: bool = False):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device="meta")
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, make_linear, fused_qkv, fused_gate_up) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else make_linear(
            "lm_head", cfg.hidden_size, cfg.vocab_size, False)
        # Set by the loader: tokenizer (may be None), where it came from, the Linear format.
        self.tokenizer = None
        self.name = ""
        self.fmt = "dense"

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """input_ids, positions [N] -> final hidden states [N, hidden] (normed)."""
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.rotary, ctx)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens.weight)
        return self.lm_head(hidden)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, T, vocab] logits, causal, no cache."""
        input_ids = torch.as_tensor(input_ids, device=self.device)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        b, t = input_ids.shape
        positions = torch.arange(t, device=self.device).repeat(b)
        hidden = self.forward(input_ids.reshape(-1), positions, CausalNoCache(b, t))
        return self.compute_logits(hidden).view(b, t, -1)

    def quant_linears(self):
        """(name, module) for every Linear built by the format registry."""
        from .linear import QuantLinear

        return [(n, m) for n, m in self.named_modules() if isinstance(m, QuantLinear)]
