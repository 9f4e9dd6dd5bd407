"""N closed-loop streams through the engine alone (no HTTP): where the serving time goes.

Each stream keeps one request in flight; when it finishes, the stream submits a new prompt (lengths
drawn from ranges, like the load generator's). Every engine step is timed and classed: a pure decode
step (a CUDA graph replay on GPU) or a mixed step (prompt chunks, run eagerly; for quantized weights
the prefill path decodes every weight to fp16). Per scheduler setting (`--prefill-wait`, and with
`--mixed-graphs on,off` mixed steps replayed from CUDA graphs or eager; on the same loaded model,
after a warm-up run) it prints output tok/s, the count and mean time of each kind of step, and TTFT and
inter-token latency percentiles. Set against `benchmarks/serve_compare.py` (the same load through
HTTP) it separates the engine's time from the server's.

    python -m benchmarks.engine_streams --models random:llama-2-7b:fp16,random:llama-2-7b:qtip2 \\
        --streams 64 --seconds 20 --prefill-wait 0,8,16
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.profile_step import host_profile, top_kernels
from load_tests.loadgen import Distribution, percentiles
from lowbit.bench import release_device_memory, sync_device
from lowbit.config import EngineConfig
from lowbit.engine import Engine, SamplingParams


class Stream:
    """One client: a request in flight, the times its tokens arrived."""

    def __init__(self):
        self.req = None
        self.submitted = 0.0
        self.times: list[float] = []


def run_streams(eng: Engine, streams: int, seconds: float, prompt: Distribution, output: Distribution,
                rng: random.Random, max_steps: int | None = None) -> dict:
    """Closed loop for `seconds` (or `max_steps`); returns the step mix, throughput and latencies."""
    vocab = eng.model.config.vocab_size
    last_batch: list = []
    schedule = eng.scheduler.schedule

    def recording_schedule():
        last_batch[:] = schedule()
        return list(last_batch)

    def submit(s: Stream) -> None:
        ids = [rng.randrange(vocab) for _ in range(prompt.sample(rng))]
        params = SamplingParams(max_tokens=output.sample(rng), temperature=0, ignore_eos=True)
        s.req, s.submitted, s.times = eng.make_request(ids, params), time.perf_counter(), []
        eng.submit(s.req)

    clients = [Stream() for _ in range(streams)]
    for s in clients:
        submit(s)
    steps: dict[str, list[float]] = {"decode": [], "mixed": []}
    ttft, itl, generated = [], [], 0
    eng.scheduler.schedule = recording_schedule
    try:
        sync_device(eng.model.device)
        t_start = time.perf_counter()
        while time.perf_counter() - t_start < seconds and (max_steps is None or sum(map(len, steps.values())) < max_steps):
            t0 = time.perf_counter()
            eng.step()
            t1 = time.perf_counter()
            kind = "decode" if last_batch and all(n == 1 for _, n in last_batch) else "mixed"
            steps[kind].append(t1 - t0)
            for s in clients:
                have = len(s.req.seqs[0].output_ids)
                while len(s.times) < have:
                    (itl.append(t1 - s.times[-1]) if s.times else ttft.append(t1 - s.submitted))
                    s.times.append(t1)
                    generated += 1
                if s.req.finished:
                    submit(s)
        wall = time.perf_counter() - t_start
    finally:
        eng.scheduler.schedule = schedule
        for s in clients:  # leave the engine idle for the next setting
            eng.abort(s.req.id)
        while eng.step():
            pass
    ms = lambda xs: 1e3 * statistics.fmean(xs) if xs else float("nan")  # noqa: E731
    return {"streams": streams, "wall_s": wall, "output_tok_s": generated / wall,
            "decode_steps": len(steps["decode"]), "mixed_steps": len(steps["mixed"]),
            "decode_step_ms": ms(steps["decode"]), "mixed_step_ms": ms(steps["mixed"]),
            "mixed_time_frac": sum(steps["mixed"]) / max(wall, 1e-9),
            "ttft_ms": _ms(percentiles(ttft)), "itl_ms": _ms(percentiles(itl))}


def _ms(p: dict) -> dict:
    return {k: (v if k == "n" else 1e3 * v) for k, v in p.items()} if p["n"] else {"n": 0, "p50": float("nan"),
                                                                                   "p90": float("nan")}


def profile_window(eng: Engine, args, model: str, top: int = 15) -> None:
    """torch.profiler over `--profile-steps` steps (device kernels and host operators, ms per step),
    then cProfile over as many (Python functions by own time, ms per step)."""
    cuda = eng.model.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    n = args.profile_steps

    def window():
        return run_streams(eng, args.streams, 1e9, args.prompt_tokens, args.output_tokens, random.Random(2), n)

    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        r = window()
    wall = time.perf_counter() - t0
    print(f"\n== {model}, prefill wait {eng.scheduler.wait_steps}: {n} steps profiled ({r['mixed_steps']} mixed), "
          f"{1e3 * wall / n:.2f} ms a step under the profiler")
    for on_device in ([True] if cuda else []) + [False]:
        total, lines = top_kernels(prof, n, top, on_device)
        print(f"{'device kernels' if on_device else 'host operators (self CPU)'}: {total / 1e3:.2f} ms a step")
        print("\n".join(lines))
    print(f"Python functions (cProfile; ms over a window of {n} steps, not per step):")
    print("\n".join(host_profile(window, 1, top)))


def run_settings(eng: Engine, args, model: str) -> list[dict]:
    """One run per (mixed-step graphs on/off, prefill wait) setting on the loaded engine."""
    rows = []
    captured = eng.runner.mixed
    try:
        for mixed in args.mixed_graphs.split(","):
            eng.runner.mixed = captured if mixed == "on" else None  # off: the eager mixed step
            if args.warmup > 0:  # first eager shapes compile and tune: not part of any setting's figures
                eng.scheduler.wait_steps = 0  # many different mixed steps
                run_streams(eng, args.streams, args.warmup, args.prompt_tokens, args.output_tokens, random.Random(1))
            for wait in [int(w) for w in args.prefill_wait.split(",")]:
                eng.scheduler.wait_steps = wait
                r = run_streams(eng, args.streams, args.seconds, args.prompt_tokens, args.output_tokens,
                                random.Random(0), args.max_steps)
                r.update(model=model, prefill_wait=wait, mixed_graphs=mixed == "on" and captured is not None)
                rows.append(r)
                print(json.dumps(r), flush=True)
    finally:
        eng.runner.mixed = captured
    return rows


def table(rows: list[dict]) -> str:
    out = ["| model | mixed-step graphs | prefill wait | output tok/s | decode steps (mean ms) | mixed steps (mean ms) "
           "| time in mixed | TTFT p50 / p90 ms | ITL p50 / p90 ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        graphs = "on" if r.get("mixed_graphs") else "off"
        out.append(f"| {r['model']} | {graphs} | {r['prefill_wait']} | {r['output_tok_s']:.0f} | {r['decode_steps']} "
                   f"({r['decode_step_ms']:.2f}) | {r['mixed_steps']} ({r['mixed_step_ms']:.2f}) | "
                   f"{100 * r['mixed_time_frac']:.0f}% | {r['ttft_ms']['p50']:.0f} / {r['ttft_ms']['p90']:.0f} | "
                   f"{r['itl_ms']['p50']:.1f} / {r['itl_ms']['p90']:.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="random:llama-2-7b:fp16,random:llama-2-7b:qtip2")
    ap.add_argument("--tokenizer", default=None, help="tokenizer for random:* models (default: SmolLM2's)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of load before each mixed-graphs setting, not reported")
    ap.add_argument("--max-steps", type=int, default=None, help="stop each run after this many steps")
    ap.add_argument("--prompt-tokens", type=Distribution, default=Distribution("64-128"))
    ap.add_argument("--output-tokens", type=Distribution, default=Distribution("64-128"))
    ap.add_argument("--prefill-wait", default="0,8", help="comma-separated prefill_wait_steps settings")
    ap.add_argument("--prefill-min-waiting", type=int, default=None, help="default: streams / 8")
    ap.add_argument("--mixed-graphs", default="on",
                    help="comma-separated on/off: mixed steps replay CUDA graphs (the default) or run eagerly")
    ap.add_argument("--kv-cache-blocks", type=int, default=None)
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="then profile this many steps at the last setting: device kernels, host ops, Python functions")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    rows = []
    for model in args.models.split(","):
        eng = Engine(EngineConfig(model=model, tokenizer=args.tokenizer, device=args.device,
                                  max_num_seqs=args.streams, kv_cache_blocks=args.kv_cache_blocks,
                                  prefill_min_waiting=args.prefill_min_waiting))
        try:
            rows += run_settings(eng, args, model)
            if args.profile_steps:
                profile_window(eng, args, model)
        finally:
            eng.shutdown()
            del eng
            release_device_memory()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n# engine_streams: streams={args.streams} seconds={args.seconds} prompt={args.prompt_tokens} "
          f"output={args.output_tokens} device={dev} date={datetime.date.today()} torch={torch.__version__}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
