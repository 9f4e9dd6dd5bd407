"""Engine steps as CUDA graph replays: decode steps per batch-size bucket, mixed steps per token bucket.

A batch-1 decode step of a 7B model is ~200 kernel launches; launched from Python on a slow host
that is milliseconds of pure overhead, more than the kernels take. Captured once per bucket
(1, 2, 4, 8, ... up to max_num_seqs) and replayed, a step costs one launch. A mixed step (prompt
chunks beside decodes) launches as many kernels, more for quantized weights (the prefill path's
transforms and weight decode), and under load every few steps is one: eager, a QTIP 2-bit mixed
step of a 7B model waited on the host for most of its ~58 ms (RESULTS.md). So mixed steps are
captured too, per bucket of token counts, their rows padded to the bucket.

What makes a step capturable: every tensor the step reads lives in a static buffer (ids, positions,
KV slots, block tables, context lengths, attention spans) that is refilled before each replay,
attention goes through the Triton paged kernels (their launch grids depend only on shapes), and no
code in the forward reads a tensor's value on the host. Padded rows write their keys/values into
a scratch slot nobody reads and are dropped from the logits.
"""

from __future__ import annotations

import logging
import time

import torch

from ..kernels.attention import (
    PREFILL_BLOCK_M,
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_prefill_attention,
    paged_prefill_attention_reference,
    prefill_tiles,
)
from ..kernels.fused import store_kv
from ..quantized_models.attention import AttentionContext, slot_views
from .kv_cache import padded_tables

log = logging.getLogger("lowbit")


class _StaticCacheContext(AttentionContext):
    """Attention over the paged cache through static buffers: the step's slots, then whatever the
    subclass's launch reads. No host reads, fixed grids: safe to capture."""

    def __init__(self, k_cache, v_cache, slot_mapping, scale):
        self.k_cache, self.v_cache = k_cache, v_cache  # [layers, blocks, block_size, Hkv, D]
        self.slot_mapping, self.scale = slot_mapping, scale

    def kv_slots(self, layer):
        return slot_views(self.k_cache[layer], self.v_cache[layer], self.slot_mapping)

    def _caches(self, layer, k, v, stored):
        """The layer's caches, with the step's k/v stored unless the model did (`kv_slots`)."""
        if not stored:
            store_kv(k, v, *self.kv_slots(layer))
        return self.k_cache[layer], self.v_cache[layer]


class GraphDecodeContext(_StaticCacheContext):
    """Decode attention: one query a sequence, the paged-decode launch."""

    def __init__(self, k_cache, v_cache, slot_mapping, block_tables, context_lens, scale):
        super().__init__(k_cache, v_cache, slot_mapping, scale)
        self.block_tables, self.context_lens = block_tables, context_lens

    def attend(self, layer, q, k, v, stored=False):
        kc, vc = self._caches(layer, k, v, stored)
        attend = paged_decode_attention if q.is_cuda else paged_decode_attention_reference
        return attend(q, kc, vc, self.block_tables, self.context_lens, self.scale)


class GraphMixedContext(_StaticCacheContext):
    """Attention of a mixed step: every sequence of the step, a decode included (a one-query
    span), is a span of one paged-prefill launch whose grid is a fixed number of tiles; tiles past
    the step's own point at an empty span and do nothing."""

    def __init__(self, k_cache, v_cache, slot_mapping, spans, block_tables, tiles, scale):
        super().__init__(k_cache, v_cache, slot_mapping, scale)
        self.spans, self.block_tables, self.tiles = spans, block_tables, tiles

    def attend(self, layer, q, k, v, stored=False):
        kc, vc = self._caches(layer, k, v, stored)
        out = torch.zeros_like(q)  # padded rows belong to no span: zeros, not stale memory
        if q.is_cuda:
            return paged_prefill_attention(q, kc, vc, self.spans, self.block_tables, self.scale, out, self.tiles)
        return paged_prefill_attention_reference(q, kc, vc, self.spans, self.block_tables, self.scale, out)


def default_buckets(max_batch: int) -> list[int]:
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    return buckets + [max_batch]


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts a mixed step is padded to: powers of two from 16 to 256, then every 256, then
    max_tokens. Padding a large step to the next multiple of 256 costs at most ~1/3 of its device
    time (~1/8 past 1024); the host time it replaces was more than the device's."""
    buckets, t = [], 16
    while t < min(max_tokens, 256):
        buckets.append(t)
        t *= 2
    t = 256
    while t < max_tokens:
        buckets.append(t)
        t += 256
    return buckets + [max_tokens]


class _GraphSet:
    """One CUDA graph per bucket, all in one memory pool, each replaying `_forward` on its bucket's
    static buffers."""

    kind = "step"

    def __init__(self, model, k_cache, v_cache, max_blocks_per_seq: int, scratch_slot: int, buckets: list[int]):
        self.model = model
        self.k_cache, self.v_cache = k_cache, v_cache
        self.max_blocks = max_blocks_per_seq
        self.scratch_slot = scratch_slot
        self.scale = model.config.head_dim ** -0.5
        self.buckets = sorted(set(buckets))
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict]] = {}
        self.capture_seconds = 0.0
        self.pool = None
        self.replays = 0

    def _static(self, b: int) -> dict:
        raise NotImplementedError

    def _forward(self, s: dict) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        """Capture every bucket, largest first so smaller graphs reuse its memory pool (or `pool`,
        another set's: the sets never replay at the same time)."""
        t0 = time.perf_counter()
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
        self.pool = pool
        self.capture_seconds = time.perf_counter() - t0
        log.info("captured %d %s CUDA graphs (%s) in %.1f s", len(self.graphs), self.kind,
                 ",".join(map(str, self.buckets)), self.capture_seconds)

    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)


class CudaGraphDecoder(_GraphSet):
    """Captures `model` decode steps (1 new token per sequence) and replays them by bucket."""

    kind = "decode"

    def __init__(self, model, k_cache, v_cache, max_blocks_per_seq: int, scratch_slot: int,
                 max_batch: int = 64, buckets: list[int] | None = None):
        super().__init__(model, k_cache, v_cache, max_blocks_per_seq, scratch_slot,
                         buckets or default_buckets(max_batch))

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
        ctx = GraphDecodeContext(self.k_cache, self.v_cache, s["slot_mapping"], s["block_tables"],
                                 s["context_lens"], self.scale)
        hidden = self.model(s["input_ids"], s["positions"], ctx)
        return self.model.compute_logits(hidden).float()

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


class CudaGraphMixed(_GraphSet):
    """Captures mixed steps (prompt chunks and decodes, any mix) per bucket of token counts.

    A bucket of T tokens holds: ids, positions and slots [T] and the rows to sample [S] (int64, one
    buffer), the spans (first row, queries, context) [S + 1, 3] with an empty span last, and the
    tile list [ceil(T / 64) + S, 2] (int32, one buffer), and the spans' block tables [S + 1, max
    blocks]; S = min(max_seqs, T). `load` fills them from the host in three copies."""

    kind = "mixed-step"

    def __init__(self, model, k_cache, v_cache, max_blocks_per_seq: int, scratch_slot: int, max_seqs: int,
                 max_tokens: int, buckets: list[int] | None = None):
        super().__init__(model, k_cache, v_cache, max_blocks_per_seq, scratch_slot,
                         buckets or token_buckets(max_tokens))
        self.max_seqs = max_seqs

    def _sizes(self, t: int) -> tuple[int, int]:
        """(spans, tiles) a bucket of t tokens has room for: a sequence takes at least one token,
        and a span of nq queries ceil(nq / 64) tiles, so ceil(t / 64) + spans bound them."""
        S = min(self.max_seqs, t)
        return S, -(-t // PREFILL_BLOCK_M) + S

    def _static(self, t: int) -> dict:
        dev = self.model.device
        S, ntiles = self._sizes(t)
        i64 = torch.zeros(3 * t + S, dtype=torch.long, device=dev)
        i32 = torch.zeros(3 * (S + 1) + 2 * ntiles, dtype=torch.int32, device=dev)
        s = {"t": t, "S": S, "ntiles": ntiles, "i64": i64, "i32": i32,
             "ids": i64[:t], "positions": i64[t:2 * t], "slots": i64[2 * t:3 * t], "sample": i64[3 * t:],
             "spans": i32[:3 * (S + 1)].view(S + 1, 3), "tiles": i32[3 * (S + 1):].view(ntiles, 2),
             "tables": torch.zeros(S + 1, self.max_blocks, dtype=torch.int32, device=dev)}
        s["slots"].fill_(self.scratch_slot)
        s["tiles"][:, 0] = S  # every tile on the empty span until a step says otherwise
        return s

    def _forward(self, s: dict) -> torch.Tensor:
        ctx = GraphMixedContext(self.k_cache, self.v_cache, s["slots"], s["spans"], s["tables"], s["tiles"],
                                self.scale)
        hidden = self.model(s["ids"], s["positions"], ctx)
        return self.model.compute_logits(hidden[s["sample"]]).float()

    def fits(self, n_tokens: int, spans: list) -> bool:
        """Whether a step of n_tokens rows and these spans ((first row, queries, context, blocks)
        each) fits a bucket: its row count, span count and tile count."""
        t = self.bucket_for(n_tokens)
        if t is None:
            return False
        S, ntiles = self._sizes(t)
        return len(spans) <= S and sum(-(-nq // PREFILL_BLOCK_M) for _, nq, _, _ in spans) <= ntiles

    def load(self, s: dict, ids: list[int], positions: list[int], slots: list[int],
             spans: list[tuple[int, int, int, list[int]]], sample_rows: list[int]) -> None:
        """Fill a bucket's static buffers for one step (`fits` said yes)."""
        t, S, ntiles = s["t"], s["S"], s["ntiles"]
        pad = t - len(ids)
        meta = [(start, nq, ctx) for start, nq, ctx, _ in spans]
        tiles = prefill_tiles(meta)
        bs = self.k_cache.shape[2]
        width, tables = padded_tables([blocks[: -(-ctx // bs)] for _, _, ctx, blocks in spans])
        i64 = (ids + [0] * pad + positions + [0] * pad + slots + [self.scratch_slot] * pad
               + sample_rows + [0] * (S - len(sample_rows)))
        i32 = ([v for m in meta for v in m] + [0] * (3 * (S + 1 - len(meta)))
               + tiles + [S, 0] * (ntiles - len(tiles) // 2))
        s["i64"].copy_(torch.tensor(i64, dtype=torch.long))
        s["i32"].copy_(torch.tensor(i32, dtype=torch.int32))
        s["tables"][: len(spans), :width].copy_(torch.tensor(tables, dtype=torch.int32).view(len(spans), width))

    @torch.inference_mode()
    def run(self, ids, positions, slots, spans, sample_rows) -> torch.Tensor | None:
        """One mixed step -> float32 logits [len(sample_rows), vocab] (None when no row samples)."""
        g, s = self.graphs[self.bucket_for(len(ids))]
        self.load(s, ids, positions, slots, spans, sample_rows)
        g.replay()
        self.replays += 1
        return s["logits"][: len(sample_rows)] if sample_rows else None

    @torch.inference_mode()
    def eager(self, ids, positions, slots, spans, sample_rows) -> torch.Tensor:
        """What `run` replays, run eagerly on fresh buffers of the step's bucket (any device): the
        padding and the span attention without a graph, for tests."""
        s = self._static(self.bucket_for(len(ids)))
        self.load(s, ids, positions, slots, spans, sample_rows)
        return self._forward(s)[: len(sample_rows)]
