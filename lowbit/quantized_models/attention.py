"""Where a decoder layer's keys and values go: the attention contexts the model calls.

The model flattens every step into N tokens and calls `ctx.attend(layer, q, k, v)` with
q [N, Hq, D] and k, v [N, Hkv, D] (rotary already applied). The context stores k/v wherever its
cache lives and returns the attention output [N, Hq, D]. So the model never knows whether it runs
a cache-free forward, a contiguous cache or the serving engine's paged cache. A context whose cache
is addressed by slot (the paged ones) says so through `kv_slots`; the model then writes k and v in
its rotary launch and calls `attend(..., stored=True)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class AttentionContext:
    def kv_slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(k cache, v cache [slots, Hkv, D], slot of each of the step's tokens [N]) when this layer's
        cache takes k/v by slot, for the caller to write them (`fused.rotary_` with a store, or
        `fused.store_kv`); None: `attend` stores them."""
        return None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               stored: bool = False) -> torch.Tensor:
        raise NotImplementedError


def slot_views(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor):
    """A layer's paged caches [blocks, block_size, Hkv, D] seen as [slots, Hkv, D], with the step's
    slots: what `kv_slots` returns."""
    hkv, d = k_cache.shape[-2], k_cache.shape[-1]
    return k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d), slots


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int = 0,
                     scale: float | None = None) -> torch.Tensor:
    """q [B, Hq, T, D] against k, v [B, Hkv, S, D], query i sitting at key position offset + i;
    scale None: 1/sqrt(D)."""
    t, s = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if offset == 0 and t == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=scale)
    mask = torch.arange(s, device=q.device)[None, :] <= (offset + torch.arange(t, device=q.device))[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=scale)


class CausalNoCache(AttentionContext):
    """B sequences of the same length T, flattened row-major; nothing is cached."""

    def __init__(self, batch: int, seq_len: int):
        self.batch, self.seq_len = batch, seq_len

    def attend(self, layer, q, k, v, stored=False):
        b, t = self.batch, self.seq_len
        q, k, v = (x.view(b, t, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
        out = causal_attention(q, k, v)
        return out.transpose(1, 2).reshape(b * t, out.shape[1], out.shape[3])


class ContiguousKVCache(AttentionContext):
    """A preallocated [layers, B, Hkv, max_len, D] cache for B sequences that advance together.

    The caller sets the number of tokens already cached in `start` before a forward and advances
    it after; each forward appends T tokens per sequence.
    """

    def __init__(self, num_layers, batch, num_kv_heads, head_dim, max_len, device, dtype):
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.batch, self.max_len, self.start = batch, max_len, 0

    def attend(self, layer, q, k, v, stored=False):
        b = self.batch
        t = q.shape[0] // b
        end = self.start + t
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; this step needs {end}")
        q, k, v = (x.view(b, t, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
        self.k[layer, :, :, self.start:end] = k
        self.v[layer, :, :, self.start:end] = v
        out = causal_attention(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end], offset=self.start)
        return out.transpose(1, 2).reshape(b * t, out.shape[1], out.shape[3])
