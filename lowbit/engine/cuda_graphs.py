"""Decode steps as CUDA graph replays, one graph per batch-size bucket.

A batch-1 decode step of a 7B model is ~200 kernel launches; launched from Python on a slow host
that is milliseconds of pure overhead, more than the kernels take. Captured once per bucket
(1, 2, 4, 8, ... up to max_num_seqs) and replayed, a step costs one launch.

What makes a step capturable: every tensor the step reads lives in a static buffer (ids, positions,
KV slots, block tables, context lengths) that is refilled before each replay, attention goes
through the Triton paged-decode kernel (its launch grid depends only on shapes), and no code in the
forward reads a tensor's value on the host. Rows of a bucket beyond the real batch write their
keys/values into a scratch slot nobody reads and are dropped from the logits.
"""

from __future__ import annotations

import logging
import time

import torch

from ..kernels.fused import store_kv
from ..quantized_models.attention import AttentionContext, slot_views

log = logging.getLogger("lowbit")


class GraphDecodeContext(AttentionContext):
    """Decode attention over the paged cache that is safe to capture: no host reads, fixed grids."""

    def __init__(self, k_cache, v_cache, slot_mapping, block_tables, context_lens, scale):
        self.k_cache, self.v_cache = k_cache, v_cache  # [layers, blocks, block_size, Hkv, D]
        self.slot_mapping, self.block_tables, self.context_lens = slot_mapping, block_tables, context_lens
        self.scale = scale

    def kv_slots(self, layer):
        return slot_views(self.k_cache[layer], self.v_cache[layer], self.slot_mapping)

    def attend(self, layer, q, k, v, stored=False):
        from ..kernels.attention import paged_decode_attention, paged_decode_attention_reference

        kc, vc = self.k_cache[layer], self.v_cache[layer]
        if not stored:
            store_kv(k, v, *self.kv_slots(layer))
        attend = paged_decode_attention if q.is_cuda else paged_decode_attention_reference
        return attend(q, kc, vc, self.block_tables, self.context_lens, self.scale)


def default_buckets(max_batch: int) -> list[int]:
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    return buckets + [max_batch]


class CudaGraphDecoder:
    """Captures `model` decode steps (1 new token per sequence) and replays them by bucket."""

    def __init__(self, model, k_cache, v_cache, max_blocks_per_seq: int, scratch_slot: int,
                 max_batch: int = 64, buckets: list[int] | None = None):
        self.model = model
        self.k_cache, self.v_cache = k_cache, v_cache
        self.max_blocks = max_blocks_per_seq
        self.scratch_slot = scratch_slot
        self.buckets = sorted(buckets or default_buckets(max_batch))
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict]] = {}
        self.capture_seconds = 0.0

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def _static(self, b: int) -> dict:
        dev = self.model.device
        return {
            "input_ids": torch.zeros(b, dtype=torch.long, device=dev),
            "positions": torch.zeros(b, dtype=torch.long, device=dev),
            "slot_mapping": torch.full((b,), self.scratch_slot, dtype=torch.long, device=dev),
            "block_tables": torch.zeros(b, self.max_blocks, dtype=torch.int32, device=dev),
            "context_lens": torch.ones(b, dtype=torch.int32, device=dev),
        }

    def _forward(self, s: dict) -> torch.Tensor:
        cfg = self.model.config
        ctx = GraphDecodeContext(self.k_cache, self.v_cache, s["slot_mapping"], s["block_tables"],
                                 s["context_lens"], cfg.head_dim ** -0.5)
        hidden = self.model(s["input_ids"], s["positions"], ctx)
        return self.model.compute_logits(hidden).float()

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so smaller graphs reuse its memory pool."""
        t0 = time.perf_counter()
        pool = None
        for b in reversed(self.buckets):
            s = self._static(b)
            # Warm-up on a side stream: compiles and autotunes the Triton kernels outside capture.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._forward(s)
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                s["logits"] = self._forward(s)
            pool = g.pool()
            self.graphs[b] = (g, s)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0
        log.info("captured %d decode CUDA graphs (batch %s) in %.1f s", len(self.graphs),
                 ",".join(map(str, self.buckets)), self.capture_seconds)

    def bucket_for(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    @torch.inference_mode()
    def run(self, input_ids, positions, slot_mapping, block_tables, context_lens) -> torch.Tensor:
        """One decode step for `batch` sequences -> float32 logits [batch, vocab]."""
        n = input_ids.shape[0]
        g, s = self.graphs[self.bucket_for(n)]
        s["input_ids"][:n].copy_(input_ids)
        s["positions"][:n].copy_(positions)
        s["slot_mapping"][:n].copy_(slot_mapping)
        s["slot_mapping"][n:].fill_(self.scratch_slot)
        s["block_tables"][:n, : block_tables.shape[1]].copy_(block_tables)
        s["context_lens"][:n].copy_(context_lens)
        s["context_lens"][n:].fill_(1)
        g.replay()
        return s["logits"][:n]
