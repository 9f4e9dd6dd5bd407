"""The decode step used by CUDA graphs and `lowbit bench decode`, checked against cache-free logits."""

from __future__ import annotations

import torch

from lowbit.bench import PrefillContext, bench_decode_model, bench_engine_ttft
from lowbit.engine.cuda_graphs import GraphDecodeContext, default_buckets
from lowbit.quantized_models.synthetic import random_model


def test_paged_prefill_then_decode_equals_no_cache_logits():
    model = random_model("tiny", "fp16", device="cpu", dtype=torch.float32, seed=3)
    cfg = model.config
    block, blocks_per_seq, batch, t = 4, 6, 2, 9
    shape = (cfg.num_layers, batch * blocks_per_seq + 1, block, cfg.num_kv_heads, cfg.head_dim)
    k_cache, v_cache = torch.zeros(shape), torch.zeros(shape)
    # Deliberately scattered pages: sequence b owns blocks b, b+2, b+4, ...
    tables = torch.tensor([[b + 2 * j for j in range(blocks_per_seq)] for b in range(batch)], dtype=torch.int32)

    def slots(pos):
        return (tables.long().gather(1, pos // block) * block + pos % block).reshape(-1)

    ids = torch.randint(0, cfg.vocab_size, (batch, t + 2), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(t).repeat(batch, 1)
    with torch.inference_mode():
        model(ids[:, :t].reshape(-1), pos.reshape(-1), PrefillContext(k_cache, v_cache, slots(pos), batch, t))
        for step in range(2):
            p = torch.full((batch,), t + step)
            ctx = GraphDecodeContext(k_cache, v_cache, slots(p[:, None]), tables, (p + 1).to(torch.int32),
                                     cfg.head_dim ** -0.5)
            got = model.compute_logits(model(ids[:, t + step], p, ctx))
            want = model.logits(ids[:, : t + step + 1])[:, -1]
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bench_decode_runs_on_cpu_eager():
    model = random_model("tiny", "fp16", device="cpu", dtype=torch.float32)
    r = bench_decode_model(model, batch=2, prompt_len=8, gen_len=3, use_graphs=False)
    assert r["tok_s"] > 0 and r["bytes_per_step"] > 0


def test_bench_engine_ttft_runs_on_cpu():
    model = random_model("tiny", "fp16", device="cpu", dtype=torch.float32)
    assert 0 < bench_engine_ttft(model, prompt_len=40, runs=1) < 60


def test_graph_buckets_cover_max_batch():
    assert default_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert default_buckets(12) == [1, 2, 4, 8, 12]
