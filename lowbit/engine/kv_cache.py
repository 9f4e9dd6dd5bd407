"""The paged KV cache: a pool of fixed-size blocks and the attention context that reads it.

Keys and values live in two tensors [layers, blocks, block_size, kv_heads, head_dim]; token t of a
sequence sits in block `blocks[t // block_size]` at offset `t % block_size` (its "slot" is
block * block_size + offset). Sequences take blocks as they grow and give them back the moment
they finish, so memory follows the tokens actually held, not the maximum context.
"""

from __future__ import annotations

import torch

from ..kernels.attention import (
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_prefill_attention,
    paged_prefill_attention_reference,
    prefill_tiles,
)
from ..kernels.fused import store_kv
from ..quantized_models.attention import AttentionContext, slot_views


class OutOfBlocks(Exception):
    pass


class BlockPool:
    """Free-list allocator over block ids. The last block is kept back as the scratch block that
    padded rows of a CUDA-graph batch write into."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks - 1
        self._free = list(range(num_blocks - 2, -1, -1))  # pop() hands out low ids first

    @property
    def total(self) -> int:
        return self.num_blocks - 1

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        blocks.clear()


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 device, dtype):
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)

    @property
    def scratch_slot(self) -> int:
        return self.pool.scratch_block * self.block_size

    @staticmethod
    def bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def blocks_needed(self, blocks: list[int], num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(blocks))

    def slots(self, blocks: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [blocks[t // bs] * bs + t % bs for t in range(start, end)]


def padded_tables(tables: list[list[int]]) -> tuple[int, list[int]]:
    """(width, flat row-major list): block tables of unequal lengths padded with block 0 to the
    longest, the layout the attention kernels and the decode graphs read."""
    width = max(len(t) for t in tables)
    return width, [b for t in tables for b in t + [0] * (width - len(t))]


class PagedAttention(AttentionContext):
    """Attention for one engine step over the paged cache.

    The step's N tokens are grouped per sequence: `spans` lists (start row, query count, context
    length after this step, block table). Each call writes the step's k/v into their slots, then
    attends: the single-query rows (decodes) in one batched paged-decode call, the multi-query spans
    (prefill chunks) all in one paged-prefill call (Triton on CUDA; on CPU the reference, each chunk
    over its gathered context). Mixed steps are the common
    case under load (new requests join running ones), so decodes must not fall to the per-sequence
    path: under 64 streams it took 70% of the engine's time (benchmarks/RESULTS.md).
    """

    def __init__(self, cache: KVCache, slot_mapping: torch.Tensor, spans: list[tuple[int, int, int, list[int]]],
                 scale: float):
        self.cache = cache
        self.slot_mapping = slot_mapping
        self.scale = scale
        dev = slot_mapping.device
        bs = cache.block_size
        decodes = [(start, ctx, blocks) for start, nq, ctx, blocks in spans if nq == 1]
        prefills = [(start, nq, ctx, blocks[: -(-ctx // bs)]) for start, nq, ctx, blocks in spans if nq > 1]
        self.decode_only = not prefills
        self.decode_rows = None
        if prefills:
            # All chunks' metadata in one host-to-device copy, made once per step: (start, nq, ctx)
            # per chunk, their page tables, and the kernel's tiles.
            width, tables = padded_tables([b for *_, b in prefills])
            meta = [(start, nq, ctx) for start, nq, ctx, _ in prefills]
            tiles = prefill_tiles(meta)
            flat = torch.tensor([v for m in meta for v in m] + tables + tiles, dtype=torch.int32).to(dev)
            n_meta, n_tab = 3 * len(meta), len(tables)
            self.prefill_spans = flat[:n_meta].view(-1, 3)
            self.prefill_tables = flat[n_meta:n_meta + n_tab].view(len(meta), width)
            self.prefill_tiles = flat[n_meta + n_tab:].view(-1, 2)
        if decodes:
            width, tables = padded_tables([b for *_, b in decodes])
            self.block_tables = torch.tensor(tables, dtype=torch.int32, device=dev).view(-1, width)
            self.context_lens = torch.tensor([c for _, c, _ in decodes], dtype=torch.int32, device=dev)
            if not self.decode_only:  # else the decodes are all the rows, in order
                self.decode_rows = torch.tensor([start for start, _, _ in decodes], device=dev)

    def _decode(self, q, kc, vc):
        attend = paged_decode_attention if q.is_cuda else paged_decode_attention_reference
        return attend(q, kc, vc, self.block_tables, self.context_lens, self.scale)

    def kv_slots(self, layer):
        return slot_views(self.cache.k[layer], self.cache.v[layer], self.slot_mapping)

    def attend(self, layer, q, k, v, stored=False):
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        if not stored:
            store_kv(k, v, *self.kv_slots(layer))
        if self.decode_only:
            return self._decode(q, kc, vc)
        out = torch.empty_like(q)
        if self.decode_rows is not None:
            out.index_copy_(0, self.decode_rows, self._decode(q.index_select(0, self.decode_rows), kc, vc))
        if q.is_cuda:
            paged_prefill_attention(q, kc, vc, self.prefill_spans, self.prefill_tables, self.scale, out,
                                    self.prefill_tiles)
        else:
            paged_prefill_attention_reference(q, kc, vc, self.prefill_spans, self.prefill_tables, self.scale, out)
        return out
