"""The serving engine on CPU with the real SmolLM2 model: batching, paging, sampling, detokenizing."""

import asyncio

import pytest
import torch

from lowbit.config import EngineConfig
from lowbit.engine import Engine, QueueFullError, SamplingParams
from lowbit.engine.detokenizer import IncrementalDetokenizer
from lowbit.engine.kv_cache import BlockPool, OutOfBlocks
from lowbit.engine.sampler import hash_uniform

PROMPTS = ["The sky is", "Once upon a time, in a small village,", "def fibonacci(n):", "1, 2, 3, 4,",
           "The capital of France is", "Water boils at"]


def make_engine(model, **kw) -> Engine:
    kw.setdefault("kv_cache_blocks", 64)
    return Engine(EngineConfig(**kw), model=model)


def solo(engine, ids, params):
    return engine.run([engine.make_request(ids, params)])[0]


@pytest.fixture(scope="module")
def engine(smollm2):
    return make_engine(smollm2)


def encode(engine, text):
    return engine.tokenizer.encode(text)


def test_batched_greedy_equals_each_alone_and_the_uncached_model(engine, smollm2):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [encode(engine, p) for p in PROMPTS]
    together = engine.run([engine.make_request(p, params) for p in prompts])
    for p, out in zip(prompts, together, strict=False):
        assert out.outputs[0].token_ids == solo(engine, p, params).outputs[0].token_ids
    # The first prompt, recomputed without any cache, token by token.
    ids = torch.tensor([prompts[0]])
    for tok in together[0].outputs[0].token_ids:
        assert int(smollm2.logits(ids)[0, -1].argmax()) == tok
        ids = torch.cat([ids, torch.tensor([[tok]])], 1)
    assert engine.cache.pool.free == engine.cache.pool.total


def test_chunked_prefill_and_preemption_do_not_change_outputs(smollm2, engine):
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = [encode(engine, p * 2) for p in PROMPTS[:4]]
    want = [solo(engine, p, params).outputs[0].token_ids for p in prompts]
    # 7-token steps force chunked prefill; 5 blocks (80 tokens) cannot hold the four 25-40-token sequences.
    tight = make_engine(smollm2, kv_cache_blocks=6, max_num_batched_tokens=7, max_num_seqs=4)
    outs = tight.run([tight.make_request(p, params) for p in prompts])
    assert [o.outputs[0].token_ids for o in outs] == want
    assert tight.scheduler.preemptions > 0
    assert tight.cache.pool.free == tight.cache.pool.total


def test_seed_reproducible_whatever_the_batch(engine):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    ids = encode(engine, PROMPTS[1])
    alone = solo(engine, ids, params).outputs[0].token_ids
    others = [engine.make_request(encode(engine, p), SamplingParams(max_tokens=16, temperature=0.7))
              for p in PROMPTS]
    mixed = engine.run(others[:3] + [engine.make_request(ids, params)] + others[3:])
    assert mixed[3].outputs[0].token_ids == alone
    n2 = solo(engine, ids, SamplingParams(max_tokens=16, temperature=1.0, seed=1234, n=2))
    assert n2.outputs[0].token_ids != n2.outputs[1].token_ids  # choices use seed + i


def test_sampling_knobs(engine):
    ids = encode(engine, PROMPTS[0])
    greedy = solo(engine, ids, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)).outputs[0]
    for p in (SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=0, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-6, seed=0, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=1.0, min_p=1.0, seed=0, ignore_eos=True)):
        assert solo(engine, ids, p).outputs[0].token_ids == greedy.token_ids
    # Penalties, against a step-by-step recomputation with the OpenAI/vLLM rules: presence and
    # frequency count generated tokens only, repetition also the prompt's.
    ids = encode(engine, "1, 1, 1, 1, 1, 1,")
    p = SamplingParams(max_tokens=6, temperature=0, presence_penalty=1.5, frequency_penalty=0.5,
                       repetition_penalty=1.3, ignore_eos=True)
    got = solo(engine, ids, p).outputs[0].token_ids
    seq = list(ids)
    for _ in range(6):
        logits = engine.model.logits(torch.tensor([seq]))[0, -1].float().clone()
        seen = torch.tensor(sorted(set(seq)))
        logits[seen] = torch.where(logits[seen] > 0, logits[seen] / 1.3, logits[seen] * 1.3)
        counts = torch.bincount(torch.tensor(seq[len(ids):], dtype=torch.long), minlength=logits.numel())
        logits -= 0.5 * counts + 1.5 * (counts > 0).float()
        seq.append(int(logits.argmax()))
    assert got == seq[len(ids):]
    assert got != solo(engine, ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)).outputs[0].token_ids
    assert solo(engine, ids, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)).outputs[0].finish_reason \
        == "length"


def test_uniform_noise_is_uniform_and_keyed():
    u = hash_uniform(torch.tensor([1, 2]), torch.tensor([0, 0]), 100_000)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert not torch.equal(u[0], u[1])
    assert torch.equal(hash_uniform(torch.tensor([2]), torch.tensor([0]), 100_000)[0], u[1])


def test_logprobs_and_prompt_logprobs_match_the_model(engine, smollm2):
    ids = encode(engine, PROMPTS[4])
    out = solo(engine, ids, SamplingParams(max_tokens=3, temperature=0, logprobs=3, prompt_logprobs=2))
    full = ids + out.outputs[0].token_ids
    lp = torch.log_softmax(smollm2.logits(torch.tensor([full]))[0].float(), -1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for p in range(1, len(ids)):
        e = out.prompt_logprobs[p]
        assert e["token_id"] == ids[p] and e["logprob"] == pytest.approx(float(lp[p - 1, ids[p]]), abs=1e-4)
        assert len(e["top"]) == 2
    for j, e in enumerate(out.outputs[0].logprobs):
        row = lp[len(ids) - 1 + j]
        assert e["logprob"] == pytest.approx(float(row.max()), abs=1e-4)
        assert [t for t, _ in e["top"]] == row.topk(3).indices.tolist()


def test_stop_strings_cut_text_and_stop(engine):
    ids = encode(engine, "1, 2, 3, 4,")
    out = solo(engine, ids, SamplingParams(max_tokens=30, temperature=0, stop=[" 7"])).outputs[0]
    assert out.finish_reason == "stop" and " 7" not in out.text and out.text.startswith(" 5, 6,")


def test_detokenizer_never_splits_characters_and_holds_back_stop_prefixes(engine):
    tok = engine.tokenizer
    text = "Grüße aus Köln 🙂 — 世界, done"
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok, [], [])
    seen = []
    for t in ids:
        d.add(t)
        seen.append(d.visible_text(False))
    assert all("\ufffd" not in s for s in seen) and seen[-1] == tok.decode(ids)
    d = IncrementalDetokenizer(tok, [], ["STOP here"])
    for t in tok.encode("abc STOP"):
        d.add(t)
    assert d.visible_text(False) == "abc " and d.visible_text(True) == "abc STOP"


def test_detokenizer_fast_path_gives_the_wrappers_text(engine):
    """The Rust decode called directly (the fast path) and transformers' decode give the same text
    for random token streams, special tokens included."""
    import random

    tok = engine.tokenizer
    assert IncrementalDetokenizer(tok, [], [])._decode_fn == tok.backend_tokenizer.decode
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(tok)) for _ in range(40)] + tok.encode(" café 🙂 <|im_end|> ok")
        fast, slow = IncrementalDetokenizer(tok, ids[:3], []), IncrementalDetokenizer(tok, ids[:3], [])
        slow._decode_fn = tok.decode
        for t in ids[3:]:
            fast.add(t)
            slow.add(t)
        assert fast.text == slow.text


def test_limits_and_queue(smollm2):
    e = make_engine(smollm2, max_queue=1, max_model_len=64)
    ids = encode(e, "hello")
    with pytest.raises(ValueError, match="context"):
        e.make_request(list(range(1, 65)), SamplingParams())
    with pytest.raises(ValueError, match="max_tokens"):
        e.make_request(ids, SamplingParams(max_tokens=64))
    with pytest.raises(ValueError, match="empty"):
        e.make_request([], SamplingParams())
    e.submit(e.make_request(ids, SamplingParams()))
    with pytest.raises(QueueFullError):
        e.make_request(ids, SamplingParams())
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="cuda_graph_max_tokens must be >= 0"):
        EngineConfig(cuda_graph_max_tokens=-1)
    assert e.info()["mixed_graph_tokens"] == 0  # CPU: every step eager


def test_async_stream_abort_frees_blocks(smollm2):
    e = make_engine(smollm2)

    async def main():
        agen = e.generate(encode(e, PROMPTS[1]), SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        seen = 0
        async for _out in agen:
            seen += 1
            if seen == 3:
                break
        await agen.aclose()
        for _ in range(100):
            if e.cache.pool.free == e.cache.pool.total and not e.scheduler.running:
                break
            await asyncio.sleep(0.05)
        full = [o async for o in e.generate(encode(e, PROMPTS[0]), SamplingParams(max_tokens=5, temperature=0))]
        return full

    try:
        outs = asyncio.run(main())
    finally:
        e.shutdown()
    assert e.cache.pool.free == e.cache.pool.total
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) >= 1


def test_block_pool():
    pool = BlockPool(5)
    assert pool.total == 4 and pool.scratch_block == 4
    got = pool.allocate(4)
    assert sorted(got) == [0, 1, 2, 3]
    with pytest.raises(OutOfBlocks):
        pool.allocate(1)
    pool.release(got)
    assert pool.free == 4 and got == []


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["fp16", "qtip2", "gptq4"])
def test_engine_on_cuda_graphs_equal_eager_and_solo(variant):
    """Decode and mixed steps replayed from CUDA graphs give the eager engine's tokens (prompts
    arriving mid-decode make mixed steps; 70 prompt tokens in one step take QTIP's prefill path)."""
    from lowbit.quantized_models.synthetic import random_model

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = random_model("tiny", variant, device="cuda", dtype=torch.float16)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (int(n),), generator=g).tolist() for n in (5, 17, 33, 9, 64, 70)]
    runs = {}
    for graphs in (True, False):
        e = make_engine(model, cuda_graphs=graphs, max_num_seqs=8, prefill_wait_steps=0)
        assert (e.runner.graphs is not None) == graphs and (e.runner.mixed is not None) == graphs
        reqs = [e.make_request(p, params) for p in prompts]
        for r in reqs[:3]:
            e.submit(r)
        for _ in range(3):  # the others join while these decode: mixed steps
            e.step()
        e.run(reqs[3:])
        while not all(r.finished for r in reqs):
            e.step()
        runs[graphs] = [r.output().outputs[0].token_ids for r in reqs]
        assert runs[graphs][2] == solo(e, prompts[2], params).outputs[0].token_ids
        assert e.cache.pool.free == e.cache.pool.total
        if graphs:
            assert e.runner.mixed.replays >= 3
    assert runs[True] == runs[False]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["fp16", "qtip2"])
def test_mixed_step_graph_replay_equals_the_eager_step(variant):
    from lowbit.engine.cuda_graphs import CudaGraphMixed
    from lowbit.engine.kv_cache import PagedAttention

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, cache, (ids, pos, slots, spans, sample) = _mixed_step_setup(variant, "cuda", torch.float16)
    k0, v0 = cache.k.clone(), cache.v.clone()
    mixed = CudaGraphMixed(model, cache.k, cache.v, 8, cache.scratch_slot, max_seqs=4, max_tokens=128)
    mixed.capture()
    assert sorted(mixed.graphs) == [16, 32, 64, 128]
    cache.k.copy_(k0)
    cache.v.copy_(v0)
    dev = lambda v: torch.tensor(v, device="cuda")  # noqa: E731
    with torch.inference_mode():
        hidden = model(dev(ids), dev(pos), PagedAttention(cache, dev(slots), spans, model.config.head_dim ** -0.5))
        want = model.compute_logits(hidden[dev(sample)]).float()
    for _ in range(2):  # a replay, then another on the same buffers
        cache.k.copy_(k0)
        cache.v.copy_(v0)
        got = mixed.run(ids, pos, slots, spans, sample)
        assert torch.allclose(got, want, atol=2e-2, rtol=2e-2), (got - want).abs().max()


def test_random_model_spec_runs_on_the_engine_with_a_real_tokenizer():
    e = Engine(EngineConfig(model="random:tiny:qtip2", device="cpu", kv_cache_blocks=32))
    try:
        assert e.info()["format"] == "qtip" and e.model_name == "random:tiny:qtip2"
        assert e.model.config.vocab_size == len(e.tokenizer)  # resized to the (default SmolLM2) tokenizer
        out = e.run([e.make_request(e.tokenizer.encode("Hi"), SamplingParams(max_tokens=4, temperature=0,
                                                                               ignore_eos=True))])
        assert len(out[0].outputs[0].token_ids) == 4
    finally:
        e.shutdown()
    with pytest.raises(ValueError, match="random:<shape>:<variant>"):
        Engine(EngineConfig(model="random:llama-2-7b:int5", device="cpu"))


def test_mixed_step_attends_decodes_batched_and_prefills_per_span():
    """A step with a prefill chunk between two decodes equals attention over each sequence's
    whole history computed directly."""
    from lowbit.engine.kv_cache import KVCache, PagedAttention
    from lowbit.quantized_models.attention import causal_attention

    torch.manual_seed(0)
    hq, hkv, d, bs = 4, 2, 8, 4
    cache = KVCache(1, 16, bs, hkv, d, "cpu", torch.float32)
    lens = {"a": 6, "b": 9, "c": 3}  # history already cached (a, c decode one token; b prefills 5 more)
    blocks = {"a": [0, 1], "b": [2, 3, 4, 5], "c": [6]}
    hist = {s: (torch.randn(n, hkv, d), torch.randn(n, hkv, d)) for s, n in lens.items()}
    for s, (k, v) in hist.items():
        idx = torch.tensor(cache.slots(blocks[s], 0, lens[s]))
        cache.k[0].view(-1, hkv, d).index_copy_(0, idx, k)
        cache.v[0].view(-1, hkv, d).index_copy_(0, idx, v)
    order = [("a", 1), ("b", 5), ("c", 1)]
    spans, slots, start = [], [], 0
    for s, nq in order:
        spans.append((start, nq, lens[s] + nq, blocks[s]))
        slots += cache.slots(blocks[s], lens[s], lens[s] + nq)
        start += nq
    q, k, v = torch.randn(start, hq, d), torch.randn(start, hkv, d), torch.randn(start, hkv, d)
    ctx = PagedAttention(cache, torch.tensor(slots), spans, d ** -0.5)
    assert not ctx.decode_only and ctx.decode_rows.tolist() == [0, 6]
    out = ctx.attend(0, q, k, v)
    for (s, nq), (st, *_rest) in zip(order, spans, strict=True):
        keys = torch.cat([hist[s][0], k[st:st + nq]]).transpose(0, 1)[None]
        vals = torch.cat([hist[s][1], v[st:st + nq]]).transpose(0, 1)[None]
        want = causal_attention(q[st:st + nq].transpose(0, 1)[None], keys, vals, offset=lens[s])[0].transpose(0, 1)
        assert torch.allclose(out[st:st + nq], want, atol=1e-5), s


def test_release_device_memory_frees_a_dropped_engine():
    """An Engine sits in reference cycles, so `del` alone leaves its KV cache and model to Python's
    cyclic collector; `release_device_memory` (what the benchmarks call between models) frees it."""
    import gc
    import weakref

    from lowbit.bench import release_device_memory

    e = Engine(EngineConfig(model="random:tiny:fp16", device="cpu", kv_cache_blocks=16))
    alive = weakref.ref(e)
    e.shutdown()
    gc.disable()
    try:
        del e
        release_device_memory()
        assert alive() is None
    finally:
        gc.enable()


def _mixed_step_setup(variant: str, device: str, dtype):
    """A tiny model and a cache holding two sequences' histories; then one step's rows: d decodes,
    b prefills 6 tokens, a decodes (8 rows)."""
    from lowbit.engine.kv_cache import KVCache, PagedAttention
    from lowbit.quantized_models.synthetic import random_model

    model = random_model("tiny", variant, device=device, dtype=dtype)
    mc = model.config
    cache = KVCache(mc.num_layers, 16, 4, mc.num_kv_heads, mc.head_dim, device, dtype)
    g = torch.Generator().manual_seed(3)
    tok = lambda n: torch.randint(0, mc.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    blocks = {"a": [0, 1, 2], "d": [5, 6], "b": [3, 4]}
    hist = {"a": tok(9), "d": tok(5)}
    spans, ids, pos, slots = [], [], [], []
    for s in ("a", "d"):  # step 1 (eager): both histories prefilled
        n = len(hist[s])
        spans.append((len(ids), n, n, blocks[s]))
        ids, pos, slots = ids + hist[s], pos + list(range(n)), slots + cache.slots(blocks[s], 0, n)
    dev = lambda v: torch.tensor(v, device=device)  # noqa: E731
    model(dev(ids), dev(pos), PagedAttention(cache, dev(slots), spans, mc.head_dim ** -0.5))
    rows = [("d", 5, 1), ("b", 0, 6), ("a", 9, 1)]  # (sequence, tokens cached, tokens this step)
    spans, ids, pos, slots = [], [], [], []
    for s, cached, n in rows:
        spans.append((len(ids), n, cached + n, blocks[s]))
        ids += tok(n)
        pos += range(cached, cached + n)
        slots += cache.slots(blocks[s], cached, cached + n)
    return model, cache, (ids, pos, slots, spans, [0, 6, 7])


@pytest.mark.parametrize("variant", ["fp16", "qtip2"])
def test_mixed_step_graph_path_equals_the_eager_step(variant):
    """What a mixed-step CUDA graph replays (rows padded to the token bucket, every sequence a span
    of the prefill attention, padded tiles on an empty span), run eagerly on the CPU: the same
    logits and the same keys/values in the cache as the eager step."""
    from lowbit.engine.cuda_graphs import CudaGraphMixed
    from lowbit.engine.kv_cache import PagedAttention

    model, cache, (ids, pos, slots, spans, sample) = _mixed_step_setup(variant, "cpu", torch.float32)
    k0, v0 = cache.k.clone(), cache.v.clone()
    mc = model.config
    hidden = model(torch.tensor(ids), torch.tensor(pos), PagedAttention(cache, torch.tensor(slots), spans,
                                                                         mc.head_dim ** -0.5))
    want = model.compute_logits(hidden[torch.tensor(sample)]).float()
    k_eager, v_eager = cache.k.clone(), cache.v.clone()
    cache.k.copy_(k0)
    cache.v.copy_(v0)
    mixed = CudaGraphMixed(model, cache.k, cache.v, max_blocks_per_seq=8, scratch_slot=cache.scratch_slot,
                           max_seqs=4, max_tokens=64)
    assert mixed.bucket_for(len(ids)) == 16 and mixed.fits(len(ids), spans)
    got = mixed.eager(ids, pos, slots, spans, sample)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    real = torch.ones(cache.k.shape[1], dtype=torch.bool)
    real[cache.pool.scratch_block] = False  # the padded rows wrote there
    for got_c, want_c in ((cache.k, k_eager), (cache.v, v_eager)):  # row count changes matmul blocking: close
        assert torch.allclose(got_c[:, real], want_c[:, real], atol=1e-5, rtol=1e-5)
    assert not torch.equal(cache.k[:, real], k0[:, real])  # the step did write keys


def test_mixed_step_buckets_and_what_fits():
    from lowbit.engine.cuda_graphs import CudaGraphMixed, token_buckets

    assert token_buckets(2048) == [16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048]
    assert token_buckets(300) == [16, 32, 64, 128, 256, 300] and token_buckets(7) == [7]
    model, cache, _ = _mixed_step_setup("fp16", "cpu", torch.float32)
    mixed = CudaGraphMixed(model, cache.k, cache.v, 8, cache.scratch_slot, max_seqs=4, max_tokens=300)
    one = lambda start, nq: (start, nq, nq, [0])  # noqa: E731
    assert mixed.fits(300, [one(0, 300)]) and not mixed.fits(301, [one(0, 301)])
    assert not mixed.fits(5, [one(i, 1) for i in range(5)])  # 5 sequences > max_seqs
    # 16 tokens: ceil(16/64) + 4 = 5 tiles at most; four spans take one tile each
    assert mixed.fits(16, [one(0, 13), one(13, 1), one(14, 1), one(15, 1)])
