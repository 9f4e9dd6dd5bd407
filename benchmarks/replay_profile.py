"""Device timeline of CUDA-graph decode replays (torch.profiler over graph replays):

    python -m benchmarks.replay_profile [--shape llama-2-7b] [--format qtip2] [--context 128] [--steps 5] [--batch 1]
    python -m benchmarks.replay_profile --ablate hadamard,frag,attention
    python -m benchmarks.replay_profile --batch 64 --timeline 2
    python -m benchmarks.replay_profile --knob LOWBIT_ATTENTION_EARLY --context 1000 --capacity 4096


Captures the engine's decode graph of one batch bucket (default 1) (`CudaGraphDecoder`) for a random-weight model, replays it
`--steps` times under the profiler and prints, per step: kernels, the span from the first kernel's
start to the last one's end, the summed kernel time (above the span when PDL overlaps launches),
the gaps between kernels, and the top kernels. Unlike `profile_step` (eager steps) this is the
graph the decode loop replays. Needs a CUDA GPU; LOWBIT_PDL=0 compares without overlap.

`--timeline L` also lists, in order, one layer's cycle of launches in the last step (from layer L's
attention launch to layer L+1's: start offset, duration, kernel): which of a layer's launches of one
kernel (the Hadamard launches share a name) costs what.

`--ablate` answers what each kernel class costs on the replayed step's critical path (the
profiler's per-kernel sums cannot: with PDL the kernels overlap, and the profiler itself slows
launches): it captures the graph again with one class of launches left out (its outputs are then
stale or garbage, which changes no kernel's time) and times plain replays, no profiler, against
the whole graph's.

`--knob VAR` captures the graph twice, with the environment variable VAR at 0 and at 1 (a switch
read when the launches are recorded, such as LOWBIT_ATTENTION_EARLY or LOWBIT_PDL), then times the
two graphs' replays in alternation, so both settings see the same weights, GPU state and clocks.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections import defaultdict
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile

from lowbit.engine.cuda_graphs import CudaGraphDecoder
from lowbit.quantized_models.synthetic import random_model


def _skip_hadamard(x, out=None, out_dtype=None, frag_nb=0, **_):
    if frag_nb:  # the fragment kernel's x buffer
        return torch.empty(8 * frag_nb, x.shape[-1], dtype=out_dtype or x.dtype, device=x.device)
    return out if out is not None else torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)


def _skip_attention(q, *_, out=None, **__):
    return out if out is not None else torch.empty_like(q)


# Launch classes `--ablate` can leave out, each by the name the decode graph calls it through (the
# attention kernel is imported by name into the graph decoder: patching its home module would leave
# the graph's launches in place and report 0 saved).
ABLATIONS = {
    "hadamard": ("lowbit.kernels.qtip_triton.hadamard_transform", _skip_hadamard),
    "frag": ("lowbit.kernels.qtip_triton.frag_matmul", lambda *a, **k: None),
    "attention": ("lowbit.engine.cuda_graphs.paged_decode_attention", _skip_attention),
}


def _decoder(model, context: int, batch: int = 1, capacity: int = 0):
    """The engine's decode graph for `batch` sequences of `model` at `context` tokens each (pages of
    their own), captured and warmed."""
    dev = torch.device("cuda")
    cfg, block = model.config, 16
    per = -(-(context + 1) // block)
    width = max(per, -(-capacity // block))  # the page table's width: the engine sizes it by max_model_len
    shape = (cfg.num_layers, batch * per + 1, block, cfg.num_kv_heads, cfg.head_dim)
    kc = torch.zeros(shape, dtype=model.dtype, device=dev)
    vc = torch.zeros_like(kc)
    dec = CudaGraphDecoder(model, kc, vc, width, scratch_slot=batch * per * block, buckets=[batch])
    dec.capture()
    p = torch.full((batch,), context, device=dev)
    tables = torch.arange(batch * per, dtype=torch.int32, device=dev).view(batch, per)
    slots = tables[:, context // block].long() * block + context % block
    dec.run(torch.full((batch,), 5, device=dev), p, slots, tables, (p + 1).int())
    graph = dec.graphs[batch][0]
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    return dec, graph


def _replay_ms(graph, steps: int, rounds: int = 5) -> float:
    """Median over rounds of the mean replay time (CUDA events around `steps` back-to-back replays)."""
    times = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / steps)
    return sorted(times)[len(times) // 2]


def ablate(model, context: int, names: list[str], steps: int = 200, batch: int = 1, capacity: int = 0) -> int:
    """Replay time of the whole graph and of graphs with one launch class left out."""
    rows = []
    for name in ["none", *names]:
        with contextlib.ExitStack() as stack:
            if name != "none":
                target, fake = ABLATIONS[name]
                stack.enter_context(mock.patch(target, fake))
            dec, graph = _decoder(model, context, batch, capacity)
            kernels = _count_kernels(graph)
            rows.append((name, kernels, _replay_ms(graph, steps)))
            del dec, graph
    base = rows[0][2]
    print("| left out | kernels/step | replay ms/step | saved ms | saved % |")
    print("|---|---|---|---|---|")
    for name, kernels, ms in rows:
        print(f"| {name} | {kernels} | {ms:.3f} | {base - ms:.3f} | {100 * (base - ms) / base:.0f}% |")
    return 0


def knob_ab(model, context: int, var: str, steps: int = 200, batch: int = 1, capacity: int = 0,
            rounds: int = 3) -> int:
    """Replay time of the graph captured with VAR=0 against VAR=1, timed in alternation."""
    graphs = {}
    for setting in ("0", "1"):
        with mock.patch.dict(os.environ, {var: setting}):
            graphs[setting] = _decoder(model, context, batch, capacity)
    times = {"0": [], "1": []}
    for _ in range(rounds):
        for setting in ("0", "1"):
            times[setting].append(_replay_ms(graphs[setting][1], steps))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"| {var} | replay ms/step (median of {rounds}) | each round |")
    print("|---|---|---|")
    for setting in ("0", "1"):
        print(f"| {setting} | {med[setting]:.3f} | {', '.join(f'{t:.3f}' for t in times[setting])} |")
    print(f"{var}=1 / {var}=0: {med['1'] / med['0']:.3f} of the time")
    return 0


def _count_kernels(graph) -> int:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    return sum(e.device_type.name == "CUDA" for e in prof.events())


def _header(args) -> str:
    """The run's first line: device, model, batch, context and the page table's capacity."""
    return (f"# {torch.cuda.get_device_name()} {args.shape} {args.format} batch {args.batch} context {args.context} "
            f"capacity {max(args.capacity, args.context + 1)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-2-7b")
    ap.add_argument("--format", default="qtip2")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--capacity", type=int, default=0,
                    help="tokens a sequence's page table holds (default: the context; the engine's is max_model_len)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1, help="sequences a step (the graph bucket)")
    ap.add_argument("--timeline", type=int, default=-1, help="list the launches of this decoder layer in order")
    ap.add_argument("--ablate", default="", help=f"comma list of {sorted(ABLATIONS)}: time the graph without them")
    ap.add_argument("--knob", default="", help="an environment switch (or a comma list of them, one after another): "
                    "time the graph captured with it at 0 and at 1")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: replay_profile needs a CUDA GPU")
        return 2
    model = random_model(args.shape, args.format, device=torch.device("cuda"))
    if args.ablate:
        names = [n for n in args.ablate.split(",") if n]
        unknown = set(names) - set(ABLATIONS)
        if unknown:
            print(f"error: --ablate takes {sorted(ABLATIONS)}, got {sorted(unknown)}")
            return 2
        print(_header(args))
        return ablate(model, args.context, names, batch=args.batch, capacity=args.capacity)
    if args.knob:
        print(_header(args))
        for var in args.knob.split(","):  # one model built, each switch's A/B in turn
            knob_ab(model, args.context, var, batch=args.batch, capacity=args.capacity)
        return 0
    _dec, graph = _decoder(model, args.context, args.batch, args.capacity)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            graph.replay()
        torch.cuda.synchronize()
    evs = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    n = args.steps
    span = (evs[-1].time_range.end - evs[0].time_range.start) / n
    busy = sum(e.time_range.end - e.time_range.start for e in evs) / n
    gaps = [b.time_range.start - a.time_range.end for a, b in zip(evs, evs[1:], strict=False)]
    print(_header(args))
    print(f"kernels/step {len(evs) / n:.0f} span/step {span / 1e3:.3f} ms, summed kernel time {busy / 1e3:.3f} ms")
    print(f"overlapping pairs {sum(g < 0 for g in gaps) / n:.0f}/step, "
          f"total positive gap {sum(max(0, g) for g in gaps) / n / 1e3:.3f} ms")
    by = defaultdict(lambda: [0, 0.0])
    for e in evs:
        by[e.name[:40]][0] += 1
        by[e.name[:40]][1] += e.time_range.end - e.time_range.start
    for name, (count, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:12]:
        print(f"  {t / n / 1e3:.3f} ms {count / n:.0f}x {t / count:.1f} us each {name}")
    if args.timeline >= 0:
        per_step = len(evs) // n
        print_layer_timeline(evs[-per_step:], args.timeline)
    return 0


def layer_launches(step: list, layer: int) -> list:
    """One decoder layer's cycle of launches in one step's launches (in start order): from layer
    `layer`'s paged-attention launch up to the next layer's (every layer launches
    `_paged_decode_kernel` exactly once, so the cut is exact whatever else a layer launches)."""
    marks = [i for i, e in enumerate(step) if e.name.startswith("_paged_decode_kernel")]
    if layer + 1 >= len(marks):
        raise ValueError(f"the step has {len(marks)} paged-attention launches: no cycle for layer {layer}")
    return step[marks[layer]:marks[layer + 1]]


def print_layer_timeline(step: list, layer: int) -> None:
    """The layer's launches with their share of the critical path: how far each moves the latest
    end seen so far (the previous layer's last launch included), so overlapping PDL launches add
    up to the layer's period, printed last (the next layer's attention start)."""
    launches = layer_launches(step, layer)
    first = step.index(launches[0])
    t0 = launches[0].time_range.start
    latest = step[first - 1].time_range.end if first else t0
    print(f"layer {layer} from its attention launch to the next layer's: {len(launches)} launches; "
          f"the launch before it ends at {latest - t0:.1f} us")
    print("| # | start us | us | end us | critical-path share us | kernel |")
    print("|---|---|---|---|---|---|")
    for i, e in enumerate(launches):
        end = e.time_range.end
        share = max(0.0, end - latest)
        latest = max(latest, end)
        print(f"| {i} | {e.time_range.start - t0:.1f} | {end - e.time_range.start:.1f} | {end - t0:.1f} | {share:.1f} "
              f"| {e.name[:60]} |")
    nxt = first + len(launches)
    if nxt < len(step):
        print(f"next layer's attention starts at {step[nxt].time_range.start - t0:.1f} us")


if __name__ == "__main__":
    raise SystemExit(main())
