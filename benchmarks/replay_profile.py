"""Device timeline of CUDA-graph decode replays (torch.profiler over graph replays):

    python -m benchmarks.replay_profile [--shape llama-2-7b] [--format qtip2] [--context 128] [--steps 5]

Captures the engine's batch-1 decode graph (`CudaGraphDecoder`) for a random-weight model, replays it
`--steps` times under the profiler and prints, per step: kernels, the span from the first kernel's
start to the last one's end, the summed kernel time (above the span when PDL overlaps launches),
the gaps between kernels, and the top kernels. Unlike `profile_step` (eager steps) this is the
graph the decode loop replays. Needs a CUDA GPU; LOWBIT_PDL=0 compares without overlap.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from lowbit.engine.cuda_graphs import CudaGraphDecoder
from lowbit.quantized_models.synthetic import random_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-2-7b")
    ap.add_argument("--format", default="qtip2")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: replay_profile needs a CUDA GPU")
        return 2
    dev = torch.device("cuda")
    model = random_model(args.shape, args.format, device=dev)
    cfg, block = model.config, 16
    per = -(-(args.context + 1) // block)
    shape = (cfg.num_layers, per + 1, block, cfg.num_kv_heads, cfg.head_dim)
    kc = torch.zeros(shape, dtype=model.dtype, device=dev)
    vc = torch.zeros_like(kc)
    dec = CudaGraphDecoder(model, kc, vc, per, scratch_slot=per * block, buckets=[1])
    dec.capture()
    p = torch.tensor([args.context], device=dev)
    dec.run(torch.tensor([5], device=dev), p, p.clone(), torch.arange(per, dtype=torch.int32, device=dev)[None],
            (p + 1).int())
    graph = dec.graphs[1][0]
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            graph.replay()
        torch.cuda.synchronize()
    evs = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    n = args.steps
    span = (evs[-1].time_range.end - evs[0].time_range.start) / n
    busy = sum(e.time_range.end - e.time_range.start for e in evs) / n
    gaps = [b.time_range.start - a.time_range.end for a, b in zip(evs, evs[1:], strict=False)]
    print(f"# {torch.cuda.get_device_name()} {args.shape} {args.format} batch 1 context {args.context}")
    print(f"kernels/step {len(evs) / n:.0f} span/step {span / 1e3:.3f} ms, summed kernel time {busy / 1e3:.3f} ms")
    print(f"overlapping pairs {sum(g < 0 for g in gaps) / n:.0f}/step, "
          f"total positive gap {sum(max(0, g) for g in gaps) / n / 1e3:.3f} ms")
    by = defaultdict(lambda: [0, 0.0])
    for e in evs:
        by[e.name[:40]][0] += 1
        by[e.name[:40]][1] += e.time_range.end - e.time_range.start
    for name, (count, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:8]:
        print(f"  {t / n / 1e3:.3f} ms {count / n:.0f}x {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
