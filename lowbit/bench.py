"""`lowbit bench kernels | decode | serve`: the benchmark suite behind benchmarks/RESULTS.md.

`decode` measures batch-1 and batch-N decode speed of a model (a real checkpoint or a random-weight
model of a named shape in any format) with the same step code for every format, next to the memory
roofline: bytes a decode step must read (compressed weights + KV cache) over the device copy
bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time

import torch

from .kernels.fused import store_kv
from .quantized_models.attention import AttentionContext, causal_attention, slot_views


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    a = torch.empty(nbytes // 2, dtype=torch.float16, device=device).uniform_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * (nbytes // 2) * 2 / sorted(times)[len(times) // 2]


class PrefillContext(AttentionContext):
    """B equal-length prompts: writes their keys/values into the paged cache and attends causally."""

    def __init__(self, k_cache, v_cache, slot_mapping, batch, seq_len):
        self.k_cache, self.v_cache, self.slots = k_cache, v_cache, slot_mapping
        self.batch, self.seq_len = batch, seq_len

    def kv_slots(self, layer):
        return slot_views(self.k_cache[layer], self.v_cache[layer], self.slots)

    def attend(self, layer, q, k, v, stored=False):
        if not stored:
            store_kv(k, v, *self.kv_slots(layer))
        b, t = self.batch, self.seq_len
        q, k, v = (x.view(b, t, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
        out = causal_attention(q, k, v)
        return out.transpose(1, 2).reshape(b * t, out.shape[1], out.shape[3])


def weight_bytes(model) -> int:
    """Bytes a decode step reads for weights: every Linear's storage plus the embedding rows it
    touches (one row, or the whole table when it doubles as the LM head)."""
    emb = model.embed_tokens.weight
    head = emb.numel() if model.lm_head is None else emb.shape[1]
    return sum(m.storage_bytes for _, m in model.quant_linears()) + head * emb.element_size()


def release_device_memory() -> None:
    """Give a dropped model's or engine's device memory back before the next one loads: an Engine
    sits in reference cycles (its thread, callbacks), which `del` alone leaves to Python's cyclic
    collector, so `empty_cache` would find its KV cache and graphs still held."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync_device(dev: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), before reading a host clock."""
    if dev.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def bench_decode_model(model, batch: int, prompt_len: int, gen_len: int, use_graphs: bool = True,
                       block_size: int = 16) -> dict:
    """Greedy decode of `batch` random prompts; returns step time, tok/s and TTFT."""
    from .engine.cuda_graphs import CudaGraphDecoder, GraphDecodeContext

    cfg, dev = model.config, model.device
    total = prompt_len + gen_len
    blocks_per_seq = -(-total // block_size)
    num_blocks = batch * blocks_per_seq + 1  # + one scratch block for padded graph rows
    shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    k_cache = torch.zeros(shape, dtype=model.dtype, device=dev)
    v_cache = torch.zeros_like(k_cache)
    tables = torch.arange(batch * blocks_per_seq, dtype=torch.int32, device=dev).view(batch, blocks_per_seq)

    def slots(pos: torch.Tensor) -> torch.Tensor:  # pos [batch, T] -> flat cache slots [batch*T]
        blk = tables.long().gather(1, pos // block_size)
        return (blk * block_size + pos % block_size).reshape(-1)

    g = torch.Generator(device=dev).manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=dev, generator=g)
    pos = torch.arange(prompt_len, device=dev).repeat(batch, 1)

    def prefill():
        ctx = PrefillContext(k_cache, v_cache, slots(pos), batch, prompt_len)
        hidden = model(prompt.reshape(-1), pos.reshape(-1), ctx)
        last = hidden.view(batch, prompt_len, -1)[:, -1]
        return model.compute_logits(last).argmax(-1)

    prefill()  # warm-up: compiles kernels for this shape
    times = []
    for _ in range(3):  # the median of three: one run on a busy host can be off by tens of ms
        sync_device(dev)
        t0 = time.perf_counter()
        nxt = prefill()
        sync_device(dev)
        times.append(time.perf_counter() - t0)
    ttft = sorted(times)[1]

    graphs = None
    if use_graphs:
        graphs = CudaGraphDecoder(model, k_cache, v_cache, blocks_per_seq, scratch_slot=(num_blocks - 1) * block_size,
                                  buckets=[batch])
        graphs.capture()

    def step(tokens, p):
        ctx_lens = (p + 1).to(torch.int32)
        sl = slots(p[:, None])
        if graphs is not None:
            return graphs.run(tokens, p, sl, tables, ctx_lens).argmax(-1)
        ctx = GraphDecodeContext(k_cache, v_cache, sl, tables, ctx_lens, cfg.head_dim ** -0.5)
        return model.compute_logits(model(tokens, p, ctx)).argmax(-1)

    p = torch.full((batch,), prompt_len, device=dev)
    for _ in range(3):  # warm-up steps (positions rewritten below)
        step(nxt, p)
    sync_device(dev)
    t0 = time.perf_counter()
    for i in range(gen_len):
        nxt = step(nxt, p + i)
    sync_device(dev)
    dt = (time.perf_counter() - t0) / gen_len
    replay = float("nan")
    if graphs is not None:
        # The same step's graph replayed back to back, no host work between: the device's own step
        # time. The loop above also pays the host's per-step tensor ops (positions, slots, the copies
        # into the graph's buffers, argmax); where it is slower than this, the step is host-bound.
        g = graphs.graphs[graphs.bucket_for(batch)][0]
        sync_device(dev)
        t0 = time.perf_counter()
        for _ in range(gen_len):
            g.replay()
        sync_device(dev)
        replay = (time.perf_counter() - t0) / gen_len
    kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * model.dtype.itemsize * batch * (
        prompt_len + gen_len / 2)
    return {"batch": batch, "step_ms": dt * 1e3, "tok_s": batch / dt, "tok_s_per_seq": 1 / dt,
            "ttft_ms": ttft * 1e3, "replay_ms": replay * 1e3, "bytes_per_step": weight_bytes(model) + kv_bytes,
            "graph_capture_s": graphs.capture_seconds if graphs else 0.0}


@torch.inference_mode()
def bench_engine(model, batch: int, prompt_len: int, gen_len: int) -> float:
    """Generated tok/s of the serving engine itself (scheduler, sampler, detokenizer, CUDA graphs)
    on `batch` greedy requests, prefill included: what a user of lowbit gets, host overhead and all."""
    from .config import EngineConfig
    from .engine.engine import Engine
    from .engine.sampling_params import SamplingParams

    blocks = batch * -(-(prompt_len + gen_len) // 16) + 2
    eng = Engine(EngineConfig(kv_cache_blocks=blocks, max_num_seqs=batch,
                              max_num_batched_tokens=max(2048, batch * prompt_len)), model=model)
    g = torch.Generator().manual_seed(1)

    def requests(n_tokens):
        return [eng.make_request(torch.randint(0, model.config.vocab_size, (prompt_len,), generator=g).tolist(),
                                 SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True))
                for _ in range(batch)]

    eng.run(requests(4))  # warm-up: prefill shapes
    sync_device(model.device)
    t0 = time.perf_counter()
    eng.run(requests(gen_len))
    sync_device(model.device)
    return batch * gen_len / (time.perf_counter() - t0)


@torch.inference_mode()
def bench_engine_ttft(model, prompt_len: int, runs: int = 3) -> float:
    """Seconds from submitting one `prompt_len`-token request to an idle engine (default settings:
    the prefill replays a mixed-step CUDA graph where one fits) to its first token: the median of
    `runs` after a warm-up."""
    from .config import EngineConfig
    from .engine.engine import Engine
    from .engine.sampling_params import SamplingParams

    eng = Engine(EngineConfig(kv_cache_blocks=-(-(prompt_len + 8) // 16) + 2, max_num_seqs=1,
                              max_num_batched_tokens=max(2048, prompt_len)), model=model)
    g = torch.Generator().manual_seed(2)
    times = []
    for _ in range(runs + 2):  # two warm-ups: the first measured TTFT on a fresh engine ran ~20 ms long
        ids = torch.randint(0, model.config.vocab_size, (prompt_len,), generator=g).tolist()
        req = eng.make_request(ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        t0 = time.perf_counter()
        eng.run([req])
        times.append(time.perf_counter() - t0)
    eng.shutdown()
    return sorted(times[2:])[len(times[2:]) // 2]


def cmd_decode(args) -> int:
    from .quantized_models.synthetic import VARIANTS, random_model

    if not torch.cuda.is_available():
        print("error: `lowbit bench decode` needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    rows = []
    variants = args.formats.split(",") if not args.model else ["checkpoint"]
    for variant in variants:
        if args.model:
            import lowbit

            model = lowbit.load_model(args.model, device=dev)
        else:
            if variant not in VARIANTS:
                print(f"error: unknown format variant {variant!r}; known: {', '.join(VARIANTS)}", file=sys.stderr)
                return 2
            model = random_model(args.shape, variant, device=dev, max_position_embeddings=max(
                4096, args.prompt + args.gen + 16))
        for batch in [int(b) for b in args.batch.split(",")]:
            r = bench_decode_model(model, batch, args.prompt, args.gen, use_graphs=not args.eager)
            r.update(variant=variant, roofline_tok_s=batch * bw / r["bytes_per_step"])
            if not args.eager and not args.no_engine:
                r["engine_tok_s"] = bench_engine(model, batch, args.prompt, args.gen)
            r["roofline_frac"] = r["tok_s"] / r["roofline_tok_s"]
            if args.ttft_prompt and batch == 1:
                r["ttft_long_ms"] = bench_decode_model(model, 1, args.ttft_prompt, 4, use_graphs=False)["ttft_ms"]
                if not args.eager:
                    r["engine_ttft_long_ms"] = 1e3 * bench_engine_ttft(model, args.ttft_prompt)
            rows.append(r)
            print(json.dumps(r), flush=True)
        del model
        release_device_memory()
    base = {r["batch"]: r["tok_s"] for r in rows if r["variant"] == "fp16"}
    print(f"\n# decode: shape={args.shape if not args.model else args.model} prompt={args.prompt} gen={args.gen} "
          f"graphs={not args.eager} device={torch.cuda.get_device_name()} copy_bw={bw / 1e9:.0f} GB/s "
          f"date={datetime.date.today()} torch={torch.__version__} host={platform.node()}")
    print("| format | batch | tok/s | ms/step | replay ms/step | x fp16 | roofline tok/s | % roofline | engine tok/s "
          "| TTFT ms | TTFT long ms | engine TTFT long ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        x = r["tok_s"] / base[r["batch"]] if r["batch"] in base else float("nan")
        print(f"| {r['variant']} | {r['batch']} | {r['tok_s']:.0f} | {r['step_ms']:.2f} | {r['replay_ms']:.2f} | {x:.2f} | "
              f"{r['roofline_tok_s']:.0f} | {100 * r['roofline_frac']:.0f}% | {r.get('engine_tok_s', float('nan')):.0f} | "
              f"{r['ttft_ms']:.1f} | "
              f"{r.get('ttft_long_ms', float('nan')):.1f} | {r.get('engine_ttft_long_ms', float('nan')):.1f} |")
    return 0


def cmd_kernels(args) -> int:
    try:
        from benchmarks import kernels
    except ImportError:
        print("error: `lowbit bench kernels` runs benchmarks/kernels.py from a lowbit source checkout; "
              "run it from the repository root", file=sys.stderr)
        return 2
    return kernels.main(args.rest) or 0


def cmd_serve(args) -> int:
    try:
        from load_tests import loadgen
    except ImportError:
        print("error: `lowbit bench serve` runs load_tests/loadgen.py from a lowbit source checkout; "
              "run it from the repository root", file=sys.stderr)
        return 2
    return loadgen.main(args.rest) or 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: kernels, decode speed, serving load")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    d = bsub.add_parser("decode", help="decode tok/s of a model (real checkpoint or random weights of a shape)")
    d.add_argument("--shape", default="llama-2-7b", help="named shape for random weights (see synthetic.SHAPES)")
    d.add_argument("--model", default=None, help="a real checkpoint instead of random weights")
    d.add_argument("--formats", default="fp16,qtip2,qtip3,qtip4,vptq2,gptq4",
                   help="comma-separated variants: fp16, qtip2/3/4, vptq2/3, gptq2/3/4/8")
    d.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    d.add_argument("--prompt", type=int, default=128)
    d.add_argument("--gen", type=int, default=256)
    d.add_argument("--ttft-prompt", type=int, default=1000, help="also time prefill of one prompt this long (0: skip)")
    d.add_argument("--eager", action="store_true", help="no CUDA graphs (shows launch overhead)")
    d.add_argument("--no-engine", action="store_true", help="skip the serving engine's own tok/s (its graph captures)")
    d.set_defaults(func=cmd_decode)
    k = bsub.add_parser("kernels", help="the kernel suite (benchmarks/kernels.py); extra args pass through")
    k.add_argument("rest", nargs=argparse.REMAINDER)
    k.set_defaults(func=cmd_kernels)
    s = bsub.add_parser("serve", help="the load generator against a running server (load_tests/loadgen.py)")
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_serve)
