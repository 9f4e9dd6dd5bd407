"""Where a prefill and a decode step spend their time, kernel by kernel (torch.profiler):

    python -m benchmarks.profile_step --shape llama-2-7b --formats fp16,qtip2 --prompt 1000 --steps 10

For each format: a random-weight model of the shape (`lowbit.quantized_models.synthetic`), one
eager prefill of `--prompt` tokens (what TTFT measures in `lowbit bench decode`) and `--steps`
eager decode steps at batch 1, each profiled after a warm-up. Prints the wall time, the summed
device time and the top kernels by device time (per prefill / per step). Eager, so the decode
kernel times are those a CUDA-graph replay runs, without the host gaps. `--host N` also runs N
prefills under cProfile and prints the Python functions that take the host's time (a prefill
whose wall time exceeds its device time is waiting on the host). On a machine without a GPU it
profiles CPU operators instead (useful only at `--shape tiny`, to check the script).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lowbit.bench import PrefillContext, release_device_memory, sync_device
from lowbit.engine.cuda_graphs import GraphDecodeContext
from lowbit.quantized_models.synthetic import random_model


def top_kernels(prof, per: int, top: int, cuda: bool) -> tuple[float, list[str]]:
    """Summed self time (µs per run) and the `top` lines, heaviest first."""
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    ev = [e for e in prof.key_averages() if e.device_type == kind]
    t = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(t(e) for e in ev) / per
    lines = [f"  {t(e) / per / 1e3:8.3f} ms {e.count / per:6.1f}x  {e.key[:100]}"
             for e in sorted(ev, key=t, reverse=True)[:top]]
    return total, lines


@torch.inference_mode()
def host_profile(fn, runs: int, top: int) -> list[str]:
    """The `top` Python functions by own time over `runs` calls of fn (ms per call)."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(runs):
        fn()
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]  # (file, line, name): (cc, nc, tt, ct, callers)
    return [f"  {tt / runs * 1e3:8.3f} ms own {ct / runs * 1e3:8.3f} ms total {nc / runs:7.1f}x  "
            f"{name} ({file.rsplit('/', 2)[-1] if '/' in file else file}:{line})"
            for (file, line, name), (_, nc, tt, ct, _) in rows]


def profile_format(shape: str, variant: str, prompt_len: int, steps: int, dev: torch.device, top: int,
                   host_runs: int = 0) -> list[str]:
    model = random_model(shape, variant, device=dev, max_position_embeddings=prompt_len + steps + 64)
    cfg = model.config
    bs = 16
    nblk = -(-(prompt_len + steps + 8) // bs)
    shp = (cfg.num_layers, nblk, bs, cfg.num_kv_heads, cfg.head_dim)
    kc = torch.zeros(shp, dtype=model.dtype, device=dev)
    vc = torch.zeros_like(kc)
    tables = torch.arange(nblk, dtype=torch.int32, device=dev).view(1, -1)
    prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), device=dev)
    pos = torch.arange(prompt_len, device=dev)

    def prefill():
        h = model(prompt, pos, PrefillContext(kc, vc, pos.clone(), 1, prompt_len))
        return model.compute_logits(h[-1:]).argmax(-1)

    def step(i: int):
        p = torch.tensor([prompt_len + i], device=dev)
        ctx = GraphDecodeContext(kc, vc, p.clone(), tables, (p + 1).to(torch.int32), cfg.head_dim ** -0.5)
        return model.compute_logits(model(torch.ones(1, dtype=torch.long, device=dev), p, ctx)).argmax(-1)

    def decode():
        for i in range(steps):
            step(i)

    prefill()
    step(0)  # warm-up: compiles and tunes for both shapes
    sync_device(dev)
    cuda = dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out = []
    for name, fn, per in (("prefill", prefill, 1), ("decode step", decode, steps)):
        t0 = time.perf_counter()
        fn()
        sync_device(dev)
        wall = (time.perf_counter() - t0) / per
        with profile(activities=acts) as prof:
            fn()
            sync_device(dev)
        total, lines = top_kernels(prof, per, top, cuda)
        out.append(f"== {variant} {name} ({prompt_len} tokens)" if name == "prefill" else f"== {variant} {name}")
        out.append(f"  wall {wall * 1e3:.2f} ms, {'device' if cuda else 'CPU operator'} time {total / 1e3:.2f} ms")
        out.extend(lines)
    if host_runs:
        out.append(f"== {variant} prefill host time (cProfile, {host_runs} runs)")
        out.extend(host_profile(lambda: (prefill(), sync_device(dev)), host_runs, top))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-2-7b")
    ap.add_argument("--formats", default="fp16,qtip2")
    ap.add_argument("--prompt", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--host", type=int, default=0, help="also profile the host side of this many prefills")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}, shape {args.shape}", flush=True)
    for variant in args.formats.split(","):
        print("\n".join(profile_format(args.shape, variant, args.prompt, args.steps, dev, args.top, args.host)), flush=True)
        release_device_memory()  # the model went with profile_format's frame
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
