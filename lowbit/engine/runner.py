"""Executes one scheduled step: builds the flat token batch, runs the model, returns logits.

A step is a list of (sequence, token count). The model sees all their tokens flattened into one
batch with per-token positions and KV slots; attention goes through the paged cache. Logits are
computed only for the rows that need them: each sequence's last row when it samples, and the
prompt rows of a sequence that reports prompt logprobs. On CUDA a pure-decode step replays a
captured CUDA graph of its batch bucket, and a mixed step (prompt chunks, with or without decodes)
one of its token bucket, unless it asks for prompt logprobs (eager then).
"""

from __future__ import annotations

import torch

from ..config import EngineConfig
from .cuda_graphs import CudaGraphDecoder, CudaGraphMixed
from .kv_cache import KVCache, PagedAttention, padded_tables
from .request import Sequence


class StepResult:
    def __init__(self):
        self.sample_seqs: list[Sequence] = []
        self.sample_logits: torch.Tensor | None = None
        # seq -> (logits rows, the prompt tokens they predict)
        self.prompt_rows: dict[Sequence, tuple[torch.Tensor, list[int]]] = {}


class ModelRunner:
    def __init__(self, model, cache: KVCache, config: EngineConfig, max_model_len: int):
        self.model = model
        self.cache = cache
        self.device = model.device
        self.scale = model.config.head_dim ** -0.5
        self.graphs: CudaGraphDecoder | None = None
        self.mixed: CudaGraphMixed | None = None
        if self.device.type == "cuda" and config.cuda_graphs:
            max_blocks = -(-max_model_len // cache.block_size)
            self.graphs = CudaGraphDecoder(model, cache.k, cache.v, max_blocks, cache.scratch_slot,
                                           max_batch=config.max_num_seqs)
            self.graphs.capture()
            max_tokens = min(config.max_num_batched_tokens, config.cuda_graph_max_tokens
                             if config.cuda_graph_max_tokens is not None else 1 << 30)
            if max_tokens > 0:
                self.mixed = CudaGraphMixed(model, cache.k, cache.v, max_blocks, cache.scratch_slot,
                                            config.max_num_seqs, max_tokens)
                self.mixed.capture(pool=self.graphs.pool)

    def _tensor(self, values, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, batch: list[tuple[Sequence, int]]) -> StepResult:
        ids, pos, slots, spans = [], [], [], []
        sample_rows, prompt_rows = [], {}
        res = StepResult()
        for seq, n in batch:
            s0, start = seq.num_computed, len(ids)
            ids += seq.tokens[s0:s0 + n]
            pos += range(s0, s0 + n)
            slots += self.cache.slots(seq.blocks, s0, s0 + n)
            spans.append((start, n, s0 + n, seq.blocks))
            if s0 + n == len(seq.tokens):
                sample_rows.append(start + n - 1)
                res.sample_seqs.append(seq)
            if seq.prompt_logprobs is not None and len(seq.prompt_logprobs) < seq.prompt_len:
                # Row for position p predicts prompt token p + 1.
                hi = min(s0 + n, seq.prompt_len - 1)
                if hi > s0:
                    prompt_rows[seq] = (list(range(start, start + hi - s0)), seq.tokens[s0 + 1:hi + 1])
        decode_only = all(n == 1 for _, n in batch)
        if self.graphs is not None and decode_only and self.graphs.bucket_for(len(batch)) is not None:
            # One host-to-device copy for everything the graph reads (each copy costs a sync).
            n = len(batch)
            width, tables = padded_tables([s.blocks for s, _ in batch])
            flat = self._tensor(ids + pos + slots + [c for _, _, c, _ in spans] + tables)
            ids_t, pos_t, slots_t, lens_t = flat[:4 * n].view(4, n)
            res.sample_logits = self.graphs.run(ids_t, pos_t, slots_t, flat[4 * n:].view(n, width).int(),
                                                lens_t.int())
            return res
        if self.mixed is not None and not prompt_rows and self.mixed.fits(len(ids), spans):
            res.sample_logits = self.mixed.run(ids, pos, slots, spans, sample_rows)
            return res
        ctx = PagedAttention(self.cache, self._tensor(slots), spans, self.scale)
        hidden = self.model(self._tensor(ids), self._tensor(pos), ctx)
        if sample_rows:
            res.sample_logits = self.model.compute_logits(hidden[self._tensor(sample_rows)]).float()
        for seq, (rows, targets) in prompt_rows.items():
            res.prompt_rows[seq] = (self.model.compute_logits(hidden[self._tensor(rows)]).float(), targets)
        return res
